//! Extended attributes, read without following symlinks.
//!
//! POSIX ACLs (`system.posix_acl_*`) and file capabilities (`security.capability`) are xattrs
//! on Linux, so copying every xattr verbatim also carries ACLs and capabilities.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;

use crate::Xattr;

/// Every xattr of `path` itself (not of a symlink's target), sorted by name.
pub fn read_path(path: &Path) -> io::Result<Vec<Xattr>> {
    let names = grow(|| rustix::fs::llistxattr_query(path), |buf| rustix::fs::llistxattr(path, buf))?;
    let mut out = Vec::new();
    for name in split_names(&names) {
        match grow(|| rustix::fs::lgetxattr_query(path, name), |buf| rustix::fs::lgetxattr(path, name, buf)) {
            Ok(value) => out.push(Xattr { name: name.to_vec(), value }),
            // Removed between list and get: it is simply not there any more.
            Err(e) if e.raw_os_error() == Some(Errno::NODATA.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Every xattr of `name` in the directory open at `dir` (not following a symlink), sorted by
/// name; `full` names it for errors and for kernels without `listxattrat` (Linux < 6.13),
/// where the list is read by path.
pub fn read_at(dir: BorrowedFd, name: &CStr, full: &dyn Fn() -> std::path::PathBuf) -> io::Result<Vec<Xattr>> {
    match list_at(dir, name) {
        // Most entries have no xattrs: one syscall, no path walk.
        Some(Ok(0)) => Ok(Vec::new()),
        Some(Err(e)) if e != Errno::NOSYS => Err(e.into()),
        // Some, or no listxattrat: the rare case goes by path.
        _ => read_path(&full()),
    }
}

static NO_LISTXATTRAT: AtomicBool = AtomicBool::new(false);

/// The size of `name`'s xattr name list via `listxattrat(2)` (Linux 6.13), or `None` where the
/// kernel or architecture lacks it.
fn list_at(dir: BorrowedFd, name: &CStr) -> Option<rustix::io::Result<usize>> {
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        use std::os::fd::AsRawFd;
        // The syscall number is shared by every architecture since the syscall-table
        // unification; libc does not name it yet.
        const SYS_LISTXATTRAT: libc::c_long = 465;
        if NO_LISTXATTRAT.load(Ordering::Relaxed) {
            return None;
        }
        // SAFETY: `name` is NUL-terminated; a NULL list of size 0 only queries the size.
        let r = unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                std::ptr::null_mut::<libc::c_char>(),
                0usize,
            )
        };
        if r >= 0 {
            return Some(Ok(r as usize));
        }
        let e = Errno::from_raw_os_error(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        if e == Errno::NOSYS {
            NO_LISTXATTRAT.store(true, Ordering::Relaxed);
            return None;
        }
        if e == Errno::NOTSUP {
            return Some(Ok(0));
        }
        Some(Err(e))
    }
    #[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
    {
        let _ = (dir, name, &NO_LISTXATTRAT);
        None
    }
}

/// Every xattr of the open file `fd`, sorted by name.
pub fn read_fd(fd: impl AsFd) -> io::Result<Vec<Xattr>> {
    let fd = fd.as_fd();
    let names = grow(|| rustix::fs::flistxattr_query(fd), |buf| rustix::fs::flistxattr(fd, buf))?;
    let mut out = Vec::new();
    for name in split_names(&names) {
        match grow(|| rustix::fs::fgetxattr_query(fd, name), |buf| rustix::fs::fgetxattr(fd, name, buf)) {
            Ok(value) => out.push(Xattr { name: name.to_vec(), value }),
            Err(e) if e.raw_os_error() == Some(Errno::NODATA.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

fn split_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&c| c == 0).filter(|n| !n.is_empty())
}

/// Calls a size-probing xattr syscall until the buffer is big enough. A filesystem without
/// xattr support reads as having none.
fn grow(
    mut query: impl FnMut() -> rustix::io::Result<usize>,
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    loop {
        let need = match query() {
            Ok(0) => return Ok(Vec::new()),
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; need];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Grew between the two calls: ask again.
            Err(Errno::RANGE) => continue,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

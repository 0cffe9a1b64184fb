//! Extended attributes, read without following symlinks.
//!
//! POSIX ACLs (`system.posix_acl_*`) and file capabilities (`security.capability`) are xattrs
//! on Linux, so copying every xattr verbatim also carries ACLs and capabilities.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

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

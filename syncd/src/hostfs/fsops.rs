//! Single-name filesystem operations inside an already-resolved directory descriptor.
//!
//! Nothing here takes a joined path: each call names one entry in one directory with an
//! `*at` syscall and never follows a symlink at that name. Metadata is set in the order a
//! root filesystem needs: owner, then mode (chown clears setuid/setgid), then xattrs
//! (`security.capability` is cleared by chown too), then mtime.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use manifest::{Entry, Hash, Kind, Meta, Xattr};
use rand::Rng;
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;

/// Prefix of every temporary name syncd creates: the prefix and 16 lowercase hex digits.
/// Leftovers of an interrupted pass are reused by the next pass when their content verifies
/// against a hash it needs, and removed before it stages anything otherwise.
pub const TEMP_PREFIX: &str = ".syncd-";

fn temp_name() -> String {
    format!("{TEMP_PREFIX}{:016x}", rand::rng().random::<u64>())
}

/// Whether `name` is one syncd makes for temporary entries (see [`TEMP_PREFIX`]).
pub fn is_temp_name(name: &[u8]) -> bool {
    name.len() == TEMP_PREFIX.len() + 16
        && name.starts_with(TEMP_PREFIX.as_bytes())
        && name[TEMP_PREFIX.len()..].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Moves `name` in `from` to a fresh temp name in `to` (never replacing anything there).
pub fn move_to_temp(from: BorrowedFd, name: &[u8], to: BorrowedFd) -> io::Result<String> {
    Ok(with_fresh_name(|n| rustix::fs::renameat_with(from, name, to, n, RenameFlags::NOREPLACE))?.1)
}

/// Creates a fresh name in `dir` with `make`, retrying on a collision (a planted name is never
/// reused, followed or overwritten).
fn with_fresh_name<T>(mut make: impl FnMut(&str) -> Result<T, Errno>) -> io::Result<(T, String)> {
    for _ in 0..16 {
        let name = temp_name();
        match make(&name) {
            Ok(t) => return Ok((t, name)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other("could not find a free temporary name after 16 tries"))
}

/// A new, empty regular file that nobody else can have opened: `O_CREAT | O_EXCL`, mode 0600.
pub fn create_temp_file(dir: BorrowedFd) -> io::Result<(std::fs::File, String)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let (fd, name) = with_fresh_name(|n| rustix::fs::openat(dir, n, flags, Mode::from_raw_mode(0o600)))?;
    Ok((std::fs::File::from(fd), name))
}

pub fn create_temp_dir(dir: BorrowedFd) -> io::Result<String> {
    Ok(with_fresh_name(|n| rustix::fs::mkdirat(dir, n, Mode::from_raw_mode(0o700)))?.1)
}

/// Creates a non-regular, non-directory node (symlink, device, fifo, socket) under a fresh name
/// with the entry's full metadata.
pub fn create_temp_node(dir: BorrowedFd, e: &Entry) -> io::Result<String> {
    let name = match e.kind {
        Kind::Symlink => {
            let target = e.target.as_deref().unwrap_or_default();
            with_fresh_name(|n| rustix::fs::symlinkat(target, dir, n))?.1
        }
        Kind::CharDevice | Kind::BlockDevice | Kind::Fifo | Kind::Socket => {
            let ft = match e.kind {
                Kind::CharDevice => FileType::CharacterDevice,
                Kind::BlockDevice => FileType::BlockDevice,
                Kind::Fifo => FileType::Fifo,
                _ => FileType::Socket,
            };
            with_fresh_name(|n| rustix::fs::mknodat(dir, n, ft, Mode::from_raw_mode(0o600), e.rdev))?.1
        }
        Kind::File | Kind::Dir => unreachable!("regular files and directories are not nodes"),
    };
    if let Err(err) = set_node_meta(dir, &name, e.kind, &e.meta, MetaParts::ALL) {
        let _ = rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty());
        return Err(err);
    }
    Ok(name)
}

/// Which parts of the metadata to (re)apply.
#[derive(Clone, Copy, Debug)]
pub struct MetaParts {
    pub owner: bool,
    pub mode: bool,
    pub xattrs: bool,
    pub mtime: bool,
}

impl MetaParts {
    pub const ALL: MetaParts = MetaParts { owner: true, mode: true, xattrs: true, mtime: true };
    pub const MTIME: MetaParts = MetaParts { owner: false, mode: false, xattrs: false, mtime: true };
    pub const NONE: MetaParts = MetaParts { owner: false, mode: false, xattrs: false, mtime: false };

    pub fn any(&self) -> bool {
        self.owner || self.mode || self.xattrs || self.mtime
    }
}

fn ts(meta: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        last_modification: Timespec { tv_sec: meta.mtime_sec, tv_nsec: meta.mtime_nsec.into() },
    }
}

/// Applies metadata to an open regular file or directory.
pub fn set_fd_meta(fd: BorrowedFd, meta: &Meta, parts: MetaParts) -> io::Result<()> {
    if parts.owner {
        rustix::fs::fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))?;
    }
    if parts.mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    }
    if parts.xattrs {
        let current = manifest::xattr::read_fd(fd)?;
        sync_xattrs(
            &current,
            &meta.xattrs,
            |n| rustix::fs::fremovexattr(fd, n),
            |n, v| rustix::fs::fsetxattr(fd, n, v, XattrFlags::empty()),
        )?;
    }
    if parts.mtime {
        rustix::fs::futimens(fd, &ts(meta))?;
        check_stored_mtime(meta, || rustix::fs::fstat(fd))?;
    }
    Ok(())
}

/// [`set_fd_meta`] with everything, skipping the owner, mode and mtime calls where the inode
/// already has them (a kept old inode, or a store object prepared with this path's metadata);
/// xattrs are always compared. A change of owner clears setuid bits and capabilities, so the
/// mode and xattrs then follow it.
pub fn set_fd_meta_where_needed(fd: BorrowedFd, meta: &Meta) -> io::Result<()> {
    let parts = MetaParts { xattrs: true, ..meta_needed(&rustix::fs::fstat(fd)?, meta) };
    set_fd_meta(fd, meta, parts)
}

/// What of `meta` an inode with `st` lacks: owner, mode and mtime as `stat` shows them, and
/// the xattrs after a change of owner (which clears capabilities); other xattrs are not in
/// `stat`, so the caller decides.
pub fn meta_needed(st: &rustix::fs::Stat, meta: &Meta) -> MetaParts {
    let owner = (st.st_uid, st.st_gid) != (meta.uid, meta.gid);
    MetaParts {
        owner,
        mode: owner || (st.st_mode & manifest::PERM_MASK) != meta.mode,
        xattrs: owner,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32) != (meta.mtime_sec, meta.mtime_nsec),
    }
}

/// A filesystem clamps a time it cannot store (ext4 with 128-byte inodes and XFS without
/// `bigtime` stop in 2038; ext4 otherwise in 2446), and a clamped time would be planned again on
/// every pass. Outside the 32-bit range, where filesystems differ, read the time back and
/// refuse what was not stored as given.
fn check_stored_mtime(meta: &Meta, stat: impl FnOnce() -> rustix::io::Result<rustix::fs::Stat>) -> io::Result<()> {
    if i32::try_from(meta.mtime_sec).is_ok() {
        return Ok(());
    }
    let st = stat()?;
    if (st.st_mtime, st.st_mtime_nsec as u32) == (meta.mtime_sec, meta.mtime_nsec) {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "this filesystem cannot store the mtime {}.{:09} (seconds since 1970): it stored {}.{:09} (hint: the image's time is outside what this filesystem holds; fix it in the image, or exclude the path)",
        meta.mtime_sec, meta.mtime_nsec, st.st_mtime, st.st_mtime_nsec
    )))
}

/// Applies metadata to the node `name` in `dir` (symlink, device, fifo or socket) without
/// following it.
pub fn set_node_meta(dir: BorrowedFd, name: &str, kind: Kind, meta: &Meta, parts: MetaParts) -> io::Result<()> {
    if kind == Kind::Symlink {
        if parts.owner {
            rustix::fs::chownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if parts.xattrs {
            // No *at xattr calls exist: reach the name through our own directory descriptor,
            // with the l* calls, which do not follow the final symlink.
            let p = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
            let current = manifest::xattr::read_path(std::path::Path::new(&p))?;
            sync_xattrs(
                &current,
                &meta.xattrs,
                |n| rustix::fs::lremovexattr(&p, n),
                |n, v| rustix::fs::lsetxattr(&p, n, v, XattrFlags::empty()),
            )?;
        }
        if parts.mtime {
            rustix::fs::utimensat(dir, name, &ts(meta), AtFlags::SYMLINK_NOFOLLOW)?;
            check_stored_mtime(meta, || rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW))?;
        }
        return Ok(());
    }
    // Devices must never be opened for I/O: take an O_PATH handle, check what it is, and act on
    // the inode through /proc/self/fd, which names exactly that inode.
    let fd = rustix::fs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if manifest::Kind::from_mode(st.st_mode) != Some(kind) {
        return Err(io::Error::other(format!("expected a {} but found something else", kind.name())));
    }
    let p = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if parts.owner {
        rustix::fs::chownat(
            &fd,
            "",
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::EMPTY_PATH,
        )?;
    }
    if parts.mode {
        rustix::fs::chmod(&p, Mode::from_raw_mode(meta.mode))?;
    }
    if parts.xattrs {
        let current = manifest::xattr::read_path(std::path::Path::new(&p))?;
        sync_xattrs(
            &current,
            &meta.xattrs,
            |n| rustix::fs::removexattr(&p, n),
            |n, v| rustix::fs::setxattr(&p, n, v, XattrFlags::empty()),
        )?;
    }
    if parts.mtime {
        rustix::fs::utimensat(rustix::fs::CWD, &p, &ts(meta), AtFlags::empty())?;
        check_stored_mtime(meta, || rustix::fs::fstat(&fd))?;
    }
    Ok(())
}

fn sync_xattrs(
    current: &[Xattr],
    want: &[Xattr],
    mut remove: impl FnMut(&[u8]) -> rustix::io::Result<()>,
    mut set: impl FnMut(&[u8], &[u8]) -> rustix::io::Result<()>,
) -> io::Result<()> {
    let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    for x in current {
        if !want.iter().any(|w| w.name == x.name) {
            remove(&x.name).map_err(|e| io::Error::other(format!("cannot remove xattr {}: {e}", name(&x.name))))?;
        }
    }
    for w in want {
        if !current.contains(w) {
            set(&w.name, &w.value).map_err(|e| io::Error::other(format!("cannot set xattr {}: {e}", name(&w.name))))?;
        }
    }
    Ok(())
}

/// Atomically puts `temp` at `name` in `dir`. When one of the two is a directory and the other
/// is not, a plain rename cannot replace it: the two are exchanged atomically and the old entry
/// (now at `temp`) is returned to the caller to remove.
pub fn commit_rename(dir: BorrowedFd, temp: &str, name: &[u8], exchange: bool) -> io::Result<()> {
    if !exchange {
        return Ok(rustix::fs::renameat(dir, temp, dir, name)?);
    }
    match rustix::fs::renameat_with(dir, temp, dir, name, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        // The old entry vanished meanwhile: a plain rename does the job.
        Err(Errno::NOENT) => Ok(rustix::fs::renameat(dir, temp, dir, name)?),
        // No RENAME_EXCHANGE on this filesystem: move the old entry aside, then rename. The
        // path is briefly absent, but never holds anything but the old or the new entry.
        Err(Errno::INVAL) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) => {
            let (_, aside) = with_fresh_name(|n| match rustix::fs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(_) => Err(Errno::EXIST),
                Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            })?;
            rustix::fs::renameat(dir, name, dir, aside.as_str())?;
            rustix::fs::renameat(dir, temp, dir, name)?;
            rustix::fs::renameat(dir, aside.as_str(), dir, temp)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything beneath it, without following
/// symlinks and without crossing into another filesystem.
pub fn remove_tree(dir: BorrowedFd, name: &[u8], root_dev: u64) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    let sub: OwnedFd = rustix::fs::openat(dir, name, super::root::dir_flags(), Mode::empty())?;
    if rustix::fs::fstat(&sub)?.st_dev != root_dev {
        return Err(io::Error::other("a filesystem is mounted there; refusing to delete across a mount point"));
    }
    let mut children = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push(n.to_vec());
        }
    }
    for c in children {
        remove_tree(sub.as_fd(), &c, root_dev)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// Receives content into a temp file, refusing more bytes than declared, and hashes it on
/// the way, so the content is verified as it is written.
///
/// A file of at least [`DIRECT_MIN`] bytes is written with `O_DIRECT` where the filesystem
/// allows it, in aligned blocks of [`DIRECT_BUF`] from an aligned buffer, and only its last
/// partial block through the page cache. Its content must reach the disk before its rename
/// anyway (the batch's `syncfs`), and this way the kernel does not copy it into the page cache
/// first, which on a cold sync was a third of the apply thread's time, and a large sync does
/// not push the host's own working set out of its page cache.
pub struct VerifyingWriter<'f> {
    file: &'f std::fs::File,
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    written: u64,
    limit: u64,
    /// Charged for every byte written to the file.
    throttle: throttle::Limiter,
    /// Set while the file is open with `O_DIRECT`.
    direct: Option<Direct>,
    /// Set for a sparse file: where the next byte goes. All-zero blocks are not written, so
    /// they stay holes, and [`VerifyingWriter::finish`] sets the length.
    sparse: Option<std::cell::Cell<u64>>,
}

/// The granule of holes in a sparse file: a block of this many zero bytes, at an offset that
/// is a multiple of it, is left unwritten.
const HOLE_BLOCK: u64 = 4096;

const WRITE_BUF: usize = 256 * 1024;
/// Files from this size on are written with `O_DIRECT`.
pub const DIRECT_MIN: u64 = 256 * 1024;
/// Size of each `O_DIRECT` write (a multiple of every block size in use).
pub const DIRECT_BUF: usize = 256 * 1024;
const DIRECT_ALIGN: usize = 4096;

/// The aligned block an `O_DIRECT` file is written from.
struct Direct {
    mem: Vec<u8>,
    /// Where the aligned block starts in `mem`.
    start: usize,
    filled: usize,
    /// Where in the file the block goes: every direct write names its offset, so a refused or
    /// short one never leaves the file position in doubt.
    offset: u64,
}

impl Direct {
    fn new() -> Direct {
        let mem = vec![0u8; DIRECT_BUF + DIRECT_ALIGN];
        let start = mem.as_ptr().align_offset(DIRECT_ALIGN);
        Direct { mem, start, filled: 0, offset: 0 }
    }

    fn block(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.filled]
    }
}

impl<'f> VerifyingWriter<'f> {
    pub fn new(file: &'f std::fs::File, limit: u64, throttle: throttle::Limiter) -> Self {
        let direct = (limit >= DIRECT_MIN && set_direct(file, true)).then(Direct::new);
        VerifyingWriter {
            file,
            buf: if direct.is_some() { Vec::new() } else { Vec::with_capacity(WRITE_BUF) },
            hasher: blake3::Hasher::new(),
            written: 0,
            limit,
            throttle,
            direct,
            sparse: None,
        }
    }

    /// Writes the file sparse (as `rsync -S` and `cp --sparse=always`): blocks of zeros become
    /// holes. Buffered, not `O_DIRECT`: only the data blocks are written anyway.
    pub fn sparse(mut self) -> Self {
        if self.direct.take().is_some() {
            set_direct(self.file, false);
            self.buf = Vec::with_capacity(WRITE_BUF);
        }
        self.sparse = Some(std::cell::Cell::new(0));
        self
    }

    /// Whether the file is being written with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// The declared size: no more is accepted.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether what was written so far is exactly the expected content.
    pub fn check(&self, expect: Hash) -> io::Result<()> {
        if self.written != self.limit {
            return Err(io::Error::other(format!("content is {} bytes, the image says {}", self.written, self.limit)));
        }
        let got: Hash = self.hasher.finalize().into();
        if got != expect {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("content hash mismatch: expected {expect}, got {got}"),
            ));
        }
        Ok(())
    }

    /// Verifies, then writes out what is buffered.
    pub fn finish(mut self, expect: Hash) -> io::Result<()> {
        self.check(expect)?;
        self.flush()?;
        if self.sparse.is_some() {
            // Trailing zeros were not written: the length makes them a hole at the end.
            self.file.set_len(self.limit)?;
        }
        Ok(())
    }

    /// Discards everything written, to start over from another source.
    pub fn reset(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.buf.clear();
        if let Some(d) = &mut self.direct {
            d.filled = 0;
            d.offset = 0;
        }
        self.hasher.reset();
        self.written = 0;
        if let Some(at) = &self.sparse {
            at.set(0);
        }
        self.file.set_len(0)?;
        (&mut &*self.file).seek(io::SeekFrom::Start(0))?;
        Ok(())
    }

    /// Leaves `O_DIRECT`: what is in the block, and the rest, go through the page cache.
    fn end_direct(&mut self) -> io::Result<()> {
        use std::io::Seek;
        if let Some(d) = self.direct.take() {
            if !set_direct(self.file, false) {
                return Err(io::Error::other("cannot turn O_DIRECT off again (fcntl)"));
            }
            (&mut &*self.file).seek(io::SeekFrom::Start(d.offset))?;
            self.write_out(d.block())?;
        }
        Ok(())
    }
}

/// Turns `O_DIRECT` on or off for `file`; false where the filesystem refuses it.
fn set_direct(file: &std::fs::File, on: bool) -> bool {
    let Ok(flags) = rustix::fs::fcntl_getfl(file) else { return false };
    let flags = if on { flags | OFlags::DIRECT } else { flags - OFlags::DIRECT };
    rustix::fs::fcntl_setfl(file, flags).is_ok()
}

impl Write for VerifyingWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.written + data.len() as u64 > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("content exceeds its declared size of {} bytes; refusing the rest", self.limit),
            ));
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        if let Some(d) = &mut self.direct {
            let mut rest = data;
            while !rest.is_empty() {
                let n = rest.len().min(DIRECT_BUF - d.filled);
                let at = d.start + d.filled;
                d.mem[at..at + n].copy_from_slice(&rest[..n]);
                d.filled += n;
                rest = &rest[n..];
                if d.filled == DIRECT_BUF {
                    use std::os::unix::fs::FileExt;
                    self.throttle.charge(DIRECT_BUF as u64);
                    match self.file.write_all_at(d.block(), d.offset) {
                        Ok(()) => {
                            d.offset += DIRECT_BUF as u64;
                            d.filled = 0;
                        }
                        // Refused (alignment, or a filesystem that takes the flag but not the
                        // write): the block and the rest go through the page cache.
                        Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                            self.end_direct()?;
                            self.buf.extend_from_slice(rest);
                            return Ok(data.len());
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            return Ok(data.len());
        }
        if self.buf.is_empty() && data.len() >= WRITE_BUF / 2 {
            // A large piece goes to the file as it is: no copy through the buffer.
            self.write_out(data)?;
            return Ok(data.len());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BUF {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The last, partial block of an O_DIRECT file cannot be written direct.
        self.end_direct()?;
        self.write_out(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

impl VerifyingWriter<'_> {
    /// Writes `data` to the file, charged to the throttle in whole pages, as the kernel writes
    /// them (only a file's last write is not aligned).
    fn write_out(&self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(at) = &self.sparse {
            use std::os::unix::fs::FileExt;
            let mut pos = at.get();
            let mut rest = data;
            while !rest.is_empty() {
                let n = ((HOLE_BLOCK - pos % HOLE_BLOCK) as usize).min(rest.len());
                let (seg, tail) = rest.split_at(n);
                if seg.iter().any(|&b| b != 0) {
                    self.throttle.charge(throttle::pages(n as u64));
                    self.file.write_all_at(seg, pos)?;
                }
                pos += n as u64;
                rest = tail;
            }
            at.set(pos);
            return Ok(());
        }
        self.throttle.charge(throttle::pages(data.len() as u64));
        (&mut &*self.file).write_all(data)
    }
}

/// Hard-links `lname` in `ldir` under a fresh temp name in `dir`, without following symlinks.
pub fn link_temp(ldir: BorrowedFd, lname: &[u8], dir: BorrowedFd) -> io::Result<String> {
    Ok(with_fresh_name(|n| rustix::fs::linkat(ldir, lname, dir, n, AtFlags::empty()))?.1)
}

/// Copies all of `r` into `w`.
pub fn copy(r: impl Read, w: &mut impl Write) -> io::Result<u64> {
    manifest::scan::for_each_read(r, |b| w.write_all(b))
}

/// Opens a regular file in `dir` for reading, refusing anything that is not one.
pub fn open_regular(dir: BorrowedFd, name: impl rustix::path::Arg) -> io::Result<std::fs::File> {
    open_regular_sized(dir, name).map(|(f, _)| f)
}

/// [`open_regular`], with the file's size from the same `fstat`.
pub fn open_regular_sized(dir: BorrowedFd, name: impl rustix::path::Arg) -> io::Result<(std::fs::File, u64)> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((std::fs::File::from(fd), st.st_size as u64))
}

/// Replaces the small file `path` (a state file, the metrics textfile) with `bytes` at once:
/// written to `<path without its extension>.tmp` beside it, flushed, renamed over it, and the
/// directory flushed, so a reader or a crash sees the old file or the new one, never part of it.
/// (The temp name does not end in the file's own extension: node_exporter reads only `*.prom`.)
pub fn write_replacing(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4093) as u8).collect()
    }

    /// Writes `data` through a VerifyingWriter in pieces of `piece` bytes; returns whether it
    /// went direct, and what the file then holds.
    fn write_through(dir: &std::path::Path, data: &[u8], piece: usize, limiter: &throttle::Limiter) -> (bool, Vec<u8>) {
        let path = dir.join(format!("f-{}-{piece}", data.len()));
        let file = std::fs::File::create(&path).unwrap();
        let mut w = VerifyingWriter::new(&file, data.len() as u64, limiter.clone());
        let direct = w.is_direct();
        for p in data.chunks(piece) {
            w.write_all(p).unwrap();
        }
        w.finish(Hash::of(data)).unwrap();
        drop(file);
        (direct, std::fs::read(&path).unwrap())
    }

    #[test]
    fn large_files_go_direct_and_arrive_whole_at_every_block_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let limiter = throttle::Limiter::per_second(u64::MAX / 4);
        let b = DIRECT_BUF;
        let mut any_direct = false;
        for len in [DIRECT_MIN as usize - 1, DIRECT_MIN as usize, b + 1, 3 * b, 3 * b + 4095, 5 * b + 7] {
            for piece in [1000, 4096, b, 3 * b + 1] {
                let data = content(len);
                let (direct, got) = write_through(dir.path(), &data, piece, &limiter);
                assert_eq!(got.len(), data.len(), "size of a {len}-byte file written in {piece}-byte pieces");
                assert!(got == data, "content of a {len}-byte file written in {piece}-byte pieces");
                assert_eq!(direct, direct && len as u64 >= DIRECT_MIN, "only large files go direct");
                any_direct |= direct;
            }
        }
        if !any_direct {
            eprintln!(
                "SKIP (partly): the filesystem of {} refuses O_DIRECT; only the buffered path ran",
                dir.path().display()
            );
        }
        // Every byte is charged to the write limit: whole blocks, then the tail in pages.
        assert!(limiter.totals().0 > 0);
    }

    #[test]
    fn sparse_files_keep_zero_blocks_as_holes_at_every_piece_size() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        // Data at the start, straddling a block boundary in the middle, and in the last partial
        // block; zeros (whole blocks and part-blocks) between; 1 MiB in all.
        let mut data = vec![0u8; (1 << 20) + 123];
        data[..100].copy_from_slice(&content(100));
        data[(1 << 19) - 10..(1 << 19) + 10].copy_from_slice(&content(20));
        let n = data.len();
        data[n - 5..].copy_from_slice(b"tail!");
        for piece in [1, 1000, 4096, 4097, WRITE_BUF, n] {
            let path = dir.path().join(format!("s-{piece}"));
            let file = std::fs::File::create(&path).unwrap();
            let mut w = VerifyingWriter::new(&file, n as u64, throttle::Limiter::unlimited()).sparse();
            assert!(!w.is_direct(), "a sparse file is written buffered");
            w.write_all(&vec![0xee; 5000]).unwrap();
            w.reset().unwrap();
            for p in data.chunks(piece) {
                w.write_all(p).unwrap();
            }
            w.finish(Hash::of(&data)).unwrap();
            drop(file);
            assert!(std::fs::read(&path).unwrap() == data, "content of the sparse file written in {piece}-byte pieces");
            let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(allocated <= 64 * 1024, "{piece}-byte pieces: {allocated} bytes allocated for 4 data blocks");
        }
    }

    #[test]
    fn a_direct_file_reset_midway_holds_only_what_was_written_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let (wrong, right) = (vec![0xeeu8; 2 * DIRECT_BUF + 100], content(2 * DIRECT_BUF + 100));
        let mut w = VerifyingWriter::new(&file, right.len() as u64, throttle::Limiter::unlimited());
        w.write_all(&wrong[..DIRECT_BUF + 50]).unwrap();
        w.reset().unwrap();
        w.write_all(&right).unwrap();
        assert!(w.write_all(b"x").is_err(), "no byte past the declared size");
        w.finish(Hash::of(&right)).unwrap();
        drop(file);
        assert!(std::fs::read(&path).unwrap() == right);
    }
}

//! Scanning a tree into entries: one walk for metadata, then parallel blake3 hashing.
//!
//! The walk never follows symlinks and, like `rsync -x`, never descends into another
//! filesystem: a live root has /proc, /sys and /run mounted beneath it. A mount point itself is
//! recorded (flagged), but its contents are not.

use foldhash::{HashMap, HashMapExt};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use std::ffi::CStr;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::{xattr, Entry, Hash, Kind, Meta, RelPath, PERM_MASK};

/// An entry as found on disk, with the identity fields the model does not carry.
#[derive(Clone, Debug)]
pub struct ScannedEntry {
    pub entry: Entry,
    pub dev: u64,
    pub ino: u64,
    /// Link count, saturating at `u32::MAX` (only "more than one" and small counts matter).
    pub nlink: u32,
    pub ctime_ns: i64,
    /// On another filesystem than the scan's root (a mount point, or a bind-mounted file): never
    /// descended into, and never deleted or replaced.
    pub mount_point: bool,
}

/// The result of scanning one tree.
#[derive(Debug)]
pub struct Scan {
    pub root: Meta,
    pub root_dev: u64,
    /// Sorted by path.
    pub entries: Vec<ScannedEntry>,
    /// Paths that could not be read. The walk goes on past each.
    pub errors: Vec<ScanError>,
    /// Paths the filter refused, with whether each is a directory (never descended into).
    pub excluded: Vec<(RelPath, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot scan {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: walkdir::Error,
    },
    #[error("cannot list directory {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unusable name: {source} (hint: rename or remove it)")]
    Name {
        path: PathBuf,
        #[source]
        source: crate::PathError,
    },
    #[error("{path}: unsupported file type {mode:#o}")]
    UnknownType { path: PathBuf, mode: u32 },
    #[error("{path} changed while it was being hashed (hint: scan a tree nobody is writing to)")]
    Changed { path: PathBuf },
    #[error("{path} is not a directory (hint: point at the top of a root tree)")]
    RootNotDir { path: PathBuf },
}

impl ScanError {
    /// A directory that could not be read: what lies beneath it is unknown.
    pub fn is_unlisted_dir(&self) -> bool {
        matches!(self, ScanError::Walk { .. } | ScanError::List { .. })
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ScanError::Io { path, .. }
            | ScanError::Walk { path, .. }
            | ScanError::List { path, .. }
            | ScanError::Name { path, .. }
            | ScanError::UnknownType { path, .. }
            | ScanError::Changed { path }
            | ScanError::RootNotDir { path } => path,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ScanError + '_ {
    move |source| ScanError::Io { path: path.to_owned(), source }
}

/// Whether a regular file of `size` bytes with `blocks` 512-byte blocks allocated has holes.
/// (A file stored compressed also counts: for it this only means all-zero blocks are left
/// unwritten, which changes nothing it holds.)
pub fn is_sparse(blocks: u64, size: u64) -> bool {
    blocks.saturating_mul(512) < size
}

/// A time as one `i64` of nanoseconds for change detection only (a ctime, a cache stamp): it
/// wraps past 2262 instead of overflowing, and two different times that wrap to the same value
/// would also need the same size and ctime to be taken for unchanged.
pub fn stamp_ns(sec: i64, nsec: i64) -> i64 {
    sec.wrapping_mul(1_000_000_000).wrapping_add(nsec)
}

fn meta_of(md: &std::fs::Metadata, xattrs: Vec<crate::Xattr>) -> Meta {
    let xattrs = xattrs.into();
    Meta {
        mode: md.mode() & PERM_MASK,
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs,
    }
}

/// Walks `root` and records every entry beneath it, without hashing.
///
/// Fails only if `root` itself cannot be read; problems below it go to [`Scan::errors`].
pub fn walk(root: &Path) -> Result<Scan, ScanError> {
    walk_filtered(root, |_, _| false)
}

/// Like [`walk`], but never reads, lists or descends into a path for which
/// `exclude(path, is_dir)` is true: it is only recorded in [`Scan::excluded`].
pub fn walk_filtered(root: &Path, mut exclude: impl FnMut(&RelPath, bool) -> bool) -> Result<Scan, ScanError> {
    // The root is the operator's choice and may be a symlink (IMAGES/current); nothing
    // beneath it is followed.
    let root_md = std::fs::metadata(root).map_err(io_err(root))?;
    if !root_md.is_dir() {
        return Err(ScanError::RootNotDir { path: root.to_owned() });
    }
    let root_meta = meta_of(&root_md, xattr::read_path(root).map_err(io_err(root))?);
    let root_dev = root_md.dev();

    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut excluded = Vec::new();
    let walker = walkdir::WalkDir::new(root).follow_links(false).same_file_system(true).min_depth(1);
    let walker = walker.into_iter().filter_entry(|d| {
        // An unusable name is reported by scan_one, not filtered here.
        let Ok(rel) = RelPath::from_fs(root, d.path()) else { return true };
        let is_dir = d.file_type().is_dir();
        if exclude(&rel, is_dir) {
            excluded.push((rel, is_dir));
            return false;
        }
        true
    });
    // The walk itself (directory listings) is sequential; the per-entry syscalls (lstat,
    // llistxattr, readlink) are independent, so they run on all cores, a bounded chunk at a
    // time so memory does not grow with the tree.
    const CHUNK: usize = 4096;
    let mut pending: Vec<PathBuf> = Vec::with_capacity(CHUNK);
    let flush = |pending: &mut Vec<PathBuf>, entries: &mut Vec<ScannedEntry>, errors: &mut Vec<ScanError>| {
        let done: Vec<Result<ScannedEntry, ScanError>> =
            pending.par_iter().map(|p| scan_one(root, root_dev, p)).collect();
        for r in done {
            match r {
                Ok(e) => entries.push(e),
                Err(e) => errors.push(e),
            }
        }
        pending.clear();
    };
    for item in walker {
        match item {
            Ok(d) => pending.push(d.into_path()),
            Err(e) => {
                let path = e.path().unwrap_or(root).to_owned();
                errors.push(ScanError::Walk { path, source: e });
            }
        }
        if pending.len() == CHUNK {
            flush(&mut pending, &mut entries, &mut errors);
        }
    }
    flush(&mut pending, &mut entries, &mut errors);
    entries.sort_unstable_by(|a, b| a.entry.path.cmp(&b.entry.path));
    assign_link_groups(&mut entries);
    excluded.sort();
    Ok(Scan { root: root_meta, root_dev, entries, errors, excluded })
}

fn scan_one(root: &Path, root_dev: u64, path: &Path) -> Result<ScannedEntry, ScanError> {
    let rel = RelPath::from_fs(root, path).map_err(|source| ScanError::Name { path: path.to_owned(), source })?;
    let md = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    let kind = Kind::from_mode(md.mode()).ok_or(ScanError::UnknownType { path: path.to_owned(), mode: md.mode() })?;
    let xattrs = xattr::read_path(path).map_err(io_err(path))?;
    let target = match kind {
        Kind::Symlink => {
            use std::os::unix::ffi::OsStrExt;
            Some(std::fs::read_link(path).map_err(io_err(path))?.as_os_str().as_bytes().into())
        }
        _ => None,
    };
    Ok(ScannedEntry {
        entry: Entry {
            path: rel,
            kind,
            meta: meta_of(&md, xattrs),
            size: if kind == Kind::File { md.size() } else { 0 },
            hash: None,
            target,
            rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) { md.rdev() } else { 0 },
            link_group: 0,
            sparse: kind == Kind::File && is_sparse(md.blocks(), md.size()),
        },
        dev: md.dev(),
        ino: md.ino(),
        nlink: u32::try_from(md.nlink()).unwrap_or(u32::MAX),
        ctime_ns: stamp_ns(md.ctime(), md.ctime_nsec()),
        // A bind-mounted file counts too: renaming over it would fail, deleting it would not stick.
        mount_point: md.dev() != root_dev,
    })
}

/// Like [`walk_filtered`], for a root someone else may be changing (a live host): every entry
/// is reached from its parent directory's descriptor (`openat` with `O_NOFOLLOW`, `fstatat`,
/// `readlinkat`, `listxattrat`), never by a path from the root, so a directory swapped for a
/// symlink mid-walk is recorded as the symlink, not followed. Directories are read in
/// parallel, and no syscall walks a long path, which also makes it cheaper than the path walk.
pub fn walk_beneath(root: &Path, exclude: impl Fn(&RelPath, bool) -> bool + Sync) -> Result<Scan, ScanError> {
    let root_md = std::fs::metadata(root).map_err(io_err(root))?;
    if !root_md.is_dir() {
        return Err(ScanError::RootNotDir { path: root.to_owned() });
    }
    let root_meta = meta_of(&root_md, xattr::read_path(root).map_err(io_err(root))?);
    let root_dev = root_md.dev();
    let fd = rustix::fs::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| io_err(root)(e.into()))?;
    let w = Beneath {
        root,
        root_dev,
        exclude: &exclude,
        entries: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        excluded: Mutex::new(Vec::new()),
    };
    w.dir(fd, None);
    let mut entries = w.entries.into_inner().unwrap_or_else(|p| p.into_inner());
    let errors = w.errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut excluded = w.excluded.into_inner().unwrap_or_else(|p| p.into_inner());
    entries.par_sort_unstable_by(|a, b| a.entry.path.cmp(&b.entry.path));
    assign_link_groups(&mut entries);
    excluded.sort();
    Ok(Scan { root: root_meta, root_dev, entries, errors, excluded })
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC).union(OFlags::NOCTTY);

struct Beneath<'a, F> {
    root: &'a Path,
    root_dev: u64,
    exclude: &'a F,
    entries: Mutex<Vec<ScannedEntry>>,
    errors: Mutex<Vec<ScanError>>,
    excluded: Mutex<Vec<(RelPath, bool)>>,
}

impl<F: Fn(&RelPath, bool) -> bool + Sync> Beneath<'_, F> {
    fn full(&self, rel: Option<&RelPath>, name: &[u8]) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut p = rel.map_or_else(|| self.root.to_owned(), |r| self.root.join(r.as_path()));
        if !name.is_empty() {
            p.push(std::ffi::OsStr::from_bytes(name));
        }
        p
    }

    /// Records the directory open at `fd` (`rel`; `None` for the root) and, in parallel,
    /// everything beneath it.
    fn dir(&self, fd: std::os::fd::OwnedFd, rel: Option<&RelPath>) {
        let mut dir = match rustix::fs::Dir::new(fd) {
            Ok(d) => d,
            Err(e) => return self.fail(ScanError::List { path: self.full(rel, b""), source: e.into() }),
        };
        let mut names: Vec<(std::ffi::CString, rustix::fs::FileType)> = Vec::new();
        for item in dir.by_ref() {
            match item {
                Ok(d) if matches!(d.file_name().to_bytes(), b"." | b"..") => {}
                Ok(d) => names.push((d.file_name().to_owned(), d.file_type())),
                Err(e) => return self.fail(ScanError::List { path: self.full(rel, b""), source: e.into() }),
            }
        }
        let Ok(dirfd) = dir.fd() else { return };
        // Entries of one directory in parallel chunks (a flat directory of 100,000 files is
        // as parallel as a deep tree); subdirectories recurse in parallel too.
        let subdirs: Vec<(RelPath, std::ffi::CString)> = names
            .par_iter()
            .with_min_len(64)
            .fold(
                || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
                |(mut ents, mut errs, mut excl, mut subs), (name, ftype)| {
                    let bytes = name.to_bytes();
                    let rel = match rel.map_or_else(|| RelPath::new(bytes), |r| r.join(bytes)) {
                        Ok(r) => r,
                        Err(source) => {
                            errs.push(ScanError::Name { path: self.full(rel, bytes), source });
                            return (ents, errs, excl, subs);
                        }
                    };
                    let is_dir = match *ftype {
                        rustix::fs::FileType::Unknown => rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW)
                            .is_ok_and(|st| {
                                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
                            }),
                        t => t == rustix::fs::FileType::Directory,
                    };
                    if (self.exclude)(&rel, is_dir) {
                        excl.push((rel, is_dir));
                        return (ents, errs, excl, subs);
                    }
                    match self.entry(dirfd, name, rel) {
                        Ok(e) => {
                            if e.entry.kind == Kind::Dir && !e.mount_point {
                                subs.push((e.entry.path.clone(), name.clone()));
                            }
                            ents.push(e);
                        }
                        Err(e) => errs.push(e),
                    }
                    (ents, errs, excl, subs)
                },
            )
            .map(|(ents, errs, excl, subs)| {
                self.entries.lock().unwrap_or_else(|p| p.into_inner()).extend(ents);
                self.errors.lock().unwrap_or_else(|p| p.into_inner()).extend(errs);
                self.excluded.lock().unwrap_or_else(|p| p.into_inner()).extend(excl);
                subs
            })
            .flatten()
            .collect();
        subdirs.par_iter().for_each(|(sub, name)| {
            match rustix::fs::openat(dirfd, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty()) {
                Ok(fd) => self.dir(fd, Some(sub)),
                Err(e) => self.fail(ScanError::List { path: self.full(Some(sub), b""), source: e.into() }),
            }
        });
    }

    fn fail(&self, e: ScanError) {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    fn entry(&self, dirfd: BorrowedFd, name: &CStr, rel: RelPath) -> Result<ScannedEntry, ScanError> {
        let full = || self.full(None, rel.as_bytes());
        let io = |e: rustix::io::Errno| ScanError::Io { path: full(), source: e.into() };
        let st = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
        let mode = st.st_mode;
        let kind = Kind::from_mode(mode).ok_or_else(|| ScanError::UnknownType { path: full(), mode })?;
        let xattrs = xattr::read_at(dirfd, name, &full).map_err(|source| ScanError::Io { path: full(), source })?;
        let target = match kind {
            Kind::Symlink => Some(rustix::fs::readlinkat(dirfd, name, Vec::new()).map_err(io)?.into_bytes().into()),
            _ => None,
        };
        let dev = st.st_dev;
        Ok(ScannedEntry {
            entry: Entry {
                path: rel,
                kind,
                meta: Meta {
                    mode: mode & PERM_MASK,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    mtime_sec: st.st_mtime,
                    mtime_nsec: st.st_mtime_nsec as u32,
                    xattrs: xattrs.into(),
                },
                size: if kind == Kind::File { st.st_size as u64 } else { 0 },
                hash: None,
                target,
                rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) { st.st_rdev } else { 0 },
                link_group: 0,
                sparse: kind == Kind::File && is_sparse(st.st_blocks as u64, st.st_size as u64),
            },
            dev,
            ino: st.st_ino,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            ctime_ns: stamp_ns(st.st_ctime, st.st_ctime_nsec as i64),
            mount_point: dev != self.root_dev,
        })
    }
}

/// Numbers hard-link groups 1, 2, … in path order of each group's first member. A file whose
/// other links all lie outside the tree is not in a group.
fn assign_link_groups(entries: &mut [ScannedEntry]) {
    let mut first: HashMap<(u64, u64), usize> = HashMap::new();
    let mut group_of_first: HashMap<usize, u32> = HashMap::new();
    let mut next: u32 = 1;
    for i in 0..entries.len() {
        let e = &entries[i];
        if e.entry.kind == Kind::Dir || e.nlink < 2 {
            continue;
        }
        match first.get(&(e.dev, e.ino)) {
            None => {
                first.insert((e.dev, e.ino), i);
            }
            Some(&leader) => {
                let g = *group_of_first.entry(leader).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
                entries[leader].entry.link_group = g;
                entries[i].entry.link_group = g;
            }
        }
    }
}

/// Hashes, in parallel, every regular file in `entries` for which `select` is true.
/// Returns the errors; an entry that could not be hashed keeps `hash: None`.
///
/// Every byte read is charged to `read`, shared by the hashing threads.
pub fn hash_files(
    root: &Path,
    entries: &mut [ScannedEntry],
    read: &throttle::Limiter,
    select: impl Fn(&ScannedEntry) -> bool + Sync,
) -> Vec<ScanError> {
    let want: Vec<bool> = entries.par_iter().map(&select).collect();
    hash_selected(root, entries, read, &want)
}

/// Like [`hash_files`], hashing the regular files at the indices where `want` is true.
pub fn hash_selected(
    root: &Path,
    entries: &mut [ScannedEntry],
    read: &throttle::Limiter,
    want: &[bool],
) -> Vec<ScanError> {
    entries
        .par_iter_mut()
        .zip(want.par_iter())
        .filter(|(e, want)| **want && e.entry.kind == Kind::File && e.entry.hash.is_none())
        .filter_map(|(e, _)| {
            let path = root.join(e.entry.path.as_path());
            match hash_path(&path, Some((e.dev, e.ino)), read) {
                Ok((hash, size)) if size == e.entry.size => {
                    e.entry.hash = Some(hash);
                    None
                }
                Ok(_) => Some(ScanError::Changed { path }),
                Err(err) => Some(err),
            }
        })
        .collect()
}

/// Opens a regular file for reading without following a symlink at its last component, and
/// without updating its atime where the kernel lets us.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let fd = match rustix::fs::open(path, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::open(path, flags, Mode::empty())?,
        r => r?,
    };
    Ok(File::from(fd))
}

/// blake3 of the file at `path`, and the number of bytes read. With `expect`, fails if the
/// file opened is not that (dev, inode): it was replaced since it was scanned.
pub fn hash_path(path: &Path, expect: Option<(u64, u64)>, read: &throttle::Limiter) -> Result<(Hash, u64), ScanError> {
    let file = open_nofollow(path).map_err(io_err(path))?;
    let md = file.metadata().map_err(io_err(path))?;
    if !md.is_file() || expect.is_some_and(|(dev, ino)| (md.dev(), md.ino()) != (dev, ino)) {
        return Err(ScanError::Changed { path: path.to_owned() });
    }
    hash_reader(throttle::Throttled::new(file, read)).map_err(io_err(path))
}

/// Size of the read buffer that [`with_scratch`] lends.
pub const SCRATCH: usize = 256 * 1024;

/// Runs `f` with this thread's [`SCRATCH`]-byte read buffer. The buffer is allocated once per
/// thread, not once per file: zeroing a fresh 256 KiB for each of 20,000 small files cost
/// more than reading them. A nested call gets a buffer of its own.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
    }
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0u8; SCRATCH]),
    })
}

/// Feeds everything `r` yields to `f`, a buffer at a time, through this thread's scratch
/// buffer; returns how many bytes that was.
pub fn for_each_read(mut r: impl Read, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
    with_scratch(|buf| {
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            f(&buf[..n])?;
            total += n as u64;
        }
    })
}

/// blake3 of everything `r` yields, and its length.
pub fn hash_reader(r: impl Read) -> io::Result<(Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    // Large reads let blake3 use its SIMD paths across many chunks at once.
    let total = for_each_read(r, |b| {
        hasher.update(b);
        Ok(())
    })?;
    Ok((hasher.finalize().into(), total))
}

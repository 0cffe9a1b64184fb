//! Path resolution beneath the host root that never follows a symlink.
//!
//! Every operation on the host goes through a directory file descriptor obtained here by
//! walking one component at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`, then acts on a
//! single name inside it with an `*at` call. A symlink planted anywhere on the way makes the
//! walk fail (`ELOOP`/`ENOTDIR`) instead of leading outside the root, and a directory on
//! another filesystem (a mount point) is refused.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use manifest::RelPath;
use rustix::fs::{Mode, OFlags};

/// Directory descriptors kept open at most; the apply walks in path order, so a small cache
/// catches nearly every lookup while staying far below the default open-file limit.
const CACHE_MAX: usize = 128;

pub struct RootDir {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    dev: u64,
    cache: HashMap<RelPath, Arc<OwnedFd>>,
    /// Directories being built under a temp name to replace a non-directory at `RelPath`
    /// (whole-tree staging): what lies beneath the path is staged inside them until the swap.
    redirects: HashMap<RelPath, Arc<OwnedFd>>,
}

pub(crate) fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl RootDir {
    /// Opens the root itself. The root path is the operator's choice and may be reached through
    /// symlinks; nothing beneath it is.
    pub fn open(path: &Path) -> io::Result<RootDir> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let dev = rustix::fs::fstat(&fd)?.st_dev;
        Ok(RootDir { path: path.to_owned(), fd: Arc::new(fd), dev, cache: HashMap::new(), redirects: HashMap::new() })
    }

    /// Another handle on the same root directory (the same open descriptor, its own cache of
    /// the directories beneath it), for a second thread.
    pub fn share(&self) -> RootDir {
        RootDir {
            path: self.path.clone(),
            fd: self.fd.clone(),
            dev: self.dev,
            cache: HashMap::new(),
            redirects: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// A descriptor for the directory `rel` (`None`: the root itself).
    pub fn dir(&mut self, rel: Option<&RelPath>) -> io::Result<Arc<OwnedFd>> {
        let Some(rel) = rel else { return Ok(self.fd.clone()) };
        if let Some(fd) = self.redirects.get(rel).or_else(|| self.cache.get(rel)) {
            return Ok(fd.clone());
        }
        let parent = self.dir(rel.parent().as_ref())?;
        let fd = rustix::fs::openat(&*parent, rel.file_name(), dir_flags(), Mode::empty())
            .map_err(|e| explain_walk(e, rel))?;
        if rustix::fs::fstat(&fd)?.st_dev != self.dev {
            return Err(io::Error::other(format!(
                "{rel} is on another filesystem (a mount point); syncd does not write beneath mount points"
            )));
        }
        let fd = Arc::new(fd);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(rel.clone(), fd.clone());
        Ok(fd)
    }

    /// The directory holding `rel`, and `rel`'s last component.
    pub fn parent<'p>(&mut self, rel: &'p RelPath) -> io::Result<(Arc<OwnedFd>, &'p [u8])> {
        Ok((self.dir(rel.parent().as_ref())?, rel.file_name()))
    }

    /// Drops cached descriptors for `rel` and everything beneath it, after it was replaced or
    /// removed.
    pub fn forget(&mut self, rel: &RelPath) {
        self.cache.retain(|p, _| !p.is_within(rel));
    }

    /// From now on `rel` resolves to `dir` (a directory staged under a temp name to replace
    /// what is at `rel`), until [`RootDir::unredirect`].
    pub fn redirect(&mut self, rel: RelPath, dir: Arc<OwnedFd>) {
        self.forget(&rel);
        self.redirects.insert(rel, dir);
    }

    pub fn unredirect(&mut self, rel: &RelPath) {
        self.redirects.remove(rel);
        self.forget(rel);
    }
}

fn explain_walk(e: rustix::io::Errno, rel: &RelPath) -> io::Error {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{rel} is not a directory on the host (a symlink or file is in the way; it is never followed)"),
        ),
        e => io::Error::from(e),
    }
}

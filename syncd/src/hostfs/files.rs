//! Read-only access to the host's regular files beneath the root, for what the network code
//! needs of them: delta bases, the solid delta's reference and chunk seeds. A [`HostFiles`]
//! opens a regular file by its path, no symlink followed, and reads it throttled; it cannot
//! write, list, follow a link or reach a directory.

use std::io::{self, Read};
use std::os::fd::AsFd;

use manifest::RelPath;

use super::fsops::open_regular_sized;
use super::root::RootDir;

pub struct HostFiles {
    root: RootDir,
    read: throttle::Limiter,
}

impl HostFiles {
    /// The files beneath `root`, read within `read`.
    pub fn new(root: &RootDir, read: &throttle::Limiter) -> HostFiles {
        HostFiles { root: root.share(), read: read.clone() }
    }

    /// A second handle on the same root and limit (for another thread).
    pub fn share(&self) -> HostFiles {
        HostFiles { root: self.root.share(), read: self.read.clone() }
    }

    /// Opens the regular file `path` for reading, with its size. Reads from the returned file
    /// should go through [`limiter`](Self::limiter).
    pub fn open(&mut self, path: &RelPath) -> io::Result<(std::fs::File, u64)> {
        let (dir, name) = self.root.parent(path)?;
        open_regular_sized(dir.as_fd(), name)
    }

    /// The read limit this handle charges.
    pub fn limiter(&self) -> &throttle::Limiter {
        &self.read
    }

    /// Appends the regular file `path` to `out`, at most `cap` bytes of it, throttled.
    pub fn read_into(&mut self, path: &RelPath, cap: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let (file, size) = self.open(path)?;
        // Sized from fstat, so the read needs no regrowth (the Take below hides the size).
        out.reserve(size.min(cap) as usize + 1);
        throttle::Throttled::new(file, &self.read).take(cap).read_to_end(out)?;
        Ok(())
    }
}

//! One syncd per root: a `flock` on the root directory itself.
//!
//! A pass that may write takes it exclusively, a dry run or a drift report shared, before it
//! reads the host. The lock is on the root's own inode, so it holds whatever state dir or
//! config each run was given; the kernel drops it when the holder exits, even by SIGKILL, so
//! there is never a stale lock to clean up. `/proc/locks` names the holder.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

/// Held while a pass runs; dropping it releases the root.
#[derive(Debug)]
pub struct RootLock {
    _fd: OwnedFd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A pass that may change the host.
    Exclusive,
    /// A pass that only reads it (dry run, drift): several may run at once.
    Shared,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another syncd{} is converging {}; nothing was changed (hint: wait for it to finish, or pass --wait to queue behind it)", holder_text(*.holder), .root.display())]
    Busy { root: PathBuf, holder: Option<u32> },
    #[error("cannot lock root {}", .root.display())]
    Io {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stopped while waiting for the lock on {}", .root.display())]
    Cancelled { root: PathBuf },
}

fn holder_text(pid: Option<u32>) -> String {
    pid.map_or_else(String::new, |p| format!(" (pid {p})"))
}

/// Tries once: `Ok(None)` when another process holds the root in a conflicting way.
pub fn try_lock(root: &Path, access: Access) -> Result<Option<RootLock>, LockError> {
    let io = |e: Errno| LockError::Io { root: root.to_owned(), source: e.into() };
    let fd = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(io)?;
    let op = match access {
        Access::Exclusive => FlockOperation::NonBlockingLockExclusive,
        Access::Shared => FlockOperation::NonBlockingLockShared,
    };
    match rustix::fs::flock(&fd, op) {
        Ok(()) => Ok(Some(RootLock { _fd: fd })),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// Takes the lock on `root`; with `wait`, polls until it is free (or `cancel` is set), else
/// fails at once naming the holder.
pub async fn acquire(
    root: &Path,
    access: Access,
    wait: bool,
    cancel: Option<&Arc<AtomicBool>>,
) -> Result<RootLock, LockError> {
    let mut logged = false;
    loop {
        if let Some(l) = try_lock(root, access)? {
            return Ok(l);
        }
        let holder = holder(root);
        if !wait {
            return Err(LockError::Busy { root: root.to_owned(), holder });
        }
        if !logged {
            tracing::warn!(root = %root.display(), holder = ?holder, "another syncd holds this root; waiting for it");
            logged = true;
        }
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(LockError::Cancelled { root: root.to_owned() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid of a process holding a `flock` on `root`'s inode, from `/proc/locks`.
pub fn holder(root: &Path) -> Option<u32> {
    let fd = rustix::fs::open(root, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(fd.as_fd()).ok()?;
    let key = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev), st.st_ino);
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    let me = std::process::id();
    text.lines().filter_map(parse_lock_line).find(|(pid, k)| *k == key && *pid != me).map(|(pid, _)| pid)
}

/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF` → (1234, (0xfd, 0x01, 5678)).
fn parse_lock_line(line: &str) -> Option<(u32, (u32, u32, u64))> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // A blocked waiter's line has "->" after the number.
    let f: Vec<&str> = f.into_iter().filter(|x| *x != "->").collect();
    if f.get(1) != Some(&"FLOCK") {
        return None;
    }
    let pid = f.get(4)?.parse().ok()?;
    let mut dev = f.get(5)?.split(':');
    let major = u32::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
    let ino = dev.next()?.parse().ok()?;
    Some((pid, (major, minor, ino)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_parsed() {
        assert_eq!(parse_lock_line("1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"), Some((1234, (0xfd, 1, 5678))));
        assert_eq!(parse_lock_line("2: -> FLOCK  ADVISORY  WRITE 99 00:2d:7 0 EOF"), Some((99, (0, 0x2d, 7))));
        assert_eq!(parse_lock_line("3: POSIX  ADVISORY  WRITE 1 00:2d:7 0 EOF"), None);
    }

    #[test]
    fn a_second_exclusive_lock_is_refused_and_a_shared_one_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let held = try_lock(dir.path(), Access::Exclusive).unwrap().expect("free");
        assert!(try_lock(dir.path(), Access::Exclusive).unwrap().is_none());
        assert!(try_lock(dir.path(), Access::Shared).unwrap().is_none());
        drop(held);
        let a = try_lock(dir.path(), Access::Shared).unwrap().expect("free again");
        let b = try_lock(dir.path(), Access::Shared).unwrap().expect("shared with shared");
        assert!(try_lock(dir.path(), Access::Exclusive).unwrap().is_none());
        drop((a, b));
    }
}

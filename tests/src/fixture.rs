//! Building trees: [`Builder`] for any tree, [`build_fixture`] for the realistic one that has
//! every kind of entry a root partition holds.
//!
//! Metadata is applied in the order a root filesystem needs: owner first (chown clears setuid
//! bits and capabilities), then mode, then xattrs, then mtimes, bottom-up, so no later step
//! disturbs an earlier one.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags, CWD};

/// The fixture's hard-link group of three names.
pub const HARDLINKS: [&str; 3] = ["hl/one", "hl/sub/three", "hl/two"];

/// `security.capability` for `cap_net_raw=ep`: a raw `vfs_cap_data` revision 2.
pub fn cap_net_raw_ep() -> Vec<u8> {
    let magic: u32 = 0x0200_0000 | 0x1; // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    let words: [u32; 5] = [magic, 1 << 13, 0, 0, 0]; // permitted lo (CAP_NET_RAW), inheritable lo, hi, hi
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// `len` pseudo-random bytes, the same for the same seed, so two builds of the fixture match.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The mtime (ns) the fixture gives `rel`: derived from the path, with a nanosecond part, so
/// every entry differs from its neighbours and from the time of the test run.
pub fn mtime_for(rel: &[u8]) -> i64 {
    let h = blake3::hash(rel);
    let b = h.as_bytes();
    let secs = 1_500_000_000 + i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % 200_000_000);
    let ns = 1 + i64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]) % 999_999_998);
    secs * 1_000_000_000 + ns
}

/// Sets the mtime of `path` itself (not a symlink's target).
pub fn set_mtime(path: &Path, ns: i64) {
    set_mtime_exact(path, ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
}

/// Sets the mtime of `path` (not following a symlink) to `sec` seconds and `nsec` nanoseconds,
/// for times beyond what an `i64` of nanoseconds holds (before 1678 or after 2262).
pub fn set_mtime_exact(path: &Path, sec: i64, nsec: i64) {
    let ts = Timestamps {
        last_access: Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        last_modification: Timespec { tv_sec: sec, tv_nsec: nsec },
    };
    rustix::fs::utimensat(CWD, path, &ts, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("cannot set the mtime of {}: {e}", path.display()));
}

/// Gives every entry under `top` (and `top` itself) its [`mtime_for`], deepest first.
pub fn stamp_mtimes(top: &Path) {
    for e in walkdir::WalkDir::new(top).contents_first(true).sort_by_file_name() {
        let e = e.unwrap_or_else(|e| panic!("cannot walk {}: {e}", top.display()));
        let rel = e.path().strip_prefix(top).expect("beneath top");
        set_mtime(e.path(), mtime_for(rel.as_os_str().as_bytes()));
    }
}

/// Creates entries now and records the metadata to apply in [`Builder::finish`].
pub struct Builder {
    top: PathBuf,
    modes: Vec<(PathBuf, u32)>,
    owners: Vec<(PathBuf, u32, u32)>,
    xattrs: Vec<(PathBuf, String, Option<Vec<u8>>)>,
}

fn bytes_path(rel: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(rel))
}

impl Builder {
    /// Builds into `top`, which is created if missing.
    pub fn new(top: &Path) -> Builder {
        std::fs::create_dir_all(top).unwrap_or_else(|e| panic!("cannot create {}: {e}", top.display()));
        Builder { top: top.to_owned(), modes: Vec::new(), owners: Vec::new(), xattrs: Vec::new() }
    }

    fn at(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        if rel.as_os_str().is_empty() {
            self.top.clone()
        } else {
            self.top.join(rel)
        }
    }

    /// A directory (`""`: the top).
    pub fn dir(&mut self, rel: impl AsRef<Path>, mode: u32) -> &mut Self {
        let p = self.at(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        self.modes.push((p, mode));
        self
    }

    /// A regular file, created or overwritten in place.
    pub fn file(&mut self, rel: impl AsRef<Path>, mode: u32, content: &[u8]) -> &mut Self {
        let p = self.at(rel);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        self.modes.push((p, mode));
        self
    }

    pub fn symlink(&mut self, rel: impl AsRef<Path>, target: impl AsRef<Path>) -> &mut Self {
        let p = self.at(rel);
        std::os::unix::fs::symlink(target, &p).unwrap_or_else(|e| panic!("cannot symlink {}: {e}", p.display()));
        self
    }

    /// Another name for the existing `existing`.
    pub fn hardlink(&mut self, rel: impl AsRef<Path>, existing: impl AsRef<Path>) -> &mut Self {
        let p = self.at(rel);
        std::fs::hard_link(self.at(existing), &p).unwrap_or_else(|e| panic!("cannot link {}: {e}", p.display()));
        self
    }

    pub fn fifo(&mut self, rel: impl AsRef<Path>, mode: u32) -> &mut Self {
        self.node(rel, FileType::Fifo, mode, 0)
    }

    pub fn char_device(&mut self, rel: impl AsRef<Path>, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.node(rel, FileType::CharacterDevice, mode, rustix::fs::makedev(major, minor))
    }

    pub fn block_device(&mut self, rel: impl AsRef<Path>, mode: u32, major: u32, minor: u32) -> &mut Self {
        self.node(rel, FileType::BlockDevice, mode, rustix::fs::makedev(major, minor))
    }

    fn node(&mut self, rel: impl AsRef<Path>, ft: FileType, mode: u32, dev: u64) -> &mut Self {
        let p = self.at(rel);
        rustix::fs::mknodat(CWD, &p, ft, Mode::from_raw_mode(0o600), dev)
            .unwrap_or_else(|e| panic!("cannot mknod {}: {e}", p.display()));
        self.modes.push((p, mode));
        self
    }

    /// A unix socket file, left behind by a listener that bound it and went away.
    pub fn socket(&mut self, rel: impl AsRef<Path>, mode: u32) -> &mut Self {
        let p = self.at(rel);
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap_or_else(|e| panic!("cannot bind {}: {e}", p.display())));
        self.modes.push((p, mode));
        self
    }

    /// Changes the mode of an existing entry.
    pub fn mode(&mut self, rel: impl AsRef<Path>, mode: u32) -> &mut Self {
        let p = self.at(rel);
        self.modes.push((p, mode));
        self
    }

    pub fn owner(&mut self, rel: impl AsRef<Path>, uid: u32, gid: u32) -> &mut Self {
        let p = self.at(rel);
        self.owners.push((p, uid, gid));
        self
    }

    pub fn xattr(&mut self, rel: impl AsRef<Path>, name: &str, value: &[u8]) -> &mut Self {
        let p = self.at(rel);
        self.xattrs.push((p, name.to_owned(), Some(value.to_vec())));
        self
    }

    pub fn remove_xattr(&mut self, rel: impl AsRef<Path>, name: &str) -> &mut Self {
        let p = self.at(rel);
        self.xattrs.push((p, name.to_owned(), None));
        self
    }

    /// Applies owners, modes, xattrs, then every mtime under the top.
    pub fn finish(&mut self) {
        self.finish_without_mtimes();
        stamp_mtimes(&self.top);
    }

    /// Applies owners, modes and xattrs, leaving mtimes as they are.
    pub fn finish_without_mtimes(&mut self) {
        for (p, uid, gid) in self.owners.drain(..) {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot chown {}: {e}", p.display()));
        }
        for (p, mode) in self.modes.drain(..) {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", p.display()));
        }
        for (p, name, value) in self.xattrs.drain(..) {
            let r = match &value {
                Some(v) => rustix::fs::lsetxattr(&p, name.as_str(), v, XattrFlags::empty()),
                None => rustix::fs::lremovexattr(&p, name.as_str()),
            };
            r.unwrap_or_else(|e| panic!("cannot set xattr {name} on {}: {e}", p.display()));
        }
    }
}

/// Fills `top` with a realistic root tree holding every kind of entry. The parts only root
/// can make (odd owners, devices, `security.*` xattrs) are made only when running as root.
/// Two builds give identical trees (same content, modes, owners, xattrs and mtimes).
pub fn build_fixture(top: &Path) {
    let root = crate::is_root();
    let mut b = Builder::new(top);
    b.dir("", 0o755);

    b.dir("etc", 0o755)
        .file("etc/hostname", 0o644, b"golden-image\n")
        .file("etc/empty", 0o644, b"")
        .file("etc/same-a", 0o644, b"identical content, two inodes\n")
        .file("etc/same-b", 0o644, b"identical content, two inodes\n")
        .file("etc/xattr-file", 0o644, b"has xattrs\n")
        .xattr("etc/xattr-file", "user.comment", b"golden")
        .xattr("etc/xattr-file", "user.bin", &[0, 1, 2, 0xff])
        .dir("etc/xattr-dir", 0o755)
        .xattr("etc/xattr-dir", "user.dirattr", b"on a directory")
        .file("etc/xattr-dir/inner", 0o600, b"inner\n")
        .dir("etc/ro", 0o555)
        .file("etc/ro/conf", 0o444, b"read only\n")
        .dir("etc/alternatives", 0o755)
        .symlink("etc/alternatives/editor", "/usr/bin/vi");

    b.dir("usr/bin", 0o755)
        .mode("usr", 0o755)
        .file("usr/bin/tool", 0o755, b"#!/bin/sh\necho tool v1\n")
        .file("usr/bin/suid", 0o4755, b"setuid\n")
        .file("usr/bin/sgid", 0o2755, b"setgid\n")
        .file("usr/bin/ping", 0o755, b"ping: needs cap_net_raw\n")
        .dir("usr/lib", 0o755)
        // Larger than 1 MiB and not a multiple of the 256 KiB chunk: several chunks, a short tail.
        .file("usr/lib/big.bin", 0o644, &random_bytes(1, 1536 * 1024 + 123))
        .file("usr/lib/libfoo.so.1", 0o644, b"libfoo version 1\n")
        .symlink("usr/lib/libfoo.so", "libfoo.so.1")
        .dir("usr/share", 0o755)
        .symlink("usr/share/dangling", "../../nowhere/missing");

    b.dir("tmp", 0o1777);

    b.dir("hl/sub", 0o755)
        .mode("hl", 0o755)
        .file(HARDLINKS[0], 0o644, b"hard-linked content\n")
        .hardlink(HARDLINKS[1], HARDLINKS[0])
        .hardlink(HARDLINKS[2], HARDLINKS[0]);

    b.dir("run", 0o755).fifo("run/fifo", 0o640).socket("run/sock", 0o755);
    b.dir("dev", 0o755);
    b.dir("home/odd", 0o750).mode("home", 0o755).file("home/odd/file", 0o640, b"odd owner\n");
    b.dir("var/lib", 0o755).mode("var", 0o755).file("var/lib/x", 0o644, b"var lib x\n");
    // An empty-looking pseudo-filesystem directory, as on a real root image.
    b.dir("proc", 0o555).file("proc/should-not-appear", 0o644, b"only when nothing is mounted here\n");

    b.dir("weird", 0o755)
        .file(bytes_path(b"weird/\xff\xfe"), 0o644, b"not a UTF-8 name\n")
        .file("weird/$(touch pwned)", 0o644, b"shell metacharacters\n")
        // `$(touch /tmp/pwned)` spelled as a path: `/` cannot be part of one name.
        .dir("weird/$(touch /tmp", 0o755)
        .mode("weird/$(touch ", 0o755)
        .file("weird/$(touch /tmp/pwned)", 0o644, b"shell metacharacters in a path\n");

    if root {
        b.char_device("dev/null", 0o666, 1, 3)
            .block_device("dev/loop0", 0o660, 7, 0)
            .owner("home/odd", 1234, 5678)
            .owner("home/odd/file", 1234, 5678)
            .owner("usr/bin/sgid", 0, 5678)
            .owner("usr/share/dangling", 1234, 5678)
            .xattr("usr/bin/ping", "security.capability", &cap_net_raw_ep());
    }
    b.finish();
}

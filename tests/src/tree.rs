//! Looking at trees: [`Snapshot`] records everything about every entry, [`differences`] is the
//! one comparator, [`assert_converged`] adds the rsync cross-check, and [`Sentinel`] proves a
//! tree was not touched at all.
//!
//! This reads the disk with std and rustix only, never with the product's scanner, so a bug
//! there cannot hide itself.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use crate::Output;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Kind {
    fn of(ft: std::fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_char_device() {
            Kind::CharDevice
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            assert!(ft.is_socket(), "unknown file type {ft:?}");
            Kind::Socket
        }
    }

    fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }
}

/// Everything recorded about one entry.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Exact for every time Linux stores (an `i64` of seconds would overflow as nanoseconds).
    pub mtime_ns: i128,
    /// Regular files only; 0 otherwise.
    pub size: u64,
    pub content: Option<blake3::Hash>,
    pub target: Option<Vec<u8>>,
    /// Devices only; 0 otherwise.
    pub rdev: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    // Identity: what a sentinel compares on top of the rest.
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub ctime_ns: i128,
}

/// A whole tree, keyed by path relative to its top (`""`: the top itself).
pub struct Snapshot {
    pub nodes: BTreeMap<Vec<u8>, Node>,
}

/// One way two trees differ.
#[derive(Clone, Debug)]
pub struct Difference {
    pub path: Vec<u8>,
    pub what: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", show(&self.path), self.what)
    }
}

impl Difference {
    /// Whether the difference is at `prefix` or beneath it.
    pub fn is_within(&self, prefix: &str) -> bool {
        let p = prefix.as_bytes();
        self.path.starts_with(p) && (self.path.len() == p.len() || self.path[p.len()] == b'/')
    }
}

/// A path for messages: `.` for the top, escaped bytes where it is not UTF-8.
pub fn show(path: &[u8]) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    match std::str::from_utf8(path) {
        Ok(s) => s.to_owned(),
        Err(_) => path.escape_ascii().to_string(),
    }
}

fn read_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    // 64 KiB is the kernel's limit for both a name list and a value.
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => 0,
        Err(e) => return Err(e.into()),
    };
    let mut value = vec![0u8; 65536];
    for name in names[..n].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let m = rustix::fs::lgetxattr(path, name, &mut value[..])?;
        out.insert(name.to_vec(), value[..m].to_vec());
    }
    Ok(out)
}

fn node_at(path: &Path) -> io::Result<Node> {
    let md = std::fs::symlink_metadata(path)?;
    let kind = Kind::of(md.file_type());
    let content = match kind {
        Kind::File => {
            let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
            let mut h = blake3::Hasher::new();
            io::copy(&mut f, &mut h)?;
            Some(h.finalize())
        }
        _ => None,
    };
    let target = match kind {
        Kind::Symlink => Some(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec()),
        _ => None,
    };
    Ok(Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        size: if kind == Kind::File { md.size() } else { 0 },
        content,
        target,
        rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) { md.rdev() } else { 0 },
        xattrs: read_xattrs(path)?,
        dev: md.dev(),
        ino: md.ino(),
        nlink: md.nlink(),
        ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
    })
}

impl Snapshot {
    /// Records `top` and everything beneath it, following no symlink. Panics if any of it
    /// cannot be read: a comparison with holes would prove nothing.
    pub fn take(top: &Path) -> Snapshot {
        Snapshot::try_take(top).unwrap_or_else(|e| panic!("cannot snapshot {}: {e}", top.display()))
    }

    pub fn try_take(top: &Path) -> Result<Snapshot, String> {
        let mut nodes = BTreeMap::new();
        for e in walkdir::WalkDir::new(top).follow_links(false) {
            let e = e.map_err(|e| e.to_string())?;
            let rel = e.path().strip_prefix(top).expect("beneath top").as_os_str().as_bytes().to_vec();
            let node = node_at(e.path()).map_err(|err| format!("{}: {err}", e.path().display()))?;
            nodes.insert(rel, node);
        }
        Ok(Snapshot { nodes })
    }

    pub fn get(&self, rel: &str) -> Option<&Node> {
        self.nodes.get(rel.as_bytes())
    }

    /// The hard-link structure: every set of two or more names sharing one inode.
    pub fn link_groups(&self) -> BTreeSet<Vec<Vec<u8>>> {
        let mut by_inode: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
        for (p, n) in &self.nodes {
            if n.kind != Kind::Dir && n.nlink > 1 {
                by_inode.entry((n.dev, n.ino)).or_default().push(p.clone());
            }
        }
        by_inode.into_values().filter(|v| v.len() > 1).collect()
    }

    /// One line per entry, like `ls -l` with nanosecond mtimes, inode and xattr names.
    pub fn listing(&self) -> String {
        let mut s = String::new();
        for (p, n) in self.nodes.iter().take(400) {
            let mut line = format!(
                "{}{:04o} {:>5}:{:<5} {:>9} {:>20} ino={:<9} {}",
                n.kind.letter(),
                n.mode,
                n.uid,
                n.gid,
                n.size,
                n.mtime_ns,
                n.ino,
                show(p)
            );
            if let Some(t) = &n.target {
                line.push_str(&format!(" -> {}", show(t)));
            }
            if n.rdev != 0 {
                line.push_str(&format!(" rdev={:#x}", n.rdev));
            }
            if !n.xattrs.is_empty() {
                let names: Vec<String> = n.xattrs.keys().map(|k| show(k)).collect();
                line.push_str(&format!(" xattrs=[{}]", names.join(",")));
            }
            s.push_str(&line);
            s.push('\n');
        }
        if self.nodes.len() > 400 {
            s.push_str(&format!("… and {} more\n", self.nodes.len() - 400));
        }
        s
    }
}

/// A listing of `top` for failure messages; never panics.
pub fn listing(top: &Path) -> String {
    match Snapshot::try_take(top) {
        Ok(s) => s.listing(),
        Err(e) => format!("(cannot list: {e})\n"),
    }
}

fn compare(want: &Snapshot, got: &Snapshot, identity: bool) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut diff = |path: &[u8], what: String| out.push(Difference { path: path.to_vec(), what });
    let paths: BTreeSet<&Vec<u8>> = want.nodes.keys().chain(got.nodes.keys()).collect();
    for p in paths {
        let (w, g) = match (want.nodes.get(p), got.nodes.get(p)) {
            (Some(w), Some(g)) => (w, g),
            (Some(w), None) => {
                diff(p, format!("missing (expected a {:?})", w.kind));
                continue;
            }
            (None, Some(g)) => {
                diff(p, format!("unexpected {:?}", g.kind));
                continue;
            }
            (None, None) => unreachable!(),
        };
        if w.kind != g.kind {
            diff(p, format!("kind {:?}, expected {:?}", g.kind, w.kind));
            continue;
        }
        let mut field = |name: &str, want: String, got: String| {
            if want != got {
                diff(p, format!("{name} {got}, expected {want}"));
            }
        };
        field("mode", format!("{:04o}", w.mode), format!("{:04o}", g.mode));
        field("uid", w.uid.to_string(), g.uid.to_string());
        field("gid", w.gid.to_string(), g.gid.to_string());
        field("mtime_ns", w.mtime_ns.to_string(), g.mtime_ns.to_string());
        field("size", w.size.to_string(), g.size.to_string());
        field("content", format!("{:?}", w.content), format!("{:?}", g.content));
        field(
            "symlink target",
            format!("{:?}", w.target.as_deref().map(show)),
            format!("{:?}", g.target.as_deref().map(show)),
        );
        field("rdev", format!("{:#x}", w.rdev), format!("{:#x}", g.rdev));
        let xattrs = |x: &BTreeMap<Vec<u8>, Vec<u8>>| {
            x.iter().map(|(k, v)| format!("{}={}", show(k), v.escape_ascii())).collect::<Vec<_>>().join(", ")
        };
        field("xattrs", xattrs(&w.xattrs), xattrs(&g.xattrs));
        if identity {
            field("device", w.dev.to_string(), g.dev.to_string());
            field("inode", w.ino.to_string(), g.ino.to_string());
            field("nlink", w.nlink.to_string(), g.nlink.to_string());
            field("ctime_ns", w.ctime_ns.to_string(), g.ctime_ns.to_string());
        }
    }
    let (wl, gl) = (want.link_groups(), got.link_groups());
    let names = |g: &Vec<Vec<u8>>| g.iter().map(|p| show(p)).collect::<Vec<_>>().join(", ");
    for g in wl.difference(&gl) {
        diff(&g[0], format!("hard-link group [{}] expected but not present", names(g)));
    }
    for g in gl.difference(&wl) {
        diff(&g[0], format!("hard-link group [{}] present but not expected", names(g)));
    }
    out
}

/// Every way the tree at `root` differs from the tree at `img`: kind, mode, owner, mtime (of
/// every entry, the top included), size, content, symlink target, rdev, xattrs and the
/// partition of paths into hard-linked inodes.
pub fn differences(img: &Path, root: &Path) -> Vec<Difference> {
    compare(&Snapshot::take(img), &Snapshot::take(root), false)
}

/// What `rsync -aHAXcn --numeric-ids --delete -i IMG/ ROOT/` says differs: `None` when rsync
/// is not installed, `Some("")` when it finds nothing.
pub fn rsync_differences(img: &Path, root: &Path) -> Option<String> {
    let slash = |p: &Path| {
        let mut s = p.as_os_str().to_owned();
        s.push("/");
        s
    };
    let out = match Command::new("rsync")
        .args(["-aHAXcn", "--numeric-ids", "--delete", "-i"])
        .arg(slash(img))
        .arg(slash(root))
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run rsync: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.trim().is_empty() {
        return Some(String::new());
    }
    Some(format!("rsync exited with {}:\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)))
}

/// Panics, with the run's report, unless `root` is identical to `img` by the comparator and by
/// rsync (when installed).
#[track_caller]
pub fn assert_converged(img: &Path, root: &Path, out: &Output) {
    let diffs = differences(img, root);
    out.check(
        diffs.is_empty(),
        format!("host differs from the image in {} ways:\n{}", diffs.len(), lines(&diffs)),
        &[root],
    );
    match rsync_differences(img, root) {
        None => eprintln!("note: rsync is not on PATH; skipping the rsync cross-check"),
        Some(r) => {
            out.check(r.is_empty(), format!("rsync cross-check found differences:\n{r}"), &[root]);
        }
    }
}

/// One difference per line.
pub fn lines(diffs: &[Difference]) -> String {
    diffs.iter().map(|d| format!("  {d}\n")).collect()
}

/// A tree that must not change at all: paths, content and metadata, down to inode numbers
/// and ctimes (so even a chmod to the same mode, or a replacement by an identical copy, shows).
pub struct Sentinel {
    top: std::path::PathBuf,
    before: Snapshot,
}

impl Sentinel {
    pub fn take(top: &Path) -> Sentinel {
        Sentinel { top: top.to_owned(), before: Snapshot::take(top) }
    }

    #[track_caller]
    pub fn assert_unchanged(&self, context: &str) {
        self.assert_same(context, true);
    }

    /// Like [`Sentinel::assert_unchanged`], but ignoring inode numbers, link counts and
    /// ctimes: for a tree some of whose inodes also had names inside the root, which a
    /// correct sync may unlink.
    #[track_caller]
    pub fn assert_content_and_metadata_unchanged(&self, context: &str) {
        self.assert_same(context, false);
    }

    #[track_caller]
    fn assert_same(&self, context: &str, identity: bool) {
        let after = Snapshot::take(&self.top);
        let diffs = compare(&self.before, &after, identity);
        assert!(
            diffs.is_empty(),
            "{context}: {} changed:\n{}--- before ---\n{}--- after ---\n{}",
            self.top.display(),
            lines(&diffs),
            self.before.listing(),
            after.listing()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::{build_fixture, is_root, scratch, set_mtime, Builder};

    /// The comparator and the sentinel are the suite's oracle: check they see every kind of
    /// difference, so a test passing means something.
    #[test]
    fn comparator_sees_every_kind_of_difference() {
        let s = scratch();
        let (a, b) = (s.dir("a"), s.dir("b"));
        build_fixture(&a);
        build_fixture(&b);
        let same = differences(&a, &b);
        assert!(same.is_empty(), "two builds of the fixture differ:\n{}", lines(&same));
        assert_eq!(rsync_differences(&a, &b).unwrap_or_default(), "");

        let at = |p: &str| b.join(p);
        let mut expect = vec![
            ("usr/lib/libfoo.so", "mtime_ns"),
            ("etc/xattr-dir", "xattrs"),
            ("usr/bin/suid", "mode"),
            ("hl/one", "hard-link group"),
            ("etc/hostname", "content"),
            ("usr/share/dangling", "symlink target"),
            ("run/fifo", "kind"),
            ("etc/empty", "missing"),
            ("etc/extra", "unexpected"),
            ("", "mtime_ns"),
        ];
        set_mtime(&at("usr/lib/libfoo.so"), 1);
        rustix::fs::lremovexattr(at("etc/xattr-dir"), "user.dirattr").unwrap();
        fs::set_permissions(at("usr/bin/suid"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_file(at("hl/two")).unwrap();
        fs::copy(at("hl/one"), at("hl/two")).unwrap();
        fs::write(at("etc/hostname"), b"golden-imagE\n").unwrap();
        fs::remove_file(at("usr/share/dangling")).unwrap();
        std::os::unix::fs::symlink("../../nowhere/elsewhere", at("usr/share/dangling")).unwrap();
        fs::remove_file(at("run/fifo")).unwrap();
        fs::remove_file(at("etc/empty")).unwrap();
        fs::write(at("etc/extra"), b"").unwrap();
        let mut bld = Builder::new(&b);
        bld.socket("run/fifo", 0o640);
        if is_root() {
            fs::remove_file(at("dev/null")).unwrap();
            bld.char_device("dev/null", 0o666, 1, 5).owner("etc/same-a", 1, 0).owner("etc/same-b", 0, 1);
            expect.extend([("dev/null", "rdev"), ("etc/same-a", "uid"), ("etc/same-b", "gid")]);
        }
        bld.finish_without_mtimes();
        set_mtime(&b, 2);

        let diffs = differences(&a, &b);
        for (path, what) in expect {
            assert!(
                diffs.iter().any(|d| d.path == path.as_bytes() && d.what.contains(what)),
                "no `{what}` difference at {path:?} in:\n{}",
                lines(&diffs)
            );
        }
        if let Some(r) = rsync_differences(&a, &b) {
            assert!(r.contains("etc/hostname") && r.contains("hl/two"), "rsync saw too little:\n{r}");
        }

        // A sentinel sees even a change that leaves every other field as it was.
        let sentinel = Sentinel::take(&a);
        fs::set_permissions(a.join("etc/hostname"), fs::Permissions::from_mode(0o644)).unwrap();
        let caught = std::panic::catch_unwind(|| sentinel.assert_unchanged("chmod to the same mode"));
        assert!(caught.is_err(), "the sentinel missed a chmod");
    }
}

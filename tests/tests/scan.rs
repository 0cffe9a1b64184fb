//! The host walk (`walk_beneath`: descriptor-relative, parallel) sees exactly what the path
//! walk (`walk_filtered`: walkdir) sees, and never follows a symlink beneath the root.

use std::fs;

use gis_tests::{build_fixture, scratch, Builder, TmpfsMount};
use manifest::scan::{self, Scan};
use manifest::RelPath;

/// Everything a scan records, in a comparable form.
fn summary(s: &Scan) -> Vec<String> {
    let mut out: Vec<String> = s
        .entries
        .iter()
        .map(|e| {
            format!(
                "{:?} dev={} ino={} nlink={} ctime={} mount={}",
                e.entry, e.dev, e.ino, e.nlink, e.ctime_ns, e.mount_point
            )
        })
        .collect();
    out.extend(s.excluded.iter().map(|(p, d)| format!("excluded {p} dir={d}")));
    out.extend(s.errors.iter().map(|e| format!("error {e}")));
    out.push(format!("root {:?} dev={}", s.root, s.root_dev));
    out
}

#[test]
fn the_descriptor_walk_matches_the_path_walk() {
    let s = scratch();
    let top = s.dir("img");
    build_fixture(&top);
    // A wide directory: its entries are scanned in parallel chunks.
    let mut b = Builder::new(&top);
    b.dir("wide", 0o755);
    for i in 0..700 {
        b.file(format!("wide/f{i:04}"), 0o644, format!("{i}\n").as_bytes());
    }
    b.dir("skip/me", 0o755).file("skip/me/file", 0o644, b"excluded\n").file("skip.log", 0o644, b"excluded too\n");
    b.finish();
    // A mount point is recorded but not entered, by both walks.
    let _mount = gis_tests::is_root().then(|| {
        let m = top.join("proc");
        TmpfsMount::new(&m)
    });
    if _mount.is_some() {
        fs::write(top.join("proc/inside-the-mount"), b"x").unwrap();
    }

    let exclude = |p: &RelPath, _dir: bool| p.as_bytes() == b"skip" || p.as_bytes().ends_with(b".log");
    let by_path = scan::walk_filtered(&top, exclude).unwrap();
    let beneath = scan::walk_beneath(&top, exclude).unwrap();
    assert!(by_path.entries.len() >= 740, "the fixture was scanned: {} entries", by_path.entries.len());
    assert!(by_path.errors.is_empty(), "{:?}", by_path.errors);
    assert!(beneath.excluded.iter().any(|(p, d)| p.as_bytes() == b"skip" && *d), "{:?}", beneath.excluded);
    let (a, b) = (summary(&by_path), summary(&beneath));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "the two walks disagree");
    }
    assert_eq!(a.len(), b.len(), "the two walks found different numbers of entries");
    assert!(
        !beneath.entries.iter().any(|e| e.entry.path.as_bytes().starts_with(b"proc/")),
        "the walk entered a mount point"
    );
}

#[test]
fn the_descriptor_walk_records_a_symlinked_directory_as_a_symlink() {
    let s = scratch();
    let top = s.dir("root");
    let outside = s.dir("outside");
    fs::write(outside.join("secret"), b"outside the root\n").unwrap();
    Builder::new(&top).dir("etc", 0o755).file("etc/passwd", 0o644, b"root:x:0:0\n").finish();
    std::os::unix::fs::symlink(&outside, top.join("evil")).unwrap();
    let scan = scan::walk_beneath(&top, |_, _| false).unwrap();
    let paths: Vec<&[u8]> = scan.entries.iter().map(|e| e.entry.path.as_bytes()).collect();
    assert_eq!(paths, [&b"etc"[..], b"etc/passwd", b"evil"]);
    assert_eq!(scan.entries[2].entry.kind, manifest::Kind::Symlink);
    assert_eq!(scan.entries[2].entry.target.as_deref(), Some(outside.as_os_str().as_encoded_bytes()));
}

#[test]
fn an_unreadable_directory_is_reported_and_the_walk_goes_on() {
    let s = scratch();
    let top = s.dir("root");
    Builder::new(&top)
        .dir("a", 0o755)
        .file("a/one", 0o644, b"1\n")
        .dir("locked", 0o000)
        .dir("z", 0o755)
        .file("z/two", 0o644, b"2\n")
        .finish();
    if gis_tests::is_root() {
        eprintln!("skipped: root can list a mode-000 directory, so there is no unreadable directory to find");
        return;
    }
    let scan = scan::walk_beneath(&top, |_, _| false).unwrap();
    let paths: Vec<&[u8]> = scan.entries.iter().map(|e| e.entry.path.as_bytes()).collect();
    assert_eq!(paths, [&b"a"[..], b"a/one", b"locked", b"z", b"z/two"]);
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert!(scan.errors[0].is_unlisted_dir());
    assert!(scan.errors[0].to_string().contains("locked"), "{}", scan.errors[0]);
}

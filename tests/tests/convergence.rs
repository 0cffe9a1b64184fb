//! A host converges to the image: from nothing, from an older image, with hard links, and
//! with content that only moved.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use gis_tests::{
    assert_converged, build_fixture, converged_host, mtime_for, random_bytes, scratch, set_mtime, sync, Builder,
    Master, HARDLINKS,
};

#[test]
fn cold_sync_reproduces_every_kind_of_entry() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    build_fixture(&img);
    let pwned = Path::new("/tmp/pwned");
    let pwned_before = pwned.exists();
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    out.check(out.summary().starts_with("syncd: converged to image v1"), "unexpected summary", &[&root]);
    out.check(out.lists("usr/lib/big.bin") && out.lists("dev"), "itemized lines miss created paths", &[&root]);
    if !pwned_before {
        assert!(!pwned.exists(), "a file name was run through a shell: /tmp/pwned appeared");
    }

    let again = sync(&master, &root, &[]);
    again.expect_code(0, &[&root]);
    again.check(again.stdout.is_empty(), "a second pass on a converged host itemized changes", &[&root]);
    again.check(
        again.summary().contains("created 0, updated 0, deleted 0, 0 failed"),
        "a second pass on a converged host changed something",
        &[&root],
    );
    let dry = sync(&master, &root, &["--dry-run"]);
    dry.expect_code(0, &[&root]);
    dry.check(dry.stdout.is_empty(), "a dry run on a converged host itemized changes", &[&root]);
}

#[test]
fn moved_content_is_copied_locally_not_fetched() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let payload = random_bytes(5, 2 * 1024 * 1024);
    Builder::new(&img).dir("", 0o755).dir("new", 0o755).file("new/place", 0o644, &payload).finish();
    Builder::new(&root).dir("", 0o755).dir("old", 0o755).file("old/place", 0o644, &payload).finish();
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    let summary = out.summary();
    out.check(summary.contains("fetched 0 objects"), "moved content was fetched from the master", &[&root]);
    out.check(summary.contains("copied 1 locally"), "moved content was not copied locally", &[&root]);
}

fn link_inodes(root: &Path) -> Vec<(u64, u64)> {
    HARDLINKS
        .iter()
        .map(|p| {
            let md = fs::symlink_metadata(root.join(p)).unwrap();
            (md.ino(), md.nlink())
        })
        .collect()
}

#[test]
fn hard_link_group_stays_one_inode_when_its_content_changes() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    build_fixture(&img);
    let master = Master::start(&img);
    converged_host(&master, &img, &root);
    let before = link_inodes(&root);
    assert!(before.iter().all(|&i| i == (before[0].0, 3)), "not one inode with 3 links after a cold sync: {before:?}");
    drop(master);

    // All three names share the image's inode, so this changes the whole group.
    let new_content = b"hard-linked content, version two\n";
    fs::write(img.join(HARDLINKS[0]), new_content).unwrap();
    set_mtime(&img.join(HARDLINKS[0]), mtime_for(b"hl/one") + 86_400_000_000_123);
    let master = Master::start_version(&img, 2);
    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    let after = link_inodes(&root);
    out.check(
        after.iter().all(|&i| i == (after[0].0, 3)),
        format!("the group is no longer one inode with 3 links: {after:?}"),
        &[&root],
    );
    out.check(after[0].0 != before[0].0, "the group's content was rewritten in place", &[&root]);
    for p in HARDLINKS {
        assert_eq!(fs::read(root.join(p)).unwrap(), new_content, "{p}");
    }
}

/// Turns a copy of the v1 fixture into v2: every kind of change an upgrade brings.
fn make_v2(img: &Path) {
    // Same size and, after restamping, same mtime: only the content hash tells.
    fs::write(img.join("etc/hostname"), b"golden-imagf\n").unwrap();
    fs::remove_file(img.join("usr/lib/libfoo.so.1")).unwrap();
    fs::remove_file(img.join("usr/lib/libfoo.so")).unwrap();
    fs::create_dir(img.join("usr/lib/big")).unwrap();
    fs::rename(img.join("usr/lib/big.bin"), img.join("usr/lib/big/moved.bin")).unwrap();
    fs::remove_dir_all(img.join("etc/xattr-dir")).unwrap();
    fs::remove_file(img.join("etc/same-b")).unwrap();
    fs::remove_file(img.join("run/fifo")).unwrap();
    fs::remove_file(img.join("hl/two")).unwrap();
    fs::remove_dir_all(img.join("var")).unwrap();
    let mut b = Builder::new(img);
    b.file("usr/bin/tool", 0o755, b"#!/bin/sh\necho tool v2, which is longer\n")
        .file("usr/lib/libfoo.so.2", 0o644, b"libfoo version 2\n")
        .symlink("usr/lib/libfoo.so", "libfoo.so.2")
        .mode("usr/lib/big", 0o755)
        .file("etc/xattr-dir", 0o600, b"a directory became a file\n")
        .dir("etc/same-b", 0o700)
        .file("etc/same-b/child", 0o644, b"a file became a directory\n")
        .symlink("run/fifo", "/dev/null")
        .mode("usr/bin/suid", 0o755)
        .xattr("etc/xattr-file", "user.comment", b"v2")
        .xattr("etc/xattr-file", "user.added", b"new in v2")
        .remove_xattr("etc/xattr-file", "user.bin")
        .hardlink("hl/four", HARDLINKS[0])
        .dir("opt", 0o755)
        .file("opt/a", 0o644, b"a new hard-link group\n")
        .hardlink("opt/b", "opt/a")
        .dir("srv/empty", 0o700)
        .mode("srv", 0o711);
    if gis_tests::is_root() {
        fs::remove_file(img.join("dev/loop0")).unwrap();
        b.char_device("dev/zero", 0o666, 1, 5)
            .owner("home/odd/file", 4321, 8765)
            .owner("usr/bin/tool", 0, 5678)
            .remove_xattr("usr/bin/ping", "security.capability");
    }
    b.finish();
    set_mtime(&img.join("etc/empty"), 1_700_000_000_999_999_999);
    set_mtime(&img.join("usr"), 1_700_000_001_000_000_001);
}

/// Bytes of content fetched, from a summary's `fetched N objects, SIZE` (`144 B`, `1.5 MiB`…).
fn fetched_bytes(summary: &str) -> f64 {
    let parsed = summary.split_once("objects, ").and_then(|(_, rest)| {
        let mut words = rest.split([' ', ',', ';', '(']).filter(|w| !w.is_empty());
        let n: f64 = words.next()?.parse().ok()?;
        let unit = ["B", "KiB", "MiB", "GiB"].iter().position(|u| Some(*u) == words.next())?;
        Some(n * 1024f64.powi(unit as i32))
    });
    parsed.unwrap_or_else(|| panic!("no fetched size in {summary:?}"))
}

#[test]
fn host_at_v1_upgrades_to_v2() {
    let s = scratch();
    let v1 = s.dir("v1");
    let v2 = s.dir("v2");
    let root = s.dir("root");
    build_fixture(&v1);
    build_fixture(&v2);
    make_v2(&v2);
    let master = Master::start_version(&v1, 1);
    converged_host(&master, &v1, &root);
    drop(master);

    let master = Master::start_version(&v2, 2);
    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);
    out.check(out.summary().starts_with("syncd: converged to image v2"), "unexpected summary", &[&root]);
    out.check(
        fetched_bytes(out.summary()) < 1024.0 * 1024.0,
        "the moved 1.5 MiB file was fetched, not copied locally",
        &[&root],
    );
    for p in ["etc/hostname", "usr/lib/big/moved.bin", "etc/xattr-dir", "etc/same-b", "run/fifo", "var", "hl/four"] {
        out.check(out.lists(p), format!("{p} changed but is not itemized"), &[&root]);
    }
    let again = sync(&master, &root, &[]);
    again.expect_code(0, &[&root]);
    again.check(again.stdout.is_empty(), "a second pass after the upgrade itemized changes", &[&root]);
}

/// More than the object stream holds at once (2 MiB of received chunks, 4 MiB or 4,096 decoded
/// pieces): incompressible files (sent raw), compressible ones (zstd frames) and thousands of
/// small files, so both queues fill, block and drain many times over. The host must converge
/// with every byte in place, neither hanging nor dropping a piece.
#[test]
fn a_stream_larger_than_its_queues_converges() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let mut b = Builder::new(&img);
    b.dir("", 0o755).dir("big", 0o755).dir("small", 0o755);
    for n in 0..8u64 {
        b.file(format!("big/raw{n}"), 0o644, &random_bytes(100 + n, 1536 * 1024 + 7 * n as usize));
        let text: String = (0..60_000).map(|i| format!("line {i} of text file {n}\n")).collect();
        b.file(format!("big/text{n}"), 0o644, text.as_bytes());
    }
    for d in 0..10 {
        b.dir(format!("small/{d}"), 0o755);
        for f in 0..500 {
            let body = format!("small file {d}/{f}\n").repeat(1 + f % 7);
            b.file(format!("small/{d}/{f}"), 0o644, body.as_bytes());
        }
    }
    b.finish();
    let master = Master::start(&img);

    let out = sync(&master, &root, &["--quiet"]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    out.check(out.summary().contains("created 5028,"), "not every entry was created", &[&root]);
}

/// Content needed again later in a pass is copied from where the pass first put it, even
/// when that copy is in a batch whose temp files the flushing thread has renamed meanwhile
/// (syncd commits each batch of 2,048 files on a helper thread while it stages the next).
/// Ten files in `z/` repeat the content of files spread over the first, second and third
/// batches of `a/`: each must be copied locally, none fetched a second time.
#[test]
fn content_repeated_across_batches_is_copied_from_its_first_copy() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let mut b = Builder::new(&img);
    b.dir("", 0o755).dir("a", 0o755).dir("z", 0o755);
    let body = |n: usize| format!("unique content of file {n}\n").repeat(1 + n % 5);
    for n in 0..5000 {
        b.file(format!("a/{n:04}"), 0o644, body(n).as_bytes());
    }
    for k in 0..10 {
        b.file(format!("z/{k}"), 0o640, body(k * 500 + 17).as_bytes());
    }
    b.finish();
    let master = Master::start(&img);

    let out = sync(&master, &root, &["--quiet"]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    let summary = out.summary();
    out.check(summary.contains("fetched 5000 objects"), "repeated content was fetched again", &[&root]);
    out.check(summary.contains("copied 10 locally"), "repeated content was not copied locally", &[&root]);
}

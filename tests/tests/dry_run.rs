//! The dry run and the real run agree: same itemized lines, and the dry run changes nothing.

use std::fs;
use std::path::Path;

use gis_tests::{
    assert_converged, build_fixture, converged_host, is_root, mtime_for, scratch, set_mtime, sync, Builder, Master,
    Sentinel,
};

/// Drifts a converged host in every way a host drifts. Returns the paths it changed.
fn drift(root: &Path, outside: &Path) -> Vec<&'static str> {
    let at = |p: &str| root.join(p);
    let mut changed = Vec::new();

    // Same size, mtime put back: only the content hash can tell.
    fs::write(at("etc/hostname"), b"tampered-img\n").unwrap();
    set_mtime(&at("etc/hostname"), mtime_for(b"etc/hostname"));
    changed.push("etc/hostname");

    let mut b = Builder::new(root);
    b.mode("usr/bin/tool", 0o700);
    changed.push("usr/bin/tool");
    if is_root() {
        b.owner("etc/same-a", 42, 42);
        changed.push("etc/same-a");
    }
    b.remove_xattr("etc/xattr-file", "user.comment");
    changed.push("etc/xattr-file");
    b.finish_without_mtimes();

    set_mtime(&at("etc/empty"), 1_234_567_890_123_456_789);
    changed.push("etc/empty");

    fs::remove_file(at("usr/lib/libfoo.so.1")).unwrap();
    changed.push("usr/lib/libfoo.so.1");

    fs::write(at("etc/extra.conf"), b"local addition\n").unwrap();
    fs::create_dir_all(at("opt/junk/deep")).unwrap();
    fs::write(at("opt/junk/deep/file"), b"junk\n").unwrap();
    fs::write(at("opt/junk/x"), b"x\n").unwrap();
    changed.extend(["etc/extra.conf", "opt", "opt/junk", "opt/junk/deep", "opt/junk/deep/file", "opt/junk/x"]);

    fs::remove_file(at("etc/same-b")).unwrap();
    fs::create_dir(at("etc/same-b")).unwrap();
    fs::write(at("etc/same-b/inside"), b"a file became a directory\n").unwrap();
    changed.push("etc/same-b");

    // A directory replaced by a symlink to a tree outside the root.
    fs::remove_dir_all(at("etc/xattr-dir")).unwrap();
    std::os::unix::fs::symlink(outside, at("etc/xattr-dir")).unwrap();
    changed.push("etc/xattr-dir");

    fs::remove_file(at("usr/lib/libfoo.so")).unwrap();
    std::os::unix::fs::symlink("libfoo.so.9", at("usr/lib/libfoo.so")).unwrap();
    changed.push("usr/lib/libfoo.so");

    // Break the hard-link group: one member becomes a copy with its own inode.
    fs::remove_file(at("hl/two")).unwrap();
    fs::copy(at("hl/one"), at("hl/two")).unwrap();
    changed.push("hl/two");

    fs::remove_file(at("run/fifo")).unwrap();
    fs::write(at("run/fifo"), b"").unwrap();
    changed.push("run/fifo");

    changed
}

#[test]
fn dry_run_lists_exactly_what_the_real_run_then_does() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let outside = s.dir("outside");
    build_fixture(&img);
    Builder::new(&outside).file("victim", 0o644, b"outside the root\n").finish();
    let outside_sentinel = Sentinel::take(&outside);
    let master = Master::start(&img);
    converged_host(&master, &img, &root);

    let changed = drift(&root, &outside);
    let host = Sentinel::take(&root);
    let dry = sync(&master, &root, &["--dry-run"]);
    dry.expect_code(0, &[&root]);
    host.assert_unchanged("the dry run");
    dry.check(dry.summary().starts_with("syncd: dry run against image v1"), "unexpected dry-run summary", &[&root]);
    let unlisted: Vec<_> = changed.iter().filter(|p| !dry.lists(p)).collect();
    dry.check(unlisted.is_empty(), format!("the dry run does not list drifted paths {unlisted:?}"), &[&root]);

    let real = sync(&master, &root, &[]);
    real.expect_code(0, &[&root]);
    real.check(
        real.stdout == dry.stdout,
        format!("the real run's lines differ from the dry run's:\n--- dry run ---\n{}", dry.stdout),
        &[&root],
    );
    assert_converged(&img, &root, &real);
    outside_sentinel.assert_unchanged("the tree a planted symlink pointed to");
}

#[test]
fn file_names_cannot_forge_itemized_lines() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    Builder::new(&img).dir("etc", 0o755).file("etc/evil\n>f+++++++++ passwd", 0o644, b"x").finish();
    let master = Master::start(&img);

    let dry = sync(&master, &root, &["--dry-run"]);
    dry.expect_code(0, &[&root]);
    let real = sync(&master, &root, &[]);
    real.expect_code(0, &[&root]);
    assert_converged(&img, &root, &real);
    for out in [&dry, &real] {
        out.check(
            !out.lines().contains(&">f+++++++++ passwd"),
            "a file name forged an itemized line for a path that is not in the image",
            &[&root],
        );
    }
}

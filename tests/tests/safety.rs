//! Nothing is written outside the root or through a symlink, whatever the host has planted.

use std::os::unix::fs::symlink;
use std::path::Path;

use gis_tests::{assert_converged, build_fixture, converged_host, scratch, sync, Builder, Master, Sentinel};

/// An outside tree whose names mirror the image's, so that following a symlink into it would
/// overwrite or delete something there.
fn build_outside(outside: &Path) {
    Builder::new(outside)
        .dir("etc-target", 0o755)
        .file("etc-target/hostname", 0o644, b"outside: hostname\n")
        .file("etc-target/same-a", 0o600, b"outside: same-a\n")
        .file("etc-target/only-outside", 0o644, b"would be deleted if etc were followed\n")
        .dir("etc-target/ro", 0o755)
        .file("tool-target", 0o755, b"outside: a binary the host links to\n")
        .dir("var-target/lib", 0o755)
        .file("var-target/lib/x", 0o644, b"outside: var/lib/x\n")
        .file("var-target/lib/other", 0o644, b"outside: other\n")
        .finish();
}

#[test]
fn planted_symlinks_are_replaced_never_followed() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let outside = s.dir("outside");
    build_fixture(&img);
    build_outside(&outside);
    Builder::new(&root).dir("usr/bin", 0o755).finish();
    symlink(outside.join("etc-target"), root.join("etc")).unwrap();
    symlink(outside.join("tool-target"), root.join("usr/bin/tool")).unwrap();
    symlink(outside.join("var-target"), root.join("var")).unwrap();
    let sentinel = Sentinel::take(&outside);
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root, &outside]);
    sentinel.assert_unchanged("symlinks planted in the root pointed here");
    assert_converged(&img, &root, &out);
    for p in ["etc", "usr/bin/tool", "var"] {
        out.check(out.lists(p), format!("the planted symlink {p} is not itemized as replaced"), &[&root]);
    }
}

#[test]
fn leftover_temp_entries_are_removed_and_temp_like_symlinks_not_followed() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let outside = s.dir("outside");
    build_fixture(&img);
    build_outside(&outside);
    let master = Master::start(&img);
    converged_host(&master, &img, &root);

    // What a crash between staging and renaming leaves behind, and names planted to look alike.
    let planted = [
        "etc/.syncd-0123456789abcdef",
        "usr/lib/.syncd-00000000deadbeef",
        ".syncd-fedcba9876543210",
        "hl/.syncd-1111111111111111",
        "etc/ro/.syncd-2222222222222222",
    ];
    Builder::new(&root)
        .file(planted[0], 0o600, b"half-written content from a crashed pass")
        .dir(planted[1], 0o700)
        .file("usr/lib/.syncd-00000000deadbeef/inner", 0o600, b"a staged directory's content")
        .file(planted[4], 0o600, b"leftover in a read-only directory")
        .finish_without_mtimes();
    symlink(outside.join("etc-target"), root.join(planted[2])).unwrap();
    symlink(outside.join("tool-target"), root.join(planted[3])).unwrap();
    let sentinel = Sentinel::take(&outside);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    sentinel.assert_unchanged("temp-like symlinks pointed here");
    assert_converged(&img, &root, &out);
    // syncd's own leftovers are not drift: removed before staging, counted in the summary.
    for p in planted {
        out.check(!out.lists(p), format!("{p} is itemized as if it were the host's"), &[&root]);
    }
    out.check(out.summary().contains("5 leftovers removed"), "the summary does not count the 5 leftovers", &[&root]);
}

#[test]
fn inode_shared_with_outside_the_root_is_not_modified() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let outside = s.dir("outside");
    let content = b"the same bytes inside and outside\n";
    Builder::new(&img).dir("etc", 0o755).file("etc/conf", 0o644, content).finish();
    Builder::new(&outside).file("secret", 0o600, content).xattr("secret", "user.owner", b"outside").finish();
    Builder::new(&root).dir("etc", 0o755).finish();
    // Same content as the image, other metadata: tempting to fix in place.
    std::fs::hard_link(outside.join("secret"), root.join("etc/conf")).unwrap();
    let sentinel = Sentinel::take(&outside);
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root, &outside]);
    assert_converged(&img, &root, &out);
    sentinel.assert_content_and_metadata_unchanged("a file hard-linked into the root from here");
}

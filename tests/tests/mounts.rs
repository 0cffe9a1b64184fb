//! syncd never crosses a mount point, and a path it cannot handle does not stop the pass.

use std::fs;

use gis_tests::{
    build_fixture, converged_host, differences, require_root, scratch, sync, tree, Builder, Master, Sentinel,
    TmpfsMount,
};

#[test]
fn mount_point_in_the_root_is_left_alone() {
    require_root!();
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    build_fixture(&img);
    let proc_dir = root.join("proc");
    fs::create_dir(&proc_dir).unwrap();
    // Declared after the scratch dir, so it is unmounted before the dir is removed.
    let _mount = TmpfsMount::new(&proc_dir);
    Builder::new(&proc_dir).file("host-file", 0o600, b"belongs to the mounted filesystem\n").finish();
    let mounted = Sentinel::take(&proc_dir);
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    mounted.assert_unchanged("a tmpfs mounted at ROOT/proc");
    out.check(!out.stdout.contains("proc"), "paths at or beneath the mount point were itemized", &[&root]);
    let diffs: Vec<_> = differences(&img, &root).into_iter().filter(|d| !d.is_within("proc")).collect();
    out.check(diffs.is_empty(), format!("host differs outside the mount point:\n{}", tree::lines(&diffs)), &[&root]);

    let again = sync(&master, &root, &[]);
    again.expect_code(0, &[&root]);
    again.check(again.stdout.is_empty(), "a second pass itemized changes", &[&root]);
    mounted.assert_unchanged("a tmpfs mounted at ROOT/proc, after a second pass");
}

#[test]
fn one_bad_path_does_not_abort_the_pass() {
    require_root!();
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    build_fixture(&img);
    let master = Master::start(&img);
    converged_host(&master, &img, &root);

    // Other drift, which must all be repaired.
    fs::write(root.join("etc/hostname"), b"drifted\n").unwrap();
    fs::remove_file(root.join("usr/bin/tool")).unwrap();
    Builder::new(&root).mode("usr/lib/big.bin", 0o600).finish_without_mtimes();
    // A directory the image lacks, which cannot be deleted: a filesystem is mounted inside it.
    Builder::new(&root)
        .dir("extra/mnt", 0o755)
        .file("extra/file", 0o644, b"deletable\n")
        .file("extra/zzz", 0o644, b"deletable too\n")
        .finish_without_mtimes();
    let _mount = TmpfsMount::new(&root.join("extra/mnt"));
    Builder::new(&root.join("extra/mnt")).file("data", 0o600, b"on the mounted filesystem\n").finish();
    let mounted = Sentinel::take(&root.join("extra/mnt"));

    let out = sync(&master, &root, &[]);
    out.expect_code(1, &[&root]);
    out.check(
        out.stderr.lines().any(|l| l.starts_with("syncd: error: extra")),
        "stderr does not name `extra` in an error",
        &[&root],
    );
    mounted.assert_unchanged("a tmpfs mounted at ROOT/extra/mnt");
    let diffs: Vec<_> = differences(&img, &root).into_iter().filter(|d| !d.is_within("extra")).collect();
    out.check(
        diffs.is_empty(),
        format!("paths other than `extra` did not converge:\n{}", tree::lines(&diffs)),
        &[&root],
    );
}

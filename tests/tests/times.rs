//! Times that do not fit in an `i64` of nanoseconds (after 2262, before 1678) round-trip
//! exactly, with their nanoseconds, as do the old edge cases (pre-1970, 2038, 2106); a second
//! pass plans nothing (issue 23: a 2400 mtime used to arrive as 1901 and be planned forever).

use std::os::unix::fs::MetadataExt;

use gis_tests::{assert_converged, require_root, scratch, set_mtime_exact, sync, Builder, LoopExt4, Master};

/// (name, seconds, nanoseconds)
const TIMES: &[(&str, i64, i64)] = &[
    ("y2400", 13_569_465_600, 123_456_789), // 2400-01-01
    ("y2446", 15_032_385_000, 999_999_999), // near ext4's last second
    ("y1901", -2_147_483_648, 1),           // 1901-12-13, the 32-bit floor
    ("y1960", -315_619_200, 500_000_000),
    ("y2038", 2_147_483_648, 0),
    ("y2106", 4_294_967_296, 7),
    ("epoch", 0, 0),
];

#[test]
fn far_future_and_past_mtimes_round_trip_and_converge() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let mut b = Builder::new(&img);
    b.dir("d", 0o755);
    for (name, _, _) in TIMES {
        b.file(format!("d/{name}"), 0o644, name.as_bytes());
    }
    b.symlink("d/link", "y2400").dir("d/sub", 0o755);
    b.finish();
    for (name, sec, nsec) in TIMES {
        set_mtime_exact(&img.join("d").join(name), *sec, *nsec);
    }
    set_mtime_exact(&img.join("d/link"), 13_569_465_600, 42);
    set_mtime_exact(&img.join("d/sub"), -2_147_483_648, 3);
    set_mtime_exact(&img.join("d"), 15_032_385_535, 1);
    // The filesystem here must hold these times itself, or there is nothing to test.
    let md = std::fs::symlink_metadata(img.join("d/y2400")).unwrap();
    if (md.mtime(), md.mtime_nsec()) != (13_569_465_600, 123_456_789) {
        eprintln!("skipped: this filesystem cannot store a 2400 mtime (it stored {})", md.mtime());
        return;
    }
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    // Exactly as the image's filesystem stored each one (a filesystem clamps what it cannot
    // hold, the image's and the host's alike).
    for (name, _, _) in TIMES {
        let want = std::fs::symlink_metadata(img.join("d").join(name)).unwrap();
        let got = std::fs::symlink_metadata(root.join("d").join(name)).unwrap();
        out.check(
            (got.mtime(), got.mtime_nsec()) == (want.mtime(), want.mtime_nsec()),
            format!(
                "d/{name}: mtime {}.{:09}, the image's {}.{:09}",
                got.mtime(),
                got.mtime_nsec(),
                want.mtime(),
                want.mtime_nsec()
            ),
            &[&root],
        );
    }
    let again = sync(&master, &root, &[]);
    again.expect_code(0, &[&root]);
    again.check(again.stdout.is_empty(), "a second pass planned changes", &[&root]);
}

#[test]
fn a_time_the_host_filesystem_cannot_store_is_refused_not_planned_forever() {
    require_root!();
    let s = scratch();
    let img = s.dir("img");
    let mnt = s.dir("mnt");
    Builder::new(&img).dir("d", 0o755).file("d/y2400", 0o644, b"far").file("d/now", 0o644, b"near").finish();
    set_mtime_exact(&img.join("d/y2400"), 13_569_465_600, 5);
    // 128-byte inodes: this ext4 stores no time after 2038-01-19.
    let _fs = LoopExt4::with_mkfs_args(&s.join("disk.img"), &mnt, 64, &["-I", "128"]);
    let root = mnt.join("root");
    std::fs::create_dir(&root).unwrap();
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(1, &[&root]);
    out.check(
        out.stderr.contains("d/y2400")
            && out.stderr.contains("this filesystem cannot store the mtime 13569465600.000000005"),
        "the failure does not name the path and the time the filesystem could not store",
        &[&root],
    );
    out.check(
        std::fs::read(root.join("d/now")).is_ok_and(|c| c == b"near"),
        "the rest of the pass was not applied",
        &[&root],
    );
}

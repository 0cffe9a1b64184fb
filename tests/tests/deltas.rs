//! Deltas: a host at the previous image version is sent changed files as zstd deltas against
//! its old versions (same path, or a renamed file's old name), and converges exactly; a host
//! whose old file is not what the master diffed against is sent the whole object.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::Duration;

use gis_tests::{assert_converged, random_bytes, scratch, sync, wait_until, Master};

fn text(version: u32) -> String {
    (0..20_000).map(|i| format!("line {i}: {}\n", if i % 5000 == 7 { version } else { i % 89 })).collect()
}

fn library(version: u8) -> Vec<u8> {
    let mut b = random_bytes(42, 300_000);
    b[1000] = version;
    b[250_000] = version;
    b
}

fn add_version(images: &Path, n: u8) {
    let v = images.join(format!("v{n}"));
    fs::create_dir_all(v.join("etc")).unwrap();
    fs::create_dir_all(v.join("usr/lib")).unwrap();
    fs::write(v.join("etc/big.txt"), text(n.into())).unwrap();
    fs::write(v.join("etc/same"), b"the same in both versions\n").unwrap();
    fs::write(v.join(format!("usr/lib/libfoo.so.1.{n}")), library(n)).unwrap();
    fs::write(v.join("usr/lib/unrelated"), random_bytes(u64::from(n) + 100, 50_000)).unwrap();
}

fn publish(images: &Path, n: u8) {
    let tmp = images.join("current.new");
    std::os::unix::fs::symlink(format!("v{n}"), &tmp).unwrap();
    fs::rename(&tmp, images.join("current")).unwrap();
}

/// The "(X on the wire)" figure of a summary, in bytes.
fn wire_bytes(summary: &str) -> f64 {
    let (head, _) = summary.split_once(" on the wire").unwrap_or_else(|| panic!("no wire bytes in {summary:?}"));
    let (_, figure) = head.rsplit_once('(').unwrap();
    let (n, unit) = figure.split_once(' ').unwrap();
    let unit = ["B", "KiB", "MiB", "GiB"].iter().position(|u| *u == unit).unwrap();
    n.parse::<f64>().unwrap() * 1024f64.powi(unit as i32)
}

#[test]
fn a_host_at_the_previous_version_gets_deltas_and_converges() {
    let s = scratch();
    let images = s.dir("images");
    add_version(&images, 1);
    std::os::unix::fs::symlink("v1", images.join("current")).unwrap();
    let state = s.join("master-state");
    let args = ["--images", images.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--poll", "200ms"];
    let master = Master::start_with(&args.map(OsStr::new));
    let ready = |v: u32| {
        let log = master.stderr();
        log.lines().any(|l| l.contains("object cache ready") && l.contains(&format!("version={v} ")))
    };
    assert!(wait_until(Duration::from_secs(60), || ready(1)), "v1 never cached:\n{}", master.stderr());

    // Two hosts at v1; one of them has edited its copy of the library.
    let (root, edited) = (s.dir("root"), s.dir("edited"));
    for r in [&root, &edited] {
        sync(&master, r, &[]).expect_code(0, &[r]);
    }
    let mut lib = library(1);
    lib[5] ^= 0xff;
    fs::write(edited.join("usr/lib/libfoo.so.1.1"), &lib).unwrap();

    add_version(&images, 2);
    publish(&images, 2);
    assert!(wait_until(Duration::from_secs(60), || ready(2)), "v2 never cached:\n{}", master.stderr());
    let log = master.stderr();
    let line = log.lines().find(|l| l.contains("object cache ready") && l.contains("version=2 ")).unwrap();
    assert!(line.contains(" deltas=2 "), "expected deltas for big.txt and the renamed library: {line}");

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&images.join("v2"), &root, &out);
    let summary = out.summary();
    out.check(summary.contains("2 of them as deltas"), "the changed files did not come as deltas", &[&root]);
    // The unrelated file (50 kB, incompressible) comes whole; the two deltas are a few hundred
    // bytes each, against 300 kB and 160 kB of content.
    let wire = wire_bytes(summary);
    out.check(wire < 60_000.0, format!("{wire} bytes on the wire: the deltas were not used"), &[&root]);

    // The edited host offers a base the master never diffed against: the library comes whole,
    // and is still exactly right.
    let out = sync(&master, &edited, &[]);
    out.expect_code(0, &[&edited]);
    assert_converged(&images.join("v2"), &edited, &out);
    out.check(out.summary().contains("1 of them as deltas"), "only big.txt can come as a delta", &[&edited]);
    out.check(wire_bytes(out.summary()) > 300_000.0, "the library cannot have come as a delta", &[&edited]);
}

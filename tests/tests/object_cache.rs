//! The master's object cache: objects compressed once and served to every host, and the
//! per-request path when the cache is off.

use std::ffi::OsStr;
use std::time::Duration;

use gis_tests::{assert_converged, build_fixture, random_bytes, scratch, set_mtime_exact, sync, wait_until, Master};

#[test]
fn hosts_are_served_the_frames_compressed_once() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    let text: String = (0..40_000).map(|i| format!("line {i}: the quick brown fox {}\n", i % 97)).collect();
    std::fs::write(img.join("etc/big.txt"), &text).unwrap();
    // Already compressed (here: random bytes): zstd cannot shrink it, so it is sent raw.
    let noise = random_bytes(0x9e37_79b9, 96 * 1024);
    std::fs::write(img.join("usr/noise.gz"), &noise).unwrap();

    let master = Master::start_with(&[OsStr::new("--image"), img.as_os_str()]);
    assert!(
        wait_until(Duration::from_secs(60), || master.stderr().contains("object cache ready")),
        "the object cache never became ready:\n{}",
        master.stderr()
    );
    let log = master.stderr();
    let ready = log.lines().find(|l| l.contains("object cache ready")).unwrap();
    assert!(!ready.contains(" objects=0 "), "nothing was cached: {ready}");
    assert!(!ready.contains(" incompressible=0 "), "the noise file is not marked incompressible: {ready}");

    // Once its frame is stored, an object no longer depends on the image file: edit the file
    // (same size) and the host still gets the content the manifest names, from the frame.
    let mtime = {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(img.join("etc/big.txt")).unwrap();
        (md.mtime(), md.mtime_nsec())
    };
    let edited = text.replace("quick", "QUICK");
    assert_eq!(edited.len(), text.len());
    std::fs::write(img.join("etc/big.txt"), &edited).unwrap();
    let root = s.dir("root");
    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_eq!(std::fs::read_to_string(root.join("etc/big.txt")).unwrap(), text, "not served from the cache");
    assert_eq!(std::fs::read(root.join("usr/noise.gz")).unwrap(), noise, "the raw object arrived changed");
    std::fs::write(img.join("etc/big.txt"), &text).unwrap();
    set_mtime_exact(&img.join("etc/big.txt"), mtime.0, mtime.1);
    assert_converged(&img, &root, &out);
}

#[test]
fn with_the_cache_off_objects_are_compressed_per_request() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    let master =
        Master::start_with(&[OsStr::new("--image"), img.as_os_str(), OsStr::new("--cache-level"), OsStr::new("0")]);
    let root = s.dir("root");
    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    assert!(!master.stderr().contains("object cache ready"), "--cache-level 0 still filled a cache");
    // Per request, the image file is read (and checked) at send time.
    std::fs::write(img.join("etc/hostname"), b"edited-after-the-scan\n").unwrap();
    let root = s.dir("root2");
    let out = sync(&master, &root, &[]);
    out.expect_code(1, &[&root]);
    assert!(out.stderr.contains("etc/hostname"), "the failure does not name the path: {}", out.stderr);
}

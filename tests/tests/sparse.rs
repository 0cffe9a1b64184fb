//! Sparse files keep their holes (issue 23): a 128 MiB file with 12 KiB of data takes about
//! 12 KiB on the host, travels as about that much, and a second pass plans nothing; a file
//! that is all zeros but not sparse in the image stays allocated; the same content with other
//! holes is not drift.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use gis_tests::{assert_converged, random_bytes, scratch, sync, Builder, Master};

const SIZE: u64 = 128 << 20;

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The summary's "(N UNIT on the wire)", in bytes.
fn wire_bytes(summary: &str) -> f64 {
    let s = summary.split(" on the wire").next().unwrap();
    let s = &s[s.rfind('(').unwrap() + 1..];
    let (n, unit) = s.split_once(' ').unwrap();
    let m = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        _ => 1073741824.0,
    };
    n.parse::<f64>().unwrap() * m
}

#[test]
fn holes_stay_holes_and_travel_as_nothing() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    Builder::new(&img).dir("var", 0o755).dir("var/log", 0o755).finish_without_mtimes();
    let lastlog = img.join("var/log/lastlog");
    let f = File::create(&lastlog).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, at) in [0, SIZE / 2, SIZE - 4096].into_iter().enumerate() {
        f.write_all_at(&random_bytes(i as u64, 4096), at).unwrap();
    }
    drop(f);
    // Zeros, but allocated: a preallocated file stays so.
    let mut dense = vec![0u8; 1 << 20];
    dense[..5].copy_from_slice(b"dense");
    std::fs::write(img.join("var/log/dense"), &dense).unwrap();
    if allocated(&lastlog) >= 1 << 20 {
        eprintln!("skipped: this filesystem does not keep holes ({} bytes allocated)", allocated(&lastlog));
        return;
    }
    gis_tests::fixture::stamp_mtimes(&img);
    let master = Master::start(&img);

    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    let got = allocated(&root.join("var/log/lastlog"));
    out.check(got < 1 << 20, format!("lastlog takes {got} bytes on the host: its holes were written out"), &[&root]);
    let dense_got = allocated(&root.join("var/log/dense"));
    out.check(
        dense_got >= 1 << 20,
        format!("the dense file takes only {dense_got} bytes: it was made sparse"),
        &[&root],
    );
    let wire = wire_bytes(out.summary());
    out.check(wire < (1 << 20) as f64, format!("{wire} bytes on the wire for 12 KiB of data"), &[&root]);

    let again = sync(&master, &root, &[]);
    again.expect_code(0, &[&root]);
    again.check(again.stdout.is_empty(), "a second pass planned changes", &[&root]);

    // The same content with its holes filled is not drift.
    let content = std::fs::read(root.join("var/log/lastlog")).unwrap();
    let filled = root.join("var/log/lastlog");
    let mtime = std::fs::metadata(&filled).unwrap();
    std::fs::write(&filled, &content).unwrap();
    gis_tests::set_mtime_exact(&filled, mtime.mtime(), mtime.mtime_nsec());
    assert!(allocated(&filled) >= SIZE, "the test could not fill the holes");
    let after = sync(&master, &root, &[]);
    after.expect_code(0, &[&root]);
    after.check(after.stdout.is_empty(), "a file differing only in its holes was planned", &[&root]);
}

//! Large files as content-defined chunks (issue 25, part 4), against a real S3 server (s3s-fs):
//! the master stores a file at or above `--chunk-threshold` as chunks and a chunk index; a host
//! rebuilds it from the chunks its old version holds plus the chunks it fetches, verifies it
//! whole, and refuses a chunk whose content does not match its hash.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gis_tests::{
    assert_converged, build_fixture, cp_a, fleet_status, flip, random_bytes, store_sources, sync_env, wait_until,
    Master, S3Server,
};

const WAIT: Duration = Duration::from_secs(60);
/// The large file: chunked above the 1 MiB threshold the tests give the master.
const BIG: &str = "var/lib/disk.img";
const BIG_SIZE: usize = 20 << 20;

/// `1.5 MiB` → bytes.
fn bytes_of(s: &str) -> u64 {
    let (n, unit) = s.trim().split_once(' ').unwrap_or_else(|| panic!("{s:?}"));
    let n: f64 = n.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"));
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unit {other:?} in {s:?}"),
    };
    (n * mult) as u64
}

/// The summary's "N rebuilt from chunks: R chunks reused from the host, F fetched (B from the
/// store, I of chunk indexes)": (N, R, F, B, I).
fn chunk_counts(out: &gis_tests::Output) -> (u64, u64, u64, u64, u64) {
    let s = out.summary();
    let Some(i) = s.find(" rebuilt from chunks: ") else { return (0, 0, 0, 0, 0) };
    let n = s[..i].rsplit(' ').next().unwrap().parse().unwrap();
    let rest = &s[i + " rebuilt from chunks: ".len()..];
    let (r, rest) = rest.split_once(" chunks reused from the host, ").unwrap();
    let (f, rest) = rest.split_once(" fetched (").unwrap();
    let (b, rest) = rest.split_once(" from the store, ").unwrap();
    let (idx, _) = rest.split_once(" of chunk indexes)").unwrap();
    (n, r.parse().unwrap(), f.parse().unwrap(), bytes_of(b), bytes_of(idx))
}

/// A master of the fixture plus a 20 MiB incompressible file, chunked above 1 MiB, uploading
/// to `s3://bkt/fleet` on `s3`: (images dir, v1, master, the bucket's `fleet` dir).
fn chunk_master(s: &gis_tests::Scratch, s3: &S3Server) -> (PathBuf, PathBuf, Master, PathBuf) {
    let images = s.dir("images");
    let v1 = images.join("v1");
    std::fs::create_dir(&v1).unwrap();
    build_fixture(&v1);
    std::fs::create_dir_all(v1.join(BIG).parent().unwrap()).unwrap();
    std::fs::write(v1.join(BIG), random_bytes(25, BIG_SIZE)).unwrap();
    flip(&images, "v1");
    let fleet = s3.bucket("bkt").join("fleet");
    let state = s.join("mstate");
    let master = Master::with_store(
        &images,
        &state,
        "s3://bkt/fleet",
        &["--chunk-threshold", "1MiB", "--cache-level", "3"],
        &s3.env(),
    );
    (images, v1, master, fleet)
}

/// The chunk index of the file `content` in the store's `fleet` dir.
fn index_path(fleet: &Path, content: &[u8]) -> PathBuf {
    let hex = blake3::hash(content).to_hex().to_string();
    fleet.join("chunks").join(&hex[..2]).join(format!("{hex}.idx"))
}

/// The chunks an index lists: (blake3 hex, length).
fn index_chunks(idx: &[u8]) -> Vec<(String, u32)> {
    assert_eq!(&idx[..8], b"GISCHNK1");
    let count = u32::from_le_bytes(idx[60..64].try_into().unwrap()) as usize;
    assert_eq!(idx.len(), 64 + 36 * count);
    idx[64..]
        .chunks_exact(36)
        .map(|r| {
            (r[..32].iter().map(|b| format!("{b:02x}")).collect(), u32::from_le_bytes(r[32..].try_into().unwrap()))
        })
        .collect()
}

/// The stored object of chunk `hex` (either encoding).
fn chunk_object(fleet: &Path, hex: &str) -> PathBuf {
    let dir = fleet.join("objects").join(&hex[..2]);
    let raw = dir.join(format!("{hex}.raw"));
    if raw.exists() {
        raw
    } else {
        dir.join(format!("{hex}.zst"))
    }
}

/// v2 of the large file: 10 KiB inserted near the start, 1 MiB in the middle overwritten.
fn edited(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    new.splice(100_000..100_000, random_bytes(26, 10 << 10));
    let mid = new.len() / 2;
    new[mid..mid + (1 << 20)].copy_from_slice(&random_bytes(27, 1 << 20));
    new
}

#[test]
fn a_large_file_is_rebuilt_from_chunks_and_an_upgrade_fetches_little_more_than_the_change() {
    let s = gis_tests::scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (images, v1, master, fleet) = chunk_master(&s, &s3);
    let big1 = std::fs::read(v1.join(BIG)).unwrap();

    // Stored as chunks and an index, not whole; every chunk in the store and of its hash.
    let idx = std::fs::read(index_path(&fleet, &big1)).expect("no chunk index in the store");
    let chunks = index_chunks(&idx);
    assert!(chunks.len() > 100, "{} chunks for 20 MiB", chunks.len());
    assert_eq!(chunks.iter().map(|(_, l)| u64::from(*l)).sum::<u64>(), big1.len() as u64);
    let whole = blake3::hash(&big1).to_hex().to_string();
    assert!(!chunk_object(&fleet, &whole).exists(), "the large file is also stored whole");
    for (hex, _) in chunks.iter().take(5) {
        let data = std::fs::read(chunk_object(&fleet, hex)).unwrap();
        let data = if data.len() < 4 || data[..4] != [0x28, 0xb5, 0x2f, 0xfd] {
            data
        } else {
            zstd::decode_all(&data[..]).unwrap()
        };
        assert_eq!(&blake3::hash(&data).to_hex().to_string(), hex);
    }

    // Cold: every chunk fetched, none from the master.
    let root = s.dir("root");
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    // The fixture has one more file above 1 MiB.
    let (n, reused, fetched, _, idx_bytes) = chunk_counts(&out);
    assert_eq!((n, reused), (2, 0), "{}", out.summary());
    assert!(fetched > chunks.len() as u64 && idx_bytes > idx.len() as u64, "{}", out.summary());
    assert_eq!(store_sources(&out).1, 0, "{}", out.summary());

    // v2: 10 KiB inserted near the start, 1 MiB changed in the middle.
    let v2 = images.join("v2");
    cp_a(&v1, &v2);
    let big2 = edited(&big1);
    std::fs::write(v2.join(BIG), &big2).unwrap();
    flip(&images, "v2");
    assert!(wait_until(WAIT, || fleet_status(master.url())["image_version"] == 2), "{}", master.stderr());
    // The chunks' way: a host at v1 would otherwise take the file out of the solid delta, in a
    // segment of its own over its old version (store_deltas.rs checks that way).
    let no_solid = ["--object-store-solid", "false"];
    let out = sync_env(&master, &root, &no_solid, &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);
    assert_eq!(std::fs::read(root.join(BIG)).unwrap(), big2);
    let (n, reused, fetched, bytes, _) = chunk_counts(&out);
    let changed = (1u64 << 20) + (10 << 10);
    assert_eq!(n, 1, "{}", out.summary());
    assert!(bytes <= 2 * changed, "{bytes} bytes fetched for {changed} changed: {}", out.summary());
    assert!(reused > 100 && fetched < 40, "{}", out.summary());
    assert_eq!(store_sources(&out).1, 0, "{}", out.summary());

    // v3 renames it (as libLLVM-15.so becomes libLLVM-16.so) and changes 64 KiB: the gone file
    // most like it by name is the seed.
    let v3 = images.join("v3");
    cp_a(&v2, &v3);
    let mut big3 = big2.clone();
    big3[5 << 20..(5 << 20) + (64 << 10)].copy_from_slice(&random_bytes(29, 64 << 10));
    std::fs::remove_file(v3.join(BIG)).unwrap();
    std::fs::write(v3.join("var/lib/disk-2.img"), &big3).unwrap();
    flip(&images, "v3");
    assert!(wait_until(WAIT, || fleet_status(master.url())["image_version"] == 3), "{}", master.stderr());
    let out = sync_env(&master, &root, &no_solid, &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v3, &root, &out);
    let (n, reused, _, bytes, _) = chunk_counts(&out);
    assert_eq!(n, 1, "{}", out.summary());
    assert!(reused > 100 && bytes < 1 << 20, "{}", out.summary());
}

#[test]
fn a_corrupted_chunk_is_refused_and_the_file_comes_from_the_master_or_not_at_all() {
    let s = gis_tests::scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (_, v1, master, fleet) = chunk_master(&s, &s3);
    let big1 = std::fs::read(v1.join(BIG)).unwrap();
    let chunks = index_chunks(&std::fs::read(index_path(&fleet, &big1)).unwrap());
    // A chunk in the middle now holds other bytes of the same length, stored raw.
    let (hex, len) = &chunks[chunks.len() / 2];
    let stored = chunk_object(&fleet, hex);
    std::fs::remove_file(&stored).unwrap();
    let raw = stored.with_extension("raw");
    std::fs::write(&raw, random_bytes(28, *len as usize)).unwrap();

    // Fallback off: the pass fails (exit 3), and the file is not written, not even in part.
    let root = s.dir("root");
    let out = sync_env(&master, &root, &["--object-store-fallback", "false"], &s3.env());
    out.expect_code(3, &[&root]);
    assert!(out.stderr.contains(hex.as_str()) && out.stderr.contains("does not match its hash"), "{}", out.stderr);
    assert!(!root.join(BIG).exists(), "the large file was written from a bad chunk");
    for e in walkdir::WalkDir::new(&root).into_iter().map(|e| e.unwrap()) {
        assert!(!e.file_name().to_string_lossy().starts_with(".syncd-"), "temp file left: {}", e.path().display());
    }

    // Fallback on: the chunk is refused, the file comes whole from the master.
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    assert_eq!(std::fs::read(root.join(BIG)).unwrap(), big1);
    assert!(out.stderr.contains(hex.as_str()) && out.stderr.contains("does not match its hash"), "{}", out.stderr);
    let (_, from_master, after) = store_sources(&out);
    assert_eq!((from_master, after), (1, 1), "{}", out.summary());

    // A bad index: refused the same way.
    let root2 = s.dir("root2");
    std::fs::write(index_path(&fleet, &big1), b"GISCHNK1 not an index").unwrap();
    let out = sync_env(&master, &root2, &[], &s3.env());
    out.expect_code(0, &[&root2]);
    assert_converged(&v1, &root2, &out);
    assert!(out.stderr.contains("bad chunk index"), "{}", out.stderr);
    assert_eq!(store_sources(&out).2, 1, "{}", out.summary());
}

//! Deltas in the object store (issue 25, parts 1 and 3): the master uploads per-object deltas
//! against the previous version (`deltas/…`) and one solid delta per upgrade (`solid/…`);
//! an upgrading host fetches them from the store, verifies every object, and falls back to
//! whole objects (or the master) when a delta is missing, wrong or its base has drifted.
//! Against a real S3 server (s3s-fs, see [`gis_tests::S3Server`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use gis_tests::{
    assert_converged, build_fixture, cp_a, fleet_status, flip, random_bytes, scratch, sync_env, wait_until, Master,
    S3Server,
};

const WAIT: Duration = Duration::from_secs(120);

/// The number just before `label` in the summary line (0 when the label is absent).
fn count(out: &gis_tests::Output, label: &str) -> u64 {
    let s = out.summary();
    let Some(i) = s.find(label) else { return 0 };
    s[..i].rsplit([' ', '(', ',']).find(|w| !w.is_empty()).unwrap().parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The summary's "(X on the wire)", in bytes.
fn wire_bytes(out: &gis_tests::Output) -> f64 {
    let s = out.summary();
    let end = s.find(" on the wire)").unwrap_or_else(|| panic!("no wire bytes in {s}"));
    let start = s[..end].rfind('(').unwrap() + 1;
    let (n, unit) = s[start..end].split_once(' ').unwrap();
    let n: f64 = n.parse().unwrap();
    n * match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u} in {s}"),
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// Text that compresses, and whose versions differ a little: `n` lines, salted.
fn text(n: usize, salt: &str) -> String {
    (0..n).map(|i| format!("line {i} of a config or library file {}\n", if i % 97 == 0 { salt } else { "" })).collect()
}

/// v1 (the fixture and some files that change) and v2 (those files changed a little, one
/// renamed, one new), with a master uploading to `s3://bkt/fleet` that has published v1.
struct Upgrade {
    images: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    master: Master,
}

fn upgrade(s: &gis_tests::Scratch, s3: &S3Server, master_extra: &[&str]) -> Upgrade {
    let images = s.dir("images");
    let v1 = images.join("v1");
    std::fs::create_dir(&v1).unwrap();
    build_fixture(&v1);
    std::fs::create_dir_all(v1.join("usr/lib/app")).unwrap();
    for i in 0..6 {
        std::fs::write(v1.join(format!("usr/lib/app/mod{i}.txt")), text(3000 + i * 100, "one")).unwrap();
    }
    std::fs::write(v1.join("usr/lib/app/libfoo.so.1.2"), text(5000, "foo-1.2")).unwrap();
    let mut bin1 = random_bytes(21, 400 * 1024);
    std::fs::write(v1.join("usr/lib/app/blob.bin"), &bin1).unwrap();
    flip(&images, "v1");
    s3.bucket("bkt");
    let state = s.join("mstate");
    let extra: Vec<&str> = ["--cache-level", "3"].into_iter().chain(master_extra.iter().copied()).collect();
    let master = Master::with_store(&images, &state, "s3://bkt/fleet", &extra, &s3.env());
    let v2 = images.join("v2");
    cp_a(&v1, &v2);
    for i in 0..6 {
        std::fs::write(v2.join(format!("usr/lib/app/mod{i}.txt")), text(3000 + i * 100 + 7, "two")).unwrap();
    }
    std::fs::remove_file(v2.join("usr/lib/app/libfoo.so.1.2")).unwrap();
    std::fs::write(v2.join("usr/lib/app/libfoo.so.1.3"), text(5010, "foo-1.3")).unwrap();
    // Incompressible, but mostly the same as before: only a delta saves on it.
    bin1[1000..1100].copy_from_slice(&[7; 100]);
    std::fs::write(v2.join("usr/lib/app/blob.bin"), &bin1).unwrap();
    std::fs::write(v2.join("usr/lib/app/brand-new.txt"), text(2000, "new")).unwrap();
    Upgrade { images, v1, v2, master }
}

impl Upgrade {
    fn publish_v2(&self) {
        flip(&self.images, "v2");
        assert!(
            wait_until(WAIT, || fleet_status(self.master.url())["image_version"] == 2),
            "v2 never announced\n{}",
            self.master.stderr()
        );
    }
}

/// The changed files of [`upgrade`] that have a base in v1 (6 modules, the renamed library, the blob).
const WITH_BASE: u64 = 8;

#[test]
fn an_upgrade_through_the_store_fetches_deltas_and_converges() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let u = upgrade(&s, &s3, &[]);
    let root = s.dir("root");
    let out = sync_env(&u.master, &root, &["--object-store-solid", "false"], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&u.v1, &root, &out);
    let deltas_dir = s3.bucket("bkt").join("fleet/deltas");
    assert!(files(&deltas_dir).is_empty(), "deltas for a first version: {:?}", files(&deltas_dir));

    u.publish_v2();
    let deltas = files(&deltas_dir);
    assert_eq!(deltas.len() as u64, WITH_BASE, "{deltas:?}\n{}", u.master.stderr());
    for d in &deltas {
        let name = d.file_name().unwrap().to_str().unwrap();
        let (new, base) = name.strip_suffix(".zst").unwrap().split_once('-').unwrap();
        assert_eq!((new.len(), base.len()), (64, 64), "{name}");
        assert_eq!(d.parent().unwrap().file_name().unwrap().to_str().unwrap(), &new[..2], "{}", d.display());
    }
    let out = sync_env(&u.master, &root, &["--object-store-solid", "false"], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&u.v2, &root, &out);
    assert_eq!(count(&out, " of them as deltas"), WITH_BASE, "{}", out.summary());
    assert_eq!(count(&out, " from the master"), 0, "{}", out.summary());
    assert_eq!(count(&out, " from the object store"), WITH_BASE + 1, "{}", out.summary());

    // A master restarted on v2 puts no delta again (create-only, and listed first).
    let mtimes: Vec<_> = deltas.iter().map(|d| d.metadata().unwrap().modified().unwrap()).collect();
    drop(u.master);
    let again: Vec<_> = files(&deltas_dir).iter().map(|d| d.metadata().unwrap().modified().unwrap()).collect();
    assert_eq!(mtimes, again);
}

#[test]
fn a_corrupt_delta_in_the_store_is_refused_and_fetched_again() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let u = upgrade(&s, &s3, &[]);
    let root = s.dir("root");
    sync_env(&u.master, &root, &[], &s3.env()).expect_code(0, &[&root]);
    u.publish_v2();
    // The delta of mod0.txt decodes, but to other content (a frame of the wrong text).
    let new = std::fs::read(u.v2.join("usr/lib/app/mod0.txt")).unwrap();
    let hex = blake3::hash(&new).to_hex().to_string();
    let delta = files(&s3.bucket("bkt").join("fleet/deltas"))
        .into_iter()
        .find(|d| d.file_name().unwrap().to_str().unwrap().starts_with(&hex))
        .expect("no delta of mod0.txt");
    let mut wrong = new.clone();
    wrong[10] ^= 1;
    std::fs::write(&delta, zstd::encode_all(&wrong[..], 3).unwrap()).unwrap();
    let out = sync_env(&u.master, &root, &["--object-store-solid", "false"], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&u.v2, &root, &out);
    assert_eq!(std::fs::read(root.join("usr/lib/app/mod0.txt")).unwrap(), new);
    assert_eq!(count(&out, " refused from the store"), 1, "{}", out.summary());
    assert_eq!(count(&out, " from the master"), 1, "{}", out.summary());
    assert!(out.stderr.contains(&hex), "the refusal does not name the object:\n{}", out.stderr);
}

#[test]
fn a_host_at_the_previous_version_upgrades_through_the_solid_delta() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let u = upgrade(&s, &s3, &[]);
    let (root, per_object, drifted) = (s.dir("root"), s.dir("per-object"), s.dir("drifted"));
    for r in [&root, &per_object, &drifted] {
        sync_env(&u.master, r, &[], &s3.env()).expect_code(0, &[r]);
    }
    u.publish_v2();
    let solid = files(&s3.bucket("bkt").join("fleet/solid"));
    assert!(solid.iter().any(|f| f.ends_with("index")), "no solid index: {solid:?}\n{}", u.master.stderr());

    let out = sync_env(&u.master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&u.v2, &root, &out);
    let from_solid = count(&out, " through the solid delta");
    assert_eq!(from_solid, WITH_BASE + 1, "{}", out.summary());
    assert_eq!(count(&out, " from the master"), 0, "{}", out.summary());

    let out_po = sync_env(&u.master, &per_object, &["--object-store-solid", "false"], &s3.env());
    out_po.expect_code(0, &[&per_object]);
    assert_converged(&u.v2, &per_object, &out_po);
    assert_eq!(count(&out_po, " through the solid delta"), 0, "{}", out_po.summary());
    let (solid_wire, po_wire) = (wire_bytes(&out), wire_bytes(&out_po));
    assert!(solid_wire < po_wire * 0.8, "solid {solid_wire} bytes, per object {po_wire}");

    // A host whose base of one file drifted: its segment cannot be rebuilt, so its objects
    // come one by one, and the host still converges.
    std::fs::write(drifted.join("usr/lib/app/mod3.txt"), "local edit\n".repeat(100)).unwrap();
    let out = sync_env(&u.master, &drifted, &[], &s3.env());
    out.expect_code(0, &[&drifted]);
    assert_converged(&u.v2, &drifted, &out);
    assert_eq!(count(&out, " through the solid delta"), 0, "{}", out.summary());
    assert_eq!(count(&out, " from the master"), 0, "{}", out.summary());
}

/// apt's `Packages` list, in miniature but over the 16 MiB per-object delta limit: `n` stanzas,
/// each with a version and a hash that `changed` of them (every `changed`-th) bump.
fn packages(n: usize, every: usize, salt: &str) -> Vec<u8> {
    let mut out = String::with_capacity(n * 130);
    for i in 0..n {
        let v = if every > 0 && i % every == 0 { salt } else { "1" };
        let sum = blake3::hash(format!("{i}-{v}").as_bytes()).to_hex();
        out.push_str(&format!("Package: pkg-{i}\nVersion: {v}.{i}\nSHA256: {sum}\nSection: misc\n\n"));
    }
    out.into_bytes()
}

#[test]
fn a_large_renamed_file_comes_through_a_solid_segment_of_its_own() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let images = s.dir("images");
    let lists = "var/lib/apt/lists";
    let (v1, v2) = (images.join("v1"), images.join("v2"));
    std::fs::create_dir_all(v1.join(lists)).unwrap();
    let old = packages(150_000, 0, "");
    assert!(old.len() as u64 > 16 << 20, "{} bytes: not over the per-object delta limit", old.len());
    std::fs::write(v1.join(lists).join("deb_dists_one_main_Packages"), &old).unwrap();
    flip(&images, "v1");
    s3.bucket("bkt");
    let master = Master::with_store(&images, &s.join("mstate"), "s3://bkt/fleet", &["--cache-level", "3"], &s3.env());
    // A host installed at v1 by other means (no state from an earlier pass: syncd hashes the
    // old list itself to offer it as the base).
    let (root, damaged) = (s.join("root"), s.join("damaged"));
    cp_a(&v1, &root);
    cp_a(&v1, &damaged);

    // The next release renames the list and bumps one package in 20. The list grows, so no
    // host file has its size: syncd hashes the old list only as a base candidate.
    std::fs::create_dir_all(v2.join(lists)).unwrap();
    let new = packages(150_000, 20, "2.1");
    std::fs::write(v2.join(lists).join("deb_dists_two_main_Packages"), &new).unwrap();
    flip(&images, "v2");
    assert!(
        wait_until(WAIT, || fleet_status(master.url())["image_version"] == 2),
        "v2 never announced\n{}",
        master.stderr()
    );
    let segments = files(&s3.bucket("bkt").join("fleet/solid"));
    assert_eq!(segments.len(), 2, "an index and one segment: {segments:?}\n{}", master.stderr());

    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);
    assert_eq!(count(&out, " through the solid delta"), 1, "{}", out.summary());
    assert_eq!(count(&out, " from the master"), 0, "{}", out.summary());
    // Against its old name's content, the list costs a fraction of itself compressed.
    let whole = zstd::encode_all(&new[..], 3).unwrap().len() as f64;
    let wire = wire_bytes(&out);
    assert!(wire < whole / 4.0, "{wire} bytes on the wire, {whole} for the list compressed whole");

    // A segment that does not decode: the list comes from its chunks (it is not stored whole),
    // still from the store, and never from the master (the fallback is off).
    let segment = segments.iter().find(|f| !f.ends_with("index")).unwrap();
    let mut frame = std::fs::read(segment).unwrap();
    let mid = frame.len() / 2;
    frame[mid] ^= 0xff;
    std::fs::write(segment, &frame).unwrap();
    let out = sync_env(&master, &damaged, &["--object-store-fallback", "false"], &s3.env());
    out.expect_code(0, &[&damaged]);
    assert_converged(&v2, &damaged, &out);
    assert_eq!(count(&out, " through the solid delta"), 0, "{}", out.summary());
    assert_eq!(count(&out, " rebuilt from chunks"), 1, "{}", out.summary());
}

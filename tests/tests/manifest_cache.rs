//! The host's cached manifest: a no-change pass gets only the header from the master, a
//! damaged cache is never trusted, and a changed image is always received whole.

use std::fs;
use std::path::{Path, PathBuf};

use gis_tests::{assert_converged, build_fixture, scratch, sync, Builder, Master};

fn cache_files(state: &Path) -> Vec<PathBuf> {
    fs::read_dir(state)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("manifest-")))
                .collect()
        })
        .unwrap_or_default()
}

/// How many manifest requests the master answered with the header alone, and in all.
fn requests(master: &Master) -> (usize, usize) {
    let log = master.stderr();
    let all: Vec<&str> = log.lines().filter(|l| l.contains("manifest requested")).collect();
    (all.iter().filter(|l| l.contains("cached=true")).count(), all.len())
}

#[test]
fn a_no_change_pass_gets_only_the_header_and_a_damaged_cache_is_refetched() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let state = s.dir("state");
    let st = state.to_str().unwrap();
    build_fixture(&img);
    let master = Master::start(&img);

    // A dry run writes nothing to the state dir, not even the cache.
    sync(&master, &root, &["--dry-run", "--state-dir", st]).expect_code(0, &[&root]);
    assert!(cache_files(&state).is_empty(), "a dry run wrote {:?}", cache_files(&state));

    let out = sync(&master, &root, &["--state-dir", st]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    assert_eq!(cache_files(&state).len(), 1, "the first real pass caches the manifest");
    assert_eq!(requests(&master), (0, 2));

    let out = sync(&master, &root, &["--state-dir", st]);
    out.expect_code(0, &[&root]);
    out.check(out.lines().is_empty(), "a no-change pass changed something", &[&root]);
    assert_eq!(requests(&master), (1, 3), "the cached copy was offered and the master sent the header alone");

    // Damage the cache in the middle: the pass must notice, ask for the whole manifest and
    // still converge a drifted host.
    let cache = &cache_files(&state)[0];
    let mut bytes = fs::read(cache).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(cache, &bytes).unwrap();
    fs::write(root.join("etc/hostname"), b"drifted\n").unwrap();
    let out = sync(&master, &root, &["--state-dir", st]);
    out.expect_code(0, &[&root]);
    out.check(out.stderr.contains("manifest cache"), "no warning about the damaged cache", &[&root]);
    assert_converged(&img, &root, &out);
    assert_eq!(requests(&master), (2, 5), "header-only first, then the whole manifest");
    assert_ne!(fs::read(cache).unwrap(), bytes, "the damaged cache was replaced");
    let out = sync(&master, &root, &["--state-dir", st]);
    out.expect_code(0, &[&root]);
    assert_eq!(requests(&master), (3, 6), "the repaired cache is used again");
}

#[test]
fn a_new_image_is_received_whole_even_with_a_cache() {
    let s = scratch();
    let (v1, v2) = (s.dir("v1"), s.dir("v2"));
    let root = s.dir("root");
    let state = s.dir("state");
    let st = state.to_str().unwrap();
    for (dir, motd) in [(&v1, "one\n"), (&v2, "two\n")] {
        Builder::new(dir).dir("", 0o755).dir("etc", 0o755).file("etc/motd", 0o644, motd.as_bytes()).finish();
    }
    let master = Master::start(&v1);
    sync(&master, &root, &["--state-dir", st]).expect_code(0, &[&root]);
    drop(master);
    let master = Master::start_version(&v2, 2);
    let out = sync(&master, &root, &["--state-dir", st]);
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"two\n");
    assert_eq!(requests(&master), (0, 1), "a different identity is never answered from the cache");
}

#[test]
fn a_cached_pass_still_checks_the_hosts_exclusions_from_the_header() {
    // The header carries this host's exclusion lists, so a cached pass must still apply them.
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let state = s.dir("state");
    let st = state.to_str().unwrap();
    build_fixture(&img);
    let master = Master::start(&img);
    sync(&master, &root, &["--state-dir", st]).expect_code(0, &[&root]);
    let local = s.join("local.exclude");
    fs::write(&local, "/etc/hostname\n").unwrap();
    fs::write(root.join("etc/hostname"), b"local edit\n").unwrap();
    let out = sync(&master, &root, &["--state-dir", st, "--exclude-from", local.to_str().unwrap()]);
    out.expect_code(0, &[&root]);
    assert_eq!(requests(&master).0, 1, "the pass used the cache");
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"local edit\n", "an excluded path was touched");
}

/// The master packs a version's entries once and sends the same bytes to every host that asks
/// without a cached copy; each host converges through the same checks as batch by batch.
#[test]
fn the_master_packs_a_version_once_for_every_host() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    let master = Master::start(&img);
    for name in ["h1", "h2", "h3"] {
        let root = s.dir(name);
        let out = sync(&master, &root, &[]);
        out.expect_code(0, &[&root]);
        assert_converged(&img, &root, &out);
    }
    let log = master.stderr();
    let packed: Vec<&str> = log.lines().filter(|l| l.contains("manifest packed for hosts")).collect();
    assert_eq!(packed.len(), 1, "packed once for three hosts:\n{log}");
    assert!(!log.contains("manifest not packed"), "{log}");
    assert_eq!(requests(&master), (0, 3));
}

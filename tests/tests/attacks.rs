//! The attack suite: a hostile master (crafted manifests and objects, forged or stale
//! signatures), a hostile host tree, and hostile clients. Every case checks that nothing
//! outside the root changed (a sentinel tree hashed before and after) and that syncd said
//! clearly what it refused, with the documented exit code.
//!
//! Cases 3 (planted parent symlinks) and 5 (planted temp names) also have their own tests
//! in `safety.rs`; here they are run again under a live race (case 4).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gis_tests::fake::{self, FakeMaster, Image, Reply};
use gis_tests::{
    random_bytes, run_syncd, run_syncd_limited, scratch, sync, wait_until, Builder, Master, Output, Pki, Scratch,
    Sentinel,
};
use manifest::trust::SigningKey;

/// A host root and, beside it, an outside tree full of tempting targets.
struct Host {
    s: Scratch,
    root: PathBuf,
    outside: PathBuf,
}

impl Host {
    fn new() -> Host {
        let s = scratch();
        let root = s.dir("root");
        let outside = s.dir("outside");
        Builder::new(&outside)
            .dir("etc", 0o755)
            .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
            .file("passwd", 0o644, b"outside\n")
            .file("x", 0o644, b"outside x\n");
        Host { s, root, outside }
    }

    fn root(&self) -> &str {
        self.root.to_str().unwrap()
    }
}

fn syncd_against(url: &str, root: &str, extra: &[&str]) -> Output {
    let mut args = vec!["sync", "--master", url, "--root", root, "--insecure"];
    args.extend_from_slice(extra);
    run_syncd(args)
}

fn no_temp_files_under(root: &Path) -> bool {
    walkdir::WalkDir::new(root).into_iter().flatten().all(|e| !e.file_name().to_string_lossy().starts_with(".syncd-"))
}

// 1. Entry paths that escape, are not canonical, or repeat.
#[test]
fn hostile_entry_paths_are_refused_before_anything_is_written() {
    let h = Host::new();
    let long = "x".repeat(5000);
    let cases: Vec<(&str, Vec<gis_tests::fake::WireEntry>)> = vec![
        ("../x", vec![fake::file_entry(b"../x", b"pwned")]),
        ("/abs", vec![fake::file_entry(format!("{}/x", h.outside.display()).as_bytes(), b"pwned")]),
        ("a/../../x", vec![fake::dir_entry(b"a"), fake::file_entry(b"a/../../x", b"pwned")]),
        (".", vec![fake::file_entry(b".", b"pwned")]),
        ("empty", vec![fake::file_entry(b"", b"pwned")]),
        ("NUL", vec![fake::file_entry(b"a\0b", b"pwned")]),
        ("over-long", vec![fake::file_entry(long.as_bytes(), b"pwned")]),
        ("a//b", vec![fake::dir_entry(b"a"), fake::file_entry(b"a//b", b"pwned")]),
        ("duplicate", vec![fake::file_entry(b"a", b"one"), fake::file_entry(b"a", b"two")]),
    ];
    for (name, entries) in cases {
        let outside = Sentinel::take(&h.outside);
        let root = Sentinel::take(&h.root);
        let m = FakeMaster::start(fake::raw_manifest(entries), |_| Reply::Raw { size: 5, data: b"pwned".to_vec() });
        let out = syncd_against(m.url(), h.root(), &[]);
        out.expect_code(4, &[&h.root]);
        out.check(out.stderr.contains("manifest was rejected"), format!("{name}: no clear refusal"), &[]);
        outside.assert_unchanged(&format!("hostile path {name}"));
        root.assert_unchanged(&format!("hostile path {name} (the root)"));
    }
}

// 2. A symlink entry leading out, and a file beneath it, in both orders.
#[test]
fn a_file_beneath_a_symlink_entry_is_refused_in_either_order() {
    let h = Host::new();
    let abs = h.outside.to_str().unwrap().as_bytes().to_vec();
    for target in [abs.as_slice(), b"../../../../../../..", b"../outside"] {
        for reversed in [false, true] {
            let mut entries =
                vec![fake::symlink_entry(b"evil", target), fake::file_entry(b"evil/passwd", b"root::0:0::/:/bin/sh\n")];
            if reversed {
                entries.reverse();
            }
            let outside = Sentinel::take(&h.outside);
            let m = FakeMaster::start(fake::raw_manifest(entries), |_| Reply::Raw {
                size: 22,
                data: b"root::0:0::/:/bin/sh\n".to_vec(),
            });
            let out = syncd_against(m.url(), h.root(), &[]);
            out.expect_code(4, &[&h.root]);
            out.check(out.stderr.contains("evil"), "the refusal does not name the entry", &[]);
            outside.assert_unchanged("evil -> outside, evil/passwd");
            assert!(fs::symlink_metadata(h.root.join("evil")).is_err(), "evil was created");
        }
    }
}

// 4. A race: a parent directory is swapped for a symlink leading out, over and over, while
// syncd applies thousands of files into it.
#[test]
fn swapping_a_parent_for_a_symlink_mid_apply_never_escapes() {
    let h = Host::new();
    let img = h.s.dir("img");
    let mut b = Builder::new(&img);
    b.dir("d", 0o755).dir("d/sub", 0o755);
    for i in 0..3000 {
        b.file(format!("d/f{i:04}"), 0o644, format!("file {i}\n").as_bytes());
    }
    b.file("d/sub/passwd", 0o644, b"image passwd\n");
    let master = Master::start(&img);
    let outside = Sentinel::take(&h.outside);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, root, outside) = (stop.clone(), swaps.clone(), h.root.clone(), h.outside.clone());
        std::thread::spawn(move || {
            let (d, aside) = (root.join("d"), root.join("d.aside"));
            while !stop.load(Ordering::Relaxed) {
                if fs::rename(&d, &aside).is_ok() {
                    let _ = symlink(&outside, &d);
                    std::thread::sleep(Duration::from_micros(300));
                    let _ = fs::remove_file(&d);
                    let _ = fs::rename(&aside, &d);
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    // Several passes within a fixed budget; each may report failed paths, none may escape.
    let budget = std::time::Instant::now();
    let mut passes = 0;
    while budget.elapsed() < Duration::from_secs(15) && passes < 4 {
        let args: Vec<&OsStr> =
            ["sync", "-q", "--insecure", "--master", master.url(), "--root", h.root()].map(OsStr::new).to_vec();
        let (out, _) = run_syncd_limited(&args, Duration::from_secs(60));
        out.check([0, 1].contains(&out.code), "syncd neither converged nor reported failed paths", &[]);
        passes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(swaps.load(Ordering::Relaxed) > 10, "the race did not run (only {} swaps)", swaps.load(Ordering::Relaxed));
    outside.assert_unchanged("a parent swapped for a symlink during apply");
    // Once the race stops, a clean pass converges.
    let out = sync(&master, &h.root, &["-q"]);
    out.expect_code(0, &[&h.root]);
    assert_eq!(fs::read(h.root.join("d/sub/passwd")).unwrap(), b"image passwd\n");
}

/// An image with a good file and a bad one whose object the fake master corrupts.
fn bad_object_case(reply_for_bad: Reply) -> (Host, Output, u64) {
    let h = Host::new();
    let img = h.s.dir("img");
    let bad = random_bytes(11, 100 * 1024);
    Builder::new(&img).file("good", 0o644, b"good content\n").file("bad", 0o644, &bad);
    let image = Image::scan(&img, 1);
    let bad_hash = manifest::Hash::of(&bad);
    let honest = image.honest();
    let m =
        FakeMaster::start(
            image.messages(None),
            move |hash| {
                if *hash == bad_hash {
                    reply_for_bad.clone()
                } else {
                    honest(hash)
                }
            },
        );
    let outside = Sentinel::take(&h.outside);
    let args: Vec<&OsStr> = ["sync", "--insecure", "--master", m.url(), "--root", h.root()].map(OsStr::new).to_vec();
    let (out, rss) = run_syncd_limited(&args, Duration::from_secs(60));
    outside.assert_unchanged("a bad object");
    out.check(out.code != -2, "syncd did not finish: killed at the deadline", &[&h.root]);
    out.expect_code(1, &[&h.root]);
    out.check(out.stderr.contains("bad"), "the error does not name the path", &[]);
    assert_eq!(fs::read(h.root.join("good")).unwrap(), b"good content\n", "the good file was not applied");
    assert!(fs::symlink_metadata(h.root.join("bad")).is_err(), "bad content was renamed into place");
    assert!(no_temp_files_under(&h.root), "a temp file was left behind");
    (h, out, rss)
}

// 6. Objects that lie.
#[test]
fn an_object_that_does_not_match_its_hash_is_never_renamed_into_place() {
    let (_, out, _) = bad_object_case(Reply::Raw { size: 100 * 1024, data: vec![0u8; 100 * 1024] });
    out.check(out.stderr.contains("hash mismatch"), "no hash mismatch reported", &[]);
}

#[test]
fn an_object_longer_than_declared_is_cut_off() {
    let mut data = random_bytes(11, 100 * 1024);
    data.extend(vec![1u8; 1 << 20]);
    let (_, out, _) = bad_object_case(Reply::Raw { size: 100 * 1024, data });
    out.check(out.stderr.contains("declared size"), "no size refusal reported", &[]);
}

#[test]
fn an_endless_object_stream_is_cut_off() {
    // Cut off by whichever limit trips first: the declared size as it decodes, or the bytes
    // on the wire.
    let (_, out, _) = bad_object_case(Reply::Endless);
    let said = out.stderr.contains("endless data") || out.stderr.contains("exceeds its declared size");
    out.check(said, "no refusal of the endless object reported", &[]);
}

#[test]
fn a_decompression_bomb_costs_no_memory() {
    // 1 GiB of zeros in a zstd frame of a few tens of KiB, declared as 100 KiB.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let frame = enc.finish().unwrap();
    assert!(frame.len() < 1 << 20, "the bomb is not small: {} bytes", frame.len());
    let (_, out, rss_kib) = bad_object_case(Reply::Zstd { size: 100 * 1024, frame });
    out.check(out.stderr.contains("declared size"), "no size refusal reported", &[]);
    out.check(rss_kib < 200 * 1024, format!("syncd peaked at {rss_kib} KiB decoding a bomb"), &[]);
}

#[test]
fn a_delta_against_a_base_the_host_never_offered_is_refused() {
    // The host is empty, so it offers no base; the master sends a delta anyway (against
    // whatever base it names): it must be read to its end, refused, and the path reported.
    let frame = zstd::bulk::compress(&random_bytes(11, 100 * 1024), 3).unwrap();
    let (_, out, _) = bad_object_case(Reply::Delta { size: 100 * 1024, base: vec![7; 32], frame });
    out.check(out.stderr.contains("base is unusable"), "no refusal of the delta reported", &[]);
}

/// A signed image served by a fake master: (host, image, trusted key).
fn signed_setup() -> (Host, Image, SigningKey) {
    let h = Host::new();
    let img = h.s.dir("img");
    Builder::new(&img).dir("etc", 0o755).file("etc/motd", 0o644, b"signed\n");
    (h, Image::scan(&img, 5), SigningKey::generate())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

// 7. Rollback, freeze, tampering, unknown keys.
#[test]
fn forged_stale_and_rolled_back_manifests_are_refused_before_any_write() {
    let (h, mut image, key) = signed_setup();
    let state = h.s.join("state");
    let trusted = key.public().to_string();
    let serve = |image: &Image, sig: Option<manifest::trust::VersionSignature>| {
        FakeMaster::start(image.messages(sig.as_ref()), image.honest())
    };
    let run = |m: &FakeMaster, extra: &[&str]| {
        let mut a = vec!["--trusted-key", trusted.as_str(), "--state-dir", state.to_str().unwrap()];
        a.extend_from_slice(extra);
        syncd_against(m.url(), h.root(), &a)
    };
    let id = image.manifest.identity();

    // The honest case: v5, signed, valid for an hour.
    let m = serve(&image, Some(key.sign(&id, 5, now() + 3600)));
    run(&m, &[]).expect_code(0, &[&h.root]);
    assert_eq!(fs::read(h.root.join("etc/motd")).unwrap(), b"signed\n");
    fs::write(h.root.join("etc/motd"), b"host edit\n").unwrap();
    let before = Sentinel::take(&h.root);
    let outside = Sentinel::take(&h.outside);

    let refused = |m: FakeMaster, code: i32, says: &str, what: &str| {
        let out = run(&m, &[]);
        out.expect_code(code, &[&h.root]);
        out.check(out.stderr.contains(says), format!("{what}: stderr does not say {says:?}"), &[]);
        before.assert_unchanged(what);
        outside.assert_unchanged(what);
    };
    refused(serve(&image, None), 4, "not signed", "an unsigned manifest");
    refused(serve(&image, Some(SigningKey::generate().sign(&id, 5, now() + 3600))), 4, "not among", "an unknown key");
    refused(
        serve(&image, Some(key.sign(&id, 6, now() + 3600))),
        4,
        "does not verify",
        "a signature for another version",
    );
    refused(serve(&image, Some(key.sign(&id, 5, now() - 10))), 6, "expired", "an expired signature (freeze)");
    // A tampered tree under an honest signature: one entry's mode changed after signing.
    let mut tampered = Image::scan(&h.s.join("img"), 5);
    let sig = key.sign(&tampered.manifest.identity(), 5, now() + 3600);
    tampered.manifest.entries[0].meta.mode ^= 0o022;
    refused(serve(&tampered, Some(sig)), 4, "does not verify", "a tampered manifest");

    // A replayed older signed version: a rollback. Refused even across restarts (a new
    // process each run), until the operator asks for it by name.
    image.manifest.version = 4;
    let old = key.sign(&id, 4, now() + 3600);
    refused(serve(&image, Some(old.clone())), 4, "rollback", "a replayed older version");
    let out = run(&serve(&image, Some(old)), &["--allow-downgrade"]);
    out.expect_code(0, &[&h.root]);
    assert_eq!(fs::read(h.root.join("etc/motd")).unwrap(), b"signed\n");
    outside.assert_unchanged("a deliberate downgrade");
}

#[test]
fn the_real_master_signs_and_the_host_checks() {
    let (h, _, _) = signed_setup();
    let key_file = h.s.join("signing.key");
    let out = Command::new(gis_tests::bin("syncmaster")).args(["keygen", "--out"]).arg(&key_file).output().unwrap();
    assert!(out.status.success());
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let master = Master::start_with(&[
        OsStr::new("--image"),
        h.s.join("img").as_os_str(),
        OsStr::new("--signing-key"),
        key_file.as_os_str(),
    ]);
    let state = h.s.join("state");
    let st = state.to_str().unwrap();
    let other = SigningKey::generate().public().to_string();
    let out = sync(&master, &h.root, &["--trusted-key", &other, "--state-dir", st]);
    out.expect_code(4, &[&h.root]);
    assert!(fs::read_dir(&h.root).unwrap().next().is_none(), "a refused pass wrote to the root");
    let out = sync(&master, &h.root, &["--trusted-key", &public, "--state-dir", st]);
    out.expect_code(0, &[&h.root]);
    assert_eq!(fs::read(h.root.join("etc/motd")).unwrap(), b"signed\n");
    // The host now holds the manifest in its cache, and the master answers the next pass
    // with the signed header alone: that header is checked just the same.
    let out = sync(&master, &h.root, &["--trusted-key", &public, "--state-dir", st]);
    out.expect_code(0, &[&h.root]);
    assert!(
        wait_until(Duration::from_secs(5), || master.stderr().contains("cached=true")),
        "the no-change pass did not use the cache"
    );
    drop(master);
    let rogue_key = h.s.join("rogue.key");
    let out = Command::new(gis_tests::bin("syncmaster")).args(["keygen", "--out"]).arg(&rogue_key).output().unwrap();
    assert!(out.status.success());
    let rogue = Master::start_with(&[
        OsStr::new("--image"),
        h.s.join("img").as_os_str(),
        OsStr::new("--signing-key"),
        rogue_key.as_os_str(),
    ]);
    let out = sync(&rogue, &h.root, &["--trusted-key", &public, "--state-dir", st]);
    out.expect_code(4, &[&h.root]);
    assert!(
        wait_until(Duration::from_secs(5), || rogue.stderr().contains("cached=true")),
        "the rogue master was not offered the cached identity"
    );
}

// 8. Client certificates: from another CA, expired, and one host asking as another.
#[test]
fn mtls_gives_each_host_only_its_own_entry_and_refuses_strangers() {
    let h = Host::new();
    let Some(pki) = Pki::new(&h.s) else { return };
    let img = h.s.dir("img");
    Builder::new(&img).dir("etc", 0o755).file("etc/hostname", 0o644, b"golden\n").file("etc/motd", 0o644, b"hi\n");
    let hosts = h.s.join("hosts.toml");
    fs::write(&hosts, "[hosts.web01]\nexclude = [\"/etc/hostname\"]\n").unwrap();
    let master = Master::start_with(&[
        OsStr::new("--image"),
        img.as_os_str(),
        OsStr::new("--hosts"),
        hosts.as_os_str(),
        OsStr::new("--tls-cert"),
        OsStr::new(&pki.path("master.pem")),
        OsStr::new("--tls-key"),
        OsStr::new(&pki.path("master.key")),
        OsStr::new("--client-ca"),
        OsStr::new(&pki.path("ca.pem")),
        OsStr::new("--operator"),
        OsStr::new("admin"),
    ]);
    let url = master.https_url();
    let tls_sync = |root: &Path, cert: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["sync", "--master", &url, "--root"].map(str::to_owned).to_vec();
        args.push(root.to_string_lossy().into_owned());
        args.extend(pki.client(cert));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--insecure".into()); // unsigned manifests only: the transport is TLS (https)
        run_syncd(args)
    };

    // web01, as itself: its own exclusions apply (its hostname survives).
    fs::create_dir(h.root.join("etc")).unwrap();
    fs::write(h.root.join("etc/hostname"), b"web01\n").unwrap();
    let out = tls_sync(&h.root, "web01", &[]);
    out.expect_code(0, &[&h.root]);
    assert_eq!(fs::read(h.root.join("etc/hostname")).unwrap(), b"web01\n", "web01's exclusion was not applied");

    // db01's certificate gets db01's entry (none): its hostname is converged.
    let db = h.s.dir("db01");
    fs::create_dir(db.join("etc")).unwrap();
    fs::write(db.join("etc/hostname"), b"db01\n").unwrap();
    tls_sync(&db, "db01", &[]).expect_code(0, &[&db]);
    assert_eq!(fs::read(db.join("etc/hostname")).unwrap(), b"golden\n");

    // db01's certificate asking for web01's entry is refused by name.
    let out = tls_sync(&db, "db01", &["--host-id", "web01"]);
    out.expect_code(2, &[&db]);
    out.check(out.stderr.contains("may not act as host \"web01\""), "no clear refusal of the impersonation", &[]);

    // Certificates the master must not accept: another CA's, an expired one. Plain TCP to a
    // TLS master fails too. None of them gets anything.
    let outside = Sentinel::take(&h.outside);
    for (cert, what) in [("web01-evil", "a certificate from another CA"), ("web01-expired", "an expired certificate")] {
        let fresh = h.s.dir(cert);
        let out = tls_sync(&fresh, cert, &[]);
        out.expect_code(3, &[&fresh]);
        out.check(fs::read_dir(&fresh).unwrap().next().is_none(), format!("{what}: something was written"), &[]);
    }
    let fresh = h.s.dir("plain");
    let out = sync(&master, &fresh, &[]);
    out.expect_code(3, &[&fresh]);
    outside.assert_unchanged("refused clients");

    // The fleet view files reports under the certificate's name.
    let status = Command::new(gis_tests::bin("syncmaster"))
        .args(["status", "--master", &url, "--format", "json"])
        .args(pki.client("web01"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let names: Vec<&str> = v["hosts"].as_array().unwrap().iter().map(|h| h["host_id"].as_str().unwrap()).collect();
    assert!(names.contains(&"web01") && names.contains(&"db01"), "hosts seen: {names:?}");

    // Reading the rollout is open to every certificate of the CA; steering it only to the
    // certificates named by --operator, and the master logs the certificate's name as the
    // caller. A host's certificate is refused (a compromised canary must not resume past its
    // own failure); the operator's `resume` with no rollout is refused too, changing nothing;
    // another CA's certificate gets nowhere (exit 3).
    let rollout = |cert: &str, action: &str| {
        Command::new(gis_tests::bin("syncmaster"))
            .args(["rollout", action, "--master", &url])
            .args(pki.client(cert))
            .output()
            .unwrap()
    };
    let out = rollout("web01", "resume");
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an operator"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rollout("admin", "resume");
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rollout"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        wait_until(Duration::from_secs(5), || master.stderr().contains("caller=admin")),
        "the operator's certificate name is not logged:\n{}",
        master.stderr()
    );
    let out = rollout("web01-evil", "abort");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = rollout("web01", "status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no rollout yet"));
}

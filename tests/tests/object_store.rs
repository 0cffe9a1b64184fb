//! Objects in an object store (issue 25, part 1): the master uploads every object of a version,
//! create-only and content-addressed, before it announces the version; a restart uploads
//! nothing twice. Against a real S3 server (s3s-fs, see [`gis_tests::S3Server`]) and a
//! `file://` directory.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use gis_tests::{
    assert_converged, bin, build_fixture, cp_a, fleet_status, flip, random_bytes, scratch, store_sources, sync,
    sync_env, wait_until, Master, S3Server,
};

const WAIT: Duration = Duration::from_secs(60);

/// The distinct content hashes (hex) of the regular files under `dir`.
fn hashes(dir: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| blake3::hash(&std::fs::read(e.path()).unwrap()).to_hex().to_string())
        .collect()
}

/// Every object file under `objects` (the store's `PREFIX/objects`), by hash, with its mtime.
fn stored(objects: &Path) -> BTreeMap<String, (PathBuf, SystemTime)> {
    let mut out = BTreeMap::new();
    if !objects.exists() {
        return out;
    }
    for e in walkdir::WalkDir::new(objects).into_iter().map(|e| e.unwrap()).filter(|e| e.file_type().is_file()) {
        let name = e.file_name().to_str().unwrap().to_owned();
        let (hex, _) = name.rsplit_once('.').unwrap_or_else(|| panic!("{name}: no suffix"));
        let prev = out.insert(hex.to_owned(), (e.path().to_owned(), e.metadata().unwrap().modified().unwrap()));
        assert!(prev.is_none(), "{hex} is stored twice (as .zst and .raw)");
    }
    out
}

/// Checks that every hash of `want` is stored under `objects/<ab>/<hex>.zst|.raw` and decodes to
/// content with that hash.
fn check_stored(objects: &Path, want: &BTreeSet<String>) {
    let have = stored(objects);
    for hex in want {
        let (path, _) =
            have.get(hex).unwrap_or_else(|| panic!("object {hex} is not in the store {}", objects.display()));
        assert_eq!(path.parent().unwrap().file_name().unwrap().to_str().unwrap(), &hex[..2], "{}", path.display());
        let bytes = std::fs::read(path).unwrap();
        let content = match path.extension().and_then(OsStr::to_str) {
            Some("zst") => {
                zstd::decode_all(&bytes[..]).unwrap_or_else(|e| panic!("{}: not a zstd frame: {e}", path.display()))
            }
            Some("raw") => bytes,
            other => panic!("{}: unknown encoding {other:?}", path.display()),
        };
        assert_eq!(blake3::hash(&content).to_hex().as_str(), hex, "{} decodes to other content", path.display());
    }
}

/// The numbers of the master's summary line for `version`: (uploaded, already present).
fn summary(log: &str, version: u64) -> Option<(u64, u64)> {
    let needle = format!("object store: version {version} uploaded ");
    let line = log.lines().rfind(|l| l.contains(&needle))?;
    let rest = &line[line.find(&needle)? + needle.len()..];
    let (up, rest) = rest.split_once(", already present ")?;
    let present = rest.split(',').next()?;
    Some((up.parse().ok()?, present.parse().ok()?))
}

/// The `object_store_url` of the manifest header the master at `url` sends.
fn header_store_url(url: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = proto::v1::image_sync_client::ImageSyncClient::connect(url.to_owned()).await.unwrap();
        let req = proto::v1::ManifestRequest { host_id: "probe".into(), ..Default::default() };
        let mut stream = c.get_manifest(req).await.unwrap().into_inner();
        match stream.message().await.unwrap().and_then(|m| m.msg) {
            Some(proto::v1::manifest_message::Msg::Header(h)) => h.object_store_url,
            other => panic!("the first message is not a header: {other:?}"),
        }
    })
}

#[test]
fn s3_publish_uploads_every_object_once_before_announcing_and_a_restart_uploads_nothing() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let objects = s3.bucket("golden-bucket").join("fleet/objects");
    let images = s.dir("images");
    let v1 = images.join("v1");
    std::fs::create_dir(&v1).unwrap();
    build_fixture(&v1);
    let text: String = (0..20_000).map(|i| format!("line {i}: the quick brown fox\n")).collect();
    std::fs::write(v1.join("etc/big.txt"), &text).unwrap();
    std::fs::write(v1.join("usr/noise.gz"), random_bytes(7, 64 * 1024)).unwrap();
    flip(&images, "v1");
    let state = s.join("state");
    let start = || {
        Master::with_store(&images, &state, "s3://golden-bucket/fleet", &["--object-store-concurrency", "4"], &s3.env())
    };

    // (1) Ready means every object of v1 is in the bucket, under its key, decoding to itself.
    let master = start();
    let want1 = hashes(&v1);
    check_stored(&objects, &want1);
    assert_eq!(stored(&objects).len(), want1.len(), "objects beyond v1's in the store");
    assert_eq!(summary(&master.stderr(), 1), Some((want1.len() as u64, 0)), "{}", master.stderr());
    assert!(stored(&objects).values().any(|(p, _)| p.extension() == Some(OsStr::new("zst"))));
    assert!(stored(&objects).values().any(|(p, _)| p.extension() == Some(OsStr::new("raw"))));

    // (2) v2 shares most files: only its new objects are put, and it is announced after.
    let v2 = images.join("v2");
    cp_a(&v1, &v2);
    std::fs::write(v2.join("etc/motd"), b"version 2\n").unwrap();
    std::fs::write(v2.join("etc/big.txt"), text.replace("fox", "dog")).unwrap();
    std::fs::write(v2.join("usr/new.bin"), random_bytes(8, 10_000)).unwrap();
    let want2 = hashes(&v2);
    let new: BTreeSet<_> = want2.difference(&want1).cloned().collect();
    assert!(new.len() >= 3, "{new:?}");
    flip(&images, "v2");
    assert!(
        wait_until(WAIT, || fleet_status(master.url())["image_version"] == 2),
        "v2 never announced\n{}",
        master.stderr()
    );
    // Announced, so every object of v2 is already in the store.
    check_stored(&objects, &want2);
    let log = master.stderr();
    assert_eq!(summary(&log, 2), Some((new.len() as u64, (want2.len() - new.len()) as u64)), "{log}");
    let uploaded_at = log.find("object store: version 2 uploaded").unwrap();
    let published_at = log.find("published a new version").expect("no publish line");
    assert!(uploaded_at < published_at, "v2 was published before its upload finished:\n{log}");
    assert_eq!(stored(&objects).len(), want1.union(&want2).count(), "a PUT too many");
    let root = s.dir("root");
    let out = sync(&master, &root, &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&v2, &root, &out);

    // (3) A restart puts nothing: same objects, untouched.
    let before = stored(&objects);
    drop(master);
    let master = start();
    assert_eq!(summary(&master.stderr(), 2), Some((0, want2.len() as u64)), "{}", master.stderr());
    assert_eq!(stored(&objects), before, "a restart rewrote or added objects");
    assert_eq!(fleet_status(master.url())["image_version"], 2);
    // The header names the store (by default the --object-store URL).
    assert_eq!(header_store_url(master.url()), "s3://golden-bucket/fleet");
}

#[test]
fn a_file_store_gets_the_same_layout() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    let store = s.dir("store");
    let url = format!("file://{}", store.display());
    let args = [OsStr::new("--image"), img.as_os_str(), OsStr::new("--object-store"), OsStr::new(&url)];
    let public = [OsStr::new("--object-store-public-url"), OsStr::new("https://objects.example/golden")];
    let master = Master::start_with(&[&args[..], &public[..]].concat());
    let want = hashes(&img);
    check_stored(&store.join("objects"), &want);
    assert_eq!(summary(&master.stderr(), 1), Some((want.len() as u64, 0)), "{}", master.stderr());
    assert_eq!(header_store_url(master.url()), "https://objects.example/golden");
    drop(master);
    let master = Master::start_with(&args);
    assert_eq!(summary(&master.stderr(), 1), Some((0, want.len() as u64)), "{}", master.stderr());
}

/// `syncmaster serve` with a bad store: (exit code, stdout, stderr).
fn refused(img: &Path, url: &str, env: &[(&str, String)], remove: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin("syncmaster"));
    cmd.args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--image"])
        .arg(img)
        .args(["--object-store", url])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    for k in remove {
        cmd.env_remove(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_stores_are_refused_at_start_naming_the_url() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    let (code, stdout, stderr) = refused(&img, "s4://x", &[], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("s4://x") && stderr.contains("s3://BUCKET/PREFIX"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");

    let s3 = S3Server::require(&s.dir("s3"));
    let (code, stdout, stderr) = refused(&img, "s3://no-such-bucket/p", &s3.env(), &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("s3://no-such-bucket/p") && stderr.contains("bucket does not exist"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");

    // Nothing listening at the endpoint: the store is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut env = s3.env();
    env[0].1 = format!("http://{closed}");
    let (code, stdout, stderr) = refused(&img, "s3://b/p", &env, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("s3://b/p") && stderr.contains("unreachable"), "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");

    s3.bucket("b");
    let (code, _, stderr) = refused(&img, "s3://b/p", &s3.env(), &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("s3://b/p") && stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");

    let (code, _, stderr) = refused(&img, "file:///no/such/dir", &[], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("file:///no/such/dir"), "{stderr}");
}

#[test]
fn a_version_whose_upload_fails_is_not_announced_until_it_succeeds() {
    let s = scratch();
    let s3_dir = s.dir("s3");
    let s3 = S3Server::require(&s3_dir);
    let objects = s3.bucket("bkt").join("objects");
    let (env, port) = (s3.env(), s3.port());
    let images = s.dir("images");
    let v1 = images.join("v1");
    std::fs::create_dir(&v1).unwrap();
    build_fixture(&v1);
    flip(&images, "v1");
    let state = s.join("state");
    let master = Master::with_store(&images, &state, "s3://bkt", &[], &env);
    check_stored(&objects, &hashes(&v1));

    // The store goes away; v2 is flipped in but stays unannounced.
    drop(s3);
    let v2 = images.join("v2");
    cp_a(&v1, &v2);
    std::fs::write(v2.join("etc/motd"), b"version 2\n").unwrap();
    flip(&images, "v2");
    assert!(
        wait_until(WAIT, || master.stderr().contains("until its objects are in the object store")),
        "a failed upload is not logged\n{}",
        master.stderr()
    );
    assert_eq!(fleet_status(master.url())["image_version"], 1, "v2 announced without its objects");

    // The store comes back: the next poll uploads and announces v2.
    let _s3 = S3Server::start_at(&s3_dir, port).unwrap();
    assert!(
        wait_until(WAIT, || fleet_status(master.url())["image_version"] == 2),
        "v2 never announced once the store was back\n{}",
        master.stderr()
    );
    check_stored(&objects, &hashes(&v2));
}

// Issue 25, part 2: hosts fetch objects from the store, falling back to the master.

/// A master of one image (the fixture, a large compressible file and an incompressible one)
/// uploading to `s3://bkt/fleet` on `s3`, with `extra` flags.
fn store_master(s: &gis_tests::Scratch, s3: &S3Server, extra: &[&str]) -> (PathBuf, PathBuf, Master) {
    let images = s.dir("images");
    let v1 = images.join("v1");
    std::fs::create_dir(&v1).unwrap();
    build_fixture(&v1);
    let text: String = (0..20_000).map(|i| format!("line {i}: the quick brown fox\n")).collect();
    std::fs::write(v1.join("etc/big.txt"), text).unwrap();
    std::fs::write(v1.join("usr/noise.gz"), random_bytes(9, 300 * 1024)).unwrap();
    flip(&images, "v1");
    s3.bucket("bkt");
    let state = s.join("mstate");
    let master = Master::with_store(&images, &state, "s3://bkt/fleet", extra, &s3.env());
    (images, v1, master)
}

#[test]
fn a_host_fetches_every_object_from_the_store_and_none_from_the_master() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (_, v1, master) = store_master(&s, &s3, &[]);
    let root = s.dir("root");
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, after) = store_sources(&out);
    assert!(store >= 3, "{}", out.summary());
    assert_eq!((from_master, after), (0, 0), "{}", out.summary());
    // `none` on the host: every object from the master.
    let root2 = s.dir("root2");
    let out = sync_env(&master, &root2, &["--object-store", "none"], &s3.env());
    out.expect_code(0, &[&root2]);
    assert_converged(&v1, &root2, &out);
    assert!(!out.summary().contains("object store"), "{}", out.summary());
}

#[test]
fn a_stopped_store_falls_back_to_the_master() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (_, v1, master) = store_master(&s, &s3, &[]);
    let env = s3.env();
    drop(s3);
    let root = s.dir("root");
    let out = sync_env(&master, &root, &["--rpc-timeout", "5s"], &env);
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, after) = store_sources(&out);
    assert_eq!(store, 0, "{}", out.summary());
    assert!(from_master >= 3 && after == from_master, "{}", out.summary());
    assert!(out.stderr.contains("object store s3://bkt/fleet"), "the failure is not logged:\n{}", out.stderr);
}

#[test]
fn a_stopped_store_without_fallback_exits_3_and_leaves_old_or_new_files() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (images, v1, master) = store_master(&s, &s3, &[]);
    let root = s.dir("root");
    sync_env(&master, &root, &[], &s3.env()).expect_code(0, &[&root]);
    // v2 changes some files; announced once its objects are in the store.
    let v2 = images.join("v2");
    cp_a(&v1, &v2);
    std::fs::write(v2.join("etc/motd"), b"version 2\n").unwrap();
    std::fs::write(v2.join("etc/big.txt"), "changed\n".repeat(5000)).unwrap();
    std::fs::write(v2.join("usr/new.bin"), random_bytes(10, 100_000)).unwrap();
    flip(&images, "v2");
    assert!(wait_until(WAIT, || fleet_status(master.url())["image_version"] == 2), "{}", master.stderr());
    let env = s3.env();
    drop(s3);
    let out = sync_env(&master, &root, &["--object-store-fallback", "false", "--rpc-timeout", "5s"], &env);
    out.expect_code(3, &[&root]);
    assert!(out.stderr.contains("s3://bkt/fleet"), "the error does not name the store:\n{}", out.stderr);
    for e in walkdir::WalkDir::new(&root).into_iter().map(|e| e.unwrap()) {
        let name = e.file_name().to_string_lossy();
        assert!(!name.starts_with(".syncd-"), "temp file left: {}", e.path().display());
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(&root).unwrap();
            let have = std::fs::read(e.path()).unwrap();
            let old = std::fs::read(v1.join(rel)).ok();
            let new = std::fs::read(v2.join(rel)).ok();
            assert!(
                Some(&have) == old.as_ref() || Some(&have) == new.as_ref(),
                "{} is neither old nor new",
                rel.display()
            );
        }
    }
}

#[test]
fn a_wrong_object_in_the_store_is_refused_and_fetched_from_the_master() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    // No packs: every object is read loose (tests/tests/object_store_packs.rs corrupts a pack).
    let (_, v1, master) = store_master(&s, &s3, &["--pack-max-object", "0"]);
    // Overwrite big.txt's object with another valid object of the same size.
    let content = std::fs::read(v1.join("etc/big.txt")).unwrap();
    let hex = blake3::hash(&content).to_hex().to_string();
    let dir = s3.bucket("bkt").join("fleet/objects").join(&hex[..2]);
    let mut other = content.clone();
    other[0] ^= 1;
    let zst = dir.join(format!("{hex}.zst"));
    if zst.exists() {
        std::fs::write(&zst, zstd::encode_all(&other[..], 3).unwrap()).unwrap();
    } else {
        std::fs::write(dir.join(format!("{hex}.raw")), &other).unwrap();
    }
    let root = s.dir("root");
    let out = sync_env(&master, &root, &[], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    assert_eq!(std::fs::read(root.join("etc/big.txt")).unwrap(), content);
    assert!(out.summary().contains("1 refused from the store"), "{}", out.summary());
    let (_, from_master, after) = store_sources(&out);
    assert_eq!((from_master, after), (1, 0), "{}", out.summary());
}

//! An object store that fails under a host (issue 25, parts 2 and 5): one that hangs, one that
//! stalls in the middle of a body, one stopped in the middle of a sync, and a master killed in
//! the middle of an upload. The store is a real S3 server (s3s-fs); the faults come from a TCP
//! proxy in front of it ([`Proxy`]), cut at a byte count so each test is deterministic.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gis_tests::{
    assert_converged, bin, build_fixture, fleet_status, random_bytes, scratch, store_sources, wait_until, Master,
    S3Server,
};

const WAIT: Duration = Duration::from_secs(60);

/// What the proxy does once `after` bytes of responses have passed through it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Holds every connection open and sends nothing more; accepts new ones and never answers
    /// them (a hung store).
    Stall,
    /// Closes every connection and refuses new ones (a store that was stopped).
    Stop,
}

/// A TCP proxy on `127.0.0.1:0` in front of `upstream` that passes `after` bytes of responses,
/// then applies `fault`.
struct Proxy {
    port: u16,
    passed: Arc<AtomicU64>,
    tripped: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16, after: u64, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let passed = Arc::new(AtomicU64::new(0));
        let tripped = Arc::new(AtomicBool::new(false));
        // Every connection, to close them all when the store "stops".
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (p, t) = (passed.clone(), tripped.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if t.load(Ordering::SeqCst) {
                    match fault {
                        Fault::Stall => held.push(client),
                        Fault::Stop => drop(client),
                    }
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                conns.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                let (p, t, conns) = (p.clone(), t.clone(), conns.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let before = p.fetch_add(n as u64, Ordering::SeqCst);
                        let allowed = after.saturating_sub(before).min(n as u64) as usize;
                        if allowed > 0 && c_out.write_all(&buf[..allowed]).is_err() {
                            break;
                        }
                        if allowed < n {
                            t.store(true, Ordering::SeqCst);
                            match fault {
                                // Keep the sockets, send nothing: the reader sees silence.
                                Fault::Stall => loop {
                                    std::thread::sleep(Duration::from_secs(3600));
                                },
                                Fault::Stop => {
                                    for s in conns.lock().unwrap().iter() {
                                        let _ = s.shutdown(Shutdown::Both);
                                    }
                                    return;
                                }
                            }
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Write);
                });
            }
        });
        Proxy { port, passed, tripped }
    }

    /// The AWS variables of `s3`, with the endpoint moved to this proxy.
    fn env(&self, s3: &S3Server) -> Vec<(&'static str, String)> {
        let mut env = s3.env();
        for (k, v) in &mut env {
            if *k == "AWS_ENDPOINT_URL" {
                *v = format!("http://127.0.0.1:{}", self.port);
            }
        }
        env
    }
}

/// A master of `v1` (the fixture plus `n` incompressible 64 KiB files, so a sync moves a few
/// MiB in many objects) that uploads to `s3://bkt/fleet` on `s3`.
fn store_master(s: &gis_tests::Scratch, s3: &S3Server, n: u64, extra: &[&str]) -> (PathBuf, Master) {
    let v1 = s.dir("v1");
    build_fixture(&v1);
    std::fs::create_dir(v1.join("data")).unwrap();
    for i in 0..n {
        std::fs::write(v1.join(format!("data/blob{i:03}")), random_bytes(1000 + i, 64 * 1024)).unwrap();
    }
    s3.bucket("bkt");
    let mut args =
        vec![OsStr::new("--image"), v1.as_os_str(), OsStr::new("--object-store"), OsStr::new("s3://bkt/fleet")];
    args.extend(extra.iter().map(OsStr::new));
    let master = Master::start_with_env(&args, &s3.env());
    (v1, master)
}

/// [`gis_tests::sync_env`] with `-q`, timed.
fn sync_env(master: &Master, root: &Path, extra: &[&str], env: &[(&str, String)]) -> (gis_tests::Output, Duration) {
    let t = Instant::now();
    let args: Vec<&str> = std::iter::once("-q").chain(extra.iter().copied()).collect();
    let out = gis_tests::sync_env(master, root, &args, env);
    (out, t.elapsed())
}

/// Every regular file under `root` is the one of `old` or of `new` at that path (or absent from
/// both trees' view, for `old` = None), and no temp file is left.
fn old_or_new(root: &Path, old: Option<&Path>, new: &Path) {
    for e in walkdir::WalkDir::new(root).into_iter().map(|e| e.unwrap()) {
        let name = e.file_name().to_string_lossy();
        assert!(!name.starts_with(".syncd-"), "temp file left: {}", e.path().display());
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(root).unwrap();
            let have = std::fs::read(e.path()).unwrap();
            let o = old.and_then(|d| std::fs::read(d.join(rel)).ok());
            let n = std::fs::read(new.join(rel)).ok();
            assert!(
                Some(&have) == o.as_ref() || Some(&have) == n.as_ref(),
                "{} is neither the old file nor the new one",
                rel.display()
            );
        }
    }
}

#[test]
fn a_hung_store_falls_back_to_the_master_within_the_deadline() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (v1, master) = store_master(&s, &s3, 8, &[]);
    // Accepts connections and never answers one.
    let hung = Proxy::start(s3.port(), 0, Fault::Stall);
    let root = s.dir("root");
    let (out, took) = sync_env(&master, &root, &["--rpc-timeout", "3s"], &hung.env(&s3));
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, after) = store_sources(&out);
    assert_eq!(store, 0, "{}", out.summary());
    assert!(from_master >= 8 && after == from_master, "{}", out.summary());
    assert!(out.stderr.contains("no reply within 3s"), "the hang is not named:\n{}", out.stderr);
    // One deadline, then the rest of the pass from the master: not a deadline per object.
    assert!(took < Duration::from_secs(25), "took {took:?}");

    // Fallback off: exit 3 after the deadline, nothing written in place.
    let root2 = s.dir("root2");
    let (out, took) =
        sync_env(&master, &root2, &["--rpc-timeout", "3s", "--object-store-fallback", "false"], &hung.env(&s3));
    out.expect_code(3, &[&root2]);
    assert!(out.stderr.contains("s3://bkt/fleet"), "the error does not name the store:\n{}", out.stderr);
    assert!(took < Duration::from_secs(25), "took {took:?}");
    old_or_new(&root2, None, &v1);
}

#[test]
fn a_store_that_stalls_in_the_middle_of_a_body_falls_back() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (v1, master) = store_master(&s, &s3, 32, &[]);
    // About a third of the objects pass, then the store goes silent mid-response.
    let stalls = Proxy::start(s3.port(), 700 * 1024, Fault::Stall);
    let root = s.dir("root");
    // One GET at a time: the objects before the cut come whole however loaded the machine is.
    let (out, took) = sync_env(
        &master,
        &root,
        &["--rpc-timeout", "3s", "--stream-idle-timeout", "3s", "--object-store-concurrency", "1"],
        &stalls.env(&s3),
    );
    assert!(
        stalls.tripped.load(Ordering::SeqCst),
        "the stall never happened: {} bytes passed",
        stalls.passed.load(Ordering::SeqCst)
    );
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, after) = store_sources(&out);
    assert!(store >= 3, "nothing came from the store before the stall: {}", out.summary());
    assert!(after >= 1 && from_master >= after, "{}", out.summary());
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_store_stopped_in_the_middle_of_a_sync() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (v1, master) = store_master(&s, &s3, 32, &[]);
    // Fallback on: the sync still converges.
    let stops = Proxy::start(s3.port(), 700 * 1024, Fault::Stop);
    let root = s.dir("root");
    // One GET at a time, so the objects before the stop come whole however loaded the machine
    // is (with several in flight, a busy machine can see every one of them cut mid-body).
    let (out, _) =
        sync_env(&master, &root, &["--rpc-timeout", "3s", "--object-store-concurrency", "1"], &stops.env(&s3));
    assert!(stops.tripped.load(Ordering::SeqCst), "the stop never happened");
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, after) = store_sources(&out);
    assert!(store >= 3, "nothing came from the store before the stop: {}", out.summary());
    assert!(after >= 1 && from_master >= after, "{}", out.summary());
    assert!(out.stderr.contains("fetching from the master instead"), "the fallback is not logged:\n{}", out.stderr);

    // Fallback off, a host at v1 upgrading to v2: exit 3, and every file is old or new.
    let root2 = s.dir("root2");
    let (out, _) = sync_env(&master, &root2, &[], &s3.env());
    out.expect_code(0, &[&root2]);
    drop(master);
    let v2 = s.dir("v2");
    let cp = Command::new("cp").arg("-a").arg(format!("{}/.", v1.display())).arg(&v2).status().unwrap();
    assert!(cp.success());
    for i in 0..32u64 {
        std::fs::write(v2.join(format!("data/blob{i:03}")), random_bytes(5000 + i, 64 * 1024)).unwrap();
    }
    let args = [
        OsStr::new("--image"),
        v2.as_os_str(),
        OsStr::new("--image-version"),
        OsStr::new("2"),
        OsStr::new("--object-store"),
        OsStr::new("s3://bkt/fleet"),
    ];
    let master2 = Master::start_with_env(&args, &s3.env());
    let stops = Proxy::start(s3.port(), 700 * 1024, Fault::Stop);
    let (out, _) =
        sync_env(&master2, &root2, &["--rpc-timeout", "3s", "--object-store-fallback", "false"], &stops.env(&s3));
    assert!(stops.tripped.load(Ordering::SeqCst), "the stop never happened");
    out.expect_code(3, &[&root2]);
    assert!(out.stderr.contains("object_store_fallback is off"), "{}", out.stderr);
    old_or_new(&root2, Some(&v1), &v2);
}

#[test]
fn a_host_reads_the_store_location_its_config_names() {
    let s = scratch();
    let s3_dir = s.dir("s3");
    let s3 = S3Server::require(&s3_dir);
    let (v1, master) = store_master(&s, &s3, 4, &[]);
    // The host reads the same objects as a plain directory (a mirror, a local cache): no AWS
    // variables at all, and the S3 server is gone.
    drop(s3);
    let url = format!("file://{}/bkt/fleet", s3_dir.display());
    let root = s.dir("root");
    let (out, _) = sync_env(&master, &root, &["--object-store", &url, "--rpc-timeout", "3s"], &[]);
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, _) = store_sources(&out);
    // The S3 server is gone: only the directory can have given these.
    assert!(store >= 4 && from_master == 0, "{}", out.summary());
}

/// Every file under `dir` with its modification time.
fn mtimes(dir: &Path) -> Vec<(PathBuf, SystemTime)> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_owned(), e.metadata().unwrap().modified().unwrap()))
        .collect()
}

#[test]
fn a_master_killed_in_the_middle_of_an_upload_resumes_and_puts_nothing_twice() {
    let s = scratch();
    let s3_dir = s.dir("s3");
    let s3 = S3Server::require(&s3_dir);
    let v1 = s.dir("v1");
    build_fixture(&v1);
    std::fs::create_dir(v1.join("many")).unwrap();
    for i in 0..1500u64 {
        std::fs::write(v1.join(format!("many/f{i:04}")), random_bytes(20_000 + i, 2000)).unwrap();
    }
    let bucket = s3.bucket("bkt");
    let args = [
        OsStr::new("--image"),
        v1.as_os_str(),
        OsStr::new("--object-store"),
        OsStr::new("s3://bkt/fleet"),
        OsStr::new("--object-store-concurrency"),
        OsStr::new("1"),
    ];
    // The master does not answer before its upload is done, so it is started in the background.
    let mut cmd = Command::new(bin("syncmaster"));
    cmd.arg("serve").args(args).args(["--insecure", "--listen", "127.0.0.1:0"]);
    cmd.envs(s3.env().iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut first = cmd.spawn().unwrap();
    let some = wait_until(WAIT, || mtimes(&bucket).len() >= 100);
    // SIGKILL: no chance to finish or clean up.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(some, "the first master uploaded fewer than 100 objects");
    let before = mtimes(&bucket);
    assert!(before.len() < 1400, "the upload finished before the kill ({} objects): make it bigger", before.len());
    std::thread::sleep(Duration::from_millis(1100)); // mtimes have a resolution; a rewrite must show.

    let master = Master::start_with_env(&args, &s3.env());
    assert!(
        wait_until(WAIT, || fleet_status(master.url())["image_version"] == 1),
        "the version is not announced after the restart\n{}",
        master.stderr()
    );
    // Every object put before the kill is untouched; the rest are there now.
    let after = mtimes(&bucket);
    for (path, t) in &before {
        let now = after.iter().find(|(p, _)| p == path).map(|(_, t)| *t);
        assert_eq!(now, Some(*t), "{} was put again (or removed) after the restart", path.display());
    }
    let root = s.dir("root");
    let (out, _) = sync_env(&master, &root, &["--object-store-fallback", "false"], &s3.env());
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    let (store, from_master, _) = store_sources(&out);
    assert!(store >= 1500 && from_master == 0, "{}", out.summary());
}

#[test]
fn a_host_without_credentials_or_refused_reads_fetches_from_the_master() {
    let s = scratch();
    let s3 = S3Server::require(&s.dir("s3"));
    let (v1, master) = store_master(&s, &s3, 4, &[]);
    let no_keys: Vec<(&str, String)> =
        s3.env().into_iter().filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET")).collect();
    // The store the master announced cannot be opened without keys: a warning with the way
    // out, and every object from the master.
    let root = s.dir("root");
    let (out, _) = sync_env(&master, &root, &[], &no_keys);
    out.expect_code(0, &[&root]);
    assert_converged(&v1, &root, &out);
    assert!(!out.summary().contains("from the object store"), "{}", out.summary());
    assert!(
        out.stderr.contains("s3://bkt/fleet") && out.stderr.contains("object_store_anonymous"),
        "the warning does not name the store and the hint:\n{}",
        out.stderr
    );
    // With fallback off, that is a configuration error (exit 2) naming the store.
    let root2 = s.dir("root2");
    let (out, _) = sync_env(&master, &root2, &["--object-store-fallback", "false"], &no_keys);
    out.expect_code(2, &[&root2]);
    assert!(out.stderr.contains("s3://bkt/fleet"), "{}", out.stderr);
    assert!(std::fs::read_dir(&root2).unwrap().next().is_none(), "something was written");
    // Unsigned reads of a bucket that wants signed ones are refused (403): the store is passed
    // over for the pass, the refusal logged with the key, and the master serves the objects.
    let root3 = s.dir("root3");
    let cfg = s.join("anon.toml");
    std::fs::write(&cfg, "object_store_anonymous = true\n").unwrap();
    let (out, _) = sync_env(&master, &root3, &["--config", cfg.to_str().unwrap(), "--rpc-timeout", "5s"], &no_keys);
    out.expect_code(0, &[&root3]);
    assert_converged(&v1, &root3, &out);
    let (store, from_master, after) = store_sources(&out);
    assert_eq!(store, 0, "{}", out.summary());
    assert!(from_master >= 4 && after == from_master, "{}", out.summary());
    assert!(
        out.stderr.contains("object store s3://bkt/fleet: fleet/") && out.stderr.contains("403"),
        "the refusal does not name the store, the key and the status:\n{}",
        out.stderr
    );
}

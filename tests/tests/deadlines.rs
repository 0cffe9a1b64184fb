//! Deadlines on the network path: a master that accepts the connection and never answers, or
//! freezes (SIGSTOP) in the middle of a transfer, makes `syncd sync` exit 3 within its
//! deadlines with every file whole; a frozen master is noticed on the idle version watch by
//! keepalive pings; and neither keeps `syncd run` from stopping on SIGTERM within 5 s.
//!
//! Every syncd started here runs under a watchdog that kills it, so a regression fails the
//! test instead of hanging it.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gis_tests::{bin, random_bytes, run_syncd, run_syncd_limited, scratch, wait_until, Builder, Master, Scratch};

/// How long any syncd here may run before the watchdog kills it.
const WATCHDOG: Duration = Duration::from_secs(60);
/// `syncd run` must be gone this soon after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// A listener on 127.0.0.1:0 that accepts every connection and never sends a byte; the
/// accepted sockets stay open until it is dropped.
struct Silent {
    addr: String,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, stopping) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        open.push(sock);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Silent { addr, accepted, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig).unwrap();
}

/// A master frozen with SIGSTOP, thawed on drop (so a failing test leaves nothing stopped).
struct Frozen(u32);

impl Frozen {
    fn freeze(master: &Master) -> Frozen {
        signal(master.pid(), rustix::process::Signal::STOP);
        Frozen(master.pid())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, rustix::process::Signal::CONT);
    }
}

/// A syncd started in the background, its stderr collected; killed on drop.
struct Running {
    child: Child,
    command: String,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(args: &[&OsStr]) -> Running {
        let command = std::iter::once(bin("syncd").into_os_string())
            .chain(args.iter().map(|a| a.to_os_string()))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new(bin("syncd"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start syncd");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { child, command, stderr }
    }

    /// Waits up to `limit` for the exit: its code (-1 for a signal), and how long it took;
    /// `None` if it is still running, which the watchdog then kills.
    fn wait(&mut self, limit: Duration) -> Option<(i32, Duration)> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some((st.code().unwrap_or(-1), t.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn report(&self) -> String {
        // Give the reader a moment to collect what the process wrote last.
        std::thread::sleep(Duration::from_millis(100));
        format!("command: {}\n--- stderr ---\n{}", self.command, self.stderr.lock().unwrap())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then syncd run must exit 0 within [`STOP_WITHIN`].
    #[track_caller]
    fn sigterm_expect_clean_exit(&mut self) {
        self.sigterm();
        let exit = self.wait(STOP_WITHIN);
        eprintln!("after SIGTERM: {exit:?}");
        assert_eq!(
            exit.map(|e| e.0),
            Some(0),
            "SIGTERM did not stop syncd run within {STOP_WITHIN:?}\n{}",
            self.report()
        );
    }

    fn sigterm(&self) {
        signal(self.child.id(), rustix::process::Signal::TERM);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a temp file (`.syncd-*`) exists anywhere under `root`: syncd is receiving content.
fn receiving(root: &Path) -> bool {
    walkdir::WalkDir::new(root).into_iter().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".syncd-"))
}

/// Bytes of regular files under `root`, temp files included.
fn bytes_under(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// Every regular file of `img` is, under `root`, either absent or byte-identical: none torn.
fn no_file_torn(img: &Path, root: &Path) -> Result<usize, String> {
    let mut whole = 0;
    for e in walkdir::WalkDir::new(img).into_iter().flatten().filter(|e| e.file_type().is_file()) {
        let rel = e.path().strip_prefix(img).unwrap();
        match fs::read(root.join(rel)) {
            Ok(got) if got == fs::read(e.path()).unwrap() => whole += 1,
            Ok(got) => return Err(format!("{} is torn: {} bytes, not the image's content", rel.display(), got.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", rel.display())),
        }
    }
    Ok(whole)
}

/// An image whose transfer takes several seconds under a 2 MiB/s limit: `files` random files
/// of `size` bytes, and a few small ones.
fn slow_image(s: &Scratch, files: usize, size: usize) -> PathBuf {
    let img = s.dir("img");
    let mut b = Builder::new(&img);
    b.dir("etc", 0o755).file("etc/motd", 0o644, b"hello\n").dir("data", 0o755);
    for i in 0..files {
        b.file(format!("data/blob{i:02}"), 0o644, &random_bytes(100 + i as u64, size));
    }
    b.finish();
    img
}

fn daemon_config(s: &Scratch, url: &str, root: &Path, extra: &str) -> PathBuf {
    let cfg = s.join("syncd.toml");
    fs::write(
        &cfg,
        format!(
            "master = {url:?}\nroot = {root:?}\nhost_id = \"web01\"\nstate_dir = {:?}\n\
             reconcile_interval = \"1h\"\nreconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\nmax_backoff = \"1s\"\n{extra}",
            s.join("syncd-state")
        ),
    )
    .unwrap();
    cfg
}

/// `syncd run --config CFG`, logging at info level.
fn daemon(cfg: &Path) -> Running {
    Running::start(&[OsStr::new("run"), OsStr::new("--insecure"), OsStr::new("--config"), cfg.as_os_str()])
}

#[test]
fn a_silent_master_makes_sync_exit_3_within_the_rpc_timeout() {
    let s = scratch();
    let root = s.dir("root");
    let silent = Silent::start();
    let url = silent.url();
    let cfg = s.join("syncd.toml");
    fs::write(&cfg, "rpc_timeout = \"2s\"\n").unwrap();
    // The deadline from the flag, then from the config file.
    for how in [["--rpc-timeout", "2s"], ["--config", cfg.to_str().unwrap()]] {
        let mut args: Vec<&OsStr> =
            ["sync", "--insecure", "--host-id", "e2e-host", "--master", &url, "--root"].map(OsStr::new).to_vec();
        args.push(root.as_os_str());
        args.extend(how.map(OsStr::new));
        let t = Instant::now();
        let (out, _) = run_syncd_limited(&args, WATCHDOG);
        let took = t.elapsed();
        eprintln!("exit {} after {took:?}", out.code);
        out.expect_code(3, &[&root]);
        out.check(took < Duration::from_secs(10), format!("exit 3 took {took:?} (the deadline is 2s)"), &[]);
        out.check(
            out.stderr.contains(&url) && out.stderr.contains("rpc_timeout") && out.stderr.contains("within 2s"),
            "the error does not name the master, the deadline and its key",
            &[],
        );
        assert!(silent.accepted() > 0, "syncd never connected to the silent listener");
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "the root changed");
    }
}

#[test]
fn bad_deadlines_exit_2_naming_the_key() {
    let s = scratch();
    let root = s.dir("root");
    let r = root.to_string_lossy().into_owned();
    for (flag, value) in [("--rpc-timeout", "soon"), ("--stream-idle-timeout", "0s"), ("--keepalive-interval", "0")] {
        let out = run_syncd(["sync", "--insecure", "--master", "http://127.0.0.1:9", "--root", &r, flag, value]);
        out.expect_code(2, &[]);
        out.check(out.stderr.contains(flag), format!("stderr does not name {flag}"), &[]);
    }
    let out = gis_tests::sync_with_config(&s, &root, "keepalive_timeout = \"a while\"\n");
    out.expect_code(2, &[]);
    out.check(out.stderr.contains("keepalive_timeout"), "stderr does not name the key", &[]);
}

#[test]
fn a_master_frozen_mid_transfer_makes_sync_exit_3_with_every_file_whole() {
    let s = scratch();
    let img = slow_image(&s, 12, 1 << 20);
    let master = Master::start(&img);
    let root = s.dir("root");
    let mut args: Vec<&OsStr> =
        ["sync", "--insecure", "--host-id", "e2e-host", "--master", master.url(), "--root"].map(OsStr::new).to_vec();
    args.push(root.as_os_str());
    args.extend(["--net-bytes-per-sec", "2MiB", "--stream-idle-timeout", "2s"].map(OsStr::new));
    let mut syncd = Running::start(&args);
    // A quarter of the 12 MiB on disk, as files or temp files: well into the transfer.
    let started = wait_until(Duration::from_secs(30), || {
        bytes_under(&root) >= 3 << 20 || syncd.child.try_wait().ok().flatten().is_some()
    });
    assert!(started && receiving(&root), "syncd never got well into the transfer\n{}", syncd.report());
    let frozen = Frozen::freeze(&master);
    let stopped_at = Instant::now();
    let exit = syncd.wait(WATCHDOG);
    let report = syncd.report();
    let (code, _) = exit.unwrap_or_else(|| panic!("syncd still running {WATCHDOG:?} after the master froze\n{report}"));
    let took = stopped_at.elapsed();
    drop(frozen);
    eprintln!("syncd exited {code} {took:?} after the master froze");
    // What was received before the freeze (at most the connection's flow-control window,
    // consumed at 2 MiB/s) is applied first; then 2 s of silence.
    assert!(took < Duration::from_secs(15), "exit took {took:?} after the master froze\n{report}");
    assert_eq!(code, 3, "a master frozen mid-transfer is unreachable\n{report}");
    assert!(
        report.contains(master.url()) && report.contains("stream_idle_timeout") && report.contains("no data for 2s"),
        "the error does not name the master, the deadline and its key\n{report}"
    );
    let whole =
        no_file_torn(&img, &root).unwrap_or_else(|e| panic!("{e}\n{report}\n{}", gis_tests::tree::listing(&root)));
    eprintln!("{whole} of the image's 13 files whole, none torn");
    assert!(whole < 13, "the whole image arrived: the freeze came too late\n{report}");
}

#[test]
fn a_master_frozen_while_the_daemon_watches_is_noticed_by_keepalive() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img).file("motd", 0o644, b"hello\n").finish();
    let master = Master::start(&img);
    let root = s.dir("root");
    let cfg = daemon_config(&s, master.url(), &root, "keepalive_interval = \"1s\"\nkeepalive_timeout = \"1s\"\n");
    let mut d = daemon(&cfg);
    assert!(
        wait_until(Duration::from_secs(20), || d.stderr().contains("watching for new image versions")
            && fs::read(root.join("motd")).is_ok_and(|c| c == b"hello\n")),
        "the daemon never converged and watched\n{}",
        d.report()
    );
    let _frozen = Frozen::freeze(&master);
    let t = Instant::now();
    // Interval plus timeout is 2 s; without keepalive the idle watch would wait forever.
    let noticed = wait_until(Duration::from_secs(10), || d.stderr().contains("version watch lost"));
    assert!(noticed, "a frozen master went unnoticed on the watch for {:?}\n{}", t.elapsed(), d.report());
    eprintln!("the frozen master was noticed after {:?}", t.elapsed());
    assert!(d.stderr().contains("keepalive_timeout"), "the loss does not name keepalive_timeout\n{}", d.report());
    d.sigterm_expect_clean_exit();
}

#[test]
fn sigterm_stops_the_daemon_within_5s_against_a_silent_master() {
    let s = scratch();
    let root = s.dir("root");
    let silent = Silent::start();
    // Default deadlines (30 s): stopping must not depend on them.
    let cfg = daemon_config(&s, &silent.url(), &root, "");
    let mut d = daemon(&cfg);
    // The first pass and the version watch connect, and wait for a reply.
    assert!(wait_until(Duration::from_secs(10), || silent.accepted() >= 1), "syncd never connected\n{}", d.report());
    std::thread::sleep(Duration::from_secs(1));
    assert!(d.child.try_wait().unwrap().is_none(), "syncd run exited on its own\n{}", d.report());
    d.sigterm_expect_clean_exit();
}

#[test]
fn sigterm_stops_the_daemon_within_5s_while_a_pass_waits_on_a_frozen_master() {
    let s = scratch();
    // One large file: the apply thread is inside it, waiting on the stream, when the master
    // freezes, so it never reaches the point between two entries where a stop is checked.
    let img = slow_image(&s, 1, 24 << 20);
    let master = Master::start(&img);
    let root = s.dir("root");
    let cfg = daemon_config(&s, master.url(), &root, "net_bytes_per_sec = \"2MiB\"\n");
    let mut d = daemon(&cfg);
    assert!(wait_until(Duration::from_secs(20), || receiving(&root)), "syncd never started receiving\n{}", d.report());
    let _frozen = Frozen::freeze(&master);
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.child.try_wait().unwrap().is_none(), "syncd run exited on its own\n{}", d.report());
    d.sigterm_expect_clean_exit();
    if let Err(e) = no_file_torn(&img, &root) {
        panic!("{e}\n{}", d.report());
    }
}

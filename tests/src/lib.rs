//! Harness for the end-to-end tests: real `syncmaster` and `syncd` processes on loopback,
//! real trees in temp dirs.
//!
//! - [`Master`] and [`run_syncd`]/[`sync`]: start the binaries the workspace built;
//! - [`Output`]: a finished `syncd` run, whose checks print the command, its output and the
//!   trees involved when they fail;
//! - [`fixture`]: the one realistic tree builder;
//! - [`tree`]: the one tree comparator, the rsync cross-check and the outside-tree sentinel.

pub mod fake;
pub mod fixture;
pub mod tree;

use std::ffi::OsStr;
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub use fixture::{build_fixture, mtime_for, random_bytes, set_mtime, set_mtime_exact, Builder, HARDLINKS};
pub use tree::{assert_converged, differences, Difference, Sentinel, Snapshot};

/// How long a master may take to scan its image and start listening.
const MASTER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of a workspace binary, found like `assert_cmd` does: the test executable is
/// `target/<profile>/deps/NAME`, the binaries sit in `target/<profile>`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable");
    let dir = exe.parent().and_then(Path::parent).expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} does not exist (hint: run `cargo build --workspace` first; `cargo test --workspace` builds it)",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Returns from the calling test, with a note, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root (CI runs as root)");
            return;
        }
    };
}

/// A temp dir for one test, holding its image, host root and outside trees side by side.
pub struct Scratch(tempfile::TempDir);

pub fn scratch() -> Scratch {
    Scratch(tempfile::Builder::new().prefix("gis-e2e-").tempdir().expect("cannot create a temp dir"))
}

impl Scratch {
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.path().join(rel)
    }

    /// A new, empty directory `name` inside.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Without root, read-only directories in a fixture would stop the removal.
        if !is_root() {
            use std::os::unix::fs::PermissionsExt;
            for e in walkdir::WalkDir::new(self.0.path()).into_iter().flatten() {
                if e.file_type().is_dir() {
                    let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o700));
                }
            }
        }
    }
}

/// A running `syncmaster serve`, killed on drop.
pub struct Master {
    child: Child,
    url: String,
    metrics_url: Option<String>,
    http_addr: Option<String>,
    stderr: Arc<Mutex<String>>,
}

impl Master {
    /// Serves `image` as version 1.
    pub fn start(image: &Path) -> Master {
        Master::start_version(image, 1)
    }

    pub fn start_version(image: &Path, version: u64) -> Master {
        let v = version.to_string();
        Master::start_with(&[OsStr::new("--image"), image.as_os_str(), OsStr::new("--image-version"), OsStr::new(&v)])
    }

    /// `syncmaster serve ARGS`, on `127.0.0.1:0` unless ARGS name `--listen`.
    pub fn start_with(args: &[&OsStr]) -> Master {
        Master::start_with_env(args, &[])
    }

    /// The same, with `env` added to the master's environment (an [`S3Server`]'s variables).
    pub fn start_with_env(args: &[&OsStr], env: &[(&str, String)]) -> Master {
        let image = Path::new(
            args.iter().skip_while(|a| **a != "--image" && **a != "--images").nth(1).copied().unwrap_or_default(),
        );
        let mut cmd = Command::new(bin("syncmaster"));
        cmd.arg("serve").args(args).envs(env.iter().map(|(k, v)| (k, v)));
        // Plain TCP unless the test sets up mTLS (tests/tests/attacks.rs does).
        if !args.iter().any(|a| *a == "--tls-cert") {
            cmd.arg("--insecure");
        }
        if !args.iter().any(|a| *a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start syncmaster");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        // Lines go through a channel so the wait for readiness can time out; the reader keeps
        // draining stdout afterwards so the master never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + MASTER_READY_TIMEOUT;
        let mut master = Master { child, url: String::new(), metrics_url: None, http_addr: None, stderr };
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("metrics on ") {
                        master.metrics_url = Some(format!("http://{}/metrics", addr.trim()));
                    }
                    if let Some(addr) = line.strip_prefix("http on ") {
                        master.http_addr = Some(addr.trim().to_owned());
                    }
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        master.url = format!("http://{}", addr.trim());
                        // stdout and stderr are read on two threads, so the log lines written
                        // before `listening on` may not be in `stderr` yet. The master logs
                        // `serving addr=` right after that line: wait for it, so a test that
                        // reads the log at once sees everything logged before readiness.
                        wait_until(Duration::from_secs(10), || master.stderr().contains("serving addr="));
                        return master;
                    }
                }
                Err(e) => {
                    let _ = master.child.kill();
                    let status = master.child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "syncmaster serving {} never said `listening on` ({e}; exit {status:?})\nstderr:\n{}",
                        image.display(),
                        master.stderr()
                    );
                }
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `http://ADDR/metrics`, for a master started with `--metrics-listen`.
    /// The fleet page's address (`--http-listen`), once bound: `127.0.0.1:PORT`.
    pub fn http_addr(&self) -> Option<&str> {
        self.http_addr.as_deref()
    }

    pub fn metrics_url(&self) -> Option<&str> {
        self.metrics_url.as_deref()
    }

    /// The process id, to signal it (SIGSTOP freezes it, as a hung master).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The URL for a master started with `--tls-cert`.
    pub fn https_url(&self) -> String {
        self.url.replacen("http://", "https://", 1)
    }

    /// What the master logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// `syncmaster status --format json` against `url`, parsed.
pub fn fleet_status(url: &str) -> serde_json::Value {
    let out = Command::new(bin("syncmaster"))
        .args(["status", "--master", url, "--insecure", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "syncmaster status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// A finished `syncd` run.
#[derive(Debug)]
pub struct Output {
    pub command: String,
    /// The exit code, or -1 if a signal ended it.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `syncd` with `args` and waits for it.
pub fn run_syncd<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let bin = bin("syncd");
    let command = std::iter::once(bin.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(&bin).args(&args).stdin(Stdio::null()).output().expect("cannot run syncd");
    Output {
        command,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `syncd` with `args`, killing it after `deadline`; also returns its peak RSS in KiB
/// (from `wait4`, so it is this process's own figure).
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives the peak RSS
pub fn run_syncd_limited(args: &[&OsStr], deadline: Duration) -> (Output, u64) {
    let bin = bin("syncd");
    let command = std::iter::once(bin.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run syncd");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id() as libc::pid_t;
    let start = std::time::Instant::now();
    let (mut status, mut usage): (libc::c_int, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    let mut killed = false;
    loop {
        // SAFETY: plain syscall on our own child; status and usage are valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if start.elapsed() > deadline && !killed {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let code = if killed {
        -2
    } else if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let mut stderr = err.join().unwrap();
    if killed {
        stderr.push_str(&format!("\n[killed by the test after {deadline:?}]"));
    }
    (Output { command, code, stdout: out.join().unwrap(), stderr }, usage.ru_maxrss as u64)
}

/// `syncd sync` on `root` with a config file holding `toml`, against a master that is never
/// reached (for configuration errors, refused before any connection).
pub fn sync_with_config(scratch: &Scratch, root: &Path, toml: &str) -> Output {
    let cfg = scratch.join("syncd.toml");
    std::fs::write(&cfg, toml).unwrap_or_else(|e| panic!("cannot write {}: {e}", cfg.display()));
    let root = root.as_os_str();
    run_syncd(
        [OsStr::new("sync"), OsStr::new("--insecure"), OsStr::new("--master"), OsStr::new("http://127.0.0.1:9")]
            .into_iter()
            .chain([OsStr::new("--root"), root, OsStr::new("--config"), cfg.as_os_str()]),
    )
}

/// `syncd sync` against `master` on `root`, plus `extra` flags (`--dry-run`, …).
pub fn sync(master: &Master, root: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = ["sync", "--master", master.url(), "--root"].map(OsStr::new).to_vec();
    args.push(root.as_os_str());
    args.extend(["--host-id", "e2e-host", "--insecure"].map(OsStr::new));
    args.extend(extra.iter().map(OsStr::new));
    run_syncd(args)
}

impl Output {
    /// The itemized lines on stdout.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// The last stderr line (`syncd: …` summary).
    pub fn summary(&self) -> &str {
        self.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
    }

    /// The command, its exit code, stdout, stderr and a listing of each of `trees`.
    pub fn report(&self, trees: &[&Path]) -> String {
        let mut s = format!(
            "command: {}\nexit code: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        );
        for t in trees {
            s.push_str(&format!("--- tree {} ---\n{}", t.display(), tree::listing(t)));
        }
        s
    }

    /// Panics with `what` and the full report unless `ok`.
    #[track_caller]
    pub fn check(&self, ok: bool, what: impl Display, trees: &[&Path]) -> &Self {
        if !ok {
            panic!("{what}\n{}", self.report(trees));
        }
        self
    }

    #[track_caller]
    pub fn expect_code(&self, code: i32, trees: &[&Path]) -> &Self {
        self.check(self.code == code, format!("syncd exited with {}, expected {code}", self.code), trees)
    }

    /// Whether some itemized line is about `path` itself (not merely something beneath it).
    pub fn lists(&self, path: &str) -> bool {
        self.lines().iter().any(|l| {
            l.get(12..).and_then(|rest| rest.strip_prefix(path)).is_some_and(|after| {
                after.is_empty() || after == "/" || after.starts_with(' ') || after.starts_with("/ ")
            })
        })
    }
}

/// Syncs the host `root` to `img` (served by `master`) and checks that it converged.
pub fn converged_host(master: &Master, img: &Path, root: &Path) {
    let out = sync(master, root, &[]);
    out.expect_code(0, &[root]);
    assert_converged(img, root, &out);
}

/// A tmpfs mounted for the duration of a test; unmounted on drop, even after a panic.
pub struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    pub fn new(dir: &Path) -> TmpfsMount {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs"])
            .arg(dir)
            .status()
            .expect("cannot run mount");
        assert!(st.success(), "mount -t tmpfs on {} failed: {st}", dir.display());
        TmpfsMount { dir: dir.to_owned() }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// An ext4 filesystem of `mib` MiB in an image file, loop-mounted for the duration of a test
/// (a real root partition that can run out of space); unmounted on drop, even after a panic.
pub struct LoopExt4 {
    mnt: PathBuf,
}

impl LoopExt4 {
    /// Makes the image at `image` and mounts it on the existing directory `mnt`.
    pub fn new(image: &Path, mnt: &Path, mib: u64) -> LoopExt4 {
        LoopExt4::with_mkfs_args(image, mnt, mib, &[])
    }

    /// The same, with extra `mkfs.ext4` arguments (`-I 128`: inodes whose times stop in 2038).
    pub fn with_mkfs_args(image: &Path, mnt: &Path, mib: u64, args: &[&str]) -> LoopExt4 {
        let f = std::fs::File::create(image).unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));
        f.set_len(mib << 20).unwrap();
        drop(f);
        let run = |cmd: &mut Command| {
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (hint: apt-get install e2fsprogs mount)"));
            assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        // No lazy init: its background writes would make free space move under the test.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .args(args)
            .arg(image));
        run(Command::new("mount").args(["-o", "loop"]).arg(image).arg(mnt));
        LoopExt4 { mnt: mnt.to_owned() }
    }

    /// Bytes a root process can still write (the blocks reserved for root included).
    pub fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.mnt).expect("statvfs");
        st.f_bfree * st.f_frsize
    }

    /// Fills the filesystem with `ballast` (a file on it) until a write fails with ENOSPC,
    /// leaving `keep` bytes or less.
    pub fn fill(&self, ballast: &Path, keep: u64) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(ballast).expect("ballast");
        let chunk = vec![0x5a_u8; 64 << 10];
        while self.free_bytes() > keep {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("cannot fill {}: {e}", self.mnt.display()),
            }
        }
        let _ = f.sync_all();
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// `syncd run --insecure --config CFG` with `RUST_LOG=info`, its log going to `log`; killed on
/// drop.
pub fn spawn_syncd_run(cfg: &Path, log: std::fs::File) -> KillOnDrop {
    let child = Command::new(bin("syncd"))
        .args(["run", "--insecure", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cannot start syncd run");
    KillOnDrop(child)
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command that installs the S3 server the object-store tests run against.
pub const S3S_FS_INSTALL: &str = "cargo install s3s-fs --version 0.14.1 --features binary --locked";

/// A real S3 server (`s3s-fs`, serving a directory: each bucket is a subdirectory, each object
/// a file under it) on loopback, killed on drop.
pub struct S3Server {
    /// Held for its drop, which kills the server.
    _child: KillOnDrop,
    /// The directory served.
    pub dir: PathBuf,
    pub endpoint: String,
}

impl S3Server {
    /// Starts `s3s-fs` (found on PATH, or in `$HOME/.cargo/bin`) serving `dir`; `None` if the
    /// binary is not installed. Use [`S3Server::require`] in tests.
    pub fn start(dir: &Path) -> Option<S3Server> {
        // A free port: bind port 0, note the number, let it go (s3s-fs has no port 0 report).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        S3Server::start_at(dir, port)
    }

    /// [`S3Server::start`] on `port` (to bring a stopped server back where clients expect it).
    pub fn start_at(dir: &Path, port: u16) -> Option<S3Server> {
        let exe = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")))
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())?;
        let child = Command::new(&exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "e2e-access", "--secret-key", "e2e-secret"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let server =
            S3Server { _child: KillOnDrop(child), dir: dir.to_owned(), endpoint: format!("http://127.0.0.1:{port}") };
        let up = wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "{} never listened on 127.0.0.1:{port}", exe.display());
        Some(server)
    }

    /// [`S3Server::start`], failing the test with the install command when s3s-fs is missing.
    pub fn require(dir: &Path) -> S3Server {
        S3Server::start(dir).unwrap_or_else(|| {
            panic!("this test needs the s3s-fs binary on PATH or in ~/.cargo/bin (hint: {S3S_FS_INSTALL})")
        })
    }

    /// Creates bucket `name` (a directory of the served tree).
    pub fn bucket(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// The AWS variables a client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "e2e-access".into()),
            ("AWS_SECRET_ACCESS_KEY", "e2e-secret".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).expect("endpoint has a port")
    }
}

/// Flips `images/current` to `version` atomically: a publish, for a master serving `--images`.
pub fn flip(images: &Path, version: &str) {
    let tmp = images.join("current.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, images.join("current")).unwrap();
}

/// `cp -a FROM TO`.
pub fn cp_a(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {} failed", from.display(), to.display());
}

/// `syncd sync` against `master` on `root` as host `e2e-host`, with `env` added to its
/// environment (an [`S3Server`]'s variables) and `extra` flags.
pub fn sync_env(master: &Master, root: &Path, extra: &[&str], env: &[(&str, String)]) -> Output {
    let out = Command::new(bin("syncd"))
        .args(["sync", "--master", master.url(), "--root"])
        .arg(root)
        .args(["--host-id", "e2e-host", "--insecure"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Output {
        command: format!("syncd sync {} {extra:?}", root.display()),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The summary's "N from the object store (…), M from the master (K after a store failure)":
/// `(N, M, K)`.
pub fn store_sources(out: &Output) -> (u64, u64, u64) {
    let s = out.summary();
    let n = |after: &str, before: &str| -> u64 {
        let i = s.find(before).unwrap_or_else(|| panic!("no {before:?} in {s}"));
        s[..i].rsplit(after).next().unwrap().trim().parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    };
    (n(": ", " from the object store"), n(", ", " from the master"), n("(", " after a store failure"))
}

impl Master {
    /// `syncmaster serve --images IMAGES --state-dir STATE --poll 200ms --object-store URL
    /// EXTRA`, with `env` (an [`S3Server`]'s variables): a master that publishes by flips and
    /// uploads every version before announcing it.
    pub fn with_store(images: &Path, state: &Path, url: &str, extra: &[&str], env: &[(&str, String)]) -> Master {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--images"),
            images.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
            OsStr::new("--poll"),
            OsStr::new("200ms"),
            OsStr::new("--object-store"),
            OsStr::new(url),
        ];
        args.extend(extra.iter().map(OsStr::new));
        Master::start_with_env(&args, env)
    }
}

/// The samples of a metrics file: `name{labels}` → value.
pub fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            (k.to_owned(), v.parse::<f64>().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        })
        .collect()
}

/// `promtool check metrics` on `path`: the file must pass the Prometheus linter.
pub fn promtool_check(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(file)
        .output()
        .unwrap_or_else(|e| panic!("this test needs promtool (hint: apt-get install prometheus): {e}"));
    assert!(
        out.status.success(),
        "promtool check metrics failed on {}:\n{}{}\n--- file ---\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap()
    );
}

/// `GET url` over plain HTTP/1.1: the status line and the body.
pub fn http_get(url: &str) -> (String, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (addr, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// A CA, a master certificate for 127.0.0.1, and host certificates, made with the very
/// `openssl` commands the README gives.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub fn new(s: &Scratch) -> Option<Pki> {
        if std::process::Command::new("openssl").arg("version").output().is_err() {
            eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
            return None;
        }
        let pki = Pki { dir: s.dir("pki") };
        pki.ca("ca");
        pki.ca("evil-ca");
        pki.cert("ca", "master", "/CN=syncmaster", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth", 825);
        pki.cert("ca", "web01", "/CN=web01", "subjectAltName=DNS:web01\nextendedKeyUsage=clientAuth", 825);
        pki.cert("ca", "db01", "/CN=db01", "subjectAltName=DNS:db01\nextendedKeyUsage=clientAuth", 825);
        pki.cert("ca", "admin", "/CN=admin", "subjectAltName=DNS:admin\nextendedKeyUsage=clientAuth", 825);
        pki.cert("evil-ca", "web01-evil", "/CN=web01", "subjectAltName=DNS:web01\nextendedKeyUsage=clientAuth", 825);
        pki.cert("ca", "web01-expired", "/CN=web01", "subjectAltName=DNS:web01\nextendedKeyUsage=clientAuth", -1);
        Some(pki)
    }

    pub fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl").args(args).current_dir(&self.dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn ca(&self, name: &str) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &pem,
        ]);
    }

    pub fn cert(&self, ca: &str, name: &str, subject: &str, ext: &str, days: i32) {
        let (key, csr, pem, extfile) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(self.dir.join(&extfile), ext).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ]);
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).to_string_lossy().into_owned()
    }

    /// syncd flags presenting `cert`.
    pub fn client(&self, cert: &str) -> Vec<String> {
        ["--tls-ca", &self.path("ca.pem"), "--tls-cert", &self.path(&format!("{cert}.pem"))]
            .into_iter()
            .map(str::to_owned)
            .chain(["--tls-key".to_owned(), self.path(&format!("{cert}.key"))])
            .collect()
    }
}

/// Captures what the master sends `host` for its manifest now: the signed header and entries.
pub fn capture_manifest(url: &str, host: &str) -> Vec<proto::v1::ManifestMessage> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = proto::v1::image_sync_client::ImageSyncClient::connect(url.to_owned()).await.unwrap();
        let mut stream = c
            .get_manifest(proto::v1::ManifestRequest { host_id: host.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            out.push(m);
        }
        out
    })
}

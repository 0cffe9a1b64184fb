//! systemd: the units in `contrib/` pass `systemd-analyze verify`, and both daemons speak the
//! notify protocol (`READY=1`, `STATUS=`, `WATCHDOG=1`) to a socket the test binds, as systemd
//! would for a `Type=notify` unit with `WatchdogSec`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gis_tests::{bin, scratch, Builder, KillOnDrop, Master};

/// The datagrams received on `sock` until `until` holds for what came so far, or `limit`.
fn collect(sock: &UnixDatagram, limit: Duration, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end && !until(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn count(msgs: &[String], needle: &str) -> usize {
    msgs.iter().filter(|m| m.lines().any(|l| l == needle)).count()
}

#[test]
fn the_units_in_contrib_pass_systemd_analyze_verify() {
    let s = scratch();
    for (unit, binary) in [("syncd.service", "syncd"), ("syncmaster.service", "syncmaster")] {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib").join(unit)).unwrap();
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{unit}: {text}");
        // The unit as installed, its ExecStart pointing at this build.
        let local = text.replace(&format!("/usr/bin/{binary}"), bin(binary).to_str().unwrap());
        let path = s.join(unit);
        std::fs::write(&path, local).unwrap();
        // The man pages come with the packages (tests/tests/packages.rs checks them there).
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("this test needs systemd-analyze (hint: apt-get install systemd): {e}"));
        let err = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 on an unknown key or a bad value, and says so on stderr.
        assert!(out.status.success() && !err.contains(unit), "systemd-analyze verify {unit}:\n{err}");
    }
}

#[test]
fn syncd_run_says_ready_after_its_first_pass_then_status_and_watchdog_while_work_moves() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img)
        .dir("etc", 0o755)
        .file("etc/a", 0o644, b"a\n")
        .file("etc/b", 0o644, &vec![1u8; 200_000])
        .finish();
    let m = Master::start(&img);
    let (root, state) = (s.dir("root"), s.join("state"));
    let sock_path = s.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let cfg = s.join("syncd.toml");
    std::fs::write(&cfg, "reconcile_interval = \"1s\"\nreconcile_jitter = \"0s\"\n").unwrap();
    let log = std::fs::File::create(s.join("syncd.log")).unwrap();
    let child = Command::new(bin("syncd"))
        .args(["run", "--insecure", "--host-id", "h1", "--master", m.url(), "--config"])
        .arg(&cfg)
        .arg("--root")
        .arg(&root)
        .arg("--state-dir")
        .arg(&state)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = KillOnDrop(child);
    let got = collect(&sock, Duration::from_secs(30), |g| count(g, "READY=1") > 0 && count(g, "WATCHDOG=1") >= 3);
    let log = || std::fs::read_to_string(s.join("syncd.log")).unwrap();
    let ready = got
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1: {got:?}\n{}", log()));
    // etc, etc/a and etc/b were missing.
    assert!(ready.contains("STATUS=converged to v1, 3 drift, next pass in 1s"), "{ready:?}");
    assert!(std::fs::read(root.join("etc/a")).is_ok_and(|c| c == b"a\n"), "READY=1 came after the first pass");
    assert!(count(&got, "WATCHDOG=1") >= 3, "{got:?}");
    // A later pass's status says there was nothing to do.
    let got =
        collect(&sock, Duration::from_secs(10), |g| g.iter().any(|m| m.contains("STATUS=converged to v1, 0 drift")));
    assert!(got.iter().any(|m| m.contains("STATUS=converged to v1, 0 drift")), "{got:?}");

    // A master that hangs: the pass waits on it and moves nothing, so the pings stop (systemd
    // would stop and restart the daemon after WatchdogSec).
    let pid = rustix::process::Pid::from_raw(m.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = collect(&sock, Duration::from_millis(300), |_| false);
    let hung = collect(&sock, Duration::from_secs(3), |_| false);
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    assert_eq!(count(&hung, "WATCHDOG=1"), 0, "pings while the pass was stuck on a hung master: {hung:?}\n{}", log());
    assert!(log().contains("made no progress since the last watchdog ping"), "{}", log());
    let _ = daemon.0.kill();
}

#[test]
fn syncmaster_says_ready_once_listening_then_status_and_watchdog() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img).file("a", 0o644, b"a\n").finish();
    let sock_path = s.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let m = Master::start_with_env(
        &[std::ffi::OsStr::new("--image"), img.as_os_str()],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap().to_owned()), ("WATCHDOG_USEC", "1000000".to_owned())],
    );
    let got = collect(&sock, Duration::from_secs(20), |g| {
        count(g, "WATCHDOG=1") >= 2 && g.iter().any(|m| m.contains("STATUS="))
    });
    let ready = got
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1: {got:?}\n{}", m.stderr()));
    assert!(ready.contains("STATUS=serving v1; 0 hosts"), "{ready:?}");
    assert!(count(&got, "WATCHDOG=1") >= 2, "{got:?}");
}

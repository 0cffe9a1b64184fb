//! `syncd run` against a real master: new versions converge within seconds, local drift is
//! reverted by the reconcile, a master restart is survived, and the fleet status tells the
//! truth (converged, version, down once syncd stops; a health-failed report retried until a
//! restarted master has it).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use gis_tests::{fleet_status, scratch, spawn_syncd_run, wait_until, KillOnDrop, Master, Scratch};

const WAIT: Duration = Duration::from_secs(20);

/// `IMAGES/vN` trees with one file each, and `IMAGES/current` -> v1.
fn images(s: &Scratch) -> PathBuf {
    let images = s.dir("images");
    add_version(&images, 1);
    std::os::unix::fs::symlink("v1", images.join("current")).unwrap();
    images
}

fn add_version(images: &Path, n: u32) {
    let v = images.join(format!("v{n}"));
    fs::create_dir_all(v.join("etc")).unwrap();
    fs::write(v.join("etc/motd"), format!("version {n}\n")).unwrap();
    fs::write(v.join("etc/shared"), b"same in every version\n").unwrap();
}

/// Publishes vN the documented way: a new symlink renamed over `current`.
fn publish(images: &Path, n: u32) {
    let tmp = images.join("current.new");
    std::os::unix::fs::symlink(format!("v{n}"), &tmp).unwrap();
    fs::rename(&tmp, images.join("current")).unwrap();
}

fn master(s: &Scratch, images: &Path, listen: Option<&str>) -> Master {
    let state = s.join("master-state");
    let mut args: Vec<&OsStr> =
        ["--images", images.to_str().unwrap(), "--state-dir", state.to_str().unwrap()].map(OsStr::new).to_vec();
    args.extend(["--poll", "200ms", "--down-after", "2s", "--out-after", "1h"].map(OsStr::new));
    if let Some(l) = listen {
        args.extend([OsStr::new("--listen"), OsStr::new(l)]);
    }
    Master::start_with(&args)
}

fn daemon(s: &Scratch, url: &str, root: &Path) -> KillOnDrop {
    daemon_with(s, url, root, "1s", "")
}

/// A daemon reconciling every `interval`, with `tables` (TOML `[[health]]`…) in its config.
fn daemon_with(s: &Scratch, url: &str, root: &Path, interval: &str, tables: &str) -> KillOnDrop {
    let cfg = s.join("syncd.toml");
    fs::write(
        &cfg,
        format!(
            "master = {url:?}\nroot = {root:?}\nhost_id = \"web01\"\nstate_dir = {:?}\n\
             reconcile_interval = {interval:?}\nreconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\nmax_backoff = \"1s\"\n\n{tables}",
            s.join("syncd-state")
        ),
    )
    .unwrap();
    spawn_syncd_run(&cfg, fs::File::create(s.join("syncd.log")).unwrap())
}

fn motd(root: &Path) -> String {
    fs::read_to_string(root.join("etc/motd")).unwrap_or_default()
}

fn log(s: &Scratch) -> String {
    fs::read_to_string(s.join("syncd.log")).unwrap_or_default()
}

fn sigterm_and_wait(child: &mut Child) -> Option<i32> {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    for _ in 0..200 {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn follows_new_versions_reverts_drift_and_reports_to_the_fleet() {
    let s = scratch();
    let images = images(&s);
    let root = s.dir("root");
    let m = master(&s, &images, None);
    let mut d = daemon(&s, m.url(), &root);

    assert!(wait_until(WAIT, || motd(&root) == "version 1\n"), "never converged to v1\n{}", log(&s));
    add_version(&images, 2);
    publish(&images, 2);
    assert!(wait_until(WAIT, || motd(&root) == "version 2\n"), "never converged to v2\n{}\n{}", log(&s), m.stderr());

    fs::write(root.join("etc/motd"), b"edited by hand\n").unwrap();
    assert!(wait_until(WAIT, || motd(&root) == "version 2\n"), "the reconcile did not revert the edit\n{}", log(&s));

    let st = fleet_status(m.url());
    assert_eq!(st["image_version"], 2, "{st:#}");
    let h = &st["hosts"][0];
    assert!(
        wait_until(WAIT, || {
            let st = fleet_status(m.url());
            st["hosts"][0]["converged"] == true && st["hosts"][0]["version"] == 2
        }),
        "status never showed web01 converged at v2: {st:#}"
    );
    assert_eq!(h["host_id"], "web01");
    assert_eq!(h["state"], "up");

    assert_eq!(sigterm_and_wait(&mut d.0), Some(0), "SIGTERM must stop syncd cleanly\n{}", log(&s));
    assert!(
        wait_until(WAIT, || fleet_status(m.url())["hosts"][0]["state"] == "down"),
        "a stopped syncd is never marked down: {:#}",
        fleet_status(m.url())
    );
}

#[test]
fn survives_a_master_restart_and_an_unreachable_start() {
    let s = scratch();
    let images = images(&s);
    let root = s.dir("root");
    // A free port, nothing listening yet: syncd must keep trying, not exit.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut d = daemon(&s, &format!("http://{addr}"), &root);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(d.0.try_wait().unwrap().is_none(), "syncd exited while the master was away\n{}", log(&s));
    assert!(log(&s).contains("unreachable"), "the outage is not logged clearly\n{}", log(&s));

    let m = master(&s, &images, Some(&addr));
    assert!(wait_until(WAIT, || motd(&root) == "version 1\n"), "never converged once the master came\n{}", log(&s));

    drop(m);
    add_version(&images, 2);
    publish(&images, 2);
    let m = master(&s, &images, Some(&addr));
    assert!(wait_until(WAIT, || motd(&root) == "version 2\n"), "no convergence after the restart\n{}", log(&s));
    // Versions survive the restart: v1's number was persisted, v2 is the next one.
    assert_eq!(fleet_status(m.url())["image_version"], 2);
    assert_eq!(sigterm_and_wait(&mut d.0), Some(0));
}

#[test]
fn a_health_failed_report_reaches_a_master_that_was_down_when_the_pass_ended() {
    let s = scratch();
    let images = images(&s);
    let root = s.dir("root");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let m = master(&s, &images, Some(&addr));
    // The check waits (at most 20 s) until the test has stopped the master, then fails: the
    // pass's report finds no master.
    let (ran, gone) = (s.join("check-ran"), s.join("master-gone"));
    let script = format!(
        "echo run >> {}; i=0; while [ ! -e {} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo 'app: broken'; exit 1",
        ran.display(),
        gone.display()
    );
    let check = format!("[[health]]\nname = \"app\"\nrun = [\"/bin/sh\", \"-c\", {script:?}]\n");
    // No reconcile within the test: only the retried report can tell the master.
    let mut d = daemon_with(&s, &format!("http://{addr}"), &root, "1h", &check);
    assert!(wait_until(WAIT, || ran.exists()), "the health check never ran\n{}", log(&s));
    drop(m);
    fs::write(&gone, b"").unwrap();
    assert!(
        wait_until(WAIT, || log(&s).contains("cannot report the pass to the master")),
        "the lost report is not logged\n{}",
        log(&s)
    );
    // A few retries fail while the master is away.
    std::thread::sleep(Duration::from_millis(1500));

    let m = master(&s, &images, Some(&addr));
    let web01 = |st: &serde_json::Value| {
        st["hosts"].as_array().and_then(|hs| hs.iter().find(|h| h["host_id"] == "web01")).cloned().unwrap_or_default()
    };
    assert!(
        wait_until(WAIT, || web01(&fleet_status(m.url()))["last_pass"]["result"] == "health-failed"),
        "the master never heard of the failed check: {:#}\n{}",
        fleet_status(m.url()),
        log(&s)
    );
    let h = web01(&fleet_status(m.url()));
    let check = &h["last_pass"]["health"][0];
    assert_eq!((check["name"].as_str(), check["ok"].as_bool()), (Some("app"), Some(false)), "{h:#}");
    assert_eq!(check["output_tail"], "app: broken\n", "{h:#}");
    assert_eq!(fs::read_to_string(&ran).unwrap().lines().count(), 1, "the check ran more than once");
    assert!(log(&s).contains("pass report delivered"), "{}", log(&s));
    assert_eq!(sigterm_and_wait(&mut d.0), Some(0));
}

#[test]
fn the_host_index_never_hides_an_edit_that_kept_size_and_mtime() {
    let s = scratch();
    let img = s.dir("img");
    fs::create_dir_all(img.join("etc")).unwrap();
    fs::write(img.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    let root = s.dir("root");
    let m = Master::start(&img);
    let state = s.join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    gis_tests::sync(&m, &root, &args).expect_code(0, &[&root]);
    let again = gis_tests::sync(&m, &root, &args);
    again.expect_code(0, &[&root]);
    assert!(state.read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("host-index-")));

    // Same size, mtime put back (as `touch -r` would): only the ctime changed.
    let p = root.join("etc/passwd");
    let mtime = fs::metadata(&p).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&p, b"evil:x:0:0\n").unwrap();
    fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
    let out = gis_tests::sync(&m, &root, &args);
    out.expect_code(0, &[&root]);
    out.check(out.lists("etc/passwd"), "the index hid a content change", &[&root]);
    assert_eq!(fs::read(&p).unwrap(), b"root:x:0:0\n");
}

#[test]
fn a_damaged_host_index_is_rebuilt_with_a_warning() {
    let s = scratch();
    let img = s.dir("img");
    fs::write(img.join("motd"), b"hello\n").unwrap();
    let root = s.dir("root");
    let m = Master::start(&img);
    let state = s.join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    gis_tests::sync(&m, &root, &args).expect_code(0, &[&root]);
    // The first pass found an empty host: the second one has files to index.
    gis_tests::sync(&m, &root, &args).expect_code(0, &[&root]);
    let index = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("host-index-"));
    let index = index.expect("an index was written");
    fs::write(&index, b"GISHC01\nthis is not an index, it is a damaged file....").unwrap();
    fs::write(root.join("motd"), b"drift\n").unwrap();
    let out = gis_tests::sync(&m, &root, &args);
    out.expect_code(0, &[&root]);
    out.check(out.stderr.contains("damaged") && out.stderr.contains("rebuilding"), "no warning about the index", &[]);
    out.check(out.lists("motd"), "the drift was missed", &[&root]);
    assert_eq!(fs::read(root.join("motd")).unwrap(), b"hello\n");
}

//! Health checks, with real processes: run once per new version, after the triggers, in config
//! order, each under its timeout; a failure exits 9 and shows the tail of its output, and stays
//! the verdict (exit 9, shown again) on every later pass of that version.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gis_tests::{scratch, sync, Builder, Master, Output, Scratch};

fn image(s: &Scratch) -> PathBuf {
    let img = s.dir("img");
    Builder::new(&img).dir("etc", 0o755).file("etc/app.conf", 0o644, b"v1\n").file("etc/motd", 0o644, b"hello\n");
    img
}

/// Writes a syncd config holding `tables` (TOML `[[health]]` and `[[trigger]]` tables).
fn config(s: &Scratch, tables: &str) -> PathBuf {
    let p = s.join("syncd.toml");
    fs::write(&p, format!("state_dir = {:?}\n\n{tables}", s.join("state"))).unwrap();
    p
}

/// One `[[health]]` table running `script` under `/bin/sh -c` (an explicit argv: the shell is
/// the test's choice, not syncd's); `extra` adds keys (`timeout = …`).
fn check(name: &str, extra: &str, script: &str) -> String {
    format!("[[health]]\nname = {name:?}\nrun = [\"/bin/sh\", \"-c\", {script:?}]\n{extra}\n")
}

fn run(master: &Master, root: &Path, cfg: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    sync(master, root, &args)
}

fn lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

fn health_lines(out: &Output) -> Vec<&str> {
    out.stderr.lines().filter(|l| l.contains("health: ")).collect()
}

#[test]
fn a_new_version_runs_the_checks_once_in_order_and_a_failure_exits_9() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let log = s.join("log");
    let cfg = config(
        &s,
        &(check(
            "app",
            "",
            &format!("echo \"app $SYNCD_HEALTH $SYNCD_IMAGE_VERSION\" >> {}; echo all good", log.display()),
        ) + &check(
            "db",
            "timeout = \"10s\"\n",
            &format!("echo db >> {}; echo checking; echo broken >&2; exit 3", log.display()),
        )),
    );
    let master = Master::start(&img);
    let first = run(&master, &root, &cfg, &[]);
    first.expect_code(9, &[&root]);
    assert_eq!(fs::read(root.join("etc/app.conf")).unwrap(), b"v1\n", "the pass itself converged");
    assert_eq!(lines(&log), ["app app 1", "db"], "both checks ran, in config order, with their environment");
    let shown = health_lines(&first);
    first.check(
        shown.len() == 2
            && shown[0].starts_with("syncd: health: app ok (")
            && shown[0].ends_with(" s)")
            && shown[1] == "syncd: error: health: db FAILED: exit 3: broken",
        "not one line per check, or the failure without the last line of its output",
        &[],
    );

    // The same version again: no checks, but the stored failure is still the verdict.
    let second = run(&master, &root, &cfg, &[]);
    second.expect_code(9, &[&root]);
    assert_eq!(lines(&log).len(), 2, "the same version ran health checks again");
    let shown = health_lines(&second);
    second.check(
        shown.len() == 1
            && shown[0].starts_with("syncd: error: health: db FAILED on v1 at ")
            && shown[0].ends_with(" (not run again for the same version): exit 3: broken"),
        "the stored failure is not shown once, with its version and time",
        &[],
    );
    // Local drift repaired under the same version is not a new version either.
    fs::write(root.join("etc/motd"), b"drift\n").unwrap();
    run(&master, &root, &cfg, &[]).expect_code(9, &[&root]);
    assert_eq!(lines(&log).len(), 2, "a repair of drift ran health checks");
    drop(master);

    // A new version: a dry run of it runs none, the real pass runs them all again.
    fs::write(img.join("etc/app.conf"), b"v2\n").unwrap();
    let master = Master::start_version(&img, 2);
    run(&master, &root, &cfg, &["--dry-run"]).expect_code(0, &[&root]);
    assert_eq!(lines(&log).len(), 2, "a dry run ran health checks");
    let third = run(&master, &root, &cfg, &[]);
    third.expect_code(9, &[&root]);
    assert_eq!(lines(&log)[2..], ["app app 2", "db"]);
}

#[test]
fn a_failed_check_stays_the_verdict_of_its_version_until_a_new_version_passes() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let runs = s.join("runs");
    // Fails while the host has the v1 config: the version is bad, not the check.
    let script = format!(
        "echo run >> {}; if grep -q v1 {}; then echo starting; echo 'app: bad config' >&2; exit 1; fi; echo fine",
        runs.display(),
        root.join("etc/app.conf").display()
    );
    let cfg = config(&s, &check("app", "", &script));
    let master = Master::start(&img);
    let first = run(&master, &root, &cfg, &[]);
    first.expect_code(9, &[&root]);
    assert_eq!(lines(&runs).len(), 1);
    first.check(
        health_lines(&first) == ["syncd: error: health: app FAILED: exit 1: app: bad config"],
        "the failure is not shown",
        &[],
    );

    for _ in 0..2 {
        let again = run(&master, &root, &cfg, &[]);
        again.expect_code(9, &[&root]);
        assert_eq!(lines(&runs).len(), 1, "the check ran again for the same version");
        let shown = health_lines(&again);
        let stamp = shown
            .first()
            .and_then(|l| l.strip_prefix("syncd: error: health: app FAILED on v1 at "))
            .and_then(|l| l.strip_suffix(" (not run again for the same version): exit 1: app: bad config"));
        again.check(
            shown.len() == 1
                && stamp.is_some_and(|t| {
                    t.len() == 24 && t.starts_with("20") && t.as_bytes()[10] == b'T' && t.ends_with('Z')
                }),
            "the stored failure is not shown with its version and UTC time",
            &[],
        );
    }
    drop(master);

    // A new version whose check passes: exit 0, and the stored failure is gone.
    fs::write(img.join("etc/app.conf"), b"v2\n").unwrap();
    let master = Master::start_version(&img, 2);
    let fixed = run(&master, &root, &cfg, &[]);
    fixed.expect_code(0, &[&root]);
    assert_eq!(lines(&runs).len(), 2, "the new version did not run the check");
    fixed.check(
        health_lines(&fixed).len() == 1 && health_lines(&fixed)[0].starts_with("syncd: health: app ok ("),
        "the passing check is not shown",
        &[],
    );
    let after = run(&master, &root, &cfg, &[]);
    after.expect_code(0, &[&root]);
    after.check(health_lines(&after).is_empty(), "a stored result is still shown", &[]);
    assert_eq!(lines(&runs).len(), 2);
}

#[test]
fn a_check_past_its_timeout_is_reported_and_does_not_hang_the_pass() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let pidfile = s.join("child.pid");
    let script = format!("echo waiting; sleep 100 & echo $! > {}; sleep 100", pidfile.display());
    let cfg = config(&s, &(check("slow", "timeout = \"1s\"\n", &script) + &check("fast", "", "exit 0")));
    let master = Master::start(&img);
    let started = Instant::now();
    let out = run(&master, &root, &cfg, &[]);
    out.expect_code(9, &[&root]);
    assert!(started.elapsed() < Duration::from_secs(30), "the timeout did not stop the check");
    out.check(
        out.stderr
            .contains("syncd: error: health: slow FAILED: timed out after 1s; its process group was killed: waiting"),
        "the timeout is not reported with the output",
        &[],
    );
    out.check(out.stderr.contains("syncd: health: fast ok"), "the next check did not run after the timeout", &[]);
    let child: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let state = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
    let alive = state.split(") ").nth(1).is_some_and(|rest| !rest.starts_with('Z'));
    assert!(!alive, "the check's child {child} survived the timeout: {state}");
}

#[test]
fn checks_run_after_the_triggers_even_when_one_failed_and_the_trigger_code_wins() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let log = s.join("log");
    let trigger = format!(
        "[[trigger]]\nname = \"reload\"\nwatch = [\"/etc/\"]\nrun = [\"/bin/sh\", \"-c\", {:?}]\n\n",
        format!("echo trigger >> {}; exit 1", log.display())
    );
    let cfg = config(&s, &(trigger + &check("app", "", &format!("echo health >> {}", log.display()))));
    let master = Master::start(&img);
    let out = run(&master, &root, &cfg, &[]);
    out.expect_code(5, &[&root]);
    assert_eq!(lines(&log), ["trigger", "health"], "the check ran after the trigger");
    out.check(out.stderr.contains("syncd: health: app ok ("), "the health result is not shown", &[]);
}

#[test]
fn bad_health_config_is_refused_naming_the_check_and_the_key() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let master = Master::start(&img);
    for (body, want) in [
        (
            "name = \"app\"\nrun = \"curl -f http://localhost/\"",
            "health check \"app\": key `run`: must be a non-empty argv list",
        ),
        ("run = [\"true\"]", "health check \"#1\": key `name`"),
        ("name = \"app\"\nrun = [\"/no/such/check\"]", "health check \"app\": key `run`: command \"/no/such/check\""),
        ("name = \"app\"\nrun = [\"true\"]\ntimeout = \"soon\"", "health check \"app\": key `timeout`"),
    ] {
        let cfg = config(&s, &format!("[[health]]\n{body}\n"));
        let out = run(&master, &root, &cfg, &[]);
        out.expect_code(2, &[&root]);
        out.check(out.stderr.contains(want), format!("the error does not name {want}"), &[]);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "syncd changed the host despite a bad config");
    }
}

//! Shell triggers, with real processes: once per batch, in config order, with a timeout over
//! the whole process group, retried until they succeed, and not lost to a crash.

use std::fs;
use std::path::{Path, PathBuf};

use gis_tests::{converged_host, scratch, sync, Builder, Master, Output, Scratch};

/// An image with three watched files and one unwatched one.
fn image(s: &Scratch) -> PathBuf {
    let img = s.dir("img");
    Builder::new(&img)
        .dir("etc", 0o755)
        .dir("etc/ssh", 0o755)
        .file("etc/ssh/sshd_config", 0o644, b"Port 22\n")
        .file("etc/ssh/a.conf", 0o644, b"a\n")
        .file("etc/ssh/b.conf", 0o644, b"b\n")
        .file("etc/motd", 0o644, b"hello\n");
    img
}

/// Writes a syncd config holding `triggers` (TOML `[[trigger]]` tables).
fn config(s: &Scratch, triggers: &str) -> PathBuf {
    let p = s.join("syncd.toml");
    fs::write(&p, format!("state_dir = {:?}\n\n{triggers}", s.join("state"))).unwrap();
    p
}

fn run(master: &Master, root: &Path, cfg: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    sync(master, root, &args)
}

fn lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}

fn sh(script: &str) -> String {
    format!("run = [\"sh\", \"-c\", {script:?}]")
}

/// One `[[trigger]]` table running `script` under `sh -c`; `extra` adds keys (`timeout = …`).
fn trigger(name: &str, watch: &str, extra: &str, script: &str) -> String {
    format!("[[trigger]]\nname = {name:?}\nwatch = [{watch:?}]\n{extra}{}\n", sh(script))
}

/// Drifts the three watched files on the host.
fn drift_watched(root: &Path) {
    for f in ["etc/ssh/sshd_config", "etc/ssh/a.conf", "etc/ssh/b.conf"] {
        fs::write(root.join(f), b"drifted\n").unwrap();
    }
}

#[test]
fn fires_once_per_batch_with_every_changed_path() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let (marker, changes, env) = (s.join("marker"), s.join("changes"), s.join("env"));
    let script = format!(
        "echo fired >> {m}; cat \"$SYNCD_CHANGES\" >> {c}; echo \"$SYNCD_TRIGGER $SYNCD_IMAGE_VERSION\" >> {e}",
        m = marker.display(),
        c = changes.display(),
        e = env.display()
    );
    let cfg = config(&s, &trigger("ssh", "/etc/ssh/", "", &script));
    let master = Master::start(&img);
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert_eq!(lines(&marker), ["fired"], "the cold sync changed watched files: one firing");
    fs::remove_file(&marker).unwrap();
    fs::remove_file(&changes).unwrap();

    drift_watched(&root);
    let out = run(&master, &root, &cfg, &[]);
    out.expect_code(0, &[&root]);
    out.check(out.stderr.contains("trigger ssh: exit 0 (3 changes"), "the trigger's result is not reported", &[]);
    assert_eq!(lines(&marker), ["fired"], "three watched changes in one batch fire once");
    let recs: Vec<serde_json::Value> = lines(&changes).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut paths: Vec<&str> = recs.iter().map(|r| r["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, ["/etc/ssh/a.conf", "/etc/ssh/b.conf", "/etc/ssh/sshd_config"]);
    for r in &recs {
        assert_eq!(r["change"], "content");
        assert_eq!(r["old_hash"].as_str().map(str::len), Some(64), "{r}");
        assert_eq!(r["new_hash"].as_str().map(str::len), Some(64), "{r}");
    }
    assert_eq!(lines(&env).last().map(String::as_str), Some("ssh 1"));
}

#[test]
fn does_not_fire_when_nothing_watched_changed() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let marker = s.join("marker");
    let cfg = config(&s, &trigger("ssh", "/etc/ssh/", "", &format!("echo fired >> {}", marker.display())));
    let master = Master::start(&img);
    converged_host(&master, &img, &root);
    fs::write(root.join("etc/motd"), b"drift\n").unwrap();
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert!(lines(&marker).is_empty(), "an unwatched change fired a trigger");
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert!(lines(&marker).is_empty(), "a pass with no change fired a trigger");
}

#[test]
fn triggers_fire_in_config_order() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let log = s.join("log");
    let t = |name: &str, watch: &str| {
        format!(
            "[[trigger]]\nname = \"{name}\"\nwatch = [\"{watch}\"]\n{}\n",
            sh(&format!("echo {name} >> {}", log.display()))
        )
    };
    let cfg = config(&s, &format!("{}{}{}", t("zeta", "/etc/ssh/a.conf"), t("alpha", "*.conf"), t("mid", "/etc/")));
    let master = Master::start(&img);
    converged_host(&master, &img, &root);
    drift_watched(&root);
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert_eq!(lines(&log), ["zeta", "alpha", "mid"]);
}

#[test]
fn a_timed_out_trigger_is_killed_with_its_children_and_reported() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let pidfile = s.join("child.pid");
    let script = format!("sleep 100 & echo $! > {}; sleep 100", pidfile.display());
    let cfg = config(&s, &trigger("slow", "/etc/", "timeout = \"1s\"\n", &script));
    let master = Master::start(&img);
    let started = std::time::Instant::now();
    let out = run(&master, &root, &cfg, &[]);
    out.expect_code(5, &[&root]);
    assert!(started.elapsed().as_secs() < 30, "the timeout did not stop the trigger");
    out.check(out.stderr.contains("trigger slow: timed out after 1s"), "the timeout is not reported", &[]);
    let child: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // The background child was in the trigger's process group: it must be gone (or a zombie
    // waiting for init to reap it), not sleeping on.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let state = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
    let alive = state.split(") ").nth(1).is_some_and(|rest| !rest.starts_with('Z'));
    assert!(!alive, "the trigger's child {child} survived the timeout: {state}");
}

#[test]
fn a_failing_trigger_stays_pending_and_is_retried_until_it_succeeds() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let (marker, ok) = (s.join("marker"), s.join("ok"));
    let script = format!("echo run >> {}; test -e {}", marker.display(), ok.display());
    let cfg = config(&s, &trigger("flaky", "/etc/ssh/", "", &script));
    let master = Master::start(&img);
    let first = run(&master, &root, &cfg, &[]);
    first.expect_code(5, &[&root]);
    first.check(first.stderr.contains("trigger flaky: exit 1"), "the failure is not reported", &[]);
    // Nothing changes now, but the pending trigger runs again.
    run(&master, &root, &cfg, &[]).expect_code(5, &[&root]);
    assert_eq!(lines(&marker).len(), 2, "the failed trigger was not retried on the next pass");
    fs::write(&ok, b"").unwrap();
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert_eq!(lines(&marker).len(), 3);
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert_eq!(lines(&marker).len(), 3, "a trigger that succeeded ran again");
}

#[test]
fn a_crash_between_commit_and_trigger_still_fires_it_once() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let (killed, marker) = (s.join("killed"), s.join("marker"));
    // The first trigger kills syncd (its parent) with SIGKILL the first time it runs: the
    // changes are committed, the second trigger has not run.
    let killer = format!("if [ ! -e {k} ]; then touch {k}; kill -9 $PPID; sleep 5; fi", k = killed.display());
    let cfg = config(
        &s,
        &(trigger("killer", "/etc/ssh/", "", &killer)
            + &trigger("reload", "/etc/ssh/sshd_config", "", &format!("echo reload >> {}", marker.display()))),
    );
    let master = Master::start(&img);
    converged_host(&master, &img, &root);
    drift_watched(&root);
    let crashed = run(&master, &root, &cfg, &[]);
    crashed.check(crashed.code == -1, "syncd was expected to die by SIGKILL", &[&root]);
    assert!(lines(&marker).is_empty(), "the second trigger ran before the crash");
    assert_eq!(fs::read(root.join("etc/ssh/sshd_config")).unwrap(), b"Port 22\n", "the change was committed");

    let restarted = run(&master, &root, &cfg, &[]);
    restarted.expect_code(0, &[&root]);
    restarted.check(restarted.lines().is_empty(), "nothing was left to change", &[&root]);
    assert_eq!(lines(&marker), ["reload"], "the pending trigger fired once after the restart");
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    assert_eq!(lines(&marker), ["reload"], "it fired again on a later pass");
}

#[test]
fn a_file_name_never_reaches_a_shell() {
    let s = scratch();
    let img = s.dir("img");
    let root = s.dir("root");
    let name = "$(touch gis-pwned)";
    Builder::new(&img).dir("etc", 0o755).file(format!("etc/{name}"), 0o644, b"x\n").file(
        "etc/`touch gis-pwned2`",
        0o644,
        b"y\n",
    );
    let got = s.join("got");
    let cfg = config(&s, &trigger("echo", "/etc/", "", &format!("cat \"$SYNCD_CHANGES\" > {}", got.display())));
    let master = Master::start(&img);
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    let cwd = std::env::current_dir().unwrap();
    assert!(!cwd.join("gis-pwned").exists() && !cwd.join("gis-pwned2").exists(), "a file name was executed");
    let text = fs::read_to_string(&got).unwrap();
    assert!(text.contains(name), "the trigger did not receive the literal name: {text}");
}

#[test]
fn dry_run_lists_what_would_fire_and_runs_nothing() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let marker = s.join("marker");
    let cfg = config(&s, &trigger("ssh", "/etc/ssh/sshd_config", "", &format!("echo x >> {}", marker.display())));
    let master = Master::start(&img);
    let out = run(&master, &root, &cfg, &["--dry-run"]);
    out.expect_code(0, &[&root]);
    out.check(
        out.stderr.contains("trigger ssh would fire: /etc/ssh/sshd_config (create)"),
        "the dry run does not say which trigger would fire and why",
        &[],
    );
    assert!(lines(&marker).is_empty(), "a dry run ran a trigger");
    assert!(!s.join("state").exists(), "a dry run created the state dir");
}

#[test]
fn bad_trigger_config_is_refused_naming_trigger_and_key() {
    let s = scratch();
    let (img, root) = (image(&s), s.dir("root"));
    let master = Master::start(&img);
    for (body, want) in [
        ("name = \"a\"\nwatch = [\"/etc/\"]\nrun = \"systemctl reload ssh\"", "trigger \"a\": key `run`"),
        ("name = \"a\"\nwatch = [\"/etc/[\"]\nrun = [\"true\"]", "trigger \"a\": key `watch`"),
        (
            "name = \"a\"\nwatch = [\"/etc/\"]\nrun = [\"/no/such/cmd\"]",
            "trigger \"a\": key `run`: command \"/no/such/cmd\"",
        ),
    ] {
        let cfg = config(&s, &format!("[[trigger]]\n{body}\n"));
        let out = run(&master, &root, &cfg, &[]);
        out.expect_code(2, &[&root]);
        out.check(out.stderr.contains(want), format!("the error does not name {want}"), &[]);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "syncd changed the host despite a bad config");
    }
}

#[test]
fn a_damaged_trigger_journal_is_exit_12_naming_it_and_nothing_changes() {
    let s = scratch();
    let master = Master::start(&image(&s));
    let root = s.dir("root");
    let cfg = config(&s, &trigger("sshd", "/etc/ssh/", "", "true"));
    run(&master, &root, &cfg, &[]).expect_code(0, &[&root]);
    drift_watched(&root);
    let journal = s.join("state/pending-triggers.json");
    fs::write(&journal, b"{ not json").unwrap();
    let out = run(&master, &root, &cfg, &[]);
    out.expect_code(12, &[&root]);
    out.check(out.stderr.contains(journal.to_str().unwrap()), "the error does not name the journal", &[]);
    assert_eq!(fs::read(root.join("etc/ssh/a.conf")).unwrap(), b"drifted\n", "the pass went on");
    // drift reports it with its own code for "no report: syncd's state".
    let cfg_arg = cfg.to_str().unwrap();
    let out = gis_tests::run_syncd([
        "drift",
        "--insecure",
        "--master",
        master.url(),
        "--root",
        root.to_str().unwrap(),
        "--config",
        cfg_arg,
    ]);
    assert_eq!(out.code, 21, "{}", out.stderr);
}

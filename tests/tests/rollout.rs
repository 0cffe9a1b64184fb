//! Fleet rollouts with real daemons: one master and twelve `syncd run` processes, each with its
//! own root, state dir and host id, under a policy of one canary, then 25 %, then the rest,
//! `max_concurrent` 3. What is asserted comes from the master's event log and from the trees
//! (our comparator and `rsync -aHAXcn`), never from timing:
//! - a good version reaches nobody but the canary until the canary soaked, never has more than
//!   three hosts in progress, and ends on every host byte for byte;
//! - a bad version (its health check fails on the canary) halts with 0 other hosts changed, the
//!   status names the host and the check, and `abort` brings the canary back to the previous
//!   tree without `--allow-downgrade`; a replayed older signed manifest is still refused;
//! - a master SIGKILLed in the middle of a wave resumes in that wave, the cap holds across the
//!   restart, and no host is granted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gis_tests::fake::{FakeMaster, Image};
use gis_tests::tree::{differences, rsync_differences};
use gis_tests::{
    bin, capture_manifest, fleet_status, http_get, promtool_check, run_syncd, samples, scratch, spawn_syncd_run,
    wait_until, KillOnDrop, Master, Scratch,
};
use serde_json::Value;

const HOSTS: usize = 12;
const WAIT: Duration = Duration::from_secs(90);

fn host(i: usize) -> String {
    format!("h{i:02}")
}

/// `IMAGES/vN`: a small tree with a file that differs per version, a shared file, a symlink and
/// a hard link, and the app status the health check reads.
fn add_version(images: &Path, n: u32, status: &str) {
    let v = images.join(format!("v{n}"));
    fs::create_dir_all(v.join("etc/app")).unwrap();
    fs::create_dir_all(v.join("usr/bin")).unwrap();
    fs::write(v.join("etc/motd"), format!("version {n}\n")).unwrap();
    fs::write(v.join("etc/app/status"), format!("{status}\n")).unwrap();
    fs::write(v.join("usr/bin/tool"), format!("#!/bin/sh\necho tool {n}\n")).unwrap();
    fs::hard_link(v.join("usr/bin/tool"), v.join("usr/bin/tool-again")).unwrap();
    std::os::unix::fs::symlink("../usr/bin/tool", v.join("etc/tool-link")).unwrap();
    fs::write(v.join("etc/shared"), b"same in every version\n").unwrap();
}

fn publish(images: &Path, n: u32) {
    let tmp = images.join("current.new");
    std::os::unix::fs::symlink(format!("v{n}"), &tmp).unwrap();
    fs::rename(&tmp, images.join("current")).unwrap();
}

const INVENTORY_TAIL: &str = r#"
[rollout]
timeout = "60s"
max_failures = 1

[[rollout.wave]]
name = "canary"
groups = ["canary"]
soak = "3s"

[[rollout.wave]]
name = "early"
percent = 25
max_concurrent = 3
soak = "2s"

[[rollout.wave]]
name = "rest"
percent = 100
max_concurrent = 3
"#;

struct Fleet {
    s: Scratch,
    images: PathBuf,
    key: PathBuf,
    public: String,
    master: Option<Master>,
    listen: String,
    daemons: BTreeMap<String, KillOnDrop>,
}

impl Fleet {
    fn new() -> Fleet {
        let s = scratch();
        let images = s.dir("images");
        let key = s.join("signing.key");
        let out = Command::new(bin("syncmaster")).args(["keygen", "--out"]).arg(&key).output().unwrap();
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let mut inv = String::from("[groups.canary]\n\n");
        for i in 1..=HOSTS {
            let groups = if i == 1 { "[\"canary\"]" } else { "[]" };
            inv.push_str(&format!("[hosts.{}]\ngroups = {groups}\n\n", host(i)));
        }
        inv.push_str(INVENTORY_TAIL);
        fs::write(s.join("hosts.toml"), inv).unwrap();
        Fleet { s, images, key, public, master: None, listen: "127.0.0.1:0".into(), daemons: BTreeMap::new() }
    }

    fn start_master(&mut self) {
        let state = self.s.join("master-state");
        let hosts = self.s.join("hosts.toml");
        let args: Vec<&OsStr> = vec![
            OsStr::new("--images"),
            self.images.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
            OsStr::new("--hosts"),
            hosts.as_os_str(),
            OsStr::new("--signing-key"),
            self.key.as_os_str(),
            OsStr::new("--poll"),
            OsStr::new("200ms"),
            OsStr::new("--down-after"),
            OsStr::new("10s"),
            OsStr::new("--cache-level"),
            OsStr::new("0"),
            OsStr::new("--listen"),
            OsStr::new(&self.listen),
            OsStr::new("--metrics-listen"),
            OsStr::new("127.0.0.1:0"),
        ];
        let m = Master::start_with(&args);
        self.listen = m.url().trim_start_matches("http://").to_owned();
        self.master = Some(m);
    }

    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn root(&self, h: &str) -> PathBuf {
        self.s.join(format!("{h}/root"))
    }

    fn start_daemon(&mut self, h: &str) {
        let dir = self.s.join(h);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let cfg = dir.join("syncd.toml");
        let status = root.join("etc/app/status");
        fs::write(
            &cfg,
            format!(
                "master = {:?}\nroot = {root:?}\nhost_id = {h:?}\nstate_dir = {:?}\ntrusted_keys = [{:?}]\n\
                 reconcile_interval = \"3s\"\nreconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\nmax_backoff = \"1s\"\n\
                 [[health]]\nname = \"app\"\nrun = [\"/bin/sh\", \"-c\", \"read s < {} && [ \\\"$s\\\" = ok ] || {{ echo \\\"app: status is $s\\\"; exit 1; }}\"]\ntimeout = \"10s\"\n\
                 [[health]]\nname = \"settle\"\nrun = [\"/bin/sleep\", \"0.3\"]\n",
                self.url(),
                dir.join("state"),
                self.public,
                status.display(),
            ),
        )
        .unwrap();
        let log = fs::OpenOptions::new().create(true).append(true).open(dir.join("syncd.log")).unwrap();
        self.daemons.insert(h.to_owned(), spawn_syncd_run(&cfg, log));
    }

    fn syncmaster(&self, args: &[&str]) -> (i32, String, String) {
        let out =
            Command::new(bin("syncmaster")).args(args).args(["--master", &self.url(), "--insecure"]).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn rollout(&self) -> Value {
        let (code, out, err) = self.syncmaster(&["rollout", "status", "--format", "json"]);
        assert_eq!(code, 0, "rollout status: {err}");
        serde_json::from_str(&out).unwrap()
    }

    fn events(&self) -> Vec<Value> {
        let (code, out, err) = self.syncmaster(&["rollout", "log", "--format", "json"]);
        assert_eq!(code, 0, "rollout log: {err}");
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Waits until the newest rollout is of `version` and in `state`.
    fn wait_rollout(&self, version: u64, state: &str) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(WAIT, || {
            last = self.rollout();
            last["rollout"]["version"] == version && last["rollout"]["state"] == state
        });
        assert!(ok, "rollout of v{version} never became {state}: {last:#}\n{}", self.diagnostics());
        last
    }

    fn diagnostics(&self) -> String {
        let mut d = String::new();
        if let Some(m) = &self.master {
            let e = m.stderr();
            d.push_str(&format!("--- master log (tail)\n{}\n", tail(&e, 60)));
        }
        for h in self.daemons.keys().take(3) {
            let l = fs::read_to_string(self.s.join(format!("{h}/syncd.log"))).unwrap_or_default();
            d.push_str(&format!("--- {h} log (tail)\n{}\n", tail(&l, 15)));
        }
        d
    }

    /// Every host's root against `IMAGES/vN`: our comparator, and rsync when installed.
    fn assert_identical(&self, hosts: impl IntoIterator<Item = String>, n: u32, what: &str) {
        let img = self.images.join(format!("v{n}"));
        for h in hosts {
            let root = self.root(&h);
            let diffs = differences(&img, &root);
            assert!(
                diffs.is_empty(),
                "{what}: {h} differs from v{n} in {} ways: {:?}",
                diffs.len(),
                &diffs[..diffs.len().min(5)]
            );
            if let Some(r) = rsync_differences(&img, &root) {
                assert!(r.is_empty(), "{what}: rsync -aHAXcn finds {h} differs from v{n}:\n{r}");
            }
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn all_hosts() -> Vec<String> {
    (1..=HOSTS).map(host).collect()
}

/// The rollout's events of `kind`, in log order.
fn of_kind<'a>(events: &'a [Value], rollout: u64, kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["rollout"] == rollout && e["kind"] == kind).collect()
}

/// The most hosts ever in progress (granted, not yet converged nor failed), from the log.
fn max_in_progress(events: &[Value], rollout: u64) -> usize {
    let mut open = BTreeSet::new();
    let mut max = 0;
    for e in events.iter().filter(|e| e["rollout"] == rollout) {
        let h = e["host_id"].as_str().unwrap_or_default().to_owned();
        match e["kind"].as_str().unwrap() {
            "grant" => {
                open.insert(h);
            }
            "converged" | "failed" | "retarget" => {
                open.remove(&h);
            }
            _ => {}
        }
        max = max.max(open.len());
    }
    max
}

/// Every host granted at most once in the rollout; returns the granted hosts in order.
fn granted_once(events: &[Value], rollout: u64) -> Vec<String> {
    let grants: Vec<String> =
        of_kind(events, rollout, "grant").iter().map(|e| e["host_id"].as_str().unwrap().to_owned()).collect();
    let unique: BTreeSet<&String> = grants.iter().collect();
    assert_eq!(unique.len(), grants.len(), "a host was granted twice in rollout #{rollout}: {grants:?}");
    grants
}

fn id_of(e: &Value) -> u64 {
    e["id"].as_u64().unwrap()
}

#[test]
fn canary_waves_halt_abort_and_a_master_killed_mid_wave() {
    let mut f = Fleet::new();
    add_version(&f.images, 1, "ok");
    add_version(&f.images, 2, "ok");
    add_version(&f.images, 3, "broken");
    add_version(&f.images, 4, "ok");
    fs::write(f.images.join("v4/etc/new-in-v4"), b"new\n").unwrap();
    publish(&f.images, 1);
    f.start_master();
    for h in all_hosts() {
        f.start_daemon(&h);
    }

    // v1 is the first version: the baseline, every host at once.
    let ok = wait_until(WAIT, || {
        let st = fleet_status(&f.url());
        st["hosts"].as_array().unwrap().iter().filter(|h| h["converged"] == true && h["version"] == 1).count() == HOSTS
    });
    assert!(ok, "the fleet never converged to v1: {:#}\n{}", fleet_status(&f.url()), f.diagnostics());
    f.assert_identical(all_hosts(), 1, "the first version");

    // --- A good version: canary, soak, then waves of at most 3 in progress.
    publish(&f.images, 2);
    let st = f.wait_rollout(2, "completed");
    let rollout = st["rollout"]["id"].as_u64().unwrap();
    let events = f.events();
    let grants = granted_once(&events, rollout);
    assert_eq!(grants.len(), HOSTS, "every host granted once: {grants:?}");
    assert_eq!(grants[0], "h01", "the canary first");
    let canary_done = of_kind(&events, rollout, "wave-done").into_iter().find(|e| e["wave"] == 0).expect("wave 0 done");
    for g in of_kind(&events, rollout, "grant").into_iter().skip(1) {
        assert!(id_of(g) > id_of(canary_done), "{} was granted before the canary soaked: {g}", g["host_id"]);
    }
    let soaking = of_kind(&events, rollout, "wave-soaking").into_iter().find(|e| e["wave"] == 0).unwrap();
    assert!(
        canary_done["at_unix_ms"].as_i64().unwrap() - soaking["at_unix_ms"].as_i64().unwrap() >= 3000,
        "the canary's soak of 3 s was cut short"
    );
    let max = max_in_progress(&events, rollout);
    assert!(max <= 3, "{max} hosts were in progress at once (max_concurrent 3)");
    assert_eq!(of_kind(&events, rollout, "succeeded").len(), HOSTS);
    assert_eq!(st["baseline_version"], 2);
    f.assert_identical(all_hosts(), 2, "after the good rollout");

    // --- A bad version: the canary's health check fails; the rollout halts; nobody else moves.
    publish(&f.images, 3);
    let st = f.wait_rollout(3, "halted");
    let rollout = st["rollout"]["id"].as_u64().unwrap();
    let halt = &st["rollout"]["halt"];
    let failures = halt["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{halt:#}");
    assert_eq!(failures[0]["host_id"], "h01");
    assert_eq!(failures[0]["check"], "app", "{halt:#}");
    assert!(failures[0]["output_tail"].as_str().unwrap().contains("app: status is broken"), "{halt:#}");
    let (code, text, _) = f.syncmaster(&["rollout", "status"]);
    assert_eq!(code, 0);
    assert!(text.contains("HALTED") && text.contains("h01") && text.contains("health check \"app\" failed"), "{text}");
    // The master's metrics say the same (checked by promtool).
    let (status, body) = http_get(f.master.as_ref().unwrap().metrics_url().unwrap());
    assert!(status.contains("200"), "{status}");
    let prom = f.s.join("master.prom");
    fs::write(&prom, &body).unwrap();
    promtool_check(&prom);
    let v = samples(&body);
    assert_eq!(v["syncmaster_rollout_state{state=\"halted\"}"], 1.0, "{body}");
    assert_eq!(v["syncmaster_rollout_state{state=\"running\"}"], 0.0, "{body}");
    assert_eq!(v["syncmaster_rollout_version"], 3.0, "{body}");
    assert_eq!(v["syncmaster_rollout_failures"], 1.0, "{body}");
    assert_eq!(v["syncmaster_baseline_version"], 2.0, "{body}");
    assert_eq!(v["syncmaster_hosts{state=\"up\"}"], HOSTS as f64, "{body}");
    // Give a wrong implementation the time to grant more, then look.
    std::thread::sleep(Duration::from_secs(3));
    let events = f.events();
    assert_eq!(granted_once(&events, rollout), ["h01"], "only the canary was granted the bad version");
    f.assert_identical(all_hosts().into_iter().skip(1), 2, "the other hosts while the bad version halted");
    assert_eq!(fs::read_to_string(f.root("h01").join("etc/app/status")).unwrap(), "broken\n", "the canary took v3");
    let captured_v3 = capture_manifest(&f.url(), "h01");

    // resume/abort errors change nothing; then abort rolls the canary back.
    let (code, _, err) = f.syncmaster(&["rollout", "pause"]);
    assert_eq!(code, 4, "pausing a halted rollout is refused: {err}");
    assert!(err.contains("halted"), "{err}");
    let (code, out, err) = f.syncmaster(&["rollout", "abort", "--reason", "v3 breaks the app"]);
    assert_eq!(code, 0, "abort: {out}{err}");
    let st = f.rollout();
    assert_eq!(st["rollout"]["state"], "aborted");
    let rollback = st["rollout"]["rollback_versions"][0].as_u64().expect("a rollback version");
    assert!(rollback > 3, "the rollback re-publishes v2's tree under a new, higher number: {rollback}");
    let (code, _, err) = f.syncmaster(&["rollout", "abort"]);
    assert_eq!(code, 4, "nothing left to abort: {err}");
    let (code, _, err) = f.syncmaster(&["rollout", "resume"]);
    assert_eq!(code, 4, "nothing to resume: {err}");
    let ok = wait_until(WAIT, || {
        let st = fleet_status(&f.url());
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["host_id"] == "h01" && h["converged"] == true && h["version"] == rollback)
    });
    assert!(ok, "the canary never converged to the rollback: {:#}\n{}", fleet_status(&f.url()), f.diagnostics());
    f.assert_identical(["h01".to_owned()], 2, "the canary after abort (no --allow-downgrade anywhere)");
    let events = f.events();
    let aborted = of_kind(&events, rollout, "aborted");
    assert_eq!(aborted.len(), 1);
    assert!(aborted[0]["caller"].as_str().unwrap().starts_with("127.0.0.1:"), "the caller is logged: {}", aborted[0]);

    // A replayed older signed manifest (v3, signed by the real master) is still refused.
    drop(f.daemons.remove("h01"));
    let v3_image = Image::scan(&f.images.join("v3"), 3);
    let fake = FakeMaster::start(captured_v3, v3_image.honest());
    let h01 = f.s.join("h01");
    let out = run_syncd([
        OsStr::new("sync"),
        OsStr::new("--master"),
        OsStr::new(fake.url()),
        OsStr::new("--insecure"),
        OsStr::new("--host-id"),
        OsStr::new("h01"),
        OsStr::new("--root"),
        h01.join("root").as_os_str(),
        OsStr::new("--state-dir"),
        h01.join("state").as_os_str(),
        OsStr::new("--trusted-key"),
        OsStr::new(&f.public),
    ]);
    assert_eq!(out.code, 4, "a replayed v3 manifest must be refused: {}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("rollback"), "{}", out.stderr);
    f.assert_identical(["h01".to_owned()], 2, "the canary after the replay");
    drop(fake);
    f.start_daemon("h01");

    // --- A master SIGKILLed in the middle of a wave, then restarted on the same address.
    publish(&f.images, 4);
    let mut killed_in_wave = None;
    let ok = wait_until(WAIT, || {
        let st = f.rollout();
        let r = &st["rollout"];
        if r["version"] != 5 || r["state"] != "running" {
            return false;
        }
        let w = r["current_wave"].as_u64().unwrap();
        let granted =
            r["waves"][w as usize]["hosts"].as_array().unwrap().iter().filter(|h| h["state"] != "waiting").count();
        let size = r["waves"][w as usize]["hosts"].as_array().unwrap().len();
        if w == 2 && granted >= 1 && granted < size {
            killed_in_wave = Some(w);
            true
        } else {
            false
        }
    });
    assert!(ok, "never caught the last wave mid-way: {:#}\n{}", f.rollout(), f.diagnostics());
    let before_kill = f.events();
    let pid = f.master.as_ref().unwrap().pid();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    drop(f.master.take());
    f.start_master();
    let st = f.wait_rollout(5, "completed");
    let rollout = st["rollout"]["id"].as_u64().unwrap();
    let events = f.events();
    assert!(events.len() > before_kill.len() && events[..before_kill.len()] == before_kill[..], "the log survived");
    let started = events.iter().rfind(|e| e["kind"] == "master-started").expect("a master-started event");
    assert!(
        started["detail"].as_str().unwrap().contains(&format!("wave {}", killed_in_wave.unwrap())),
        "resumed in the wave it was killed in: {started}"
    );
    let grants = granted_once(&events, rollout);
    assert_eq!(grants.len(), HOSTS, "{grants:?}");
    let max = max_in_progress(&events, rollout);
    assert!(max <= 3, "{max} hosts in progress at once across the restart");
    f.assert_identical(all_hosts(), 4, "after the rollout the master was killed in");
    // Every host's last report is still shown after the restart.
    let st = fleet_status(&f.url());
    assert_eq!(st["hosts"].as_array().unwrap().len(), HOSTS);
    assert!(st["hosts"].as_array().unwrap().iter().all(|h| h["target_version"] == 5 && h["last_pass"].is_object()));

    // A fleet rollback of the completed rollout, by the restarted master: every host goes back
    // to the tree it had (v2's, under new numbers), and so does the baseline.
    let (code, out, err) = f.syncmaster(&["rollout", "abort", "--reason", "fleet rollback"]);
    assert_eq!(code, 0, "abort of the completed rollout after a restart: {out}{err}\n{}", f.diagnostics());
    let st = f.rollout();
    let baseline = st["baseline_version"].as_u64().unwrap();
    assert!(baseline > 5, "the baseline is v2's tree under a new number: {st:#}");
    let ok = wait_until(WAIT, || {
        let st = fleet_status(&f.url());
        st["hosts"].as_array().unwrap().iter().all(|h| h["converged"] == true && h["target_version"].as_u64() > Some(5))
    });
    assert!(ok, "the fleet never converged back: {:#}\n{}", fleet_status(&f.url()), f.diagnostics());
    f.assert_identical(all_hosts(), 2, "after the fleet rollback");
}

#[test]
fn a_policy_with_mistakes_is_refused_at_start_naming_file_line_and_value() {
    let s = scratch();
    let img = s.dir("img");
    fs::write(img.join("f"), b"x").unwrap();
    let cases = [
        ("[hosts.a]\n[rollout]\n[[rollout.wave]]\nname = \"w\"\nhosts = [\"nobody\"]\n", "nobody"),
        ("[hosts.a]\n[rollout]\n[[rollout.wave]]\nname = \"w\"\npercent = 150\n", "150"),
        ("[hosts.a]\n[rollout]\ntimeout = \"soon\"\n[[rollout.wave]]\nname = \"w\"\npercent = 100\n", "soon"),
    ];
    let cases = cases
        .into_iter()
        .chain([("[hosts.a]\n[rollout]\n[[rollout.wave]]\nname = \"w\"\npercent = 100\n", "which needs --images DIR")]);
    for (text, value) in cases {
        let inv = s.join("hosts.toml");
        fs::write(&inv, text).unwrap();
        let out = Command::new(bin("syncmaster"))
            .args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--image"])
            .arg(&img)
            .arg("--hosts")
            .arg(&inv)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains("hosts.toml") && err.contains(value),
            "{text}: the error names file, line and value: {err}"
        );
    }
}

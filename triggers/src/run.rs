//! Running one trigger: its own process group, a timeout that takes the whole group down, and
//! its output logged line by line under its name. [`supervise`] (the process group and the
//! timeout) serves health checks too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Pending, Trigger};

/// How long a timed-out trigger's process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct RunResult {
    pub trigger: String,
    pub ok: bool,
    /// `exit 0`, `exit 3`, `killed by signal 9`, `timed out after 1s`, or why it could not start.
    pub status: String,
    pub duration: Duration,
    pub changes: usize,
}

/// What the triggers did after a commit: each one run, and those still waiting for their
/// retry backoff.
#[derive(Debug, Default)]
pub struct AfterCommit {
    pub results: Vec<RunResult>,
    pub deferred: Vec<String>,
}

/// After a commit: withdraws from `journal` this `batch`'s changes that were not made
/// (`committed` says which paths were), drops pending triggers no longer in `triggers`, then
/// runs every pending trigger in config order, removing each from the journal only when it
/// exits 0. A trigger still in its retry backoff waits unless `retry_now`. A journal that
/// cannot be written stops there, reported as the `(journal)` result.
pub fn after_commit(
    journal: &mut crate::Journal,
    triggers: &[Trigger],
    batch: u64,
    committed: impl Fn(&str) -> bool,
    retry_now: bool,
) -> AfterCommit {
    let mut out = AfterCommit::default();
    let journal_error = |e: crate::journal::JournalError| RunResult {
        trigger: "(journal)".into(),
        ok: false,
        status: e.to_string(),
        duration: Duration::ZERO,
        changes: 0,
    };
    if let Err(e) = journal.withdraw_uncommitted(batch, |r| committed(&r.path)) {
        out.results.push(journal_error(e));
        return out;
    }
    let known: Vec<&str> = triggers.iter().map(|t| t.name.as_str()).collect();
    match journal.forget_unknown(&known) {
        Ok(gone) => {
            for g in gone {
                tracing::warn!(trigger = %g, "pending trigger is no longer in the config; dropped");
            }
        }
        Err(e) => {
            out.results.push(journal_error(e));
            return out;
        }
    }
    let now = crate::journal::now_ms();
    for t in triggers {
        let Some(p) = journal.pending().iter().find(|p| p.trigger == t.name).cloned() else { continue };
        if !retry_now && p.not_before_ms > now {
            out.deferred.push(t.name.clone());
            continue;
        }
        let r = run(t, &p, journal.dir());
        let persisted = if r.ok { journal.complete(&t.name) } else { journal.failed(&t.name, &r.status) };
        out.results.push(r);
        if let Err(e) = persisted {
            out.results.push(journal_error(e));
            return out;
        }
    }
    out
}

/// Runs `trigger` for `pending`, writing its changes as NDJSON into `scratch_dir`.
pub fn run(trigger: &Trigger, pending: &Pending, scratch_dir: &Path) -> RunResult {
    let started = Instant::now();
    let result = |ok, status: String| RunResult {
        trigger: trigger.name.clone(),
        ok,
        status,
        duration: started.elapsed(),
        changes: pending.changes.len(),
    };
    let changes_path = scratch_dir.join(format!("changes-{}-{}.ndjson", std::process::id(), sanitize(&trigger.name)));
    if let Err(e) = write_changes(&changes_path, pending) {
        return result(false, format!("cannot write {}: {e}", changes_path.display()));
    }
    let mut cmd = Command::new(&trigger.run[0]);
    cmd.args(&trigger.run[1..])
        .env("SYNCD_TRIGGER", &trigger.name)
        .env("SYNCD_IMAGE_VERSION", pending.image_version.to_string())
        .env("SYNCD_CHANGES", &changes_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can stop everything it started.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&changes_path);
            return result(false, format!("cannot start {:?}: {e}", trigger.run[0]));
        }
    };
    let pipes: [(&str, Option<Box<dyn std::io::Read + Send>>); 2] = [
        ("stdout", child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>)),
        ("stderr", child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>)),
    ];
    for (stream, pipe) in pipes {
        let Some(pipe) = pipe else { continue };
        let name = trigger.name.clone();
        // Detached: a grandchild that escaped the group may hold the pipe open; the run does
        // not wait for it.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                tracing::info!(target: "syncd::trigger", trigger = %name, stream, "{line}");
            }
        });
    }
    let (ok, status) = supervise(&mut child, trigger.timeout, started);
    let _ = std::fs::remove_file(&changes_path);
    result(ok, status)
}

/// Waits for `child`, which leads its own process group (`process_group(0)`), until `timeout`
/// after `started`. Past it the whole group gets SIGTERM, and SIGKILL after [`KILL_GRACE`]:
/// what the command started in the background goes too. Returns whether it exited 0, and how
/// it ended in the words of [`RunResult::status`]. Shared by triggers and health checks.
pub(crate) fn supervise(child: &mut Child, timeout: Duration, started: Instant) -> (bool, String) {
    let pgid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child has a positive pid");
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return (false, format!("cannot wait for it: {e}")),
        }
    };
    match status {
        Some(st) if st.success() => (true, "exit 0".into()),
        Some(st) => match (st.code(), st.signal()) {
            (Some(c), _) => (false, format!("exit {c}")),
            (None, Some(s)) => (false, format!("killed by signal {s}")),
            _ => (false, format!("{st}")),
        },
        None => {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::TERM);
            let grace_end = Instant::now() + KILL_GRACE;
            while Instant::now() < grace_end && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Whatever is left of the group, the leader included.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            let _ = child.wait();
            (false, format!("timed out after {timeout:?}; its process group was killed"))
        }
    }
}

fn write_changes(path: &Path, pending: &Pending) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    let mut buf = Vec::new();
    for c in &pending.changes {
        serde_json::to_writer(&mut buf, &c.record).expect("a change record always serializes");
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    f.sync_all()
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod after_commit_tests {
    use super::*;
    use crate::{ChangeKind, ChangeRecord, Journal, Pending, Stored};

    fn trigger(name: &str, script: &str) -> Trigger {
        let def: crate::config::TriggerDef =
            toml::from_str(&format!("name = {name:?}\nwatch = [\"/etc/\"]\nrun = [\"sh\", \"-c\", {script:?}]\n"))
                .unwrap();
        crate::config::validate(&[def], "test").unwrap().remove(0)
    }

    fn pending(name: &str, path: &str, batch: u64, not_before_ms: u64) -> Pending {
        let record = ChangeRecord { path: path.into(), change: ChangeKind::Content, old_hash: None, new_hash: None };
        Pending {
            trigger: name.into(),
            image_version: 1,
            changes: vec![Stored { record, batch }],
            attempts: 1,
            last_error: None,
            not_before_ms,
        }
    }

    #[test]
    fn runs_what_was_committed_defers_a_backoff_and_drops_what_the_config_lost() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        let later = crate::journal::now_ms() + 60_000;
        j.add(vec![
            pending("ok", "/etc/a", 7, 0),
            pending("waits", "/etc/b", 1, later),
            pending("uncommitted", "/etc/c", 7, 0),
            pending("gone", "/etc/d", 1, 0),
        ])
        .unwrap();
        let triggers = [trigger("ok", "true"), trigger("waits", "true"), trigger("uncommitted", "true")];
        let out = after_commit(&mut j, &triggers, 7, |p| p != "/etc/c", false);
        let ran: Vec<(&str, bool)> = out.results.iter().map(|r| (r.trigger.as_str(), r.ok)).collect();
        assert_eq!(ran, [("ok", true)], "{out:?}");
        assert_eq!(out.deferred, ["waits"]);
        let left: Vec<&str> = j.pending().iter().map(|p| p.trigger.as_str()).collect();
        assert_eq!(left, ["waits"], "ok ran, the uncommitted change was withdrawn, gone was dropped");
        // With retry_now the backoff is not waited out, and a failure stays pending.
        let out = after_commit(&mut j, &[trigger("waits", "exit 3")], 8, |_| true, true);
        assert!(!out.results[0].ok && out.deferred.is_empty(), "{out:?}");
        assert_eq!(j.pending().len(), 1);
    }
}

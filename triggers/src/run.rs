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

//! Health checks: commands the host runs after a pass that moved it to a new image version, to
//! tell whether that version works there (a fleet rollout counts a host as done only when its
//! checks passed). Like triggers they come only from the host's own config, never from the
//! master, take an explicit argv (no shell) and run in their own process group under a
//! timeout; unlike triggers they watch nothing, are not journaled and are not retried: their
//! result, with the tail of their output, goes into the pass report.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::{check_name, check_run, check_timeout, ConfigError};
use crate::run::supervise;

/// A `[[health]]` table as written in the config, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthDef {
    pub name: Option<String>,
    /// Kept loose so that a string instead of an argv list gets a precise error.
    pub run: Option<toml::Value>,
    pub timeout: Option<String>,
}

/// A validated health check.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub name: String,
    pub run: Vec<String>,
    pub timeout: Duration,
}

/// How much of a check's output the report keeps: the end, where the reason usually is.
pub const OUTPUT_TAIL: usize = 4096;

/// How long the output still in the pipe gets to be read once the check has ended. Only a
/// process that left the check's group can hold the pipe open longer; it is not waited for.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Validates `[[health]]` tables, in config order: the same rules as triggers for `name`,
/// `run` and `timeout`, with errors naming the check and the key.
pub fn validate(defs: &[HealthDef]) -> Result<Vec<HealthCheck>, ConfigError> {
    let mut out: Vec<HealthCheck> = Vec::new();
    for (i, d) in defs.iter().enumerate() {
        let label = d.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
        let err = |key, message: String| ConfigError { what: "health check", name: label.clone(), key, message };
        let name =
            check_name(&d.name, out.iter().map(|c| c.name.as_str()), "health check").map_err(|m| err("name", m))?;
        let run = check_run(&d.run, "[\"curl\", \"-fsS\", \"http://localhost/health\"]").map_err(|m| err("run", m))?;
        let timeout = check_timeout(&d.timeout).map_err(|m| err("timeout", m))?;
        out.push(HealthCheck { name, run, timeout });
    }
    Ok(out)
}

/// How one check went.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    /// `exit 0`, `exit 3`, `killed by signal 9`, `timed out after 1s; …`, or why it could not
    /// start.
    pub status: String,
    /// The last [`OUTPUT_TAIL`] bytes of its stdout and stderr (one pipe, so interleaved as
    /// written), as lossy UTF-8, starting at a line start when there is one to start at.
    pub output_tail: String,
    pub duration: Duration,
}

impl CheckResult {
    /// The last non-blank line of the output, for one-line reports.
    pub fn last_line(&self) -> Option<&str> {
        self.output_tail.lines().rev().map(str::trim_end).find(|l| !l.trim().is_empty())
    }
}

/// Runs `check` once, for image version `image_version`, and waits for it (at most its
/// timeout plus the kill grace). It gets `SYNCD_HEALTH` (its name) and `SYNCD_IMAGE_VERSION`,
/// stdin from `/dev/null`, and one pipe for stdout and stderr.
pub fn run(check: &HealthCheck, image_version: u64) -> CheckResult {
    let started = Instant::now();
    let result = |ok, status: String, output_tail: String, duration| CheckResult {
        name: check.name.clone(),
        ok,
        status,
        output_tail,
        duration,
    };
    let (reader, out_w, err_w) = match std::io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w))) {
        Ok(p) => p,
        Err(e) => {
            return result(false, format!("cannot create its output pipe: {e}"), String::new(), started.elapsed())
        }
    };
    let mut cmd = Command::new(&check.run[0]);
    cmd.args(&check.run[1..])
        .env("SYNCD_HEALTH", &check.name)
        .env("SYNCD_IMAGE_VERSION", image_version.to_string())
        .stdin(Stdio::null())
        .stdout(out_w)
        .stderr(err_w)
        // Its own process group, so a timeout can stop everything it started.
        .process_group(0);
    let spawned = cmd.spawn();
    // The command holds this side's copies of the pipe's write end: without dropping it the
    // reader would never see the end of the output.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return result(false, format!("cannot start {:?}: {e}", check.run[0]), String::new(), started.elapsed())
        }
    };
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    {
        let buf = buf.clone();
        let mut reader = reader;
        // Detached: a grandchild that escaped the group may hold the pipe open; the check does
        // not wait for it.
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = reader.read(&mut chunk) {
                keep_tail(&mut buf.lock().expect("output buffer"), &chunk[..n]);
            }
            let _ = done_tx.send(());
        });
    }
    let (ok, status) = supervise(&mut child, check.timeout, started);
    let duration = started.elapsed();
    let _ = done_rx.recv_timeout(DRAIN_GRACE);
    let tail = tail_text(&buf.lock().expect("output buffer"));
    result(ok, status, tail, duration)
}

/// Appends `chunk` to `buf`, keeping it bounded: never more than twice [`OUTPUT_TAIL`], and
/// never less than `OUTPUT_TAIL + 1` bytes once there were more (the extra byte tells
/// [`tail_text`] whether its cut falls at a line start).
fn keep_tail(buf: &mut Vec<u8>, chunk: &[u8]) {
    buf.extend_from_slice(chunk);
    if buf.len() > 2 * OUTPUT_TAIL {
        buf.drain(..buf.len() - (OUTPUT_TAIL + 1));
    }
}

/// The last [`OUTPUT_TAIL`] bytes of `buf` as text. When that cuts into a line, the partial
/// line is dropped if a whole one follows (else the cut moves to a character boundary);
/// invalid UTF-8 becomes U+FFFD.
pub fn tail_text(buf: &[u8]) -> String {
    if buf.len() <= OUTPUT_TAIL {
        return String::from_utf8_lossy(buf).into_owned();
    }
    let start = buf.len() - OUTPUT_TAIL;
    let window = &buf[start..];
    let from = if buf[start - 1] == b'\n' {
        0
    } else {
        match window.iter().position(|&b| b == b'\n') {
            Some(i) if i + 1 < window.len() => i + 1,
            // One long line: at least do not start inside a UTF-8 sequence.
            _ => window.iter().position(|&b| b & 0xC0 != 0x80).unwrap_or(0),
        }
    };
    let mut text = String::from_utf8_lossy(&window[from..]).into_owned();
    // Each replacement character takes 3 bytes for the 1 it replaces: still keep the bound.
    if text.len() > OUTPUT_TAIL {
        let mut cut = text.len() - OUTPUT_TAIL;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<HealthCheck>, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            health: Vec<HealthDef>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        validate(&f.health)
    }

    fn check(run: &[&str], timeout: Duration) -> HealthCheck {
        HealthCheck { name: "t".into(), run: run.iter().map(|s| s.to_string()).collect(), timeout }
    }

    #[test]
    fn a_check_parses_with_the_default_timeout() {
        let c = parse("[[health]]\nname = \"app\"\nrun = [\"true\"]\n[[health]]\nname = \"db\"\nrun = [\"true\", \"x\"]\ntimeout = \"5s\"\n")
            .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].name.as_str(), c[0].timeout), ("app", crate::config::DEFAULT_TIMEOUT));
        assert_eq!((c[1].run.len(), c[1].timeout), (2, Duration::from_secs(5)));
    }

    #[test]
    fn bad_input_names_the_check_and_the_key() {
        let cases = [
            ("[[health]]\nrun = [\"true\"]\n", "health check \"#1\": key `name`: is missing"),
            ("[[health]]\nname = \" \"\nrun = [\"true\"]\n", "health check \" \": key `name`: is missing or empty"),
            (
                "[[health]]\nname = \"app\"\nrun = \"curl -f http://localhost/\"\n",
                "health check \"app\": key `run`: must be a non-empty argv list, not a string",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = []\n",
                "health check \"app\": key `run`: must be a non-empty argv list",
            ),
            ("[[health]]\nname = \"app\"\nrun = [\"true\", 3]\n", "health check \"app\": key `run`: every element"),
            ("[[health]]\nname = \"app\"\n", "health check \"app\": key `run`: is missing"),
            (
                "[[health]]\nname = \"app\"\nrun = [\"no-such-command-gis\"]\n",
                "health check \"app\": key `run`: command \"no-such-command-gis\"",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = [\"true\"]\n[[health]]\nname = \"app\"\nrun = [\"false\"]\n",
                "health check \"app\": key `name`: is used by an earlier health check",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = [\"true\"]\ntimeout = \"soon\"\n",
                "health check \"app\": key `timeout`",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = [\"true\"]\ntimeout = \"0s\"\n",
                "health check \"app\": key `timeout`: must be greater than zero",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}\n  wanted: {want}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct F {
            health: Vec<HealthDef>,
        }
        let e = toml::from_str::<F>("[[health]]\nname = \"a\"\nrun = [\"true\"]\nwatch = [\"/etc/\"]\n").err().unwrap();
        assert!(e.to_string().contains("watch"), "{e}");
    }

    #[test]
    fn a_passing_and_a_failing_check_report_status_and_output() {
        let ok =
            run(&check(&["sh", "-c", "echo \"fine $SYNCD_HEALTH $SYNCD_IMAGE_VERSION\""], Duration::from_secs(10)), 7);
        assert!(ok.ok, "{ok:?}");
        assert_eq!((ok.status.as_str(), ok.output_tail.as_str()), ("exit 0", "fine t 7\n"));
        let bad = run(&check(&["sh", "-c", "echo out; echo broken >&2; exit 3"], Duration::from_secs(10)), 7);
        assert!(!bad.ok);
        assert_eq!(bad.status, "exit 3");
        assert_eq!(bad.output_tail, "out\nbroken\n", "stdout and stderr, in the order written");
        assert_eq!(bad.last_line(), Some("broken"));
    }

    #[test]
    fn a_check_past_its_timeout_is_killed_with_its_group() {
        let t = Instant::now();
        let r = run(&check(&["sh", "-c", "echo starting; sleep 30 & sleep 30"], Duration::from_millis(300)), 1);
        assert!(!r.ok);
        assert!(r.status.starts_with("timed out after 300ms"), "{}", r.status);
        assert_eq!(r.output_tail, "starting\n");
        // SIGTERM ends both sleeps at once: no kill grace, no wait for the background one.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_missing_command_is_reported_not_panicked_on() {
        let r = run(&check(&["/no/such/gis-check"], Duration::from_secs(1)), 1);
        assert!(!r.ok);
        assert!(r.status.starts_with("cannot start \"/no/such/gis-check\""), "{}", r.status);
    }

    #[test]
    fn the_tail_keeps_the_end_from_a_line_start() {
        assert_eq!(tail_text(b"short\n"), "short\n");
        let mut buf = Vec::new();
        for i in 0..2000 {
            keep_tail(&mut buf, format!("line {i}\n").as_bytes());
        }
        assert!(buf.len() <= 2 * OUTPUT_TAIL);
        let t = tail_text(&buf);
        assert!(t.len() <= OUTPUT_TAIL && t.len() > OUTPUT_TAIL - 16, "{}", t.len());
        assert!(t.starts_with("line ") && t.ends_with("line 1999\n"), "{t:?}");
        // The line before the kept part's first line is whole elsewhere, so it was cut whole.
        let first: u32 = t.lines().next().unwrap()[5..].parse().unwrap();
        assert!(t.contains(&format!("line {}\n", first + 1)));
        // One long line, multi-byte: cut at a character, not into one.
        let long = "é".repeat(3000);
        let t = tail_text(long.as_bytes());
        assert!(t.len() <= OUTPUT_TAIL && t.chars().all(|c| c == 'é'), "{}", t.len());
        // Invalid UTF-8 is replaced, within the bound.
        let t = tail_text(&[0xff; 3 * OUTPUT_TAIL][..]);
        assert!(t.len() <= OUTPUT_TAIL && t.chars().all(|c| c == '\u{fffd}'));
    }
}

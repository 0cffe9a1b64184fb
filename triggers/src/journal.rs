//! The pending-trigger journal: dpkg's idea, applied to any file.
//!
//! Before a batch commits, every trigger it will fire is written here with the changes that
//! fire it, and the file is fsynced (written to a temp file, fsynced, renamed, and the directory
//! fsynced). An entry is removed only when its command exits 0, so a crash anywhere between a
//! commit and a trigger's success leaves the trigger pending, and the next run fires it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ChangeKind;

/// One changed path, as a trigger receives it in `SYNCD_CHANGES` (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// Rooted path, e.g. `/etc/ssh/sshd_config` (control characters, backslashes and non-UTF-8
    /// bytes escaped as `\#ooo`).
    pub path: String,
    pub change: ChangeKind,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub old_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub new_hash: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    pub trigger: String,
    pub image_version: u64,
    pub changes: Vec<Stored>,
    /// Failed runs so far.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Unix ms before which a retry waits (backoff after a failure).
    #[serde(default)]
    pub not_before_ms: u64,
}

/// A change as stored in the journal: the record, plus the pass that recorded it, so a pass
/// can withdraw exactly its own uncommitted changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    #[serde(flatten)]
    pub record: ChangeRecord,
    pub batch: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("trigger journal {path}: {source} (hint: check --state-dir)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trigger journal {path} is corrupt: {message} (hint: inspect it; delete it only if losing pending triggers is acceptable)")]
    Corrupt { path: PathBuf, message: String },
}

pub struct Journal {
    dir: PathBuf,
    pending: Vec<Pending>,
}

const FILE: &str = "pending-triggers.json";

/// Backoff after the n-th failure: 10 s, 20 s, 40 s, … capped at 15 minutes.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << attempts.saturating_sub(1).min(10))).min(Duration::from_secs(900))
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Reads what is pending without creating anything (for dry runs).
pub fn peek(state_dir: &Path) -> Result<Vec<Pending>, JournalError> {
    let path = state_dir.join(FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt { path, message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(JournalError::Io { path, source }),
    }
}

impl Journal {
    /// Opens (creating, mode 0700) the journal in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io { path: state_dir.to_owned(), source };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(io)?;
        let path = state_dir.join(FILE);
        let pending = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| JournalError::Corrupt { path: path.clone(), message: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        Ok(Journal { dir: state_dir.to_owned(), pending })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    /// Records a batch's triggers durably, merging with what is already pending for the same
    /// trigger (so a trigger pending from a crash and fired again by this batch runs once).
    pub fn add(&mut self, batch: Vec<Pending>) -> Result<(), JournalError> {
        if batch.is_empty() {
            return Ok(());
        }
        for p in batch {
            match self.pending.iter_mut().find(|q| q.trigger == p.trigger) {
                Some(q) => {
                    q.image_version = p.image_version;
                    for c in p.changes {
                        q.changes.retain(|old| old.record.path != c.record.path);
                        q.changes.push(c);
                    }
                }
                None => self.pending.push(p),
            }
        }
        self.persist()
    }

    /// Withdraws the changes of `batch` for which `committed` is false; a trigger left with no
    /// change is removed: a change that was not made fires nothing.
    pub fn withdraw_uncommitted(
        &mut self,
        batch: u64,
        committed: impl Fn(&ChangeRecord) -> bool,
    ) -> Result<(), JournalError> {
        let before: usize = self.pending.iter().map(|p| p.changes.len()).sum();
        for p in &mut self.pending {
            p.changes.retain(|c| c.batch != batch || committed(&c.record));
        }
        self.pending.retain(|p| !p.changes.is_empty());
        let after: usize = self.pending.iter().map(|p| p.changes.len()).sum();
        if before != after {
            self.persist()?;
        }
        Ok(())
    }

    /// The trigger ran and exited 0.
    pub fn complete(&mut self, trigger: &str) -> Result<(), JournalError> {
        self.pending.retain(|p| p.trigger != trigger);
        self.persist()
    }

    /// The trigger failed: it stays pending, retried after a backoff.
    pub fn failed(&mut self, trigger: &str, error: &str) -> Result<(), JournalError> {
        if let Some(p) = self.pending.iter_mut().find(|p| p.trigger == trigger) {
            p.attempts += 1;
            p.last_error = Some(error.to_owned());
            p.not_before_ms = now_ms() + backoff(p.attempts).as_millis() as u64;
        }
        self.persist()
    }

    /// Drops entries for triggers no longer in the config (they can never run).
    pub fn forget_unknown(&mut self, known: &[&str]) -> Result<Vec<String>, JournalError> {
        let gone: Vec<String> =
            self.pending.iter().filter(|p| !known.contains(&p.trigger.as_str())).map(|p| p.trigger.clone()).collect();
        if !gone.is_empty() {
            self.pending.retain(|p| known.contains(&p.trigger.as_str()));
            self.persist()?;
        }
        Ok(gone)
    }

    fn persist(&self) -> Result<(), JournalError> {
        let path = self.dir.join(FILE);
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io = |source| JournalError::Io { path: path.clone(), source };
        let bytes = serde_json::to_vec_pretty(&self.pending).expect("the journal always serializes");
        let mut f =
            fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(path: &str, batch: u64) -> Stored {
        Stored {
            record: ChangeRecord { path: path.into(), change: ChangeKind::Content, old_hash: None, new_hash: None },
            batch,
        }
    }

    fn pending(name: &str, changes: Vec<Stored>) -> Pending {
        Pending { trigger: name.into(), image_version: 1, changes, attempts: 0, last_error: None, not_before_ms: 0 }
    }

    #[test]
    fn survives_reopen_and_merges_by_trigger() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.add(vec![pending("ssh", vec![rec("/etc/a", 1)])]).unwrap();
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        j.add(vec![pending("ssh", vec![rec("/etc/a", 2), rec("/etc/b", 2)])]).unwrap();
        assert_eq!(j.pending().len(), 1);
        assert_eq!(j.pending()[0].changes.len(), 2);
    }

    #[test]
    fn uncommitted_changes_of_a_batch_are_withdrawn() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.add(vec![pending("old", vec![rec("/x", 1)]), pending("new", vec![rec("/y", 2)])]).unwrap();
        j.withdraw_uncommitted(2, |_| false).unwrap();
        let names: Vec<&str> = j.pending().iter().map(|p| p.trigger.as_str()).collect();
        assert_eq!(names, ["old"], "batch 1's change stays: it was committed by an earlier pass");
    }

    #[test]
    fn failure_backs_off_and_success_removes() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.add(vec![pending("t", vec![rec("/x", 1)])]).unwrap();
        j.failed("t", "exit 1").unwrap();
        assert_eq!(j.pending()[0].attempts, 1);
        assert!(j.pending()[0].not_before_ms > now_ms());
        j.complete("t").unwrap();
        assert!(Journal::open(d.path()).unwrap().pending().is_empty());
    }

    #[test]
    fn a_corrupt_journal_is_an_error_not_an_empty_one() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(FILE), b"{not json").unwrap();
        let e = Journal::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(30), Duration::from_secs(900));
    }
}

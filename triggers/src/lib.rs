//! Shell triggers: commands the host runs after the files they watch have changed.
//!
//! - [`config`]: definitions from the host's own config (never from the master), validated;
//! - [`select`]: which triggers a batch of changes fires, in config order;
//! - [`journal`]: the durable list of pending triggers, written before a batch commits;
//! - [`run`]: running one trigger with a timeout over its whole process group;
//! - [`health`]: health checks, run the same way after a pass that moved the host to a new
//!   version.

pub mod config;
pub mod health;
pub mod journal;
pub mod run;

pub use config::{ChangeKind, Trigger};
pub use journal::{ChangeRecord, Journal, Pending, Stored};

use manifest::RelPath;

/// One change of a batch, as the matcher sees it.
pub struct Change<'a> {
    pub path: &'a RelPath,
    pub is_dir: bool,
    pub kind: ChangeKind,
    pub old_hash: Option<String>,
    pub new_hash: Option<String>,
}

/// The triggers `changes` fire, in config order, each with the changes that fire it.
pub fn select<'t>(triggers: &'t [Trigger], changes: &[Change]) -> Vec<(&'t Trigger, Vec<ChangeRecord>)> {
    triggers
        .iter()
        .filter_map(|t| {
            let fired: Vec<ChangeRecord> = changes
                .iter()
                .filter(|c| t.matches(c.path, c.is_dir, c.kind))
                .map(|c| ChangeRecord {
                    path: format!("/{}", c.path),
                    change: c.kind,
                    old_hash: c.old_hash.clone(),
                    new_hash: c.new_hash.clone(),
                })
                .collect();
            (!fired.is_empty()).then_some((t, fired))
        })
        .collect()
}

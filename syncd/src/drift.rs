//! Drift reports: the dry-run Plan rendered for operators and scripts.
//!
//! `syncd drift` computes exactly the Plan `syncd sync` would execute and renders it, so a
//! report and a real run cannot disagree. Exit codes form a bitmask, like AIDE's.

use serde::Serialize;

use crate::error::SyncError;
use crate::plan::{Diff, Op};
use crate::report::PassReport;

/// Exit-code bits and error codes of `syncd drift`.
pub mod code {
    /// Paths on the host that the image does not have.
    pub const EXTRA: u8 = 1;
    /// Paths of the image missing from the host.
    pub const MISSING: u8 = 2;
    /// Paths on both sides that differ.
    pub const CHANGED: u8 = 4;
    /// Some host paths could not be read: the report is incomplete.
    pub const INCOMPLETE: u8 = 8;
    /// No report: usage or configuration error.
    pub const CONFIG: u8 = 16;
    /// No report: the master is unreachable.
    pub const UNREACHABLE: u8 = 17;
    /// No report: the master sent an invalid manifest.
    pub const BAD_MANIFEST: u8 = 18;
    /// No report: an internal error.
    pub const INTERNAL: u8 = 19;
    /// No report: another syncd holds the root (without `--wait`).
    pub const BUSY: u8 = 20;
    /// No report: syncd's own state (the trigger journal, a state file) could not be read.
    pub const STATE: u8 = 21;
    /// No report: the master could not render this host's files (the error names the template,
    /// the line and the key).
    pub const RENDER: u8 = 22;
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub image_version: u64,
    pub host_id: String,
    pub root: String,
    pub summary: Summary,
    pub entries: Vec<DriftEntry>,
    /// Triggers a sync would fire now, in config order, with the changes that fire them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<WouldFire>,
}

#[derive(Debug, Serialize)]
pub struct WouldFire {
    pub name: String,
    pub changes: Vec<triggers::ChangeRecord>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub extra: usize,
    pub missing: usize,
    pub changed: usize,
    pub excluded: usize,
}

#[derive(Debug, Serialize)]
pub struct DriftEntry {
    /// Rooted path, e.g. `/etc/ssh/sshd_config`.
    pub path: String,
    /// `extra`, `missing` or `changed`.
    pub status: &'static str,
    /// For `changed`: what differs, from `content`, `mode`, `owner`, `group`, `mtime`, `xattr`,
    /// `type`, `target`, `link`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
    /// The same change, itemized like `rsync -i`.
    #[serde(skip)]
    pub line: String,
    /// The template the master rendered this path from for this host, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendered_from: Option<String>,
}

fn what(d: &Diff) -> Vec<&'static str> {
    let mut w = Vec::new();
    let mut push = |b: bool, s| {
        if b {
            w.push(s)
        }
    };
    push(d.content || d.size || d.rdev, "content");
    push(d.perms, "mode");
    push(d.owner, "owner");
    push(d.group, "group");
    push(d.mtime, "mtime");
    push(d.xattrs, "xattr");
    push(d.target, "target");
    push(d.link, "link");
    w
}

impl Report {
    pub fn new(r: &PassReport) -> Report {
        let mut entries = Vec::new();
        if let (Some((_, _, d)), Some(line)) = (&r.plan.root, r.plan.root_line()) {
            entries.push(DriftEntry { path: "/".into(), status: "changed", what: what(d), line, rendered_from: None });
        }
        for c in &r.plan.changes {
            let (status, what) = match &c.op {
                Op::Create { .. } => ("missing", vec![]),
                Op::Delete { .. } => ("extra", vec![]),
                Op::Replace { .. } => ("changed", vec!["type"]),
                Op::Update { diff, .. } => ("changed", what(diff)),
            };
            entries.push(DriftEntry {
                path: format!("/{}", c.path),
                status,
                what,
                line: c.itemize(),
                rendered_from: r.rendered_from(&c.path).map(str::to_owned),
            });
        }
        let count = |s: &str| entries.iter().filter(|e| e.status == s).count();
        let summary = Summary {
            extra: count("extra"),
            missing: count("missing"),
            changed: count("changed"),
            excluded: r.plan.excluded,
        };
        let triggers = r
            .would_fire
            .iter()
            .map(|(name, changes)| WouldFire { name: name.clone(), changes: changes.clone() })
            .collect();
        Report {
            image_version: r.image_version,
            host_id: r.host_id.clone(),
            root: r.root.display().to_string(),
            summary,
            entries,
            triggers,
        }
    }

    /// One line per path, itemized like `rsync -i` and followed by what differs in words;
    /// then a summary line.
    pub fn text(&self, incomplete: bool) -> String {
        let mut out = String::new();
        for e in &self.entries {
            let words = match (e.status, e.what.as_slice()) {
                ("changed", ["mtime"]) => "mtime only".to_owned(),
                ("changed", w) => w.join(", "),
                (s, _) => s.to_owned(),
            };
            match &e.rendered_from {
                Some(t) => out.push_str(&format!("{}  ({words}; rendered from {t})\n", e.line)),
                None => out.push_str(&format!("{}  ({words})\n", e.line)),
            }
        }
        for t in &self.triggers {
            let why: Vec<String> = t.changes.iter().map(|c| format!("{} ({})", c.path, c.change.as_str())).collect();
            out.push_str(&format!("trigger {} would fire: {}\n", t.name, why.join(", ")));
        }
        let s = &self.summary;
        out.push_str(&format!(
            "drift from image v{} on {}: {} extra, {} missing, {} changed, {} excluded{}\n",
            self.image_version,
            self.host_id,
            s.extra,
            s.missing,
            s.changed,
            s.excluded,
            if incomplete { "; INCOMPLETE: some host paths could not be read" } else { "" }
        ));
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a drift report always serializes")
    }

    /// The bitmask: 1 extra, 2 missing, 4 changed, 8 incomplete.
    pub fn exit_code(&self, incomplete: bool) -> u8 {
        let s = &self.summary;
        let mut c = 0;
        if s.extra > 0 {
            c |= code::EXTRA;
        }
        if s.missing > 0 {
            c |= code::MISSING;
        }
        if s.changed > 0 {
            c |= code::CHANGED;
        }
        if incomplete {
            c |= code::INCOMPLETE;
        }
        c
    }
}

/// The drift exit code for a pass that could not produce a report: always 16 or more.
pub fn error_code(e: &SyncError) -> u8 {
    match e {
        SyncError::Unreachable { .. } => code::UNREACHABLE,
        SyncError::BadManifest(_) | SyncError::Untrusted(_) => code::BAD_MANIFEST,
        SyncError::Lock(crate::lock::LockError::Busy { .. }) => code::BUSY,
        SyncError::Lock(_) => code::CONFIG,
        SyncError::Journal(_) | SyncError::StateFile { .. } | SyncError::StateFileDamaged { .. } => code::STATE,
        SyncError::Render { .. } => code::RENDER,
        SyncError::NoSpace { .. } | SyncError::StoreNoSpace { .. } | SyncError::Local(_) | SyncError::Task { .. } => {
            code::INTERNAL
        }
        // Every usage or configuration error (the same set `sync` exits 2 for).
        _ if e.exit_code() == crate::error::exit::USAGE => code::CONFIG,
        _ => code::INTERNAL,
    }
}

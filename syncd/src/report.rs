//! What a pass did: [`PassReport`], its summary line and exit code.

use std::path::PathBuf;
use std::time::Duration;

use manifest::Hash;

use crate::apply::{Failure, Outcome};
use crate::error::exit;
use crate::plan;
use crate::plan::Plan;

/// The result of one pass.
#[derive(Debug)]
pub struct PassReport {
    pub host_id: String,
    pub root: PathBuf,
    pub image_version: u64,
    pub identity: Hash,
    pub plan: Plan,
    /// `None` on a dry run.
    pub outcome: Option<Outcome>,
    /// Problems found while scanning the host (unreadable paths), and paths the plan had to
    /// leave alone because of them.
    pub scan_failures: Vec<Failure>,
    /// Triggers this pass ran (pending ones from earlier passes included), in config order.
    pub triggers: Vec<triggers::run::RunResult>,
    /// Pending triggers left for a later pass because their backoff has not expired.
    pub deferred: Vec<String>,
    /// Health checks this pass ran, in config order: only after a pass that moved the host to
    /// a new version (see [`health`]). On a later converged pass of the same version, the
    /// results stored by the pass that ran them (then `health_stored_at` is set). Empty
    /// otherwise.
    pub health: Vec<triggers::health::CheckResult>,
    /// Set when `health` holds stored results, not run by this pass: when they ran, Unix
    /// milliseconds (0 if not known).
    pub health_stored_at: Option<u64>,
    /// On a dry run: the triggers the plan would fire, with the changes that fire them, and
    /// those already pending from an earlier pass.
    pub would_fire: Vec<(String, Vec<triggers::ChangeRecord>)>,
    /// The host walk matched the record of the last pass that found it identical to this image
    /// (see [`unchanged`]): the pass stopped there, with `walked` entries seen.
    pub walk_only: Option<usize>,
    pub duration: Duration,
    /// This version's health checks kept failing for `health_grace`: the host was rolled back
    /// locally (see [`converge`]).
    pub rolled_back: Option<RolledBack>,
    /// Files the master rendered for this host, with their templates.
    pub render: Option<crate::fetch::Render>,
}

/// A local rollback after failed health checks.
#[derive(Debug, Clone)]
pub struct RolledBack {
    /// The version gone back to, or why the rollback could not be done.
    pub to: Result<(u64, Hash), String>,
    /// The rollback pass's summary line.
    pub summary: String,
    /// Triggers the rollback ran, for what changed back.
    pub triggers: Vec<triggers::run::RunResult>,
}

impl PassReport {
    /// Itemized lines: on a dry run, the whole plan; on a real run, what was done. In plan
    /// order either way, so a dry run and the run after it print the same lines.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let root_done = self.outcome.as_ref().is_none_or(|o| o.root_done);
        if let (Some(l), true) = (self.plan.root_line(), root_done) {
            out.push(l);
        }
        for (i, c) in self.plan.changes.iter().enumerate() {
            if self.outcome.as_ref().is_none_or(|o| o.done[i]) {
                let mut line = c.itemize();
                if let Some(t) = self.rendered_from(&c.path) {
                    line.push_str(&format!("  (rendered from {t})"));
                }
                out.push(line);
            }
        }
        out
    }

    /// The template `path` was rendered from for this host, if the master rendered it.
    pub fn rendered_from(&self, path: &manifest::RelPath) -> Option<&str> {
        self.render.as_ref()?.template_of(path)
    }

    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.scan_failures.iter().chain(self.outcome.iter().flat_map(|o| o.failures.iter()))
    }

    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Some(o) if o.stats.master_lost => exit::UNREACHABLE,
            Some(o) if o.stats.no_space && o.rolled_back => exit::NO_SPACE,
            _ if self.failures().next().is_some() => exit::PARTIAL,
            _ if self.triggers.iter().any(|t| !t.ok) => exit::TRIGGER_FAILED,
            _ if self.rolled_back.as_ref().is_some_and(|r| r.to.is_ok()) => exit::ROLLED_BACK,
            _ if self.health.iter().any(|h| !h.ok) => exit::HEALTH_FAILED,
            _ => exit::OK,
        }
    }

    /// One line for humans and logs.
    pub fn summary(&self) -> String {
        let (c, u, d) = match &self.outcome {
            Some(o) => self.plan.counts_where(|i| o.done[i]),
            None => self.plan.counts_where(|_| true),
        };
        let mib = human_bytes;
        let fails = self.failures().count();
        if let (Some(n), 0) = (self.walk_only, fails) {
            return format!(
                "{} image v{} ({}): the host is unchanged since it last matched (its {n} entries walked, nothing read); {}{:.2}s",
                if self.outcome.is_some() { "converged to" } else { "dry run against" },
                self.image_version,
                &self.identity.to_hex()[..16],
                if self.outcome.is_some() { "" } else { "changed nothing; " },
                self.duration.as_secs_f64(),
            );
        }
        match &self.outcome {
            None => format!(
                "dry run against image v{} ({}): would create {c}, update {u}, delete {d}; would fetch {} objects ({}); {} excluded, {} skipped{}; changed nothing",
                self.image_version,
                &self.identity.to_hex()[..16],
                self.plan.fetch.len(),
                mib(self.plan.fetch_bytes()),
                self.plan.excluded,
                self.plan.skipped.len(),
                match (self.plan.changes.iter().filter(|c| matches!(c.op.source(), Some(plan::Source::Resume(..)))).count(), self.plan.leftovers.len()) {
                    (0, 0) => String::new(),
                    (r, l) => format!("; from an interrupted pass: would reuse {r} staged files, remove {l} leftovers"),
                },
            ),
            Some(o) => format!(
                "{} image v{} ({}): created {c}, updated {u}, deleted {d}, {fails} failed{}, {} excluded; fetched {} objects, {} ({} on the wire){}{}; copied {} locally ({}){}; {:.2}s",
                match (fails, o.rolled_back) {
                    (_, true) => "rolled back, nothing changed: staging against",
                    (0, false) => "converged to",
                    _ => "partly applied",
                },
                self.image_version,
                &self.identity.to_hex()[..16],
                match o.held_back {
                    0 => String::new(),
                    n => format!(", {n} held back"),
                },
                self.plan.excluded,
                o.stats.fetched_objects,
                mib(o.stats.fetched_bytes),
                mib(o.stats.wire_bytes),
                match o.stats.delta_objects {
                    0 => String::new(),
                    n => format!(", {n} of them as deltas"),
                },
                match &o.stats.store_url {
                    None => String::new(),
                    Some(_) => format!(
                        ": {} from the object store ({} GETs, {} read, {} objects cut from packs{}), {} from the master ({} after a store failure){}",
                        o.stats.store_objects,
                        o.stats.store_gets,
                        mib(o.stats.store_bytes),
                        o.stats.store_packed,
                        match o.stats.solid_objects {
                            0 => String::new(),
                            n => format!(", {n} through the solid delta"),
                        },
                        o.stats.master_objects,
                        o.stats.store_fallback_objects,
                        match o.stats.store_refused {
                            0 => String::new(),
                            n => format!(", {n} refused from the store (content not matching its hash) and fetched again from the master"),
                        }
                    ) + &match o.stats.store_chunked_objects {
                        0 => String::new(),
                        n => format!(
                            "; {n} rebuilt from chunks: {} chunks reused from the host, {} fetched ({} from the store, {} of chunk indexes)",
                            o.stats.store_chunks_reused,
                            o.stats.store_chunks_fetched,
                            mib(o.stats.store_chunk_bytes),
                            mib(o.stats.store_index_bytes),
                        ),
                    },
                },
                o.stats.local_copies,
                mib(o.stats.local_bytes),
                match (o.stats.resumed, o.stats.leftovers_removed) {
                    (0, 0) => String::new(),
                    (r, l) => format!("; from an interrupted pass: {r} staged files reused, {l} leftovers removed"),
                },
                self.duration.as_secs_f64(),
            ),
        }
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

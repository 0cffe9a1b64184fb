//! Executes a [`Plan`] on the host root.
//!
//! With whole-tree staging (the default, [`Staging::Whole`]), in this order:
//! 0. leftovers of an interrupted pass that cannot be reused are removed;
//! 1. new directories are made (a directory replacing a non-directory is built under a temp
//!    name beside it, and everything beneath it is staged inside);
//! 2. all new content is staged as temp files beside its target: written, verified against its
//!    hash, given owner, mode, xattrs and mtime, then symlinks and other nodes, then hard links
//!    to their (staged) leaders. A helper thread runs `syncfs` behind the staging, batch by
//!    batch, so the writeback overlaps it. If anything systemic fails (the disk is full, the
//!    master is lost, a stop is requested), every temp entry and every directory this pass made
//!    is removed and the parents' mtimes put back: the root is exactly as it was;
//! 3. commit: once everything is staged and durable, each temp entry is renamed over its path,
//!    then directories built under temp names are swapped in;
//! 4. metadata-only changes are made in place;
//! 5. deletions, deepest first, only if no content failed;
//! 6. directory metadata, deepest first, so mtimes are not disturbed by later work.
//!
//! With [`Staging::Batches`], step 3 runs per batch on the helper thread after each batch's
//! `syncfs` (less room needed, but a failure leaves the tree part old, part new), hard links
//! follow their committed leaders, and the same rule holds: after a content failure, nothing
//! destructive is done (no deletes, no symlink to content that failed, no hard link to a leader
//! that failed), and staging stops at the first systemic failure.
//!
//! A failure on one path is recorded and the rest goes on; paths beneath a directory that
//! could not be made are skipped with an error naming that directory.
//!
//! This file holds the driver ([`apply`]). What it takes and gives is in `types`; the state the
//! phases share is `applier`'s [`Applier`](applier::Applier); the phases are in `stage` (0 to
//! 2), `content` (where staged content comes from, and old content kept) and `commit` (3 to 6,
//! and the roll-back). A single object the stream could not give comes from a
//! [`ContentSource`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use manifest::{Manifest, RelPath};

use crate::fetch::ObjectStream;
use crate::hostfs::root::RootDir;
use crate::plan::{Plan, Source};
use crate::progress::Stopwatch;

mod applier;
mod commit;
mod content;
mod stage;
mod types;

pub use types::{ApplyStats, ContentSource, FailedAt, Failure, FailureKind, Outcome, Staging};

use applier::Applier;

/// Applies `plan` beneath `root`. Objects come from `objects` in `plan.fetch` order; a
/// fallback fetch of a single object comes from `aside`. Disk reads and writes are charged
/// to `throttle`.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    root: RootDir,
    manifest: &Manifest,
    plan: &Plan,
    staging: Staging,
    objects: ObjectStream,
    aside: Option<Box<dyn ContentSource>>,
    store: Option<Arc<crate::store::Store>>,
    cancel: Option<Arc<AtomicBool>>,
    throttle: &throttle::Throttle,
) -> Outcome {
    let link_leaders: HashSet<&RelPath> = plan
        .changes
        .iter()
        .filter_map(|c| match c.op.source() {
            Some(Source::Link(l)) => Some(l),
            _ => None,
        })
        .collect();
    let mut a = Applier {
        root,
        manifest,
        plan,
        staging,
        objects,
        aside,
        store,
        store_linked: HashMap::new(),
        lent_at: HashMap::new(),
        releasing: None,
        out: Outcome { done: vec![false; plan.changes.len()], ..Outcome::default() },
        failed_dirs: Vec::new(),
        failed: HashSet::new(),
        content_failed: false,
        halt: None,
        removed_dirs: Vec::new(),
        created_dirs: Vec::new(),
        dir_swaps: Vec::new(),
        touched: BTreeSet::new(),
        materialized: HashMap::new(),
        leaders: HashMap::with_capacity(link_leaders.len()),
        fetch_next: 0,
        staged: Vec::new(),
        staged_bytes: 0,
        held: Vec::new(),
        flushing: None,
        syncfs_wait: Stopwatch::default(),
        cancel,
        throttle: throttle.clone(),
    };
    fn timed<'a>(a: &mut Applier<'a>, what: &str, f: impl FnOnce(&mut Applier<'a>)) {
        let t = std::time::Instant::now();
        f(a);
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "apply: {what}");
    }
    timed(&mut a, "leftovers removed", Applier::remove_leftovers);
    timed(&mut a, "directories made", Applier::make_dirs);
    match a.staging {
        Staging::Whole => {
            timed(&mut a, "content staged", |a| a.stage_content(&link_leaders));
            timed(&mut a, "hard links staged", Applier::stage_links);
            a.seal_batch();
            a.commit_flushed();
            if a.stopped() || a.halt.is_some() {
                timed(&mut a, "rolled back", Applier::roll_back);
            } else {
                if a.store.is_some() {
                    timed(&mut a, "old content kept", Applier::keep_old);
                }
                timed(&mut a, "committed", Applier::commit_held);
                a.release_store();
            }
        }
        Staging::Batches => {
            timed(&mut a, "content staged and committed", |a| a.stage_content(&HashSet::new()));
            a.seal_batch();
            a.commit_flushed();
            if !a.stopped() {
                timed(&mut a, "hard links made", Applier::link_members);
            }
        }
    }
    if !a.out.rolled_back && !a.stopped() {
        timed(&mut a, "metadata updated in place", Applier::update_in_place);
        timed(&mut a, "deletions done", Applier::delete);
        timed(&mut a, "directory metadata set", Applier::set_dir_meta);
    }
    if a.out.stats.cancelled && a.halt.is_none() {
        // Not converged: the daemon must not take this pass for one that finished.
        a.halt = Some("a stop was requested".into());
    }
    if let Some(why) = a.halt.clone() {
        let skipped = a.plan.changes.len() - a.out.done.iter().filter(|d| **d).count();
        let what = if a.out.rolled_back {
            "nothing was committed: everything this pass staged was removed, and the root is as it was before it"
        } else {
            "the changes not yet made were not attempted"
        };
        a.fail_pass(format!("staging stopped: {why}; {what} ({skipped} changes left for the next pass)"));
    }
    tracing::debug!(
        waiting_for_objects = a.objects.waited.secs(),
        waiting_for_syncfs = a.syncfs_wait.secs(),
        "apply: content stage waits"
    );
    let t = std::time::Instant::now();
    if let Err(e) = rustix::fs::syncfs(a.root.fd()) {
        a.fail_pass(format!("cannot flush the filesystem (syncfs): {e}"));
    }
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "apply: final syncfs");
    if let Some(h) = a.releasing.take() {
        let t = std::time::Instant::now();
        let _ = h.join();
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "apply: waited for the local store's release");
    }
    a.out.stats.fetched_objects += a.objects.objects;
    a.out.stats.wire_bytes += a.objects.wire_bytes;
    a.out.stats.delta_objects = a.objects.deltas;
    if let Some(t) = &a.objects.store {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &mut a.out.stats;
        s.store_chunked_objects = t.chunked_objects.load(Relaxed);
        s.store_chunks_reused = t.chunks_reused.load(Relaxed);
        s.store_chunks_fetched = t.chunks_fetched.load(Relaxed);
        s.store_chunk_bytes = t.chunk_bytes.load(Relaxed);
        s.store_index_bytes = t.index_bytes.load(Relaxed);
        // Content rebuilt from chunks passed the stream as whole content: on the wire were
        // only the chunks fetched and the indexes.
        s.wire_bytes =
            s.wire_bytes.saturating_sub(t.rebuilt_bytes.load(Relaxed)) + s.store_chunk_bytes + s.store_index_bytes;
        s.store_gets = t.gets.load(Relaxed);
        s.store_bytes = t.bytes.load(Relaxed);
        s.store_packed = t.from_packs.load(Relaxed);
        // Objects of the solid delta were passed on raw: on the wire they were the segments.
        s.wire_bytes = (s.wire_bytes + t.solid_wire.load(Relaxed)).saturating_sub(t.solid_content.load(Relaxed));
        s.solid_objects = t.solid_objects.load(Relaxed);
    }
    a.out
}

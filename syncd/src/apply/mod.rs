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
//! This file holds the types and the driver ([`apply`]); the phases are in `stage` (0 to 2),
//! `content` (where staged content comes from, and old content kept) and `commit` (3 to 6,
//! and the roll-back). A single object the stream could not give comes from a
//! [`ContentSource`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use manifest::{Hash, Manifest, RelPath};

use crate::fetch::ObjectStream;
use crate::hostfs::root::RootDir;
use crate::plan::{Plan, Source};
use crate::progress::Stopwatch;

mod commit;
mod content;
mod stage;

/// Temp files staged before one `syncfs` (and, in batches, their renames).
const BATCH_FILES: usize = 2048;
const BATCH_BYTES: u64 = 256 * 1024 * 1024;
/// Most threads that rename a whole-tree commit into place (one per core up to this).
const COMMIT_THREADS: usize = 8;

/// How a pass stages its content before committing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Staging {
    /// Stage everything, then commit in one short phase; a failure while staging leaves the
    /// root as it was. Needs room for all new content at once.
    #[default]
    Whole,
    /// Commit batch by batch as content is staged (at most 2,048 files or 256 MiB each).
    Batches,
}

impl std::str::FromStr for Staging {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "whole" => Ok(Staging::Whole),
            "batches" => Ok(Staging::Batches),
            other => Err(format!("unknown staging mode {other:?} (expected \"whole\" or \"batches\")")),
        }
    }
}

/// One thing a pass could not do, kept as data: where, what, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: FailedAt,
    pub kind: FailureKind,
    /// Why, for people: what was not done and the error.
    pub error: String,
}

/// Where a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailedAt {
    /// An entry of the tree, relative to the root.
    Entry(RelPath),
    /// No one entry: the pass as a whole, on the root's filesystem (a halt, a flush, a
    /// roll-back that left temp entries).
    Root(std::path::PathBuf),
    /// A file outside the tree: a host path the scan could not read, or a state file.
    File(std::path::PathBuf),
}

impl std::fmt::Display for FailedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailedAt::Entry(p) => write!(f, "{p}"),
            FailedAt::Root(p) | FailedAt::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What could not be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The host path could not be read.
    Scan,
    /// Left alone: a mount point, beneath one, or beneath an unreadable directory.
    LeftAlone,
    /// A temp entry of an interrupted pass could not be removed.
    Leftover,
    /// A directory could not be made.
    Directory,
    /// New content could not be staged (written, verified, flushed) or linked.
    Stage,
    /// Not made because something it depends on failed (a link's leader, a symlink's target,
    /// a parent directory).
    HeldBack,
    /// The staged entry could not be renamed or swapped into place.
    Commit,
    /// Metadata could not be changed in place.
    Metadata,
    /// The entry could not be deleted.
    Delete,
    /// A directory's metadata could not be set after the pass.
    DirectoryMetadata,
    /// The pass as a whole (staging stopped, a flush failed, deletions held back).
    Pass,
    /// A state file could not be written.
    State,
}

#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    pub wire_bytes: u64,
    /// Fetched objects that came as deltas against the host's old version.
    pub delta_objects: u64,
    /// Set when objects were fetched from an object store (its URL); then the counts below.
    pub store_url: Option<String>,
    /// Objects from the store, verified.
    pub store_objects: u64,
    /// Objects from the master, verified (after a store failure, or re-fetched).
    pub master_objects: u64,
    /// Of those, the ones the store failed to give (error, missing, deadline).
    pub store_fallback_objects: u64,
    /// Objects from the store whose content did not match their hash, fetched again.
    pub store_refused: u64,
    /// Objects the store gave as chunks, their chunks reused from the host's old version of
    /// the file and fetched, the bytes of those fetched (as stored) and of the chunk indexes.
    pub store_chunked_objects: u64,
    pub store_chunks_reused: u64,
    pub store_chunks_fetched: u64,
    pub store_chunk_bytes: u64,
    pub store_index_bytes: u64,
    /// GETs sent to the store, the bytes it sent, and the objects cut from ranges of packs.
    pub store_gets: u64,
    pub store_bytes: u64,
    pub store_packed: u64,
    /// Of the objects from the store, those decoded out of its solid delta.
    pub solid_objects: u64,
    pub local_copies: u64,
    pub local_bytes: u64,
    /// Temp files of an interrupted pass renamed into place instead of fetched again.
    pub resumed: u64,
    /// Leftovers of an interrupted pass removed.
    pub leftovers_removed: u64,
    /// True if the object stream broke (master gone mid-pass).
    pub master_lost: bool,
    /// True if a stop request cut the pass short.
    pub cancelled: bool,
    /// True if staging stopped because the filesystem ran out of space (or quota).
    pub no_space: bool,
    /// Files staged as hard links to local store objects (prefetched or kept content).
    pub store_links: u64,
    /// Files copied from local store objects (a second path with the same content, or the
    /// store on another filesystem).
    pub store_copies: u64,
    /// Old files kept in the local store before the commit replaced or deleted them, and
    /// those that could not be kept (a later local rollback needs the master for them).
    pub kept_old: u64,
    pub keep_failed: u64,
}

/// What the apply did: which plan changes succeeded, and the failures.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<bool>,
    pub root_done: bool,
    pub failures: Vec<Failure>,
    pub stats: ApplyStats,
    /// Whole-tree staging did not complete: everything it staged was removed and nothing was
    /// committed, so the root is as it was before the pass.
    pub rolled_back: bool,
    /// Changes not made because other content failed: deletions, symlinks to content that
    /// failed, hard links to a leader that failed.
    pub held_back: usize,
}

/// Where a verified copy of some content can be read during this pass.
#[derive(Clone)]
enum Location {
    /// A temp file (this name beside this path), to be renamed to the path (maybe already,
    /// by the flushing thread). No directory descriptor is kept: see [`Held`].
    Staged(String, RelPath),
    Committed(RelPath),
    /// An object of the local store.
    Store(Hash),
}

/// What the flushing thread did with a sealed batch: `Err` if its `syncfs` failed (nothing
/// was renamed), else the result of each rename, in the order of the batch's non-exchange
/// entries (none with whole-tree staging).
type Flushed = io::Result<Vec<io::Result<()>>>;

struct Staged {
    index: usize,
    dir: Arc<OwnedFd>,
    temp: String,
    hash: Option<Hash>,
    /// The old entry is a directory or the new one is: swap atomically instead of renaming.
    exchange: bool,
    /// A hard link to an existing inode: if the path already is that inode, `rename(2)` does
    /// nothing and leaves the temp name, which must then be removed.
    link: bool,
}

/// A [`Staged`] entry waiting for the whole-tree commit. It keeps no descriptor of its
/// directory (a tree has more directories than a process may hold open: 1,847 in a Debian
/// root with nginx, against a default limit of 1,024); the commit resolves it again, beneath
/// the root and without following symlinks, in path order so the cache serves most lookups.
struct Held {
    index: usize,
    temp: String,
    hash: Option<Hash>,
    exchange: bool,
    link: bool,
}

impl From<Staged> for Held {
    fn from(s: Staged) -> Held {
        Held { index: s.index, temp: s.temp, hash: s.hash, exchange: s.exchange, link: s.link }
    }
}

/// A directory built under a temp name to replace the non-directory at `path`.
struct DirSwap {
    dir: Arc<OwnedFd>,
    temp: String,
    path: RelPath,
}

/// Errors that say the host, not one file, is in trouble: staging stops at the first one.
fn is_systemic(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EIO))
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Where a symlink at `link` with `target` points, beneath the root, by the text alone (an
/// absolute target is taken from the root, as it will be on the host once this is its `/`).
fn resolve_target(link: &RelPath, target: &[u8]) -> Option<RelPath> {
    let mut parts: Vec<&[u8]> = Vec::new();
    if !target.starts_with(b"/") {
        if let Some(p) = link.parent_bytes() {
            parts.extend(p.split(|&c| c == b'/'));
        }
    }
    for comp in target.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    RelPath::new(parts.join(&b'/')).ok()
}

struct Applier<'a> {
    root: RootDir,
    manifest: &'a Manifest,
    plan: &'a Plan,
    staging: Staging,
    objects: ObjectStream,
    /// Where one object is fetched on its own when the stream's copy failed; `None` for a
    /// pass with no network (a commit or rollback from the local store).
    aside: Option<Box<dyn ContentSource>>,
    /// The local store: content is linked from it, and old content kept in it.
    store: Option<Arc<crate::store::Store>>,
    out: Outcome,
    /// Directories that could not be made: everything beneath them is skipped.
    failed_dirs: Vec<RelPath>,
    /// Every path whose new entry could not be made (for what depends on it).
    failed: HashSet<RelPath>,
    /// Some content (a directory, file, node or link) could not be staged or committed:
    /// nothing destructive may follow.
    content_failed: bool,
    /// The first failure that stops all staging (disk full, master gone, stop requested).
    halt: Option<String>,
    /// Old directories swapped out and removed whole: their contents' deletes are done.
    removed_dirs: Vec<RelPath>,
    /// Directories this pass created (whole-tree staging removes them again on a roll-back).
    created_dirs: Vec<RelPath>,
    /// Directories built under temp names, swapped in at the commit.
    dir_swaps: Vec<DirSwap>,
    /// Directories whose mtime our own work changed (`None`: the root).
    touched: BTreeSet<Option<RelPath>>,
    /// Temp names staged as hard links to local store objects: the object's name, and whether
    /// it had other names (like a hard link to an existing inode, one may then already be the
    /// inode at its path, and its temp name is removed after the rename, which does nothing).
    store_linked: HashMap<String, (String, bool)>,
    /// The store object staged for a change (by index), told to the store once committed.
    lent_at: HashMap<usize, String>,
    /// The thread releasing the store's links to what the commit put in the root.
    releasing: Option<std::thread::JoinHandle<()>>,
    /// Where this pass put content that later changes need again (`plan.reused` only: on a
    /// cold sync of a million files, a map of every file would cost ~130 MB).
    materialized: HashMap<Hash, Location>,
    /// Hard-link leaders staged this pass, by path: their members link to the temp file.
    leaders: HashMap<RelPath, String>,
    /// Index in `plan.fetch` of the next object on the ordered stream.
    fetch_next: usize,
    staged: Vec<Staged>,
    staged_bytes: u64,
    /// Whole-tree staging: everything staged and flushed so far, waiting for the commit.
    held: Vec<Held>,
    /// The previous batch, whose `syncfs` (and, in batches, then its renames) run on a helper
    /// thread while the next batch is staged; nothing of it is renamed before that `syncfs`
    /// has returned.
    flushing: Option<(Vec<Staged>, std::thread::JoinHandle<Flushed>)>,
    /// Time spent waiting for a batch's `syncfs` and renames.
    syncfs_wait: Stopwatch,
    cancel: Option<Arc<AtomicBool>>,
    throttle: throttle::Throttle,
}

/// Where the apply gets one object on its own, when the copy the stream gave (or the local
/// store's) failed: the master, in a pass that reaches it. The apply knows nothing else of
/// the network.
pub trait ContentSource: Send {
    /// A stream of this one object (`size`: the most it may hold).
    fn fetch_one(&self, hash: Hash, size: u64) -> ObjectStream;
}

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

impl Applier<'_> {
    fn fail(&mut self, path: &RelPath, kind: FailureKind, what: &str, e: impl std::fmt::Display) {
        self.failure(FailedAt::Entry(path.clone()), kind, format!("{what}: {e}"));
    }

    /// A path whose new entry could not be made: from now on nothing destructive is done.
    fn fail_content(&mut self, path: &RelPath, kind: FailureKind, what: &str, e: impl std::fmt::Display) {
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.fail(path, kind, what, e);
    }

    fn failure(&mut self, at: FailedAt, kind: FailureKind, error: String) {
        tracing::debug!(at = %at, ?kind, "{error}");
        self.out.failures.push(Failure { at, kind, error });
    }

    /// A failure of the pass as a whole, not of one entry.
    fn fail_pass(&mut self, error: String) {
        self.failure(FailedAt::Root(self.root.path().to_owned()), FailureKind::Pass, error);
    }

    /// A change not made because something it depends on failed.
    fn hold_back(&mut self, path: &RelPath, why: String) {
        self.out.held_back += 1;
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.failure(FailedAt::Entry(path.clone()), FailureKind::HeldBack, format!("held back: {why}"));
    }

    /// Stops all further staging, keeping the first reason.
    fn halt_on(&mut self, e: &io::Error) {
        if is_no_space(e) {
            self.out.stats.no_space = true;
        }
        if self.halt.is_none() {
            self.halt = Some(e.to_string());
        }
    }

    fn stopped(&mut self) -> bool {
        crate::progress::step();
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            self.out.stats.cancelled = true;
        }
        self.out.stats.cancelled
    }

    /// The failed directory `path` lies beneath, if any.
    fn blocked(&self, path: &RelPath) -> Option<RelPath> {
        self.failed_dirs.iter().find(|d| path.is_within(d) && *d != path).cloned()
    }

    fn check_blocked(&mut self, path: &RelPath) -> bool {
        if let Some(d) = self.blocked(path) {
            self.fail_content(
                path,
                FailureKind::HeldBack,
                "skipped",
                format!("its parent directory {d} could not be made"),
            );
            return true;
        }
        false
    }

    fn touch_parent(&mut self, path: &RelPath) {
        self.touched.insert(path.parent());
    }
}

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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use manifest::{Entry, Hash, Kind, Manifest, Meta, RelPath};
use rustix::fs::AtFlags;
use rustix::io::Errno;

use crate::fetch::{ObjectError, ObjectStream};
use crate::hostfs::fsops::{self, MetaParts, VerifyingWriter};
use crate::hostfs::root::RootDir;
use crate::plan::{Op, Plan, Source};
use crate::progress::Stopwatch;

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

/// One path that could not be brought in line, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub path: String,
    pub error: String,
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
        a.fail_str(
            &a.root.path().display().to_string(),
            format!("staging stopped: {why}; {what} ({skipped} changes left for the next pass)"),
        );
    }
    tracing::debug!(
        waiting_for_objects = a.objects.waited.secs(),
        waiting_for_syncfs = a.syncfs_wait.secs(),
        "apply: content stage waits"
    );
    let t = std::time::Instant::now();
    if let Err(e) = rustix::fs::syncfs(a.root.fd()) {
        a.fail_str(&a.root.path().display().to_string(), format!("cannot flush the filesystem (syncfs): {e}"));
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
    fn fail(&mut self, path: &RelPath, what: &str, e: impl std::fmt::Display) {
        self.fail_str(&path.to_string(), format!("{what}: {e}"));
    }

    /// A path whose new entry could not be made: from now on nothing destructive is done.
    fn fail_content(&mut self, path: &RelPath, what: &str, e: impl std::fmt::Display) {
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.fail(path, what, e);
    }

    fn fail_str(&mut self, path: &str, error: String) {
        tracing::debug!(path, "{error}");
        self.out.failures.push(Failure { path: path.to_owned(), error });
    }

    /// A change not made because something it depends on failed.
    fn hold_back(&mut self, path: &RelPath, why: String) {
        self.out.held_back += 1;
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.fail_str(&path.to_string(), format!("held back: {why}"));
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
            self.fail_content(path, "skipped", format!("its parent directory {d} could not be made"));
            return true;
        }
        false
    }

    fn touch_parent(&mut self, path: &RelPath) {
        self.touched.insert(path.parent());
    }

    // Phase 0.
    fn remove_leftovers(&mut self) {
        for l in &self.plan.leftovers {
            let r = self
                .root
                .parent(&l.path)
                .and_then(|(dir, name)| fsops::remove_tree(dir.as_fd(), name, self.root.dev()));
            match r {
                Ok(()) => {
                    self.out.stats.leftovers_removed += 1;
                    self.touched.insert(l.path.parent());
                }
                Err(e) => self.fail(&l.path, "cannot remove a temp entry an interrupted pass left", e),
            }
        }
        if !self.plan.leftovers.is_empty() {
            tracing::info!(removed = self.out.stats.leftovers_removed, "leftovers of an interrupted pass removed");
        }
    }

    // Phase 1.
    fn make_dirs(&mut self) {
        for c in self.plan.changes.iter() {
            let (new, replace) = match &c.op {
                Op::Create { new, .. } if new.kind == Kind::Dir => (new, false),
                Op::Replace { new, .. } if new.kind == Kind::Dir => (new, true),
                _ => continue,
            };
            if self.stopped() {
                return;
            }
            if self.check_blocked(&c.path) {
                self.failed_dirs.push(c.path.clone());
                continue;
            }
            if let Err(e) = self.make_dir(&new.path, replace) {
                if is_systemic(&e) {
                    self.halt_on(&e);
                }
                self.fail_content(&c.path, "cannot create directory", e);
                self.failed_dirs.push(c.path.clone());
                continue;
            }
            // Metadata, and so completion, come in phase 6.
            self.touch_parent(&c.path);
        }
    }

    fn make_dir(&mut self, path: &RelPath, replace: bool) -> io::Result<()> {
        let (dir, name) = self.root.parent(path)?;
        if !replace {
            return match rustix::fs::mkdirat(&*dir, name, rustix::fs::Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    self.created_dirs.push(path.clone());
                    Ok(())
                }
                Err(Errno::EXIST) if is_dir_at(&dir, name) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let temp = fsops::create_temp_dir(dir.as_fd())?;
        if self.staging == Staging::Whole {
            // Built aside; what lies beneath the path is staged inside it until the commit.
            let fd =
                rustix::fs::openat(&*dir, temp.as_str(), crate::hostfs::root::dir_flags(), rustix::fs::Mode::empty());
            let fd = match fd {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = rustix::fs::unlinkat(&*dir, temp.as_str(), AtFlags::REMOVEDIR);
                    return Err(e.into());
                }
            };
            self.root.redirect(path.clone(), Arc::new(fd));
            self.dir_swaps.push(DirSwap { dir, temp, path: path.clone() });
            return Ok(());
        }
        let r = fsops::commit_rename(dir.as_fd(), &temp, name, true);
        if let Err(e) = r {
            let _ = rustix::fs::unlinkat(&*dir, temp.as_str(), AtFlags::REMOVEDIR);
            return Err(e);
        }
        self.root.forget(path);
        // The old non-directory now sits at the temp name.
        fsops::remove_tree(dir.as_fd(), temp.as_bytes(), self.root.dev())
    }

    /// The first failed path a symlink at `path` to `target` leads to, if any.
    fn failed_target(&self, path: &RelPath, target: Option<&[u8]>) -> Option<RelPath> {
        if self.failed.is_empty() {
            return None;
        }
        let to = resolve_target(path, target?)?;
        let mut at = Some(to);
        while let Some(p) = at {
            if self.failed.contains(&p) {
                return Some(p);
            }
            at = p.parent();
        }
        None
    }

    // Phase 2: regular files first, then other nodes (symlinks can then be checked against
    // the content they point to). `leaders`: paths whose staged temp file hard links will
    // point to (whole-tree staging).
    fn stage_content(&mut self, leaders: &HashSet<&RelPath>) {
        for files in [true, false] {
            for (i, c, new) in self.plan.staged() {
                if (new.kind == Kind::File) != files || matches!(c.op.source(), Some(Source::Link(_))) {
                    continue;
                }
                if self.halt.is_some() || self.stopped() {
                    return;
                }
                let source = c.op.source().expect("ops with a new entry have a source");
                if self.check_blocked(&c.path) {
                    self.drain_unused(source);
                    continue;
                }
                if new.kind == Kind::Symlink {
                    if let Some(t) = self.failed_target(&c.path, new.target.as_deref()) {
                        self.hold_back(&c.path, format!("the symlink's target {t} could not be brought in"));
                        continue;
                    }
                }
                let exchange = c.op.old_entry().is_some_and(|o| o.entry.kind == Kind::Dir);
                // Even a failed attempt creates and removes a temp name there.
                self.touch_parent(&c.path);
                match self.stage(new, source) {
                    Ok((dir, temp)) => {
                        let hash = new.hash;
                        if let Some(h) = hash.filter(|h| self.plan.reused.contains(h)) {
                            self.materialized
                                .entry(h)
                                .or_insert_with(|| Location::Staged(temp.clone(), new.path.clone()));
                        }
                        if leaders.contains(&c.path) {
                            self.leaders.insert(c.path.clone(), temp.clone());
                        }
                        self.staged_bytes += new.size;
                        let link = match self.store_linked.remove(&temp) {
                            Some((object, shared)) => {
                                self.lent_at.insert(i, object);
                                shared
                            }
                            None => false,
                        };
                        self.staged.push(Staged { index: i, dir, temp, hash, exchange, link });
                        crate::progress::staged();
                        if self.staged.len() >= BATCH_FILES || self.staged_bytes >= BATCH_BYTES {
                            self.seal_batch();
                        }
                    }
                    Err(e) => {
                        self.drain_unused(source);
                        if is_systemic(&e) || self.out.stats.master_lost {
                            self.halt_on(&e);
                        }
                        self.fail_content(&c.path, "cannot stage new content", e);
                    }
                }
            }
        }
    }

    /// Whole-tree staging: hard links to their leaders, staged or in place, under temp names.
    fn stage_links(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate() {
            let Some(Source::Link(leader)) = c.op.source() else { continue };
            if !c.op.makes_new_inode() || self.halt.is_some() || self.stopped() || self.check_blocked(&c.path) {
                continue;
            }
            if self.failed.contains(leader) {
                self.hold_back(&c.path, format!("its hard-link leader {leader} could not be brought in"));
                continue;
            }
            let exchange = c.op.old_entry().is_some_and(|o| o.entry.kind == Kind::Dir);
            self.touch_parent(&c.path);
            let r = self.root.parent(&c.path).and_then(|(dir, _)| {
                let (ldir, lname) = self.root.parent(leader)?;
                // The leader's staged temp file if it has one, else the leader in place.
                let lname = self.leaders.get(leader).map_or(lname, |t| t.as_bytes());
                Ok((dir.clone(), fsops::link_temp(ldir.as_fd(), lname, dir.as_fd())?))
            });
            match r {
                Ok((dir, temp)) => {
                    self.staged.push(Staged { index: i, dir, temp, hash: None, exchange, link: true });
                    crate::progress::staged();
                }
                Err(e) => {
                    if is_systemic(&e) {
                        self.halt_on(&e);
                    }
                    self.fail_content(&c.path, &format!("cannot hard-link to {leader}"), e);
                }
            }
        }
    }

    /// Whole-tree staging, once everything is staged and durable: each temp entry is renamed
    /// over its path (files first, then other nodes and links, in path order within each),
    /// then each directory built aside is swapped in, deepest first.
    fn commit_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        // The apply thread commits what only it can: swaps of an old directory (removed after)
        // and entries beneath a directory built aside (only its handle resolves them there).
        let swapped: Vec<RelPath> = self.dir_swaps.iter().map(|d| d.path.clone()).collect();
        let special = |h: &Held| {
            h.exchange || {
                let p = &self.plan.changes[h.index].path;
                swapped.iter().any(|d| p.is_within(d))
            }
        };
        let (mine, plain): (Vec<Held>, Vec<Held>) = held.into_iter().partition(|h| special(h));
        // Two rounds, regular files first, so no symlink is published before a file of this
        // pass it may point to.
        let is_file =
            |h: &Held| !h.link && self.plan.changes[h.index].op.new_entry().is_some_and(|n| n.kind == Kind::File);
        let (files, others): (Vec<Held>, Vec<Held>) = plain.into_iter().partition(|h| is_file(h));
        for round in [files, others] {
            let results = rename_in_parallel(&mut self.root, self.plan, &round);
            for (h, r) in round.into_iter().zip(results) {
                let path = self.plan.changes[h.index].path.clone();
                self.record_commit(h.index, h.hash, path, r);
            }
        }
        for h in mine {
            let path = self.plan.changes[h.index].path.clone();
            let dir = match self.root.parent(&path) {
                Ok((dir, _)) => dir,
                Err(e) => {
                    self.fail_content(&path, "cannot reach the staged entry's directory to commit it", e);
                    continue;
                }
            };
            let s = Staged { index: h.index, dir, temp: h.temp, hash: h.hash, exchange: h.exchange, link: h.link };
            let r = match s.exchange {
                false => fsops::commit_rename(s.dir.as_fd(), &s.temp, path.file_name(), false),
                true => self.commit(&s, &path),
            };
            settle(&s.dir, &s.temp, s.link, &r, self.root.dev(), &path);
            self.record_commit(s.index, s.hash, path, r);
        }
        let mut swaps = std::mem::take(&mut self.dir_swaps);
        swaps.sort_by(|a, b| b.path.cmp(&a.path));
        for d in swaps {
            self.root.unredirect(&d.path);
            let r = fsops::commit_rename(d.dir.as_fd(), &d.temp, d.path.file_name(), true)
                .and_then(|()| fsops::remove_tree(d.dir.as_fd(), d.temp.as_bytes(), self.root.dev()));
            if let Err(e) = r {
                let _ = fsops::remove_tree(d.dir.as_fd(), d.temp.as_bytes(), self.root.dev());
                self.failed_dirs.push(d.path.clone());
                self.fail_content(&d.path, "cannot swap the new directory into place", e);
            }
        }
    }

    /// Records the result of renaming a staged entry into place (its temp name already
    /// settled by [`settle`]).
    fn record_commit(&mut self, index: usize, hash: Option<Hash>, path: RelPath, r: io::Result<()>) {
        match r {
            Ok(()) => {
                self.out.done[index] = true;
                if let (Some(object), Some(store)) = (self.lent_at.remove(&index), &self.store) {
                    store.placed(&object);
                }
                if let Some(h) = hash.filter(|h| self.plan.reused.contains(h)) {
                    self.materialized.insert(h, Location::Committed(path));
                }
            }
            Err(e) => {
                if let Some(h) = hash {
                    self.materialized.remove(&h);
                }
                self.fail_content(&path, "cannot rename new content into place", e);
            }
        }
    }

    /// Whole-tree staging that could not complete: removes every temp entry, every directory
    /// built aside and every directory this pass made, and puts back the mtimes of the
    /// directories it touched, so the root is as it was.
    fn roll_back(&mut self) {
        let dev = self.root.dev();
        let mut left = 0usize;
        for s in std::mem::take(&mut self.staged) {
            if fsops::remove_tree(s.dir.as_fd(), s.temp.as_bytes(), dev).is_err() {
                left += 1;
            }
        }
        for h in std::mem::take(&mut self.held) {
            let path = &self.plan.changes[h.index].path;
            let r = self.root.parent(path).and_then(|(dir, _)| fsops::remove_tree(dir.as_fd(), h.temp.as_bytes(), dev));
            if r.is_err() {
                left += 1;
            }
        }
        for d in std::mem::take(&mut self.dir_swaps).into_iter().rev() {
            self.root.unredirect(&d.path);
            if fsops::remove_tree(d.dir.as_fd(), d.temp.as_bytes(), dev).is_err() {
                left += 1;
            }
        }
        for p in std::mem::take(&mut self.created_dirs).into_iter().rev() {
            self.root.forget(&p);
            let r =
                self.root.parent(&p).and_then(|(dir, name)| Ok(rustix::fs::unlinkat(&*dir, name, AtFlags::REMOVEDIR)?));
            if r.is_err() {
                left += 1;
            }
        }
        if left > 0 {
            self.fail_str(
                &self.root.path().display().to_string(),
                format!("rolling back: {left} temp entries or new directories could not be removed; the next pass removes them"),
            );
        }
        // Parent mtimes as they were: the host's own where the plan saw it differ, else the
        // image's, which the host matched.
        for t in std::mem::take(&mut self.touched) {
            let meta = match &t {
                None => Some(self.plan.root.as_ref().map_or(&self.manifest.root, |(old, _, _)| old)),
                Some(p) => self.old_dir_meta(p),
            };
            let Some(meta) = meta.cloned() else { continue };
            let _ = self.root.dir(t.as_ref()).and_then(|fd| fsops::set_fd_meta(fd.as_fd(), &meta, MetaParts::MTIME));
        }
        self.out.rolled_back = true;
    }

    /// The metadata the host's directory `p` had when the pass scanned it.
    fn old_dir_meta(&self, p: &RelPath) -> Option<&Meta> {
        match self.plan.changes.binary_search_by(|c| c.path.cmp(p)) {
            Ok(i) => self.plan.changes[i].op.old_entry().filter(|o| o.entry.kind == Kind::Dir).map(|o| &o.entry.meta),
            Err(_) => self.manifest.get(p).filter(|e| e.kind == Kind::Dir).map(|e| &e.meta),
        }
    }

    /// Keeps the object stream aligned when the path that was to consume its next object did
    /// not: the object is read and dropped, and later users fall back to a single fetch.
    fn drain_unused(&mut self, source: &Source) {
        if let Source::Fetch(h) = source {
            if self.next_fetch_is(h) {
                let size = self.plan.fetch[self.fetch_next].1;
                self.fetch_next += 1;
                let _ = self.objects.next_into::<std::fs::File>(*h, size, None);
            }
        }
    }

    fn next_fetch_is(&self, h: &Hash) -> bool {
        self.plan.fetch.get(self.fetch_next).is_some_and(|(x, _)| x == h)
    }

    /// Creates the new entry under a temp name beside `new.path`, complete with metadata.
    fn stage(&mut self, new: &Entry, source: &Source) -> io::Result<(Arc<OwnedFd>, String)> {
        let (dir, _) = self.root.parent(&new.path)?;
        if new.kind != Kind::File {
            let temp = fsops::create_temp_node(dir.as_fd(), new)?;
            return Ok((dir, temp));
        }
        if let Source::Resume(from, h) = source {
            match self.resume(&dir, new, from, *h) {
                Ok(temp) => return Ok((dir, temp)),
                Err(e) => {
                    tracing::warn!(path = %new.path, "cannot reuse {from}, left by an interrupted pass: {e}; fetching it");
                    let _ =
                        self.root.parent(from).and_then(|(d, n)| Ok(rustix::fs::unlinkat(&*d, n, AtFlags::empty())?));
                }
            }
        }
        if let Some(temp) = self.link_from_store(&dir, new)? {
            return Ok((dir, temp));
        }
        let (file, temp) = fsops::create_temp_file(dir.as_fd())?;
        let r = self.fill(file, new, source);
        match r {
            Ok(()) => Ok((dir, temp)),
            Err(e) => {
                let _ = rustix::fs::unlinkat(&*dir, temp.as_str(), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// The new file as a hard link to the local store's object for its content (verified),
    /// given the entry's metadata, under a temp name beside its path; `None` when the store
    /// does not have it (or lent it to another path this pass).
    fn link_from_store(&mut self, dir: &Arc<OwnedFd>, new: &Entry) -> io::Result<Option<String>> {
        let (Some(store), Some(hash)) = (self.store.as_ref(), new.hash) else { return Ok(None) };
        if new.size == 0 {
            return Ok(None);
        }
        let lent = match store.link_into(&hash, &new.meta, dir, &self.throttle.read) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(None),
            Err(e) if is_systemic(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(path = %new.path, "cannot link the content from the local store: {e}; copying it");
                return Ok(None);
            }
        };
        // Most objects were written with this path's metadata at the prefetch, and are left
        // as they are: no need to open them.
        let r = match lent.needs.any() {
            false => Ok(()),
            true => fsops::open_regular(dir.as_fd(), lent.temp.as_str())
                .and_then(|f| fsops::set_fd_meta(f.as_fd(), &new.meta, lent.needs)),
        };
        match r {
            Ok(()) => {
                self.out.stats.store_links += 1;
                self.store_linked.insert(lent.temp.clone(), (lent.object, lent.shared));
                Ok(Some(lent.temp))
            }
            Err(e) => {
                let _ = rustix::fs::unlinkat(&**dir, lent.temp.as_str(), AtFlags::empty());
                Err(e)
            }
        }
    }

    /// After the commit: the store's links to what is now in the root go, on a helper thread
    /// while this one updates metadata, deletes and flushes (they touch only the store's
    /// directory; the pass waits for it before it ends).
    fn release_store(&mut self) {
        let Some(store) = self.store.clone() else { return };
        let helper = store.clone();
        match std::thread::Builder::new().name("release".into()).spawn(move || helper.release_lent()) {
            Ok(h) => self.releasing = Some(h),
            Err(_) => store.release_lent(),
        }
    }

    /// Whole-tree staging with a local store, once everything is staged: the old content of
    /// every regular file the commit replaces or deletes is kept in the store (a hard link to
    /// its inode), so a local rollback can put it back.
    fn keep_old(&mut self) {
        let Some(store) = self.store.clone() else { return };
        for c in &self.plan.changes {
            let Some(old) = c.op.old_entry() else { continue };
            let replaced = match &c.op {
                Op::Delete { .. } | Op::Replace { .. } => true,
                Op::Update { diff, .. } => diff.needs_new_inode(),
                Op::Create { .. } => false,
            };
            if !replaced || old.entry.kind != Kind::File || old.entry.size == 0 || old.mount_point {
                continue;
            }
            let r = self.root.parent(&c.path).and_then(|(dir, name)| {
                let hash = match old.entry.hash {
                    Some(h) => h,
                    None => {
                        let f = fsops::open_regular(dir.as_fd(), name)?;
                        let mut h = blake3::Hasher::new();
                        manifest::scan::for_each_read(throttle::Throttled::new(&f, &self.throttle.read), |b| {
                            h.update(b);
                            Ok(())
                        })?;
                        Hash(*h.finalize().as_bytes())
                    }
                };
                let scanned = (old.ino, old.ctime_ns, &old.entry.meta.xattrs);
                store.keep(&hash, &dir, name, Some(scanned), &self.throttle.write)
            });
            match r {
                Ok(()) => self.out.stats.kept_old += 1,
                Err(e) => {
                    self.out.stats.keep_failed += 1;
                    tracing::warn!(path = %c.path, "cannot keep the old content in the local store: {e}; a local rollback will need the master for it");
                }
            }
        }
        // The kept inodes are stamped once the commit's renames have changed their ctime:
        // at the end of the pass (`Store::release_lent`).
    }

    /// Takes over a temp file an interrupted pass left with content `hash`: verified again
    /// (read whole), moved beside `new.path` under a fresh temp name unless it is there already,
    /// and given the entry's metadata. Its single name was checked by the scan, and again here.
    fn resume(&mut self, dir: &Arc<OwnedFd>, new: &Entry, from: &RelPath, hash: Hash) -> io::Result<String> {
        let (from_dir, from_name) = self.root.parent(from)?;
        let (file, size) = fsops::open_regular_sized(from_dir.as_fd(), from_name)?;
        let st = rustix::fs::fstat(&file)?;
        if st.st_nlink != 1 || size != new.size {
            return Err(io::Error::other("it changed since the scan"));
        }
        let mut hasher = blake3::Hasher::new();
        manifest::scan::for_each_read(throttle::Throttled::new(&file, &self.throttle.read), |b| {
            hasher.update(b);
            Ok(())
        })?;
        if Hash(*hasher.finalize().as_bytes()) != hash {
            return Err(io::Error::other("its content no longer matches"));
        }
        let temp = if from.parent() == new.path.parent() {
            String::from_utf8(from_name.to_vec()).map_err(|_| io::Error::other("not a temp name"))?
        } else {
            fsops::move_to_temp(from_dir.as_fd(), from_name, dir.as_fd())?
        };
        fsops::set_fd_meta(file.as_fd(), &new.meta, MetaParts::ALL)?;
        self.out.stats.resumed += 1;
        Ok(temp)
    }

    /// Writes verified content and metadata into a new temp file.
    fn fill(&mut self, file: std::fs::File, new: &Entry, source: &Source) -> io::Result<()> {
        let hash = new.hash.expect("validated: regular files have a hash");
        let mut w = VerifyingWriter::new(&file, new.size, self.throttle.write.clone());
        if new.sparse {
            w = w.sparse();
        }
        if new.size > 0 {
            self.content_into(hash, source, &mut w)?;
        }
        w.finish(hash)?;
        fsops::set_fd_meta(file.as_fd(), &new.meta, MetaParts::ALL)
    }

    /// Fills `w` with the content `hash` from the cheapest place that has it. A bad source is
    /// discarded and the next one tried, each from an empty file.
    fn content_into(&mut self, hash: Hash, source: &Source, w: &mut VerifyingWriter) -> io::Result<()> {
        let mut errors = Vec::new();
        // 1. A local copy: a host file the plan named, or content already fetched this pass.
        let mut candidates = Vec::new();
        if let Source::Local(p, _) = source {
            candidates.push(Location::Committed(p.clone()));
        }
        if let Some(l) = self.materialized.get(&hash) {
            candidates.push(l.clone());
        }
        if self.store.as_ref().is_some_and(|s| s.has(&hash)) {
            candidates.push(Location::Store(hash));
        }
        for loc in candidates {
            match self.copy_local(&loc, w).and_then(|n| w.check(hash).map(|()| n)) {
                Ok(n) => {
                    if matches!(loc, Location::Store(_)) {
                        self.out.stats.store_copies += 1;
                    } else {
                        self.out.stats.local_copies += 1;
                    }
                    self.out.stats.local_bytes += n;
                    return Ok(());
                }
                Err(e) if is_systemic(&e) => return Err(e),
                Err(e) => {
                    errors.push(format!("local copy failed: {e}"));
                    w.reset()?;
                }
            }
        }
        // 2. The next object on the ordered stream, if this is its first use.
        if self.next_fetch_is(&hash) {
            let size = self.plan.fetch[self.fetch_next].1;
            self.fetch_next += 1;
            // A delta was decoded against its base by the stream's decode stage.
            let r = self.objects.next_into(hash, size, Some(&mut *w));
            // Whether the store (not the master) gave this object.
            let from_store = self.objects.store.as_ref().is_some_and(|t| !t.failed_over(&hash));
            match r.map_err(|e| (w.check(hash).is_err(), e)) {
                Ok(()) if w.check(hash).is_ok() => {
                    self.out.stats.fetched_bytes += w.written();
                    self.count_source(&hash, from_store);
                    return Ok(());
                }
                Ok(()) => {
                    let e = w.check(hash).unwrap_err().to_string();
                    if from_store {
                        self.refused_from_store(&hash, &e);
                    }
                    errors.push(e)
                }
                Err((_, ObjectError::Broken(e))) => {
                    self.out.stats.master_lost = true;
                    return Err(io::Error::other(format!("object stream broke: {e}")));
                }
                // The disk, not the object: no other source will do better.
                Err((_, ObjectError::Content { source, .. })) if is_systemic(&source) => return Err(source),
                Err((_, e)) => {
                    if from_store && matches!(e, ObjectError::Content { .. }) {
                        self.refused_from_store(&hash, &e.to_string());
                    }
                    errors.push(e.to_string())
                }
            }
            w.reset()?;
        }
        // 3. A fetch of this one object.
        let Some(aside) = self.aside.as_ref() else {
            errors.push("not in the local store, and this pass does not reach the master".into());
            return Err(io::Error::other(errors.join("; ")));
        };
        if !self.out.stats.master_lost {
            tracing::debug!(hash = %hash, errors = ?errors, "fetching one object on its own");
            let mut one = aside.fetch_one(hash, w.limit());
            let r = one.next_into(hash, w.limit(), Some(&mut *w));
            self.out.stats.wire_bytes += one.wire_bytes;
            if r.is_ok() {
                one.finish();
            }
            match &r {
                Err(ObjectError::Content { source, .. }) if is_systemic(source) => {
                    return Err(io::Error::from_raw_os_error(source.raw_os_error().unwrap_or(libc::EIO)));
                }
                // The master stopped answering (a deadline) or went away: staging stops here
                // rather than wait out a deadline for every object left.
                Err(ObjectError::Broken(e)) => {
                    self.out.stats.master_lost = true;
                    return Err(io::Error::other(format!("fetching one object on its own: {e}")));
                }
                _ => {}
            }
            match r.map_err(|e| e.to_string()).and_then(|()| w.check(hash).map_err(|e| e.to_string())) {
                Ok(()) => {
                    self.out.stats.fetched_objects += 1;
                    self.out.stats.fetched_bytes += w.written();
                    self.count_source(&hash, false);
                    return Ok(());
                }
                Err(e) => errors.push(e),
            }
        }
        Err(io::Error::other(errors.join("; ")))
    }

    /// Counts a verified fetched object by where it came from, when a store is in use.
    fn count_source(&mut self, hash: &Hash, from_store: bool) {
        let Some(t) = &self.objects.store else { return };
        let s = &mut self.out.stats;
        s.store_url.get_or_insert_with(|| t.url.clone());
        if from_store {
            s.store_objects += 1;
        } else {
            s.master_objects += 1;
            if t.failed_over(hash) {
                s.store_fallback_objects += 1;
            }
        }
    }

    /// An object from the store failed verification: counted, and logged (it is fetched
    /// again from the master).
    fn refused_from_store(&mut self, hash: &Hash, why: &str) {
        let url = self.objects.store.as_ref().map(|t| t.url.clone()).unwrap_or_default();
        tracing::warn!("object store {url}: object {hash} refused ({why}); fetching it from the master");
        self.out.stats.store_refused += 1;
        self.out.stats.store_url.get_or_insert(url);
    }

    fn copy_local(&mut self, loc: &Location, w: &mut VerifyingWriter) -> io::Result<u64> {
        let file = match loc {
            Location::Staged(temp, path) => {
                let (dir, name) = self.root.parent(path)?;
                match fsops::open_regular(dir.as_fd(), temp.as_str()) {
                    // Renamed meanwhile by the flushing thread (the content is verified anyway).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => fsops::open_regular(dir.as_fd(), name)?,
                    r => r?,
                }
            }
            Location::Committed(p) => {
                let (dir, name) = self.root.parent(p)?;
                fsops::open_regular(dir.as_fd(), name)?
            }
            Location::Store(h) => self
                .store
                .as_ref()
                .ok_or_else(|| io::Error::other("no local store"))?
                .open_object(h, &self.throttle.read)?,
        };
        fsops::copy(throttle::Throttled::new(file, &self.throttle.read), w)
    }

    /// Closes the batch being staged: the batch before it is committed (in batches) or held
    /// for the commit (whole-tree staging), then this one's `syncfs`, and in batches its
    /// renames, start on a helper thread, so staging the next batch overlaps its writeback and
    /// its renames (a rename over an old file frees that file's blocks, which is most of an
    /// upgrade's rename cost).
    fn seal_batch(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        self.commit_flushed();
        let batch = std::mem::take(&mut self.staged);
        self.staged_bytes = 0;
        let renames: Vec<(Arc<OwnedFd>, String, RelPath)> = batch
            .iter()
            .filter(|s| !s.exchange && self.staging == Staging::Batches)
            .map(|s| (s.dir.clone(), s.temp.clone(), self.plan.changes[s.index].path.clone()))
            .collect();
        let flush = self.root.fd().try_clone_to_owned().and_then(|fd| {
            std::thread::Builder::new().name("syncfs".into()).spawn(move || {
                rustix::fs::syncfs(&fd)?;
                Ok(renames
                    .iter()
                    .map(|(dir, temp, path)| fsops::commit_rename(dir.as_fd(), temp, path.file_name(), false))
                    .collect())
            })
        });
        match flush {
            Ok(handle) => self.flushing = Some((batch, handle)),
            Err(e) if self.staging == Staging::Whole => {
                self.held.extend(batch.into_iter().map(Held::from));
                self.halt_on(&e);
            }
            Err(e) => self.discard(batch, &e),
        }
    }

    /// Removes the temp files of a batch that could not be made durable, failing their paths.
    fn discard(&mut self, batch: Vec<Staged>, e: &io::Error) {
        for s in batch {
            let _ = rustix::fs::unlinkat(&*s.dir, s.temp.as_str(), AtFlags::empty());
            if let Some(h) = s.hash {
                self.materialized.remove(&h);
            }
            let path = self.plan.changes[s.index].path.clone();
            self.fail_content(&path, "cannot flush staged content (syncfs)", e);
        }
    }

    /// Waits for the sealed batch's helper thread (one syncfs makes every file of the batch
    /// durable before any of them is renamed into place; then it renames each file over its
    /// path), records what it did, and commits the batch's directory swaps.
    fn commit_flushed(&mut self) {
        let Some((batch, handle)) = self.flushing.take() else { return };
        let flushed = self
            .syncfs_wait
            .time(|| handle.join())
            .unwrap_or_else(|_| Err(io::Error::other("the syncfs thread panicked")));
        if self.staging == Staging::Whole {
            self.held.extend(batch.into_iter().map(Held::from));
            if let Err(e) = flushed {
                self.halt = self.halt.take().or(Some(format!("cannot flush staged content (syncfs): {e}")));
            }
            return;
        }
        let mut renamed = match flushed {
            Ok(r) => r.into_iter(),
            Err(e) => return self.discard(batch, &e),
        };
        for s in batch {
            let path = self.plan.changes[s.index].path.clone();
            let r = match s.exchange {
                false => renamed.next().unwrap_or_else(|| Err(io::Error::other("the syncfs thread lost a rename"))),
                true => self.commit(&s, &path),
            };
            settle(&s.dir, &s.temp, s.link, &r, self.root.dev(), &path);
            self.record_commit(s.index, s.hash, path, r);
        }
    }

    fn commit(&mut self, s: &Staged, path: &RelPath) -> io::Result<()> {
        fsops::commit_rename(s.dir.as_fd(), &s.temp, path.file_name(), s.exchange)?;
        if s.exchange {
            self.root.forget(path);
            // The old directory now sits at the temp name: remove it and what it held.
            fsops::remove_tree(s.dir.as_fd(), s.temp.as_bytes(), self.root.dev()).map_err(|e| {
                io::Error::other(format!("new entry is in place, but the old directory could not be removed: {e}"))
            })?;
            self.removed_dirs.push(path.clone());
        }
        Ok(())
    }

    // Phase 2b, in batches: hard links follow their committed leaders.
    fn link_members(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate() {
            let Some(Source::Link(leader)) = c.op.source() else { continue };
            if !c.op.makes_new_inode() || self.check_blocked(&c.path) {
                continue;
            }
            if self.failed.contains(leader) {
                // The leader's path still holds its old content.
                self.hold_back(&c.path, format!("its hard-link leader {leader} could not be brought in"));
                continue;
            }
            let exchange = c.op.old_entry().is_some_and(|o| o.entry.kind == Kind::Dir);
            match self.link(leader, &c.path, exchange) {
                Ok(()) => {
                    self.out.done[i] = true;
                    self.touch_parent(&c.path);
                }
                Err(e) => self.fail_content(&c.path, &format!("cannot hard-link to {leader}"), e),
            }
        }
    }

    fn link(&mut self, leader: &RelPath, path: &RelPath, exchange: bool) -> io::Result<()> {
        let (ldir, lname) = self.root.parent(leader)?;
        let (dir, _) = self.root.parent(path)?;
        let temp = fsops::link_temp(ldir.as_fd(), lname, dir.as_fd())?;
        let s = Staged { index: 0, dir: dir.clone(), temp, hash: None, exchange, link: true };
        let r = self.commit(&s, path);
        settle(&dir, &s.temp, true, &r, self.root.dev(), path);
        r
    }

    // Phase 4.
    fn update_in_place(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate() {
            let Op::Update { old, new, diff, .. } = &c.op else { continue };
            if new.kind == Kind::Dir || diff.needs_new_inode() || self.check_blocked(&c.path) {
                continue;
            }
            let r = self.root.parent(&c.path).and_then(|(dir, name)| match new.kind {
                Kind::File => {
                    let f = fsops::open_regular(dir.as_fd(), name)?;
                    let st = rustix::fs::fstat(&f)?;
                    if st.st_ino != old.ino {
                        return Err(io::Error::other(
                            "the file was replaced since the scan; the next pass will catch up",
                        ));
                    }
                    fsops::set_fd_meta(f.as_fd(), &new.meta, meta_parts(diff))
                }
                kind => {
                    let name = std::str::from_utf8(name).map(str::to_owned);
                    match name {
                        Ok(n) => fsops::set_node_meta(dir.as_fd(), &n, kind, &new.meta, meta_parts(diff)),
                        // A non-UTF-8 name cannot be spelled for the /proc path: recreate instead.
                        Err(_) => {
                            let temp = fsops::create_temp_node(dir.as_fd(), new)?;
                            fsops::commit_rename(dir.as_fd(), &temp, c.path.file_name(), false)
                        }
                    }
                }
            });
            match r {
                Ok(()) => self.out.done[i] = true,
                Err(e) => self.fail(&c.path, "cannot update metadata", e),
            }
        }
    }

    // Phase 5. Only once every new entry is in place: a delete after a failure could take
    // the last copy of something the host still runs on (the old library a failed one was to
    // replace), so then none is done.
    fn delete(&mut self) {
        let held_before = self.out.held_back;
        for (i, c) in self.plan.changes.iter().enumerate().rev() {
            let Op::Delete { old } = &c.op else { continue };
            if self.removed_dirs.iter().any(|d| c.path.is_within(d)) {
                self.out.done[i] = true;
                continue;
            }
            if self.content_failed || self.halt.is_some() {
                self.out.held_back += 1;
                continue;
            }
            match self.delete_one(&c.path, old.entry.kind) {
                Ok(()) => {
                    self.out.done[i] = true;
                    self.touch_parent(&c.path);
                }
                Err(e) => self.fail(&c.path, "cannot delete", e),
            }
        }
        let held = self.out.held_back - held_before;
        if held > 0 && self.halt.is_none() {
            self.fail_str(
                &self.root.path().display().to_string(),
                format!("{held} deletions held back because new content failed (see above); a pass that brings everything in makes them"),
            );
        }
    }

    fn delete_one(&mut self, path: &RelPath, kind: Kind) -> io::Result<()> {
        let (dir, name) = match self.root.parent(path) {
            Ok(x) => x,
            // The parent went away with a replaced directory: so did this path.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = match rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let is_dir = Kind::from_mode(st.st_mode) == Some(Kind::Dir);
        if is_dir != (kind == Kind::Dir) {
            return Err(io::Error::other("it changed type since the scan; the next pass will catch up"));
        }
        if is_dir {
            if st.st_dev != self.root.dev() {
                return Err(io::Error::other(
                    "a filesystem is mounted there; syncd never deletes across a mount point",
                ));
            }
            self.root.forget(path);
            rustix::fs::unlinkat(&*dir, name, AtFlags::REMOVEDIR).map_err(|e| match e {
                Errno::NOTEMPTY => {
                    io::Error::other("directory is not empty: something was created in it since the scan")
                }
                e => e.into(),
            })
        } else {
            Ok(rustix::fs::unlinkat(&*dir, name, AtFlags::empty())?)
        }
    }

    // Phase 6.
    fn set_dir_meta(&mut self) {
        // Every directory whose metadata we must set: new ones (all of it), changed ones (what
        // differs) and ones our work touched (mtime), deepest first.
        let mut dirs: HashMap<Option<RelPath>, (Option<usize>, MetaParts)> = HashMap::new();
        for t in &self.touched {
            dirs.insert(t.clone(), (None, MetaParts::MTIME));
        }
        for (i, c) in self.plan.changes.iter().enumerate() {
            match &c.op {
                Op::Create { new, .. } | Op::Replace { new, .. } if new.kind == Kind::Dir => {
                    dirs.insert(Some(c.path.clone()), (Some(i), MetaParts::ALL));
                }
                Op::Update { new, diff, .. } if new.kind == Kind::Dir => {
                    dirs.insert(Some(c.path.clone()), (Some(i), meta_parts(diff)));
                }
                _ => {}
            }
        }
        if self.plan.root.is_some() {
            dirs.insert(None, (None, MetaParts::ALL));
        }
        let mut order: Vec<_> = dirs.into_iter().collect();
        order.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, (index, parts)) in order {
            let meta = match &path {
                None => Some(&self.manifest.root),
                Some(p) => self.manifest.get(p).filter(|e| e.kind == Kind::Dir).map(|e| &e.meta),
            };
            // A touched directory the image does not have was being emptied for deletion.
            let Some(meta) = meta else { continue };
            if let Some(p) = &path {
                if self.blocked(p).is_some() || self.failed_dirs.contains(p) {
                    continue;
                }
            }
            let r = self.root.dir(path.as_ref()).and_then(|fd| fsops::set_fd_meta(fd.as_fd(), meta, parts));
            match (r, index, &path) {
                (Ok(()), Some(i), _) => self.out.done[i] = true,
                (Ok(()), None, None) => self.out.root_done = true,
                (Ok(()), None, Some(_)) => {}
                (Err(e), _, p) => {
                    let shown = p.as_ref().map_or_else(|| ".".to_owned(), |p| p.to_string());
                    self.fail_str(&shown, format!("cannot set directory metadata: {e}"));
                }
            }
        }
    }
}

/// After a staged entry's rename: a hard link's temp name is removed (if the path already was
/// that inode, `rename(2)` did nothing and reported success), and a temp entry that could not
/// be renamed is removed.
fn settle(dir: &OwnedFd, temp: &str, link: bool, r: &io::Result<()>, dev: u64, path: &RelPath) {
    match r {
        Ok(()) if link => match rustix::fs::unlinkat(dir, temp, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => tracing::warn!(path = %path, "cannot remove temp link {temp}: {e}"),
        },
        Ok(()) => {}
        Err(_) => {
            let _ = fsops::remove_tree(dir.as_fd(), temp.as_bytes(), dev);
        }
    }
}

/// Renames `items` into place on one thread per core (at most [`COMMIT_THREADS`]): a share on this thread through
/// `root`, each other share on a thread of its own through its own handle on the same root
/// (each resolves every directory beneath the root without following symlinks). Renames in
/// different directories hardly contend, and by the commit the master has nothing left to
/// send, so the cores are free. Results come back in the order of `items`.
fn rename_in_parallel(root: &mut RootDir, plan: &Plan, items: &[Held]) -> Vec<io::Result<()>> {
    fn rename_all(root: &mut RootDir, plan: &Plan, items: &[Held]) -> Vec<io::Result<()>> {
        let dev = root.dev();
        items
            .iter()
            .map(|h| {
                let path = &plan.changes[h.index].path;
                let (dir, name) = root.parent(path)?;
                let r = fsops::commit_rename(dir.as_fd(), &h.temp, name, false);
                settle(&dir, &h.temp, h.link, &r, dev, path);
                r
            })
            .collect()
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(COMMIT_THREADS).min(items.len() / 128).max(1);
    if threads == 1 {
        return rename_all(root, plan, items);
    }
    let per = items.len().div_ceil(threads);
    let mut parts = items.chunks(per);
    let mine = parts.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = parts
            .map(|part| {
                let mut other = root.share();
                let spawned = std::thread::Builder::new()
                    .name("commit".into())
                    .spawn_scoped(scope, move || rename_all(&mut other, plan, part));
                (part, spawned)
            })
            .collect();
        let mut out = rename_all(root, plan, mine);
        for (part, h) in helpers {
            match h {
                Ok(h) => out.extend(h.join().unwrap_or_else(|_| {
                    part.iter().map(|_| Err(io::Error::other("a commit thread panicked"))).collect()
                })),
                // No thread: this one does its share.
                Err(_) => out.extend(rename_all(root, plan, part)),
            }
        }
        out
    })
}

fn is_dir_at(dir: &OwnedFd, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| Kind::from_mode(st.st_mode) == Some(Kind::Dir))
}

/// What to apply in place for a diff. chown clears setuid bits and capabilities, so an owner
/// change re-applies mode and xattrs too.
fn meta_parts(d: &crate::plan::Diff) -> MetaParts {
    let owner = d.owner || d.group;
    MetaParts { owner, mode: owner || d.perms, xattrs: owner || d.xattrs, mtime: true }
}

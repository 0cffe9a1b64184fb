//! Executes a [`Plan`] on the host root.
//!
//! Order, chosen so that every path always holds either its old or its new entry:
//! 1. directories that must exist are created (or swapped in for a non-directory), parents first;
//! 2. new content is staged as temp files beside its target: written, verified against its
//!    hash, given owner, mode, xattrs and mtime; a batch is flushed with one `syncfs`, then
//!    each temp file is renamed over its path, both on a helper thread while the next batch is
//!    staged (a directory swapped for a file is committed by the applier itself, once that
//!    thread is done). Hard links follow their committed leaders;
//! 3. metadata-only changes are made in place;
//! 4. deletions, deepest first, only once new content is in place;
//! 5. directory metadata, deepest first, so mtimes are not disturbed by later work.
//!
//! A failure on one path is recorded and the rest goes on; paths beneath a directory that
//! could not be made are skipped with an error naming that directory.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use manifest::{Entry, Hash, Kind, Manifest, RelPath};
use rustix::fs::AtFlags;
use rustix::io::Errno;

use crate::client::{Master, ObjectError, ObjectStream, Stopwatch};
use crate::fsops::{self, MetaParts, VerifyingWriter};
use crate::plan::{Op, Plan, Source};
use crate::root::RootDir;

/// Temp files staged before one `syncfs` and their renames.
const BATCH_FILES: usize = 2048;
const BATCH_BYTES: u64 = 256 * 1024 * 1024;

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
    pub local_copies: u64,
    pub local_bytes: u64,
    /// True if the object stream broke (master gone mid-pass).
    pub master_lost: bool,
    /// True if a stop request cut the pass short.
    pub cancelled: bool,
}

/// What the apply did: which plan changes succeeded, and the failures.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<bool>,
    pub root_done: bool,
    pub failures: Vec<Failure>,
    pub stats: ApplyStats,
}

/// Where a verified copy of some content can be read during this pass.
#[derive(Clone)]
enum Location {
    /// A temp file in this directory, to be renamed to this path (maybe already, by the
    /// flushing thread).
    Staged(Arc<OwnedFd>, String, RelPath),
    Committed(RelPath),
}

/// What the flushing thread did with a sealed batch: `Err` if its `syncfs` failed (nothing
/// was renamed), else the result of each rename, in the order of the batch's non-exchange
/// entries.
type Flushed = io::Result<Vec<io::Result<()>>>;

struct Staged {
    index: usize,
    dir: Arc<OwnedFd>,
    temp: String,
    hash: Option<Hash>,
    /// The old entry is a directory or the new one is: swap atomically instead of renaming.
    exchange: bool,
}

struct Applier<'a> {
    root: RootDir,
    manifest: &'a Manifest,
    plan: &'a Plan,
    objects: ObjectStream,
    master: Master,
    rt: tokio::runtime::Handle,
    out: Outcome,
    /// Directories that could not be made: everything beneath them is skipped.
    failed_dirs: Vec<RelPath>,
    /// Old directories swapped out and removed whole: their contents' deletes are done.
    removed_dirs: Vec<RelPath>,
    /// Directories whose mtime our own work changed (`None`: the root).
    touched: BTreeSet<Option<RelPath>>,
    /// Where this pass put content that later changes need again (`plan.reused` only: on a
    /// cold sync of a million files, a map of every file would cost ~130 MB).
    materialized: HashMap<Hash, Location>,
    /// Index in `plan.fetch` of the next object on the ordered stream.
    fetch_next: usize,
    staged: Vec<Staged>,
    staged_bytes: u64,
    /// The previous batch, whose `syncfs` and then renames run on a helper thread while the
    /// next batch is staged; nothing of it is renamed before that `syncfs` has returned.
    flushing: Option<(Vec<Staged>, std::thread::JoinHandle<Flushed>)>,
    /// Time spent waiting for a batch's `syncfs` and renames.
    syncfs_wait: Stopwatch,
    cancel: Option<Arc<AtomicBool>>,
    throttle: throttle::Throttle,
}

/// Applies `plan` beneath `root`. Objects come from `objects` in `plan.fetch` order; a
/// fallback fetch of a single object goes through `master` on `rt`. Disk reads and writes
/// are charged to `throttle`.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    root: RootDir,
    manifest: &Manifest,
    plan: &Plan,
    objects: ObjectStream,
    master: Master,
    rt: tokio::runtime::Handle,
    cancel: Option<Arc<AtomicBool>>,
    throttle: &throttle::Throttle,
) -> Outcome {
    let mut a = Applier {
        root,
        manifest,
        plan,
        objects,
        master,
        rt,
        out: Outcome { done: vec![false; plan.changes.len()], ..Outcome::default() },
        failed_dirs: Vec::new(),
        removed_dirs: Vec::new(),
        touched: BTreeSet::new(),
        materialized: HashMap::new(),
        fetch_next: 0,
        staged: Vec::new(),
        staged_bytes: 0,
        flushing: None,
        syncfs_wait: Stopwatch::default(),
        cancel: None,
        throttle: throttle.clone(),
    };
    // A stop request is honoured between two entries: what was staged is committed (it is
    // complete and verified), the remaining phases are skipped, and the next pass resumes.
    let stop = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
    a.cancel = cancel.clone();
    const DONE: [&str; 6] = [
        "directories made",
        "content staged and committed",
        "hard links made",
        "metadata updated in place",
        "deletions done",
        "directory metadata set",
    ];
    for (phase, done) in DONE.iter().enumerate() {
        if stop() {
            a.out.stats.cancelled = true;
            break;
        }
        let t = std::time::Instant::now();
        match phase {
            0 => a.make_dirs(),
            1 => a.stage_and_commit(),
            2 => a.link_members(),
            3 => a.update_in_place(),
            4 => a.delete(),
            _ => a.set_dir_meta(),
        }
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "apply: {done}");
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
    a.out.stats.fetched_objects = a.objects.objects;
    a.out.stats.wire_bytes = a.objects.wire_bytes;
    a.out.stats.delta_objects = a.objects.deltas;
    a.out
}

impl Applier<'_> {
    fn fail(&mut self, path: &RelPath, what: &str, e: impl std::fmt::Display) {
        self.fail_str(&path.to_string(), format!("{what}: {e}"));
    }

    fn fail_str(&mut self, path: &str, error: String) {
        tracing::debug!(path, "{error}");
        self.out.failures.push(Failure { path: path.to_owned(), error });
    }

    /// The failed directory `path` lies beneath, if any.
    fn blocked(&self, path: &RelPath) -> Option<RelPath> {
        self.failed_dirs.iter().find(|d| path.is_within(d) && *d != path).cloned()
    }

    fn check_blocked(&mut self, path: &RelPath) -> bool {
        if let Some(d) = self.blocked(path) {
            self.fail(path, "skipped", format!("its parent directory {d} could not be made"));
            return true;
        }
        false
    }

    fn touch_parent(&mut self, path: &RelPath) {
        self.touched.insert(path.parent());
    }

    // Phase 1.
    fn make_dirs(&mut self) {
        for c in self.plan.changes.iter() {
            let (new, replace) = match &c.op {
                Op::Create { new, .. } if new.kind == Kind::Dir => (new, false),
                Op::Replace { new, .. } if new.kind == Kind::Dir => (new, true),
                _ => continue,
            };
            if self.check_blocked(&c.path) {
                self.failed_dirs.push(c.path.clone());
                continue;
            }
            if let Err(e) = self.make_dir(&new.path, replace) {
                self.fail(&c.path, "cannot create directory", e);
                self.failed_dirs.push(c.path.clone());
                continue;
            }
            // Metadata, and so completion, come in phase 5.
            self.touch_parent(&c.path);
        }
    }

    fn make_dir(&mut self, path: &RelPath, replace: bool) -> io::Result<()> {
        let (dir, name) = self.root.parent(path)?;
        if !replace {
            return match rustix::fs::mkdirat(&*dir, name, rustix::fs::Mode::from_raw_mode(0o700)) {
                Ok(()) => Ok(()),
                Err(Errno::EXIST) if is_dir_at(&dir, name) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let temp = fsops::create_temp_dir(dir.as_fd())?;
        let r = fsops::commit_rename(dir.as_fd(), &temp, name, true);
        if let Err(e) = r {
            let _ = rustix::fs::unlinkat(&*dir, temp.as_str(), AtFlags::REMOVEDIR);
            return Err(e);
        }
        self.root.forget(path);
        // The old non-directory now sits at the temp name.
        fsops::remove_tree(dir.as_fd(), temp.as_bytes(), self.root.dev())
    }

    // Phase 2.
    fn stage_and_commit(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate() {
            let Some(new) = c.op.new_entry() else { continue };
            if new.kind == Kind::Dir || !c.op.makes_new_inode() || matches!(c.op.source(), Some(Source::Link(_))) {
                continue;
            }
            let source = c.op.source().expect("ops with a new entry have a source");
            if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                self.out.stats.cancelled = true;
                break;
            }
            if self.check_blocked(&c.path) {
                self.drain_unused(source);
                continue;
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
                            .or_insert_with(|| Location::Staged(dir.clone(), temp.clone(), new.path.clone()));
                    }
                    self.staged_bytes += new.size;
                    self.staged.push(Staged { index: i, dir, temp, hash, exchange });
                    if self.staged.len() >= BATCH_FILES || self.staged_bytes >= BATCH_BYTES {
                        self.seal_batch();
                    }
                }
                Err(e) => {
                    self.drain_unused(source);
                    self.fail(&c.path, "cannot stage new content", e);
                }
            }
        }
        self.seal_batch();
        self.commit_flushed();
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

    /// Writes verified content and metadata into a new temp file.
    fn fill(&mut self, file: std::fs::File, new: &Entry, source: &Source) -> io::Result<()> {
        let hash = new.hash.expect("validated: regular files have a hash");
        let mut w = VerifyingWriter::new(&file, new.size, self.throttle.write.clone());
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
        for loc in candidates {
            match self.copy_local(&loc, w).and_then(|n| w.check(hash).map(|()| n)) {
                Ok(n) => {
                    self.out.stats.local_copies += 1;
                    self.out.stats.local_bytes += n;
                    return Ok(());
                }
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
            match r.map_err(|e| (w.check(hash).is_err(), e)) {
                Ok(()) if w.check(hash).is_ok() => {
                    self.out.stats.fetched_bytes += w.written();
                    return Ok(());
                }
                Ok(()) => errors.push(w.check(hash).unwrap_err().to_string()),
                Err((_, ObjectError::Broken(e))) => {
                    self.out.stats.master_lost = true;
                    return Err(io::Error::other(format!("object stream from the master broke: {e}")));
                }
                Err((_, e)) => errors.push(e.to_string()),
            }
            w.reset()?;
        }
        // 3. A fetch of this one object.
        if !self.out.stats.master_lost {
            tracing::debug!(hash = %hash, errors = ?errors, "fetching one object on its own");
            let mut one = self.master.spawn_fetch_aside(vec![(hash, w.limit())], &self.rt);
            let r = one.next_into(hash, w.limit(), Some(&mut *w));
            self.out.stats.wire_bytes += one.wire_bytes;
            if r.is_ok() {
                one.finish();
            }
            match r.map_err(|e| e.to_string()).and_then(|()| w.check(hash).map_err(|e| e.to_string())) {
                Ok(()) => {
                    self.out.stats.fetched_objects += 1;
                    self.out.stats.fetched_bytes += w.written();
                    return Ok(());
                }
                Err(e) => errors.push(e),
            }
        }
        Err(io::Error::other(errors.join("; ")))
    }

    fn copy_local(&mut self, loc: &Location, w: &mut VerifyingWriter) -> io::Result<u64> {
        let file = match loc {
            Location::Staged(dir, temp, path) => match fsops::open_regular(dir.as_fd(), temp.as_str()) {
                // Renamed meanwhile by the flushing thread (the content is verified anyway).
                Err(e) if e.kind() == io::ErrorKind::NotFound => fsops::open_regular(dir.as_fd(), path.file_name())?,
                r => r?,
            },
            Location::Committed(p) => {
                let (dir, name) = self.root.parent(p)?;
                fsops::open_regular(dir.as_fd(), name)?
            }
        };
        fsops::copy(throttle::Throttled::new(file, &self.throttle.read), w)
    }

    /// Closes the batch being staged: the batch before it is committed, then this one's
    /// `syncfs` and renames start on a helper thread, so staging the next batch overlaps its
    /// writeback and its renames (a rename over an old file frees that file's blocks, which
    /// is most of an upgrade's rename cost).
    fn seal_batch(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        self.commit_flushed();
        let batch = std::mem::take(&mut self.staged);
        self.staged_bytes = 0;
        let renames: Vec<(Arc<OwnedFd>, String, RelPath)> = batch
            .iter()
            .filter(|s| !s.exchange)
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
            self.fail(&path, "cannot flush staged content (syncfs)", e);
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
            match r {
                Ok(()) => {
                    self.out.done[s.index] = true;
                    if let Some(h) = s.hash.filter(|h| self.plan.reused.contains(h)) {
                        self.materialized.insert(h, Location::Committed(path));
                    }
                }
                Err(e) => {
                    let _ = fsops::remove_tree(s.dir.as_fd(), s.temp.as_bytes(), self.root.dev());
                    if let Some(h) = s.hash {
                        self.materialized.remove(&h);
                    }
                    self.fail(&path, "cannot rename new content into place", e);
                }
            }
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

    // Phase 2b.
    fn link_members(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate() {
            let Some(Source::Link(leader)) = c.op.source() else { continue };
            if !c.op.makes_new_inode() || self.check_blocked(&c.path) {
                continue;
            }
            let exchange = c.op.old_entry().is_some_and(|o| o.entry.kind == Kind::Dir);
            match self.link(leader, &c.path, exchange) {
                Ok(()) => {
                    self.out.done[i] = true;
                    self.touch_parent(&c.path);
                }
                Err(e) => self.fail(&c.path, &format!("cannot hard-link to {leader}"), e),
            }
        }
    }

    fn link(&mut self, leader: &RelPath, path: &RelPath, exchange: bool) -> io::Result<()> {
        let (ldir, lname) = self.root.parent(leader)?;
        let (dir, _) = self.root.parent(path)?;
        let temp = fsops::link_temp(ldir.as_fd(), lname, dir.as_fd())?;
        let s = Staged { index: 0, dir: dir.clone(), temp, hash: None, exchange };
        let r = self.commit(&s, path);
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&*dir, s.temp.as_str(), AtFlags::empty());
        }
        r
    }

    // Phase 3.
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
                    fsops::set_fd_meta(f.as_fd(), &new.meta, MetaParts::for_diff(diff))
                }
                kind => {
                    let name = std::str::from_utf8(name).map(str::to_owned);
                    match name {
                        Ok(n) => fsops::set_node_meta(dir.as_fd(), &n, kind, &new.meta, MetaParts::for_diff(diff)),
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

    // Phase 4.
    fn delete(&mut self) {
        for (i, c) in self.plan.changes.iter().enumerate().rev() {
            let Op::Delete { old } = &c.op else { continue };
            if self.removed_dirs.iter().any(|d| c.path.is_within(d)) {
                self.out.done[i] = true;
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

    // Phase 5.
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
                    dirs.insert(Some(c.path.clone()), (Some(i), MetaParts::for_diff(diff)));
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

fn is_dir_at(dir: &OwnedFd, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| Kind::from_mode(st.st_mode) == Some(Kind::Dir))
}

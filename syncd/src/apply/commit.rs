//! Steps 3 to 6: the commit (renames, in parallel, and directory swaps), hard links,
//! metadata in place, deletes, directory metadata; and the roll-back of a failed staging.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use manifest::{Hash, Kind, Meta, RelPath};
use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::applier::{Applier, Held, Location, Staged, COMMIT_THREADS};
use super::types::{FailedAt, FailureKind, Staging};
use crate::hostfs::fsops::{self, MetaParts};
use crate::hostfs::root::RootDir;
use crate::plan::{Op, Plan, Source};

impl Applier<'_> {
    /// Whole-tree staging, once everything is staged and durable: each temp entry is renamed
    /// over its path (files first, then other nodes and links, in path order within each),
    /// then each directory built aside is swapped in, deepest first.
    pub(super) fn commit_held(&mut self) {
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
                    self.fail_content(
                        &path,
                        FailureKind::Commit,
                        "cannot reach the staged entry's directory to commit it",
                        e,
                    );
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
                self.fail_content(&d.path, FailureKind::Commit, "cannot swap the new directory into place", e);
            }
        }
    }

    /// Records the result of renaming a staged entry into place (its temp name already
    /// settled by [`settle`]).
    pub(super) fn record_commit(&mut self, index: usize, hash: Option<Hash>, path: RelPath, r: io::Result<()>) {
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
                self.fail_content(&path, FailureKind::Commit, "cannot rename new content into place", e);
            }
        }
    }

    /// Whole-tree staging that could not complete: removes every temp entry, every directory
    /// built aside and every directory this pass made, and puts back the mtimes of the
    /// directories it touched, so the root is as it was.
    pub(super) fn roll_back(&mut self) {
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
            self.fail_pass(format!(
                "rolling back: {left} temp entries or new directories could not be removed; the next pass removes them"
            ));
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
    pub(super) fn old_dir_meta(&self, p: &RelPath) -> Option<&Meta> {
        match self.plan.changes.binary_search_by(|c| c.path.cmp(p)) {
            Ok(i) => self.plan.changes[i].op.old_entry().filter(|o| o.entry.kind == Kind::Dir).map(|o| &o.entry.meta),
            Err(_) => self.manifest.get(p).filter(|e| e.kind == Kind::Dir).map(|e| &e.meta),
        }
    }

    /// Waits for the sealed batch's helper thread (one syncfs makes every file of the batch
    /// durable before any of them is renamed into place; then it renames each file over its
    /// path), records what it did, and commits the batch's directory swaps.
    pub(super) fn commit_flushed(&mut self) {
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

    pub(super) fn commit(&mut self, s: &Staged, path: &RelPath) -> io::Result<()> {
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
    pub(super) fn link_members(&mut self) {
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
                Err(e) => self.fail_content(&c.path, FailureKind::Commit, &format!("cannot hard-link to {leader}"), e),
            }
        }
    }

    pub(super) fn link(&mut self, leader: &RelPath, path: &RelPath, exchange: bool) -> io::Result<()> {
        let (ldir, lname) = self.root.parent(leader)?;
        let (dir, _) = self.root.parent(path)?;
        let temp = fsops::link_temp(ldir.as_fd(), lname, dir.as_fd())?;
        let s = Staged { index: 0, dir: dir.clone(), temp, hash: None, exchange, link: true };
        let r = self.commit(&s, path);
        settle(&dir, &s.temp, true, &r, self.root.dev(), path);
        r
    }

    // Phase 4.
    pub(super) fn update_in_place(&mut self) {
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
                Err(e) => self.fail(&c.path, FailureKind::Metadata, "cannot update metadata", e),
            }
        }
    }

    // Phase 5. Only once every new entry is in place: a delete after a failure could take
    // the last copy of something the host still runs on (the old library a failed one was to
    // replace), so then none is done.
    pub(super) fn delete(&mut self) {
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
                Err(e) => self.fail(&c.path, FailureKind::Delete, "cannot delete", e),
            }
        }
        let held = self.out.held_back - held_before;
        if held > 0 && self.halt.is_none() {
            self.fail_pass(format!(
                "{held} deletions held back because new content failed (see above); a pass that brings everything in makes them"
            ));
        }
    }

    pub(super) fn delete_one(&mut self, path: &RelPath, kind: Kind) -> io::Result<()> {
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
    pub(super) fn set_dir_meta(&mut self) {
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
                    let at = match p {
                        Some(p) => FailedAt::Entry(p.clone()),
                        None => FailedAt::Root(self.root.path().to_owned()),
                    };
                    self.failure(at, FailureKind::DirectoryMetadata, format!("cannot set directory metadata: {e}"));
                }
            }
        }
    }
}

/// After a staged entry's rename: a hard link's temp name is removed (if the path already was
/// that inode, `rename(2)` did nothing and reported success), and a temp entry that could not
/// be renamed is removed.
pub(super) fn settle(dir: &OwnedFd, temp: &str, link: bool, r: &io::Result<()>, dev: u64, path: &RelPath) {
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
pub(super) fn rename_in_parallel(root: &mut RootDir, plan: &Plan, items: &[Held]) -> Vec<io::Result<()>> {
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

pub(super) fn is_dir_at(dir: &OwnedFd, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| Kind::from_mode(st.st_mode) == Some(Kind::Dir))
}

/// What to apply in place for a diff. chown clears setuid bits and capabilities, so an owner
/// change re-applies mode and xattrs too.
pub(super) fn meta_parts(d: &crate::plan::Diff) -> MetaParts {
    let owner = d.owner || d.group;
    MetaParts { owner, mode: owner || d.perms, xattrs: owner || d.xattrs, mtime: true }
}

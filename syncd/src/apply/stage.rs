//! Steps 0 to 2: leftovers removed, directories made, every new entry staged under a temp
//! name beside its target, verified, batch by batch.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use manifest::{Entry, Hash, Kind, RelPath};
use rustix::fs::AtFlags;
use rustix::io::Errno;

use super::applier::{is_systemic, resolve_target, Applier, DirSwap, Held, Location, Staged, BATCH_BYTES, BATCH_FILES};
use super::commit::is_dir_at;
use super::types::{FailureKind, Staging};
use crate::hostfs::fsops::{self, MetaParts, VerifyingWriter};
use crate::plan::{Op, Source};

impl Applier<'_> {
    // Phase 0.
    pub(super) fn remove_leftovers(&mut self) {
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
                Err(e) => {
                    self.fail(&l.path, FailureKind::Leftover, "cannot remove a temp entry an interrupted pass left", e)
                }
            }
        }
        if !self.plan.leftovers.is_empty() {
            tracing::info!(removed = self.out.stats.leftovers_removed, "leftovers of an interrupted pass removed");
        }
    }

    // Phase 1.
    pub(super) fn make_dirs(&mut self) {
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
                self.fail_content(&c.path, FailureKind::Directory, "cannot create directory", e);
                self.failed_dirs.push(c.path.clone());
                continue;
            }
            // Metadata, and so completion, come in phase 6.
            self.touch_parent(&c.path);
        }
    }

    pub(super) fn make_dir(&mut self, path: &RelPath, replace: bool) -> io::Result<()> {
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
    pub(super) fn failed_target(&self, path: &RelPath, target: Option<&[u8]>) -> Option<RelPath> {
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
    pub(super) fn stage_content(&mut self, leaders: &HashSet<&RelPath>) {
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
                        self.fail_content(&c.path, FailureKind::Stage, "cannot stage new content", e);
                    }
                }
            }
        }
    }

    /// Whole-tree staging: hard links to their leaders, staged or in place, under temp names.
    pub(super) fn stage_links(&mut self) {
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
                    self.fail_content(&c.path, FailureKind::Stage, &format!("cannot hard-link to {leader}"), e);
                }
            }
        }
    }

    /// Keeps the object stream aligned when the path that was to consume its next object did
    /// not: the object is read and dropped, and later users fall back to a single fetch.
    pub(super) fn drain_unused(&mut self, source: &Source) {
        if let Source::Fetch(h) = source {
            if self.next_fetch_is(h) {
                let size = self.plan.fetch[self.fetch_next].1;
                self.fetch_next += 1;
                let _ = self.objects.next_into::<std::fs::File>(*h, size, None);
            }
        }
    }

    pub(super) fn next_fetch_is(&self, h: &Hash) -> bool {
        self.plan.fetch.get(self.fetch_next).is_some_and(|(x, _)| x == h)
    }

    /// Creates the new entry under a temp name beside `new.path`, complete with metadata.
    pub(super) fn stage(&mut self, new: &Entry, source: &Source) -> io::Result<(Arc<OwnedFd>, String)> {
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
    pub(super) fn link_from_store(&mut self, dir: &Arc<OwnedFd>, new: &Entry) -> io::Result<Option<String>> {
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

    /// Takes over a temp file an interrupted pass left with content `hash`: verified again
    /// (read whole), moved beside `new.path` under a fresh temp name unless it is there already,
    /// and given the entry's metadata. Its single name was checked by the scan, and again here.
    pub(super) fn resume(&mut self, dir: &Arc<OwnedFd>, new: &Entry, from: &RelPath, hash: Hash) -> io::Result<String> {
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
    pub(super) fn fill(&mut self, file: std::fs::File, new: &Entry, source: &Source) -> io::Result<()> {
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

    /// Closes the batch being staged: the batch before it is committed (in batches) or held
    /// for the commit (whole-tree staging), then this one's `syncfs`, and in batches its
    /// renames, start on a helper thread, so staging the next batch overlaps its writeback and
    /// its renames (a rename over an old file frees that file's blocks, which is most of an
    /// upgrade's rename cost).
    pub(super) fn seal_batch(&mut self) {
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
    pub(super) fn discard(&mut self, batch: Vec<Staged>, e: &io::Error) {
        for s in batch {
            let _ = rustix::fs::unlinkat(&*s.dir, s.temp.as_str(), AtFlags::empty());
            if let Some(h) = s.hash {
                self.materialized.remove(&h);
            }
            let path = self.plan.changes[s.index].path.clone();
            self.fail_content(&path, FailureKind::Stage, "cannot flush staged content (syncfs)", e);
        }
    }
}

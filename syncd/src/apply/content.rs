//! Where staged content comes from: the object stream, the local store (linked), a copy of a
//! host file, a resumed temp file, or one object fetched on its own; and old content kept in
//! the local store before it is replaced.

use std::io;
use std::os::fd::AsFd;

use manifest::{Hash, Kind};

use super::applier::{is_systemic, Applier, Location};
use crate::fetch::ObjectError;
use crate::hostfs::fsops::{self, VerifyingWriter};
use crate::plan::{Op, Source};

impl Applier<'_> {
    /// After the commit: the store's links to what is now in the root go, on a helper thread
    /// while this one updates metadata, deletes and flushes (they touch only the store's
    /// directory; the pass waits for it before it ends).
    pub(super) fn release_store(&mut self) {
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
    pub(super) fn keep_old(&mut self) {
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

    /// Fills `w` with the content `hash` from the cheapest place that has it. A bad source is
    /// discarded and the next one tried, each from an empty file.
    pub(super) fn content_into(&mut self, hash: Hash, source: &Source, w: &mut VerifyingWriter) -> io::Result<()> {
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
    pub(super) fn count_source(&mut self, hash: &Hash, from_store: bool) {
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
    pub(super) fn refused_from_store(&mut self, hash: &Hash, why: &str) {
        let url = self.objects.store.as_ref().map(|t| t.url.clone()).unwrap_or_default();
        tracing::warn!("object store {url}: object {hash} refused ({why}); fetching it from the master");
        self.out.stats.store_refused += 1;
        self.out.stats.store_url.get_or_insert(url);
    }

    pub(super) fn copy_local(&mut self, loc: &Location, w: &mut VerifyingWriter) -> io::Result<u64> {
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
}

//! Prefetch, commit and rollback through the local store ([`crate::store`]).
//!
//! - [`prefetch_once`] fetches everything the host needs for the master's target version into
//!   the store, verified, and changes nothing in the root.
//! - A commit is a pass in [`Mode::Commit`]: the prefetched manifest, content linked from the
//!   store, no master; the same whole-tree staging and commit as any pass.
//! - A rollback is a pass in [`Mode::Rollback`]: the previous manifest, content the commit kept.
//! - [`converge`] is a pass followed, when its health checks kept failing for `health_grace`,
//!   by a local rollback.

use std::os::fd::AsFd;

use std::time::{Duration, Instant};

use manifest::Hash;

use crate::error::{exit, LocalError, SyncError};
use crate::options::{Mode, SyncOptions};
use crate::pass::{gc_store, load_local_lists, open_store, plan_pass, start_pass, sync_once};

use crate::hostfs::files::HostFiles;
use crate::hostfs::root;
use crate::report::{human_bytes, PassReport, RolledBack};
use crate::{fetch, lock, plan, store};

/// What a prefetch did.
#[derive(Debug, Clone)]
pub struct PrefetchReport {
    pub version: u64,
    pub identity: Hash,
    /// The host already is at this version: nothing to fetch, nothing to commit.
    pub up_to_date: bool,
    /// The version was rolled back on this host: not fetched.
    pub refused: Option<store::Refused>,
    /// Objects written into the store this run (fetched, or copied from the host), and their bytes.
    pub objects: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    pub local_copies: u64,
    /// Objects the store had already (an earlier, interrupted prefetch).
    pub already: u64,
    /// Changes the commit will make.
    pub changes: usize,
    pub duration: Duration,
}

impl PrefetchReport {
    pub fn summary(&self) -> String {
        if self.up_to_date {
            return format!(
                "image v{} ({}): the host is at this version; nothing to prefetch",
                self.version,
                &self.identity.to_hex()[..16]
            );
        }
        if let Some(r) = &self.refused {
            return format!(
                "image v{} ({}): not prefetched, rolled back on this host ({}); it is not taken again until the master targets another version",
                self.version,
                &self.identity.to_hex()[..16],
                r.reason
            );
        }
        format!(
            "prefetched image v{} ({}): {} objects into the local store ({}, {} on the wire, {} copied from the host), {} there already; {} changes wait for the commit; {:.2}s",
            self.version,
            &self.identity.to_hex()[..16],
            self.objects,
            human_bytes(self.bytes),
            human_bytes(self.wire_bytes),
            self.local_copies,
            self.already,
            self.changes,
            self.duration.as_secs_f64()
        )
    }
}

/// Fetches what the host needs for the master's target version into the local store. The root
/// is only read (under a shared lock).
pub async fn prefetch_once(opts: &SyncOptions) -> Result<PrefetchReport, SyncError> {
    let started = Instant::now();
    let mut opts = opts.clone();
    opts.mode = Mode::Prefetch;
    opts.dry_run = false;
    let opts = &opts;
    if !opts.root.is_dir() {
        return Err(SyncError::Root { root: opts.root.clone(), source: std::io::ErrorKind::NotADirectory.into() });
    }
    let _lock = lock::acquire(&opts.root, lock::Access::Shared, opts.lock_wait, opts.cancel.as_ref()).await?;
    let local = load_local_lists(&opts.exclude_from)?;
    let st = open_store(opts)?.expect("a prefetch always opens the store");
    let master = fetch::Master::connect(&opts.master, &opts.transport).await?.with_net_limit(opts.throttle.net.clone());
    let applied_record = opts.state().applied_version();
    let s = start_pass(opts, &master, &local, &applied_record).await?;
    let mut report = PrefetchReport {
        version: s.version,
        identity: s.identity,
        up_to_date: false,
        refused: None,
        objects: 0,
        bytes: 0,
        wire_bytes: 0,
        local_copies: 0,
        already: 0,
        changes: 0,
        duration: Duration::ZERO,
    };
    let mut state = st.state();
    if let Some(r) = state.refused.clone().filter(|r| r.identity == s.identity.to_hex()) {
        report.refused = Some(r);
        report.duration = started.elapsed();
        return Ok(report);
    }
    let Some(manifest) = s.manifest else {
        // The walk alone showed the host at this version.
        report.up_to_date = true;
        report.duration = started.elapsed();
        return Ok(report);
    };
    let (manifest, mut plan, _errors) = plan_pass(opts, manifest, s.identity, &s.rules, s.fresh, s.walk).await?;
    report.changes = plan.changes.len();
    if plan.is_empty() {
        report.up_to_date = true;
        report.duration = started.elapsed();
        return Ok(report);
    }
    st.save_manifest(
        &s.identity,
        Some(&manifest),
        opts.manifest_cache_path().as_deref(),
        &s.lists,
        &opts.throttle.write,
    )
    .map_err(|source| LocalError::KeepImage { store: st.path().to_owned(), version: s.version, source })?;

    // What the commit will link from the store: every new regular file's content, once.
    let mut seen = std::collections::HashSet::new();
    // Each object takes the metadata of the first path that needs it.
    let mut metas: std::collections::HashMap<Hash, manifest::Meta> = std::collections::HashMap::new();
    let mut local_copies: Vec<(Hash, u64, manifest::RelPath)> = Vec::new();
    // Content several paths take (each its own inode): one more inode for each further path,
    // with its metadata, so the commit links them all instead of copying.
    let mut alternates: Vec<(Hash, usize, u64, manifest::Meta)> = Vec::new();
    let mut alternates_of: std::collections::HashMap<Hash, usize> = std::collections::HashMap::new();
    let (mut need_bytes, mut need_inodes, mut total_objects, mut total_bytes) = (0u64, 0u64, 0u64, 0u64);
    for (_, c, new) in plan.staged() {
        let (Some(h), true) = (new.hash, new.kind == manifest::Kind::File && new.size > 0) else { continue };
        if matches!(c.op.source(), Some(plan::Source::Link(_))) {
            continue;
        }
        if !seen.insert(h) {
            let n = alternates_of.entry(h).or_insert(0);
            *n += 1;
            if *n <= store::MAX_ALTERNATES && !st.has_alternate(&h, *n) {
                alternates.push((h, *n, new.size, new.meta.clone()));
                need_bytes += new.size.div_ceil(4096) * 4096;
                need_inodes += 1;
            }
            continue;
        }
        metas.insert(h, new.meta.clone());
        total_objects += 1;
        total_bytes += new.size;
        if st.has(&h) && st.verify(&h, &opts.throttle.read).unwrap_or(false) {
            report.already += 1;
            continue;
        }
        need_bytes += new.size.div_ceil(4096) * 4096;
        need_inodes += 1;
        if let Some(plan::Source::Local(p, _) | plan::Source::Resume(p, _)) = c.op.source() {
            local_copies.push((h, new.size, p.clone()));
        }
    }
    check_store_room(opts, &st, s.version, need_bytes, need_inodes)?;
    state.prefetched = Some(store::Prefetch {
        version: s.version,
        identity: s.identity.to_hex(),
        complete: false,
        objects_total: total_objects,
        objects_done: report.already,
        bytes_total: total_bytes,
        bytes_done: 0,
        started_unix_ms: triggers::journal::now_ms(),
        finished_unix_ms: 0,
    });
    st.save_state(&state).map_err(|e| store_err(&st, "save the state of", e))?;

    plan.drop_fetches(|h| st.has(h));
    let root = root::RootDir::open(&opts.root).map_err(|e| SyncError::Root { root: opts.root.clone(), source: e })?;
    let bases = fetch::Bases::for_plan(&HostFiles::new(&root, &opts.throttle.read), &plan);
    // Files rendered for this host are only on the master.
    let rendered = fetch::Render::hashes(s.render.as_ref(), &manifest);
    let master = master
        .with_store(&s.object_store_url, &s.identity)?
        .with_chunk_threshold(s.chunk_threshold)
        .with_solid(s.identity)
        .with_master_only(rendered);
    let rt = tokio::runtime::Handle::current();
    st.mark_busy().map_err(|e| store_err(&st, "write in", e))?;
    let objects = master.spawn_fetch(plan.fetch.clone(), bases, &rt);
    let fetch = plan.fetch.clone();
    let (st2, throttle, cancel) = (st.clone(), opts.throttle.clone(), opts.cancel.clone());
    let progress_state = state.clone();
    let done = tokio::task::spawn_blocking(move || {
        fill_store(&st2, root, objects, &master, &rt, &fetch, &local_copies, &metas, &throttle, cancel, progress_state)
    })
    .await
    .map_err(|e| SyncError::Task { task: "prefetch", source: e })??;
    report.objects = done.objects;
    report.bytes = done.bytes;
    report.wire_bytes = done.wire_bytes;
    report.local_copies = done.local_copies;
    for (h, n, size, meta) in &alternates {
        match st.add_alternate(h, *n, *size, meta, &opts.throttle.read, &opts.throttle.write) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                return Err(store_write_err(&st, h, e));
            }
            // The commit copies this path's content instead.
            Err(e) => tracing::warn!(hash = %h, "prefetch: cannot add another inode of an object: {e}"),
        }
    }
    st.sync().map_err(|e| store_err(&st, "flush", e))?;
    st.flush().map_err(|e| store_err(&st, "save the index of", e))?;
    // Lent nothing: this only takes the busy marker away.
    st.release_lent();
    let mut state = st.state();
    if let Some(p) = state.prefetched.as_mut() {
        p.complete = true;
        p.objects_done = p.objects_total;
        p.bytes_done = p.bytes_total;
        p.finished_unix_ms = triggers::journal::now_ms();
    }
    st.save_state(&state).map_err(|e| store_err(&st, "save the state of", e))?;
    gc_store(opts, &st, &mut state);
    report.duration = started.elapsed();
    Ok(report)
}

/// Free room for the prefetch in the store's filesystem (and within `store_max_bytes`), with
/// the margin whole-tree staging uses.
fn check_store_room(
    opts: &SyncOptions,
    st: &store::Store,
    version: u64,
    bytes: u64,
    inodes: u64,
) -> Result<(), SyncError> {
    let needed = bytes + bytes / 32 + (16 << 20);
    let needed_inodes = inodes + inodes / 32 + 64;
    let Ok(vfs) = rustix::fs::statvfs(st.path()) else { return Ok(()) };
    let mut free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
    let free_inodes = if vfs.f_files == 0 { u64::MAX } else { vfs.f_favail };
    if let Some(max) = opts.store_max_bytes {
        free = free.min(max.saturating_sub(st.usage().0));
    }
    if needed > free || needed_inodes > free_inodes {
        return Err(SyncError::StoreNoSpace {
            store: st.path().to_owned(),
            version,
            needed,
            free,
            needed_inodes,
            free_inodes: free_inodes.min(vfs.f_favail),
        });
    }
    Ok(())
}

/// A failed `action` on the store as a whole.
fn store_err(st: &store::Store, action: &'static str, source: std::io::Error) -> LocalError {
    LocalError::Store { store: st.path().to_owned(), action, source }
}

/// A failed write of object `h` into the store, out of space or not.
fn store_write_err(st: &store::Store, h: &Hash, source: std::io::Error) -> SyncError {
    let (store, hash) = (st.path().to_owned(), *h);
    if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        LocalError::StoreFull { store, hash, source }.into()
    } else {
        LocalError::WriteObject { store, hash, source }.into()
    }
}

struct Filled {
    objects: u64,
    bytes: u64,
    wire_bytes: u64,
    local_copies: u64,
}

/// Writes every object of `fetch` from the stream (each verified; one that fails is fetched
/// again on its own), and every host copy of `local`, into the store.
#[allow(clippy::too_many_arguments)]
fn fill_store(
    st: &store::Store,
    mut root: root::RootDir,
    mut objects: fetch::ObjectStream,
    master: &fetch::Master,
    rt: &tokio::runtime::Handle,
    fetch: &[(Hash, u64)],
    local: &[(Hash, u64, manifest::RelPath)],
    metas: &std::collections::HashMap<Hash, manifest::Meta>,
    throttle: &throttle::Throttle,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    mut state: store::State,
) -> Result<Filled, SyncError> {
    let mut out = Filled { objects: 0, bytes: 0, wire_bytes: 0, local_copies: 0 };
    // Objects the store had before this run, counted as done from the start.
    let already = state.prefetched.as_ref().map_or(0, |p| p.objects_done);
    let mut last_saved = Instant::now();
    let stopped = || cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    let store_err = |h: &Hash, e: std::io::Error| store_write_err(st, h, e);
    for (h, size) in fetch {
        if stopped() {
            return Err(LocalError::PrefetchStopped.into());
        }
        let mut broke = None;
        let r = st.add(h, *size, metas.get(h), &throttle.write, |w| {
            objects.next_into(*h, *size, Some(w)).map_err(|e| {
                if let fetch::ObjectError::Broken(b) = &e {
                    broke = Some(b.clone());
                }
                std::io::Error::other(e.to_string())
            })
        });
        if let Err(e) = r {
            if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                return Err(store_err(h, e));
            }
            if let Some(b) = broke {
                return Err(SyncError::Unreachable { url: master.url().to_owned(), reason: b });
            }
            // One object on its own, from the master.
            tracing::debug!(hash = %h, "prefetch: {e}; fetching it on its own");
            let mut one = master.spawn_fetch_aside(vec![(*h, *size)], rt);
            let r = st.add(h, *size, metas.get(h), &throttle.write, |w| {
                one.next_into(*h, *size, Some(w)).map_err(|e| std::io::Error::other(e.to_string()))
            });
            out.wire_bytes += one.wire_bytes;
            one.finish();
            r.map_err(|e| store_err(h, e))?;
        }
        out.objects += 1;
        out.bytes += size;
        if last_saved.elapsed() > Duration::from_secs(1) {
            if let Some(p) = state.prefetched.as_mut() {
                p.objects_done = already + out.objects;
                p.bytes_done = out.bytes;
            }
            let _ = st.save_state(&state);
            last_saved = Instant::now();
        }
    }
    out.wire_bytes += objects.wire_bytes;
    if let Some(t) = &objects.store {
        use std::sync::atomic::Ordering::Relaxed;
        out.wire_bytes =
            (out.wire_bytes + t.solid_wire.load(Relaxed) + t.chunk_bytes.load(Relaxed) + t.index_bytes.load(Relaxed))
                .saturating_sub(t.solid_content.load(Relaxed) + t.rebuilt_bytes.load(Relaxed));
    }
    objects.finish();
    for (h, size, p) in local {
        if st.has(h) {
            continue;
        }
        let r = root.parent(p).and_then(|(dir, name)| {
            let f = crate::hostfs::fsops::open_regular(dir.as_fd(), name)?;
            st.add(h, *size, metas.get(h), &throttle.write, |w| {
                crate::hostfs::fsops::copy(throttle::Throttled::new(&f, &throttle.read), w).map(|_| ())
            })
        });
        match r {
            Ok(()) => {
                out.local_copies += 1;
                out.bytes += size;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => return Err(store_err(h, e)),
            // The host file changed: fetched at the commit's next pass instead.
            Err(e) => tracing::warn!(path = %p, "prefetch: cannot copy the content from the host: {e}"),
        }
    }
    Ok(out)
}

/// A pass ([`sync_once`]) and, when its health checks kept failing for `health_grace` after it
/// moved the host to a new version, a local rollback to the previous one, with its triggers;
/// the version is then refused until the master targets another.
pub async fn converge(opts: &SyncOptions) -> Result<PassReport, SyncError> {
    let mut report = sync_once(opts).await?;
    let failed = report.health.iter().any(|h| !h.ok) && report.health_stored_at.is_none();
    if opts.health_grace.is_none() || opts.dry_run || !failed || report.exit_code() != exit::HEALTH_FAILED {
        return Ok(report);
    }
    let check = report.health.iter().find(|h| !h.ok).cloned();
    let mut ro = opts.clone();
    ro.mode = Mode::Rollback;
    ro.health = Vec::new();
    ro.retry_now = true;
    tracing::warn!(version = report.image_version, "health checks kept failing for health_grace: rolling back locally");
    let rolled = match Box::pin(sync_once(&ro)).await {
        Ok(rb) => {
            let ok = rb.failures().next().is_none();
            let to = if ok {
                Ok((rb.image_version, rb.identity))
            } else {
                Err(format!("the rollback did not complete: {}", rb.summary()))
            };
            RolledBack { to, summary: rb.summary(), triggers: rb.triggers }
        }
        Err(e) => RolledBack { to: Err(e.to_string()), summary: String::new(), triggers: Vec::new() },
    };
    if rolled.to.is_ok() {
        {
            let mut state = store::read_state(&opts.state());
            state.refused = Some(store::Refused {
                version: report.image_version,
                identity: report.identity.to_hex(),
                reason: match &check {
                    Some(h) => format!("health check {:?} failed: {}", h.name, h.status),
                    None => "health checks failed".into(),
                },
                at_unix_ms: triggers::journal::now_ms(),
            });
            if let Err(e) = store::write_state(&opts.state(), &state) {
                tracing::warn!("cannot record the refused version: {e}");
            }
        }
    }
    report.rolled_back = Some(rolled);
    Ok(report)
}

/// `syncd rollback`: the previous version, from the local store, with no master.
pub async fn rollback_once(opts: &SyncOptions) -> Result<PassReport, SyncError> {
    let mut ro = opts.clone();
    ro.mode = Mode::Rollback;
    ro.health = Vec::new();
    sync_once(&ro).await
}

/// `syncd commit`: the prefetched version, from the local store, with no master; then its
/// health checks (and, with `health_grace`, a rollback if they keep failing).
pub async fn commit_once(opts: &SyncOptions) -> Result<PassReport, SyncError> {
    let mut co = opts.clone();
    co.mode = Mode::Commit;
    converge(&co).await
}

//! One convergence pass ([`sync_once`]): fetch and validate the manifest, scan the host,
//! compute a pure [`crate::plan::Plan`], then (unless dry-running) apply it, run the triggers
//! and health checks, and record what it did.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use exclusions::{Exclusions, PatternList};
use manifest::Hash;

use crate::apply::{FailedAt, Failure, FailureKind, Outcome};
use crate::error::{LocalError, NeedsStore, SyncError};
use crate::hostfs::files::HostFiles;
use crate::hostfs::root;
use crate::options::{Mode, SyncOptions};
use crate::plan::Plan;
use crate::report::{human_bytes, PassReport};
use crate::{apply, fetch, health, host, lock, mcache, plan, progress, store, trust, unchanged};

/// What a pass starts from: the validated manifest and the host's metadata walk.
pub(crate) struct Started {
    /// `None` when the walk proved the host unchanged since it last matched this image (see
    /// [`unchanged`]): the manifest is then not even loaded.
    pub(crate) manifest: Option<manifest::Manifest>,
    pub(crate) version: u64,
    /// What the entries were checked to hash to.
    pub(crate) identity: Hash,
    pub(crate) rules: Exclusions,
    /// [`unchanged::rules_digest`] of `rules`.
    pub(crate) rules_digest: Hash,
    /// Whether the entries came off the wire (and so should be cached).
    pub(crate) fresh: bool,
    /// The object store the manifest header names (empty: none).
    pub(crate) object_store_url: String,
    /// The header's `chunk_threshold`: objects this large are stored as chunks (0: none).
    pub(crate) chunk_threshold: u64,
    pub(crate) walk: manifest::scan::Scan,
    /// The master's exclusion lists for this host, as received (kept with the manifest in the
    /// local store).
    pub(crate) lists: Vec<PatternList>,
    /// Files the master rendered for this host (their entries are in the manifest).
    pub(crate) render: Option<fetch::Render>,
}

/// Gets the manifest and walks the host. The manifest comes from the host's cached copy when
/// the master confirms it is current, else (or if the copy turns out damaged) whole from the
/// master. Once the (signed) header has been checked, the walk of the host runs while the
/// cached entries are read: it needs only the exclusion rules.
pub(crate) async fn start_pass(
    opts: &SyncOptions,
    master: &fetch::Master,
    local: &[PatternList],
    applied_record: &std::path::Path,
) -> Result<Started, SyncError> {
    let cache = opts.manifest_cache_path();
    let mut offered = cache.as_deref().and_then(mcache::peek_identity);
    loop {
        let t = Instant::now();
        let mut got = master.manifest(&opts.host_id, offered.as_ref()).await?;
        tracing::debug!(secs = t.elapsed().as_secs_f64(), omitted = got.manifest.is_none(), "manifest reply received");
        // Signature, expiry and rollback are checked before the host is even read.
        trust::check(
            &opts.trust,
            applied_record,
            got.version,
            &got.identity,
            got.signature.as_ref(),
            got.render.as_ref().and_then(|r| r.binding.as_ref()),
            &opts.host_id,
        )?;
        let rules = compile_rules(&got.lists, local)?;
        let (root, walk_rules) = (opts.root.clone(), rules.clone());
        let mut walk = tokio::task::spawn_blocking(move || host::walk(&root, &walk_rules));
        // The image is the one the host holds a copy of, and the host last matched it with
        // these rules: the walk alone may prove it still does, so it goes first.
        let rules_digest = unchanged::rules_digest(&rules);
        let recorded = opts
            .unchanged_path()
            .filter(|_| got.manifest.is_none())
            .and_then(|p| unchanged::recorded_walk(&p, &got.identity, &rules_digest));
        if let Some(recorded) = recorded {
            let done = walk
                .await
                .map_err(|e| SyncError::Task { task: "host walk", source: e })?
                .map_err(|source| SyncError::Scan { root: opts.root.clone(), source })?;
            if unchanged::digest(&done) == Some(recorded) {
                tracing::debug!(secs = t.elapsed().as_secs_f64(), "host unchanged since it last matched this image");
                return Ok(Started {
                    manifest: None,
                    version: got.version,
                    identity: got.identity,
                    rules,
                    rules_digest,
                    fresh: false,
                    object_store_url: got.object_store_url,
                    chunk_threshold: got.chunk_threshold,
                    walk: done,
                    lists: got.lists,
                    render: got.render,
                });
            }
            walk = tokio::task::spawn_blocking(move || Ok(done));
        }
        let (manifest, fresh) = match got.manifest.take() {
            Some(m) => (m, true),
            None => {
                let (path, identity, read) =
                    (cache.clone().unwrap_or_default(), got.identity, opts.throttle.read.clone());
                let loaded = tokio::task::spawn_blocking(move || mcache::load(&path, &identity, &read))
                    .await
                    .map_err(|e| SyncError::Task { task: "manifest cache", source: e })?;
                tracing::debug!(secs = t.elapsed().as_secs_f64(), "manifest cache loaded");
                match loaded {
                    Ok(mut m) => {
                        // The identity leaves the version out: an identical tree may be republished.
                        m.version = got.version;
                        (m, false)
                    }
                    Err(why) => {
                        // Not offered again, so the master must send the whole manifest.
                        tracing::warn!("{}; asking the master for the whole manifest", crate::error::chain(&why));
                        let _ = walk.await;
                        offered = None;
                        continue;
                    }
                }
            }
        };
        let walk = walk
            .await
            .map_err(|e| SyncError::Task { task: "host walk", source: e })?
            .map_err(|source| SyncError::Scan { root: opts.root.clone(), source })?;
        return Ok(Started {
            manifest: Some(manifest),
            version: got.version,
            identity: got.identity,
            rules,
            rules_digest,
            fresh,
            object_store_url: got.object_store_url,
            chunk_threshold: got.chunk_threshold,
            walk,
            lists: got.lists,
            render: got.render,
        });
    }
}

/// Starts a pass from a version the local store keeps (see [`Mode`]): its manifest (checked
/// against its identity) and exclusion lists, and the host walk.
pub(crate) async fn start_local(
    opts: &SyncOptions,
    store: &store::Store,
    local: &[PatternList],
) -> Result<Started, SyncError> {
    let state = store.state();
    let target = match opts.mode {
        Mode::Commit => match state.prefetched {
            Some(p) if p.complete => store::VersionRef { version: p.version, identity: p.identity, at_unix_ms: 0 },
            Some(p) => {
                return Err(
                    LocalError::Incomplete { version: p.version, done: p.objects_done, total: p.objects_total }.into()
                )
            }
            None => return Err(LocalError::NothingPrefetched.into()),
        },
        Mode::Rollback => {
            state.previous.clone().ok_or_else(|| LocalError::NoPrevious { store: store.path().to_owned() })?
        }
        _ => state.current.clone().ok_or(LocalError::NoCurrent)?,
    };
    let identity = target.hash().ok_or_else(|| LocalError::BadIdentity(target.identity.clone()))?;
    let (manifest, lists) = store
        .load_manifest(&identity, &opts.throttle.read)
        .map_err(|source| LocalError::LoadImage { version: target.version, source })?;
    let rules = compile_rules(&lists, local)?;
    let rules_digest = unchanged::rules_digest(&rules);
    let (root, walk_rules) = (opts.root.clone(), rules.clone());
    let walk = tokio::task::spawn_blocking(move || host::walk(&root, &walk_rules))
        .await
        .map_err(|e| SyncError::Task { task: "host walk", source: e })?
        .map_err(|source| SyncError::Scan { root: opts.root.clone(), source })?;
    Ok(Started {
        version: target.version,
        manifest: Some(manifest),
        identity,
        rules,
        rules_digest,
        fresh: false,
        object_store_url: String::new(),
        chunk_threshold: 0,
        walk,
        lists,
        render: None,
    })
}

/// Reads and checks the local exclusion files. A broken list is a configuration error:
/// syncd refuses to run rather than guess.
pub fn load_local_lists(paths: &[PathBuf]) -> Result<Vec<PatternList>, SyncError> {
    let lists =
        paths.iter().map(|p| PatternList::read(p)).collect::<Result<Vec<_>, _>>().map_err(SyncError::Exclusions)?;
    for l in &lists {
        Exclusions::compile([l]).map_err(SyncError::Exclusions)?;
    }
    Ok(lists)
}

/// The effective rules: the master's lists for this host, then the local files.
pub fn compile_rules(master: &[PatternList], local: &[PatternList]) -> Result<Exclusions, SyncError> {
    Exclusions::compile(master.iter().chain(local)).map_err(SyncError::Exclusions)
}

/// Records how a pass ended, once, wherever it ran (a command or the daemon): the metrics
/// textfile, if configured, and the last-pass record in the state dir for `syncd status`.
pub fn record(opts: &SyncOptions, r: &Result<PassReport, SyncError>) {
    crate::metrics::record(opts.metrics_textfile.as_deref(), r);
    crate::last_pass::record(opts, r);
}

/// One convergence pass.
pub async fn sync_once(opts: &SyncOptions) -> Result<PassReport, SyncError> {
    let started = Instant::now();
    let root_md = std::fs::metadata(&opts.root).map_err(|e| SyncError::Root { root: opts.root.clone(), source: e })?;
    if !root_md.is_dir() {
        return Err(SyncError::Root { root: opts.root.clone(), source: std::io::ErrorKind::NotADirectory.into() });
    }
    // One syncd per root, before anything of the host is read.
    let access = if opts.dry_run { lock::Access::Shared } else { lock::Access::Exclusive };
    let _lock = lock::acquire(&opts.root, access, opts.lock_wait, opts.cancel.as_ref()).await?;
    let local = load_local_lists(&opts.exclude_from)?;
    let store = open_store(opts)?;
    let master = match opts.mode.uses_master() {
        true => {
            Some(fetch::Master::connect(&opts.master, &opts.transport).await?.with_net_limit(opts.throttle.net.clone()))
        }
        false => None,
    };
    tracing::debug!(secs = started.elapsed().as_secs_f64(), "phase: connected");
    let applied_record = opts.state().applied_version();
    let start = match (opts.mode, &master, &store) {
        (Mode::Network | Mode::Prefetch, Some(m), _) => start_pass(opts, m, &local, &applied_record).await?,
        (_, _, Some(st)) => start_local(opts, st, &local).await?,
        _ => return Err(SyncError::NoStateDir(NeedsStore::LocalPass)),
    };
    let Started {
        manifest,
        version,
        identity,
        rules,
        rules_digest,
        fresh,
        object_store_url,
        chunk_threshold,
        walk,
        lists,
        render,
    } = start;
    tracing::debug!(secs = started.elapsed().as_secs_f64(), "phase: manifest received and validated");
    // The digest of this walk, recorded if the pass finds the host matching the image.
    let mut walk_digest = None;
    let walk_only = manifest.is_none().then_some(walk.entries.len());
    let (manifest, plan, scan_errors) = match manifest {
        None => {
            tracing::info!(version, identity = %identity, entries = walk.entries.len(), "host unchanged since it last matched this image");
            drop(walk);
            (None, Plan { image_version: version, ..Plan::default() }, Vec::new())
        }
        Some(manifest) => {
            tracing::info!(version = manifest.version, entries = manifest.entries.len(), identity = %identity, rules = rules.rules().len(), cached = !fresh, "manifest received");
            if opts.unchanged_path().is_some() && !opts.dry_run {
                walk_digest = unchanged::digest(&walk);
            }
            let (manifest, plan, errors) = plan_pass(opts, manifest, identity, &rules, fresh, walk).await?;
            (Some(manifest), plan, errors)
        }
    };
    let mut scan_failures: Vec<Failure> = scan_errors
        .iter()
        .map(|e| Failure { at: FailedAt::File(e.path().to_owned()), kind: FailureKind::Scan, error: e.to_string() })
        .collect();
    for s in &plan.skipped {
        if s.reason.is_failure() {
            scan_failures.push(Failure {
                at: FailedAt::Entry(s.path.clone()),
                kind: FailureKind::LeftAlone,
                error: format!("left alone: {}", s.reason),
            });
        }
    }
    let mut report = PassReport {
        host_id: opts.host_id.clone(),
        root: opts.root.clone(),
        image_version: version,
        identity,
        plan,
        outcome: None,
        scan_failures,
        triggers: Vec::new(),
        deferred: Vec::new(),
        health: Vec::new(),
        health_stored_at: None,
        would_fire: Vec::new(),
        walk_only,
        duration: Duration::ZERO,
        rolled_back: None,
        render,
    };
    // (With no triggers, the changes are not even listed for them.)
    let firing = match opts.triggers.is_empty() {
        true => Vec::new(),
        false => triggers::select(&opts.triggers, &trigger_changes(&report.plan)),
    };
    if opts.dry_run {
        report.would_fire = firing.iter().map(|(t, c)| (t.name.clone(), c.clone())).collect();
        for p in triggers::journal::peek(&opts.state_dir)? {
            if !report.would_fire.iter().any(|(n, _)| *n == p.trigger)
                && opts.triggers.iter().any(|t| t.name == p.trigger)
            {
                report.would_fire.push((p.trigger.clone(), p.changes.into_iter().map(|s| s.record).collect()));
            }
        }
    }
    // A pass from the local store refuses before anything changes when the store lacks some
    // content; a pass from the network fetches none of what the store has.
    if let (Some(st), false) = (&store, opts.dry_run) {
        let read = opts.throttle.read.clone();
        if opts.mode.uses_master() {
            let dropped = report.plan.drop_fetches(|h| st.has(h) && st.verify(h, &read).unwrap_or(false));
            if dropped > 0 {
                tracing::info!(objects = dropped, "taken from the local store instead of fetched");
            }
        } else {
            let wanted: Vec<Hash> = report.plan.fetch.iter().map(|(h, _)| *h).collect();
            let missing = st.missing(&wanted, &read);
            if let Some(first) = missing.first() {
                let path = report
                    .plan
                    .changes
                    .iter()
                    .find(|c| c.op.new_entry().and_then(|n| n.hash).as_ref() == Some(first))
                    .map_or_else(|| first.to_hex(), |c| format!("/{}", c.path));
                return Err(LocalError::Lacks {
                    store: st.path().to_owned(),
                    count: missing.len(),
                    version,
                    first: path,
                    rollback: opts.mode == Mode::Rollback,
                }
                .into());
            }
            report.plan.fetch.clear();
            report.plan.fetch_bases.clear();
            report.plan.fetch_seeds.clear();
            report.plan.solid_bases.clear();
        }
    }
    if opts.staging == apply::Staging::Whole && !opts.dry_run && !report.plan.is_empty() {
        // Content the local store holds on the root's filesystem is staged as hard links: it
        // takes no room.
        let linked = match &store {
            Some(st)
                if std::fs::metadata(&opts.root).is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) == st.dev()) =>
            {
                let mut seen = std::collections::HashSet::new();
                report
                    .plan
                    .staged()
                    .filter_map(|(_, _, n)| {
                        n.hash.filter(|h| n.kind == manifest::Kind::File && st.has(h)).map(|h| (h, n.size))
                    })
                    .filter(|(h, _)| seen.insert(*h))
                    .map(|(_, size)| size.div_ceil(4096) * 4096)
                    .sum()
            }
            _ => 0,
        };
        check_room(&opts.root, &report.plan, linked)?;
    }
    // The triggers this batch will fire go to the journal, durably, before anything commits.
    let mut journal = match (opts.dry_run, opts.triggers.is_empty()) {
        (false, false) => Some(triggers::Journal::open(&opts.state_dir)?),
        _ => None,
    };
    let batch = triggers::journal::now_ms();
    if let Some(j) = &mut journal {
        let pending = firing
            .into_iter()
            .map(|(t, changes)| triggers::Pending {
                trigger: t.name.clone(),
                image_version: version,
                changes: changes.into_iter().map(|record| triggers::Stored { record, batch }).collect(),
                attempts: 0,
                last_error: None,
                not_before_ms: 0,
            })
            .collect();
        j.add(pending)?;
    }
    // A record of a host that matched says nothing once it is about to change.
    if let (Some(p), false, false) = (opts.unchanged_path(), report.plan.is_empty(), opts.dry_run) {
        unchanged::clear(&p);
    }
    if let (Some(manifest), false, false) = (manifest, opts.dry_run, report.plan.is_empty()) {
        let root =
            root::RootDir::open(&opts.root).map_err(|e| SyncError::Root { root: opts.root.clone(), source: e })?;
        let rt = tokio::runtime::Handle::current();
        // Delta bases are read by the stream's decode thread, beneath the same root.
        let bases = fetch::Bases::for_plan(&HostFiles::new(&root, &opts.throttle.read), &report.plan);
        let (objects, master) = match master {
            Some(m) if opts.mode == Mode::Network => {
                // Files rendered for this host are only on the master.
                let rendered = fetch::Render::hashes(report.render.as_ref(), &manifest);
                let m = m
                    .with_store(&object_store_url, &identity)?
                    .with_chunk_threshold(chunk_threshold)
                    .with_solid(report.identity)
                    .with_master_only(rendered);
                (m.spawn_fetch(report.plan.fetch.clone(), bases, &rt), Some(m))
            }
            // The current version kept locally: whole objects (or deltas) from the master.
            Some(m) => (m.spawn_fetch(report.plan.fetch.clone(), bases, &rt), Some(m)),
            None => (fetch::ObjectStream::empty(), None),
        };
        progress::planned(
            report.plan.fetch.len() as u64,
            report.plan.fetch_bytes(),
            report.plan.staged().count() as u64,
        );
        let plan = std::mem::take(&mut report.plan);
        let cancel = opts.cancel.clone();
        let throttle = opts.throttle.clone();
        let staging = opts.staging;
        let store_for_apply = store.clone().filter(|_| staging == apply::Staging::Whole);

        let (plan, outcome, manifest) = tokio::task::spawn_blocking(move || {
            let aside = master.map(|m| Box::new(m.aside(rt)) as Box<dyn apply::ContentSource>);
            let outcome =
                apply::apply(root, &manifest, &plan, staging, objects, aside, store_for_apply, cancel, &throttle);
            (plan, outcome, manifest)
        })
        .await
        .map_err(|e| SyncError::Task { task: "apply", source: e })?;
        report.plan = plan;
        report.outcome = Some(outcome);
        if let Some(st) = &store {
            // First: unlinking a released object changes the ctime of the root file it was.
            st.release_lent();
        }
        if let Some(path) = opts.index_path() {
            remember_written(opts, &report, &path);
        }
        if let Some(st) = &store {
            note_version(opts, st, &report, Some(&manifest), &lists);
        }
    } else if !opts.dry_run {
        report.outcome = Some(Outcome::default());
    }
    if let (Some(st), Some(o), true) = (&store, &report.outcome, report.plan.is_empty()) {
        // Nothing to change: the host is at this version (a first pass with the store, or a
        // reconcile): the store keeps it as current.
        if !o.rolled_back && report.failures().next().is_none() && opts.mode != Mode::Pinned {
            note_version(opts, st, &report, None, &lists);
        }
    }
    if let Some(o) = report.outcome.as_mut().filter(|o| !o.rolled_back && opts.mode != Mode::Rollback) {
        // Applied, even in part: from now on anything older is a rollback. (A pass rolled
        // back applied nothing: the host is still at its earlier version.)
        if let Err(error) = trust::record(
            &opts.trust,
            &applied_record,
            report.image_version,
            &report.identity,
            fetch::Render::serial(report.render.as_ref()),
        ) {
            o.failures.push(Failure { at: FailedAt::File(applied_record.clone()), kind: FailureKind::State, error });
        }
    }
    if let (Some(j), Some(o)) = (&mut journal, &report.outcome) {
        run_triggers(j, opts, &report.plan, o, batch, &mut report.triggers, &mut report.deferred);
    }
    // After the triggers: a check of the new version should see the services they reloaded.
    health::after_pass(opts, &mut report).await;
    // The host matched the image with nothing to do and nothing wrong: record the walk that
    // showed it, so the next pass can tell the same from a walk alone.
    if let (Some(p), Some(d), true) = (opts.unchanged_path(), walk_digest, report.plan.is_empty()) {
        if report.outcome.is_some() && report.failures().next().is_none() {
            if let Err(e) = unchanged::record(&p, &identity, &rules_digest, &d) {
                tracing::warn!(path = %p.display(), "cannot record the unchanged host: {e}");
            }
        }
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// Whole-tree staging needs room for all new content at once, on the root's filesystem (syncd
/// never writes across a mount point, so that is the only one): the blocks and inodes of
/// [`Plan::stage_needs`] (less `linked`, the content hard-linked from the local store), plus a
/// margin of 1/32 and 16 MiB (64 inodes and 1/32), less what the leftovers of an interrupted
/// pass free first. The space reserved for root is not counted
/// as free, so the host's own services keep it.
pub(crate) fn check_room(root: &std::path::Path, plan: &Plan, linked: u64) -> Result<(), SyncError> {
    let (bytes, inodes) = plan.stage_needs();
    let bytes = bytes.saturating_sub(linked);
    let needed = bytes + bytes / 32 + (16 << 20);
    let needed_inodes = inodes + inodes / 32 + 64;
    let st = match rustix::fs::statvfs(root) {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!(root = %root.display(), "cannot tell the free space (statvfs): {e}; staging anyway");
            return Ok(());
        }
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize) + plan.leftover_bytes();
    // Filesystems without inode accounting (btrfs, some network ones) report 0 files.
    let free_inodes = if st.f_files == 0 { u64::MAX } else { st.f_favail + plan.leftovers.len() as u64 };
    tracing::debug!(needed, free, needed_inodes, free_inodes, "room to stage the pass");
    if needed > free || needed_inodes > free_inodes {
        return Err(SyncError::NoSpace {
            root: root.to_owned(),
            needed,
            free,
            needed_inodes,
            free_inodes: free_inodes.min(st.f_favail),
        });
    }
    Ok(())
}

/// Completes a pass that has the manifest: hashes what the comparison needs (the host index
/// first), saves the caches, and plans.
pub(crate) async fn plan_pass(
    opts: &SyncOptions,
    manifest: manifest::Manifest,
    identity: Hash,
    rules: &Exclusions,
    fresh: bool,
    walk: manifest::scan::Scan,
) -> Result<(manifest::Manifest, Plan, Vec<manifest::scan::ScanError>), SyncError> {
    let started = Instant::now();
    // A fresh, trusted manifest becomes the cached copy the next pass offers (not on a dry
    // run, which writes nothing).
    let cache_to_save = opts.manifest_cache_path().filter(|_| fresh && !opts.dry_run);

    let root = opts.root.clone();
    // A dry run reads the index but writes nothing, not even that.
    let save_index = !opts.dry_run;
    let read_limit = opts.throttle.read.clone();
    let write_limit = opts.throttle.write.clone();
    let index_path = opts.index_path();
    let rules_owned = rules.clone();
    let hash_every_file = opts.mode == Mode::Prefetch;
    let (manifest, rules, (host, scan_errors), index_use) = tokio::task::spawn_blocking(move || {
        let rules = rules_owned;
        let t = std::time::Instant::now();
        if let Some(path) = cache_to_save {
            if let Err(e) = mcache::save(&path, &manifest, &identity, &write_limit) {
                tracing::warn!(path = %path.display(), "cannot save the manifest cache: {e}");
            }
        }
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "manifest cache saved");
        // Files unchanged since they were last hashed (same dev, inode, size, mtime and ctime)
        // take their hash from the host index instead of being read. The index is merged in
        // as a stream, never loaded whole: on a million files it would be another 72 MB.
        let mut walk = walk;
        let files = walk.entries.iter().filter(|e| e.entry.kind == manifest::Kind::File).count() as u64;
        let applied = index_path.as_deref().map(|p| {
            let (applied, problem) = manifest::hash_index::apply_file(p, &mut walk.entries);
            read_limit.charge(std::fs::metadata(p).map_or(0, |m| m.len()));
            if let Some(problem) = problem {
                tracing::warn!("host index: {problem}; rebuilding it from a full scan");
            }
            tracing::debug!(hits = applied.filled, "host index");
            applied
        });
        let index_use = (applied.as_ref().map_or(0, |a| a.filled as u64), files);
        let r = host::hash(&root, walk, &manifest, &read_limit, save_index, hash_every_file);
        if let (Some(applied), Some(path), (host, _), true) = (applied, index_path, &r, save_index) {
            let saved = if applied.unchanged(&host.entries) {
                Ok(())
            } else {
                path.parent()
                    .map_or(Ok(()), |d| std::fs::DirBuilder::new().recursive(true).create(d))
                    .and_then(|()| manifest::hash_index::save_entries(&path, &host.entries))
                    .map(|()| write_limit.charge(std::fs::metadata(&path).map_or(0, |m| m.len())))
            };
            if let Err(e) = saved {
                tracing::warn!(path = %path.display(), "cannot save the host index: {e}");
            }
        }
        (manifest, rules, r, index_use)
    })
    .await
    .map_err(|source| SyncError::Task { task: "host scan", source })?;

    tracing::debug!(secs = started.elapsed().as_secs_f64(), entries = host.entries.len(), "phase: host scanned");
    let mut plan = Plan::compute(&manifest, &host, &rules);
    (plan.index_hits, plan.host_files) = index_use;
    tracing::debug!(secs = started.elapsed().as_secs_f64(), changes = plan.changes.len(), "phase: plan computed");
    drop(host);
    Ok((manifest, plan, scan_errors))
}

/// Every change of a plan as the trigger matcher sees it.
pub(crate) fn trigger_changes(plan: &Plan) -> Vec<triggers::Change<'_>> {
    use triggers::ChangeKind;
    plan.changes
        .iter()
        .map(|c| {
            let old = c.op.old_entry();
            let new = c.op.new_entry();
            let kind = match &c.op {
                plan::Op::Create { .. } => ChangeKind::Create,
                plan::Op::Delete { .. } => ChangeKind::Delete,
                plan::Op::Replace { .. } => ChangeKind::Type,
                plan::Op::Update { diff, .. } if diff.needs_new_inode() => ChangeKind::Content,
                plan::Op::Update { .. } => ChangeKind::Metadata,
            };
            triggers::Change {
                path: &c.path,
                is_dir: old.is_some_and(|o| o.entry.kind == manifest::Kind::Dir)
                    || new.is_some_and(|n| n.kind == manifest::Kind::Dir),
                kind,
                old_hash: old.and_then(|o| o.entry.hash).map(|h| h.to_hex()),
                new_hash: new.and_then(|n| n.hash).map(|h| h.to_hex()),
            }
        })
        .collect()
}

/// After the commit: the triggers of what it changed (see [`triggers::run::after_commit`]).
pub(crate) fn run_triggers(
    journal: &mut triggers::Journal,
    opts: &SyncOptions,
    plan: &Plan,
    outcome: &Outcome,
    batch: u64,
    results: &mut Vec<triggers::run::RunResult>,
    deferred: &mut Vec<String>,
) {
    let done: std::collections::HashSet<String> = plan
        .changes
        .iter()
        .enumerate()
        .filter(|(i, _)| outcome.done.get(*i).copied().unwrap_or(false))
        .map(|(_, c)| format!("/{}", c.path))
        .collect();
    let after = triggers::run::after_commit(journal, &opts.triggers, batch, |p| done.contains(p), opts.retry_now);
    results.extend(after.results);
    deferred.extend(after.deferred);
}

/// The local store of this root, when the state dir was chosen (not on a dry run, which writes
/// nothing). A pass that needs it fails without it; any other goes on without it, warned.
pub(crate) fn open_store(opts: &SyncOptions) -> Result<Option<std::sync::Arc<store::Store>>, SyncError> {
    let needed = !matches!(opts.mode, Mode::Network);
    if !opts.index || opts.dry_run {
        if needed && !opts.dry_run {
            return Err(SyncError::NoStateDir(NeedsStore::Command));
        }
        return Ok(None);
    }
    match store::Store::open(&opts.state(), &opts.throttle.read) {
        Ok(s) => {
            let mut state = s.state();
            // (A prefetch cleans up at its end, once its own version is among those kept.)
            if state.gc_pending && matches!(opts.mode, Mode::Network | Mode::Pinned) {
                gc_store(opts, &s, &mut state);
            }
            if std::fs::metadata(&opts.root).is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) != s.dev()) {
                tracing::debug!(store = %s.path().display(), "the local store is on another filesystem than the root: content is copied, not linked");
            }
            Ok(Some(std::sync::Arc::new(s)))
        }
        Err(e) if needed => Err(LocalError::Store { store: opts.state().store(), action: "open", source: e }.into()),
        Err(e) => {
            tracing::warn!(store = %opts.state().store().display(), "cannot open the local store: {e}; no local rollback for this pass");
            Ok(None)
        }
    }
}

/// After a pass that applied (or found nothing to change): the local store records the version
/// the host is now at. A new version becomes current and the one before it previous (its
/// content was kept by the commit); a rollback makes the previous current and keeps none. Then
/// the store drops what none of current, previous and prefetched needs, within
/// `store_max_bytes`.
pub(crate) fn note_version(
    opts: &SyncOptions,
    st: &store::Store,
    report: &PassReport,
    manifest: Option<&manifest::Manifest>,
    lists: &[PatternList],
) {
    if report.outcome.as_ref().is_none_or(|o| o.rolled_back) {
        return;
    }
    let id = report.identity;
    let before = st.state();
    let mut state = before.clone();
    let mcache = opts.manifest_cache_path();
    if let Err(e) = st.save_manifest(&id, manifest, mcache.as_deref(), lists, &opts.throttle.write) {
        tracing::warn!(store = %st.path().display(), "cannot keep image v{} in the local store: {e}; no local rollback to it", report.image_version);
        return;
    }
    match opts.mode {
        Mode::Rollback => {
            state.current = Some(store::VersionRef::new(report.image_version, &id));
            state.previous = None;
        }
        Mode::Pinned | Mode::Prefetch => {}
        Mode::Network | Mode::Commit => {
            if !state.current.as_ref().is_some_and(|c| c.is(&id)) {
                state.previous =
                    state.current.take().filter(|c| c.hash().is_some_and(|h| st.has_manifest(&h))).filter(|_| {
                        // The commit kept what it replaced only with whole-tree staging.
                        opts.staging == apply::Staging::Whole
                    });
                state.current = Some(store::VersionRef::new(report.image_version, &id));
            }
            if state.prefetched.as_ref().is_some_and(|p| p.identity == id.to_hex()) {
                state.prefetched = None;
            }
        }
    }
    if !opts.mode.uses_master() {
        // The next pass offers this version to the master, and reads it from here.
        if let Some(m) = &mcache {
            if let Err(e) = st.link_manifest_to(&id, m) {
                tracing::warn!(path = %m.display(), "cannot update the manifest cache: {e}");
            }
        }
    }
    let kept = report.outcome.as_ref().is_some_and(|o| o.stats.kept_old > 0);
    if state == before {
        if kept {
            // Old content of a drift repair: nothing any kept version needs, most likely.
            gc_store(opts, st, &mut state);
        }
        return;
    }
    if matches!(opts.mode, Mode::Commit | Mode::Rollback) {
        // The switch is kept short: what no kept version needs any more (after a rollback,
        // what it replaced: a rename over a kept inode frees no blocks, which is much of what
        // makes it quick) is removed by the next pass or prefetch.
        state.gc_pending = true;
    }
    if let Err(e) = st.save_state(&state) {
        tracing::warn!(store = %st.path().display(), "cannot save the local store's state: {e}");
        return;
    }
    if !state.gc_pending {
        gc_store(opts, st, &mut state);
    }
}

/// Drops from the store what no kept version needs, then, over `store_max_bytes`, the
/// previous version (and with it the local rollback), warned.
pub(crate) fn gc_store(opts: &SyncOptions, st: &store::Store, state: &mut store::State) {
    let t = Instant::now();
    if state.gc_pending {
        state.gc_pending = false;
        if let Err(e) = st.save_state(state) {
            tracing::warn!(store = %st.path().display(), "cannot save the local store's state: {e}");
        }
    }
    let keep = |s: &store::State| -> Vec<Hash> {
        [s.current.as_ref().and_then(|c| c.hash()), s.previous.as_ref().and_then(|c| c.hash())]
            .into_iter()
            .flatten()
            .chain(s.prefetched.as_ref().and_then(|p| Hash::from_hex(&p.identity)))
            .collect()
    };
    match st.gc(&keep(state), &opts.throttle.read) {
        Ok(n) if n > 0 => tracing::debug!(removed = n, "local store: objects no kept version needs removed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(store = %st.path().display(), "cannot clean the local store: {e}"),
    }
    if let (Some(max), Some(prev)) = (opts.store_max_bytes, state.previous.clone()) {
        let (own, _) = st.usage();
        if own > max {
            tracing::warn!(
                store = %st.path().display(),
                "the local store holds {} of its own, over store_max_bytes ({}): image v{} is no longer kept, so a local rollback is not possible (hint: raise store_max_bytes)",
                human_bytes(own), human_bytes(max), prev.version
            );
            state.previous = None;
            if st.save_state(state).is_ok() {
                let _ = st.gc(&keep(state), &opts.throttle.read);
            }
        }
    }
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "local store cleaned");
}

/// After a pass that wrote files: their hashes go into the host index (their content was
/// verified before each rename), so the next pass, a rollback among others, does not read them
/// again to tell what they hold.
pub(crate) fn remember_written(opts: &SyncOptions, report: &PassReport, path: &std::path::Path) {
    let Some(o) = report.outcome.as_ref().filter(|o| !o.rolled_back) else { return };
    let t = Instant::now();
    let Ok(mut root) = root::RootDir::open(&opts.root) else { return };
    let mut known = Vec::new();
    for (i, c) in report.plan.changes.iter().enumerate() {
        let Some(new) = c.op.new_entry() else { continue };
        let (Some(hash), true, true) = (new.hash, new.kind == manifest::Kind::File, o.done.get(i) == Some(&true))
        else {
            continue;
        };
        if !c.op.makes_new_inode() {
            continue;
        }
        let Ok((dir, name)) = root.parent(&c.path) else { continue };
        let Ok(st) = rustix::fs::statat(&*dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) else { continue };
        if st.st_size as u64 != new.size || manifest::Kind::from_mode(st.st_mode) != Some(manifest::Kind::File) {
            continue;
        }
        let ns = manifest::scan::stamp_ns;
        known.push((
            (st.st_dev, st.st_ino),
            (new.size, ns(st.st_mtime, st.st_mtime_nsec as i64), ns(st.st_ctime, st.st_ctime_nsec as i64)),
            hash,
        ));
    }
    if known.is_empty() {
        return;
    }
    let n = known.len();
    let mut cache = manifest::hash_index::HashIndex::load(path);
    cache.insert_known(known);
    match cache.save(path) {
        Ok(()) => opts.throttle.write.charge(std::fs::metadata(path).map_or(0, |m| m.len())),
        Err(e) => tracing::warn!(path = %path.display(), "cannot save the host index: {e}"),
    }
    tracing::debug!(files = n, secs = t.elapsed().as_secs_f64(), "host index: written files recorded");
}

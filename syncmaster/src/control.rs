//! The fleet's targets and rollouts, live: which version each host should converge to, the
//! rollout that moves hosts to a new version wave by wave, and the operator's pause, resume
//! and abort. Decisions come from the pure engine ([`crate::rollout`]); this module persists
//! each one ([`crate::store`]) before it tells any host, through [`Control::subscribe`].
//!
//! A host's target is its own (set by a grant or a rollback) or else the fleet's *baseline*:
//! the version the last completed rollout delivered. With no `[rollout]` policy, every new
//! version becomes the baseline at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use proto::v1 as pb;
use tokio::sync::watch;

use crate::fleet::{now_ms, Fleet, Snapshot};
use crate::image::Image;
use crate::inventory::Inventory;
use crate::policy::Policy;
use crate::publish::{Published, Versions};
use crate::rollout::{self, GrantState, Rollout, State};
use crate::store::{Change, EventRow, Store, Target, VersionRow};

struct Inner {
    store: Store,
    baseline: u64,
    targets: BTreeMap<String, Target>,
    versions: BTreeMap<u64, VersionRow>,
    rollout: Option<Rollout>,
}

/// The fleet's baseline and own targets, as last committed.
type TargetView = Arc<(u64, BTreeMap<String, Target>)>;

pub struct Control {
    inner: Mutex<Inner>,
    view: std::sync::RwLock<TargetView>,
    /// Bumped whenever some host's target changes; Watch streams re-read theirs.
    changed: watch::Sender<u64>,
    published: Arc<Published>,
    fleet: Arc<Fleet>,
    versions: Arc<Mutex<Versions>>,
    policy: Option<Policy>,
    hosts: Vec<String>,
}

/// An operator's request that cannot be done; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Rollout(#[from] rollout::ControlError),
    #[error("{0:#}")]
    Failed(anyhow::Error),
    #[error("{0}")]
    Usage(String),
}

struct View<'a> {
    fleet: &'a BTreeMap<String, Snapshot>,
    inner: &'a Inner,
}

impl rollout::Hosts for View<'_> {
    fn is_up(&self, host: &str) -> bool {
        self.fleet.get(host).is_some_and(|s| s.up)
    }

    fn report(&self, host: &str) -> Option<(&pb::PassResult, i64)> {
        let s = self.fleet.get(host)?;
        Some((s.last.as_ref()?, s.last_at_ms))
    }

    fn target(&self, host: &str) -> u64 {
        // A target a superseded rollout granted is not where an abort should lead back to.
        match self.inner.targets.get(host) {
            Some(t) if t.origin != 0 => t.origin,
            _ => self.inner.target_of(host),
        }
    }
}

impl Inner {
    /// Mirrors a committed change in memory (all but its rollout, which the caller owns).
    /// Returns whether some host's target may have moved.
    fn mirror(&mut self, c: Change) -> bool {
        for v in c.versions {
            self.versions.insert(v.version, v);
        }
        let retarget = !c.set_targets.is_empty() || c.baseline.is_some();
        for (h, t) in c.set_targets {
            self.targets.insert(h, t);
        }
        for h in &c.clear_targets {
            self.targets.remove(h);
        }
        if let Some(b) = c.baseline {
            self.baseline = b;
        }
        retarget
    }

    fn target_of(&self, host: &str) -> u64 {
        self.targets.get(host).map_or(self.baseline, |t| t.version)
    }

    /// Versions that must stay servable: the baseline, every target, and the active rollout's.
    fn needed(&self) -> BTreeSet<u64> {
        let mut keep: BTreeSet<u64> = self.targets.values().map(|t| t.version).collect();
        keep.insert(self.baseline);
        // And what an abort of the newest rollout would need: the versions its hosts had before.
        if let Some(r) = self.rollout.as_ref().filter(|r| r.state.is_active() || r.state == State::Completed) {
            keep.insert(r.version);
            keep.insert(r.from_version);
            keep.extend(r.grants.values().map(|g| g.from_version));
        }
        keep.remove(&0);
        keep
    }

    fn event(&self, kind: &str, host: &str, wave: Option<usize>, detail: String, caller: &str) -> EventRow {
        let (rollout, version) = self.rollout.as_ref().map_or((0, 0), |r| (r.id, r.version));
        EventRow {
            at_ms: now_ms(),
            rollout,
            kind: kind.into(),
            host: host.into(),
            version,
            wave,
            detail,
            caller: caller.into(),
        }
    }
}

fn event_rows(r: &Rollout, events: &[rollout::Event], at_ms: i64, caller: &str) -> Vec<EventRow> {
    events
        .iter()
        .map(|e| EventRow {
            at_ms,
            rollout: r.id,
            kind: e.kind.into(),
            host: e.host.clone(),
            version: r.version,
            wave: e.wave,
            detail: e.detail.clone(),
            caller: caller.into(),
        })
        .collect()
}

impl Control {
    /// Loads the state database and serves `current` (the newest scan): the versions hosts
    /// still target are scanned again from where they were published, a rollout under way goes
    /// on from where it was, and `current`, if new, is published (starting a rollout).
    pub fn open(
        store: Store,
        published: Arc<Published>,
        fleet: Arc<Fleet>,
        versions: Arc<Mutex<Versions>>,
        inventory: &Inventory,
    ) -> anyhow::Result<Arc<Control>> {
        let baseline = store.baseline()?;
        let targets = store.targets()?;
        let version_rows = store.versions()?;
        let rollout = store.latest_rollout()?;
        for (r, at) in store.reports()? {
            fleet.restore(r, at);
        }
        let view = std::sync::RwLock::new(Arc::new((baseline, targets.clone())));
        let inner = Inner { store, baseline, targets, versions: version_rows, rollout };
        let control = Arc::new(Control {
            inner: Mutex::new(inner),
            view,
            changed: watch::Sender::new(0),
            published: published.clone(),
            fleet,
            versions,
            policy: inventory.policy.clone(),
            hosts: inventory.hosts(),
        });
        control.load_needed()?;
        let current = published.current();
        control.record_publish(control.lock(), current)?;
        let mut i = control.lock();
        let detail = match &i.rollout {
            Some(r) if r.state.is_active() => format!(
                "resuming rollout #{} (v{}, {}) in wave {} ({}); {} host(s) granted, {} in progress",
                r.id,
                r.version,
                r.state.as_str(),
                r.current_wave,
                r.policy.waves.get(r.current_wave).map_or("-", |w| w.name.as_str()),
                r.grants.values().filter(|g| g.state != GrantState::Skipped).count(),
                r.in_progress()
            ),
            _ => format!("baseline v{}; no rollout under way", i.baseline),
        };
        tracing::info!("{detail}");
        let ev = i.event("master-started", "", i.rollout.as_ref().map(|r| r.current_wave), detail, "");
        i.store.commit(&Change { events: vec![ev], ..Default::default() })?;
        drop(i);
        Ok(control)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("control lock")
    }

    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    pub fn has_policy(&self) -> bool {
        self.policy.is_some()
    }

    /// Scans again, from where they were published, the versions hosts still target.
    fn load_needed(&self) -> anyhow::Result<()> {
        let i = self.lock();
        let current = self.published.current().manifest.version;
        let needed: Vec<u64> = i.needed().into_iter().filter(|v| *v != current && *v != 0).collect();
        let rows = i.versions.clone();
        drop(i);
        let mut by_source: BTreeMap<u64, Arc<Image>> = BTreeMap::new();
        for v in needed {
            let Some(row) = rows.get(&v) else {
                tracing::error!(version = v, "a host targets version {v}, which the state database does not know");
                continue;
            };
            let original = row.rollback_of.unwrap_or(v);
            let orig_row = rows.get(&original).unwrap_or(row);
            let image = match by_source.get(&original) {
                Some(img) => img.clone(),
                None => {
                    let scanned = self.versions.lock().expect("versions lock").rescan(
                        &orig_row.source,
                        original,
                        &orig_row.identity,
                    );
                    match scanned {
                        Ok(img) => {
                            let img = Arc::new(img);
                            by_source.insert(original, img.clone());
                            img
                        }
                        Err(e) => {
                            tracing::error!("{e:#}");
                            continue;
                        }
                    }
                }
            };
            tracing::info!(version = v, source = %orig_row.source.display(), "serving a version hosts still target");
            self.published.insert(image.renumbered(v));
        }
        Ok(())
    }

    /// Publishes a newly scanned image (from `IMAGES/current`).
    pub fn publish(&self, image: Image) -> anyhow::Result<()> {
        let i = self.lock();
        let mut image = image;
        let v = image.manifest.version;
        let highest = i.versions.keys().next_back().copied().unwrap_or(0);
        if !i.versions.contains_key(&v) && v <= highest {
            // An abort numbered a rollback while this tree was being scanned: the new version
            // must be above it, or the hosts rolled back would refuse it as a downgrade.
            let nv = self.versions.lock().expect("versions lock").renumber_current(highest)?;
            tracing::warn!(scanned_as = v, version = nv, "a rollback took numbers meanwhile; publishing as v{nv}");
            image = image.renumbered(nv);
        }
        let image = self.published.publish(image);
        self.record_publish(i, image)
    }

    /// Records `image` (already served) as published: the baseline for a first version or
    /// without a policy, else the start of a rollout. A version already recorded (a restart)
    /// changes nothing.
    fn record_publish(&self, mut i: std::sync::MutexGuard<'_, Inner>, image: Arc<Image>) -> anyhow::Result<()> {
        let v = image.manifest.version;
        let now = now_ms();
        if let Some(row) = i.versions.get(&v) {
            if row.identity != image.identity.to_hex() {
                anyhow::bail!(
                    "version {v} is recorded with identity {} but the tree scanned as {} (hint: the state database and version.json disagree; restore both from one backup)",
                    row.identity,
                    image.identity
                );
            }
            drop(i);
            self.settle();
            return Ok(());
        }
        let row = VersionRow {
            version: v,
            identity: image.identity.to_hex(),
            source: image.root.clone(),
            rollback_of: None,
            published_ms: now,
        };
        let mut c = Change { versions: vec![row], ..Default::default() };
        let mut new_rollout = None;
        let mut superseded = None;
        let outside =
            |kind: &str, detail: String| EventRow { rollout: 0, version: v, ..i.event(kind, "", None, detail, "") };
        let mut events = vec![outside("publish", format!("v{v} from {}", image.root.display()))];
        match (&self.policy, i.baseline) {
            (Some(policy), b) if b != 0 => {
                if let Some(mut old) = i.rollout.clone().filter(|r| r.state.is_active()) {
                    old.state = State::Superseded;
                    old.ended_ms = now;
                    events.push(EventRow {
                        rollout: old.id,
                        version: old.version,
                        ..i.event(
                            "superseded",
                            "",
                            None,
                            format!("by v{v}; hosts it granted keep v{} until granted v{v}", old.version),
                            "",
                        )
                    });
                    superseded = Some(old);
                }
                let id = i.store.max_rollout_id()? + 1;
                let (r, ev) = Rollout::start(id, v, image.identity.0, b, policy.clone(), &self.hosts, now);
                events.extend(event_rows(&r, &ev, now, ""));
                new_rollout = Some(r);
            }
            _ => {
                c.baseline = Some(v);
                c.clear_targets = i.targets.keys().cloned().collect();
                let why =
                    if self.policy.is_none() { "no rollout policy: every host at once" } else { "the first version" };
                events.push(outside("baseline", format!("v{v}: {why}")));
            }
        }
        // The superseded rollout's row first, then the version with the new rollout: two
        // transactions. A crash between them leaves the old rollout superseded and the version
        // unrecorded, so the restarted master publishes it again and starts its rollout then.
        if let Some(old) = &superseded {
            i.store.commit(&Change { rollout: Some(old), ..Default::default() })?;
        }
        c.rollout = new_rollout.as_ref();
        c.events = events;
        i.store.commit(&c)?;
        i.mirror(c);
        if let Some(r) = new_rollout.or(superseded) {
            tracing::info!(rollout = r.id, version = r.version, state = r.state.as_str(), "rollout");
            i.rollout = Some(r);
        }
        self.wake(i, true);
        Ok(())
    }

    /// Runs the engine once and persists what it decided. Called on a timer and on reports.
    pub fn tick(&self) {
        let i = self.lock();
        self.step(i);
    }

    /// One engine step under the lock. The fleet is read after the lock is taken, and reports
    /// are recorded under it too, so every report is judged before the next one replaces it.
    fn step(&self, mut i: std::sync::MutexGuard<'_, Inner>) {
        // No rollout running (the common case): nothing to judge, and no copy of the fleet's
        // table on every report (which would cost O(hosts) per report, O(hosts²) per round).
        let Some(mut r) = i.rollout.clone().filter(|r| r.state.is_active()) else { return };
        let snap = self.fleet.snapshot();
        let now = now_ms();
        let events = rollout::step(&mut r, &View { fleet: &snap, inner: &i }, now);
        if events.is_empty() {
            return;
        }
        let mut c = Change { events: event_rows(&r, &events, now, ""), ..Default::default() };
        for e in &events {
            if e.host.is_empty() {
                continue;
            }
            if matches!(e.kind, "grant" | "skipped") {
                c.new_grants.push(e.host.clone());
            } else {
                c.changed_grants.push(e.host.clone());
            }
            if e.kind == "grant" {
                let wave = r.policy.waves.get(r.grants[&e.host].wave).map(|w| w.name.clone()).unwrap_or_default();
                let origin = r.grants[&e.host].from_version;
                c.set_targets
                    .push((e.host.clone(), Target { version: r.version, rollout: r.id, wave, since_ms: now, origin }));
            }
        }
        c.changed_grants.retain(|h| !c.new_grants.contains(h));
        c.changed_grants.dedup();
        if r.state == State::Completed {
            // The version is now everyone's: hosts follow the baseline again.
            c.baseline = Some(r.version);
            // Every own target goes: rollbacks of earlier rollouts, skipped hosts, hosts outside
            // every wave. Hosts that failed are on this version already.
            c.clear_targets = i.targets.keys().cloned().collect();
        }
        c.rollout = Some(&r);
        if let Err(e) = i.store.commit(&c) {
            // Nothing is announced that was not recorded: the next tick decides again.
            tracing::error!("rollout #{}: cannot record the engine's decisions, not acting on them: {e:#}", r.id);
            return;
        }
        for e in &events {
            tracing::info!(rollout = r.id, version = r.version, kind = e.kind, host = %e.host, wave = ?e.wave, "{}", e.detail);
        }
        let retarget = i.mirror(c);
        i.rollout = Some(r);
        self.wake(i, retarget);
    }

    /// A host reported a pass: keep it (it survives a restart) and let the engine judge it.
    pub fn report(&self, r: pb::PassResult) {
        let i = self.lock();
        let at = self.fleet.report(r.clone());
        if let Err(e) = i.store.save_report(&r, at) {
            tracing::error!(host = %r.host_id, "cannot record the pass report: {e:#}");
        }
        self.step(i);
    }

    /// Drops the images no host needs any more.
    fn settle(&self) {
        let keep = self.lock().needed();
        self.published.retain(&keep);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes every watching host's stream to look at its target again (after the inventory was
    /// reloaded: a host's rendered files, and so its identity, may have changed).
    pub fn poke(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// The image `host` should converge to now.
    pub fn image_for(&self, host: &str) -> Result<Arc<Image>, String> {
        let v = self.target_info(host).0;
        self.published.get(v).ok_or_else(|| {
            format!("version {v}, this host's target, is not loaded on the master (its tree changed or is gone; see the master's log)")
        })
    }

    /// `host`'s target version and the wave that granted it.
    pub fn target_info(&self, host: &str) -> (u64, String) {
        let view = self.view.read().expect("view lock").clone();
        match view.1.get(host) {
            Some(t) => (t.version, t.wave.clone()),
            None => (view.0, String::new()),
        }
    }

    pub fn baseline(&self) -> u64 {
        self.view.read().expect("view lock").0
    }

    /// After a commit: publishes the targets to readers, wakes the Watch streams when some
    /// host's target may have moved, and drops the images no host needs any more.
    fn wake(&self, i: std::sync::MutexGuard<'_, Inner>, retarget: bool) {
        self.refresh_view(&i);
        drop(i);
        if retarget {
            self.changed.send_modify(|g| *g += 1);
        }
        self.settle();
    }

    /// Publishes the targets to readers (Watch, GetManifest, status) that must never wait
    /// for the engine, which holds its lock across database writes.
    fn refresh_view(&self, i: &Inner) {
        *self.view.write().expect("view lock") = Arc::new((i.baseline, i.targets.clone()));
    }

    /// The fleet's status rows, each judged against its host's target.
    pub fn fleet_status(&self) -> pb::StatusReply {
        let img = self.published.current();
        // Copied out first: the fleet's lock is never taken inside this one's or the reverse.
        let view = self.view.read().expect("view lock").clone();
        let (baseline, targets) = (view.0, &view.1);
        let identities: BTreeMap<u64, Vec<u8>> = self
            .published
            .versions()
            .into_iter()
            .filter_map(|v| Some((v, self.published.get(v)?.identity.0.to_vec())))
            .collect();
        self.fleet.status(img.manifest.version, &img.identity.0, baseline, |host| {
            let (version, wave) = targets.get(host).map_or((baseline, String::new()), |t| (t.version, t.wave.clone()));
            let identity = identities.get(&version).cloned().unwrap_or_default();
            crate::fleet::TargetInfo { version, identity, wave }
        })
    }

    pub fn events(&self, after: u64, limit: u32) -> anyhow::Result<Vec<pb::RolloutEvent>> {
        self.lock().store.events(after, limit)
    }

    /// `pause`, `resume` or `abort` the newest rollout, for `caller`.
    pub fn operate(&self, action: &str, reason: &str, caller: &str) -> Result<(), ControlError> {
        let now = now_ms();
        let mut i = self.lock();
        let Some(mut r) = i.rollout.clone() else { return Err(rollout::ControlError::NoRollout.into()) };
        let note = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
        let mut c = Change::default();
        match action {
            "pause" | "resume" => {
                let e = if action == "pause" { rollout::pause(&mut r)? } else { rollout::resume(&mut r)? };
                let mut rows = event_rows(&r, &[e], now, caller);
                rows[0].detail.push_str(&note);
                c.events = rows;
                c.changed_grants = r.grants.keys().cloned().collect();
            }
            "abort" => {
                let was_completed = r.state == State::Completed;
                let back = rollout::abort(&mut r, now)?;
                // Each old version comes back under a new number (hosts refuse lower numbers).
                let mut olds: BTreeSet<u64> = back.iter().map(|(_, v)| *v).collect();
                if was_completed {
                    olds.insert(r.from_version);
                }
                let mut renumber = BTreeMap::new();
                let floor = i.versions.keys().next_back().copied().unwrap_or(0);
                for old in olds {
                    let Some(img) = self.published.get(old) else {
                        return Err(ControlError::Failed(anyhow::anyhow!(
                            "cannot roll back to v{old}: the master does not serve it any more (its tree changed or is gone); nothing changed (hint: publish that tree again as a new version)"
                        )));
                    };
                    renumber.insert(old, img);
                }
                let mut rows = event_rows(
                    &r,
                    &[rollout::Event {
                        kind: "aborted",
                        host: String::new(),
                        wave: Some(r.current_wave),
                        detail: format!("{} host(s) go back{note}", back.len()),
                    }],
                    now,
                    caller,
                );
                let mut new_versions = BTreeMap::new();
                for (old, img) in &renumber {
                    let v = self
                        .versions
                        .lock()
                        .expect("versions lock")
                        .allocate(floor.max(new_versions.values().copied().max().unwrap_or(0)))
                        .map_err(ControlError::Failed)?;
                    let src = i.versions.get(old).map(|row| (row.rollback_of.unwrap_or(*old), row.source.clone()));
                    let (orig, source) = src.unwrap_or((*old, img.root.clone()));
                    c.versions.push(VersionRow {
                        version: v,
                        identity: img.identity.to_hex(),
                        source,
                        rollback_of: Some(orig),
                        published_ms: now,
                    });
                    new_versions.insert(*old, v);
                    r.rollback_versions.push(v);
                }
                for (host, old) in &back {
                    let v = new_versions[old];
                    c.set_targets.push((
                        host.clone(),
                        Target { version: v, rollout: r.id, wave: "rollback".into(), since_ms: now, origin: 0 },
                    ));
                    rows.push(EventRow {
                        host: host.clone(),
                        kind: "retarget".into(),
                        detail: format!("back to v{old}'s tree as v{v}"),
                        ..rows[0].clone()
                    });
                }
                if was_completed {
                    let v = new_versions[&r.from_version];
                    c.baseline = Some(v);
                    rows.push(EventRow {
                        kind: "baseline".into(),
                        detail: format!("v{v} (v{}'s tree)", r.from_version),
                        ..rows[0].clone()
                    });
                }
                c.events = rows;
                c.changed_grants = back.iter().map(|(h, _)| h.clone()).collect();
                // Serve the re-numbered trees before any host is told of them.
                for (old, v) in &new_versions {
                    self.published.insert(renumber[old].renumbered(*v));
                }
            }
            other => {
                return Err(ControlError::Usage(format!("unknown action {other:?} (expected pause, resume or abort)")))
            }
        }
        c.rollout = Some(&r);
        i.store.commit(&c).map_err(ControlError::Failed)?;
        tracing::info!(rollout = r.id, version = r.version, action, caller, reason, "operator action");
        let retarget = i.mirror(c);
        i.rollout = Some(r);
        self.wake(i, retarget);
        self.tick();
        Ok(())
    }

    /// The newest rollout, for `syncmaster rollout status`.
    pub fn rollout_status(&self) -> pb::RolloutStatusReply {
        let now = now_ms();
        let i = self.lock();
        let rollout = i.rollout.as_ref().map(|r| {
            let waves = r
                .policy
                .waves
                .iter()
                .zip(&r.waves)
                .enumerate()
                .map(|(wi, (spec, w))| {
                    let state = if w.done_ms != 0 {
                        "done"
                    } else if w.soak_started_ms != 0 {
                        "soaking"
                    } else if wi == r.current_wave && r.state == State::Running {
                        "granting"
                    } else if wi == r.current_wave && r.state.is_active() {
                        r.state.as_str()
                    } else {
                        "pending"
                    };
                    pb::WaveStatus {
                        name: spec.name.clone(),
                        state: state.into(),
                        max_concurrent: spec.max_concurrent,
                        soak_until_unix_ms: if w.soak_started_ms != 0 {
                            w.soak_started_ms + spec.soak.as_millis() as i64
                        } else {
                            0
                        },
                        hosts: w
                            .hosts
                            .iter()
                            .map(|h| match r.grants.get(h) {
                                Some(g) => pb::HostGrant {
                                    host_id: h.clone(),
                                    state: g.state.as_str().into(),
                                    granted_unix_ms: g.granted_ms,
                                    reason: g.reason.clone(),
                                },
                                None => {
                                    pb::HostGrant { host_id: h.clone(), state: "waiting".into(), ..Default::default() }
                                }
                            })
                            .collect(),
                    }
                })
                .collect();
            // The halt's evidence stays with it whatever became of those hosts since (an abort
            // rolls them back, a resume acknowledges them).
            let evidence = |hosts: &[String]| {
                hosts
                    .iter()
                    .filter_map(|h| r.grants.get(h))
                    .map(|g| pb::HostFailure {
                        host_id: g.host.clone(),
                        wave: g.wave as u32,
                        reason: g.reason.clone(),
                        check: g.check.clone(),
                        output_tail: g.output_tail.clone(),
                        at_unix_ms: g.ended_ms,
                    })
                    .collect::<Vec<_>>()
            };
            pb::Rollout {
                id: r.id,
                version: r.version,
                from_version: r.from_version,
                state: r.state.as_str().into(),
                started_unix_ms: r.started_ms,
                ended_unix_ms: r.ended_ms,
                current_wave: r.current_wave as u32,
                waves,
                halt: r.halt.as_ref().map(|h| pb::Halt {
                    reason: h.reason.clone(),
                    at_unix_ms: h.at_ms,
                    failures: evidence(&h.hosts),
                }),
                in_window: r.policy.window.as_ref().is_none_or(|w| w.contains(now)),
                failures: r.failures().len() as u32,
                granted: r.grants.values().filter(|g| g.state != GrantState::Skipped).count() as u32,
                rollback_versions: r.rollback_versions.clone(),
            }
        });
        pb::RolloutStatusReply {
            rollout,
            baseline_version: i.baseline,
            now_unix_ms: now,
            has_policy: self.policy.is_some(),
        }
    }
}

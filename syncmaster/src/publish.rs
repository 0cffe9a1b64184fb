//! Image versions: scanning a stable tree, numbering versions so they only go up (across
//! restarts, via the state dir), and publishing a new version when `IMAGES/current` is flipped.
//!
//! Publishing is a symlink flip: build the new tree in a new directory, then
//! `ln -sfn v42 IMAGES/current.new && mv -T IMAGES/current.new IMAGES/current`. The master
//! notices within the poll interval, scans the target until two scans agree (a tree still
//! being written is never served), and announces the new version to every watching host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use manifest::hash_index::HashIndex;
use manifest::Hash;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::image::Image;

/// Versions kept servable after a newer one is published, for hosts still mid-pass.
const HISTORY: usize = 3;
/// Scans of a changing tree before giving up on it for this round.
const MAX_SCANS: usize = 10;

/// What the state dir remembers: the last published version and its identity.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionState {
    pub version: u64,
    pub identity: String,
    pub source: String,
    /// The highest number ever handed out, a rollback's included (which re-publishes an old
    /// tree under a new number without scanning `current`).
    #[serde(default)]
    pub highest: u64,
}

pub struct Versions {
    state_dir: Option<PathBuf>,
    state: VersionState,
    cache: HashIndex,
}

impl Versions {
    /// Loads the persisted version (if a state dir is given). `floor` is the lowest version to
    /// hand out (`--image-version`).
    pub fn open(state_dir: Option<&Path>, floor: u64) -> anyhow::Result<Versions> {
        let mut state = VersionState::default();
        let mut cache = HashIndex::default();
        if let Some(d) = state_dir {
            std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("cannot create state dir {}: {e}", d.display()))?;
            let p = d.join("version.json");
            match std::fs::read(&p) {
                Ok(b) => {
                    state = serde_json::from_slice(&b).map_err(|e| {
                        anyhow::anyhow!(
                            "{} is corrupt: {e} (hint: fix it; deleting it may reuse version numbers)",
                            p.display()
                        )
                    })?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("cannot read {}: {e}", p.display()),
            }
            let (loaded, problem) = HashIndex::load_checked(&d.join("hash-cache.bin"));
            if let Some(problem) = problem {
                tracing::warn!("hash cache: {problem}; every file will be hashed afresh");
            }
            cache = loaded;
        }
        if state.version < floor.saturating_sub(1) {
            state.version = floor.saturating_sub(1);
            state.identity.clear();
        }
        Ok(Versions { state_dir: state_dir.map(Path::to_owned), state, cache })
    }

    pub fn current(&self) -> &VersionState {
        &self.state
    }

    /// Scans `dir` until two consecutive scans agree, numbers it (the same number for the same
    /// tree, the next number for anything else) and persists the result.
    pub fn scan(&mut self, dir: &Path) -> anyhow::Result<Image> {
        let mut last: Option<Hash> = None;
        for _ in 0..MAX_SCANS {
            // Version 0 while scanning: the number is decided once the tree is known stable.
            let m = manifest::scan_image_cached(dir, 0, &mut self.cache)
                .map_err(|e| anyhow::anyhow!("cannot scan image {}: {e}", dir.display()))?;
            let id = m.identity();
            if last == Some(id) {
                let highest = self.state.version.max(self.state.highest);
                let version = if id.to_hex() == self.state.identity { self.state.version.max(1) } else { highest + 1 };
                let mut m = m;
                m.version = version;
                self.state = VersionState {
                    version,
                    identity: id.to_hex(),
                    source: dir.display().to_string(),
                    highest: highest.max(version),
                };
                self.persist()?;
                return Ok(Image::new(dir, m));
            }
            last = Some(id);
        }
        anyhow::bail!(
            "{} kept changing over {MAX_SCANS} scans; not publishing it (hint: publish a finished tree)",
            dir.display()
        )
    }

    /// A new version number, higher than any handed out (for a rollback), persisted before it
    /// is returned. `floor`: the highest number known elsewhere (the state database).
    pub fn allocate(&mut self, floor: u64) -> anyhow::Result<u64> {
        let v = self.state.version.max(self.state.highest).max(floor) + 1;
        self.state.highest = v;
        self.persist()?;
        Ok(v)
    }

    /// Gives the tree last scanned a new number above `floor` (a rollback took numbers while
    /// it was being scanned), persisted before it is returned.
    pub fn renumber_current(&mut self, floor: u64) -> anyhow::Result<u64> {
        let v = self.state.version.max(self.state.highest).max(floor) + 1;
        self.state.version = v;
        self.state.highest = v;
        self.persist()?;
        Ok(v)
    }

    /// Scans `dir` again as version `version`, which it was published as with `identity`
    /// (hex): a master restarting mid-rollout serves the versions its hosts still target.
    pub fn rescan(&mut self, dir: &Path, version: u64, identity: &str) -> anyhow::Result<Image> {
        let m = manifest::scan_image_cached(dir, version, &mut self.cache)
            .map_err(|e| anyhow::anyhow!("cannot scan {} (version {version}): {e}", dir.display()))?;
        let id = m.identity();
        if id.to_hex() != identity {
            anyhow::bail!(
                "{} changed since it was published as version {version} (identity {identity}, now {id}); hosts that target version {version} cannot be served (hint: restore that tree, or publish a new version)",
                dir.display()
            );
        }
        Ok(Image::new(dir, m))
    }

    fn persist(&self) -> anyhow::Result<()> {
        let Some(d) = &self.state_dir else { return Ok(()) };
        let p = d.join("version.json");
        let tmp = d.join("version.json.tmp");
        let write = || -> std::io::Result<()> {
            let f = std::fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&f, &self.state)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(d)?.sync_all()
        };
        write().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
        if let Err(e) = self.cache.save(&d.join("hash-cache.bin")) {
            tracing::warn!("cannot save the hash cache in {}: {e}", d.display());
        }
        Ok(())
    }
}

/// The images this master serves: the newest published, every version some host targets, and
/// the few newest (still servable to hosts mid-pass). Keyed by version number.
pub struct Published {
    tx: watch::Sender<Arc<Image>>,
    images: Mutex<BTreeMap<u64, Arc<Image>>>,
    cache: Arc<crate::objcache::ObjectCache>,
}

impl Published {
    /// Serves `first`, compressing objects per request only.
    pub fn new(first: Image) -> Published {
        Published::with_cache(first, None)
    }

    /// Serves `first`; with `cache`, every published image's objects are compressed once in the
    /// background and stored (see [`crate::objcache`]).
    pub fn with_cache(first: Image, cache: Option<crate::objcache::CacheConfig>) -> Published {
        let first = Arc::new(first);
        let cache = Arc::new(crate::objcache::ObjectCache::new(cache));
        cache.fill(first.clone(), vec![first.clone()]);
        Published {
            tx: watch::Sender::new(first.clone()),
            images: Mutex::new(BTreeMap::from([(first.manifest.version, first)])),
            cache,
        }
    }

    pub fn cache(&self) -> &crate::objcache::ObjectCache {
        &self.cache
    }

    /// The newest published image.
    pub fn current(&self) -> Arc<Image> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Image>> {
        self.tx.subscribe()
    }

    /// Makes `image` the newest published image.
    pub fn publish(&self, image: Image) -> Arc<Image> {
        let image = self.insert(image);
        self.tx.send_replace(image.clone());
        image
    }

    /// Serves `image` too (an older version a host targets, or a rollback's re-numbered tree),
    /// without making it the newest.
    pub fn insert(&self, image: Image) -> Arc<Image> {
        let image = Arc::new(image);
        let mut m = self.images.lock().expect("images lock");
        m.insert(image.manifest.version, image.clone());
        let keep: Vec<Arc<Image>> = m.values().rev().cloned().collect();
        drop(m);
        self.cache.fill(image.clone(), keep);
        image
    }

    /// Version `version`, if this master serves it.
    pub fn get(&self, version: u64) -> Option<Arc<Image>> {
        self.images.lock().expect("images lock").get(&version).cloned()
    }

    /// The versions served now.
    pub fn versions(&self) -> Vec<u64> {
        self.images.lock().expect("images lock").keys().copied().collect()
    }

    /// Stops serving every version but `keep`, the newest published and the [`HISTORY`] highest.
    pub fn retain(&self, keep: &std::collections::BTreeSet<u64>) {
        let newest = self.current().manifest.version;
        let mut m = self.images.lock().expect("images lock");
        let recent: Vec<u64> = m.keys().rev().take(HISTORY).copied().collect();
        m.retain(|v, _| keep.contains(v) || *v == newest || recent.contains(v));
    }

    /// The newest served image that has content `hash`.
    pub fn find_object(&self, hash: &Hash) -> Option<(Arc<Image>, manifest::RelPath)> {
        let m = self.images.lock().expect("images lock");
        m.values().rev().find_map(|img| img.object_path(hash).map(|p| (img.clone(), p.clone())))
    }
}

/// Watches `images/current` and publishes each new target. Runs until the task is dropped.
/// With `store`, a new version's objects are all uploaded to it before the version is
/// published; a failed upload leaves the version unpublished, and the next poll tries again.
pub async fn watch_current(
    images: PathBuf,
    control: Arc<crate::control::Control>,
    versions: Arc<Mutex<Versions>>,
    every: Duration,
    store: Option<Arc<crate::objstore::ObjectStoreTarget>>,
    renders: Arc<crate::render::Renders>,
) {
    let published = control.published().clone();
    let link = images.join("current");
    let mut last_target = std::fs::read_link(&link).ok();
    // A target refused for its templates, and the render data it was refused under: not
    // scanned again until one of them changes.
    let mut refused: Option<(PathBuf, u64)> = None;
    loop {
        tokio::time::sleep(every).await;
        let target = match std::fs::read_link(&link) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(link = %link.display(), "cannot read the current-version link: {e}");
                continue;
            }
        };
        if Some(&target) == last_target.as_ref() || refused == Some((target.clone(), renders.serial())) {
            continue;
        }
        let dir = images.join(&target);
        let versions = versions.clone();
        let scanned = tokio::task::spawn_blocking(move || versions.lock().expect("versions lock").scan(&dir)).await;
        match scanned {
            Ok(Ok(mut image)) => {
                let same = image.identity == published.current().identity;
                // Templates that cannot be used refuse the version (the hosts stay where they are).
                if let Err(e) = renders.check_image(&image) {
                    tracing::error!(
                        "not publishing {} (version {}): {e} (fix it, then flip current again or reload the inventory with SIGHUP)",
                        target.display(),
                        image.manifest.version
                    );
                    refused = Some((target, renders.serial()));
                    continue;
                }
                if let (false, Some(store)) = (same, &store) {
                    let shared = Arc::new(image);
                    // Deltas are made against the version hosts are on now.
                    if let Err(e) = store.upload(&shared, Some(&published.current())).await {
                        tracing::error!(
                            "not publishing {} (version {}) until its objects are in the object store: {e:#}",
                            target.display(),
                            shared.manifest.version
                        );
                        continue;
                    }
                    image = Arc::try_unwrap(shared).unwrap_or_else(|a| a.renumbered(a.manifest.version));
                }
                tracing::info!(
                    version = image.manifest.version,
                    target = %target.display(),
                    entries = image.manifest.entries.len(),
                    "{}", if same { "current points to an identical tree; version unchanged" } else { "published a new version" }
                );
                if !same {
                    if let Err(e) = control.publish(image) {
                        tracing::error!("not publishing {}: {e:#}", target.display());
                        continue;
                    }
                    // Every host's files rendered now, so a failing one is logged at once.
                    let (renders, current) = (renders.clone(), published.current());
                    tokio::task::spawn_blocking(move || renders.prerender(&current));
                }
                last_target = Some(target);
            }
            Ok(Err(e)) => tracing::error!("not publishing {}: {e:#}", target.display()),
            Err(e) => tracing::error!("scan task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_go_up_and_survive_a_restart() {
        let state = tempfile::tempdir().unwrap();
        let img = tempfile::tempdir().unwrap();
        std::fs::write(img.path().join("a"), b"1").unwrap();
        let mut v = Versions::open(Some(state.path()), 1).unwrap();
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 1);
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 1, "the same tree keeps its number");
        std::fs::write(img.path().join("a"), b"2").unwrap();
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 2);
        drop(v);
        let mut v = Versions::open(Some(state.path()), 1).unwrap();
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 2, "a restart keeps the number");
        std::fs::write(img.path().join("b"), b"new").unwrap();
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 3);
    }

    #[test]
    fn the_floor_raises_the_first_version() {
        let img = tempfile::tempdir().unwrap();
        let mut v = Versions::open(None, 7).unwrap();
        assert_eq!(v.scan(img.path()).unwrap().manifest.version, 7);
    }
}

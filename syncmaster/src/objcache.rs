//! Objects compressed once, for the whole fleet.
//!
//! Compressing on every request costs the master CPU per host (bookworm minbase: about 1.2 s of
//! one core per upgraded host at zstd level 3) and caps the level it can afford. Instead, once an
//! image is published, a background pool of low-priority threads compresses each of its objects
//! at a high level (`--cache-level`, 19 by default), and every host after that is served the
//! stored frame: no compression work per host, and fewer bytes on the wire. Until an object's
//! frame is ready (or when the cache is full), it is compressed on the fly as before.
//!
//! A frame is made from content that was read and checked against its hash; frames live in
//! memory, bounded by `--cache-size`, and objects no longer in any served image are dropped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use foldhash::HashMap;
use manifest::{Hash, Kind};
use rayon::prelude::*;

use crate::Image;

/// What to cache: the zstd level of stored frames and the most bytes they may take.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    pub level: i32,
    pub max_bytes: u64,
}

#[derive(Default)]
pub struct ObjectCache {
    config: Option<CacheConfig>,
    /// hash -> (uncompressed size, one zstd frame).
    frames: RwLock<HashMap<Hash, (u64, Bytes)>>,
    bytes: AtomicU64,
}

impl ObjectCache {
    pub fn new(config: Option<CacheConfig>) -> ObjectCache {
        ObjectCache { config: config.filter(|c| c.level > 0 && c.max_bytes > 0), ..ObjectCache::default() }
    }

    /// The stored frame of `hash`, with the object's size.
    pub fn get(&self, hash: &Hash) -> Option<(u64, Bytes)> {
        self.frames.read().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    /// Compresses, on a background pool, every object of `image` that has no frame yet, then
    /// drops frames of objects that no image in `keep` holds. Returns at once.
    pub fn fill(self: &Arc<Self>, image: Arc<Image>, keep: Vec<Arc<Image>>) {
        let Some(config) = self.config else { return };
        let cache = self.clone();
        let spawned = std::thread::Builder::new().name("object-cache".into()).spawn(move || {
            let t = Instant::now();
            let pool = rayon::ThreadPoolBuilder::new()
                .thread_name(|i| format!("object-cache-{i}"))
                // Serving hosts comes first: the pool runs at nice 10.
                .start_handler(|_| {
                    let _ = rustix::process::setpriority_process(None, 10);
                })
                .build();
            let Ok(pool) = pool else { return };
            let mut todo: Vec<(&Hash, &manifest::RelPath, u64)> = image
                .manifest
                .entries
                .iter()
                .filter(|e| e.kind == Kind::File && e.size >= crate::MIN_COMPRESS)
                .filter_map(|e| Some((e.hash.as_ref()?, &e.path, e.size)))
                .collect();
            todo.sort_unstable_by_key(|(h, _, _)| **h);
            todo.dedup_by_key(|(h, _, _)| **h);
            todo.retain(|(h, _, _)| cache.get(h).is_none());
            let raw: u64 = todo.iter().map(|(_, _, s)| s).sum();
            let (stored, skipped) = pool.install(|| {
                todo.par_iter()
                    .map(|(hash, rel, size)| match cache.compress(&image, hash, rel, *size, config) {
                        Ok(true) => (1u64, 0u64),
                        Ok(false) => (0, 0),
                        Err(e) => {
                            tracing::debug!(object = %hash, path = %rel, "not cached: {e}");
                            (0, 1)
                        }
                    })
                    .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
            });
            let live: HashSet<Hash> =
                keep.iter().flat_map(|i| i.manifest.entries.iter().filter_map(|e| e.hash)).collect();
            let mut frames = cache.frames.write().unwrap_or_else(|p| p.into_inner());
            frames.retain(|h, _| live.contains(h));
            let total: u64 = frames.values().map(|(_, f)| f.len() as u64).sum();
            cache.bytes.store(total, Ordering::Relaxed);
            tracing::info!(
                version = image.manifest.version,
                objects = stored,
                not_cached = skipped,
                raw_mib = raw / (1 << 20),
                cached_mib = total / (1 << 20),
                level = config.level,
                secs = t.elapsed().as_secs_f64(),
                "object cache ready"
            );
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the object cache thread: {e}; objects are compressed per request");
        }
    }

    /// Reads, checks and compresses one object. `Ok(false)`: not worth storing (no gain), or the
    /// cache is full.
    fn compress(
        &self,
        image: &Image,
        hash: &Hash,
        rel: &manifest::RelPath,
        size: u64,
        config: CacheConfig,
    ) -> std::io::Result<bool> {
        use std::io::Read;
        if self.bytes.load(Ordering::Relaxed) + size / 2 > config.max_bytes {
            return Ok(false);
        }
        let path = image.root.join(rel.as_path());
        let mut data = Vec::with_capacity(size as usize);
        manifest::scan::open_nofollow(&path)?.take(size + 1).read_to_end(&mut data)?;
        if data.len() as u64 != size || Hash::of(&data) != *hash {
            return Err(std::io::Error::other(format!("{} changed since the image was scanned", path.display())));
        }
        let frame = zstd::bulk::compress(&data, config.level)?;
        if frame.len() as u64 >= size {
            return Ok(false);
        }
        let len = frame.len() as u64;
        if self.bytes.fetch_add(len, Ordering::Relaxed) + len > config.max_bytes {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            return Ok(false);
        }
        self.frames.write().unwrap_or_else(|p| p.into_inner()).insert(*hash, (size, Bytes::from(frame)));
        Ok(true)
    }
}

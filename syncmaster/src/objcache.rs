//! Objects compressed once, for the whole fleet.
//!
//! Compressing on every request costs the master CPU per host (bookworm minbase: about 1.2 s of
//! one core per upgraded host at zstd level 3) and caps the level it can afford. Instead, once an
//! image is published, a background pool of low-priority threads compresses each of its objects
//! at a high level (`--cache-level`, 19 by default), and every host after that is served the
//! stored frame: no compression work per host, and fewer bytes on the wire. Until an object's
//! frame is ready (or when the cache is full), it is compressed on the fly as before. Objects
//! zstd cannot shrink by about 3% (already-compressed files: `.gz`, `.xz`, images) are
//! remembered as incompressible and sent raw: neither the master nor the host spends CPU on them.
//!
//! A frame is made from content that was read and checked against its hash; frames live in
//! memory, bounded by `--cache-size`, and objects no longer in any served image are dropped.
//!
//! Deltas: when an image is published over an earlier one, each object that is new in it is
//! also compressed with its base in the previous image as the zstd dictionary (see
//! [`manifest::delta`] for how the base is chosen; hosts choose it the same way). A host at the
//! previous image that offers that base is sent the delta frame, when it is smaller than the
//! whole object's frame.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use foldhash::HashMap;
use manifest::{Hash, Kind};
use rayon::prelude::*;

use crate::image::Image;

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
    /// (hash, base hash) -> (uncompressed size, one zstd frame made against the base).
    deltas: RwLock<HashMap<(Hash, Hash), (u64, Bytes)>>,
    /// Objects zstd does not shrink by at least 1/[`MIN_GAIN`]: served raw, with no compression
    /// attempt per request (and no decode work on the host).
    incompressible: RwLock<HashSet<Hash>>,
    bytes: AtomicU64,
}

/// A frame is kept only if it saves at least 1/32 (about 3%) of the object; otherwise the
/// object is marked incompressible and sent raw.
const MIN_GAIN: u64 = 32;

/// One delta to make: the object (in the new image) and its base (in the previous one).
pub(crate) struct DeltaJob<'a> {
    pub hash: Hash,
    pub rel: &'a manifest::RelPath,
    pub size: u64,
    pub base: Hash,
    pub base_rel: &'a manifest::RelPath,
    pub base_size: u64,
}

impl ObjectCache {
    pub fn new(config: Option<CacheConfig>) -> ObjectCache {
        ObjectCache { config: config.filter(|c| c.level > 0 && c.max_bytes > 0), ..ObjectCache::default() }
    }

    /// Bytes of the frames kept.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The stored frame of `hash`, with the object's size.
    pub fn get(&self, hash: &Hash) -> Option<(u64, Bytes)> {
        self.frames.read().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }

    /// True if compressing `hash` was found not to pay: send it raw.
    pub fn is_incompressible(&self, hash: &Hash) -> bool {
        self.incompressible.read().unwrap_or_else(|p| p.into_inner()).contains(hash)
    }

    /// The stored delta frame of `hash` against `base`, with the object's size.
    pub fn get_delta(&self, hash: &Hash, base: &Hash) -> Option<(u64, Bytes)> {
        self.deltas.read().unwrap_or_else(|p| p.into_inner()).get(&(*hash, *base)).cloned()
    }

    /// Compresses, on a background pool, every object of `image` that has no frame yet and,
    /// against `keep[1]` (the image before it), a delta of every object new in `image`; then
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
                .filter(|e| e.kind == Kind::File && e.size >= crate::encode::MIN_COMPRESS)
                .filter_map(|e| Some((e.hash.as_ref()?, &e.path, e.size)))
                .collect();
            todo.sort_unstable_by_key(|(h, _, _)| **h);
            todo.dedup_by_key(|(h, _, _)| **h);
            todo.retain(|(h, _, _)| cache.get(h).is_none() && !cache.is_incompressible(h));
            let raw_bytes: u64 = todo.iter().map(|(_, _, s)| s).sum();
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
            let (mut deltas, mut delta_raw) = (0u64, 0u64);
            if let Some(prev) = keep.get(1).filter(|p| p.identity != image.identity) {
                let jobs = delta_jobs(&image, prev);
                delta_raw = jobs.iter().map(|j| j.size).sum();
                deltas = pool.install(|| {
                    jobs.par_iter()
                        .map(|j| match cache.compress_delta(&image, prev, j, config) {
                            Ok(stored) => u64::from(stored),
                            Err(e) => {
                                tracing::debug!(object = %j.hash, path = %j.rel, base = %j.base_rel, "no delta: {e}");
                                0
                            }
                        })
                        .sum()
                });
            }
            let live: HashSet<Hash> =
                keep.iter().flat_map(|i| i.manifest.entries.iter().filter_map(|e| e.hash)).collect();
            let mut frames = cache.frames.write().unwrap_or_else(|p| p.into_inner());
            frames.retain(|h, _| live.contains(h));
            let mut delta_frames = cache.deltas.write().unwrap_or_else(|p| p.into_inner());
            delta_frames.retain(|(h, b), _| live.contains(h) && live.contains(b));
            let mut raw = cache.incompressible.write().unwrap_or_else(|p| p.into_inner());
            raw.retain(|h| live.contains(h));
            let incompressible = raw.len();
            drop(raw);
            let total: u64 = frames.values().chain(delta_frames.values()).map(|(_, f)| f.len() as u64).sum();
            cache.bytes.store(total, Ordering::Relaxed);
            tracing::info!(
                version = image.manifest.version,
                objects = stored,
                deltas,
                delta_raw_mib = delta_raw / (1 << 20),
                not_cached = skipped,
                incompressible,
                raw_mib = raw_bytes / (1 << 20),
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

    /// Makes and stores the delta frame of one job, if it is smaller than the object's whole
    /// frame (or than the object, if it has none). `Ok(false)`: no gain, or the cache is full.
    fn compress_delta(&self, image: &Image, prev: &Image, j: &DeltaJob, config: CacheConfig) -> std::io::Result<bool> {
        if self.bytes.load(Ordering::Relaxed) + j.size / 4 > config.max_bytes {
            return Ok(false);
        }
        let data = read_checked(image, j.rel, j.size, &j.hash)?;
        let base = read_checked(prev, j.base_rel, j.base_size, &j.base)?;
        if !manifest::delta::raw_content_ok(&base) {
            return Ok(false);
        }
        let frame = delta_frame(&base, &data, config.level)?;
        let whole = self.get(&j.hash).map_or(j.size, |(_, f)| f.len() as u64);
        let len = frame.len() as u64;
        if len >= whole {
            return Ok(false);
        }
        if self.bytes.fetch_add(len, Ordering::Relaxed) + len > config.max_bytes {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            return Ok(false);
        }
        self.deltas.write().unwrap_or_else(|p| p.into_inner()).insert((j.hash, j.base), (j.size, Bytes::from(frame)));
        Ok(true)
    }

    /// Reads, checks and compresses one object. `Ok(false)`: not worth storing (less than
    /// 1/[`MIN_GAIN`] saved: then marked incompressible), or the cache is full.
    fn compress(
        &self,
        image: &Image,
        hash: &Hash,
        rel: &manifest::RelPath,
        size: u64,
        config: CacheConfig,
    ) -> std::io::Result<bool> {
        if self.bytes.load(Ordering::Relaxed) + size / 2 > config.max_bytes {
            return Ok(false);
        }
        let data = read_checked(image, rel, size, hash)?;
        let frame = zstd::bulk::compress(&data, config.level)?;
        if incompressible(frame.len() as u64, size) {
            self.incompressible.write().unwrap_or_else(|p| p.into_inner()).insert(*hash);
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

/// True if a `frame` of an object of `size` bytes saves less than 1/[`MIN_GAIN`]: the object is
/// sent (and stored) raw.
pub(crate) fn incompressible(frame: u64, size: u64) -> bool {
    frame.saturating_mul(MIN_GAIN) >= size.saturating_mul(MIN_GAIN - 1)
}

/// The content of `rel` in `image`, checked to be `size` bytes hashing to `hash`.
pub(crate) fn read_checked(image: &Image, rel: &manifest::RelPath, size: u64, hash: &Hash) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let path = image.root.join(rel.as_path());
    let mut data = Vec::with_capacity(size as usize);
    manifest::scan::open_nofollow(&path)?.take(size + 1).read_to_end(&mut data)?;
    if data.len() as u64 != size || Hash::of(&data) != *hash {
        return Err(std::io::Error::other(format!("{} changed since the image was scanned", path.display())));
    }
    Ok(data)
}

/// One zstd frame of `data` with `base` as its (raw content) dictionary, as `zstd --patch-from`
/// makes: the window spans base and data, and long-distance matching finds far matches.
pub fn delta_frame(base: &[u8], data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let window = manifest::delta::window_log(base.len() as u64, data.len() as u64);
    let mut cctx = long_cctx(level, window)?;
    cctx.load_dictionary(base).map_err(|c| zstd_err("dictionary", c))?;
    compress_with(&mut cctx, data)
}

/// A zstd error code as an I/O error naming the step that failed.
pub(crate) fn zstd_err(what: &str, code: usize) -> std::io::Error {
    std::io::Error::other(format!("zstd {what}: {}", zstd::zstd_safe::get_error_name(code)))
}

/// A compression context at `level` with a window of `2^window_log` bytes and long-distance
/// matching, as `zstd --patch-from --long` sets it up (the delta and solid frames).
pub(crate) fn long_cctx(level: i32, window_log: u32) -> std::io::Result<zstd::zstd_safe::CCtx<'static>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(|c| zstd_err("level", c))?;
    cctx.set_parameter(CParameter::WindowLog(window_log)).map_err(|c| zstd_err("window", c))?;
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true)).map_err(|c| zstd_err("long matching", c))?;
    Ok(cctx)
}

/// `data` as one frame from `cctx`.
pub(crate) fn compress_with(cctx: &mut zstd::zstd_safe::CCtx<'_>, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(|c| zstd_err("compression", c))?;
    Ok(out)
}

/// The deltas to make for `image` over `prev`: for each object new in `image`, its base in
/// `prev` as [`manifest::delta::choose`] picks it (hosts at `prev` pick the same).
pub(crate) fn delta_jobs<'a>(image: &'a Image, prev: &'a Image) -> Vec<DeltaJob<'a>> {
    upgrade_objects(image, prev)
        .into_iter()
        .filter_map(|(hash, rel, size, base)| {
            // A large object's base is the solid delta's alone.
            let (base, base_rel, base_size) = base.filter(|(_, _, s)| manifest::delta::usable(size, *s))?;
            Some(DeltaJob { hash, rel, size, base, base_rel, base_size })
        })
        .collect()
}

/// An object new in an image, where it lies, its size and its base in the previous image.
pub(crate) type NewObject<'a> = (Hash, &'a manifest::RelPath, u64, Option<(Hash, &'a manifest::RelPath, u64)>);

/// Every object of `image` that `prev` lacks, once, in `image`'s path order, with its base in
/// `prev` as [`manifest::delta::choose`] picks it, or for an object too large for a per-object
/// delta, [`manifest::delta::choose_large`] (the solid delta's), if any.
pub(crate) fn upgrade_objects<'a>(image: &'a Image, prev: &'a Image) -> Vec<NewObject<'a>> {
    use manifest::delta::{choose, choose_large, Candidate, Gone};
    let file = |e: &'a manifest::Entry| match (e.kind, e.hash) {
        (Kind::File, Some(hash)) => Some(Candidate { path: &e.path, size: e.size, hash }),
        _ => None,
    };
    let gone = Gone::new(
        prev.manifest
            .entries
            .iter()
            .filter_map(file)
            .filter(|c| image.manifest.get(c.path).is_none_or(|e| e.kind != Kind::File)),
    );
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for e in &image.manifest.entries {
        let Some(new) = file(e) else { continue };
        if prev.object_path(&new.hash).is_some() || !seen.insert(new.hash) {
            continue;
        }
        let same = prev.manifest.get(&e.path).and_then(file);
        let base = choose(&e.path, e.size, &new.hash, same, &gone)
            .or_else(|| choose_large(&e.path, e.size, &new.hash, same, &gone))
            .map(|b| (b.hash, b.path, b.size));
        out.push((new.hash, &e.path, e.size, base));
    }
    out
}

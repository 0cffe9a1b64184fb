//! Deltas in the object store (issue 25, parts 1 and 3): what a version's upload adds, over
//! the version before it, once its objects are stored.
//!
//! - **Per-object deltas**, `deltas/<ab>/<hex>-<base hex>.zst`: for each object new in the
//!   version, the zstd frame made against its base in the previous version, exactly as the
//!   object cache makes it ([`crate::objcache::delta_frame`], the base chosen by
//!   [`manifest::delta::choose`], as hosts choose it), kept only when it saves at least 1/32 of
//!   the object as stored (a host that finds no delta GETs the whole object).
//! - **One solid delta**, `solid/<new identity hex>/index` and `solid/<hex>/<n>.zst`: every new
//!   object in path order, cut into segments ([`manifest::solid`]), each one zstd frame with
//!   its objects' bases as a raw-content prefix (`zstd --patch-from`), at the store's level with
//!   long-distance matching. The index is put last, so an index in the store means its
//!   segments are there.
//!
//! Every put is create-only; a listing of `deltas/` (and a HEAD of the index) before any work
//! skips what an earlier attempt stored, so a restart puts nothing twice.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use foldhash::HashMap;
use futures_util::stream::{StreamExt, TryStreamExt};
use manifest::solid::{self, Index, New};
use manifest::Hash;
use object_store::ObjectStoreExt;

use crate::image::Image;
use crate::objcache::{compress_with, delta_frame, delta_jobs, long_cctx, read_checked, upgrade_objects, zstd_err};
use crate::objstore::ObjectStoreTarget;

/// A delta is stored when it saves at least 1/`MIN_GAIN` of the object as stored.
const MIN_GAIN: u64 = 32;

/// What the per-object delta upload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaSummary {
    /// Objects new in the version with a base in the previous one.
    pub candidates: u64,
    pub uploaded: u64,
    /// Stored by an earlier attempt.
    pub present: u64,
    /// Not worth storing (or its base or object unreadable).
    pub skipped: u64,
    pub bytes: u64,
}

/// What the solid delta upload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SolidSummary {
    pub segments: u64,
    pub objects: u64,
    /// Bytes of new content in the segments, and of their frames.
    pub content: u64,
    pub bytes: u64,
    /// The index was in the store already.
    pub present: bool,
}

/// Stores the delta of every object new in `image` against its base in `prev`. `stored`: the
/// size each object takes in the store.
pub async fn upload_deltas(
    t: &ObjectStoreTarget,
    image: &Arc<Image>,
    prev: &Arc<Image>,
    stored: &std::collections::HashMap<Hash, u64>,
) -> anyhow::Result<DeltaSummary> {
    let started = Instant::now();
    let jobs: Vec<_> = delta_jobs(image, prev)
        .into_iter()
        .map(|j| (j.hash, j.rel.clone(), j.size, j.base, j.base_rel.clone(), j.base_size))
        .collect();
    let candidates = jobs.len() as u64;
    let present = present_deltas(t).await?;
    let todo: Vec<_> = jobs.into_iter().filter(|j| !present.contains(&(j.0, j.3))).collect();
    let already = candidates - todo.len() as u64;
    let (uploaded, skipped, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    futures_util::stream::iter(todo)
        .map(|(hash, rel, size, base, base_rel, base_size)| {
            let (image, prev, level) = (image.clone(), prev.clone(), t.level);
            let whole = stored.get(&hash).copied().unwrap_or(size);
            let (uploaded, skipped, bytes) = (&uploaded, &skipped, &bytes);
            async move {
                let made = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Vec<u8>>> {
                    let data = read_checked(&image, &rel, size, &hash)?;
                    let b = read_checked(&prev, &base_rel, base_size, &base)?;
                    if !manifest::delta::raw_content_ok(&b) {
                        return Ok(None);
                    }
                    let frame = delta_frame(&b, &data, level)?;
                    let worth = (frame.len() as u64).saturating_mul(MIN_GAIN) < whole.saturating_mul(MIN_GAIN - 1);
                    Ok(worth.then_some(frame))
                })
                .await?;
                let frame = match made {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        skipped.fetch_add(1, Ordering::Relaxed);
                        return anyhow::Ok(());
                    }
                    Err(e) => {
                        // The whole object is in the store: a missing delta costs bytes, not
                        // correctness.
                        tracing::warn!(object = %hash, base = %base, "object store: no delta made: {e}");
                        skipped.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                };
                let key = t.keys.delta_key(&hash.to_hex(), &base.to_hex());
                let len = frame.len() as u64;
                if t.put_once(&key, frame).await? {
                    uploaded.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(len, Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .buffer_unordered(t.concurrency)
        .try_collect::<()>()
        .await?;
    let s = DeltaSummary {
        candidates,
        uploaded: uploaded.into_inner(),
        present: already,
        skipped: skipped.into_inner(),
        bytes: bytes.into_inner(),
    };
    tracing::info!(
        version = image.manifest.version,
        secs = started.elapsed().as_secs_f64(),
        "object store: version {} deltas against version {}: uploaded {}, already present {}, {} bytes put, {} not worth storing, of {} candidates",
        image.manifest.version,
        prev.manifest.version,
        s.uploaded,
        s.present,
        s.bytes,
        s.skipped,
        s.candidates
    );
    Ok(s)
}

/// The (object, base) pairs with a delta under `deltas/`.
async fn present_deltas(t: &ObjectStoreTarget) -> anyhow::Result<HashSet<(Hash, Hash)>> {
    let dir = t.keys.deltas();
    let mut out = HashSet::new();
    let mut list = t.store.list(Some(&dir));
    while let Some(meta) = list.next().await {
        let meta = meta.map_err(|e| anyhow::anyhow!("cannot list {dir} in {}: {e}", t.url()))?;
        let name = meta.location.filename().unwrap_or_default();
        let Some((h, b)) = name.strip_suffix(".zst").and_then(|n| n.split_once('-')) else { continue };
        if let (Some(h), Some(b)) = (Hash::from_hex(h), Hash::from_hex(b)) {
            out.insert((h, b));
        }
    }
    Ok(out)
}

/// Stores the solid delta from `prev` to `image`, unless its index is there already.
pub async fn upload_solid(
    t: &ObjectStoreTarget,
    image: &Arc<Image>,
    prev: &Arc<Image>,
) -> anyhow::Result<SolidSummary> {
    let started = Instant::now();
    let to = image.identity.to_hex();
    let index_key = t.keys.solid_index_key(&to);
    match t.store.head(&index_key).await {
        Ok(_) => return Ok(SolidSummary { present: true, ..SolidSummary::default() }),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => anyhow::bail!("cannot look up {index_key} in {}: {e}", t.url()),
    }
    let segments = {
        let objects = upgrade_objects(image, prev);
        solid::cut(objects.iter().map(|(hash, _, size, base)| New {
            hash: *hash,
            size: *size,
            base: base.map(|(h, p, s)| (p, h, s)),
        }))
    };
    if segments.is_empty() {
        return Ok(SolidSummary::default());
    }
    // Where each new object lies in the image: the segments name only hashes.
    let paths: HashMap<Hash, manifest::RelPath> =
        upgrade_objects(image, prev).into_iter().map(|(h, p, _, _)| (h, p.clone())).collect();
    let paths = Arc::new(paths);
    // Each segment holds its reference, content and frame in memory: as many at once as cores.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(t.concurrency);
    let sizes: Vec<u64> = futures_util::stream::iter(segments.iter().cloned().enumerate())
        .map(|(n, seg)| {
            let (image, prev, paths, level) = (image.clone(), prev.clone(), paths.clone(), t.level);
            let key = t.keys.solid_segment_key(&to, n);
            async move {
                let frame = tokio::task::spawn_blocking(move || segment_frame(&image, &prev, &paths, &seg, level))
                    .await?
                    .map_err(|e| anyhow::anyhow!("cannot make segment {key} of the solid delta: {e}"))?;
                let len = frame.len() as u64;
                t.put_once(&key, frame).await?;
                anyhow::Ok(len)
            }
        })
        .buffered(cpus)
        .try_collect()
        .await?;
    let mut index = Index { from: prev.identity, to: image.identity, segments };
    for (s, len) in index.segments.iter_mut().zip(&sizes) {
        s.bytes = *len;
    }
    let body = zstd::bulk::compress(&index.encode(), 19)?;
    t.put_once(&index_key, body).await?;
    let s = SolidSummary {
        segments: index.segments.len() as u64,
        objects: index.segments.iter().map(|s| s.objects.len() as u64).sum(),
        content: index.segments.iter().map(|s| s.content_bytes()).sum(),
        bytes: sizes.iter().sum(),
        present: false,
    };
    tracing::info!(
        version = image.manifest.version,
        secs = started.elapsed().as_secs_f64(),
        "object store: version {} solid delta from version {}: {} segments, {} objects, {} bytes of content in {} bytes",
        image.manifest.version,
        prev.manifest.version,
        s.segments,
        s.objects,
        s.content,
        s.bytes
    );
    Ok(s)
}

/// One segment's frame: its objects' contents from `image`, with its bases (read from `prev`,
/// each checked against its hash) as the prefix.
fn segment_frame(
    image: &Image,
    prev: &Image,
    paths: &HashMap<Hash, manifest::RelPath>,
    seg: &solid::Segment,
    level: i32,
) -> std::io::Result<Vec<u8>> {
    let mut reference = Vec::with_capacity(seg.reference_bytes() as usize);
    for b in &seg.bases {
        reference.extend_from_slice(&read_checked(prev, &b.path, b.size, &b.hash)?);
    }
    let mut content = Vec::with_capacity(seg.content_bytes() as usize);
    for o in &seg.objects {
        let rel =
            paths.get(&o.hash).ok_or_else(|| std::io::Error::other(format!("object {} not in the image", o.hash)))?;
        content.extend_from_slice(&read_checked(image, rel, o.size, &o.hash)?);
    }
    solid_frame(&reference, &content, seg.window_log(), level)
}

/// One zstd frame of `content` with `reference` as its raw-content prefix, as `zstd
/// --patch-from --long` makes it.
pub fn solid_frame(reference: &[u8], content: &[u8], window_log: u32, level: i32) -> std::io::Result<Vec<u8>> {
    use zstd::zstd_safe::CParameter;
    let mut cctx = long_cctx(level, window_log)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true)).map_err(|c| zstd_err("content size", c))?;
    cctx.ref_prefix(reference).map_err(|c| zstd_err("prefix", c))?;
    compress_with(&mut cctx, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_solid_frame_decodes_with_its_reference_only() {
        let reference: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let mut content = reference.clone();
        content[1000] ^= 0xff;
        content.extend_from_slice(b"appended");
        let frame = solid_frame(&reference, &content, 21, 19).unwrap();
        assert!(frame.len() < 200, "{} bytes: the reference is not used", frame.len());
        let mut d = zstd::zstd_safe::DCtx::create();
        d.ref_prefix(&reference).unwrap();
        let mut out = Vec::with_capacity(content.len() + 1);
        d.decompress(&mut out, &frame).unwrap();
        assert_eq!(out, content);
        let mut d = zstd::zstd_safe::DCtx::create();
        let mut out = Vec::with_capacity(content.len() + 1);
        assert!(d.decompress(&mut out, &frame).is_err() || out != content, "decodes without its reference");
    }
}

//! Packs of small objects (issue 25, part 3): after a version's loose objects are in the
//! store, its objects below `--pack-max-object` are also written into packs of about
//! `--pack-size`, and a pack index for the version (keyed by its manifest identity) is put
//! last, so a cold host reads a few hundred ranges instead of one GET per object. Format and
//! keys: [`objstore::pack`].
//!
//! - **Only what no pack holds yet.** The newest index in the store (by its time; the one of
//!   the version published before, normally) says which objects are packed already; its
//!   locations are reused as they are, and only the others are packed. Its packs must still be
//!   listed under `packs/`, or their objects are packed again.
//! - **Deterministic.** New objects are packed in the version's path order (each at its first
//!   path), a pack is cut once it reaches the pack size, and its name is the blake3 of its
//!   bytes. A master that stopped mid-upload and packs the same version again makes the same
//!   packs, finds them in the listing of `packs/`, and puts none of them twice.
//! - **Create-only**, as for loose objects; the index of a version is put after all its packs,
//!   and an index already there means the version is done.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::StreamExt;
use manifest::{Hash, Kind};
use object_store::path::Path as StorePath;
use object_store::ObjectStoreExt;
use objstore::pack::{self, Encoding, Location, PackIndex};

use super::ObjectStoreTarget;
use crate::image::Image;

/// `--pack-max-object` and `--pack-size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackConfig {
    /// Objects smaller than this go into packs.
    pub max_object: u64,
    /// A pack is cut once it holds this many bytes.
    pub pack_size: u64,
}

/// What packing one version did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackSummary {
    /// Objects in the version's index.
    pub indexed: u64,
    /// Of those, the ones already in a pack of an earlier version.
    pub reused: u64,
    /// Packs this version's new objects went into, and of those the ones put now (the others
    /// were in the store already: a restart).
    pub packs: u64,
    pub packs_put: u64,
    /// Bytes of the packs put.
    pub bytes: u64,
    /// Whether the index was there already (nothing else was done).
    pub index_present: bool,
}

impl ObjectStoreTarget {
    /// `PREFIX/packs`.
    fn packs_dir(&self) -> StorePath {
        self.packs.clone()
    }

    /// Packs the small objects of `image` and puts its index (see the module's documentation).
    pub(super) async fn upload_packs(&self, image: &Arc<Image>, cfg: PackConfig) -> anyhow::Result<PackSummary> {
        let t = Instant::now();
        let version = image.manifest.version;
        let index_key = pack::index_key(&self.packs_dir(), &image.identity.0);
        match self.store.head(&index_key).await {
            Ok(_) => {
                tracing::info!(version, "object store: pack index {index_key} already there");
                return Ok(PackSummary { index_present: true, ..PackSummary::default() });
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => anyhow::bail!("cannot look for {index_key} in {}: {e}", self.url),
        }
        let (present, base) = self.listing(&index_key).await?;
        // The version's small objects, each once, at its first path.
        let mut seen = HashSet::new();
        let mut reused = Vec::new();
        let mut todo = Vec::new();
        for e in &image.manifest.entries {
            let (Kind::File, Some(hash)) = (e.kind, e.hash) else { continue };
            if e.size >= cfg.max_object || !seen.insert(hash) {
                continue;
            }
            match base.as_ref().and_then(|b| b.get(&hash.0)).filter(|l| present.contains(&l.pack)) {
                Some(loc) => reused.push((hash.0, loc)),
                None => todo.push((hash, e.path.clone(), e.size)),
            }
        }
        let mut s = PackSummary { reused: reused.len() as u64, ..PackSummary::default() };
        let mut located = reused;
        // Encoded in parallel, in order; packs are cut and put as they fill.
        let mut encoded = futures_util::stream::iter(todo)
            .map(|(hash, rel, size)| {
                let (image, level) = (image.clone(), self.level);
                async move {
                    let r = tokio::task::spawn_blocking(move || super::encode(&image, &rel, size, &hash, level)).await;
                    (hash, r)
                }
            })
            .buffered(self.concurrency);
        let mut buf: Vec<u8> = Vec::new();
        let mut members: Vec<(Hash, u64, u32, Encoding)> = Vec::new();
        loop {
            let next = encoded.next().await;
            let done = next.is_none();
            if let Some((hash, r)) = next {
                let (raw, body) = r??;
                let encoding = if raw { Encoding::Raw } else { Encoding::Zstd };
                members.push((hash, buf.len() as u64, body.len() as u32, encoding));
                buf.extend_from_slice(&body);
                if (buf.len() as u64) < cfg.pack_size {
                    continue;
                }
            }
            if !members.is_empty() {
                let body = std::mem::take(&mut buf);
                let id = *blake3::hash(&body).as_bytes();
                s.packs += 1;
                let len = body.len() as u64;
                let key = pack::pack_key(&self.packs_dir(), &id);
                if !present.contains(&id) && self.put_once(&key, body).await? {
                    s.packs_put += 1;
                    s.bytes += len;
                }
                located.extend(
                    members
                        .drain(..)
                        .map(|(h, offset, length, encoding)| (h.0, Location { pack: id, offset, length, encoding })),
                );
            }
            if done {
                break;
            }
        }
        let index = PackIndex::build(located);
        s.indexed = index.len() as u64;
        self.put_once(&index_key, index.encode()).await?;
        tracing::info!(
            version,
            secs = t.elapsed().as_secs_f64(),
            "object store: version {version} packs: {} objects indexed ({} in earlier packs), {} packs, {} put ({} bytes), index {index_key}",
            s.indexed,
            s.reused,
            s.packs,
            s.packs_put,
            s.bytes,
        );
        Ok(s)
    }

    /// The packs under `packs/` (by hash) and the newest other index, if one can be read.
    async fn listing(&self, own: &StorePath) -> anyhow::Result<(HashSet<[u8; 32]>, Option<PackIndex>)> {
        let dir = self.packs_dir();
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| anyhow::anyhow!("cannot list {dir} in {}: {e}", self.url))?;
        let present: HashSet<[u8; 32]> = listed
            .objects
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".pack").and_then(Hash::from_hex).map(|h| h.0))
            .collect();
        let index_dir = dir.join("index");
        let mut newest: Option<object_store::ObjectMeta> = None;
        let mut list = self.store.list(Some(&index_dir));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| anyhow::anyhow!("cannot list {index_dir} in {}: {e}", self.url))?;
            if &meta.location == own || !meta.location.as_ref().ends_with(".idx") {
                continue;
            }
            if newest.as_ref().is_none_or(|n| (meta.last_modified, &meta.location) > (n.last_modified, &n.location)) {
                newest = Some(meta);
            }
        }
        let Some(meta) = newest else { return Ok((present, None)) };
        let key = meta.location;
        if meta.size > pack::MAX_INDEX_BYTES {
            tracing::warn!(
                "object store: {key} in {} is {} bytes, too large to read; packing every small object again",
                self.url,
                meta.size
            );
            return Ok((present, None));
        }
        let base = match self.store.get(&key).await {
            Ok(g) => match g.bytes().await {
                Ok(b) => PackIndex::decode(&b).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match base {
            Ok(b) => Ok((present, Some(b))),
            Err(e) => {
                tracing::warn!("object store: cannot read the previous pack index {key} in {}: {e}; packing every small object again (hint: remove it if it is damaged)", self.url);
                Ok((present, None))
            }
        }
    }
}

/// Objects' hashes and locations, by pack, for tests.
#[cfg(test)]
pub(super) fn by_pack(index: &PackIndex) -> std::collections::HashMap<[u8; 32], Vec<([u8; 32], Location)>> {
    let mut out: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
    for (h, l) in index.iter() {
        out.entry(l.pack).or_default().push((h, l));
    }
    out
}

//! Objects in an object store (issue 25, part 1): every object of a version is uploaded before
//! the version is announced.
//!
//! Layout, under the URL's prefix (`s3://bucket/PREFIX` or `file:///DIR`):
//!
//! ```text
//! objects/<first two hex digits>/<blake3 hex>.zst   one zstd frame of the content
//! objects/<first two hex digits>/<blake3 hex>.raw   the content itself
//! packs/<blake3 hex>.pack, packs/index/<identity>.idx  small objects again, in packs (see [`packs`])
//! ```
//!
//! An object is stored once, under one of the two names: `.raw` when it is smaller than 128 bytes
//! or zstd saves less than 1/32 of it (the master's "incompressible" rule, as on the wire),
//! `.zst` otherwise. A reader knows the encoding from the suffix and the uncompressed size from
//! the manifest entry (`size`); the content's blake3 is the hash in the name. Keys are
//! content-addressed, so an object is never rewritten: puts are create-only
//! ([`PutMode::Create`]; on S3, `If-None-Match: *`, which AWS S3 and s3s-fs 0.14 honour with
//! 412), and before any put the master lists `objects/` once to skip what is present, so a
//! restart puts nothing twice. A store that ignored `If-None-Match` could only be overwritten by
//! a concurrent writer between the listing and the put, with identical bytes.
//!
//! Files of at least the chunk threshold (`--chunk-threshold`) are stored as content-defined
//! chunks and a chunk index instead (see [`objstore::chunks`] and [`chunked`]).

mod chunked;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::stream::{StreamExt, TryStreamExt};
use manifest::{Hash, Kind};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::image::Image;

pub use objstore::OpenError;
pub use packs::{PackConfig, PackSummary};

mod packs;

/// Attempts per object before an upload (and so the publish) fails.
const ATTEMPTS: u32 = 5;

/// A store this master uploads objects to.
pub struct ObjectStoreTarget {
    url: String,
    pub(crate) store: Arc<dyn ObjectStore>,
    /// `PREFIX/objects`.
    objects: StorePath,
    /// `PREFIX/packs`.
    packs: StorePath,
    /// The opened store, for the keys of deltas ([`crate::storedelta`]).
    pub(crate) keys: objstore::Store,
    pub(crate) concurrency: usize,
    pub(crate) level: i32,
    /// Files this large and larger are chunked (0: none).
    chunk_threshold: u64,
    /// Small objects also go into packs (`--pack-max-object`, `--pack-size`); `None`: no packs.
    pack: Option<PackConfig>,
}

/// What one upload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub objects: u64,
    pub uploaded: u64,
    pub present: u64,
    /// Bytes put (compressed where compressed).
    pub bytes: u64,
    /// Of `objects`, the files stored as chunks (their index put or present).
    pub chunked: u64,
    /// Chunks of those files, and those put by this upload.
    pub chunks: u64,
    pub chunks_uploaded: u64,
    /// What packing did, when packs are on.
    pub packs: Option<PackSummary>,
    /// The deltas against the previous version.
    pub deltas: crate::storedelta::DeltaSummary,
    /// The solid delta from the previous version.
    pub solid: crate::storedelta::SolidSummary,
}

impl ObjectStoreTarget {
    /// Parses `url` (`s3://bucket/prefix`, `file:///dir`) into a store. Does not touch the network.
    pub fn new(url: &str, concurrency: usize, level: i32) -> Result<ObjectStoreTarget, OpenError> {
        let keys = objstore::Store::open(url, &objstore::Options::new("--object-store"))?;
        let (store, objects, packs) = (keys.store.clone(), keys.objects.clone(), keys.packs.clone());
        Ok(ObjectStoreTarget {
            url: url.to_owned(),
            store,
            objects,
            packs,
            keys,
            concurrency: concurrency.max(1),
            level,
            chunk_threshold: 0,
            pack: None,
        })
    }

    /// Stores files of at least `threshold` bytes as chunks (0: none).
    pub fn with_chunk_threshold(mut self, threshold: u64) -> ObjectStoreTarget {
        self.chunk_threshold = threshold;
        self
    }

    /// Also writes small objects into packs, with a pack index per version (`None`: no packs).
    pub fn with_packs(mut self, pack: Option<PackConfig>) -> ObjectStoreTarget {
        self.pack = pack;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Checks that the store answers and the bucket exists (one listing of `objects/`).
    pub async fn probe(&self) -> Result<(), OpenError> {
        match self.store.list_with_delimiter(Some(&self.objects)).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(OpenError::Unreachable(format!(
                "--object-store {}: the bucket does not exist (hint: create it, or fix the URL)",
                self.url
            ))),
            Err(e) if e.to_string().contains("NoSuchBucket") => Err(OpenError::Unreachable(format!(
                "--object-store {}: the bucket does not exist (hint: create it, or fix the URL): {e}",
                self.url
            ))),
            Err(e) => Err(OpenError::Unreachable(format!(
                "--object-store {}: the store is unreachable or refused the listing of {}: {e} (hint: check AWS_ENDPOINT_URL, AWS_REGION and the credentials)",
                self.url, self.objects
            ))),
        }
    }

    /// The key of `hash`, stored raw or as a zstd frame.
    pub fn key(&self, hash: &Hash, raw: bool) -> StorePath {
        let hex = hash.to_hex();
        self.objects.clone().join(&hex[..2]).join(format!("{hex}.{}", if raw { "raw" } else { "zst" }))
    }

    /// The hashes with an object under `objects/` (either encoding), with the stored size.
    async fn present(&self) -> anyhow::Result<HashMap<Hash, u64>> {
        let mut out = HashMap::new();
        let mut list = self.store.list(Some(&self.objects));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| anyhow::anyhow!("cannot list {} in {}: {e}", self.objects, self.url))?;
            let name = meta.location.filename().unwrap_or_default();
            let hex = name.strip_suffix(".zst").or_else(|| name.strip_suffix(".raw")).unwrap_or_default();
            if let Some(h) = Hash::from_hex(hex) {
                out.insert(h, meta.size);
            }
        }
        Ok(out)
    }

    /// Uploads every object of `image` the store lacks and, over `prev` (the version before
    /// it), its deltas and its solid delta ([`crate::storedelta`]); returns when all are in
    /// the store.
    pub async fn upload(&self, image: &Arc<Image>, prev: Option<&Arc<Image>>) -> anyhow::Result<Summary> {
        let t = Instant::now();
        let mut todo: Vec<(Hash, manifest::RelPath, u64)> = image
            .manifest
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| Some((e.hash?, e.path.clone(), e.size)))
            .collect();
        todo.sort_unstable_by_key(|(h, _, _)| *h);
        todo.dedup_by_key(|(h, _, _)| *h);
        let objects = todo.len() as u64;
        let present = self.present().await?;
        // Large files go as chunks and an index, whether or not they are also stored whole.
        let (large, mut todo): (Vec<_>, Vec<_>) =
            todo.into_iter().partition(|(_, _, size)| self.chunk_threshold > 0 && *size >= self.chunk_threshold);
        todo.retain(|(h, _, _)| !present.contains_key(h));
        // What each object takes in the store (as stored): a delta must save on it.
        let stored = Mutex::new(present);
        let already = objects - todo.len() as u64 - large.len() as u64;
        tracing::info!(
            version = image.manifest.version,
            objects,
            present = already,
            to_upload = todo.len(),
            "object store: uploading {}",
            self.url
        );
        let (uploaded, raced, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        futures_util::stream::iter(todo)
            .map(|(hash, rel, size)| {
                let image = image.clone();
                let (uploaded, raced, bytes, stored) = (&uploaded, &raced, &bytes, &stored);
                async move {
                    let (raw, body) = {
                        let level = self.level;
                        let image = image.clone();
                        let rel = rel.clone();
                        tokio::task::spawn_blocking(move || encode(&image, &rel, size, &hash, level)).await??
                    };
                    let key = self.key(&hash, raw);
                    let len = body.len() as u64;
                    stored.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, len);
                    if self.put_once(&key, body).await? {
                        uploaded.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(len, Ordering::Relaxed);
                    } else {
                        raced.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<()>()
            .await?;
        let mut s = Summary {
            objects,
            uploaded: uploaded.into_inner(),
            present: already + raced.into_inner(),
            bytes: bytes.into_inner(),
            ..Summary::default()
        };
        let stored = stored.into_inner().unwrap_or_else(|p| p.into_inner());
        // Large files after the small ones, one at a time, each file's chunks in parallel.
        self.upload_large(image, large, &stored, &mut s).await?;
        if let Some(prev) = prev.filter(|p| p.identity != image.identity) {
            s.deltas = crate::storedelta::upload_deltas(self, image, prev, &stored).await?;
            s.solid = crate::storedelta::upload_solid(self, image, prev).await?;
        }
        tracing::info!(
            version = image.manifest.version,
            secs = t.elapsed().as_secs_f64(),
            "object store: version {} uploaded {}, already present {}, {} bytes put, of {} objects; {} of them as chunks ({} chunks, {} put)",
            image.manifest.version,
            s.uploaded,
            s.present,
            s.bytes,
            s.objects,
            s.chunked,
            s.chunks,
            s.chunks_uploaded
        );
        // Packs after the loose objects, and the index last: a version is announced only once
        // its index is in the store too.
        if let Some(cfg) = self.pack {
            s.packs = Some(self.upload_packs(image, cfg).await?);
        }
        Ok(s)
    }

    /// Puts `body` at `key`, create-only, retrying transient errors with backoff. `Ok(false)`:
    /// the object was already there (another writer, or a retry of a put that had landed).
    pub(crate) async fn put_once(&self, key: &StorePath, body: Vec<u8>) -> anyhow::Result<bool> {
        let payload = PutPayload::from(body);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store.put_opts(key, payload.clone(), opts).await {
                Ok(_) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    return Ok(false)
                }
                Err(e) if attempt < ATTEMPTS && transient(&e) => {
                    tracing::warn!(key = %key, attempt, "object store: put failed, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    // A put that landed before its answer was lost is not made twice.
                    if self.store.head(key).await.is_ok() {
                        return Ok(false);
                    }
                }
                Err(e) => anyhow::bail!("cannot put {key} in {}: {e}", self.url),
            }
        }
        unreachable!("the last attempt returns")
    }
}

fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. } | object_store::Error::JoinError { .. })
}

/// The bytes to store for one object, read and checked against its hash: `(true, content)` when
/// stored raw, `(false, zstd frame)` otherwise.
fn encode(
    image: &Image,
    rel: &manifest::RelPath,
    size: u64,
    hash: &Hash,
    level: i32,
) -> std::io::Result<(bool, Vec<u8>)> {
    let data = crate::objcache::read_checked(image, rel, size, hash)?;
    encode_bytes(data, level)
}

/// `(true, data)` when `data` is stored raw, `(false, zstd frame)` otherwise.
fn encode_bytes(data: Vec<u8>, level: i32) -> std::io::Result<(bool, Vec<u8>)> {
    let size = data.len() as u64;
    if size < crate::encode::MIN_COMPRESS {
        return Ok((true, data));
    }
    let frame = zstd::bulk::compress(&data, level)?;
    if crate::objcache::incompressible(frame.len() as u64, size) {
        return Ok((true, data));
    }
    Ok((false, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &std::path::Path, version: u64) -> Arc<Image> {
        Arc::new(Image::scan(dir, version).unwrap())
    }

    #[tokio::test]
    async fn file_store_uploads_each_object_once_in_its_encoding() {
        let img = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        std::fs::write(img.path().join("small"), b"tiny").unwrap();
        std::fs::write(img.path().join("text"), "hello world\n".repeat(1000)).unwrap();
        std::fs::write(img.path().join("copy"), "hello world\n".repeat(1000)).unwrap();
        let mut noise = vec![0u8; 50_000];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        std::fs::write(img.path().join("noise"), &noise).unwrap();
        let url = format!("file://{}/", store_dir.path().display());
        let t = ObjectStoreTarget::new(&url, 4, 3).unwrap();
        t.probe().await.unwrap();
        let v1 = image(img.path(), 1);
        let s = t.upload(&v1, None).await.unwrap();
        assert_eq!((s.objects, s.uploaded, s.present), (3, 3, 0), "{s:?}");
        let check = |rel: &str, raw: bool| {
            let h = Hash::of(&std::fs::read(img.path().join(rel)).unwrap());
            let p = store_dir.path().join(t.key(&h, raw).as_ref());
            let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let content = if raw { b } else { zstd::decode_all(&b[..]).unwrap() };
            assert_eq!(Hash::of(&content), h, "{rel}");
        };
        check("small", true);
        check("text", false);
        check("noise", true);
        // Again (a restart): nothing is put.
        let s = t.upload(&v1, None).await.unwrap();
        assert_eq!((s.uploaded, s.present, s.bytes), (0, 3, 0), "{s:?}");
        // A new version sharing most objects: only the new one is put.
        std::fs::write(img.path().join("new"), "new content\n".repeat(100)).unwrap();
        let s = t.upload(&image(img.path(), 2), None).await.unwrap();
        assert_eq!((s.objects, s.uploaded, s.present), (4, 1, 3), "{s:?}");
        // Create-only: a put over an existing key is refused by the store, counted as present.
        let h = Hash::of(b"tiny");
        assert!(!t.put_once(&t.key(&h, true), b"other".to_vec()).await.unwrap());
        assert_eq!(std::fs::read(store_dir.path().join(t.key(&h, true).as_ref())).unwrap(), b"tiny");
    }

    #[tokio::test]
    async fn small_objects_go_into_packs_once_and_the_index_says_where() {
        let img = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(img.path().join(format!("f{i:02}")), format!("small file {i}\n").repeat(i + 1)).unwrap();
        }
        std::fs::write(img.path().join("dup"), "small file 0\n").unwrap();
        std::fs::write(img.path().join("large"), "large\n".repeat(1000)).unwrap();
        let url = format!("file://{}/", store_dir.path().display());
        let cfg = PackConfig { max_object: 1000, pack_size: 300 };
        let t = ObjectStoreTarget::new(&url, 4, 3).unwrap().with_packs(Some(cfg));
        let v1 = image(img.path(), 1);
        let p = t.upload(&v1, None).await.unwrap().packs.unwrap();
        assert_eq!((p.indexed, p.reused, p.index_present), (40, 0, false), "{p:?}");
        assert!(p.packs >= 2 && p.packs_put == p.packs, "{p:?}");
        let read_index = |id: &Hash| {
            let key = objstore::pack::index_key(&t.packs, &id.0);
            objstore::pack::PackIndex::decode(&std::fs::read(store_dir.path().join(key.as_ref())).unwrap()).unwrap()
        };
        let idx = read_index(&v1.identity);
        assert_eq!(packs::by_pack(&idx).len() as u64, p.packs);
        // Every small object lies where the index says, in its stored encoding; the large one
        // is not packed.
        for i in 0..40 {
            let content = std::fs::read(img.path().join(format!("f{i:02}"))).unwrap();
            let loc = idx.get(&Hash::of(&content).0).unwrap_or_else(|| panic!("f{i:02} not indexed"));
            let pack =
                std::fs::read(store_dir.path().join(objstore::pack::pack_key(&t.packs, &loc.pack).as_ref())).unwrap();
            assert_eq!(Hash::of(&pack).0, loc.pack, "a pack's name is its hash");
            let stored = &pack[loc.offset as usize..][..loc.length as usize];
            let got = match loc.encoding {
                objstore::pack::Encoding::Raw => stored.to_vec(),
                objstore::pack::Encoding::Zstd => zstd::decode_all(stored).unwrap(),
            };
            assert_eq!(got, content, "f{i:02}");
        }
        assert!(idx.get(&Hash::of(&std::fs::read(img.path().join("large")).unwrap()).0).is_none());
        // Again (a restart after the index was put): nothing at all.
        let again = t.upload(&v1, None).await.unwrap().packs.unwrap();
        assert!(again.index_present && again.packs_put == 0, "{again:?}");
        // v2 adds one small file: only it is packed; the rest keep their places.
        std::fs::write(img.path().join("f99"), "brand new\n").unwrap();
        let v2 = image(img.path(), 2);
        let p2 = t.upload(&v2, None).await.unwrap().packs.unwrap();
        assert_eq!((p2.indexed, p2.reused, p2.packs, p2.packs_put), (41, 40, 1, 1), "{p2:?}");
        let idx2 = read_index(&v2.identity);
        for (h, loc) in idx.iter() {
            assert_eq!(idx2.get(&h), Some(loc));
        }
        // A master that stopped after v2's packs but before its index makes the same packs
        // again, and puts none of them.
        std::fs::remove_file(store_dir.path().join(objstore::pack::index_key(&t.packs, &v2.identity.0).as_ref()))
            .unwrap();
        let p3 = t.upload(&v2, None).await.unwrap().packs.unwrap();
        assert_eq!((p3.packs, p3.packs_put, p3.bytes), (1, 0, 0), "{p3:?}");
        assert_eq!(read_index(&v2.identity), idx2);
    }

    #[tokio::test]
    async fn bad_urls_are_refused() {
        for url in ["s4://x", "not a url", "file:///no/such/dir/anywhere"] {
            let e = ObjectStoreTarget::new(url, 1, 3).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert!(e.to_string().contains(url), "{e}");
        }
        assert!(matches!(ObjectStoreTarget::new("s4://x", 1, 3), Err(OpenError::BadUrl(_))));
    }
}

//! Objects stored as content-defined chunks (issue 25, part 4): the host's side.
//!
//! An object of at least the manifest header's `chunk_threshold` is stored in the object store
//! as chunks plus a chunk index ([`objstore::chunks`]). The host GETs the index (checked to
//! name this object and to add up to its size), cuts its own old version of the file (the
//! seed: the host file the update replaces, read beneath the root, never through a symlink)
//! with the index's FastCDC parameters, and takes every chunk the seed holds from there,
//! hashed again as it is read back; the rest are GET with bounded concurrency, each checked
//! against its hash before use. The chunks go on, in order, as the object's raw content, and
//! the apply verifies the whole object's hash before it renames anything into place, as for
//! every object. A missing or bad index or chunk fails the object in the store (it then comes
//! whole from the master, or with the fallback off, the pass fails): never unverified content.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::StreamExt;
use manifest::{Hash, RelPath};
use objstore::chunks::{ChunkRef, Index, Params};
use proto::v1 as pb;
use tokio::sync::{mpsc, Semaphore};

use super::decode::Bases;
use super::store::{open_object_in_order, Pump, StoreFailure, StoreSource, StoreTally};
use super::transport::{secs, Deadlines};
use crate::error::chain;
use crate::hostfs::files::HostFiles;

/// Seed chunks read back in one blocking call, up to this many bytes.
const SEED_BATCH: u64 = 1 << 20;
/// Chunk GETs in flight per `object_store_concurrency`: a chunk is small (64 KiB on average),
/// so a GET is mostly its round trip, and a cold host GETs thousands per large file.
const CHUNK_GETS_PER_OBJECT_GET: usize = 4;

/// The host files an object stored as chunks may reuse: one per object of the stream.
pub(super) struct Seeds {
    files: HostFiles,
    paths: Vec<Option<RelPath>>,
}

impl Seeds {
    /// The seeds of `b`, if it names any.
    pub(super) fn from_bases(b: &Bases) -> Option<Seeds> {
        (!b.seeds.is_empty()).then(|| Seeds { files: b.files.share(), paths: b.seeds.clone() })
    }

    /// The seed of object `i`, if it has one.
    pub(super) fn get(&self, i: usize) -> Option<Seed> {
        let path = self.paths.get(i)?.clone()?;
        Some(Seed { files: self.files.share(), path })
    }
}

/// One host file to reuse chunks of.
pub(super) struct Seed {
    files: HostFiles,
    path: RelPath,
}

/// A seed, cut: the open file and where each wanted chunk lies in it.
struct Found {
    file: Arc<std::fs::File>,
    at: HashMap<[u8; 32], u64>,
    read: throttle::Limiter,
}

impl Seed {
    /// Opens the seed beneath the root (no symlink followed), cuts it with `params`, and
    /// notes the offset of every chunk in `wanted`. The file stays open: what is read back
    /// later is this file, whatever is renamed over its path meanwhile.
    fn scan(mut self, params: Params, wanted: &HashSet<[u8; 32]>) -> std::io::Result<Found> {
        let (file, _) = self.files.open(&self.path)?;
        let read = self.files.limiter().clone();
        let mut at = HashMap::new();
        objstore::chunks::cut(throttle::Throttled::new(&file, &read), params, |off, data| {
            let h = *blake3::hash(&data).as_bytes();
            if wanted.contains(&h) {
                at.entry(h).or_insert(off);
            }
            Ok(())
        })?;
        Ok(Found { file: Arc::new(file), at, read })
    }
}

/// GETs the chunk index of `hash` (an object of `size` bytes): `Ok(None)` when the store has
/// none (the object is then looked for whole).
pub(super) async fn get_index(
    store: &objstore::Store,
    hash: &Hash,
    size: u64,
    d: Deadlines,
    tally: &StoreTally,
) -> Result<Option<Index>, StoreFailure> {
    use objstore::object_store::ObjectStoreExt;
    let key = objstore::chunks::index_key(&store.objects, &hash.to_hex());
    let fail = |why: String, down: bool| StoreFailure { key: key.to_string(), why, down, sent_any: false };
    tally.gets.fetch_add(1, Relaxed);
    let get = match tokio::time::timeout(d.rpc, store.store.get(&key)).await {
        Ok(Ok(get)) => get,
        Ok(Err(objstore::object_store::Error::NotFound { .. })) => return Ok(None),
        Ok(Err(e)) => return Err(fail(chain(&e), true)),
        Err(_) => return Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)), true)),
    };
    let body = read_body(get, Index::max_bytes(size), d).await.map_err(|(why, down)| fail(why, down))?;
    tally.index_bytes.fetch_add(body.len() as u64, Relaxed);
    tally.bytes.fetch_add(body.len() as u64, Relaxed);
    Index::parse(&body, &hash.0, size).map(Some).map_err(|why| {
        fail(format!("bad chunk index: {why} (hint: the store holds something else under this key)"), false)
    })
}

/// A GET's whole body, at most `cap` bytes; no data for `stream_idle_timeout` fails it.
/// The error says whether the store (`true`) or the object is at fault.
async fn read_body(get: objstore::object_store::GetResult, cap: u64, d: Deadlines) -> Result<Bytes, (String, bool)> {
    let mut body = get.into_stream();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(d.stream_idle, body.next()).await {
            Err(_) => {
                return Err((
                    format!("no data for {} (stream_idle_timeout sets this deadline)", secs(d.stream_idle)),
                    true,
                ))
            }
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Err(e))) => return Err((chain(&e), true)),
            Ok(Some(Ok(data))) => {
                if (out.len() + data.len()) as u64 > cap {
                    return Err((format!("longer than the {cap} bytes it can be"), false));
                }
                out.extend_from_slice(&data);
            }
        }
    }
}

/// GETs one chunk and checks it: `(content, bytes on the wire)`. `raw_first` guesses its
/// encoding from the chunk before it (the chunks of one file mostly compress alike), and is
/// set to what was found.
async fn get_chunk(
    store: &objstore::Store,
    c: ChunkRef,
    d: Deadlines,
    raw_first: &std::sync::atomic::AtomicBool,
    tally: &StoreTally,
) -> Result<(Bytes, u64), StoreFailure> {
    let hash = Hash(c.hash);
    let (encoding, key, get, _) = open_object_in_order(store, &hash, d, raw_first.load(Relaxed), tally).await?;
    raw_first.store(encoding == pb::Encoding::Raw, Relaxed);
    let fail = |why: String, down: bool| StoreFailure { key: key.clone(), why, down, sent_any: false };
    let len = u64::from(c.len);
    let raw = encoding == pb::Encoding::Raw;
    // A zstd frame is stored only when it is smaller than the content.
    let body = read_body(get, len, d).await.map_err(|(why, down)| fail(why, down))?;
    let wire = body.len() as u64;
    let data = if raw {
        body
    } else {
        let mut z = zstd::bulk::Decompressor::new().map_err(|e| fail(format!("no zstd decoder: {e}"), false))?;
        // At most the chunk's length: a frame that decodes to more is refused, not allocated.
        Bytes::from(
            z.decompress(&body, c.len as usize)
                .map_err(|e| fail(format!("not a zstd frame of {len} bytes: {e}"), false))?,
        )
    };
    if data.len() as u64 != len || Hash::of(&data) != hash {
        return Err(fail(
            format!("content does not match its hash ({} bytes where {len} were expected); refused", data.len()),
            false,
        ));
    }
    Ok((data, wire))
}

impl Pump {
    /// Passes on object `hash` (`size` bytes) rebuilt from the chunks `index` lists: those
    /// `seed` holds, read from there, the rest fetched from the store. `Ok(false)`: the
    /// reader is gone.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn chunked(
        &self,
        src: &StoreSource,
        hash: Hash,
        size: u64,
        index: Index,
        seed: Option<Seed>,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
        tally: &StoreTally,
    ) -> Result<bool, StoreFailure> {
        let d = self.d;
        let store = &src.store;
        // 1. The chunks the host has, in its old version of the file.
        let found = match seed {
            Some(seed) => {
                let wanted: HashSet<[u8; 32]> = index.chunks.iter().map(|c| c.hash).collect();
                let params = index.params;
                let path = seed.path.clone();
                match tokio::task::spawn_blocking(move || seed.scan(params, &wanted)).await {
                    Ok(Ok(f)) => Some(f),
                    Ok(Err(e)) => {
                        tracing::debug!("object {hash}: cannot reuse the chunks of {path}: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::debug!("object {hash}: the scan of {path} failed: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let at = |c: &ChunkRef| found.as_ref().and_then(|f| f.at.get(&c.hash).copied());
        // 2. The chunks to fetch: each once, in the order first needed; those needed again
        // are kept until their last use.
        let mut uses: HashMap<[u8; 32], u32> = HashMap::new();
        let mut fetch = Vec::new();
        for c in index.chunks.iter().filter(|c| at(c).is_none()) {
            let n = uses.entry(c.hash).or_insert(0);
            if *n == 0 {
                fetch.push(*c);
            }
            *n += 1;
        }
        let raw_first = std::sync::atomic::AtomicBool::new(false);
        let raw_first = &raw_first;
        let mut fetched = futures_util::stream::iter(fetch)
            .map(|c| get_chunk(store, c, d, raw_first, tally))
            .buffered(src.concurrency * CHUNK_GETS_PER_OBJECT_GET);
        let mut kept: HashMap<[u8; 32], Bytes> = HashMap::new();
        let mut sent = 0u64;
        let mut pos = 0;
        let with_sent = |sent: u64| {
            move |mut f: StoreFailure| {
                f.sent_any = sent > 0;
                f
            }
        };
        while pos < index.chunks.len() {
            let c = index.chunks[pos];
            if let (Some(off), Some(f)) = (at(&c), found.as_ref()) {
                // A run of seed chunks, read back in one blocking call and hashed again.
                let mut run = vec![(c, off)];
                let mut bytes = u64::from(c.len);
                while let Some(next) = index.chunks.get(pos + run.len()) {
                    match at(next) {
                        Some(o) if bytes < SEED_BATCH => {
                            run.push((*next, o));
                            bytes += u64::from(next.len);
                        }
                        _ => break,
                    }
                }
                pos += run.len();
                let (file, read) = (f.file.clone(), f.read.clone());
                let reads = tokio::task::spawn_blocking(move || {
                    run.into_iter()
                        .map(|(c, off)| {
                            let mut buf = vec![0u8; c.len as usize];
                            let ok = file.read_exact_at(&mut buf, off).is_ok() && Hash::of(&buf) == Hash(c.hash);
                            read.charge(throttle::pages(u64::from(c.len)));
                            (c, ok.then(|| Bytes::from(buf)))
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| {
                    with_sent(sent)(StoreFailure {
                        key: String::new(),
                        why: e.to_string(),
                        down: false,
                        sent_any: false,
                    })
                })?;
                for (c, data) in reads {
                    let data = match data {
                        Some(b) => {
                            tally.chunks_reused.fetch_add(1, Relaxed);
                            b
                        }
                        // The host file changed under this pass: that chunk comes from the store.
                        None => self.fetched_chunk(store, c, tally, raw_first).await.map_err(with_sent(sent))?,
                    };
                    if !self.emit(hash, size, data, &mut sent, tx, received, tally).await {
                        return Ok(false);
                    }
                }
                continue;
            }
            pos += 1;
            let data = match kept.get(&c.hash) {
                Some(b) => b.clone(),
                None => {
                    let (b, wire) =
                        fetched.next().await.expect("one fetch per chunk first needed").map_err(with_sent(sent))?;
                    self.net.charge_async(wire).await;
                    tally.chunks_fetched.fetch_add(1, Relaxed);
                    tally.chunk_bytes.fetch_add(wire, Relaxed);
                    tally.bytes.fetch_add(wire, Relaxed);
                    b
                }
            };
            match uses.get_mut(&c.hash) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    kept.insert(c.hash, data.clone());
                }
                _ => {
                    kept.remove(&c.hash);
                }
            }
            if !self.emit(hash, size, data, &mut sent, tx, received, tally).await {
                return Ok(false);
            }
        }
        tally.chunked_objects.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// One chunk the seed could not give after all, from the store.
    async fn fetched_chunk(
        &self,
        store: &objstore::Store,
        c: ChunkRef,
        tally: &StoreTally,
        raw_first: &std::sync::atomic::AtomicBool,
    ) -> Result<Bytes, StoreFailure> {
        let (b, wire) = get_chunk(store, c, self.d, raw_first, tally).await?;
        self.net.charge_async(wire).await;
        tally.chunks_fetched.fetch_add(1, Relaxed);
        tally.chunk_bytes.fetch_add(wire, Relaxed);
        tally.bytes.fetch_add(wire, Relaxed);
        Ok(b)
    }

    /// Passes `data` on as the object's next raw content, in pieces of at most
    /// [`proto::OBJECT_CHUNK`] bytes; the piece that completes `size` is the last. False: the
    /// reader is gone.
    #[allow(clippy::too_many_arguments)]
    async fn emit(
        &self,
        hash: Hash,
        size: u64,
        mut data: Bytes,
        sent: &mut u64,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
        tally: &StoreTally,
    ) -> bool {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(proto::OBJECT_CHUNK));
            *sent += piece.len() as u64;
            tally.rebuilt_bytes.fetch_add(piece.len() as u64, Relaxed);
            let chunk = pb::ObjectChunk {
                hash: Bytes::copy_from_slice(&hash.0),
                size,
                encoding: pb::Encoding::Raw as i32,
                data: piece,
                last: *sent >= size,
                ..Default::default()
            };
            if !self.forward(chunk, tx, received).await {
                return false;
            }
        }
        true
    }
}

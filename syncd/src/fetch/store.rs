//! Objects from the object store: what a pass fetched there, and the ordered pump that reads
//! them (whole, from packs, as chunks or from the solid delta) beside the master's stream.

use manifest::Hash;
use proto::v1 as pb;
use proto::v1::image_sync_client::ImageSyncClient;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;

use super::decode::net_weight;
use super::transport::{describe_status, no_reply, secs, stalled, Deadlines};
use crate::error::chain;

/// Where the objects of one stream came from, when it reads from an object store: shared by
/// the receiving task (which fills it) and the apply (which reads it to count).
#[derive(Debug, Default)]
pub struct StoreTally {
    pub url: String,
    /// Objects the store gave (before verification).
    pub from_store: std::sync::atomic::AtomicU64,
    /// Objects the store failed to give (error, missing, deadline).
    pub failures: std::sync::atomic::AtomicU64,
    /// Of `from_store`, those cut from ranges of packs.
    pub from_packs: std::sync::atomic::AtomicU64,
    /// GETs sent to the store (the pack index, loose objects, ranges of packs).
    pub gets: std::sync::atomic::AtomicU64,
    /// Bytes the store sent (gaps between objects of a range included).
    pub bytes: std::sync::atomic::AtomicU64,
    /// Those objects: fetched from the master instead.
    pub(super) failed_over: std::sync::Mutex<std::collections::HashSet<Hash>>,
    /// Objects the store gave as chunks (see [`chunked`]) …
    pub chunked_objects: std::sync::atomic::AtomicU64,
    /// … their chunks taken from the host's old version of the file …
    pub chunks_reused: std::sync::atomic::AtomicU64,
    /// … and those fetched, with their bytes as stored (compressed or not) …
    pub chunks_fetched: std::sync::atomic::AtomicU64,
    pub chunk_bytes: std::sync::atomic::AtomicU64,
    /// … and the bytes of the chunk indexes fetched.
    pub index_bytes: std::sync::atomic::AtomicU64,
    /// Content passed on rebuilt from chunks (counted as on the wire by the stream).
    pub rebuilt_bytes: std::sync::atomic::AtomicU64,
    /// Objects that came out of the solid delta, their content bytes (passed on raw), and the
    /// bytes of the index and segments fetched.
    pub solid_objects: std::sync::atomic::AtomicU64,
    pub solid_content: std::sync::atomic::AtomicU64,
    pub solid_wire: std::sync::atomic::AtomicU64,
}

impl StoreTally {
    /// Whether `hash` was fetched from the master after the store failed for it.
    pub fn failed_over(&self, hash: &Hash) -> bool {
        self.failed_over.lock().is_ok_and(|s| s.contains(hash))
    }

    pub(super) fn fail_over(&self, hashes: &[Hash]) {
        self.failures.fetch_add(hashes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut s) = self.failed_over.lock() {
            s.extend(hashes.iter().copied());
        }
    }
}

/// The store a pass fetches from.
pub(super) struct StoreSource {
    pub(super) store: objstore::Store,
    pub(super) fallback: bool,
    pub(super) concurrency: usize,
    /// The manifest's identity: names the pack index of the version.
    pub(super) identity: Hash,
    /// The image the pass applies, when its solid delta is to be tried ([`crate::solid`]).
    pub(super) solid: Option<Hash>,
}

/// Why the store did not give one object.
pub(super) struct StoreFailure {
    pub(super) key: String,
    pub(super) why: String,
    /// The store itself failed (not a missing object): the rest of the pass skips it.
    pub(super) down: bool,
    /// Chunks of the object were passed on already.
    pub(super) sent_any: bool,
}

/// What a GET of one object opened: its encoding, key, body, and the base of a delta.
pub(super) type Opened = (pb::Encoding, String, objstore::object_store::GetResult, Option<Hash>);

/// Opens the GET of `hash`: with a `base`, its delta against that base first; then `.zst` (a
/// zstd frame), else `.raw`; within `rpc_timeout` each.
pub(super) async fn open_object(
    store: &objstore::Store,
    hash: &Hash,
    base: Option<Hash>,
    d: Deadlines,
    tally: &StoreTally,
) -> Result<Opened, StoreFailure> {
    use objstore::object_store::ObjectStoreExt;
    if let Some(base) = base {
        let key = store.delta_key(&hash.to_hex(), &base.to_hex());
        let fail = |why: String| StoreFailure { key: key.to_string(), why, down: true, sent_any: false };
        tally.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match tokio::time::timeout(d.rpc, store.store.get(&key)).await {
            Ok(Ok(get)) => return Ok((pb::Encoding::ZstdDelta, key.to_string(), get, Some(base))),
            // No delta against this base: the whole object.
            Ok(Err(objstore::object_store::Error::NotFound { .. })) => {}
            Ok(Err(e)) => return Err(fail(chain(&e))),
            Err(_) => return Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)))),
        }
    }
    open_object_in_order(store, hash, d, false, tally).await
}

/// The whole object `hash`: `.zst` first, or `.raw` first when `raw_first` (a guess: a miss
/// costs one request), within `rpc_timeout` each.
pub(super) async fn open_object_in_order(
    store: &objstore::Store,
    hash: &Hash,
    d: Deadlines,
    raw_first: bool,
    tally: &StoreTally,
) -> Result<Opened, StoreFailure> {
    use objstore::object_store::ObjectStoreExt;
    let hex = hash.to_hex();
    let mut order = [(false, pb::Encoding::Zstd), (true, pb::Encoding::Raw)];
    if raw_first {
        order.reverse();
    }
    for (n, (raw, encoding)) in order.into_iter().enumerate() {
        let key = store.key(&hex, raw);
        let fail = |why: String, down: bool| StoreFailure { key: key.to_string(), why, down, sent_any: false };
        tally.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match tokio::time::timeout(d.rpc, store.store.get(&key)).await {
            Ok(Ok(get)) => return Ok((encoding, key.to_string(), get, None)),
            Ok(Err(objstore::object_store::Error::NotFound { .. })) if n == 0 => continue,
            Ok(Err(objstore::object_store::Error::NotFound { .. })) => {
                return Err(StoreFailure {
                    key: store.key(&hex, false).to_string(),
                    why: "not in the store (neither .zst nor .raw)".into(),
                    down: false,
                    sent_any: false,
                })
            }
            Ok(Err(e)) => return Err(fail(chain(&e), true)),
            Err(_) => {
                return Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)), true))
            }
        }
    }
    unreachable!("the second attempt returns")
}

/// What a receiving task needs of the master, cloned into it.
pub(super) struct Pump {
    pub(super) url: String,
    pub(super) net: throttle::Limiter,
    pub(super) d: Deadlines,
}

impl Pump {
    /// Passes on one object's verified content, raw, in chunks of at most
    /// [`proto::OBJECT_CHUNK`] bytes. False: the reader is gone.
    pub(super) async fn raw_body(
        &self,
        hash: Hash,
        mut content: bytes::Bytes,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
    ) -> bool {
        let size = content.len() as u64;
        let hash_bytes = bytes::Bytes::copy_from_slice(&hash.0);
        loop {
            let data = content.split_to(content.len().min(proto::OBJECT_CHUNK));
            let last = content.is_empty();
            let chunk = pb::ObjectChunk {
                hash: hash_bytes.clone(),
                size,
                encoding: pb::Encoding::Raw as i32,
                data,
                last,
                ..Default::default()
            };
            if !self.forward(chunk, tx, received).await {
                return false;
            }
            if last {
                return true;
            }
        }
    }

    /// Sends one chunk on, once the byte budget has room for it. False: the reader is gone.
    pub(super) async fn forward(
        &self,
        chunk: pb::ObjectChunk,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
    ) -> bool {
        // Released by the decode thread once it is done with the chunk.
        match received.acquire_many(net_weight(&chunk)).await {
            Ok(p) => p.forget(),
            Err(_) => return false,
        }
        tx.send(Ok(chunk)).await.is_ok()
    }

    /// GETs one object on its own (its delta against `base` first, if given: [`open_object`])
    /// and passes its body on ([`Pump::store_body`]).
    pub(super) async fn whole(
        &self,
        store: &objstore::Store,
        (hash, size): (Hash, u64),
        base: Option<Hash>,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
        tally: &StoreTally,
    ) -> Result<bool, StoreFailure> {
        let (encoding, key, get, base) = open_object(store, &hash, base, self.d, tally).await?;
        self.store_body(hash, size, (encoding, base), &key, get, tx, received, tally).await
    }

    /// Passes the body of one store object on, in chunks of at most [`proto::OBJECT_CHUNK`]
    /// bytes, each charged to the network limit; no data for `stream_idle_timeout` fails it.
    /// `Ok(false)`: the reader is gone.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_body(
        &self,
        hash: Hash,
        size: u64,
        (encoding, base): (pb::Encoding, Option<Hash>),
        key: &str,
        get: objstore::object_store::GetResult,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
        tally: &StoreTally,
    ) -> Result<bool, StoreFailure> {
        use futures_util::stream::StreamExt;
        let hash_bytes = bytes::Bytes::copy_from_slice(&hash.0);
        let base_bytes = base.map_or_else(bytes::Bytes::new, |b| bytes::Bytes::copy_from_slice(&b.0));
        let chunk = |data: bytes::Bytes, last: bool| pb::ObjectChunk {
            hash: hash_bytes.clone(),
            size,
            encoding: encoding as i32,
            data,
            last,
            base: base_bytes.clone(),
            ..Default::default()
        };
        let mut body = get.into_stream();
        // Held back one piece, so the final one can be marked last.
        let mut pending: Option<bytes::Bytes> = None;
        let mut sent_any = false;
        loop {
            let fail = |why: String| StoreFailure { key: key.to_owned(), why, down: true, sent_any };
            let next = match tokio::time::timeout(self.d.stream_idle, body.next()).await {
                Ok(n) => n,
                Err(_) => {
                    return Err(fail(format!(
                        "no data for {} (stream_idle_timeout sets this deadline)",
                        secs(self.d.stream_idle)
                    )))
                }
            };
            match next {
                Some(Ok(mut data)) => {
                    self.net.charge_async(data.len() as u64).await;
                    tally.bytes.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    while !data.is_empty() {
                        let piece = data.split_to(data.len().min(proto::OBJECT_CHUNK));
                        if let Some(p) = pending.replace(piece) {
                            if !self.forward(chunk(p, false), tx, received).await {
                                return Ok(false);
                            }
                            sent_any = true;
                        }
                    }
                }
                Some(Err(e)) => return Err(fail(chain(&e))),
                None => break,
            }
        }
        Ok(self.forward(chunk(pending.unwrap_or_default(), true), tx, received).await)
    }

    /// Fetches `hashes` from the master in order, in requests of at most `MAX_FETCH_HASHES`,
    /// and passes their chunks on. False once the stream has ended: an error was sent (the
    /// master is then taken as lost), or the reader is gone.
    pub(super) async fn master(
        &self,
        client: ImageSyncClient<Channel>,
        hashes: &[Hash],
        bases_req: &[Option<Hash>],
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
    ) -> bool {
        let (url, net, d) = (&self.url, &self.net, self.d);
        for (n, batch) in hashes.chunks(proto::MAX_FETCH_HASHES).enumerate() {
            let at = n * proto::MAX_FETCH_HASHES;
            let bases = bases_req.get(at..at + batch.len()).unwrap_or_default();
            let req = pb::FetchRequest {
                hashes: batch.iter().map(|h| bytes::Bytes::copy_from_slice(&h.0)).collect(),
                bases: bases
                    .iter()
                    .map(|b| b.map_or_else(bytes::Bytes::new, |h| bytes::Bytes::copy_from_slice(&h.0)))
                    .collect(),
            };
            let mut c = client.clone();
            // A deadline that fires reads, downstream, as a broken stream: the master is
            // then taken as lost, exactly as when the connection breaks.
            let mut stream = match tokio::time::timeout(d.rpc, c.fetch_objects(req)).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s)) => {
                    let _ = tx.send(Err(format!("master {url}: {}", describe_status(&s)))).await;
                    return false;
                }
                Err(_) => {
                    let _ = tx.send(Err(format!("master {url}: {}", no_reply(&d, "FetchObjects", true)))).await;
                    return false;
                }
            };
            loop {
                // Only the wait for the master counts: not the rate limit, nor waiting
                // for the decode thread to make room.
                let next = match tokio::time::timeout(d.stream_idle, stream.message()).await {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = tx.send(Err(format!("master {url}: {}", stalled(&d, "object", true)))).await;
                        return false;
                    }
                };
                match next {
                    Ok(Some(batch)) => {
                        let bytes: usize = batch.chunks.iter().map(|c| c.data.len()).sum();
                        net.charge_async(bytes as u64).await;
                        for chunk in batch.chunks {
                            if !self.forward(chunk, tx, received).await {
                                return false;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(format!("master {url}: {}", describe_status(&s)))).await;
                        return false;
                    }
                }
            }
        }
        true
    }
}

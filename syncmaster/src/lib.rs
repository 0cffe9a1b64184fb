//! The master: holds a scanned golden image and serves it to hosts.
//!
//! `GetManifest` streams the manifest in batches; `FetchObjects` streams file contents by
//! blake3 hash, zstd-compressed on the wire. Both are fed by a producer through a bounded
//! channel, so a slow host costs memory of a few chunks, never of the image.

pub mod control;
pub mod fleet;
pub mod identity;
pub mod inventory;
pub mod metrics;
pub mod objcache;
pub mod objstore;
pub mod policy;
pub mod publish;
pub mod rollout;
pub mod status;
pub mod store;
pub mod storedelta;
pub mod web;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use manifest::{Hash, Kind, Manifest, RelPath};
use proto::v1 as pb;
use proto::v1::image_sync_server::{ImageSync, ImageSyncServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Objects smaller than this go raw: a zstd frame header would cost more than it saves.
pub(crate) const MIN_COMPRESS: u64 = 128;

/// An image loaded and ready to serve.
pub struct Image {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// `manifest.identity()`, computed once: hosts ask for it on every pass.
    pub identity: Hash,
    /// Where to read each distinct content hash from.
    objects: HashMap<Hash, RelPath>,
    /// The entries packed for hosts that accept them, made at the first such request and then
    /// sent as the same bytes to every host (shared with a renumbered copy: same entries).
    packed: Arc<std::sync::OnceLock<Option<Arc<Vec<pb::PackedBatches>>>>>,
}

/// zstd level of a manifest's packed entries: made once per image, so a little slower than
/// the default is fine; the 32-byte hashes, which do not compress, are most of the bytes anyway.
const PACKED_LEVEL: i32 = 6;

impl Image {
    /// Scans `root` (hashing every file) into version `version`.
    pub fn scan(root: &Path, version: u64) -> anyhow::Result<Image> {
        let manifest = manifest::scan_image(root, version)
            .map_err(|e| anyhow::anyhow!("cannot scan image {}: {e}", root.display()))?;
        Ok(Image::new(root, manifest))
    }

    pub fn new(root: &Path, manifest: Manifest) -> Image {
        let mut objects = HashMap::new();
        for e in &manifest.entries {
            if let (Kind::File, Some(h)) = (e.kind, e.hash) {
                objects.entry(h).or_insert_with(|| e.path.clone());
            }
        }
        let identity = manifest.identity();
        Image { root: root.to_owned(), manifest, identity, objects, packed: Default::default() }
    }

    /// The entries packed ([`manifest::wire::packed_batches`]), made at the first call (CPU
    /// work: call it off the async workers); `None` if they cannot be packed (logged), and the
    /// batches are then sent one by one.
    pub fn packed(&self) -> Option<Arc<Vec<pb::PackedBatches>>> {
        self.packed
            .get_or_init(|| {
                let started = std::time::Instant::now();
                match manifest::wire::packed_batches(&self.manifest, proto::MANIFEST_BATCH, PACKED_LEVEL) {
                    Ok(p) => {
                        let bytes: usize = p.iter().map(|m| m.zstd.len()).sum();
                        tracing::info!(
                            version = self.manifest.version,
                            entries = self.manifest.entries.len(),
                            bytes,
                            secs = started.elapsed().as_secs_f64(),
                            "manifest packed for hosts"
                        );
                        Some(Arc::new(p))
                    }
                    Err(e) => {
                        tracing::warn!(
                            version = self.manifest.version,
                            "manifest not packed, sent batch by batch: {e}"
                        );
                        None
                    }
                }
            })
            .clone()
    }

    pub fn object_path(&self, hash: &Hash) -> Option<&RelPath> {
        self.objects.get(hash)
    }

    /// The same tree under another version number: a rollback re-publishes an old version so
    /// that hosts, which refuse a lower number, accept it (see README, Trust).
    pub fn renumbered(&self, version: u64) -> Image {
        let mut manifest = self.manifest.clone();
        manifest.version = version;
        Image {
            root: self.root.clone(),
            manifest,
            identity: self.identity,
            objects: self.objects.clone(),
            packed: self.packed.clone(),
        }
    }
}

/// How the master proves itself and its images.
#[derive(Clone, Default)]
pub struct Security {
    /// Signs every manifest header sent (identity, version, expiry).
    pub signing_key: Option<Arc<manifest::trust::SigningKey>>,
    /// How long a signature stays valid after it is sent.
    pub signature_ttl: std::time::Duration,
    /// Serve TLS, requiring client certificates from this CA; a host's identity is then its
    /// certificate's name. `None`: plain TCP (`--insecure`), identity as claimed.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// The same certificate, key and client CA for the fleet page's HTTPS ([`web`]); `Some`
    /// exactly when `tls` is.
    pub web_tls: Option<Arc<rustls::ServerConfig>>,
    /// Under mTLS, the certificate names that may pause, resume and abort rollouts.
    pub operators: Vec<String>,
    /// The object store's public location, sent in every manifest header (not signed; see
    /// [`objstore`]). Empty: no store.
    pub object_store_url: String,
    /// Sent in every manifest header with a store: files this large and larger are stored as
    /// chunks (`--chunk-threshold`; 0: none). See [`objstore`].
    pub chunk_threshold: u64,
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    /// Becomes true at shutdown: the never-ending Watch streams end, so the server can stop.
    stopping: tokio::sync::watch::Receiver<bool>,
    published: Arc<publish::Published>,
    control: Arc<control::Control>,
    fleet: Arc<fleet::Fleet>,
    inventory: Arc<inventory::Inventory>,
    zstd_level: i32,
    signing_key: Option<Arc<manifest::trust::SigningKey>>,
    signature_ttl: std::time::Duration,
    mtls: bool,
    operators: Vec<String>,
    /// Sent in every manifest header (empty without `--object-store`).
    object_store_url: String,
    /// Sent in every manifest header (0 without `--object-store`).
    chunk_threshold: u64,
}

impl Service {
    pub fn new(
        control: Arc<control::Control>,
        fleet: Arc<fleet::Fleet>,
        inventory: Arc<inventory::Inventory>,
        zstd_level: i32,
        security: &Security,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Service {
        Service {
            stopping,
            published: control.published().clone(),
            control,
            fleet,
            inventory,
            zstd_level,
            signing_key: security.signing_key.clone(),
            signature_ttl: security.signature_ttl,
            mtls: security.tls.is_some(),
            operators: security.operators.clone(),
            object_store_url: security.object_store_url.clone(),
            chunk_threshold: security.chunk_threshold,
        }
    }

    /// The host a request speaks for. Under mTLS that is the name in its client certificate,
    /// and a request claiming to be another host is refused; on plain TCP it is the claim.
    fn host_of<T>(&self, req: &Request<T>, claimed: &str) -> Result<String, Status> {
        if !self.mtls {
            return Ok(claimed.to_owned());
        }
        let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
        let der = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
        let id = identity::from_cert(der).map_err(Status::unauthenticated)?;
        if !claimed.is_empty() && claimed != id {
            tracing::warn!(certificate = %id, claimed, "refused: a host asked as another host");
            return Err(Status::permission_denied(format!(
                "this connection's certificate is for host {id:?}; it may not act as host {claimed:?}"
            )));
        }
        Ok(id)
    }

    /// Who is asking, for the event log: the client certificate's name under mTLS, else the
    /// peer address.
    fn caller_of<T>(&self, req: &Request<T>) -> String {
        if self.mtls {
            if let Some(id) = req.peer_certs().and_then(|c| c.first().and_then(|der| identity::from_cert(der).ok())) {
                return id;
            }
        }
        req.remote_addr().map_or_else(|| "unknown".to_owned(), |a| a.to_string())
    }

    pub fn into_server(self) -> ImageSyncServer<Service> {
        ImageSyncServer::new(self)
            .max_decoding_message_size(proto::MAX_MESSAGE)
            .max_encoding_message_size(proto::MAX_MESSAGE)
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl ImageSync for Service {
    type GetManifestStream = Stream<pb::ManifestMessage>;
    type FetchObjectsStream = Stream<pb::ObjectBatch>;
    type WatchStream = Stream<pb::VersionAnnouncement>;

    async fn get_manifest(
        &self,
        req: Request<pb::ManifestRequest>,
    ) -> Result<Response<Self::GetManifestStream>, Status> {
        let _rpc = metrics::rpc("GetManifest");
        let host = self.host_of(&req, &req.get_ref().host_id)?;
        self.fleet.seen(&host);
        let image = self.control.image_for(&host).map_err(Status::unavailable)?;
        // A host that holds this very tree gets the signed header alone.
        let omit = req.get_ref().cached_identity.as_ref() == image.identity.0.as_slice();
        let accept_packed = req.get_ref().accept_packed;
        tracing::info!(host = %host, version = image.manifest.version, entries = image.manifest.entries.len(), cached = omit, "manifest requested");
        // Only this host's own inventory entry travels with its manifest.
        let lists: Vec<pb::ExclusionList> =
            self.inventory.lists_for(&host).iter().map(exclusions::wire::to_wire).collect();
        let (tx, rx) = mpsc::channel(16);
        let signer = self.signing_key.clone().map(|k| (k, self.signature_ttl));
        let object_store_url = self.object_store_url.clone();
        let chunk_threshold = self.chunk_threshold;
        tokio::spawn(async move {
            // Packed entries: encoded and compressed once per image, the same bytes for every
            // host (the first request of an image makes them, off the async workers).
            let packed = match (accept_packed && !omit, image.packed.get()) {
                (false, _) => None,
                (true, Some(p)) => p.clone(),
                (true, None) => {
                    let img = image.clone();
                    tokio::task::spawn_blocking(move || img.packed()).await.ok().flatten()
                }
            };
            let mut lists = Some(lists);
            let messages = manifest::wire::manifest_messages(&image.manifest, &image.identity, proto::MANIFEST_BATCH);
            let take = if omit || packed.is_some() { 1 } else { usize::MAX };
            let packed_msgs = packed
                .iter()
                .flat_map(|p| p.iter())
                .map(|p| pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Packed(p.clone())) });
            for mut msg in messages.take(take).chain(packed_msgs) {
                if let Some(pb::manifest_message::Msg::Header(h)) = &mut msg.msg {
                    h.exclusions = lists.take().unwrap_or_default();
                    h.entries_omitted = omit;
                    h.object_store_url = object_store_url.clone();
                    h.chunk_threshold = chunk_threshold;
                    if let (Some((key, ttl)), Some(id)) = (&signer, Hash::from_slice(&h.identity)) {
                        let expires = manifest::trust::now_unix() + ttl.as_secs().max(1);
                        h.signature = Some(manifest::wire::signature_to_wire(&key.sign(&id, h.version, expires)));
                    }
                }
                // A failed send means the host went away: stop encoding.
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_objects(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchObjectsStream>, Status> {
        let _rpc = metrics::rpc("FetchObjects");
        let pb::FetchRequest { hashes, bases } = req.into_inner();
        if !bases.is_empty() && bases.len() != hashes.len() {
            return Err(Status::invalid_argument(format!(
                "{} bases for {} hashes: send none, or one (possibly empty) per hash",
                bases.len(),
                hashes.len()
            )));
        }
        if hashes.len() > proto::MAX_FETCH_HASHES {
            return Err(Status::invalid_argument(format!(
                "{} hashes requested, at most {} per request",
                hashes.len(),
                proto::MAX_FETCH_HASHES
            )));
        }
        let hashes: Vec<Hash> = hashes
            .iter()
            .map(|h| Hash::from_slice(h).ok_or_else(|| Status::invalid_argument("a requested hash is not 32 bytes")))
            .collect::<Result<_, _>>()?;
        let bases: Vec<Option<Hash>> = bases
            .iter()
            .map(|b| match b.len() {
                0 => Ok(None),
                _ => {
                    Hash::from_slice(b).map(Some).ok_or_else(|| Status::invalid_argument("a base hash is not 32 bytes"))
                }
            })
            .collect::<Result<_, _>>()?;
        // Two batches queued per stream: with h2's own send buffer that keeps the pipe full, and
        // 200 hosts fetching at once cost the master 362 MiB at peak instead of 547 with 8
        // (bench/fleet.sh).
        let (tx, rx) = mpsc::channel(2);
        let published = self.published.clone();
        let level = self.zstd_level;
        // Reading and compressing are blocking work: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut out = Batcher { tx, chunks: Vec::new(), bytes: 0 };
            for (i, h) in hashes.into_iter().enumerate() {
                let base = bases.get(i).copied().flatten();
                if !send_object(&published, h, base, level, &mut out) {
                    return;
                }
            }
            out.flush();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let _rpc = metrics::rpc("Watch");
        let host = self.host_of(&req, &req.get_ref().host_id)?;
        let mut rx = self.control.subscribe();
        let control = self.control.clone();
        let fleet = self.fleet.clone();
        let mut stopping = self.stopping.clone();
        let (tx, out) = mpsc::channel(4);
        fleet.watching(&host, 1);
        tokio::spawn(async move {
            // Only this host's target is announced, and only when it changes: a rollout that
            // has not granted this host the new version leaves it where it is.
            let mut last: Option<(u64, Hash)> = None;
            loop {
                rx.borrow_and_update();
                if let Ok(img) = control.image_for(&host) {
                    let now = (img.manifest.version, img.identity);
                    if last != Some(now) {
                        last = Some(now);
                        let ann = pb::VersionAnnouncement {
                            version: img.manifest.version,
                            identity: Bytes::copy_from_slice(&img.identity.0),
                        };
                        if tx.send(Ok(ann)).await.is_err() {
                            break;
                        }
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = stopping.wait_for(|s| *s) => break,
                }
            }
            fleet.watching(&host, -1);
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn report_pass(&self, req: Request<pb::PassResult>) -> Result<Response<pb::ReportAck>, Status> {
        let _rpc = metrics::rpc("ReportPass");
        let host = self.host_of(&req, &req.get_ref().host_id)?;
        let mut r = req.into_inner();
        r.host_id = host;
        if r.host_id.is_empty() || r.host_id.len() > 255 {
            return Err(Status::invalid_argument("a pass report needs a host id of 1 to 255 bytes"));
        }
        tracing::info!(host = %r.host_id, version = r.image_version, result = %r.result, "pass reported");
        let control = self.control.clone();
        // The report is written to the state database (an fsync): off the async workers.
        tokio::task::spawn_blocking(move || control.report(r))
            .await
            .map_err(|e| Status::internal(format!("recording the report failed: {e}")))?;
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn fleet_status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let _rpc = metrics::rpc("FleetStatus");
        Ok(Response::new(self.control.fleet_status()))
    }

    async fn rollout_status(
        &self,
        _req: Request<pb::RolloutStatusRequest>,
    ) -> Result<Response<pb::RolloutStatusReply>, Status> {
        let _rpc = metrics::rpc("RolloutStatus");
        Ok(Response::new(self.control.rollout_status()))
    }

    async fn rollout_control(
        &self,
        req: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatusReply>, Status> {
        let _rpc = metrics::rpc("RolloutControl");
        let caller = self.caller_of(&req);
        let pb::RolloutControlRequest { action, reason } = req.into_inner();
        tracing::info!(%caller, %action, %reason, "operator request");
        // Every host has a certificate from the same CA: reading the rollout is open to them,
        // steering it is not (a compromised canary must not resume past its own failure).
        if self.mtls && !self.operators.contains(&caller) {
            tracing::warn!(%caller, %action, "operator request refused: not an operator");
            return Err(Status::permission_denied(format!(
                "certificate {caller:?} is not an operator: pause, resume and abort need a certificate named by syncmaster serve --operator (hint: --operator {caller} if it should be)"
            )));
        }
        let control = self.control.clone();
        let done = {
            let caller = caller.clone();
            tokio::task::spawn_blocking(move || control.operate(&action, &reason, &caller))
                .await
                .map_err(|e| Status::internal(format!("the request failed: {e}")))?
        };
        match done {
            Ok(()) => Ok(Response::new(self.control.rollout_status())),
            Err(control::ControlError::Usage(e)) => Err(Status::invalid_argument(e)),
            Err(control::ControlError::Rollout(e)) => {
                tracing::warn!(%caller, "operator request refused: {e}");
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e) => {
                tracing::error!(%caller, "operator request failed: {e}");
                Err(Status::internal(e.to_string()))
            }
        }
    }

    async fn rollout_events(
        &self,
        req: Request<pb::RolloutEventsRequest>,
    ) -> Result<Response<pb::RolloutEventsReply>, Status> {
        let _rpc = metrics::rpc("RolloutEvents");
        let pb::RolloutEventsRequest { after_id, limit } = req.into_inner();
        let control = self.control.clone();
        let events = tokio::task::spawn_blocking(move || control.events(after_id, limit))
            .await
            .map_err(|e| Status::internal(format!("reading the event log failed: {e}")))?
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(pb::RolloutEventsReply { events }))
    }
}

/// Streams one object as chunks: as a delta against `base` when one is stored and the host
/// offered that base. Returns false when the host has gone away.
fn send_object(published: &publish::Published, hash: Hash, base: Option<Hash>, level: i32, tx: &mut Batcher) -> bool {
    let hash_bytes = Bytes::copy_from_slice(&hash.0);
    let fail = |tx: &mut Batcher, error: String| {
        tracing::warn!(object = %hash, "{error}");
        tx.push(pb::ObjectChunk { hash: hash_bytes.clone(), last: true, error, ..Default::default() })
    };
    // Compressed once for the fleet, from content checked against its hash.
    if let Some((b, (size, frame))) = base.and_then(|b| Some((b, published.cache().get_delta(&hash, &b)?))) {
        return send_frame(frame, &hash_bytes, size, pb::Encoding::ZstdDelta, Bytes::copy_from_slice(&b.0), tx);
    }
    if let Some((size, frame)) = published.cache().get(&hash) {
        return send_frame(frame, &hash_bytes, size, pb::Encoding::Zstd, Bytes::new(), tx);
    }
    let Some((image, rel)) = published.find_object(&hash) else {
        return fail(tx, format!("object {hash} is in no image version this master serves"));
    };
    let path = image.root.join(rel.as_path());
    let file = match manifest::scan::open_nofollow(&path) {
        Ok(f) => f,
        Err(e) => return fail(tx, format!("cannot open {}: {e}", path.display())),
    };
    let size = match file.metadata() {
        Ok(md) => md.len(),
        Err(e) => return fail(tx, format!("cannot stat {}: {e}", path.display())),
    };
    let mut hashing = HashingReader { inner: file, hasher: blake3::Hasher::new() };
    let encoding = if size >= MIN_COMPRESS && !published.cache().is_incompressible(&hash) {
        pb::Encoding::Zstd
    } else {
        pb::Encoding::Raw
    };
    let result = if encoding == pb::Encoding::Zstd {
        match zstd::stream::read::Encoder::new(&mut hashing, level) {
            Ok(enc) => pump(enc, &hash_bytes, size, encoding, tx),
            Err(e) => Err(e),
        }
    } else {
        pump(&mut hashing, &hash_bytes, size, encoding, tx)
    };
    match result {
        Ok(false) => false,
        Err(e) => fail(tx, format!("cannot read {}: {e}", path.display())),
        Ok(true) => {
            // The image changed under us since it was scanned: tell the host, which would
            // reject the content anyway when it verifies the hash.
            let actual: Hash = hashing.hasher.finalize().into();
            if actual != hash {
                return fail(
                    tx,
                    format!("{} changed since the image was scanned (hint: rescan the image)", path.display()),
                );
            }
            tx.push(pb::ObjectChunk {
                hash: hash_bytes,
                size,
                encoding: encoding as i32,
                last: true,
                ..Default::default()
            })
        }
    }
}

/// Sends a stored frame as slices of it (no copy), the last one marked. False: the host left.
fn send_frame(frame: Bytes, hash: &Bytes, size: u64, encoding: pb::Encoding, base: Bytes, tx: &mut Batcher) -> bool {
    let mut at = 0;
    loop {
        let end = (at + proto::OBJECT_CHUNK).min(frame.len());
        let chunk = pb::ObjectChunk {
            hash: hash.clone(),
            size,
            encoding: encoding as i32,
            data: frame.slice(at..end),
            last: end == frame.len(),
            base: base.clone(),
            ..Default::default()
        };
        if !tx.push(chunk) {
            return false;
        }
        if end == frame.len() {
            return true;
        }
        at = end;
    }
}

/// Sends the bytes `r` yields as chunks of at most `OBJECT_CHUNK`. `Ok(false)`: the host left.
fn pump(mut r: impl Read, hash: &Bytes, size: u64, encoding: pb::Encoding, tx: &mut Batcher) -> std::io::Result<bool> {
    let mut sent = 0u64;
    loop {
        // Each chunk is read straight into the buffer it is sent in, sized for what is left of
        // the file and one byte more, to see its end in the same read: most files are small,
        // and a full-size buffer would be zeroed and copied for each. Past the expected size
        // (a compressed stream can be a little larger), chunks are of a modest fixed size.
        let left = size.saturating_sub(sent);
        let want = if left == 0 { 16 * 1024 } else { left.saturating_add(1).min(proto::OBJECT_CHUNK as u64) as usize };
        let mut buf = bytes::BytesMut::zeroed(want);
        let mut filled = 0;
        let mut end = false;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => {
                    end = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled > 0 {
            sent += filled as u64;
            buf.truncate(filled);
            let chunk = pb::ObjectChunk {
                hash: hash.clone(),
                size,
                encoding: encoding as i32,
                data: buf.freeze(),
                ..Default::default()
            };
            if !tx.push(chunk) {
                return Ok(false);
            }
        }
        if end {
            return Ok(true);
        }
    }
}

/// Packs chunks into `ObjectBatch` messages of about `BATCH_BYTES`.
struct Batcher {
    tx: mpsc::Sender<Result<pb::ObjectBatch, Status>>,
    chunks: Vec<pb::ObjectChunk>,
    bytes: usize,
}

impl Batcher {
    /// Queues a chunk, sending the batch once it is full. False: the host left.
    fn push(&mut self, chunk: pb::ObjectChunk) -> bool {
        self.bytes += chunk.data.len();
        metrics::object_bytes_sent(chunk.data.len() as u64);
        self.chunks.push(chunk);
        if self.bytes >= proto::BATCH_BYTES || self.chunks.len() >= proto::BATCH_CHUNKS {
            return self.flush();
        }
        true
    }

    fn flush(&mut self) -> bool {
        if self.chunks.is_empty() {
            return true;
        }
        self.bytes = 0;
        let chunks = std::mem::take(&mut self.chunks);
        self.tx.blocking_send(Ok(pb::ObjectBatch { chunks })).is_ok()
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Where [`serve`] listens (port 0 picks a free port), or, once bound, where it listens.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// gRPC: hosts and the CLI.
    pub grpc: SocketAddr,
    /// Prometheus `/metrics` (plain HTTP), if any.
    pub metrics: Option<SocketAddr>,
    /// The fleet page ([`web`]), if any: HTTPS with client certificates under mTLS.
    pub http: Option<SocketAddr>,
}

async fn bind(addr: Option<SocketAddr>, flag: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => {
            Ok(Some(TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("cannot listen on {a} ({flag}): {e}"))?))
        }
        None => Ok(None),
    }
}

/// Binds every address in `listen`, calls `on_ready` with the bound addresses, and serves
/// until `shutdown` resolves.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    control: Arc<control::Control>,
    fleet: Arc<fleet::Fleet>,
    inventory: Arc<inventory::Inventory>,
    listen: Listen,
    zstd_level: i32,
    security: Security,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Listen),
) -> anyhow::Result<()> {
    let listener = bind(Some(listen.grpc), "--listen").await?.expect("bound");
    let metrics_listener = bind(listen.metrics, "--metrics-listen").await?;
    let http_listener = bind(listen.http, "--http-listen").await?;
    let bound = Listen {
        grpc: listener.local_addr()?,
        metrics: metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // The rollout engine's clock: grants, timeouts and soaks move on without any host asking.
    // It also pings systemd's watchdog (a `Type=notify` unit with `WatchdogSec`): an engine
    // step that hangs (a stuck database, say) stops the pings, and systemd restarts the master.
    {
        let control = control.clone();
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let ping_every = sd_notify::watchdog_enabled().map(|d| d / 2);
            let (mut pinged, mut told) = (std::time::Instant::now(), std::time::Instant::now());
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let c = control.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || c.tick()).await {
                    tracing::error!("rollout engine step failed: {e}");
                    continue;
                }
                if ping_every.is_some_and(|p| pinged.elapsed() >= p) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    pinged = std::time::Instant::now();
                }
                if told.elapsed() >= std::time::Duration::from_secs(5) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status::notify_line(&control))]);
                    told = std::time::Instant::now();
                }
            }
        });
    }
    if let Some(l) = metrics_listener {
        let (control, stopped) = (control.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(l, control, stopped).await {
                tracing::error!("the metrics listener stopped: {e}");
            }
        });
    }
    if let Some(l) = http_listener {
        let (control, stopped, tls) = (control.clone(), stop_rx.clone(), security.web_tls.clone());
        tokio::spawn(async move {
            if let Err(e) = web::serve(l, tls, control, stopped).await {
                tracing::error!("the fleet page's listener stopped: {e}");
            }
        });
    }
    let control_for_status = control.clone();
    let service = Service::new(control, fleet, inventory, zstd_level, &security, stop_rx);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls).map_err(|e| anyhow::anyhow!("TLS configuration refused: {e}"))?;
    }
    on_ready(bound);
    // Scanned and listening: systemd may start what depends on the master.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status::notify_line(&control_for_status)),
    ]);
    builder
        .add_service(service.into_server())
        // No Nagle: a header-only manifest reply must not wait for the host's delayed ACK
        // (40 ms on Linux, a quarter of a no-change pass).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(std::time::Duration::from_secs(60))),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )
        .await?;
    Ok(())
}

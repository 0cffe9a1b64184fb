//! Talking to syncmaster: the manifest stream and the ordered object stream.

mod chunked;

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use exclusions::PatternList;
use manifest::wire::ManifestAssembler;
use manifest::{Hash, Manifest};
use proto::v1 as pb;
use proto::v1::image_sync_client::ImageSyncClient;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::{Channel, Endpoint};

use crate::error::SyncError;
use crate::queue;

mod packs;

/// Largest zstd window a host accepts (32 MiB): bounds decoder memory whatever the master sends.
const MAX_WINDOW_LOG: u32 = 25;
/// Objects smaller than this that the store has in a pack come from the pack even when the
/// host offers a base: a GET of their own (often a miss: no delta) costs more than the bytes
/// a delta would save. Larger ones ask for the delta against the base first.
const DELTA_GET_MIN: u64 = 64 * 1024;

/// How to reach the master: mTLS, or plain TCP only when asked for by name.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// CA for the master's certificate, and this host's certificate and key.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// `--insecure`: a plain `http://` master is allowed (tests and demos).
    pub insecure: bool,
    /// How long to wait on the master before calling it gone.
    pub deadlines: Deadlines,
    /// Where objects come from when an object store is named.
    pub store: StoreConfig,
}

/// The host's object store settings (issue 25): fetch objects from the store the master's
/// manifest header names (`object_store_url`), or the one configured here, falling back to
/// the master for any object the store fails to give.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `object_store`: a URL overriding the header's (a nearby cache, a read-only bucket), or
    /// `none`: always fetch from the master.
    pub url: Option<String>,
    /// `object_store_fallback` (default true): fetch from the master what the store fails to
    /// give; off, a store failure breaks the pass like a lost master (exit 3).
    pub fallback: bool,
    /// `object_store_concurrency` (default 8): GETs in flight, their output kept in order.
    pub concurrency: usize,
    /// `object_store_anonymous` (default false): unsigned S3 requests when no AWS credentials
    /// are set.
    pub anonymous: bool,
    /// `object_store_solid` (default true): an upgrade tries the solid delta to the image
    /// first ([`crate::solid`]).
    pub solid: bool,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig { url: None, fallback: true, concurrency: 8, anonymous: false, solid: true }
    }
}

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
    failed_over: std::sync::Mutex<std::collections::HashSet<Hash>>,
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

    fn fail_over(&self, hashes: &[Hash]) {
        self.failures.fetch_add(hashes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut s) = self.failed_over.lock() {
            s.extend(hashes.iter().copied());
        }
    }
}

/// The store a pass fetches from.
struct StoreSource {
    store: objstore::Store,
    fallback: bool,
    concurrency: usize,
    /// The manifest's identity: names the pack index of the version.
    identity: Hash,
    /// The image the pass applies, when its solid delta is to be tried ([`crate::solid`]).
    solid: Option<Hash>,
}

/// Every wait on the network path is bounded: a master that accepts the connection and then
/// says nothing, or freezes mid-transfer, is reported unreachable within these, never waited
/// on forever. Each names the config key that sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The connection: TCP, TLS and the HTTP/2 preface (`connect_timeout`).
    pub connect: Duration,
    /// A unary call whole, and a streaming call until its response headers (`rpc_timeout`).
    pub rpc: Duration,
    /// No message for this long on a manifest or object stream (`stream_idle_timeout`). Time
    /// this host spends not reading (a full queue, a rate limit) does not count. The version
    /// watch, idle by design, is exempt: keepalive pings watch it instead.
    pub stream_idle: Duration,
    /// An HTTP/2 PING this often, with or without a call open (`keepalive_interval`) …
    pub keepalive_interval: Duration,
    /// … and the connection is dropped if one goes unanswered this long (`keepalive_timeout`).
    pub keepalive_timeout: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            connect: Duration::from_secs(10),
            rpc: Duration::from_secs(30),
            stream_idle: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// `d` as a config value is written: whole seconds as `30s`, else milliseconds.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Why a call timed out, naming the key that sets its deadline. `hint` leads the parenthesis
/// with "hint: " where no other hint follows (an [`SyncError::Unreachable`] adds its own).
fn no_reply(d: &Deadlines, call: &str, hint: bool) -> String {
    let hint = if hint { "hint: " } else { "" };
    format!(
        "no reply to {call} within {} ({hint}the master may be hung or overloaded; rpc_timeout sets this deadline)",
        secs(d.rpc)
    )
}

/// Why a stream was given up: nothing arrived on it for `stream_idle_timeout`.
fn stalled(d: &Deadlines, stream: &str, hint: bool) -> String {
    let hint = if hint { "hint: " } else { "" };
    format!(
        "no data for {} on the {stream} stream ({hint}the master may be hung or overloaded; stream_idle_timeout sets this deadline)",
        secs(d.stream_idle)
    )
}

/// `fut`, or `Err(on_timeout())` if it has not finished within `limit`.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, SyncError>>,
    on_timeout: impl FnOnce() -> SyncError,
) -> Result<T, SyncError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| Err(on_timeout()))
}

/// A manifest as received: whole, or only its header when the host's cached copy is current.
pub struct Received {
    /// `None`: the master sent the header alone, confirming the identity this host offered.
    pub manifest: Option<Manifest>,
    pub version: u64,
    pub identity: Hash,
    /// The header's signature, not yet checked.
    pub signature: Option<manifest::trust::VersionSignature>,
    /// This host's exclusion lists from the master's inventory.
    pub lists: Vec<PatternList>,
    /// The object store the header names (empty: none).
    pub object_store_url: String,
    /// The header's `chunk_threshold` (0: no object is stored as chunks).
    pub chunk_threshold: u64,
}

fn bad_stream(what: &str) -> SyncError {
    SyncError::BadManifest(manifest::ManifestError::BadField { path: "(stream)".into(), what: what.into() })
}

#[derive(Clone)]
pub struct Master {
    url: String,
    client: ImageSyncClient<Channel>,
    /// A second connection, opened on first use, for single-object fetches made while the
    /// main object stream is open. On the main connection they would wait for flow-control
    /// window that only the main stream's unread data can free, which the apply thread, busy
    /// with the single fetch, will never read: a deadlock.
    side: ImageSyncClient<Channel>,
    /// Charged for every object byte received.
    net: throttle::Limiter,
    deadlines: Deadlines,
    store_config: StoreConfig,
    /// Set by [`Master::with_store`]: [`Master::spawn_fetch`] reads from this store.
    store: Option<Arc<StoreSource>>,
    /// Objects this large are stored as chunks in the store (0: none): see [`chunked`].
    chunk_threshold: u64,
}

impl Master {
    /// Connects for a pass, within the `connect_timeout` deadline. While a call is busy, the
    /// connection pings the master every `keepalive_interval`, and is dropped (failing every
    /// call on it) when a ping goes unanswered for `keepalive_timeout`. With no call busy (a
    /// pass fetching from the object store between its manifest and its report) it does not
    /// ping: nothing waits on the master then, and 200 hosts' pings were a quarter of the
    /// master's CPU in `bench/fleet.sh`. Every call has its own deadlines besides.
    pub async fn connect(url: &str, transport: &Transport) -> Result<Master, SyncError> {
        Self::connect_pinging(url, transport, false).await
    }

    /// Connects for the version watch: as [`Master::connect`], but the connection pings even
    /// while nothing moves on it, so a frozen master is noticed on the idle watch.
    pub async fn connect_for_watch(url: &str, transport: &Transport) -> Result<Master, SyncError> {
        Self::connect_pinging(url, transport, true).await
    }

    async fn connect_pinging(url: &str, transport: &Transport, while_idle: bool) -> Result<Master, SyncError> {
        let d = transport.deadlines;
        let unreachable =
            |e: &dyn std::fmt::Display| SyncError::Unreachable { url: url.to_owned(), reason: e.to_string() };
        let endpoint = check_url(url, transport)?
            .connect_timeout(d.connect)
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .http2_keep_alive_interval(d.keepalive_interval)
            .keep_alive_timeout(d.keepalive_timeout)
            .keep_alive_while_idle(while_idle);
        // The endpoint's own connect timeout covers TCP alone, not the TLS handshake after it.
        let connecting = async { endpoint.connect().await.map_err(|e| unreachable(&source_chain(&e))) };
        let channel = within(d.connect, connecting, || {
            unreachable(&format!(
                "no connection within {} (the master may be hung or overloaded, or a firewall drops the packets; connect_timeout sets this deadline)",
                secs(d.connect)
            ))
        })
        .await?;
        let client = |c: Channel| {
            ImageSyncClient::new(c)
                .max_decoding_message_size(proto::MAX_MESSAGE)
                .max_encoding_message_size(proto::MAX_MESSAGE)
        };
        Ok(Master {
            url: url.to_owned(),
            client: client(channel),
            side: client(endpoint.connect_lazy()),
            net: throttle::Limiter::unlimited(),
            deadlines: d,
            store_config: transport.store.clone(),
            store: None,
            chunk_threshold: 0,
        })
    }

    /// Limits object fetches to the limiter's rate. The limit is applied as the chunks are
    /// read off the connection, so HTTP/2 flow control slows the master's sending to match.
    pub fn with_net_limit(mut self, net: throttle::Limiter) -> Master {
        self.net = net;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Makes [`Master::spawn_fetch`] try the solid delta to image `identity` first, when it
    /// reads from a store and `object_store_solid` is on.
    pub fn with_solid(mut self, identity: Hash) -> Master {
        if let Some(s) = self.store.as_mut().filter(|_| self.store_config.solid) {
            if let Some(s) = Arc::get_mut(s) {
                s.solid = Some(identity);
            }
        }
        self
    }

    /// Makes [`Master::spawn_fetch`] read from the object store: the one this host's config
    /// names, else `announced` (the manifest header's `object_store_url`; empty: none). A store
    /// the host's config names that cannot be opened is a configuration error; one only the
    /// master announced is passed over with a warning (objects then come from the master).
    /// `identity` is the manifest's: small objects come from packs when the store has a pack
    /// index for it.
    pub fn with_store(mut self, announced: &str, identity: &Hash) -> Result<Master, SyncError> {
        let cfg = self.store_config.clone();
        let (url, setting) = match cfg.url.as_deref() {
            Some("none") => return Ok(self),
            Some(u) => (u.to_owned(), "config key object_store"),
            None if announced.is_empty() => return Ok(self),
            None => (announced.to_owned(), "the object store the master announced,"),
        };
        let mut opts = objstore::Options::new(setting);
        opts.anonymous = cfg.anonymous;
        // Few retries of its own: every wait is bounded by this host's deadlines, and an object
        // the store fails to give comes from the master.
        opts.retry.max_retries = 1;
        opts.retry.retry_timeout = self.deadlines.rpc;
        opts.retry.backoff.max_backoff = Duration::from_secs(1);
        // rpc_timeout bounds the wait for a reply and stream_idle_timeout the silences in a
        // body; a limit on the whole request would cut slow but steady ranges of a busy store.
        opts.request_timeout = Some(Duration::from_secs(24 * 3600));
        match objstore::Store::open(&url, &opts) {
            Ok(store) => {
                self.store = Some(Arc::new(StoreSource {
                    store,
                    fallback: cfg.fallback,
                    concurrency: cfg.concurrency.max(1),
                    identity: *identity,
                    solid: None,
                }))
            }
            Err(e) => {
                let hint = if e.to_string().contains("no credentials") {
                    " (hint: or object_store_anonymous = true for a bucket that allows unsigned reads, or object_store = \"none\" to fetch from the master)"
                } else {
                    ""
                };
                if cfg.url.is_some() || !cfg.fallback {
                    return Err(SyncError::Config(format!("{e}{hint}")));
                }
                tracing::warn!("{e}{hint}; fetching every object from the master");
            }
        }
        Ok(self)
    }

    /// Objects of at least `threshold` bytes (the manifest header's `chunk_threshold`; 0:
    /// none) are fetched from the store as chunks, reusing what the host has (see [`chunked`]).
    pub fn with_chunk_threshold(mut self, threshold: u64) -> Master {
        self.chunk_threshold = threshold;
        self
    }

    /// Receives and validates the manifest, and this host's exclusion lists from the master's
    /// inventory. `cached` is the identity of the host's cached copy: if the image still has
    /// that identity, the master may send the header alone ([`Received::manifest`] is `None`).
    pub async fn manifest(&self, host_id: &str, cached: Option<&Hash>) -> Result<Received, SyncError> {
        let mut stream = self.open_manifest(host_id, cached).await?;
        let mut asm = ManifestAssembler::default();
        let mut lists = Vec::new();
        let mut omitted = None;
        let mut object_store_url = String::new();
        let mut chunk_threshold = 0;
        while let Some(msg) = self.next_message(&mut stream, "manifest").await? {
            if let Some(pb::manifest_message::Msg::Header(h)) = &msg.msg {
                lists = lists_from_wire(&h.exclusions);
                object_store_url.clone_from(&h.object_store_url);
                chunk_threshold = h.chunk_threshold;
                if h.entries_omitted {
                    omitted = Some(h.clone());
                    continue;
                }
            }
            if omitted.is_some() {
                return Err(bad_stream("entries after a header that omitted them"));
            }
            asm.push(msg).map_err(SyncError::BadManifest)?;
        }
        if let Some(h) = omitted {
            // Only a header: it must name the very tree this host offered.
            let identity = Hash::from_slice(&h.identity).ok_or_else(|| bad_stream("identity is not 32 bytes"))?;
            if Some(&identity) != cached {
                return Err(bad_stream(&format!(
                    "the master omitted the entries of {}, which this host did not offer",
                    identity.to_hex()
                )));
            }
            let mut header = ManifestAssembler::default();
            header
                .push(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h.clone())) })
                .map_err(SyncError::BadManifest)?;
            return Ok(Received {
                manifest: None,
                version: h.version,
                identity,
                signature: header.signature(),
                lists,
                object_store_url,
                chunk_threshold,
            });
        }
        let identity = asm.identity();
        // `finish_signed` checks that the entries hash to the header's identity.
        let (m, signature) = asm.finish_signed().map_err(SyncError::BadManifest)?;
        let identity = identity.ok_or(SyncError::BadManifest(manifest::ManifestError::NoHeader))?;
        Ok(Received {
            version: m.version,
            identity,
            manifest: Some(m),
            signature,
            lists,
            object_store_url,
            chunk_threshold,
        })
    }

    /// Only this host's exclusion lists: reads the manifest header and hangs up.
    pub async fn exclusion_lists(&self, host_id: &str) -> Result<Vec<PatternList>, SyncError> {
        let mut stream = self.open_manifest(host_id, None).await?;
        match self.next_message(&mut stream, "manifest").await? {
            Some(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h)) }) => {
                Ok(lists_from_wire(&h.exclusions))
            }
            _ => Err(SyncError::BadManifest(manifest::ManifestError::NoHeader)),
        }
    }

    async fn open_manifest(
        &self,
        host_id: &str,
        cached: Option<&Hash>,
    ) -> Result<tonic::Streaming<pb::ManifestMessage>, SyncError> {
        let mut client = self.client.clone();
        let cached_identity = cached.map_or_else(bytes::Bytes::new, |h| bytes::Bytes::copy_from_slice(&h.0));
        let req = pb::ManifestRequest { host_id: host_id.to_owned(), cached_identity, accept_packed: true };
        let opened = async { client.get_manifest(req).await.map_err(|s| self.status_error(s)) };
        Ok(within(self.deadlines.rpc, opened, || self.timed_out("GetManifest")).await?.into_inner())
    }

    /// Subscribes to version announcements (the current one arrives at once). Only the opening
    /// has a deadline: the stream is idle between versions by design, and a master that
    /// freezes is noticed by the connection's keepalive pings, which end it with an error.
    pub async fn watch(&self, host_id: &str) -> Result<tonic::Streaming<pb::VersionAnnouncement>, SyncError> {
        let mut client = self.client.clone();
        let opened = async {
            client.watch(pb::WatchRequest { host_id: host_id.to_owned() }).await.map_err(|s| self.status_error(s))
        };
        Ok(within(self.deadlines.rpc, opened, || self.timed_out("Watch")).await?.into_inner())
    }

    /// Tells the master how a pass went, within `rpc_timeout`.
    pub async fn report(&self, result: pb::PassResult) -> Result<(), SyncError> {
        let mut client = self.client.clone();
        let sent = async { client.report_pass(result).await.map_err(|s| self.status_error(s)) };
        within(self.deadlines.rpc, sent, || self.timed_out("ReportPass")).await?;
        Ok(())
    }

    /// The next message of a manifest stream, within `stream_idle_timeout`.
    async fn next_message<T>(&self, stream: &mut tonic::Streaming<T>, what: &str) -> Result<Option<T>, SyncError> {
        let next = async { stream.message().await.map_err(|s| self.status_error(s)) };
        within(self.deadlines.stream_idle, next, || SyncError::Unreachable {
            url: self.url.clone(),
            reason: stalled(&self.deadlines, what, false),
        })
        .await
    }

    /// `call` got no reply within `rpc_timeout`.
    fn timed_out(&self, call: &str) -> SyncError {
        SyncError::Unreachable { url: self.url.clone(), reason: no_reply(&self.deadlines, call, false) }
    }

    fn status_error(&self, s: tonic::Status) -> SyncError {
        if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
            return SyncError::Config(format!(
                "master {} refused this host: {} (hint: under mTLS the host's identity is its certificate's name; drop --host-id or use the right certificate)",
                self.url,
                s.message()
            ));
        }
        SyncError::Unreachable { url: self.url.clone(), reason: describe_status(&s) }
    }

    /// Starts downloading `hashes` in order, in requests of at most `MAX_FETCH_HASHES`, into a
    /// bounded channel that the apply drains: the network runs ahead of the disk by at most the
    /// channel's capacity.
    ///
    /// `bases`, if given, has no entries or one per object: the host file (and its hash) the
    /// master may send that object as a delta against, read back from there to decode it.
    pub fn spawn_fetch(
        &self,
        objects: Vec<(Hash, u64)>,
        bases: Option<Bases>,
        rt: &tokio::runtime::Handle,
    ) -> ObjectStream {
        match &self.store {
            Some(store) => self.spawn_fetch_store(store.clone(), objects, bases, rt),
            None => self.spawn_fetch_on(self.client.clone(), objects, bases, rt),
        }
    }

    /// Like [`Master::spawn_fetch`], on the side connection: for fetches made while the main
    /// object stream is still open.
    pub fn spawn_fetch_aside(&self, objects: Vec<(Hash, u64)>, rt: &tokio::runtime::Handle) -> ObjectStream {
        self.spawn_fetch_on(self.side.clone(), objects, None, rt)
    }

    /// Requests `objects` (hash, declared size) in order. The stream is received on `rt`, and
    /// whole-object zstd frames are decoded on a thread of their own ([`decode_stage`]), so the
    /// apply thread only writes and verifies.
    fn spawn_fetch_on(
        &self,
        client: ImageSyncClient<Channel>,
        objects: Vec<(Hash, u64)>,
        bases: Option<Bases>,
        rt: &tokio::runtime::Handle,
    ) -> ObjectStream {
        let offered = Bases::offered(bases.as_ref());
        let bases_req = if offered.iter().any(Option::is_some) { offered } else { Vec::new() };
        let hashes: Vec<Hash> = objects.iter().map(|(h, _)| *h).collect();
        let (tx, received, stream) = start_stream(objects, bases, None);
        let pump = self.pump();
        rt.spawn(async move {
            pump.master(client, &hashes, &bases_req, &tx, &received).await;
        });
        stream
    }

    fn pump(&self) -> Pump {
        Pump { url: self.url.clone(), net: self.net.clone(), d: self.deadlines }
    }

    /// Like [`Master::spawn_fetch_on`], from the object store: GETs up to
    /// `object_store_concurrency` ahead, their chunks passed on in order. An object offered a
    /// base is first asked for as a delta against it (`deltas/…`; not there: the whole object),
    /// decoded by the same stage as the master's deltas. An object
    /// the store fails to give comes from the master in its place (a `FetchObjects` of its
    /// own, on the main connection, which this stream leaves idle), or with
    /// `object_store_fallback` off, breaks the stream.
    fn spawn_fetch_store(
        &self,
        src: Arc<StoreSource>,
        objects: Vec<(Hash, u64)>,
        bases: Option<Bases>,
        rt: &tokio::runtime::Handle,
    ) -> ObjectStream {
        let tally = Arc::new(StoreTally { url: src.store.url.clone(), ..StoreTally::default() });
        let offered = Bases::offered(bases.as_ref());
        // The solid delta is read beneath the same root as the bases.
        let solid_src = match (&src.solid, &bases) {
            (Some(to), Some(b)) => {
                let offered = b.paths.iter().cloned().chain(b.solid.iter().cloned().map(Some)).collect::<Vec<_>>();
                Some((*to, offered, b.root.share(), b.read.clone()))
            }
            _ => None,
        };
        let seeds = bases.as_ref().and_then(|b| {
            chunked::Seeds::from_bases(Bases {
                root: b.root.share(),
                paths: Vec::new(),
                seeds: b.seeds.clone(),
                solid: Vec::new(),
                read: b.read.clone(),
            })
        });
        let (tx, received, stream) = start_stream(objects.clone(), bases, Some(tally.clone()));
        let pump = self.pump();
        let client = self.client.clone();
        let threshold = self.chunk_threshold;
        rt.spawn(async move {
            use futures_util::stream::StreamExt;
            let d = pump.d;
            let store = &src.store;
            let mut solid = None;
            if let Some((to, paths, root, read)) = solid_src {
                if let Some(plan) = crate::solid::plan(store, &to, &objects, &paths, d.rpc).await {
                    tally.solid_wire.fetch_add(plan.index_bytes, std::sync::atomic::Ordering::Relaxed);
                    tally.bytes.fetch_add(plan.index_bytes, std::sync::atomic::Ordering::Relaxed);
                    solid = Some(crate::solid::SolidReader::new(Arc::new(plan), root, read));
                }
            }
            // Each object's way, in this order: out of the solid delta; a large file, from its
            // chunks; one with a base the host offers and worth a GET of its own, as a delta
            // against it (`deltas/…`; not there: whole); else a range of a pack, or whole.
            let covered: Vec<bool> = objects
                .iter()
                .map(|(h, _)| solid.as_ref().is_some_and(|s: &crate::solid::SolidReader| s.covers(h)))
                .collect();
            let large = |i: usize| threshold > 0 && objects[i].1 >= threshold;
            let delta_base =
                |i: usize| offered.get(i).copied().flatten().filter(|_| objects[i].1 >= DELTA_GET_MIN && !large(i));
            let own: Vec<bool> =
                (0..objects.len()).map(|i| covered[i] || large(i) || delta_base(i).is_some()).collect();
            let index = match packs::load_index(store, &src.identity, d, &tally).await {
                Ok(index) => index,
                // The store failed on its first GET: the whole pass from the master, or with
                // fallback off, a broken stream.
                Err(failure) => {
                    let url = &store.url;
                    if !src.fallback {
                        let why = format!("{} failed: {} (object_store_fallback is off)", failure.key, failure.why);
                        let _ = tx.send(Err(format!("object store {url}: {why}"))).await;
                        return;
                    }
                    tracing::warn!(
                        "object store {url}: {}: {}; fetching every object of this pass from the master instead",
                        failure.key,
                        failure.why
                    );
                    let all: Vec<Hash> = objects.iter().map(|(h, _)| *h).collect();
                    tally.fail_over(&all);
                    pump.master(client, &all, &[], &tx, &received).await;
                    return;
                }
            };
            let units = packs::plan(&objects, &own, index.as_ref(), packs::GAP, packs::MAX_RANGE);
            drop(index);
            let opens: Vec<_> = units
                .into_iter()
                .map(|u| {
                    let (store, objects, tally) = (store.clone(), &objects, &tally);
                    let (covered, base) = match u {
                        packs::Unit::Loose(i) => (covered[i], delta_base(i)),
                        packs::Unit::Range { .. } => (false, None),
                    };
                    let large = matches!(u, packs::Unit::Loose(i) if large(i));
                    async move {
                        let r = match u {
                            // Objects of a solid segment are not fetched one by one, unless it fails.
                            packs::Unit::Loose(_) if covered => Ok(packs::Opened::Solid),
                            // A large file: its chunk index first (see [`chunked`]).
                            packs::Unit::Loose(i) if large => {
                                let (h, size) = objects[i];
                                chunked::get_index(&store, &h, size, d, tally).await.map(packs::Opened::Index)
                            }
                            packs::Unit::Loose(i) if base.is_some() => {
                                open_object(&store, &objects[i].0, base, d, tally)
                                    .await
                                    .map(|(e, k, g, b)| packs::Opened::Loose(e, k, g, b))
                            }
                            _ => packs::open_unit(&store, objects, &u, d, tally).await,
                        };
                        (u, r)
                    }
                })
                .collect();
            let mut opened = futures_util::stream::iter(opens).buffered(src.concurrency);
            let mut warned = false;
            while let Some((unit, r)) = opened.next().await {
                let span = unit.span();
                // The place in the request of the first object not given, and why.
                let (at, failure) = match (unit, r) {
                    (_, Err(f)) => (span.start, f),
                    (packs::Unit::Loose(i), Ok(packs::Opened::Solid)) => {
                        let (hash, size) = objects[i];
                        let reader = solid.as_mut().expect("covered objects have a reader");
                        let before = reader.wire;
                        let got = reader.object(store, &hash, &pump.net, d.rpc).await;
                        tally.solid_wire.fetch_add(reader.wire - before, std::sync::atomic::Ordering::Relaxed);
                        tally.bytes.fetch_add(reader.wire - before, std::sync::atomic::Ordering::Relaxed);
                        if let Some(content) = got {
                            let n = content.len() as u64;
                            if !pump.raw_body(hash, content, &tx, &received).await {
                                return;
                            }
                            tally.from_store.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tally.solid_objects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tally.solid_content.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                        // The segment could not be used: this object on its own; a large file
                        // from its chunks (it may not be stored whole).
                        let index = match large(i) {
                            true => chunked::get_index(store, &hash, size, d, &tally).await.ok().flatten(),
                            false => None,
                        };
                        let alone = match index {
                            Some(index) => {
                                let seed = seeds.as_ref().and_then(|s| s.get(i));
                                pump.chunked(&src, hash, size, index, seed, &tx, &received, &tally).await
                            }
                            None => {
                                let base = offered.get(i).copied().flatten();
                                pump.whole(store, (hash, size), base, &tx, &received, &tally).await
                            }
                        };
                        match alone {
                            Ok(true) => {
                                tally.from_store.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            }
                            Ok(false) => return,
                            Err(f) => (i, f),
                        }
                    }
                    (packs::Unit::Loose(i), Ok(packs::Opened::Index(Some(index)))) => {
                        let (hash, size) = objects[i];
                        let seed = seeds.as_ref().and_then(|s| s.get(i));
                        match pump.chunked(&src, hash, size, index, seed, &tx, &received, &tally).await {
                            Ok(true) => {
                                tally.from_store.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            }
                            Ok(false) => return,
                            Err(f) => (i, f),
                        }
                    }
                    // No chunk index: the large file may be stored whole.
                    (packs::Unit::Loose(i), Ok(packs::Opened::Index(None))) => {
                        let (hash, size) = objects[i];
                        match pump.whole(store, (hash, size), None, &tx, &received, &tally).await {
                            Ok(true) => {
                                tally.from_store.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            }
                            Ok(false) => return,
                            Err(f) => (i, f),
                        }
                    }
                    (packs::Unit::Loose(i), Ok(packs::Opened::Loose(encoding, key, get, base))) => {
                        let (hash, size) = objects[i];
                        match pump.store_body(hash, size, (encoding, base), &key, get, &tx, &received, &tally).await {
                            Ok(true) => {
                                tally.from_store.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            }
                            Ok(false) => return,
                            Err(f) => (i, f),
                        }
                    }
                    (packs::Unit::Range { start, members, .. }, Ok(packs::Opened::Range(key, get))) => {
                        match pump.store_range(&objects, start, &members, &key, get, &tx, &received, &tally).await {
                            Ok(true) => continue,
                            Ok(false) => return,
                            Err((k, f)) => (members[k].i, f),
                        }
                    }
                    (_, Ok(_)) => unreachable!("a unit opens as its kind"),
                };
                let url = &store.url;
                if !src.fallback {
                    let _ = tx
                        .send(Err(format!(
                            "object store {url}: {} {}: {} (object_store_fallback is off)",
                            failure.key, "failed", failure.why
                        )))
                        .await;
                    return;
                }
                // Once per pass at warning level; the summary counts the rest.
                if !warned {
                    tracing::warn!(
                        "object store {url}: {}: {}; fetching from the master instead{}",
                        failure.key,
                        failure.why,
                        if failure.down { ", this object and every one after it this pass" } else { "" }
                    );
                    warned = true;
                } else {
                    tracing::debug!("object store {url}: {}: {}", failure.key, failure.why);
                }
                let mut todo: Vec<Hash> = objects[at..span.end].iter().map(|(h, _)| *h).collect();
                if failure.sent_any {
                    // Part of the object is on its way: it is marked missing, and the apply
                    // fetches it on its own.
                    let hash = todo.remove(0);
                    tally.fail_over(&[hash]);
                    let chunk = pb::ObjectChunk {
                        hash: bytes::Bytes::copy_from_slice(&hash.0),
                        error: format!("object store {url}: {}: {}", failure.key, failure.why),
                        last: true,
                        ..Default::default()
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if failure.down {
                    // The store itself failed: the rest of the pass comes from the master.
                    drop(opened);
                    todo.extend(objects[span.end..].iter().map(|(h, _)| *h));
                    tally.fail_over(&todo);
                    pump.master(client, &todo, &[], &tx, &received).await;
                    return;
                }
                if todo.is_empty() {
                    continue;
                }
                tally.fail_over(&todo);
                if !pump.master(client.clone(), &todo, &[], &tx, &received).await {
                    return;
                }
            }
        });
        stream
    }
}

/// Sets up an object stream: the channel a receiving task fills, the byte budget it takes
/// permits from, and the decode thread between it and the returned reader.
#[allow(clippy::type_complexity)]
fn start_stream(
    objects: Vec<(Hash, u64)>,
    bases: Option<Bases>,
    store: Option<Arc<StoreTally>>,
) -> (mpsc::Sender<Result<pb::ObjectChunk, String>>, Arc<Semaphore>, ObjectStream) {
    let (tx, net_rx) = mpsc::channel::<Result<pb::ObjectChunk, String>>(NET_CHUNKS);
    let received = Arc::new(Semaphore::new(NET_BYTES));
    let held = received.clone();
    let (piece_tx, rx) = queue::bounded::<Result<Piece, String>>(QUEUE_BYTES, QUEUE_PIECES);
    let spawned = std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || decode_stage(net_rx, &held, piece_tx, &objects, bases));
    if let Err(e) = spawned {
        // No thread: the stream reads as broken, and each object is fetched on its own.
        tracing::warn!("cannot start the object decode thread: {e}");
    }
    let stream = ObjectStream::reading(rx, store);
    (tx, received, stream)
}

/// Why the store did not give one object.
struct StoreFailure {
    key: String,
    why: String,
    /// The store itself failed (not a missing object): the rest of the pass skips it.
    down: bool,
    /// Chunks of the object were passed on already.
    sent_any: bool,
}

/// What a GET of one object opened: its encoding, key, body, and the base of a delta.
type Opened = (pb::Encoding, String, objstore::object_store::GetResult, Option<Hash>);

/// Opens the GET of `hash`: with a `base`, its delta against that base first; then `.zst` (a
/// zstd frame), else `.raw`; within `rpc_timeout` each.
async fn open_object(
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
            Ok(Err(e)) => return Err(fail(source_chain(&e))),
            Err(_) => return Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)))),
        }
    }
    open_object_in_order(store, hash, d, false, tally).await
}

/// The whole object `hash`: `.zst` first, or `.raw` first when `raw_first` (a guess: a miss
/// costs one request), within `rpc_timeout` each.
async fn open_object_in_order(
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
            Ok(Err(e)) => return Err(fail(source_chain(&e), true)),
            Err(_) => {
                return Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)), true))
            }
        }
    }
    unreachable!("the second attempt returns")
}

/// What a receiving task needs of the master, cloned into it.
struct Pump {
    url: String,
    net: throttle::Limiter,
    d: Deadlines,
}

impl Pump {
    /// Passes on one object's verified content, raw, in chunks of at most
    /// [`proto::OBJECT_CHUNK`] bytes. False: the reader is gone.
    async fn raw_body(
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
    async fn forward(
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
    async fn whole(
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
    async fn store_body(
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
                Some(Err(e)) => return Err(fail(source_chain(&e))),
                None => break,
            }
        }
        Ok(self.forward(chunk(pending.unwrap_or_default(), true), tx, received).await)
    }

    /// Fetches `hashes` from the master in order, in requests of at most `MAX_FETCH_HASHES`,
    /// and passes their chunks on. False once the stream has ended: an error was sent (the
    /// master is then taken as lost), or the reader is gone.
    async fn master(
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

/// Checks that `url` can name a master at all, over the transport configured (a usage error
/// otherwise, not "unreachable").
pub fn check_url(url: &str, transport: &Transport) -> Result<Endpoint, SyncError> {
    let bad = |why: String| {
        SyncError::Config(format!(
            "master URL {url:?} is invalid: {why} (hint: https://HOST:PORT, or http:// with --insecure)"
        ))
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("it must start with https:// or http://".into()));
    }
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(bad("it names no host".into()));
    }
    if url.starts_with("http://") && !transport.insecure {
        return Err(SyncError::Config(format!(
            "master URL {url} is plain TCP, where anyone on the path can feed this host files; use https:// with tls_ca, tls_cert and tls_key (see README, Trust), or pass --insecure for a test or demo"
        )));
    }
    if url.starts_with("https://") {
        let tls = transport.tls.clone().ok_or_else(|| {
            SyncError::Config(format!("master URL {url} needs TLS material: set tls_ca, tls_cert and tls_key (or --tls-ca, --tls-cert, --tls-key)"))
        })?;
        endpoint =
            endpoint.tls_config(tls).map_err(|e| SyncError::Config(format!("TLS configuration refused: {e}")))?;
    }
    Ok(endpoint)
}

fn lists_from_wire(lists: &[pb::ExclusionList]) -> Vec<PatternList> {
    lists.iter().map(exclusions::wire::from_wire).collect()
}

/// A call's failure in a line: its code and message, and what caused it.
pub fn describe_status(s: &tonic::Status) -> String {
    let mut text = format!("{}: {}", s.code(), s.message());
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        // The message often repeats the first causes already.
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Why one object could not be received.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("master cannot serve object {hash}: {message}")]
    Missing { hash: Hash, message: String },
    #[error("object stream from the master broke: {0}")]
    Broken(String),
    /// This host stopped reading the stream after a bad object; later objects are fetched
    /// one by one.
    #[error("object stream abandoned after a bad object: {0}")]
    Abandoned(String),
    #[error("master sent object {got} where {want} was expected")]
    OutOfOrder { want: Hash, got: String },
    /// A delta arrived but its base could not be read back intact; the object was read to
    /// its end (the stream stays aligned) and should be fetched whole.
    #[error("object {hash} came as a delta, but its base is unusable: {why}")]
    Base { hash: Hash, why: String },
    #[error("object {hash}: {source}")]
    Content {
        hash: Hash,
        #[source]
        source: io::Error,
    },
}

/// Decoded pieces (each at most [`PIECE_BYTES`]) queued between the decode thread and the
/// apply thread: at most this many bytes of content (a large piece's buffer can be up to twice
/// its content, so the memory bound is twice this) …
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// … and at most this many pieces, so a stretch of small files lets the decoder run ahead.
const QUEUE_PIECES: usize = 4096;
const PIECE_BYTES: usize = 128 * 1024;
/// Chunks received off the connection and waiting for the decode thread: at most this many
/// bytes of (mostly compressed) data, in at most this many chunks. Each holds a slice of the
/// connection's receive buffers, which stay allocated while it waits; beyond this bound, the
/// master waits on HTTP/2 flow control.
const NET_BYTES: usize = 2 * 1024 * 1024;
const NET_CHUNKS: usize = 1024;
/// What a queued piece is charged for besides its content (its struct and allocation).
const PIECE_OVERHEAD: usize = 128;

/// What the apply thread reads: a chunk as it came from the master, or (encoding raw) a piece
/// of the decoded content of a zstd or delta chunk.
struct Piece {
    chunk: pb::ObjectChunk,
    /// Bytes this piece took on the wire (a chunk decoded into several pieces counts once).
    wire: u64,
    /// The chunk could not be decoded, or decodes past the object's declared size.
    undecodable: Option<String>,
    /// The object came as a delta whose base could not be used: its data is dropped (the
    /// stream stays aligned) and it is to be fetched whole.
    base_failed: Option<String>,
    /// Decoded from a delta.
    delta: bool,
}

impl queue::Weighed for Result<Piece, String> {
    fn weight(&self) -> usize {
        PIECE_OVERHEAD + self.as_ref().map_or(0, |p| p.chunk.data.len())
    }
}

impl Piece {
    fn passed(chunk: pb::ObjectChunk) -> Piece {
        let wire = chunk.data.len() as u64;
        Piece { chunk, wire, undecodable: None, base_failed: None, delta: false }
    }
}

/// Where the decode stage reads the host's delta bases: one per object (see
/// [`Plan::fetch_bases`](crate::plan::Plan::fetch_bases)), beneath the root, never through a
/// symlink, with every byte charged to `read`.
pub struct Bases {
    pub root: crate::hostfs::root::RootDir,
    pub paths: Vec<Option<(manifest::RelPath, Hash)>>,
    /// Empty, or one per object: the host file whose chunks an object stored as chunks may
    /// reuse (see [`Plan::fetch_seeds`](crate::plan::Plan::fetch_seeds)).
    pub seeds: Vec<Option<manifest::RelPath>>,
    /// Bases offered to the solid delta only (see
    /// [`Plan::solid_bases`](crate::plan::Plan::solid_bases)).
    pub solid: Vec<(manifest::RelPath, Hash)>,
    pub read: throttle::Limiter,
}

impl Bases {
    /// The bases `plan` names for its fetches, read beneath `root` (`None` when it names none:
    /// a cold sync).
    pub fn for_plan(
        root: &crate::hostfs::root::RootDir,
        plan: &crate::plan::Plan,
        read: &throttle::Limiter,
    ) -> Option<Bases> {
        let any = !plan.fetch_bases.is_empty() || !plan.fetch_seeds.is_empty() || !plan.solid_bases.is_empty();
        any.then(|| Bases {
            root: root.share(),
            paths: plan.fetch_bases.clone(),
            seeds: plan.fetch_seeds.clone(),
            solid: plan.solid_bases.clone(),
            read: read.clone(),
        })
    }

    /// The content hash offered as a base for each object (empty without bases).
    fn offered(bases: Option<&Bases>) -> Vec<Option<Hash>> {
        bases.map(|b| b.paths.iter().map(|p| p.as_ref().map(|(_, h)| *h)).collect()).unwrap_or_default()
    }
}

/// How the current object's delta stands in the decode stage.
enum DeltaState {
    /// No delta chunk seen for this object.
    None,
    /// The delta context holds this object's base as its dictionary.
    Ready,
    Failed(String),
}

/// Decodes the zstd and delta chunks of the objects in `objects` (in order) into raw pieces of
/// at most [`PIECE_BYTES`], so the apply thread only writes and verifies. A delta's base is the
/// host file `bases` names for that object, read back (the base the host offered must be the
/// one the master named; the decoded content is verified downstream); if it cannot be used,
/// the object's data is dropped and the object marked for a whole fetch. Raw chunks, errors
/// and anything out of order pass through as they are, for [`ObjectStream::next_into`] to
/// judge. An object decoding past its declared
/// size (a bomb) or not decoding at all is reported once, and the stage stops: nothing after it
/// is trusted to end.
fn decode_stage(
    mut rx: mpsc::Receiver<Result<pb::ObjectChunk, String>>,
    received: &Semaphore,
    tx: queue::Sender<Result<Piece, String>>,
    objects: &[(Hash, u64)],
    mut bases: Option<Bases>,
) {
    use zstd::stream::raw::Operation;
    use zstd::zstd_safe;
    let mut decoder: Option<zstd::stream::raw::Decoder<'static>> = None;
    // One context for every delta, its dictionary replaced per object: creating a context per
    // object cost more than decoding most deltas.
    let mut delta_ctx: Option<zstd_safe::DCtx<'static>> = None;
    let mut delta = DeltaState::None;
    let mut next = 0;
    let mut decoded = 0u64;
    let mut out = Vec::with_capacity(PIECE_BYTES);
    let times = StageTimes::default();
    let _report = times.report_on_drop();
    // Whatever ends this stage also ends the receiving task, should it wait for permits.
    struct Close<'a>(&'a Semaphore);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = Close(received);
    let send = |p: Piece| times.apply.time(|| tx.send(Ok(p)));
    while let Some(item) = times.net.time(|| rx.blocking_recv()) {
        let mut chunk = match item {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // The chunk's receive buffer is freed (or, passed on, counted in the piece queue).
        let _release = Release(received, net_weight(&chunk));
        let expected = objects.get(next).filter(|(h, _)| chunk.hash.as_ref() == h.0).copied();
        let last = chunk.last;
        let usable = expected.is_some() && chunk.error.is_empty() && !chunk.data.is_empty();
        let encoding = pb::Encoding::try_from(chunk.encoding);
        let ok = match (expected, encoding) {
            (Some((_, size)), Ok(pb::Encoding::Zstd)) if usable => {
                if decoder.is_none() {
                    match new_decoder() {
                        Ok(d) => decoder = Some(d),
                        Err(e) => {
                            let piece =
                                Piece { undecodable: Some(format!("no zstd decoder: {e}")), ..Piece::passed(chunk) };
                            let _ = send(piece);
                            return;
                        }
                    }
                }
                let d = decoder.as_mut().expect("just set");
                let mut run =
                    |i: &mut zstd_safe::InBuffer<'_>, o: &mut zstd_safe::OutBuffer<'_, Vec<u8>>| d.run(i, o).map(drop);
                decode_pieces(&mut run, &chunk, size, &mut decoded, &mut out, false, &send)
            }
            (Some((want, size)), Ok(pb::Encoding::ZstdDelta)) if usable => {
                let ctx = delta_ctx.get_or_insert_with(zstd_safe::DCtx::create);
                if matches!(delta, DeltaState::None) {
                    let offered = bases.as_mut().and_then(|b| b.paths.get(next).cloned().flatten().map(|p| (b, p)));
                    delta = match times.base.time(|| load_base(ctx, offered, &chunk.base, &want)) {
                        Ok(()) => DeltaState::Ready,
                        Err(why) => DeltaState::Failed(why),
                    };
                }
                match &mut delta {
                    DeltaState::Ready => {
                        let mut run = |i: &mut zstd_safe::InBuffer<'_>, o: &mut zstd_safe::OutBuffer<'_, Vec<u8>>| {
                            ctx.decompress_stream(o, i).map(drop).map_err(zstd_error)
                        };
                        decode_pieces(&mut run, &chunk, size, &mut decoded, &mut out, true, &send)
                    }
                    DeltaState::Failed(why) => {
                        let why = why.clone();
                        let wire = chunk.data.len() as u64;
                        chunk.data = bytes::Bytes::new();
                        send(Piece { wire, base_failed: Some(why), ..Piece::passed(chunk) })
                    }
                    DeltaState::None => unreachable!("set above"),
                }
            }
            _ => {
                // A chunk's data is a slice of the connection's receive buffer, which a small
                // one would keep alive (with every other message in it) while it is queued.
                if chunk.data.len() < PIECE_BYTES / 2 {
                    chunk.data = bytes::Bytes::copy_from_slice(&chunk.data);
                }
                send(Piece::passed(chunk))
            }
        };
        if !ok {
            return;
        }
        if expected.is_some() && last {
            next += 1;
            decoded = 0;
            delta = DeltaState::None;
            if let Some(d) = decoder.as_mut() {
                let _ = d.reinit();
            }
        }
    }
}

/// Permits the receiving task took for a chunk, given back when the decode stage is done with it.
struct Release<'a>(&'a Semaphore, u32);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.add_permits(self.1 as usize);
    }
}

/// What a received chunk takes of [`NET_BYTES`] (a chunk larger than all of it, which no
/// master sends, takes all of it, and passes alone).
fn net_weight(chunk: &pb::ObjectChunk) -> u32 {
    chunk.data.len().min(NET_BYTES) as u32
}

/// Where the decode thread's time went, logged at debug level when it ends: waiting for the
/// network, waiting for the apply thread to take pieces, and reading delta bases.
#[derive(Default)]
struct StageTimes {
    net: Stopwatch,
    apply: Stopwatch,
    base: Stopwatch,
}

impl StageTimes {
    fn report_on_drop(&self) -> impl Drop + '_ {
        struct Report<'a>(&'a StageTimes, std::time::Instant);
        impl Drop for Report<'_> {
            fn drop(&mut self) {
                let t = self.0;
                tracing::debug!(
                    secs = self.1.elapsed().as_secs_f64(),
                    waiting_for_network = t.net.secs(),
                    waiting_for_apply = t.apply.secs(),
                    reading_bases = t.base.secs(),
                    "object decode thread done"
                );
            }
        }
        Report(self, std::time::Instant::now())
    }
}

/// Time summed over the calls it wraps (one thread's).
#[derive(Default)]
pub struct Stopwatch(std::cell::Cell<Duration>);

impl Stopwatch {
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let r = f();
        self.0.set(self.0.get() + t.elapsed());
        r
    }

    pub fn secs(&self) -> f64 {
        self.0.get().as_secs_f64()
    }
}

fn new_decoder() -> io::Result<zstd::stream::raw::Decoder<'static>> {
    let mut d = zstd::stream::raw::Decoder::new()?;
    d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
    Ok(d)
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

/// Prepares `ctx` to decode one delta object of content `want`: the base the host offered for
/// it, read back, becomes its dictionary. `named` is the base the master says it used.
fn load_base(
    ctx: &mut zstd::zstd_safe::DCtx<'static>,
    offered: Option<(&mut Bases, (manifest::RelPath, Hash))>,
    named: &[u8],
    want: &Hash,
) -> Result<(), String> {
    let named = Hash::from_slice(named).ok_or("the master named no 32-byte base")?;
    let Some((bases, (path, hash))) = offered else {
        return Err(format!("this host offered no base for {want}, the master named {named}"));
    };
    if hash != named {
        return Err(format!("the master named base {named}, this host offered {hash}"));
    }
    // Not re-hashed here: the decoded content is verified against its own hash before it is
    // renamed into place, so a base that changed since the scan only costs a whole fetch of
    // the object (after a hash mismatch), never wrong content. Hashing every base again cost
    // the decode thread, the upgrade's critical path, about 0.05 s per bookworm minbase.
    let content = read_base(&mut bases.root, &path, &bases.read).map_err(|e| format!("cannot read {path}: {e}"))?;
    let zerr = |code: usize| zstd_error(code).to_string();
    ctx.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters).map_err(zerr)?;
    ctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG)).map_err(zerr)?;
    ctx.load_dictionary(&content).map_err(zerr)?;
    Ok(())
}

/// Reads a delta base beneath the root (no symlink followed), at most one byte past the
/// largest base a delta is made against.
fn read_base(
    root: &mut crate::hostfs::root::RootDir,
    path: &manifest::RelPath,
    read: &throttle::Limiter,
) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::fd::AsFd;
    let (dir, name) = root.parent(path)?;
    let (file, size) = crate::hostfs::fsops::open_regular_sized(dir.as_fd(), name)?;
    let cap = manifest::delta::MAX_DELTA_BYTES + 1;
    // Sized from fstat, so the read needs no regrowth (the Take below hides the size).
    let size = size.min(cap);
    let mut data = Vec::with_capacity(size as usize + 1);
    throttle::Throttled::new(file, read).take(cap).read_to_end(&mut data)?;
    Ok(data)
}

/// One streaming zstd decode step, of whichever decoder.
type ZstdStep<'a> =
    dyn FnMut(&mut zstd::zstd_safe::InBuffer<'_>, &mut zstd::zstd_safe::OutBuffer<'_, Vec<u8>>) -> io::Result<()> + 'a;

/// Decodes one chunk with `run` (one zstd streaming step) into pieces, sent through `send`;
/// false once the stage must stop (the apply thread left, or the content is undecodable or
/// too long). Pieces are decoded into `out` (uninitialized capacity: no zero-fill); a large
/// piece is sent in that buffer itself, and `out` replaced.
fn decode_pieces(
    run: &mut ZstdStep<'_>,
    chunk: &pb::ObjectChunk,
    size: u64,
    decoded: &mut u64,
    out: &mut Vec<u8>,
    delta: bool,
    send: &dyn Fn(Piece) -> bool,
) -> bool {
    use zstd::zstd_safe::{InBuffer, OutBuffer};
    let mut wire = chunk.data.len() as u64;
    let mut inb = InBuffer::around(&chunk.data);
    loop {
        out.clear();
        let mut outb = OutBuffer::around(&mut *out);
        let step = run(&mut inb, &mut outb);
        let n = outb.pos();
        out.truncate(n);
        // A large piece takes the buffer with it (no copy); a small one is copied out, so it
        // holds only its own bytes while it waits in the queue.
        let data = if n >= PIECE_BYTES / 2 {
            bytes::Bytes::from(std::mem::replace(out, Vec::with_capacity(PIECE_BYTES)))
        } else {
            bytes::Bytes::copy_from_slice(out)
        };
        *decoded += n as u64;
        let problem = match step {
            Err(e) => Some(e.to_string()),
            Ok(_) if *decoded > size => Some(format!("content exceeds its declared size ({size} bytes) as it decodes")),
            Ok(_) => None,
        };
        let done = inb.pos() == chunk.data.len() && n < PIECE_BYTES;
        let piece = pb::ObjectChunk {
            hash: chunk.hash.clone(),
            data,
            encoding: pb::Encoding::Raw as i32,
            last: done && chunk.last,
            ..Default::default()
        };
        let stop = problem.is_some();
        let wire = std::mem::take(&mut wire);
        if !send(Piece { chunk: piece, wire, undecodable: problem, base_failed: None, delta }) || stop {
            return false;
        }
        if done {
            return true;
        }
    }
}

/// The receiving end of [`Master::spawn_fetch`], read from the blocking apply thread.
pub struct ObjectStream {
    rx: queue::Receiver<Result<Piece, String>>,
    broken: Option<String>,
    /// Set when this host cut the stream (endless or undecodable object), as opposed to the
    /// master or the network breaking it.
    abandoned: Option<String>,
    pub wire_bytes: u64,
    pub objects: u64,
    pub bytes: u64,
    /// Objects that came as deltas against a host file.
    pub deltas: u64,
    /// Time the reader spent waiting for pieces.
    pub waited: Stopwatch,
    /// Set when the stream reads from an object store: where each object came from.
    pub store: Option<Arc<StoreTally>>,
}

impl ObjectStream {
    /// A stream with no objects, for a pass whose content all comes from the host (a commit
    /// from the local store, a rollback): nothing is requested and nothing is read.
    pub fn empty() -> ObjectStream {
        ObjectStream::reading(queue::bounded::<Result<Piece, String>>(1, 1).1, None)
    }

    /// A stream reading the decoded pieces from `rx`.
    fn reading(rx: queue::Receiver<Result<Piece, String>>, store: Option<Arc<StoreTally>>) -> ObjectStream {
        ObjectStream {
            rx,
            broken: None,
            abandoned: None,
            wire_bytes: 0,
            objects: 0,
            bytes: 0,
            deltas: 0,
            waited: Stopwatch::default(),
            store,
        }
    }

    /// Reads the stream to its end, so its HTTP/2 stream closes cleanly instead of being
    /// reset: a server counts resets, and a host that reset many single-object fetches would
    /// be told to go away (ENHANCE_YOUR_CALM), taking the main stream with it.
    pub fn finish(self) {
        if self.broken.is_none() && self.abandoned.is_none() {
            while self.rx.recv().is_some() {}
        }
    }

    /// Reads the next object, which must be `hash` of `size` bytes, into `sink` (if any), as
    /// the decode stage decoded it. An object that arrives whole is read to its end, so the
    /// stream stays aligned even when its content is wrong or its delta base unusable. One that
    /// runs past what `size` bytes can take on the wire (endless data), or fails to decode,
    /// breaks the stream at once: nothing more is read from it, and later objects fall back to
    /// fetches of their own.
    pub fn next_into<W: Write>(&mut self, hash: Hash, size: u64, sink: Option<&mut W>) -> Result<(), ObjectError> {
        let r = self.next_object_into(hash, size, sink);
        if r.is_ok() {
            crate::progress::fetched(size);
        }
        r
    }

    fn next_object_into<W: Write>(
        &mut self,
        hash: Hash,
        size: u64,
        mut sink: Option<&mut W>,
    ) -> Result<(), ObjectError> {
        if let Some(b) = &self.broken {
            return Err(ObjectError::Broken(b.clone()));
        }
        if let Some(b) = &self.abandoned {
            return Err(ObjectError::Abandoned(b.clone()));
        }
        // Raw chunks carry exactly `size` bytes; zstd frames of incompressible data add well
        // under 1% plus headers.
        let wire_cap = size + size / 64 + 64 * 1024;
        let mut object_wire = 0u64;
        // A delta whose base cannot be used: the rest of the object is read and dropped.
        let mut base_failed: Option<String> = None;
        let mut delta = false;
        loop {
            let Piece { chunk, wire, undecodable, base_failed: unusable, delta: decoded_delta } =
                match self.waited.time(|| self.rx.recv()) {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        self.broken = Some(e.clone());
                        return Err(ObjectError::Broken(e));
                    }
                    None => {
                        let e = "the master closed the stream early".to_owned();
                        self.broken = Some(e.clone());
                        return Err(ObjectError::Broken(e));
                    }
                };
            if chunk.hash.as_ref() != hash.0 {
                let e = format!("master sent object {} where {hash} was expected", hex::encode(&chunk.hash));
                self.broken = Some(e.clone());
                return Err(ObjectError::OutOfOrder { want: hash, got: hex::encode(&chunk.hash) });
            }
            self.wire_bytes += wire;
            object_wire += wire;
            if !chunk.error.is_empty() {
                return Err(ObjectError::Missing { hash, message: chunk.error });
            }
            if let Some(e) = undecodable {
                // Undecodable, or a bomb: whatever follows cannot be trusted to end.
                self.abandoned = Some(format!("object {hash}: {e}"));
                return Err(ObjectError::Content { hash, source: io::Error::new(io::ErrorKind::InvalidData, e) });
            }
            if object_wire > wire_cap {
                let e = format!(
                    "object {hash} runs past {object_wire} bytes on the wire for a declared {size}: cut off (endless data)"
                );
                self.abandoned = Some(e.clone());
                return Err(ObjectError::Content { hash, source: io::Error::new(io::ErrorKind::InvalidData, e) });
            }
            delta |= decoded_delta;
            if base_failed.is_none() {
                base_failed = unusable;
            }
            if !chunk.data.is_empty() && base_failed.is_none() {
                let r = match pb::Encoding::try_from(chunk.encoding) {
                    Ok(pb::Encoding::Raw) => sink.as_mut().map_or(Ok(()), |s| s.write_all(&chunk.data)),
                    // The decode stage decodes every chunk of the object it expects.
                    Ok(e) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{} chunk left undecoded", e.as_str_name()),
                    )),
                    Err(_) => Err(io::Error::other(format!("unknown encoding {}", chunk.encoding))),
                };
                if let Err(e) = r {
                    // Too much content, or undecodable: whatever follows cannot be trusted
                    // to end, so stop reading here.
                    self.abandoned = Some(format!("object {hash}: {e}"));
                    return Err(ObjectError::Content { hash, source: e });
                }
            }
            if chunk.last {
                break;
            }
        }
        if let Some(why) = base_failed {
            return Err(ObjectError::Base { hash, why });
        }
        if delta {
            self.deltas += 1;
        }
        self.objects += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_stage(chunks: Vec<pb::ObjectChunk>, objects: Vec<(Hash, u64)>) -> Vec<Piece> {
        let (tx, rx) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.try_send(Ok(c)).unwrap();
        }
        drop(tx);
        let (ptx, prx) = queue::bounded(QUEUE_BYTES, QUEUE_PIECES);
        let sem = Semaphore::new(NET_BYTES);
        let t = std::thread::spawn(move || decode_stage(rx, &sem, ptx, &objects, None));
        let mut out = Vec::new();
        while let Some(p) = prx.recv() {
            out.push(p.unwrap());
        }
        t.join().unwrap();
        out
    }

    fn chunk(hash: Hash, data: &[u8], encoding: pb::Encoding, last: bool) -> pb::ObjectChunk {
        pb::ObjectChunk {
            hash: bytes::Bytes::copy_from_slice(&hash.0),
            data: bytes::Bytes::copy_from_slice(data),
            encoding: encoding as i32,
            last,
            ..Default::default()
        }
    }

    #[test]
    fn the_decode_stage_splits_objects_into_bounded_raw_pieces_and_counts_the_wire_once() {
        // 1 MiB, compressible, sent as one zstd frame cut into three chunks; then a raw object.
        let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect();
        let frame = zstd::bulk::compress(&content, 3).unwrap();
        let (a, b) = (Hash::of(&content), Hash::of(b"raw"));
        let third = frame.len() / 3;
        let chunks = vec![
            chunk(a, &frame[..third], pb::Encoding::Zstd, false),
            chunk(a, &frame[third..2 * third], pb::Encoding::Zstd, false),
            chunk(a, &frame[2 * third..], pb::Encoding::Zstd, true),
            chunk(b, b"raw", pb::Encoding::Raw, true),
        ];
        let pieces = run_stage(chunks, vec![(a, content.len() as u64), (b, 3)]);
        let (of_a, of_b): (Vec<&Piece>, Vec<&Piece>) = pieces.iter().partition(|p| p.chunk.hash.as_ref() == a.0);
        let decoded: Vec<u8> = of_a.iter().flat_map(|p| p.chunk.data.to_vec()).collect();
        assert_eq!(decoded, content);
        assert!(of_a.iter().all(|p| p.chunk.encoding == pb::Encoding::Raw as i32 && p.chunk.data.len() <= PIECE_BYTES));
        assert!(of_a.len() >= 8, "1 MiB comes in pieces of at most 128 KiB");
        assert_eq!(of_a.iter().filter(|p| p.chunk.last).count(), 1);
        assert!(of_a.last().unwrap().chunk.last, "only the final piece ends the object");
        assert_eq!(of_a.iter().map(|p| p.wire).sum::<u64>(), frame.len() as u64);
        assert_eq!(of_b.len(), 1);
        assert_eq!((of_b[0].chunk.data.as_ref(), of_b[0].wire, of_b[0].chunk.last), (&b"raw"[..], 3, true));
    }

    #[test]
    fn the_decode_stage_reports_a_bomb_once_and_stops() {
        let frame = zstd::bulk::compress(&vec![0u8; 4 << 20], 3).unwrap();
        let (a, b) = (Hash::of(b"a"), Hash::of(b"b"));
        let chunks = vec![chunk(a, &frame, pb::Encoding::Zstd, true), chunk(b, b"b", pb::Encoding::Raw, true)];
        let pieces = run_stage(chunks, vec![(a, 1000), (b, 1)]);
        let last = pieces.last().unwrap();
        assert!(last.undecodable.as_deref().unwrap().contains("exceeds its declared size"));
        assert!(pieces.iter().all(|p| p.chunk.hash.as_ref() == a.0), "nothing after the bomb is passed on");
        assert!(pieces.iter().map(|p| p.chunk.data.len()).sum::<usize>() <= 1000 + PIECE_BYTES);
    }

    #[test]
    fn chunks_out_of_order_pass_through_undecoded() {
        let frame = zstd::bulk::compress(b"hello", 3).unwrap();
        let (a, other) = (Hash::of(b"hello"), Hash::of(b"other"));
        let pieces = run_stage(vec![chunk(other, &frame, pb::Encoding::Zstd, true)], vec![(a, 5)]);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].chunk.encoding, pb::Encoding::Zstd as i32, "left for next_into to refuse");
    }
}

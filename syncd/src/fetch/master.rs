//! The connection to the master: its calls (manifest, objects, watch, report) and the
//! streams they open.

use std::sync::Arc;
use std::time::Duration;

use exclusions::PatternList;
use manifest::wire::ManifestAssembler;
use manifest::{Hash, Manifest};
use proto::v1 as pb;
use proto::v1::image_sync_client::ImageSyncClient;
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;

use super::chunked;
use super::decode::{decode_stage, Bases, Piece, NET_BYTES, NET_CHUNKS, QUEUE_BYTES, QUEUE_PIECES};
use super::packs;
use super::queue;
use super::store::{open_object, Pump, StoreSource, StoreTally};
use super::stream::ObjectStream;
use super::transport::{
    check_url, describe_status, lists_from_wire, no_reply, secs, stalled, within, Deadlines, StoreConfig, Transport,
    DELTA_GET_MIN,
};
use crate::error::{chain, SyncError};

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
    /// The files the master rendered for this host, when it rendered any.
    pub render: Option<Render>,
}

/// Files the master rendered for this host from templates in the image (see README, Per-host
/// files): the host and serial the signature binds them to, and each path with its template.
#[derive(Clone, Debug, Default)]
pub struct Render {
    pub binding: Option<manifest::trust::RenderBinding>,
    pub files: Vec<(manifest::RelPath, String)>,
}

impl Render {
    fn of(asm: &ManifestAssembler) -> Option<Render> {
        let binding = asm.binding()?;
        Some(Render { binding: Some(binding), files: asm.rendered() })
    }

    /// The template `path` was rendered from, if it was.
    pub fn template_of(&self, path: &manifest::RelPath) -> Option<&str> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, t)| t.as_str())
    }

    /// The content hashes of the rendered files in `m` (the manifest they are laid over):
    /// only the master has them.
    pub fn hashes(r: Option<&Render>, m: &Manifest) -> Vec<Hash> {
        r.iter().flat_map(|r| r.files.iter()).filter_map(|(p, _)| m.get(p)?.hash).collect()
    }

    /// The signed serial (0: nothing rendered).
    pub fn serial(r: Option<&Render>) -> u64 {
        r.and_then(|r| r.binding.as_ref()).map_or(0, |b| b.serial)
    }
}

pub(super) fn bad_stream(what: &str) -> SyncError {
    SyncError::BadManifest(manifest::ManifestError::BadField { path: "(stream)".into(), what: what.into() })
}

#[derive(Clone)]
pub struct Master {
    pub(super) url: String,
    pub(super) client: ImageSyncClient<Channel>,
    /// A second connection, opened on first use, for single-object fetches made while the
    /// main object stream is open. On the main connection they would wait for flow-control
    /// window that only the main stream's unread data can free, which the apply thread, busy
    /// with the single fetch, will never read: a deadlock.
    pub(super) side: ImageSyncClient<Channel>,
    /// Charged for every object byte received.
    pub(super) net: throttle::Limiter,
    pub(super) deadlines: Deadlines,
    pub(super) store_config: StoreConfig,
    /// Set by [`Master::with_store`]: [`Master::spawn_fetch`] reads from this store.
    pub(super) store: Option<Arc<StoreSource>>,
    /// Objects this large are stored as chunks in the store (0: none): see [`chunked`].
    pub(super) chunk_threshold: u64,
    /// Objects only the master has: files it rendered for this host, never in the store.
    pub(super) master_only: Arc<std::collections::HashSet<Hash>>,
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

    pub(super) async fn connect_pinging(
        url: &str,
        transport: &Transport,
        while_idle: bool,
    ) -> Result<Master, SyncError> {
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
        let connecting = async { endpoint.connect().await.map_err(|e| unreachable(&chain(&e))) };
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
            master_only: Arc::default(),
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
                let e = SyncError::ObjectStore { source: e, hint };
                if cfg.url.is_some() || !cfg.fallback {
                    return Err(e);
                }
                tracing::warn!("{e}; fetching every object from the master");
            }
        }
        Ok(self)
    }

    /// `hashes` (the content of files the master rendered for this host) come from the master
    /// even with an object store: they are not in it.
    pub fn with_master_only(mut self, hashes: impl IntoIterator<Item = Hash>) -> Master {
        self.master_only = Arc::new(hashes.into_iter().collect());
        self
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
                render: Render::of(&header),
            });
        }
        let identity = asm.identity();
        let render = Render::of(&asm);
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
            render,
        })
    }

    /// Only this host's exclusion lists and the files rendered for it (each with its
    /// template): reads the manifest header and hangs up.
    pub async fn exclusion_lists(
        &self,
        host_id: &str,
    ) -> Result<(Vec<PatternList>, Vec<(manifest::RelPath, String)>), SyncError> {
        let mut stream = self.open_manifest(host_id, None).await?;
        match self.next_message(&mut stream, "manifest").await? {
            Some(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h)) }) => {
                let lists = lists_from_wire(&h.exclusions);
                let mut header = ManifestAssembler::default();
                header
                    .push(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h)) })
                    .map_err(SyncError::BadManifest)?;
                Ok((lists, header.rendered()))
            }
            _ => Err(SyncError::BadManifest(manifest::ManifestError::NoHeader)),
        }
    }

    pub(super) async fn open_manifest(
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
    pub(super) async fn next_message<T>(
        &self,
        stream: &mut tonic::Streaming<T>,
        what: &str,
    ) -> Result<Option<T>, SyncError> {
        let next = async { stream.message().await.map_err(|s| self.status_error(s)) };
        within(self.deadlines.stream_idle, next, || SyncError::Unreachable {
            url: self.url.clone(),
            reason: stalled(&self.deadlines, what, false),
        })
        .await
    }

    /// `call` got no reply within `rpc_timeout`.
    pub(super) fn timed_out(&self, call: &str) -> SyncError {
        SyncError::Unreachable { url: self.url.clone(), reason: no_reply(&self.deadlines, call, false) }
    }

    pub(super) fn status_error(&self, s: tonic::Status) -> SyncError {
        if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) {
            return SyncError::Refused { url: self.url.clone(), message: s.message().to_owned() };
        }
        // The only refusal of this kind a master sends: it could not render this host's files.
        if s.code() == tonic::Code::FailedPrecondition {
            return SyncError::Render { url: self.url.clone(), message: s.message().to_owned() };
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

    /// This master as the apply's source of single objects, received on `rt`.
    pub fn aside(self, rt: tokio::runtime::Handle) -> Aside {
        Aside { master: self, rt }
    }

    /// Requests `objects` (hash, declared size) in order. The stream is received on `rt`, and
    /// whole-object zstd frames are decoded on a thread of their own ([`decode_stage`]), so the
    /// apply thread only writes and verifies.
    pub(super) fn spawn_fetch_on(
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

    pub(super) fn pump(&self) -> Pump {
        Pump { url: self.url.clone(), net: self.net.clone(), d: self.deadlines }
    }

    /// Like [`Master::spawn_fetch_on`], from the object store: GETs up to
    /// `object_store_concurrency` ahead, their chunks passed on in order. An object offered a
    /// base is first asked for as a delta against it (`deltas/…`; not there: the whole object),
    /// decoded by the same stage as the master's deltas. An object
    /// the store fails to give comes from the master in its place (a `FetchObjects` of its
    /// own, on the main connection, which this stream leaves idle), or with
    /// `object_store_fallback` off, breaks the stream.
    pub(super) fn spawn_fetch_store(
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
                Some((*to, offered, b.files.share()))
            }
            _ => None,
        };
        let seeds = bases.as_ref().and_then(chunked::Seeds::from_bases);
        let (tx, received, stream) = start_stream(objects.clone(), bases, Some(tally.clone()));
        let pump = self.pump();
        let client = self.client.clone();
        let threshold = self.chunk_threshold;
        let master_only = self.master_only.clone();
        rt.spawn(async move {
            use futures_util::stream::StreamExt;
            let d = pump.d;
            let store = &src.store;
            let mut solid = None;
            if let Some((to, paths, files)) = solid_src {
                if let Some(plan) = crate::solid::plan(store, &to, &objects, &paths, d.rpc).await {
                    tally.solid_wire.fetch_add(plan.index_bytes, std::sync::atomic::Ordering::Relaxed);
                    tally.bytes.fetch_add(plan.index_bytes, std::sync::atomic::Ordering::Relaxed);
                    solid = Some(crate::solid::SolidReader::new(Arc::new(plan), files));
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
            let only_master = |i: usize| master_only.contains(&objects[i].0);
            let own: Vec<bool> = (0..objects.len())
                .map(|i| covered[i] || large(i) || delta_base(i).is_some() || only_master(i))
                .collect();
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
                    let rendered = matches!(u, packs::Unit::Loose(i) if only_master(i));
                    async move {
                        let r = match u {
                            // Rendered for this host by the master: not in the store.
                            packs::Unit::Loose(_) if rendered => Ok(packs::Opened::Master),
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
                    (packs::Unit::Loose(i), Ok(packs::Opened::Master)) => {
                        if !pump.master(client.clone(), &[objects[i].0], &[], &tx, &received).await {
                            return;
                        }
                        continue;
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
pub(super) fn start_stream(
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

/// The master as a source of single objects for the apply (see [`Master::aside`]).
pub struct Aside {
    master: Master,
    rt: tokio::runtime::Handle,
}

impl crate::apply::ContentSource for Aside {
    fn fetch_one(&self, hash: Hash, size: u64) -> ObjectStream {
        self.master.spawn_fetch_aside(vec![(hash, size)], &self.rt)
    }
}

//! The gRPC service: manifests, objects, version announcements, reports, fleet and rollout
//! status and control. Each RPC checks who is asking (mTLS) before it answers.

use std::sync::Arc;

use bytes::Bytes;
use manifest::Hash;
use proto::v1 as pb;
use proto::v1::image_sync_server::{ImageSync, ImageSyncServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::encode::{send_bytes, send_object, Batcher};
use crate::{control, fleet, identity, metrics, publish, render};

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
    /// The same certificate, key and client CA for the fleet page's HTTPS ([`crate::web`]); `Some`
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
    /// The inventory in use and every host's rendered files.
    renders: Arc<render::Renders>,
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
        renders: Arc<render::Renders>,
        zstd_level: i32,
        security: &Security,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Service {
        Service {
            stopping,
            published: control.published().clone(),
            control,
            fleet,
            renders,
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
        // This host's rendered files, laid over the image (rendering may run validation
        // commands: off the async workers). A render that fails fails this host's pass.
        let rendered = {
            let (renders, image, host) = (self.renders.clone(), image.clone(), host.clone());
            tokio::task::spawn_blocking(move || renders.for_host(&image, &host))
                .await
                .map_err(|e| Status::internal(format!("rendering failed: {e}")))?
                .map_err(|e| Status::failed_precondition(e.to_string()))?
        };
        let identity = rendered.as_ref().map_or(image.identity, |r| r.identity);
        // A host that holds this very tree gets the signed header alone.
        let omit = req.get_ref().cached_identity.as_ref() == identity.0.as_slice();
        let accept_packed = req.get_ref().accept_packed;
        tracing::info!(host = %host, version = image.manifest.version, entries = image.manifest.entries.len(), rendered = rendered.as_ref().map_or(0, |r| r.entries.len()), cached = omit, "manifest requested");
        // Only this host's own inventory entry travels with its manifest.
        let lists: Vec<pb::ExclusionList> =
            self.renders.inventory().lists_for(&host).iter().map(exclusions::wire::to_wire).collect();
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
                    let binding = rendered.as_ref().map(|r| {
                        h.image_identity = Bytes::copy_from_slice(&h.identity);
                        h.identity = Bytes::copy_from_slice(&r.identity.0);
                        h.rendered = r.entries.iter().map(manifest::wire::entry_to_wire).collect();
                        h.rendered_templates = r.templates.clone();
                        h.rendered_for = host.clone();
                        h.render_serial = r.serial;
                        manifest::trust::RenderBinding { host: host.clone(), serial: r.serial }
                    });
                    if let (Some((key, ttl)), Some(id)) = (&signer, Hash::from_slice(&h.identity)) {
                        let expires = manifest::trust::now_unix() + ttl.as_secs().max(1);
                        let sig = key.sign_bound(&id, h.version, expires, binding.as_ref());
                        h.signature = Some(manifest::wire::signature_to_wire(&sig));
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
        let renders = self.renders.clone();
        let level = self.zstd_level;
        // Reading and compressing are blocking work: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut out = Batcher::new(tx);
            for (i, h) in hashes.into_iter().enumerate() {
                let base = bases.get(i).copied().flatten();
                let sent = match renders.object(&h) {
                    // A file rendered for a host: from memory, raw (they are small).
                    Some(content) => send_bytes(h, content, &mut out),
                    None => send_object(&published, h, base, level, &mut out),
                };
                if !sent {
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
        let renders = self.renders.clone();
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
                    // The identity this host is served: with its rendered files, if any (a
                    // render that fails announces the image's, and the host's pass says why).
                    let (r, i, h) = (renders.clone(), img.clone(), host.clone());
                    let rendered = tokio::task::spawn_blocking(move || r.for_host(&i, &h)).await;
                    let identity = match rendered {
                        Ok(Ok(Some(r))) => r.identity,
                        _ => img.identity,
                    };
                    let now = (img.manifest.version, identity);
                    if last != Some(now) {
                        last = Some(now);
                        let ann = pb::VersionAnnouncement {
                            version: img.manifest.version,
                            identity: Bytes::copy_from_slice(&identity.0),
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
        // A host served rendered files reports the identity of its render; rollouts and the
        // fleet view judge the image's.
        if let Some(base) = Hash::from_slice(&r.identity).and_then(|id| self.renders.image_identity_of(&id)) {
            r.identity = Bytes::copy_from_slice(&base.0);
        }
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

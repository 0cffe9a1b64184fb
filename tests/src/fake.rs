//! A hostile master: a real gRPC server on `127.0.0.1:0` that sends whatever a test scripts —
//! crafted manifests, wrong or endless objects, decompression bombs, forged signatures.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use manifest::Hash;
use proto::v1 as pb;
use proto::v1::image_sync_server::{ImageSync, ImageSyncServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// What the fake master answers to a fetch of one object.
#[derive(Clone)]
pub enum Reply {
    /// These bytes, raw, as one object of declared size `size`.
    Raw { size: u64, data: Vec<u8> },
    /// A zstd frame, declared as `size` bytes.
    Zstd { size: u64, frame: Vec<u8> },
    /// A zstd delta frame against `base` (a 32-byte hash), declared as `size` bytes.
    Delta { size: u64, base: Vec<u8>, frame: Vec<u8> },
    /// Chunks with `last = false`, forever.
    Endless,
}

type Objects = Arc<dyn Fn(&Hash) -> Reply + Send + Sync>;

#[derive(Clone)]
struct Fake {
    manifest: Arc<Vec<pb::ManifestMessage>>,
    objects: Objects,
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl ImageSync for Fake {
    type GetManifestStream = Stream<pb::ManifestMessage>;
    type FetchObjectsStream = Stream<pb::ObjectBatch>;
    type WatchStream = Stream<pb::VersionAnnouncement>;

    async fn get_manifest(&self, _: Request<pb::ManifestRequest>) -> Result<Response<Self::GetManifestStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let msgs = self.manifest.clone();
        tokio::spawn(async move {
            for m in msgs.iter() {
                if tx.send(Ok(m.clone())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_objects(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchObjectsStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let objects = self.objects.clone();
        let hashes = req.into_inner().hashes;
        tokio::spawn(async move {
            for h in hashes {
                let hash = Hash::from_slice(&h).expect("32-byte hash");
                let chunk = |size: u64, encoding: pb::Encoding, data: &[u8], last: bool| {
                    chunk_with(&h, size, encoding, data, last, &[])
                };
                let chunks: Box<dyn Iterator<Item = pb::ObjectChunk> + Send> = match objects(&hash) {
                    Reply::Raw { size, data } => {
                        Box::new(split(&data, |p, last| chunk(size, pb::Encoding::Raw, p, last)))
                    }
                    Reply::Zstd { size, frame } => {
                        Box::new(split(&frame, |p, last| chunk(size, pb::Encoding::Zstd, p, last)))
                    }
                    Reply::Delta { size, base, frame } => {
                        Box::new(split(&frame, |p, last| chunk_with(&h, size, pb::Encoding::ZstdDelta, p, last, &base)))
                    }
                    Reply::Endless => {
                        let junk = vec![0x5a; 65536];
                        Box::new(std::iter::repeat_with(move || chunk(1, pb::Encoding::Raw, &junk, false)))
                    }
                };
                for c in chunks {
                    if tx.send(Ok(pb::ObjectBatch { chunks: vec![c] })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn watch(&self, _: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake master"))
    }

    async fn report_pass(&self, _: Request<pb::PassResult>) -> Result<Response<pb::ReportAck>, Status> {
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn fleet_status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        Err(Status::unimplemented("fake master"))
    }

    async fn rollout_status(
        &self,
        _: Request<pb::RolloutStatusRequest>,
    ) -> Result<Response<pb::RolloutStatusReply>, Status> {
        Err(Status::unimplemented("fake master"))
    }

    async fn rollout_control(
        &self,
        _: Request<pb::RolloutControlRequest>,
    ) -> Result<Response<pb::RolloutStatusReply>, Status> {
        Err(Status::unimplemented("fake master"))
    }

    async fn rollout_events(
        &self,
        _: Request<pb::RolloutEventsRequest>,
    ) -> Result<Response<pb::RolloutEventsReply>, Status> {
        Err(Status::unimplemented("fake master"))
    }
}

fn chunk_with(
    hash: &Bytes,
    size: u64,
    encoding: pb::Encoding,
    data: &[u8],
    last: bool,
    base: &[u8],
) -> pb::ObjectChunk {
    pb::ObjectChunk {
        hash: hash.clone(),
        size,
        encoding: encoding as i32,
        data: Bytes::copy_from_slice(data),
        last,
        error: String::new(),
        base: Bytes::copy_from_slice(base),
    }
}

/// `data` in pieces of 64 KiB (at least one, empty for empty data), each made into a chunk.
fn split(data: &[u8], mut chunk: impl FnMut(&[u8], bool) -> pb::ObjectChunk) -> std::vec::IntoIter<pb::ObjectChunk> {
    let n = data.len().div_ceil(65536).max(1);
    let pieces: Vec<_> = (0..n)
        .map(|i| chunk(&data[(i * 65536).min(data.len())..((i + 1) * 65536).min(data.len())], i + 1 == n))
        .collect();
    pieces.into_iter()
}

/// A running fake master; stops when dropped.
pub struct FakeMaster {
    url: String,
    _rt: tokio::runtime::Runtime,
}

impl FakeMaster {
    /// Serves `manifest` (the messages exactly as given) and answers fetches with `objects`.
    pub fn start(
        manifest: Vec<pb::ManifestMessage>,
        objects: impl Fn(&Hash) -> Reply + Send + Sync + 'static,
    ) -> FakeMaster {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let fake = Fake { manifest: Arc::new(manifest), objects: Arc::new(objects) };
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(
                    ImageSyncServer::new(fake)
                        .max_decoding_message_size(proto::MAX_MESSAGE)
                        .max_encoding_message_size(proto::MAX_MESSAGE),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        FakeMaster { url: format!("http://{addr}"), _rt: rt }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The manifest of a real tree, as wire messages, and where each object's content lives.
pub struct Image {
    pub manifest: manifest::Manifest,
    pub content: HashMap<Hash, Vec<u8>>,
}

impl Image {
    pub fn scan(dir: &Path, version: u64) -> Image {
        let manifest = manifest::scan_image(dir, version).unwrap();
        let content = manifest
            .entries
            .iter()
            .filter_map(|e| Some((e.hash?, std::fs::read(dir.join(e.path.as_path())).unwrap())))
            .collect();
        Image { manifest, content }
    }

    /// Header and batches, with `signature` in the header if given.
    pub fn messages(&self, signature: Option<&manifest::trust::VersionSignature>) -> Vec<pb::ManifestMessage> {
        let mut msgs: Vec<_> =
            manifest::wire::manifest_messages(&self.manifest, &self.manifest.identity(), 1024).collect();
        if let Some(pb::manifest_message::Msg::Header(h)) = &mut msgs[0].msg {
            h.signature = signature.map(manifest::wire::signature_to_wire);
        }
        msgs
    }

    /// Honest answers for every object of this image.
    pub fn honest(&self) -> impl Fn(&Hash) -> Reply + Send + Sync + 'static {
        let content = self.content.clone();
        move |h| {
            let data = content.get(h).cloned().unwrap_or_default();
            Reply::Raw { size: data.len() as u64, data }
        }
    }
}

/// A manifest stream of hand-made entries (for paths no `RelPath` would accept). The header
/// declares `entries.len()` entries and a made-up identity.
pub fn raw_manifest(entries: Vec<pb::Entry>) -> Vec<pb::ManifestMessage> {
    let root = pb::Entry { kind: pb::Kind::Dir as i32, mode: 0o755, ..Default::default() };
    vec![
        pb::ManifestMessage {
            msg: Some(pb::manifest_message::Msg::Header(pb::ManifestHeader {
                version: 1,
                identity: Bytes::from(vec![7u8; 32]),
                entry_count: entries.len() as u64,
                root: Some(root),
                exclusions: Vec::new(),
                signature: None,
                entries_omitted: false,
                object_store_url: String::new(),
                chunk_threshold: 0,
                ..Default::default()
            })),
        },
        pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Batch(pb::EntryBatch { entries })) },
    ]
}

/// A wire entry for a regular file of `content` at `path` (any bytes).
pub fn file_entry(path: &[u8], content: &[u8]) -> pb::Entry {
    pb::Entry {
        path: Bytes::copy_from_slice(path),
        kind: pb::Kind::File as i32,
        mode: 0o644,
        size: content.len() as u64,
        hash: Bytes::copy_from_slice(blake3::hash(content).as_bytes()),
        ..Default::default()
    }
}

/// A wire entry for a symlink at `path` pointing at `target`.
pub fn symlink_entry(path: &[u8], target: &[u8]) -> pb::Entry {
    pb::Entry {
        path: Bytes::copy_from_slice(path),
        kind: pb::Kind::Symlink as i32,
        mode: 0o777,
        size: target.len() as u64,
        target: Bytes::copy_from_slice(target),
        ..Default::default()
    }
}

/// A wire entry for a directory at `path`.
pub fn dir_entry(path: &[u8]) -> pb::Entry {
    pb::Entry { path: Bytes::copy_from_slice(path), kind: pb::Kind::Dir as i32, mode: 0o755, ..Default::default() }
}
pub type WireEntry = pb::Entry;

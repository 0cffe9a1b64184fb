//! Talking to syncmaster: the manifest stream and the ordered object stream.

use std::io::{self, Write};
use std::time::Duration;

use exclusions::PatternList;
use manifest::wire::ManifestAssembler;
use manifest::{Hash, Manifest};
use proto::v1 as pb;
use proto::v1::image_sync_client::ImageSyncClient;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::SyncError;

/// Largest zstd window a host accepts (32 MiB): bounds decoder memory whatever the master sends.
const MAX_WINDOW_LOG: u32 = 25;

#[derive(Clone)]
pub struct Master {
    url: String,
    client: ImageSyncClient<Channel>,
    /// Charged for every object byte received.
    net: throttle::Limiter,
}

impl Master {
    pub async fn connect(url: &str) -> Result<Master, SyncError> {
        let unreachable =
            |e: &dyn std::fmt::Display| SyncError::Unreachable { url: url.to_owned(), reason: e.to_string() };
        let endpoint =
            check_url(url)?.connect_timeout(Duration::from_secs(10)).tcp_nodelay(true).http2_adaptive_window(true);
        let channel = endpoint.connect().await.map_err(|e| unreachable(&source_chain(&e)))?;
        let client = ImageSyncClient::new(channel)
            .max_decoding_message_size(proto::MAX_MESSAGE)
            .max_encoding_message_size(proto::MAX_MESSAGE);
        Ok(Master { url: url.to_owned(), client, net: throttle::Limiter::unlimited() })
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

    /// Receives and validates the whole manifest, and this host's exclusion lists from the
    /// master's inventory.
    pub async fn manifest(&self, host_id: &str) -> Result<(Manifest, Vec<PatternList>), SyncError> {
        let mut stream = self.open_manifest(host_id).await?;
        let mut asm = ManifestAssembler::default();
        let mut lists = Vec::new();
        while let Some(msg) = stream.message().await.map_err(|s| self.status_error(s))? {
            if let Some(pb::manifest_message::Msg::Header(h)) = &msg.msg {
                lists = lists_from_wire(&h.exclusions);
            }
            asm.push(msg).map_err(SyncError::BadManifest)?;
        }
        Ok((asm.finish().map_err(SyncError::BadManifest)?, lists))
    }

    /// Only this host's exclusion lists: reads the manifest header and hangs up.
    pub async fn exclusion_lists(&self, host_id: &str) -> Result<Vec<PatternList>, SyncError> {
        let mut stream = self.open_manifest(host_id).await?;
        match stream.message().await.map_err(|s| self.status_error(s))? {
            Some(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h)) }) => {
                Ok(lists_from_wire(&h.exclusions))
            }
            _ => Err(SyncError::BadManifest(manifest::ManifestError::NoHeader)),
        }
    }

    async fn open_manifest(&self, host_id: &str) -> Result<tonic::Streaming<pb::ManifestMessage>, SyncError> {
        let mut client = self.client.clone();
        Ok(client
            .get_manifest(pb::ManifestRequest { host_id: host_id.to_owned() })
            .await
            .map_err(|s| self.status_error(s))?
            .into_inner())
    }

    /// Subscribes to version announcements (the current one arrives at once).
    pub async fn watch(&self, host_id: &str) -> Result<tonic::Streaming<pb::VersionAnnouncement>, SyncError> {
        let mut client = self.client.clone();
        Ok(client
            .watch(pb::WatchRequest { host_id: host_id.to_owned() })
            .await
            .map_err(|s| self.status_error(s))?
            .into_inner())
    }

    /// Tells the master how a pass went.
    pub async fn report(&self, result: pb::PassResult) -> Result<(), SyncError> {
        let mut client = self.client.clone();
        client.report_pass(result).await.map_err(|s| self.status_error(s))?;
        Ok(())
    }

    fn status_error(&self, s: tonic::Status) -> SyncError {
        SyncError::Unreachable { url: self.url.clone(), reason: format!("{}: {}", s.code(), s.message()) }
    }

    /// Starts downloading `hashes` in order, in requests of at most `MAX_FETCH_HASHES`, into a
    /// bounded channel that the apply drains: the network runs ahead of the disk by at most the
    /// channel's capacity.
    pub fn spawn_fetch(&self, hashes: Vec<Hash>, rt: &tokio::runtime::Handle) -> ObjectStream {
        let (tx, rx) = mpsc::channel::<Result<pb::ObjectChunk, String>>(64);
        let client = self.client.clone();
        let url = self.url.clone();
        let net = self.net.clone();
        rt.spawn(async move {
            for batch in hashes.chunks(proto::MAX_FETCH_HASHES) {
                let req =
                    pb::FetchRequest { hashes: batch.iter().map(|h| bytes::Bytes::copy_from_slice(&h.0)).collect() };
                let mut c = client.clone();
                let mut stream = match c.fetch_objects(req).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        let _ = tx.send(Err(format!("master {url}: {}: {}", s.code(), s.message()))).await;
                        return;
                    }
                };
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            net.charge_async(chunk.data.len() as u64).await;
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(s) => {
                            let _ = tx.send(Err(format!("master {url}: {}: {}", s.code(), s.message()))).await;
                            return;
                        }
                    }
                }
            }
        });
        ObjectStream { rx, broken: None, wire_bytes: 0, objects: 0, bytes: 0 }
    }
}

/// Checks that `url` can name a master at all (a usage error otherwise, not "unreachable").
pub fn check_url(url: &str) -> Result<Endpoint, SyncError> {
    let bad = |why: String| SyncError::Config(format!("master URL {url:?} is invalid: {why} (hint: http://HOST:PORT)"));
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("it must start with http://".into()));
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(bad("it names no host".into()));
    }
    Ok(endpoint)
}

fn lists_from_wire(lists: &[pb::ExclusionList]) -> Vec<PatternList> {
    lists
        .iter()
        .map(|l| PatternList {
            source: format!("master: {}", l.source),
            patterns: l.patterns.iter().map(|p| (p.line as usize, p.text.clone())).collect(),
        })
        .collect()
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
    #[error("master sent object {got} where {want} was expected")]
    OutOfOrder { want: Hash, got: String },
    #[error("object {hash}: {source}")]
    Content {
        hash: Hash,
        #[source]
        source: io::Error,
    },
}

/// The receiving end of [`Master::spawn_fetch`], read from the blocking apply thread.
pub struct ObjectStream {
    rx: mpsc::Receiver<Result<pb::ObjectChunk, String>>,
    broken: Option<String>,
    pub wire_bytes: u64,
    pub objects: u64,
    pub bytes: u64,
}

impl ObjectStream {
    /// Reads the next object, which must be `hash`, decoding it into `sink` (if any). The object
    /// is always read to its end, so the stream stays aligned even when the sink fails; a
    /// sink error is returned after that.
    pub fn next_into<W: Write>(&mut self, hash: Hash, mut sink: Option<&mut W>) -> Result<(), ObjectError> {
        if let Some(b) = &self.broken {
            return Err(ObjectError::Broken(b.clone()));
        }
        let mut decoder: Option<zstd::stream::raw::Decoder<'static>> = None;
        let mut sink_err: Option<io::Error> = None;
        let mut out = vec![0u8; 256 * 1024];
        loop {
            let chunk = match self.rx.blocking_recv() {
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
            self.wire_bytes += chunk.data.len() as u64;
            if !chunk.error.is_empty() {
                return Err(ObjectError::Missing { hash, message: chunk.error });
            }
            if sink_err.is_none() && !chunk.data.is_empty() {
                let r = match pb::Encoding::try_from(chunk.encoding) {
                    Ok(pb::Encoding::Raw) => sink.as_mut().map_or(Ok(()), |s| s.write_all(&chunk.data)),
                    Ok(pb::Encoding::Zstd) => decode(&mut decoder, &chunk.data, &mut out, &mut sink),
                    Err(_) => Err(io::Error::other(format!("unknown encoding {}", chunk.encoding))),
                };
                if let Err(e) = r {
                    sink_err = Some(e);
                }
            }
            if chunk.last {
                break;
            }
        }
        match sink_err {
            Some(source) => Err(ObjectError::Content { hash, source }),
            None => {
                self.objects += 1;
                Ok(())
            }
        }
    }
}

fn decode<W: Write>(
    decoder: &mut Option<zstd::stream::raw::Decoder<'static>>,
    input: &[u8],
    out: &mut [u8],
    sink: &mut Option<&mut W>,
) -> io::Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    if decoder.is_none() {
        let mut d = zstd::stream::raw::Decoder::new()?;
        d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
        *decoder = Some(d);
    }
    let d = decoder.as_mut().expect("just set");
    let mut inb = InBuffer::around(input);
    // Decode in bounded steps straight into the sink: a decompression bomb is cut off by the
    // sink's size limit long before it could fill memory.
    loop {
        let mut outb = OutBuffer::around(out);
        d.run(&mut inb, &mut outb)?;
        let n = outb.pos();
        if n > 0 {
            if let Some(s) = sink.as_mut() {
                s.write_all(&out[..n])?;
            }
        }
        if inb.pos() == input.len() && n < out.len() {
            return Ok(());
        }
    }
}

//! Objects on the wire: each object streamed as chunks, zstd frames (cached or compressed per
//! request), deltas against a base the host offered, or raw, batched into messages.

use std::io::Read;

use bytes::Bytes;
use manifest::Hash;
use proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::{metrics, publish};

/// Objects smaller than this go raw: a zstd frame header would cost more than it saves.
pub(crate) const MIN_COMPRESS: u64 = 128;

/// Streams one object as chunks: as a delta against `base` when one is stored and the host
/// offered that base. Returns false when the host has gone away.
pub(crate) fn send_object(
    published: &publish::Published,
    hash: Hash,
    base: Option<Hash>,
    level: i32,
    tx: &mut Batcher,
) -> bool {
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

/// Sends content held in memory (a file rendered for a host), raw. False: the host left.
pub(crate) fn send_bytes(hash: Hash, content: Bytes, tx: &mut Batcher) -> bool {
    let size = content.len() as u64;
    send_frame(content, &Bytes::copy_from_slice(&hash.0), size, pb::Encoding::Raw, Bytes::new(), tx)
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
pub(crate) struct Batcher {
    tx: mpsc::Sender<Result<pb::ObjectBatch, Status>>,
    chunks: Vec<pb::ObjectChunk>,
    bytes: usize,
}

impl Batcher {
    /// Batches for `tx`, one object stream.
    pub(crate) fn new(tx: mpsc::Sender<Result<pb::ObjectBatch, Status>>) -> Batcher {
        Batcher { tx, chunks: Vec::new(), bytes: 0 }
    }

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

    pub(crate) fn flush(&mut self) -> bool {
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

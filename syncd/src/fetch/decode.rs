//! The decode stage: zstd frames and deltas against the host's old files, turned into raw
//! pieces of bounded size on a thread of its own, between the network and the apply thread.

use std::io;

use manifest::Hash;
use proto::v1 as pb;
use tokio::sync::{mpsc, Semaphore};

use super::queue;
use super::transport::MAX_WINDOW_LOG;
use crate::hostfs::files::HostFiles;
use crate::progress::Stopwatch;

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
pub(super) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// … and at most this many pieces, so a stretch of small files lets the decoder run ahead.
pub(super) const QUEUE_PIECES: usize = 4096;
pub(super) const PIECE_BYTES: usize = 128 * 1024;
/// Chunks received off the connection and waiting for the decode thread: at most this many
/// bytes of (mostly compressed) data, in at most this many chunks. Each holds a slice of the
/// connection's receive buffers, which stay allocated while it waits; beyond this bound, the
/// master waits on HTTP/2 flow control.
pub(super) const NET_BYTES: usize = 2 * 1024 * 1024;
pub(super) const NET_CHUNKS: usize = 1024;
/// What a queued piece is charged for besides its content (its struct and allocation).
pub(super) const PIECE_OVERHEAD: usize = 128;

/// What the apply thread reads: a chunk as it came from the master, or (encoding raw) a piece
/// of the decoded content of a zstd or delta chunk.
pub(super) struct Piece {
    pub(super) chunk: pb::ObjectChunk,
    /// Bytes this piece took on the wire (a chunk decoded into several pieces counts once).
    pub(super) wire: u64,
    /// The chunk could not be decoded, or decodes past the object's declared size.
    pub(super) undecodable: Option<String>,
    /// The object came as a delta whose base could not be used: its data is dropped (the
    /// stream stays aligned) and it is to be fetched whole.
    pub(super) base_failed: Option<String>,
    /// Decoded from a delta.
    pub(super) delta: bool,
}

impl queue::Weighed for Result<Piece, String> {
    fn weight(&self) -> usize {
        PIECE_OVERHEAD + self.as_ref().map_or(0, |p| p.chunk.data.len())
    }
}

impl Piece {
    pub(super) fn passed(chunk: pb::ObjectChunk) -> Piece {
        let wire = chunk.data.len() as u64;
        Piece { chunk, wire, undecodable: None, base_failed: None, delta: false }
    }
}

/// Where the decode stage reads the host's delta bases: one per object (see
/// [`Plan::fetch_bases`](crate::plan::Plan::fetch_bases)), beneath the root, never through a
/// symlink, with every byte charged to `read`.
pub struct Bases {
    /// Where the bases are read: the host's regular files, read-only.
    pub files: HostFiles,
    pub paths: Vec<Option<(manifest::RelPath, Hash)>>,
    /// Empty, or one per object: the host file whose chunks an object stored as chunks may
    /// reuse (see [`Plan::fetch_seeds`](crate::plan::Plan::fetch_seeds)).
    pub seeds: Vec<Option<manifest::RelPath>>,
    /// Bases offered to the solid delta only (see
    /// [`Plan::solid_bases`](crate::plan::Plan::solid_bases)).
    pub solid: Vec<(manifest::RelPath, Hash)>,
}

impl Bases {
    /// The bases `plan` names for its fetches, read from `files` (`None` when it names none:
    /// a cold sync).
    pub fn for_plan(files: &HostFiles, plan: &crate::plan::Plan) -> Option<Bases> {
        let any = !plan.fetch_bases.is_empty() || !plan.fetch_seeds.is_empty() || !plan.solid_bases.is_empty();
        any.then(|| Bases {
            files: files.share(),
            paths: plan.fetch_bases.clone(),
            seeds: plan.fetch_seeds.clone(),
            solid: plan.solid_bases.clone(),
        })
    }

    /// The content hash offered as a base for each object (empty without bases).
    pub(super) fn offered(bases: Option<&Bases>) -> Vec<Option<Hash>> {
        bases.map(|b| b.paths.iter().map(|p| p.as_ref().map(|(_, h)| *h)).collect()).unwrap_or_default()
    }
}

/// How the current object's delta stands in the decode stage.
pub(super) enum DeltaState {
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
pub(super) fn decode_stage(
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
pub(super) struct Release<'a>(&'a Semaphore, u32);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.add_permits(self.1 as usize);
    }
}

/// What a received chunk takes of [`NET_BYTES`] (a chunk larger than all of it, which no
/// master sends, takes all of it, and passes alone).
pub(super) fn net_weight(chunk: &pb::ObjectChunk) -> u32 {
    chunk.data.len().min(NET_BYTES) as u32
}

/// Where the decode thread's time went, logged at debug level when it ends: waiting for the
/// network, waiting for the apply thread to take pieces, and reading delta bases.
#[derive(Default)]
pub(super) struct StageTimes {
    pub(super) net: Stopwatch,
    pub(super) apply: Stopwatch,
    pub(super) base: Stopwatch,
}

impl StageTimes {
    pub(super) fn report_on_drop(&self) -> impl Drop + '_ {
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

pub(super) fn new_decoder() -> io::Result<zstd::stream::raw::Decoder<'static>> {
    let mut d = zstd::stream::raw::Decoder::new()?;
    d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
    Ok(d)
}

pub(super) fn zstd_error(code: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

/// Prepares `ctx` to decode one delta object of content `want`: the base the host offered for
/// it, read back, becomes its dictionary. `named` is the base the master says it used.
pub(super) fn load_base(
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
    let content = read_base(&mut bases.files, &path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let zerr = |code: usize| zstd_error(code).to_string();
    ctx.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters).map_err(zerr)?;
    ctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG)).map_err(zerr)?;
    ctx.load_dictionary(&content).map_err(zerr)?;
    Ok(())
}

/// Reads a delta base, at most one byte past the largest base a delta is made against.
pub(super) fn read_base(files: &mut HostFiles, path: &manifest::RelPath) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    files.read_into(path, manifest::delta::MAX_DELTA_BYTES + 1, &mut data)?;
    Ok(data)
}

/// One streaming zstd decode step, of whichever decoder.
pub(super) type ZstdStep<'a> =
    dyn FnMut(&mut zstd::zstd_safe::InBuffer<'_>, &mut zstd::zstd_safe::OutBuffer<'_, Vec<u8>>) -> io::Result<()> + 'a;

/// Decodes one chunk with `run` (one zstd streaming step) into pieces, sent through `send`;
/// false once the stage must stop (the apply thread left, or the content is undecodable or
/// too long). Pieces are decoded into `out` (uninitialized capacity: no zero-fill); a large
/// piece is sent in that buffer itself, and `out` replaced.
pub(super) fn decode_pieces(
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

//! The ordered object stream the apply thread reads: pieces of each object, in the order
//! asked, from the master, the object store, or both.

use std::io::{self, Write};
use std::sync::Arc;

use manifest::Hash;
use proto::v1 as pb;

use super::decode::{ObjectError, Piece};
use super::queue;
use super::store::StoreTally;
use crate::progress::Stopwatch;

/// The receiving end of [`Master::spawn_fetch`], read from the blocking apply thread.
pub struct ObjectStream {
    pub(super) rx: queue::Receiver<Result<Piece, String>>,
    pub(super) broken: Option<String>,
    /// Set when this host cut the stream (endless or undecodable object), as opposed to the
    /// master or the network breaking it.
    pub(super) abandoned: Option<String>,
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
    pub(super) fn reading(rx: queue::Receiver<Result<Piece, String>>, store: Option<Arc<StoreTally>>) -> ObjectStream {
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

    pub(super) fn next_object_into<W: Write>(
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

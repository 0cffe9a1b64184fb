//! Small objects from packs (issue 25, part 3): the store fetch reads the pack index of the
//! manifest's identity once per stream, and fetches the objects it lists as byte ranges of
//! their packs, neighbours coalesced, instead of one GET each. Format: [`objstore::pack`].
//!
//! The stream must deliver objects in the order they were asked for (the apply reads them in
//! that order), so ranges are coalesced along the request: a range grows by the next requested
//! object when that object lies in the same pack, after the range's end, within [`GAP`] bytes
//! of it, and the range stays within [`MAX_RANGE`]. Packs are written in path order and the
//! apply asks in path order, so a cold host's requests run through each pack front to back.
//! Each range's body is cut into its objects as it streams in (nothing is held whole), and
//! every object is verified downstream against its hash as any other.

use std::sync::atomic::Ordering::Relaxed;

use manifest::Hash;
use objstore::object_store::{GetOptions, GetRange, GetResult, ObjectStoreExt};
use objstore::pack::{Encoding, PackIndex};
use proto::v1 as pb;
use tokio::sync::{mpsc, Semaphore};

use super::store::{open_object, Pump, StoreFailure, StoreTally};
use super::transport::{secs, Deadlines};
use crate::error::chain;

/// Largest gap between two wanted objects read through rather than split into two GETs.
pub(super) const GAP: u64 = 64 * 1024;
/// Largest coalesced range.
pub(super) const MAX_RANGE: u64 = 4 << 20;

/// One object of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    /// Its place in the request.
    pub i: usize,
    /// Where it lies in the pack, and its stored length.
    pub offset: u64,
    pub len: u64,
    pub encoding: pb::Encoding,
}

/// One GET: a loose object, or a range of a pack holding objects that follow each other in
/// the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Unit {
    Loose(usize),
    Range { pack: [u8; 32], start: u64, end: u64, members: Vec<Member> },
}

impl Unit {
    /// The requested objects this unit gives: consecutive places in the request.
    pub fn span(&self) -> std::ops::Range<usize> {
        match self {
            Unit::Loose(i) => *i..*i + 1,
            Unit::Range { members, .. } => members[0].i..members[members.len() - 1].i + 1,
        }
    }
}

/// The most bytes an object of `size` may take stored (as [`ObjectStream::next_into`] allows).
fn wire_cap(size: u64) -> u64 {
    size + size / 64 + 64 * 1024
}

/// The GETs that fetch `objects`, in request order: each object the index places (sensibly)
/// in a pack joins the range before it when it can, and the others are loose GETs, as is every
/// object `own` marks (empty, or one per object: fetched another way, see the caller).
pub(super) fn plan(
    objects: &[(Hash, u64)],
    own: &[bool],
    index: Option<&PackIndex>,
    gap: u64,
    max_range: u64,
) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    for (i, (h, size)) in objects.iter().enumerate() {
        if own.get(i).copied().unwrap_or(false) {
            out.push(Unit::Loose(i));
            continue;
        }
        // An empty stored object, or one longer than its size allows, is left to a loose GET.
        let loc = index.and_then(|x| x.get(&h.0)).filter(|l| {
            l.length > 0
                && u64::from(l.length) <= wire_cap(*size)
                && l.offset.checked_add(u64::from(l.length)).is_some()
        });
        let Some(loc) = loc else {
            out.push(Unit::Loose(i));
            continue;
        };
        let len = u64::from(loc.length);
        let encoding = match loc.encoding {
            Encoding::Zstd => pb::Encoding::Zstd,
            Encoding::Raw => pb::Encoding::Raw,
        };
        let m = Member { i, offset: loc.offset, len, encoding };
        if let Some(Unit::Range { pack, start, end, members }) = out.last_mut() {
            if *pack == loc.pack
                && loc.offset >= *end
                && loc.offset - *end <= gap
                && loc.offset + len - *start <= max_range
            {
                *end = loc.offset + len;
                members.push(m);
                continue;
            }
        }
        out.push(Unit::Range { pack: loc.pack, start: loc.offset, end: loc.offset + len, members: vec![m] });
    }
    out
}

/// The pack index of `identity`, if the store has a readable one. A missing index is normal
/// (a master without packs, an older master): every object then takes a loose GET, as it does
/// when the index is too large or damaged (logged, naming the key and URL). `Err`: the store
/// itself failed (an error other than *not found*, or a deadline), as for a loose object.
pub(super) async fn load_index(
    store: &objstore::Store,
    identity: &Hash,
    d: Deadlines,
    tally: &StoreTally,
) -> Result<Option<PackIndex>, StoreFailure> {
    let key = objstore::pack::index_key(&store.packs, &identity.0);
    let url = &store.url;
    let down = |why: String| StoreFailure { key: key.to_string(), why, down: true, sent_any: false };
    tally.gets.fetch_add(1, Relaxed);
    let got = match tokio::time::timeout(d.rpc, store.store.get(&key)).await {
        Ok(Ok(g)) => g,
        Ok(Err(objstore::object_store::Error::NotFound { .. })) => {
            tracing::debug!("object store {url}: no pack index {key}: one GET per object");
            return Ok(None);
        }
        Ok(Err(e)) => return Err(down(chain(&e))),
        Err(_) => return Err(down(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)))),
    };
    if got.meta.size > objstore::pack::MAX_INDEX_BYTES {
        tracing::warn!(
            "object store {url}: the pack index {key} is {} bytes, over the {} this host reads; one GET per object",
            got.meta.size,
            objstore::pack::MAX_INDEX_BYTES
        );
        return Ok(None);
    }
    let wait = d.stream_idle.max(d.rpc);
    let body = match tokio::time::timeout(wait, got.bytes()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return Err(down(chain(&e))),
        Err(_) => return Err(down(format!("no data for {} (stream_idle_timeout sets this deadline)", secs(wait)))),
    };
    tally.bytes.fetch_add(body.len() as u64, Relaxed);
    match PackIndex::decode(&body) {
        Ok(idx) => {
            tracing::debug!(
                "object store {url}: pack index {key}: {} objects in {} packs",
                idx.len(),
                idx.packs().len()
            );
            Ok(Some(idx))
        }
        Err(e) => {
            tracing::warn!("object store {url}: refusing the pack index {key}: {e}; one GET per object");
            Ok(None)
        }
    }
}

/// An opened GET.
pub(super) enum Opened {
    /// A whole object, or (with the base named) its delta against that base.
    Loose(pb::Encoding, String, GetResult, Option<Hash>),
    Range(String, GetResult),
    /// An object of the solid delta: no GET of its own (see [`crate::solid`]).
    Solid,
    /// A large file's chunk index (`None`: it has none; see [`super::chunked`]).
    Index(Option<objstore::chunks::Index>),
    /// A file the master rendered for this host: fetched from the master, not the store.
    Master,
}

/// Opens the GET of `unit`.
pub(super) async fn open_unit(
    store: &objstore::Store,
    objects: &[(Hash, u64)],
    unit: &Unit,
    d: Deadlines,
    tally: &StoreTally,
) -> Result<Opened, StoreFailure> {
    let (pack, start, end) = match unit {
        Unit::Loose(i) => {
            let (encoding, key, get, base) = open_object(store, &objects[*i].0, None, d, tally).await?;
            return Ok(Opened::Loose(encoding, key, get, base));
        }
        Unit::Range { pack, start, end, .. } => (pack, *start, *end),
    };
    let key = objstore::pack::pack_key(&store.packs, pack);
    let name = format!("{key} bytes {start}-{}", end - 1);
    let fail = |why: String, down: bool| StoreFailure { key: name.clone(), why, down, sent_any: false };
    tally.gets.fetch_add(1, Relaxed);
    let opts = GetOptions { range: Some(GetRange::Bounded(start..end)), ..GetOptions::default() };
    match tokio::time::timeout(d.rpc, store.store.get_opts(&key, opts)).await {
        Ok(Ok(get)) => Ok(Opened::Range(name, get)),
        Ok(Err(objstore::object_store::Error::NotFound { .. })) => {
            Err(fail("the pack is not in the store".into(), false))
        }
        // A range the pack does not hold (a damaged index): not the store's fault.
        Ok(Err(e @ objstore::object_store::Error::Generic { .. })) if e.to_string().contains("Range") => {
            Err(fail(chain(&e), false))
        }
        Ok(Err(e)) => Err(fail(chain(&e), true)),
        Err(_) => Err(fail(format!("no reply within {} (rpc_timeout sets this deadline)", secs(d.rpc)), true)),
    }
}

impl Pump {
    /// Cuts the body of a range GET into its `members`, passed on in order in chunks of at
    /// most [`proto::OBJECT_CHUNK`] bytes, the gaps between them read and dropped; every byte
    /// is charged to the network limit. `Ok(false)`: the reader is gone. `Err((k, why))`:
    /// members `k..` were not given (member `k` in part when `why.sent_any`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_range(
        &self,
        objects: &[(Hash, u64)],
        start: u64,
        members: &[Member],
        key: &str,
        get: GetResult,
        tx: &mpsc::Sender<Result<pb::ObjectChunk, String>>,
        received: &Semaphore,
        tally: &StoreTally,
    ) -> Result<bool, (usize, StoreFailure)> {
        use futures_util::stream::StreamExt;
        let mut body = get.into_stream();
        let mut pos = start;
        let mut k = 0;
        let mut sent = 0u64;
        while k < members.len() {
            let fail = |why: String, down: bool| StoreFailure { key: key.to_owned(), why, down, sent_any: sent > 0 };
            let next = match tokio::time::timeout(self.d.stream_idle, body.next()).await {
                Ok(n) => n,
                Err(_) => {
                    let why =
                        format!("no data for {} (stream_idle_timeout sets this deadline)", secs(self.d.stream_idle));
                    return Err((k, fail(why, true)));
                }
            };
            let mut data = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err((k, fail(chain(&e), true))),
                None => {
                    let why = format!("the range ended after {} bytes, short of the pack index's", pos - start);
                    return Err((k, fail(why, false)));
                }
            };
            self.net.charge_async(data.len() as u64).await;
            tally.bytes.fetch_add(data.len() as u64, Relaxed);
            while !data.is_empty() && k < members.len() {
                let m = &members[k];
                let want = m.offset + sent;
                if pos < want {
                    let skip = (want - pos).min(data.len() as u64);
                    let _ = data.split_to(skip as usize);
                    pos += skip;
                    continue;
                }
                let take = (m.len - sent).min(data.len() as u64).min(proto::OBJECT_CHUNK as u64) as usize;
                let piece = data.split_to(take);
                pos += take as u64;
                sent += take as u64;
                let last = sent == m.len;
                let (hash, size) = objects[m.i];
                let chunk = pb::ObjectChunk {
                    hash: bytes::Bytes::copy_from_slice(&hash.0),
                    size,
                    encoding: m.encoding as i32,
                    data: piece,
                    last,
                    ..Default::default()
                };
                if !self.forward(chunk, tx, received).await {
                    return Ok(false);
                }
                if last {
                    k += 1;
                    sent = 0;
                    tally.from_store.fetch_add(1, Relaxed);
                    tally.from_packs.fetch_add(1, Relaxed);
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use objstore::pack::Location;

    fn h(n: u32) -> Hash {
        Hash::of(&n.to_le_bytes())
    }

    #[test]
    fn neighbours_in_request_and_pack_order_share_a_range() {
        let (p, q) = ([1u8; 32], [2u8; 32]);
        let loc = |pack, offset, length| Location { pack, offset, length, encoding: Encoding::Raw };
        let index = PackIndex::build([
            (h(0).0, loc(p, 0, 100)),
            (h(1).0, loc(p, 100, 100)),
            // 1000 bytes after h(1): within the gap.
            (h(2).0, loc(p, 1200, 100)),
            // Far after: a new range.
            (h(3).0, loc(p, 1_000_000, 100)),
            // Another pack.
            (h(4).0, loc(q, 0, 100)),
            // Before h(4) in the pack: a new range, to keep the request's order.
            (h(5).0, loc(p, 0, 50)),
            // Longer than a 10-byte object can be stored: loose.
            (h(7).0, loc(q, 100, 70_000)),
        ]);
        let objects: Vec<(Hash, u64)> =
            vec![(h(0), 100), (h(1), 100), (h(2), 100), (h(3), 100), (h(4), 100), (h(5), 50), (h(6), 10), (h(7), 10)];
        let units = plan(&objects, &[], Some(&index), GAP, MAX_RANGE);
        let spans: Vec<_> = units.iter().map(Unit::span).collect();
        assert_eq!(spans, vec![0..3, 3..4, 4..5, 5..6, 6..7, 7..8]);
        assert_eq!(
            units[0],
            Unit::Range {
                pack: p,
                start: 0,
                end: 1300,
                members: vec![
                    Member { i: 0, offset: 0, len: 100, encoding: pb::Encoding::Raw },
                    Member { i: 1, offset: 100, len: 100, encoding: pb::Encoding::Raw },
                    Member { i: 2, offset: 1200, len: 100, encoding: pb::Encoding::Raw },
                ]
            }
        );
        assert_eq!(units[4], Unit::Loose(6));
        assert_eq!(units[5], Unit::Loose(7));
        // A small maximum range splits; no index: all loose.
        assert_eq!(plan(&objects[..2], &[], Some(&index), GAP, 150).len(), 2);
        assert!(plan(&objects, &[], None, GAP, MAX_RANGE).iter().all(|u| matches!(u, Unit::Loose(_))));
    }
}

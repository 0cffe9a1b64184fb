//! Solid deltas: one upgrade from a previous image to a new one, as a few large zstd streams
//! (OSTree's static deltas, over zstd `--patch-from`).
//!
//! Every object new in the image, in the image's path order, is cut into *segments* of at most
//! [`SEGMENT_CONTENT`] bytes of new content. A segment is one zstd frame of its objects'
//! contents, concatenated, made with its *reference* as a raw-content prefix: the bases of its
//! objects (chosen by [`crate::delta::choose`], as for per-object deltas), deduplicated, in
//! order of first use, concatenated, at most [`SEGMENT_REFERENCE`] bytes. An object over
//! [`MAX_OBJECT`] (up to [`crate::delta::MAX_SOLID_BYTES`]) with a base (chosen by
//! [`crate::delta::choose_large`]) gets a segment of its own, over that one base. A host rebuilds the
//! reference from its own files, checks each against its hash, and decodes the segment; a host
//! that cannot build a segment's reference exactly fetches that segment's objects one by one.
//! A host thus holds at most one segment's reference, content and frame at a time.
//!
//! The [`Index`] lists the segments with their objects and bases; this module defines it, its
//! byte format, and how objects are cut into segments, shared by the master (which builds the
//! segments) and the host (which reads them).

use crate::{Hash, RelPath};

/// Most new content in one segment.
pub const SEGMENT_CONTENT: u64 = 24 << 20;
/// Most reference (bases) of one segment.
pub const SEGMENT_REFERENCE: u64 = 24 << 20;
/// Largest object put in a segment with others; a larger one with a base, up to
/// [`crate::delta::MAX_SOLID_BYTES`], gets a segment of its own; the rest travel on their own.
pub const MAX_OBJECT: u64 = crate::delta::MAX_DELTA_BYTES;
/// The largest window a segment frame needs: reference and content together (48 MiB for a
/// shared segment, 128 MiB for a large object's own).
pub const MAX_WINDOW_LOG: u32 = 27;
/// Largest index a reader accepts, decoded.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

const MAGIC: &[u8] = b"gis-solid-index 1\n";

/// A base in a segment's reference: an old file the host must hold at `path` with `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Base {
    pub path: RelPath,
    pub hash: Hash,
    pub size: u64,
}

/// An object a segment holds, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    pub hash: Hash,
    pub size: u64,
}

/// One segment: its frame is `bytes` long; it decodes, with the concatenated `bases` as its
/// prefix, to the concatenated `objects`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub bytes: u64,
    pub bases: Vec<Base>,
    pub objects: Vec<Object>,
}

impl Segment {
    pub fn content_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    pub fn reference_bytes(&self) -> u64 {
        self.bases.iter().map(|b| b.size).sum()
    }

    /// The zstd window log the frame is made with: it spans reference and content.
    pub fn window_log(&self) -> u32 {
        let span = (self.reference_bytes() + self.content_bytes()).max(1).next_power_of_two();
        span.trailing_zeros().clamp(17, MAX_WINDOW_LOG)
    }
}

/// The solid delta from image `from` to image `to` (identities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    pub from: Hash,
    pub to: Hash,
    pub segments: Vec<Segment>,
}

/// A new object and the base it would be sent against, for [`cut`].
pub struct New<'a> {
    pub hash: Hash,
    pub size: u64,
    pub base: Option<(&'a RelPath, Hash, u64)>,
}

/// Cuts `objects` (in the image's order, each hash once) into segments; `bytes` is left 0.
/// An object over [`MAX_OBJECT`] with a base gets a segment of its own (the segments stay in
/// the objects' order, so a host reading them in turn never goes back to one); other objects
/// over it are left out.
pub fn cut<'a>(objects: impl IntoIterator<Item = New<'a>>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut cur = Segment::default();
    for o in objects {
        if o.size > MAX_OBJECT {
            let fits = |s: u64| s <= crate::delta::MAX_SOLID_BYTES;
            if let Some((p, h, s)) = o.base.filter(|(_, _, s)| fits(*s) && fits(o.size)) {
                if !cur.objects.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(Segment {
                    bytes: 0,
                    bases: vec![Base { path: p.clone(), hash: h, size: s }],
                    objects: vec![Object { hash: o.hash, size: o.size }],
                });
            }
            continue;
        }
        let base = o.base.filter(|(_, _, s)| *s <= MAX_OBJECT);
        let new_base = base.filter(|(p, h, _)| !cur.bases.iter().any(|b| b.hash == *h && b.path == **p));
        let grows = new_base.map_or(0, |(_, _, s)| s);
        let full = cur.content_bytes() + o.size > SEGMENT_CONTENT || cur.reference_bytes() + grows > SEGMENT_REFERENCE;
        if full && !cur.objects.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if let Some((p, h, s)) = base {
            if !cur.bases.iter().any(|b| b.hash == h && b.path == *p) {
                cur.bases.push(Base { path: p.clone(), hash: h, size: s });
            }
        }
        cur.objects.push(Object { hash: o.hash, size: o.size });
    }
    if !cur.objects.is_empty() {
        out.push(cur);
    }
    out
}

/// Why an index could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not a solid delta index (bad magic)")]
    Magic,
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("segment {segment}: {why}")]
    Bad { segment: usize, why: String },
}

impl Index {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            64 + self.segments.iter().map(|s| 32 + s.objects.len() * 40 + s.bases.len() * 96).sum::<usize>(),
        );
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.from.0);
        b.extend_from_slice(&self.to.0);
        b.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for s in &self.segments {
            b.extend_from_slice(&s.bytes.to_le_bytes());
            b.extend_from_slice(&(s.bases.len() as u32).to_le_bytes());
            for base in &s.bases {
                b.extend_from_slice(&base.hash.0);
                b.extend_from_slice(&base.size.to_le_bytes());
                b.extend_from_slice(&(base.path.as_bytes().len() as u32).to_le_bytes());
                b.extend_from_slice(base.path.as_bytes());
            }
            b.extend_from_slice(&(s.objects.len() as u32).to_le_bytes());
            for o in &s.objects {
                b.extend_from_slice(&o.hash.0);
                b.extend_from_slice(&o.size.to_le_bytes());
            }
        }
        b
    }

    /// Reads an index, checking every path and every segment's limits.
    pub fn decode(b: &[u8]) -> Result<Index, IndexError> {
        let rest = b.strip_prefix(MAGIC).ok_or(IndexError::Magic)?;
        let mut r = Reader { b: rest, at: MAGIC.len() };
        let from = r.hash()?;
        let to = r.hash()?;
        let n = r.u32()? as usize;
        let mut segments = Vec::with_capacity(n.min(r.b.len() / 16));
        for segment in 0..n {
            let bad = |why: String| IndexError::Bad { segment, why };
            let bytes = r.u64()?;
            let nb = r.u32()? as usize;
            let mut bases = Vec::with_capacity(nb.min(r.b.len() / 44));
            for _ in 0..nb {
                let hash = r.hash()?;
                let size = r.u64()?;
                let len = r.u32()? as usize;
                let path = RelPath::new(r.take(len)?).map_err(|e| bad(format!("base path: {e}")))?;
                bases.push(Base { path, hash, size });
            }
            let no = r.u32()? as usize;
            let mut objects = Vec::with_capacity(no.min(r.b.len() / 40));
            for _ in 0..no {
                objects.push(Object { hash: r.hash()?, size: r.u64()? });
            }
            let s = Segment { bytes, bases, objects };
            let own = s.objects.len() == 1 && s.bases.len() == 1;
            let (content_max, reference_max) = match own {
                true => (crate::delta::MAX_SOLID_BYTES, crate::delta::MAX_SOLID_BYTES),
                false => (SEGMENT_CONTENT, SEGMENT_REFERENCE),
            };
            if s.content_bytes() > content_max || s.reference_bytes() > reference_max {
                return Err(bad(format!(
                    "{} bytes of content over a {}-byte reference, more than a segment holds",
                    s.content_bytes(),
                    s.reference_bytes()
                )));
            }
            if s.bytes > s.content_bytes() + s.content_bytes() / 64 + (64 << 10) {
                return Err(bad(format!("a {}-byte frame for {} bytes of content", s.bytes, s.content_bytes())));
            }
            segments.push(s);
        }
        if !r.b.is_empty() {
            return Err(IndexError::Bad { segment: n, why: format!("{} bytes after the last segment", r.b.len()) });
        }
        Ok(Index { from, to, segments })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if self.b.len() < n {
            return Err(IndexError::Truncated(self.at + self.b.len()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        self.at += n;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, IndexError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, IndexError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn hash(&mut self) -> Result<Hash, IndexError> {
        Ok(Hash::from_slice(self.take(32)?).expect("32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn objects_are_cut_by_content_and_reference_and_bases_shared_once() {
        let (a, b) = (rel("usr/a"), rel("usr/b"));
        let h = |i: u8| Hash::of(&[i]);
        let mib = 1u64 << 20;
        let objs = vec![
            New { hash: h(1), size: 10 * mib, base: Some((&a, h(11), 10 * mib)) },
            New { hash: h(2), size: 10 * mib, base: Some((&a, h(11), 10 * mib)) },
            New { hash: h(3), size: 5 * mib, base: None },
            New { hash: h(4), size: MAX_OBJECT + 1, base: None },
            New { hash: h(5), size: 1000, base: Some((&b, h(12), 15 * mib)) },
        ];
        let segs = cut(objs);
        assert_eq!(segs.len(), 2, "{segs:?}");
        assert_eq!(segs[0].objects.iter().map(|o| o.hash).collect::<Vec<_>>(), [h(1), h(2)]);
        assert_eq!(segs[0].bases.len(), 1, "a base used twice is in the reference once");
        assert_eq!(segs[1].objects.iter().map(|o| o.hash).collect::<Vec<_>>(), [h(3), h(5)], "too large: left out");
        assert!(segs.iter().all(|s| s.content_bytes() <= SEGMENT_CONTENT && s.reference_bytes() <= SEGMENT_REFERENCE));
        assert_eq!(segs[1].window_log(), 25);
    }

    #[test]
    fn a_large_object_with_a_base_gets_a_segment_of_its_own_in_order() {
        let (a, big) = (rel("usr/a"), rel("lists/old_Packages"));
        let h = |i: u8| Hash::of(&[i]);
        let mib = 1u64 << 20;
        let objs = vec![
            New { hash: h(1), size: mib, base: Some((&a, h(11), mib)) },
            New { hash: h(2), size: 48 * mib, base: Some((&big, h(12), 44 * mib)) },
            New { hash: h(3), size: mib, base: None },
            New { hash: h(4), size: 65 * mib, base: Some((&big, h(12), 44 * mib)) },
            New { hash: h(5), size: 40 * mib, base: Some((&big, h(13), 65 * mib)) },
        ];
        let segs = cut(objs);
        let hashes: Vec<Vec<Hash>> = segs.iter().map(|s| s.objects.iter().map(|o| o.hash).collect()).collect();
        assert_eq!(hashes, [vec![h(1)], vec![h(2)], vec![h(3)]], "over the solid limit, or its base: left out");
        assert_eq!(segs[1].bases, [Base { path: big.clone(), hash: h(12), size: 44 * mib }]);
        assert_eq!(segs[1].window_log(), 27);
        let mut idx = Index { from: h(0), to: h(9), segments: segs };
        for s in &mut idx.segments {
            s.bytes = s.content_bytes() / 2;
        }
        assert_eq!(Index::decode(&idx.encode()).unwrap(), idx, "a large object's own segment is in bounds");
        // Two objects, or a second base, with that much content: out of bounds.
        idx.segments[1].objects.push(Object { hash: h(7), size: 1 });
        assert!(Index::decode(&idx.encode()).is_err());
    }

    #[test]
    fn the_index_round_trips_and_refuses_damage() {
        let idx = Index {
            from: Hash::of(b"v1"),
            to: Hash::of(b"v2"),
            segments: vec![Segment {
                bytes: 100,
                bases: vec![Base { path: rel("etc/x"), hash: Hash::of(b"x"), size: 7 }],
                objects: vec![Object { hash: Hash::of(b"y"), size: 300 }],
            }],
        };
        let b = idx.encode();
        assert_eq!(Index::decode(&b).unwrap(), idx);
        assert!(matches!(Index::decode(&b[..b.len() - 1]), Err(IndexError::Truncated(_))));
        assert!(matches!(Index::decode(&b[1..]), Err(IndexError::Magic)));
        let mut long = b.clone();
        long.push(0);
        assert!(Index::decode(&long).is_err());
        // A path that escapes the root is refused.
        let mut bad = idx.clone();
        bad.segments[0].bases[0].path = rel("etc/x");
        let mut enc = bad.encode();
        let at = enc.windows(5).position(|w| w == b"etc/x").unwrap();
        enc[at..at + 5].copy_from_slice(b"../xx");
        assert!(matches!(Index::decode(&enc), Err(IndexError::Bad { .. })), "{:?}", Index::decode(&enc));
        // A segment claiming more content than a segment holds is refused: more than a shared
        // segment, with two objects; more than a large object's own, with one.
        let mut big = idx;
        big.segments[0].objects[0].size = SEGMENT_CONTENT;
        big.segments[0].objects.push(Object { hash: Hash::of(b"z"), size: 1 });
        assert!(Index::decode(&big.encode()).is_err());
        big.segments[0].objects.pop();
        big.segments[0].objects[0].size = crate::delta::MAX_SOLID_BYTES + 1;
        assert!(Index::decode(&big.encode()).is_err());
    }
}

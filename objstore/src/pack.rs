//! Packs of small objects and the pack index of a version (issue 25, part 3).
//!
//! ```text
//! PREFIX/packs/<blake3 of the pack, hex>.pack        objects' stored encodings, concatenated
//! PREFIX/packs/index/<manifest identity, hex>.idx    where each small object of that version lies
//! ```
//!
//! A pack is the concatenation of the stored encodings of its objects (a zstd frame, or the
//! raw content, exactly the bytes of the loose `objects/<ab>/<hex>.zst|.raw`), in the path
//! order of the version that packed them. Its name is the blake3 of its bytes, so a pack is
//! written once and never changes. The index of a version lists every object of that version
//! below the pack limit, wherever it lies (in a pack of this version or of an earlier one), so
//! a host reads one index per pass.
//!
//! Index format, version 1 (integers little-endian):
//!
//! ```text
//! "GISPIDX\0"                 8 bytes, magic
//! format version              u32 = 1
//! pack count P                u32
//! entry count N               u32
//! P × pack hash               32 bytes each
//! N × entry, sorted by hash, no two alike:
//!     object blake3           32 bytes
//!     pack number             u32 (< P)
//!     offset in the pack      u64
//!     stored length           u32
//!     encoding                u8: 0 zstd frame, 1 raw
//! blake3 of all the above     32 bytes (a truncated or damaged index is refused whole)
//! ```

use object_store::path::Path as StorePath;

const MAGIC: &[u8; 8] = b"GISPIDX\0";
/// The index format this code writes and reads.
pub const FORMAT: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 4;
const ENTRY: usize = 32 + 4 + 8 + 4 + 1;
/// Largest index a reader accepts (about 5 million objects): bounds its memory whatever the
/// store returns.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// How an object is stored: as the loose object's suffix says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// One zstd frame of the content (`.zst`).
    Zstd,
    /// The content itself (`.raw`).
    Raw,
}

/// Where one object lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The pack's blake3.
    pub pack: [u8; 32],
    pub offset: u64,
    pub length: u32,
    pub encoding: Encoding,
}

/// A version's pack index: objects (by blake3) and where each lies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackIndex {
    packs: Vec<[u8; 32]>,
    /// Sorted by hash: (hash, pack number, offset, length, encoding).
    entries: Vec<([u8; 32], u32, u64, u32, Encoding)>,
}

/// Why an index cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("not a pack index (bad magic)")]
    Magic,
    #[error("pack index format {0}, this build reads format {FORMAT} (hint: upgrade syncd, or remove packs/index/ to have the master write format {FORMAT})")]
    Format(u32),
    #[error("pack index of {0} bytes is truncated or has trailing bytes")]
    Length(usize),
    #[error("pack index checksum does not match its content (damaged or truncated)")]
    Checksum,
    #[error("pack index entry {0}: {1}")]
    Entry(usize, &'static str),
}

impl PackIndex {
    /// An index of `objects` (hash, location), in any order; one location per hash (the first
    /// given wins).
    pub fn build(objects: impl IntoIterator<Item = ([u8; 32], Location)>) -> PackIndex {
        let mut packs: Vec<[u8; 32]> = Vec::new();
        let mut number = std::collections::HashMap::new();
        let mut entries = Vec::new();
        for (hash, loc) in objects {
            let n = *number.entry(loc.pack).or_insert_with(|| {
                packs.push(loc.pack);
                packs.len() as u32 - 1
            });
            entries.push((hash, n, loc.offset, loc.length, loc.encoding));
        }
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        PackIndex { packs, entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The distinct packs the index names.
    pub fn packs(&self) -> &[[u8; 32]] {
        &self.packs
    }

    /// Where the object `hash` lies, if the index has it.
    pub fn get(&self, hash: &[u8; 32]) -> Option<Location> {
        let i = self.entries.binary_search_by(|e| e.0.cmp(hash)).ok()?;
        let (_, p, offset, length, encoding) = self.entries[i];
        Some(Location { pack: self.packs[p as usize], offset, length, encoding })
    }

    /// Every (hash, location), by hash.
    pub fn iter(&self) -> impl Iterator<Item = ([u8; 32], Location)> + '_ {
        self.entries.iter().map(|&(h, p, offset, length, encoding)| {
            (h, Location { pack: self.packs[p as usize], offset, length, encoding })
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 32 * self.packs.len() + ENTRY * self.entries.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for p in &self.packs {
            out.extend_from_slice(p);
        }
        for (h, p, offset, length, encoding) in &self.entries {
            out.extend_from_slice(h);
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&length.to_le_bytes());
            out.push(match encoding {
                Encoding::Zstd => 0,
                Encoding::Raw => 1,
            });
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<PackIndex, IndexError> {
        if b.len() < 8 || &b[..8] != MAGIC {
            return Err(IndexError::Magic);
        }
        if b.len() < HEADER + 32 {
            return Err(IndexError::Length(b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let format = u32_at(8);
        if format != FORMAT {
            return Err(IndexError::Format(format));
        }
        let (np, ne) = (u32_at(12) as usize, u32_at(16) as usize);
        let want = (HEADER as u64) + 32 * np as u64 + (ENTRY as u64) * ne as u64 + 32;
        if want != b.len() as u64 {
            return Err(IndexError::Length(b.len()));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(IndexError::Checksum);
        }
        let mut at = HEADER;
        let mut packs = Vec::with_capacity(np);
        for _ in 0..np {
            packs.push(b[at..at + 32].try_into().expect("32 bytes"));
            at += 32;
        }
        let mut entries: Vec<([u8; 32], u32, u64, u32, Encoding)> = Vec::with_capacity(ne);
        for i in 0..ne {
            let e = &b[at..at + ENTRY];
            at += ENTRY;
            let hash: [u8; 32] = e[..32].try_into().expect("32 bytes");
            let pack = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes"));
            let offset = u64::from_le_bytes(e[36..44].try_into().expect("8 bytes"));
            let length = u32::from_le_bytes(e[44..48].try_into().expect("4 bytes"));
            let encoding = match e[48] {
                0 => Encoding::Zstd,
                1 => Encoding::Raw,
                _ => return Err(IndexError::Entry(i, "unknown encoding")),
            };
            if pack as usize >= np {
                return Err(IndexError::Entry(i, "names a pack the index does not list"));
            }
            if offset.checked_add(u64::from(length)).is_none() {
                return Err(IndexError::Entry(i, "offset and length overflow"));
            }
            if entries.last().is_some_and(|l| l.0 >= hash) {
                return Err(IndexError::Entry(i, "entries not sorted by hash, or a hash twice"));
            }
            entries.push((hash, pack, offset, length, encoding));
        }
        Ok(PackIndex { packs, entries })
    }
}

/// `PREFIX/packs/<hex>.pack`.
pub fn pack_key(packs: &StorePath, pack: &[u8; 32]) -> StorePath {
    packs.clone().join(format!("{}.pack", hex(pack)))
}

/// `PREFIX/packs/index/<identity hex>.idx`.
pub fn index_key(packs: &StorePath, identity: &[u8; 32]) -> StorePath {
    packs.clone().join("index").join(format!("{}.idx", hex(identity)))
}

fn hex(b: &[u8; 32]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> [u8; 32] {
        *blake3::hash(&[n]).as_bytes()
    }

    fn sample() -> PackIndex {
        let loc = |p: u8, offset, length, encoding| Location { pack: h(100 + p), offset, length, encoding };
        PackIndex::build([
            (h(1), loc(0, 0, 10, Encoding::Raw)),
            (h(2), loc(0, 10, 20, Encoding::Zstd)),
            (h(3), loc(1, 0, 5, Encoding::Raw)),
            (h(2), loc(1, 5, 7, Encoding::Raw)),
        ])
    }

    #[test]
    fn an_index_round_trips_and_answers_lookups() {
        let idx = sample();
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.packs().len(), 2);
        let back = PackIndex::decode(&idx.encode()).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.get(&h(2)), Some(Location { pack: h(100), offset: 10, length: 20, encoding: Encoding::Zstd }));
        assert_eq!(back.get(&h(3)).unwrap().pack, h(101));
        assert_eq!(back.get(&h(9)), None);
        assert_eq!(back.iter().count(), 3);
        let empty = PackIndex::default();
        assert_eq!(PackIndex::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn damaged_indexes_are_refused() {
        let good = sample().encode();
        assert_eq!(PackIndex::decode(b"nonsense"), Err(IndexError::Magic));
        assert_eq!(PackIndex::decode(&good[..good.len() - 1]), Err(IndexError::Length(good.len() - 1)));
        let mut flipped = good.clone();
        flipped[HEADER + 70] ^= 1;
        assert_eq!(PackIndex::decode(&flipped), Err(IndexError::Checksum));
        let mut future = good.clone();
        future[8] = 2;
        assert_eq!(PackIndex::decode(&future), Err(IndexError::Format(2)));
        assert!(IndexError::Format(2).to_string().contains("format 2"));
        // A pack number out of range, with a checksum that matches.
        let mut bad = good[..good.len() - 32].to_vec();
        let first_entry = HEADER + 32 * 2;
        bad[first_entry + 32] = 9;
        let sum = blake3::hash(&bad);
        bad.extend_from_slice(sum.as_bytes());
        assert!(matches!(PackIndex::decode(&bad), Err(IndexError::Entry(0, _))));
        assert_eq!(
            index_key(&StorePath::from("p/packs"), &[0xab; 32]).as_ref(),
            format!("p/packs/index/{}.idx", "ab".repeat(32))
        );
        assert_eq!(pack_key(&StorePath::from("packs"), &[1; 32]).as_ref(), format!("packs/{}.pack", "01".repeat(32)));
    }
}

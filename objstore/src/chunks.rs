//! Large files as content-defined chunks (issue 25, part 4).
//!
//! A regular file at or above the master's `--chunk-threshold` is cut with FastCDC (v2020,
//! normalization level 1, gear seed 0) into chunks of [`Params`] sizes. Each chunk is an
//! ordinary object (`objects/ab/<chunk blake3>.zst|.raw`, stored once whatever file or version
//! it comes from), and the file's chunk index is one object of its own:
//!
//! ```text
//! PREFIX/chunks/<first two hex digits>/<file blake3 hex>.idx
//! ```
//!
//! Index format (version 1, little-endian, not compressed: it is nearly all hashes):
//!
//! ```text
//! magic   8 bytes  "GISCHNK1"
//! min     u32      FastCDC minimum chunk size
//! avg     u32      FastCDC average chunk size
//! max     u32      FastCDC maximum chunk size
//! size    u64      the file's size
//! file    32 bytes the file's blake3
//! count   u32      number of chunks
//! count × (blake3 32 bytes, length u32)   the chunks, in file order
//! ```
//!
//! 36 bytes per chunk: about 147 KB for a 256 MiB file at a 64 KiB average. A reader checks
//! that the index names the file it expects (hash and size), that the lengths add up to the
//! size, and, as for every object, each chunk's content against its hash and the assembled
//! file against the file's hash before it renames anything into place.

use std::io::{self, Read};

use object_store::path::Path as StorePath;

/// Files this size and larger are chunked unless the master says otherwise (16 MiB).
pub const DEFAULT_THRESHOLD: u64 = 16 << 20;

const MAGIC: &[u8; 8] = b"GISCHNK1";
const HEADER: usize = 8 + 4 * 3 + 8 + 32 + 4;
const PER_CHUNK: usize = 32 + 4;
/// The smallest minimum chunk size a reader accepts: bounds an index at 36 bytes per KiB of file.
const MIN_MIN: u32 = 1024;

/// FastCDC chunk sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Params {
    /// 16 KiB / 64 KiB / 256 KiB: casync's and desync's average (see docs/large-files.md).
    pub const DEFAULT: Params = Params { min: 16 << 10, avg: 64 << 10, max: 256 << 10 };

    /// Whether FastCDC takes these sizes (and a reader accepts them).
    pub fn check(&self) -> Result<(), String> {
        use fastcdc::v2020 as f;
        let Params { min, avg, max } = *self;
        let even = min % 2 == 0 && avg % 2 == 0 && max % 2 == 0;
        let ranged = (MIN_MIN.max(f::MINIMUM_MIN as u32)..=f::MINIMUM_MAX as u32).contains(&min)
            && (f::AVERAGE_MIN as u32..=f::AVERAGE_MAX as u32).contains(&avg)
            && (f::MAXIMUM_MIN as u32..=f::MAXIMUM_MAX as u32).contains(&max);
        if even && ranged && min <= avg && avg <= max {
            Ok(())
        } else {
            Err(format!("chunk sizes min {min} / avg {avg} / max {max} are not usable by FastCDC"))
        }
    }
}

/// One chunk: its blake3 and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    pub len: u32,
}

/// A file's chunk index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    pub params: Params,
    pub size: u64,
    pub file: [u8; 32],
    pub chunks: Vec<ChunkRef>,
}

impl Index {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + PER_CHUNK * self.chunks.len());
        out.extend_from_slice(MAGIC);
        for v in [self.params.min, self.params.avg, self.params.max] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.file);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.hash);
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    /// Parses an index and checks that it lists the chunks of the file `file` of `size` bytes:
    /// the error says what does not fit.
    pub fn parse(bytes: &[u8], file: &[u8; 32], size: u64) -> Result<Index, String> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("not a chunk index (bad magic or too short)".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let params = Params { min: u32_at(8), avg: u32_at(12), max: u32_at(16) };
        params.check()?;
        let isize = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
        let ifile: [u8; 32] = bytes[28..60].try_into().expect("32 bytes");
        let count = u32_at(60) as usize;
        if &ifile != file || isize != size {
            return Err(format!(
                "the index is of another file ({} bytes, blake3 {}), not {size} bytes, blake3 {}",
                isize,
                hex(&ifile),
                hex(file)
            ));
        }
        if bytes.len() != HEADER + count * PER_CHUNK {
            return Err(format!("{} bytes for {count} chunks (want {})", bytes.len(), HEADER + count * PER_CHUNK));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut total = 0u64;
        for rec in bytes[HEADER..].chunks_exact(PER_CHUNK) {
            let len = u32::from_le_bytes(rec[32..36].try_into().expect("4 bytes"));
            if len == 0 || len > params.max {
                return Err(format!("a chunk of {len} bytes, outside 1..={}", params.max));
            }
            total += u64::from(len);
            chunks.push(ChunkRef { hash: rec[..32].try_into().expect("32 bytes"), len });
        }
        if total != size {
            return Err(format!("the chunks add up to {total} bytes, not the file's {size}"));
        }
        Ok(Index { params, size, file: *file, chunks })
    }

    /// The largest index a file of `size` bytes can have (with the smallest chunks a reader
    /// accepts): a GET of an index stops there.
    pub fn max_bytes(size: u64) -> u64 {
        HEADER as u64 + PER_CHUNK as u64 * (size / u64::from(MIN_MIN) + 1)
    }
}

/// Cuts `source` into chunks with `params`, calling `each(offset, data)` per chunk in order.
pub fn cut<R: Read>(source: R, params: Params, mut each: impl FnMut(u64, Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    params.check().map_err(io::Error::other)?;
    let cdc = fastcdc::v2020::StreamCDC::new(source, params.min as usize, params.avg as usize, params.max as usize);
    for chunk in cdc {
        let chunk = chunk.map_err(io::Error::from)?;
        each(chunk.offset, chunk.data)?;
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `PREFIX/chunks/<ab>/<hex>.idx`, where `objects` is `PREFIX/objects`.
pub fn index_key(objects: &StorePath, file_hex: &str) -> StorePath {
    let mut parts: Vec<_> = objects.parts().collect();
    parts.pop();
    let prefix = StorePath::from_iter(parts);
    prefix.join("chunks").join(&file_hex[..2]).join(format!("{file_hex}.idx"))
}

/// `PREFIX/chunks`.
pub fn index_dir(objects: &StorePath) -> StorePath {
    let mut parts: Vec<_> = objects.parts().collect();
    parts.pop();
    StorePath::from_iter(parts).join("chunks")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        h.finalize_xof().fill(&mut v);
        v
    }

    fn index_of(content: &[u8]) -> Index {
        let mut chunks = Vec::new();
        cut(content, Params::DEFAULT, |_, d| {
            chunks.push(ChunkRef { hash: *blake3::hash(&d).as_bytes(), len: d.len() as u32 });
            Ok(())
        })
        .unwrap();
        Index { params: Params::DEFAULT, size: content.len() as u64, file: *blake3::hash(content).as_bytes(), chunks }
    }

    #[test]
    fn an_index_round_trips_and_a_wrong_one_is_refused() {
        let content = data(3 << 20, 1);
        let idx = index_of(&content);
        assert!(idx.chunks.len() > 20, "{}", idx.chunks.len());
        let bytes = idx.encode();
        assert!(bytes.len() as u64 <= Index::max_bytes(idx.size));
        assert_eq!(Index::parse(&bytes, &idx.file, idx.size).unwrap(), idx);
        let e = Index::parse(&bytes, &[0; 32], idx.size).unwrap_err();
        assert!(e.contains("another file"), "{e}");
        assert!(Index::parse(&bytes, &idx.file, idx.size + 1).is_err());
        assert!(Index::parse(&bytes[..bytes.len() - 1], &idx.file, idx.size).is_err());
        let mut bad = bytes.clone();
        bad[HEADER + 32] ^= 1; // first chunk's length
        assert!(Index::parse(&bad, &idx.file, idx.size).unwrap_err().contains("add up"));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(Index::parse(&bad, &idx.file, idx.size).unwrap_err().contains("magic"));
    }

    #[test]
    fn an_insertion_and_an_overwrite_change_few_chunks() {
        let old = data(8 << 20, 2);
        let mut new = old.clone();
        new.splice(100_000..100_000, data(10 << 10, 3));
        let mid = new.len() / 2;
        new[mid..mid + (1 << 20)].copy_from_slice(&data(1 << 20, 4));
        let (a, b) = (index_of(&old), index_of(&new));
        let have: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.hash).collect();
        let changed: u64 = b.chunks.iter().filter(|c| !have.contains(&c.hash)).map(|c| u64::from(c.len)).sum();
        assert!(changed < 2 * ((1 << 20) + (10 << 10)), "{changed} bytes of new chunks");
    }

    #[test]
    fn keys_live_beside_objects() {
        let objects = StorePath::from("fleet/objects");
        let hex = "ab".repeat(32);
        assert_eq!(index_key(&objects, &hex).as_ref(), format!("fleet/chunks/ab/{hex}.idx"));
        assert_eq!(index_key(&StorePath::from("objects"), &hex).as_ref(), format!("chunks/ab/{hex}.idx"));
        assert_eq!(index_dir(&objects).as_ref(), "fleet/chunks");
    }
}

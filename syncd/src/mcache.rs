//! The host's copy of the last manifest it received, kept in the state dir.
//!
//! A pass offers the cached copy's identity to the master; when the image has not changed,
//! the master answers with the signed header alone and the pass reads the manifest from here.
//! That turns a no-change pass from "receive and check the whole image" into "read a local
//! file", and the master's cost per host and round into one header.
//!
//! The copy is never trusted on its own: it is loaded through the same
//! [`ManifestAssembler`] as a manifest off the wire (paths, order, fields, count), and must
//! hash to the identity the master's header (signature and all) names.
//!
//! File format: `GISMC01\n`, then frames of a little-endian `u32` length and one encoded
//! `ManifestMessage`: the header first, then the entry batches.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use manifest::wire::ManifestAssembler;
use manifest::{Hash, Manifest};
use prost::Message;
use proto::v1 as pb;

const MAGIC: &[u8; 8] = b"GISMC01\n";

fn read_frame(r: &mut impl Read) -> io::Result<Option<pb::ManifestMessage>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > proto::MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    pb::ManifestMessage::decode(buf.as_slice()).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn open(path: &Path) -> io::Result<BufReader<File>> {
    let mut r = BufReader::with_capacity(256 * 1024, File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a manifest cache"));
    }
    Ok(r)
}

/// The identity the cached copy claims (from its header only), or `None` when there is no
/// usable copy. Cheap: the entries are not read.
pub fn peek_identity(path: &Path) -> Option<Hash> {
    let mut r = open(path).ok()?;
    match read_frame(&mut r).ok()?? {
        pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(h)) } => Hash::from_slice(&h.identity),
        _ => None,
    }
}

/// Why a kept copy of a manifest (the manifest cache, or one in the local store) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the manifest cache file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the manifest cache file {} is damaged", .path.display())]
    Damaged {
        path: PathBuf,
        #[source]
        source: manifest::ManifestError,
    },
    #[error("the manifest cache file {} holds {}, not {}", .path.display(), .held.to_hex(), .wanted.to_hex())]
    Other { path: PathBuf, held: Hash, wanted: Hash },
    /// The exclusion lists kept beside a manifest in the local store.
    #[error("cannot read the exclusion lists kept in {}", .path.display())]
    Lists {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the exclusion lists kept in {} are damaged", .path.display())]
    ListsDamaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Loads the cached copy and checks it completely: it must be a valid manifest whose entries
/// hash to `identity`. Returns why not, for a warning (the caller then asks for the whole
/// manifest).
pub fn load(path: &Path, identity: &Hash, read: &throttle::Limiter) -> Result<Manifest, LoadError> {
    let io_err = |source| LoadError::Read { path: path.to_owned(), source };
    let damaged = |source| LoadError::Damaged { path: path.to_owned(), source };
    let mut r = open(path).map_err(io_err)?;
    let mut asm = ManifestAssembler::default();
    let mut bytes = 0u64;
    while let Some(msg) = read_frame(&mut r).map_err(io_err)? {
        bytes += msg.encoded_len() as u64 + 4;
        asm.push(msg).map_err(damaged)?;
    }
    read.charge(bytes);
    match asm.identity() {
        Some(held) if held != *identity => Err(LoadError::Other { path: path.to_owned(), held, wanted: *identity }),
        // `finish` checks that the entries hash to the identity the copy's header names.
        _ => asm.finish().map_err(damaged),
    }
}

/// Writes `m` (whose identity is `identity`) as the cached copy: temp file, fsync, rename.
pub fn save(path: &Path, m: &Manifest, identity: &Hash, write: &throttle::Limiter) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).create(dir)?;
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::with_capacity(256 * 1024, File::create(&tmp)?);
    w.write_all(MAGIC)?;
    let mut buf = Vec::new();
    let mut bytes = MAGIC.len() as u64;
    for msg in manifest::wire::manifest_messages(m, identity, proto::MANIFEST_BATCH) {
        buf.clear();
        msg.encode(&mut buf).map_err(io::Error::other)?;
        w.write_all(&(buf.len() as u32).to_le_bytes())?;
        w.write_all(&buf)?;
        bytes += buf.len() as u64 + 4;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    write.charge(bytes);
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use manifest::{Entry, Kind, Meta, RelPath};

    fn sample() -> Manifest {
        let dir = Entry {
            path: RelPath::new("etc").unwrap(),
            kind: Kind::Dir,
            meta: Meta { mode: 0o755, ..Meta::default() },
            size: 0,
            hash: None,
            target: None,
            rdev: 0,
            link_group: 0,
            sparse: false,
        };
        let file = Entry {
            path: RelPath::new("etc/passwd").unwrap(),
            kind: Kind::File,
            size: 3,
            hash: Some(Hash::of(b"abc")),
            meta: Meta { mode: 0o644, ..Meta::default() },
            ..dir.clone()
        };
        Manifest { version: 4, root: Meta { mode: 0o755, ..Meta::default() }, entries: vec![dir, file] }
    }

    #[test]
    fn a_saved_manifest_loads_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = crate::state::StateDir::new(d.path(), Path::new("/")).manifest_cache();
        let m = sample();
        let id = m.identity();
        let unlimited = throttle::Limiter::unlimited();
        assert_eq!(peek_identity(&p), None, "no cache yet");
        save(&p, &m, &id, &unlimited).unwrap();
        assert_eq!(peek_identity(&p), Some(id));
        assert_eq!(load(&p, &id, &unlimited).unwrap(), m);
        let other = Hash::of(b"another image");
        let err = load(&p, &other, &unlimited).unwrap_err();
        assert!(matches!(err, LoadError::Other { held, .. } if held == id), "a different identity is refused: {err}");
    }

    #[test]
    fn a_damaged_or_edited_cache_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.bin");
        let m = sample();
        let id = m.identity();
        let unlimited = throttle::Limiter::unlimited();
        save(&p, &m, &id, &unlimited).unwrap();
        let good = std::fs::read(&p).unwrap();

        // Truncated: the entry count no longer adds up.
        std::fs::write(&p, &good[..good.len() - 10]).unwrap();
        assert!(load(&p, &id, &unlimited).is_err());
        // One byte of a path changed (etc/passwd -> etc/passwe): same shape, wrong identity.
        let mut edited = good.clone();
        let at = edited.windows(10).position(|w| w == b"etc/passwd").unwrap();
        edited[at + 9] = b'e';
        std::fs::write(&p, &edited).unwrap();
        let err = crate::error::chain(&load(&p, &id, &unlimited).unwrap_err());
        assert!(err.contains("identity mismatch"), "{err}");
        // Not a cache at all.
        std::fs::write(&p, b"hello").unwrap();
        assert_eq!(peek_identity(&p), None);
        assert!(load(&p, &id, &unlimited).is_err());
    }
}

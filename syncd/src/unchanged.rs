//! The unchanged-host record: proof that a host root is exactly as it was when it last matched
//! an image, from its metadata walk alone.
//!
//! After a pass that found nothing to change and nothing wrong, syncd records the image's
//! identity, the exclusion rules, and a digest of the host walk: every entry's path, kind,
//! metadata (mode, owner, mtime, xattrs), size, symlink target, device number, and its dev,
//! inode, link count and ctime, plus what the rules kept out. A later pass against the same
//! image and rules whose walk digests the same needs neither the manifest nor any hashing: the
//! host still matches. ctime is what makes this sound, as for the host index: every change to
//! an inode's content or metadata sets it, and nothing in userspace can set it back; a new file
//! is a new inode. Any walk error, and any change of image, rules or syncd version, means a
//! full pass.
//!
//! This is what keeps a no-change pass on a million files from holding the manifest as well
//! as the host tree.

use std::io::Write;
use std::path::Path;

use manifest::scan::Scan;
use manifest::{BufferedHasher, Hash, HashSink};
use rayon::prelude::*;

const MAGIC: &[u8; 8] = b"GISUC01\n";

/// Entries per chunk of the walk digest (part of its definition: changing it changes every
/// digest, which costs each host one full pass).
const DIGEST_CHUNK: usize = 8192;

/// The digest of a walk, or `None` if the walk met any error (then nothing is known for sure).
pub fn digest(walk: &Scan) -> Option<Hash> {
    if !walk.errors.is_empty() {
        return None;
    }
    let mut h = BufferedHasher::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    walk.root.hash_into(&mut h);
    h.update(&walk.root_dev.to_le_bytes());
    h.update(&(walk.entries.len() as u64).to_le_bytes());
    // Entries are digested in fixed chunks, in parallel, and the chunks' digests in order:
    // the same tree gives the same digest on any number of threads, and a million entries
    // take half the time on two cores.
    let chunks: Vec<Hash> = walk
        .entries
        .par_chunks(DIGEST_CHUNK)
        .map(|chunk| {
            let mut h = BufferedHasher::new();
            for e in chunk {
                e.entry.hash_into(&mut h);
                for v in [e.dev, e.ino, u64::from(e.nlink), e.ctime_ns as u64, u64::from(e.mount_point)] {
                    h.update(&v.to_le_bytes());
                }
            }
            h.finalize()
        })
        .collect();
    for c in &chunks {
        h.update(&c.0);
    }
    h.update(&(walk.excluded.len() as u64).to_le_bytes());
    for (p, is_dir) in &walk.excluded {
        h.update(&(p.as_bytes().len() as u64).to_le_bytes());
        h.update(p.as_bytes());
        h.update(&[u8::from(*is_dir)]);
    }
    Some(h.finalize())
}

/// A digest of the exclusion rules a pass runs with.
pub fn rules_digest(rules: &exclusions::Exclusions) -> Hash {
    Hash::of(format!("{:?}", rules.rules()).as_bytes())
}

/// The record's content for an image, rules and walk digest.
fn body(identity: &Hash, rules: &Hash, walk: &Hash) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    for h in [identity, rules, walk] {
        b.extend_from_slice(&h.0);
    }
    b
}

/// The walk digest recorded for this image and these rules, if the record is for them (a walk
/// may then prove the host unchanged, so the manifest is worth loading only after the walk).
pub fn recorded_walk(path: &Path, identity: &Hash, rules: &Hash) -> Option<Hash> {
    let b = std::fs::read(path).ok()?;
    let ours = b.len() == 8 + 96 && b[..8] == MAGIC[..] && b[8..40] == identity.0 && b[40..72] == rules.0;
    ours.then(|| Hash::from_slice(&b[72..104])).flatten()
}

/// Writes the record (temp file, fsync, rename).
pub fn record(path: &Path, identity: &Hash, rules: &Hash, walk: &Hash) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).create(d)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body(identity, rules, walk))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Removes the record: the host is about to change, or did not match.
pub fn clear(path: &Path) {
    let _ = std::fs::remove_file(path);
}

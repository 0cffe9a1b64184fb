//! Scanning the host root, hashing only what the comparison needs.
//!
//! A host file is hashed when the image has a regular file of the same size at the same path
//! (to tell whether it changed), or when its size matches content the host still needs (it may
//! be that content, moved: copying it locally beats downloading it).

use foldhash::{HashMap, HashSet};
use std::path::Path;

use exclusions::Exclusions;
use manifest::cache::HashCache;
use manifest::scan::{self, ScanError};
use manifest::{Kind, Manifest, RelPath};

use crate::plan::HostTree;

/// Scans `root` for comparison with `manifest`. Errors below the root are returned alongside
/// the tree; the plan fences off what they make unknown.
pub fn scan(
    root: &Path,
    manifest: &Manifest,
    rules: &Exclusions,
    index: Option<&HashCache>,
    read: &throttle::Limiter,
) -> Result<(HostTree, Vec<ScanError>), ScanError> {
    Ok(hash(root, walk(root, rules)?, manifest, index, read))
}

/// The metadata walk of `root`, which needs no manifest (it can run while the manifest is
/// still being loaded). Excluded paths are never read: not stat'ed beyond the directory
/// listing, never hashed, never descended into.
pub fn walk(root: &Path, rules: &Exclusions) -> Result<scan::Scan, ScanError> {
    let t = std::time::Instant::now();
    let s = scan::walk_beneath(root, |p, is_dir| rules.matches_self(p, is_dir).is_excluded())?;
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "host walk");
    Ok(s)
}

/// Completes a [`walk`]: hashes what the comparison with `manifest` needs.
pub fn hash(
    root: &Path,
    mut s: scan::Scan,
    manifest: &Manifest,
    index: Option<&HashCache>,
    read: &throttle::Limiter,
) -> (HostTree, Vec<ScanError>) {
    let t = std::time::Instant::now();
    let mut errors = std::mem::take(&mut s.errors);
    let unreadable: Vec<RelPath> =
        errors.iter().filter(|e| e.is_unlisted_dir()).filter_map(|e| RelPath::from_fs(root, e.path()).ok()).collect();

    // Files unchanged since they were last hashed (same dev, inode, size, mtime and ctime) take
    // their hash from the index instead of being read.
    if let Some(index) = index {
        let hits = index.apply(&mut s.entries);
        tracing::debug!(hits, "host index");
    }
    let image_size: HashMap<&RelPath, u64> =
        manifest.entries.iter().filter(|e| e.kind == Kind::File).map(|e| (&e.path, e.size)).collect();
    // Round 1: files that may be unchanged.
    errors
        .extend(scan::hash_files(root, &mut s.entries, read, |h| image_size.get(&h.entry.path) == Some(&h.entry.size)));

    // Round 2: files whose size matches content the host still lacks.
    let host_hashes: HashMap<&RelPath, manifest::Hash> =
        s.entries.iter().filter_map(|h| Some((&h.entry.path, h.entry.hash?))).collect();
    let needed_sizes: HashSet<u64> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File && e.size > 0 && host_hashes.get(&e.path) != e.hash.as_ref())
        .map(|e| e.size)
        .collect();
    if !needed_sizes.is_empty() {
        errors.extend(scan::hash_files(root, &mut s.entries, read, |h| needed_sizes.contains(&h.entry.size)));
    }
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "host hashing done");
    // Files that changed while hashed simply stay unhashed: the plan replaces them.
    errors.retain(|e| !matches!(e, ScanError::Changed { .. }));
    (HostTree { root: s.root, entries: s.entries, unreadable, excluded: s.excluded }, errors)
}

//! Scanning the host root, hashing only what the comparison needs.
//!
//! A host file is hashed when the image has a regular file of the same size at the same path
//! (to tell whether it changed), or when its size matches content the host still needs (it may
//! be that content, moved: copying it locally beats downloading it).

use foldhash::HashSet;
use std::path::Path;

use exclusions::Exclusions;
use manifest::scan::{self, ScanError};
use manifest::{delta, Kind, Manifest, RelPath};

use crate::plan::HostTree;

/// The metadata walk of `root`, which needs no manifest (it can run while the manifest is
/// still being loaded). Excluded paths are never read: not stat'ed beyond the directory
/// listing, never hashed, never descended into.
pub fn walk(root: &Path, rules: &Exclusions) -> Result<scan::Scan, ScanError> {
    let t = std::time::Instant::now();
    let s = scan::walk_beneath(root, |p, is_dir| rules.matches_self(p, is_dir).is_excluded())?;
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "host walk");
    Ok(s)
}

/// Completes a [`walk`]: hashes what the comparison with `manifest` needs and, with
/// `delta_bases`, the old files that new content may be sent as a delta against. Files that
/// already have a hash (from the host index, [`manifest::hash_index::apply_file`]) are not read.
pub fn hash(
    root: &Path,
    mut s: scan::Scan,
    manifest: &Manifest,
    read: &throttle::Limiter,
    delta_bases: bool,
    every_file: bool,
) -> (HostTree, Vec<ScanError>) {
    let t = std::time::Instant::now();
    let mut errors = std::mem::take(&mut s.errors);
    let unreadable: Vec<RelPath> =
        errors.iter().filter(|e| e.is_unlisted_dir()).filter_map(|e| RelPath::from_fs(root, e.path()).ok()).collect();

    // Both lists are sorted by path: pair them in one merge, no maps (a million entries).
    let pairs = pair_by_path(&manifest.entries, &s.entries);
    let image_file = |i: usize| pairs[i].map(|m| &manifest.entries[m as usize]).filter(|m| m.kind == Kind::File);
    // Round 1: files that may be unchanged.
    let want: Vec<bool> =
        (0..s.entries.len()).map(|i| image_file(i).is_some_and(|m| m.size == s.entries[i].entry.size)).collect();
    errors.extend(scan::hash_selected(root, &mut s.entries, read, &want));

    // Round 2: files whose size matches content the host still lacks.
    let mut present = vec![false; manifest.entries.len()];
    for (i, h) in s.entries.iter().enumerate() {
        if let (Some(m), Some(hash)) = (pairs[i], h.entry.hash) {
            present[m as usize] = manifest.entries[m as usize].hash == Some(hash);
        }
    }
    // Every image file already at its path with its content (the usual pass): no content is
    // missing, so no other file is worth hashing and nothing will be sent as a delta.
    let missing = manifest.entries.iter().zip(&present).any(|(e, present)| e.kind == Kind::File && !*present);
    if missing {
        let needed_sizes: HashSet<u64> = manifest
            .entries
            .iter()
            .zip(&present)
            .filter(|(e, present)| e.kind == Kind::File && e.size > 0 && !**present)
            .map(|(e, _)| e.size)
            .collect();
        if !needed_sizes.is_empty() {
            let want: Vec<bool> = s.entries.iter().map(|h| needed_sizes.contains(&h.entry.size)).collect();
            errors.extend(scan::hash_selected(root, &mut s.entries, read, &want));
        }
        // Round 3: old versions of changed files, and files gone from the image in a directory
        // where it has new files (a renamed file's old name), as delta bases (and, up to 64 MiB,
        // as bases of a large object in the solid delta). Each is read once
        // here and again only if the master sends a delta against it; a pass with nothing to fetch
        // reads none.
        if delta_bases {
            // Image files with no host file at their path: the ones a renamed file's base is
            // looked for beside.
            let mut host_file = vec![false; manifest.entries.len()];
            for (m, h) in pairs.iter().zip(&s.entries) {
                if let Some(m) = m {
                    host_file[*m as usize] = h.entry.kind == Kind::File;
                }
            }
            let new_dirs: HashSet<&[u8]> = manifest
                .entries
                .iter()
                .zip(&host_file)
                .filter(|(e, host_file)| e.kind == Kind::File && !**host_file)
                .map(|(e, _)| delta::dir_of(&e.path))
                .collect();
            let want: Vec<bool> = s
                .entries
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    // Up to the solid delta's limit: a large file's old version is its base
                    // there (never for a per-object delta; see `delta::choose_large`).
                    let sized = (delta::MIN_DELTA_BYTES..=delta::MAX_SOLID_BYTES).contains(&h.entry.size);
                    sized
                        && match image_file(i) {
                            Some(m) => m.size != h.entry.size,
                            None => !new_dirs.is_empty() && new_dirs.contains(delta::dir_of(&h.entry.path)),
                        }
                })
                .collect();
            if want.iter().any(|w| *w) {
                errors.extend(scan::hash_selected(root, &mut s.entries, read, &want));
            }
        }
    }
    // A prefetch: every host file not yet hashed (the ones the commit will replace or delete),
    // so the commit can keep their old content under its hash without reading it then.
    if every_file {
        let want: Vec<bool> = s.entries.iter().map(|h| h.entry.size > 0 && !h.mount_point).collect();
        errors.extend(scan::hash_selected(root, &mut s.entries, read, &want));
    }
    tracing::debug!(secs = t.elapsed().as_secs_f64(), missing, "host hashing done");
    // Files that changed while hashed simply stay unhashed: the plan replaces them.
    errors.retain(|e| !matches!(e, ScanError::Changed { .. }));
    (HostTree { root: s.root, entries: s.entries, unreadable, excluded: s.excluded }, errors)
}

/// For each host entry, the index of the image entry at the same path (both sorted by path).
fn pair_by_path(image: &[manifest::Entry], host: &[scan::ScannedEntry]) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(host.len());
    let mut m = 0;
    for h in host {
        let mut found = None;
        while m < image.len() {
            match image[m].path.cmp(&h.entry.path) {
                std::cmp::Ordering::Less => m += 1,
                std::cmp::Ordering::Equal => {
                    found = Some(m as u32);
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        out.push(found);
    }
    out
}

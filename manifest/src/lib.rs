//! The tree model shared by `syncmaster` and `syncd`.
//!
//! - [`RelPath`]: the validated path type every entry is keyed by;
//! - [`Entry`] and [`Meta`]: what a root partition needs recorded for each path;
//! - [`scan`]: walking and hashing a tree;
//! - [`Manifest`]: a validated, sorted, versioned list of entries with an identity hash;
//! - [`wire`]: conversion to and from the protocol messages, validating everything received.

pub mod delta;
mod entry;
pub mod hash_index;
mod path;
pub mod scan;
pub mod solid;
pub mod trust;
pub mod units;
pub mod wire;
pub mod xattr;

use foldhash::{HashMap, HashMapExt};

pub use entry::{BufferedHasher, Entry, Hash, HashSink, Kind, Meta, Xattr, Xattrs, PERM_MASK};
pub use path::{escape_bytes, PathError, RelPath, MAX_NAME, MAX_PATH};

/// A golden image: its version, the metadata of its top directory, and every entry beneath it,
/// sorted by path with no duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u64,
    pub root: Meta,
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest entry {index}: {source}")]
    BadPath {
        index: usize,
        #[source]
        source: PathError,
    },
    #[error("manifest entry {path} is out of order or duplicated (after {prev})")]
    NotSorted { path: RelPath, prev: RelPath },
    #[error("manifest entry {path}: its parent {parent} is not a directory in the manifest")]
    ParentNotDir { path: RelPath, parent: RelPath },
    #[error("manifest entry {path}: {what}")]
    BadField { path: String, what: String },
    #[error("manifest identity mismatch: header says {expected}, entries hash to {actual}")]
    IdentityMismatch { expected: String, actual: String },
    #[error("manifest entry count mismatch: header says {expected}, received {actual}")]
    CountMismatch { expected: u64, actual: u64 },
    #[error("manifest stream ended before its header")]
    NoHeader,
}

impl Manifest {
    /// Builds a manifest from scanned entries, checking every invariant.
    pub fn new(version: u64, root: Meta, mut entries: Vec<Entry>) -> Result<Manifest, ManifestError> {
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let m = Manifest { version, root, entries };
        m.validate()?;
        Ok(m)
    }

    /// Puts `entries` (sorted by path) in place: each replaces the entry at its path, or is
    /// added there. A host's files rendered by the master are laid over the image this way
    /// (the host does it before checking the identity; the master computes the same identity
    /// without a copy, [`Manifest::identity_with`]).
    pub fn overlay(&mut self, entries: &[Entry]) {
        for e in entries {
            match self.entries.binary_search_by(|x| x.path.cmp(&e.path)) {
                Ok(i) => self.entries[i] = e.clone(),
                Err(i) => self.entries.insert(i, e.clone()),
            }
        }
    }

    /// Content identity: blake3 over the canonical encoding of the root and every entry.
    /// Two images with the same identity are the same tree; the version is not part of it.
    pub fn identity(&self) -> Hash {
        self.identity_with(&[])
    }

    /// The identity this manifest would have after [`Manifest::overlay`] of `overlay` (sorted
    /// by path), computed by merging the two lists as they are hashed, with no copy.
    pub fn identity_with(&self, overlay: &[Entry]) -> Hash {
        let added = overlay.iter().filter(|o| self.get(&o.path).is_none()).count();
        let mut h = BufferedHasher::new();
        h.update(b"golden-image-sync manifest v1\0");
        self.root.hash_into(&mut h);
        h.update(&((self.entries.len() + added) as u64).to_le_bytes());
        let mut over = overlay.iter().peekable();
        for e in &self.entries {
            while let Some(o) = over.next_if(|o| o.path < e.path) {
                o.hash_into(&mut h);
            }
            match over.next_if(|o| o.path == e.path) {
                Some(o) => o.hash_into(&mut h),
                None => e.hash_into(&mut h),
            }
        }
        for o in over {
            o.hash_into(&mut h);
        }
        h.finalize()
    }

    /// Looks up an entry by path.
    pub fn get(&self, path: &RelPath) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.path.cmp(path)).ok().map(|i| &self.entries[i])
    }

    /// The leader (first member in path order) of each hard-link group.
    pub fn link_leaders(&self) -> HashMap<u32, &RelPath> {
        let mut m = HashMap::new();
        for e in &self.entries {
            if e.link_group != 0 {
                m.entry(e.link_group).or_insert(&e.path);
            }
        }
        m
    }

    /// Total size of all regular-file content.
    pub fn content_bytes(&self) -> u64 {
        self.entries.iter().filter(|e| e.kind == Kind::File).map(|e| e.size).sum()
    }

    /// Checks the invariants a receiver relies on: strictly sorted unique paths, every parent a
    /// directory in the manifest (so no entry can sit beneath a symlink), and fields that fit
    /// each entry's kind.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_meta(&"(root)", &self.root)?;
        let mut groups: HashMap<u32, &Entry> = HashMap::new();
        // The last parent found to be a directory: siblings are neighbours in path order, so
        // most entries share it, and skip the lookup (on a million entries, a binary search
        // each cost more than the rest of the checks together).
        let mut known_dir: &[u8] = &[];
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 && self.entries[i - 1].path >= e.path {
                return Err(ManifestError::NotSorted { path: e.path.clone(), prev: self.entries[i - 1].path.clone() });
            }
            if let Some(parent) = e.path.parent_bytes() {
                if parent != known_dir {
                    let found = self.entries[..i].binary_search_by(|p| p.path.as_bytes().cmp(parent));
                    match found.ok().map(|j| &self.entries[j]) {
                        Some(p) if p.kind == Kind::Dir => known_dir = p.path.as_bytes(),
                        _ => {
                            let parent = e.path.parent().expect("a path with a parent");
                            return Err(ManifestError::ParentNotDir { path: e.path.clone(), parent });
                        }
                    }
                }
            }
            let bad = |what: &str| ManifestError::BadField { path: e.path.to_string(), what: what.to_owned() };
            check_meta(&e.path, &e.meta)?;
            match e.kind {
                Kind::File if e.hash.is_none() => return Err(bad("regular file without a content hash")),
                Kind::Symlink if e.target.as_ref().is_none_or(|t| t.is_empty() || t.contains(&0)) => {
                    return Err(bad("symlink without a valid target"))
                }
                Kind::Symlink if e.target.as_ref().is_some_and(|t| t.len() > MAX_PATH) => {
                    return Err(bad("symlink target too long"))
                }
                _ => {}
            }
            if e.kind != Kind::File && (e.hash.is_some() || e.size != 0) {
                return Err(bad("content hash or size on an entry that is not a regular file"));
            }
            if e.kind != Kind::Symlink && e.target.is_some() {
                return Err(bad("symlink target on an entry that is not a symlink"));
            }
            if e.link_group != 0 {
                if e.kind == Kind::Dir {
                    return Err(bad("a directory cannot be hard-linked"));
                }
                if let Some(leader) = groups.get(&e.link_group) {
                    if leader.kind != e.kind
                        || leader.meta != e.meta
                        || leader.hash != e.hash
                        || leader.target != e.target
                        || leader.rdev != e.rdev
                    {
                        return Err(bad(&format!(
                            "hard-link group {} members disagree (with {})",
                            e.link_group, leader.path
                        )));
                    }
                } else {
                    groups.insert(e.link_group, e);
                }
            }
        }
        Ok(())
    }
}

/// `path` is only formatted when a check fails (most manifests have a million entries that pass).
fn check_meta(path: &dyn std::fmt::Display, m: &Meta) -> Result<(), ManifestError> {
    let bad = |what: String| ManifestError::BadField { path: path.to_string(), what };
    if m.mode & !PERM_MASK != 0 {
        return Err(bad(format!("mode {:#o} has bits beyond permissions", m.mode)));
    }
    for w in m.xattrs.windows(2) {
        if w[0].name >= w[1].name {
            return Err(bad(format!("xattr {} is duplicated or out of order", String::from_utf8_lossy(&w[1].name))));
        }
    }
    for x in &m.xattrs {
        if x.name.is_empty() || x.name.contains(&0) || x.name.len() > 255 || x.value.len() > 64 * 1024 {
            return Err(bad(format!(
                "xattr {:?} has an invalid name or an oversized value",
                String::from_utf8_lossy(&x.name)
            )));
        }
    }
    Ok(())
}

/// Scans the tree at `root` into a manifest, hashing every regular file in parallel.
/// Any unreadable entry fails the whole scan: an image must be served whole or not at all.
pub fn scan_image(root: &std::path::Path, version: u64) -> Result<Manifest, ImageScanError> {
    scan_image_cached(root, version, &mut hash_index::HashIndex::default())
}

/// Like [`scan_image`], taking unchanged files' hashes from `cache` and refreshing it.
pub fn scan_image_cached(
    root: &std::path::Path,
    version: u64,
    cache: &mut hash_index::HashIndex,
) -> Result<Manifest, ImageScanError> {
    let mut scan = scan::walk(root)?;
    let mut errors = std::mem::take(&mut scan.errors);
    cache.apply(&mut scan.entries);
    errors.extend(scan::hash_files(root, &mut scan.entries, &throttle::Limiter::unlimited(), |_| true));
    if errors.is_empty() {
        cache.refresh(&scan.entries);
    }
    if !errors.is_empty() {
        return Err(ImageScanError::Entries(errors));
    }
    let entries = scan.entries.into_iter().map(|s| s.entry).collect();
    Ok(Manifest::new(version, scan.root, entries)?)
}

#[derive(Debug, thiserror::Error)]
pub enum ImageScanError {
    #[error(transparent)]
    Root(#[from] scan::ScanError),
    #[error("{} entries of the image could not be read, first: {}", .0.len(), .0[0])]
    Entries(Vec<scan::ScanError>),
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

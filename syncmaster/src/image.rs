//! A scanned image as the master serves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use manifest::{Hash, Kind, Manifest, RelPath};
use proto::v1 as pb;

/// An image loaded and ready to serve.
pub struct Image {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// `manifest.identity()`, computed once: hosts ask for it on every pass.
    pub identity: Hash,
    /// Where to read each distinct content hash from.
    objects: HashMap<Hash, RelPath>,
    /// The entries packed for hosts that accept them, made at the first such request and then
    /// sent as the same bytes to every host (shared with a renumbered copy: same entries).
    pub(crate) packed: Arc<std::sync::OnceLock<Option<Arc<Vec<pb::PackedBatches>>>>>,
}

/// zstd level of a manifest's packed entries: made once per image, so a little slower than
/// the default is fine; the 32-byte hashes, which do not compress, are most of the bytes anyway.
const PACKED_LEVEL: i32 = 6;

impl Image {
    /// Scans `root` (hashing every file) into version `version`.
    pub fn scan(root: &Path, version: u64) -> anyhow::Result<Image> {
        let manifest = manifest::scan_image(root, version)
            .map_err(|e| anyhow::anyhow!("cannot scan image {}: {e}", root.display()))?;
        Ok(Image::new(root, manifest))
    }

    pub fn new(root: &Path, manifest: Manifest) -> Image {
        let mut objects = HashMap::new();
        for e in &manifest.entries {
            if let (Kind::File, Some(h)) = (e.kind, e.hash) {
                objects.entry(h).or_insert_with(|| e.path.clone());
            }
        }
        let identity = manifest.identity();
        Image { root: root.to_owned(), manifest, identity, objects, packed: Default::default() }
    }

    /// The entries packed ([`manifest::wire::packed_batches`]), made at the first call (CPU
    /// work: call it off the async workers); `None` if they cannot be packed (logged), and the
    /// batches are then sent one by one.
    pub fn packed(&self) -> Option<Arc<Vec<pb::PackedBatches>>> {
        self.packed
            .get_or_init(|| {
                let started = std::time::Instant::now();
                match manifest::wire::packed_batches(&self.manifest, proto::MANIFEST_BATCH, PACKED_LEVEL) {
                    Ok(p) => {
                        let bytes: usize = p.iter().map(|m| m.zstd.len()).sum();
                        tracing::info!(
                            version = self.manifest.version,
                            entries = self.manifest.entries.len(),
                            bytes,
                            secs = started.elapsed().as_secs_f64(),
                            "manifest packed for hosts"
                        );
                        Some(Arc::new(p))
                    }
                    Err(e) => {
                        tracing::warn!(
                            version = self.manifest.version,
                            "manifest not packed, sent batch by batch: {e}"
                        );
                        None
                    }
                }
            })
            .clone()
    }

    pub fn object_path(&self, hash: &Hash) -> Option<&RelPath> {
        self.objects.get(hash)
    }

    /// The same tree under another version number: a rollback re-publishes an old version so
    /// that hosts, which refuse a lower number, accept it (see README, Trust).
    pub fn renumbered(&self, version: u64) -> Image {
        let mut manifest = self.manifest.clone();
        manifest.version = version;
        Image {
            root: self.root.clone(),
            manifest,
            identity: self.identity,
            objects: self.objects.clone(),
            packed: self.packed.clone(),
        }
    }
}

//! Reading a solid delta from the object store (issue 25, part 3; the format is
//! [`manifest::solid`]): the objects of an upgrade, a segment at a time, decoded against the
//! host's own old files.
//!
//! Before the pass's objects are fetched, the index of the solid delta to the image being
//! applied (`solid/<identity hex>/index`) is read. A segment is *used* when every base in its
//! reference is a file this host offers as a delta base, with the same hash (as a host at the
//! previous image does), and the host needs at least half of its content; its objects are then
//! not fetched one by one. When the pass reaches the first object of a used segment, the
//! segment is fetched, its reference rebuilt from the host's files (read beneath the root,
//! never through a symlink, each checked against its hash), decoded, and each object checked
//! against its hash before it is passed on. A segment whose reference cannot be rebuilt
//! exactly, or that fails in any way, is dropped, and its objects fetched one by one. One
//! segment is held at a time: its reference, its frame and its content, each at most
//! [`manifest::solid::SEGMENT_CONTENT`] or so, or for a large object's own segment (a file of
//! 16 to 64 MiB, such as apt's `Packages` list, over its old version), at most
//! [`manifest::delta::MAX_SOLID_BYTES`] each.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::hostfs::files::HostFiles;
use bytes::Bytes;
use manifest::solid::{Index, Segment};
use manifest::{Hash, RelPath};
use objstore::object_store::ObjectStoreExt;

/// The segments of the solid delta this pass uses.
pub(crate) struct SolidPlan {
    to_hex: String,
    segments: Vec<Segment>,
    /// Object -> the used segment holding it.
    by_hash: HashMap<Hash, usize>,
    /// Bytes of the index, as fetched.
    pub index_bytes: u64,
}

impl SolidPlan {
    pub fn covers(&self, hash: &Hash) -> bool {
        self.by_hash.contains_key(hash)
    }
}

/// Reads the index of the solid delta to image `to` and picks the segments this host can use
/// for `objects` (the pass's fetch list) with `bases` (the base it offers for each). `None`:
/// no solid delta (not in the store, unreadable, or nothing usable); the reason is logged.
pub(crate) async fn plan(
    store: &objstore::Store,
    to: &Hash,
    objects: &[(Hash, u64)],
    bases: &[Option<(RelPath, Hash)>],
    deadline: std::time::Duration,
) -> Option<SolidPlan> {
    let to_hex = to.to_hex();
    let key = store.solid_index_key(&to_hex);
    let body = match tokio::time::timeout(deadline, async { store.store.get(&key).await?.bytes().await }).await {
        Ok(Ok(b)) => b,
        Ok(Err(objstore::object_store::Error::NotFound { .. })) => {
            tracing::debug!("object store {}: no solid delta {key}", store.url);
            return None;
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "object store {}: cannot read the solid delta index {key}: {e}; fetching objects one by one",
                store.url
            );
            return None;
        }
        Err(_) => {
            tracing::warn!("object store {}: no reply for {key} in time; fetching objects one by one", store.url);
            return None;
        }
    };
    let index_bytes = body.len() as u64;
    let index = zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress(&body, manifest::solid::MAX_INDEX_BYTES as usize))
        .map_err(|e| e.to_string())
        .and_then(|raw| Index::decode(&raw).map_err(|e| e.to_string()))
        .and_then(|i| if i.to == *to { Ok(i) } else { Err(format!("it is the delta to image {}", i.to)) });
    let index = match index {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(
                "object store {}: solid delta index {key} refused: {e}; fetching objects one by one",
                store.url
            );
            return None;
        }
    };
    let need: HashSet<Hash> = objects.iter().map(|(h, _)| *h).collect();
    let offered: HashSet<(&RelPath, Hash)> = bases.iter().flatten().map(|(p, h)| (p, *h)).collect();
    let mut by_hash = HashMap::new();
    let mut used = 0;
    for (n, s) in index.segments.iter().enumerate() {
        let needed: u64 = s.objects.iter().filter(|o| need.contains(&o.hash)).map(|o| o.size).sum();
        let has_bases = s.bases.iter().all(|b| offered.contains(&(&b.path, b.hash)));
        if has_bases && needed > 0 && needed * 2 >= s.content_bytes() {
            used += 1;
            for o in s.objects.iter().filter(|o| need.contains(&o.hash)) {
                by_hash.entry(o.hash).or_insert(n);
            }
        }
    }
    tracing::info!(
        "object store {}: solid delta {key}: using {used} of {} segments, for {} objects",
        store.url,
        index.segments.len(),
        by_hash.len()
    );
    (used > 0).then_some(SolidPlan { to_hex, segments: index.segments, by_hash, index_bytes })
}

/// The segment decoded last: its objects, verified.
pub(crate) struct SolidReader {
    plan: Arc<SolidPlan>,
    /// The host's files the segments' references are rebuilt from.
    files: HostFiles,
    current: Option<(usize, HashMap<Hash, Bytes>)>,
    /// Segments that failed: their objects are fetched one by one.
    failed: HashSet<usize>,
    /// Bytes of segment frames fetched.
    pub wire: u64,
}

impl SolidReader {
    pub fn new(plan: Arc<SolidPlan>, files: HostFiles) -> SolidReader {
        SolidReader { plan, files, current: None, failed: HashSet::new(), wire: 0 }
    }

    /// Whether `hash` is to come out of a segment.
    pub fn covers(&self, hash: &Hash) -> bool {
        self.plan.covers(hash)
    }

    /// The content of `hash` from its segment, verified; `None`: fetch it one by one (the
    /// segment failed, and the reason was logged).
    pub async fn object(
        &mut self,
        store: &objstore::Store,
        hash: &Hash,
        net: &throttle::Limiter,
        deadline: std::time::Duration,
    ) -> Option<Bytes> {
        let n = *self.plan.by_hash.get(hash)?;
        if self.failed.contains(&n) {
            return None;
        }
        if self.current.as_ref().is_none_or(|(c, _)| *c != n) {
            self.current = None;
            match self.load(store, n, net, deadline).await {
                Ok(objects) => self.current = Some((n, objects)),
                Err(e) => {
                    tracing::warn!(
                        "object store {}: segment {} of the solid delta not used: {e}; its objects are fetched one by one",
                        store.url,
                        store.solid_segment_key(&self.plan.to_hex, n)
                    );
                    self.failed.insert(n);
                    return None;
                }
            }
        }
        self.current.as_ref().and_then(|(_, m)| m.get(hash).cloned())
    }

    async fn load(
        &mut self,
        store: &objstore::Store,
        n: usize,
        net: &throttle::Limiter,
        deadline: std::time::Duration,
    ) -> Result<HashMap<Hash, Bytes>, String> {
        let key = store.solid_segment_key(&self.plan.to_hex, n);
        let seg = &self.plan.segments[n];
        let frame = match tokio::time::timeout(deadline * 4, async { store.store.get(&key).await?.bytes().await }).await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(format!("cannot get {key}: {e}")),
            Err(_) => return Err(format!("{key} not received within {}s", (deadline * 4).as_secs())),
        };
        self.wire += frame.len() as u64;
        net.charge_async(frame.len() as u64).await;
        let (plan, files) = (self.plan.clone(), self.files.share());
        tokio::task::spawn_blocking(move || decode(&plan.segments[n], files, &frame))
            .await
            .map_err(|e| format!("decode task failed: {e}"))?
            .map_err(|e| format!("{key} ({} objects over {} bases): {e}", seg.objects.len(), seg.bases.len()))
    }
}

/// Rebuilds `seg`'s reference from the host's files and decodes `frame`; every object checked.
fn decode(seg: &Segment, mut files: HostFiles, frame: &[u8]) -> Result<HashMap<Hash, Bytes>, String> {
    use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};
    let mut reference = Vec::with_capacity(seg.reference_bytes() as usize);
    for b in &seg.bases {
        let at = reference.len();
        // At most one byte past `size`: a longer file is not the base.
        files
            .read_into(&b.path, b.size + 1, &mut reference)
            .map_err(|e| format!("cannot read base {}: {e}", b.path))?;
        if reference.len() - at != b.size as usize || Hash::of(&reference[at..]) != b.hash {
            return Err(format!("base {} is not the file the delta was made against ({})", b.path, b.hash));
        }
    }
    let want = seg.content_bytes() as usize;
    let zerr = |code: usize| zstd::zstd_safe::get_error_name(code).to_owned();
    let mut d = DCtx::create();
    d.set_parameter(DParameter::WindowLogMax(manifest::solid::MAX_WINDOW_LOG)).map_err(zerr)?;
    d.ref_prefix(&reference).map_err(zerr)?;
    // One byte of room past the declared content: a frame that fills it is too long.
    let mut out: Vec<u8> = Vec::with_capacity(want + 1);
    let mut inb = InBuffer::around(frame);
    let mut outb = OutBuffer::around(&mut out);
    loop {
        let left = d.decompress_stream(&mut outb, &mut inb).map_err(zerr)?;
        if outb.pos() > want {
            return Err(format!("decodes past its {want} bytes of content"));
        }
        if left == 0 {
            break;
        }
        if inb.pos() == frame.len() {
            return Err("the frame is truncated".into());
        }
    }
    if out.len() != want {
        return Err(format!("decodes to {} bytes, not {want}", out.len()));
    }
    let all = Bytes::from(out);
    let mut objects = HashMap::new();
    let mut at = 0usize;
    for o in &seg.objects {
        let part = all.slice(at..at + o.size as usize);
        at += o.size as usize;
        if Hash::of(&part) == o.hash {
            objects.insert(o.hash, part);
        } else {
            tracing::warn!("solid delta: object {} decodes to other content; fetched one by one", o.hash);
        }
    }
    Ok(objects)
}

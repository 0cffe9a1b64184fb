//! Conversion between the model and the protocol messages.
//!
//! Everything received is untrusted: [`entry_from_wire`] validates each field, and
//! [`ManifestAssembler`] checks order, count and identity before a [`Manifest`] exists.

use bytes::Bytes;
use proto::v1 as pb;

use crate::{Entry, Hash, Kind, Manifest, ManifestError, Meta, RelPath, Xattr};

/// Most entries a manifest may declare: far beyond any root partition, far below memory limits.
pub const MAX_ENTRIES: u64 = 50_000_000;

pub fn kind_to_wire(k: Kind) -> pb::Kind {
    match k {
        Kind::File => pb::Kind::File,
        Kind::Dir => pb::Kind::Dir,
        Kind::Symlink => pb::Kind::Symlink,
        Kind::CharDevice => pb::Kind::CharDevice,
        Kind::BlockDevice => pb::Kind::BlockDevice,
        Kind::Fifo => pb::Kind::Fifo,
        Kind::Socket => pb::Kind::Socket,
    }
}

fn kind_from_wire(v: i32) -> Option<Kind> {
    Some(match pb::Kind::try_from(v).ok()? {
        pb::Kind::Unspecified => return None,
        pb::Kind::File => Kind::File,
        pb::Kind::Dir => Kind::Dir,
        pb::Kind::Symlink => Kind::Symlink,
        pb::Kind::CharDevice => Kind::CharDevice,
        pb::Kind::BlockDevice => Kind::BlockDevice,
        pb::Kind::Fifo => Kind::Fifo,
        pb::Kind::Socket => Kind::Socket,
    })
}

fn meta_to_wire(m: &Meta, e: &mut pb::Entry) {
    e.mode = m.mode;
    e.uid = m.uid;
    e.gid = m.gid;
    e.mtime_ns = m.mtime_ns;
    e.xattrs = m
        .xattrs
        .iter()
        .map(|x| pb::Xattr { name: Bytes::copy_from_slice(&x.name), value: Bytes::copy_from_slice(&x.value) })
        .collect();
}

fn meta_from_wire(e: &pb::Entry) -> Meta {
    Meta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime_ns: e.mtime_ns,
        xattrs: e.xattrs.iter().map(|x| Xattr { name: x.name.to_vec(), value: x.value.to_vec() }).collect(),
    }
}

pub fn entry_to_wire(e: &Entry) -> pb::Entry {
    let mut w = pb::Entry {
        path: Bytes::copy_from_slice(e.path.as_bytes()),
        kind: kind_to_wire(e.kind) as i32,
        size: e.size,
        hash: e.hash.map(|h| Bytes::copy_from_slice(&h.0)).unwrap_or_default(),
        target: e.target.as_deref().map(Bytes::copy_from_slice).unwrap_or_default(),
        rdev: e.rdev,
        link_group: e.link_group,
        ..Default::default()
    };
    meta_to_wire(&e.meta, &mut w);
    w
}

pub fn root_to_wire(m: &Meta) -> pb::Entry {
    let mut w = pb::Entry { kind: pb::Kind::Dir as i32, ..Default::default() };
    meta_to_wire(m, &mut w);
    w
}

/// Validates one received entry. `index` is its position in the stream, for error messages.
pub fn entry_from_wire(index: usize, w: &pb::Entry) -> Result<Entry, ManifestError> {
    let path = RelPath::new(&w.path).map_err(|source| ManifestError::BadPath { index, source })?;
    let bad = |what: &str| ManifestError::BadField { path: path.to_string(), what: what.to_owned() };
    let kind = kind_from_wire(w.kind).ok_or_else(|| bad(&format!("unknown kind {}", w.kind)))?;
    let hash = match (kind, w.hash.len()) {
        (_, 0) => None,
        (Kind::File, 32) => Hash::from_slice(&w.hash),
        _ => return Err(bad("hash is not 32 bytes, or is set on an entry that is not a regular file")),
    };
    let target = match kind {
        Kind::Symlink => Some(w.target.to_vec()),
        _ if w.target.is_empty() => None,
        _ => return Err(bad("symlink target on an entry that is not a symlink")),
    };
    if !matches!(kind, Kind::CharDevice | Kind::BlockDevice) && w.rdev != 0 {
        return Err(bad("device number on an entry that is not a device"));
    }
    Ok(Entry {
        path,
        kind,
        meta: meta_from_wire(w),
        size: w.size,
        hash,
        target,
        rdev: w.rdev,
        link_group: w.link_group,
    })
}

/// Cuts a manifest into wire messages: a header, then batches of `batch` entries.
pub fn manifest_messages(m: &Manifest, batch: usize) -> impl Iterator<Item = pb::ManifestMessage> + '_ {
    let header = pb::ManifestMessage {
        msg: Some(pb::manifest_message::Msg::Header(pb::ManifestHeader {
            version: m.version,
            identity: Bytes::copy_from_slice(&m.identity().0),
            entry_count: m.entries.len() as u64,
            root: Some(root_to_wire(&m.root)),
        })),
    };
    std::iter::once(header).chain(m.entries.chunks(batch.max(1)).map(|chunk| pb::ManifestMessage {
        msg: Some(pb::manifest_message::Msg::Batch(pb::EntryBatch {
            entries: chunk.iter().map(entry_to_wire).collect(),
        })),
    }))
}

/// Rebuilds a manifest from a received stream, message by message, refusing anything that
/// does not add up: entries out of order, more entries than declared, a wrong identity.
#[derive(Default)]
pub struct ManifestAssembler {
    header: Option<(u64, Hash, u64, Meta)>,
    entries: Vec<Entry>,
}

impl ManifestAssembler {
    pub fn push(&mut self, msg: pb::ManifestMessage) -> Result<(), ManifestError> {
        let bad = |what: &str| ManifestError::BadField { path: "(stream)".into(), what: what.into() };
        match msg.msg {
            Some(pb::manifest_message::Msg::Header(h)) => {
                if self.header.is_some() {
                    return Err(bad("second manifest header"));
                }
                let identity = Hash::from_slice(&h.identity).ok_or_else(|| bad("identity is not 32 bytes"))?;
                if h.entry_count > MAX_ENTRIES {
                    return Err(bad(&format!("declares {} entries, more than the limit {MAX_ENTRIES}", h.entry_count)));
                }
                let root = h.root.as_ref().map(meta_from_wire).unwrap_or_default();
                self.entries.reserve(h.entry_count.min(1 << 20) as usize);
                self.header = Some((h.version, identity, h.entry_count, root));
            }
            Some(pb::manifest_message::Msg::Batch(b)) => {
                let Some((_, _, count, _)) = &self.header else { return Err(ManifestError::NoHeader) };
                if self.entries.len() as u64 + b.entries.len() as u64 > *count {
                    return Err(ManifestError::CountMismatch {
                        expected: *count,
                        actual: self.entries.len() as u64 + b.entries.len() as u64,
                    });
                }
                for w in &b.entries {
                    let e = entry_from_wire(self.entries.len(), w)?;
                    if let Some(prev) = self.entries.last() {
                        if prev.path >= e.path {
                            return Err(ManifestError::NotSorted { path: e.path, prev: prev.path.clone() });
                        }
                    }
                    self.entries.push(e);
                }
            }
            None => return Err(bad("empty manifest message")),
        }
        Ok(())
    }

    /// Completes the manifest once the stream has ended.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        let (version, identity, count, root) = self.header.ok_or(ManifestError::NoHeader)?;
        if self.entries.len() as u64 != count {
            return Err(ManifestError::CountMismatch { expected: count, actual: self.entries.len() as u64 });
        }
        let m = Manifest { version, root, entries: self.entries };
        m.validate()?;
        let actual = m.identity();
        if actual != identity {
            return Err(ManifestError::IdentityMismatch { expected: identity.to_hex(), actual: actual.to_hex() });
        }
        Ok(m)
    }
}

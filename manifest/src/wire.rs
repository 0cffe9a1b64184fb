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
    e.mtime_sec = m.mtime_sec;
    e.mtime_nsec = m.mtime_nsec;
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
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
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
        link_group: e.link_group.into(),
        sparse: e.sparse,
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
    if w.mtime_nsec >= 1_000_000_000 {
        return Err(bad(&format!("mtime nanoseconds {} are not below one second", w.mtime_nsec)));
    }
    let hash = match (kind, w.hash.len()) {
        (_, 0) => None,
        (Kind::File, 32) => Hash::from_slice(&w.hash),
        _ => return Err(bad("hash is not 32 bytes, or is set on an entry that is not a regular file")),
    };
    let target = match kind {
        Kind::Symlink => Some(w.target.as_ref().into()),
        _ if w.target.is_empty() => None,
        _ => return Err(bad("symlink target on an entry that is not a symlink")),
    };
    if !matches!(kind, Kind::CharDevice | Kind::BlockDevice) && w.rdev != 0 {
        return Err(bad("device number on an entry that is not a device"));
    }
    let link_group = u32::try_from(w.link_group)
        .map_err(|_| bad("hard-link group number above 4294967295 (a tree has fewer groups than entries)"))?;
    if w.sparse && kind != Kind::File {
        return Err(bad("sparse is set on an entry that is not a regular file"));
    }
    Ok(Entry {
        path,
        kind,
        meta: meta_from_wire(w),
        size: w.size,
        hash,
        target,
        rdev: w.rdev,
        link_group,
        sparse: w.sparse,
    })
}

/// The header of `m`, whose identity (`m.identity()`, which the caller has at hand) is
/// `identity`: no exclusions, no signature, entries not omitted.
pub fn manifest_header(m: &Manifest, identity: &Hash) -> pb::ManifestHeader {
    pb::ManifestHeader {
        version: m.version,
        identity: Bytes::copy_from_slice(&identity.0),
        entry_count: m.entries.len() as u64,
        root: Some(root_to_wire(&m.root)),
        exclusions: Vec::new(),
        signature: None,
        entries_omitted: false,
        object_store_url: String::new(),
        chunk_threshold: 0,
        rendered: Vec::new(),
        rendered_templates: Vec::new(),
        rendered_for: String::new(),
        render_serial: 0,
        image_identity: Bytes::new(),
    }
}

/// Cuts a manifest into wire messages: a header, then batches of `batch` entries.
/// `identity` must be `m.identity()` (computed once by the caller, not per stream).
pub fn manifest_messages<'a>(
    m: &'a Manifest,
    identity: &Hash,
    batch: usize,
) -> impl Iterator<Item = pb::ManifestMessage> + 'a {
    let header = pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Header(manifest_header(m, identity))) };
    std::iter::once(header).chain(m.entries.chunks(batch.max(1)).map(|chunk| pb::ManifestMessage {
        msg: Some(pb::manifest_message::Msg::Batch(pb::EntryBatch {
            entries: chunk.iter().map(entry_to_wire).collect(),
        })),
    }))
}

/// Most decompressed bytes in one [`pb::PackedBatches`] (a master packs at most this much into
/// one; a host refuses more). Its frame is at most about this long, under the gRPC message limit.
pub const PACKED_RAW_MAX: usize = 8 << 20;

/// A manifest's entries as [`pb::PackedBatches`]: batches of `batch` entries, length-delimited,
/// concatenated, cut at [`PACKED_RAW_MAX`] decompressed bytes, each piece one zstd frame at
/// `level`. A master makes these once per image and sends the same bytes to every host.
pub fn packed_batches(m: &Manifest, batch: usize, level: i32) -> std::io::Result<Vec<pb::PackedBatches>> {
    use prost::Message;
    let mut out = Vec::new();
    let (mut raw, mut entries) = (Vec::new(), 0u64);
    let flush = |raw: &mut Vec<u8>, entries: &mut u64, out: &mut Vec<pb::PackedBatches>| -> std::io::Result<()> {
        if !raw.is_empty() {
            let zstd = zstd::bulk::compress(raw, level)?;
            out.push(pb::PackedBatches { zstd: zstd.into(), entries: *entries, raw_bytes: raw.len() as u64 });
            raw.clear();
            *entries = 0;
        }
        Ok(())
    };
    for chunk in m.entries.chunks(batch.max(1)) {
        let b = pb::EntryBatch { entries: chunk.iter().map(entry_to_wire).collect() };
        let len = b.encoded_len();
        if raw.len() + len + 10 > PACKED_RAW_MAX {
            flush(&mut raw, &mut entries, &mut out)?;
        }
        if len + 10 > PACKED_RAW_MAX {
            return Err(std::io::Error::other(format!(
                "a batch of {} entries from {} encodes to {len} bytes, more than a packed message holds ({PACKED_RAW_MAX})",
                chunk.len(),
                chunk[0].path
            )));
        }
        b.encode_length_delimited(&mut raw).map_err(std::io::Error::other)?;
        entries += chunk.len() as u64;
    }
    flush(&mut raw, &mut entries, &mut out)?;
    Ok(out)
}

/// Rebuilds a manifest from a received stream, message by message, refusing anything that
/// does not add up: entries out of order, more entries than declared, a wrong identity.
#[derive(Default)]
pub struct ManifestAssembler {
    header: Option<(u64, Hash, u64, Meta)>,
    signature: Option<crate::trust::VersionSignature>,
    entries: Vec<Entry>,
    /// The header's rendered entries, put in place by `finish` (see [`Manifest::overlay`]).
    rendered: Vec<Entry>,
    rendered_templates: Vec<String>,
    binding: Option<crate::trust::RenderBinding>,
}

/// Most entries a header may carry rendered for one host.
pub const MAX_RENDERED: usize = 10_000;

/// The wire form of a version signature.
pub fn signature_to_wire(s: &crate::trust::VersionSignature) -> pb::VersionSignature {
    pb::VersionSignature {
        public_key: Bytes::copy_from_slice(&s.public_key),
        expires_unix: s.expires_unix,
        signature: Bytes::copy_from_slice(&s.signature),
    }
}

fn signature_from_wire(s: &pb::VersionSignature) -> Option<crate::trust::VersionSignature> {
    Some(crate::trust::VersionSignature {
        public_key: s.public_key.as_ref().try_into().ok()?,
        expires_unix: s.expires_unix,
        signature: s.signature.as_ref().try_into().ok()?,
    })
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
                if let Some(s) = &h.signature {
                    self.signature = Some(
                        signature_from_wire(s).ok_or_else(|| bad("signature: key must be 32 bytes, signature 64"))?,
                    );
                }
                if h.rendered.len() > MAX_RENDERED {
                    return Err(bad(&format!(
                        "{} rendered entries, more than the limit {MAX_RENDERED}",
                        h.rendered.len()
                    )));
                }
                for (i, w) in h.rendered.iter().enumerate() {
                    let e = entry_from_wire(i, w)?;
                    if e.kind != crate::Kind::File || e.hash.is_none() || e.link_group != 0 {
                        return Err(bad(&format!("rendered entry {} is not a plain regular file", e.path)));
                    }
                    if self.rendered.last().is_some_and(|p| p.path >= e.path) {
                        return Err(bad(&format!("rendered entry {} is out of order or duplicated", e.path)));
                    }
                    self.rendered.push(e);
                }
                if !h.rendered_templates.is_empty() && h.rendered_templates.len() != h.rendered.len() {
                    return Err(bad("rendered_templates does not name one template per rendered entry"));
                }
                self.rendered_templates = h.rendered_templates.clone();
                self.binding = match (h.rendered_for.is_empty(), h.rendered.is_empty()) {
                    (true, true) => None,
                    (true, false) => return Err(bad("rendered entries name no host they were rendered for")),
                    (false, _) => {
                        Some(crate::trust::RenderBinding { host: h.rendered_for.clone(), serial: h.render_serial })
                    }
                };
                self.entries.reserve(h.entry_count.min(1 << 20) as usize);
                self.header = Some((h.version, identity, h.entry_count, root));
            }
            Some(pb::manifest_message::Msg::Batch(b)) => self.push_batch(b)?,
            Some(pb::manifest_message::Msg::Packed(p)) => {
                use prost::Message;
                if self.header.is_none() {
                    return Err(ManifestError::NoHeader);
                }
                if p.raw_bytes > PACKED_RAW_MAX as u64 {
                    return Err(bad(&format!(
                        "packed batches of {} bytes, more than the limit {PACKED_RAW_MAX}",
                        p.raw_bytes
                    )));
                }
                let raw = zstd::bulk::decompress(&p.zstd, p.raw_bytes as usize)
                    .map_err(|e| bad(&format!("packed batches do not decompress: {e}")))?;
                if raw.len() as u64 != p.raw_bytes {
                    return Err(bad(&format!("packed batches: {} bytes, the message says {}", raw.len(), p.raw_bytes)));
                }
                let (mut buf, mut n) = (&raw[..], 0u64);
                while !buf.is_empty() {
                    let b = pb::EntryBatch::decode_length_delimited(&mut buf)
                        .map_err(|e| bad(&format!("packed batches: a batch does not decode: {e}")))?;
                    n += b.entries.len() as u64;
                    self.push_batch(b)?;
                }
                if n != p.entries {
                    return Err(bad(&format!("packed batches: {n} entries, the message says {}", p.entries)));
                }
            }
            None => return Err(bad("empty manifest message")),
        }
        Ok(())
    }

    fn push_batch(&mut self, b: pb::EntryBatch) -> Result<(), ManifestError> {
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
        Ok(())
    }

    /// The identity the header claims (checked against the entries by `finish`).
    pub fn identity(&self) -> Option<Hash> {
        self.header.as_ref().map(|h| h.1)
    }

    /// The header's signature, once the header has been pushed (not yet checked).
    pub fn signature(&self) -> Option<crate::trust::VersionSignature> {
        self.signature.clone()
    }

    /// The host and serial a header with rendered entries binds them to (checked with the
    /// signature, [`crate::trust::verify_bound`]).
    pub fn binding(&self) -> Option<crate::trust::RenderBinding> {
        self.binding.clone()
    }

    /// The rendered paths, each with its template's path in the image.
    pub fn rendered(&self) -> Vec<(crate::RelPath, String)> {
        self.rendered
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), self.rendered_templates.get(i).cloned().unwrap_or_default()))
            .collect()
    }

    /// Completes the manifest once the stream has ended.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        self.finish_signed().map(|(m, _)| m)
    }

    /// Completes the manifest, with the header's signature (not yet checked: see
    /// [`crate::trust::verify`]).
    pub fn finish_signed(self) -> Result<(Manifest, Option<crate::trust::VersionSignature>), ManifestError> {
        let (version, identity, count, root) = self.header.ok_or(ManifestError::NoHeader)?;
        if self.entries.len() as u64 != count {
            return Err(ManifestError::CountMismatch { expected: count, actual: self.entries.len() as u64 });
        }
        let mut m = Manifest { version, root, entries: self.entries };
        m.overlay(&self.rendered);
        m.validate()?;
        let actual = m.identity();
        if actual != identity {
            return Err(ManifestError::IdentityMismatch { expected: identity.to_hex(), actual: actual.to_hex() });
        }
        Ok((m, self.signature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind: Kind::File,
            meta: Meta { mode: 0o644, ..Meta::default() },
            size: 1,
            hash: Some(Hash::of(b"x")),
            target: None,
            rdev: 0,
            link_group: 0,
            sparse: false,
        }
    }

    fn dir(path: &str) -> Entry {
        Entry { kind: Kind::Dir, size: 0, hash: None, ..file(path) }
    }

    #[test]
    fn the_identity_with_an_overlay_is_that_of_the_overlaid_manifest() {
        let m = Manifest { version: 1, root: Meta::default(), entries: vec![dir("a"), file("a/b"), file("c")] };
        let changed = Entry { size: 2, hash: Some(Hash::of(b"yy")), ..file("a/b") };
        // Replacing, inserting before, between and after the image's entries, and nothing.
        for overlay in [vec![], vec![changed.clone()], vec![file("0"), changed, file("b"), file("d")]] {
            let mut laid = m.clone();
            laid.overlay(&overlay);
            assert_eq!(m.identity_with(&overlay), laid.identity(), "{overlay:?}");
        }
        assert_ne!(m.identity_with(&[file("d")]), m.identity());
    }

    /// Encodes `entries` as a stream whose header claims `identity_of` and feeds it back.
    fn roundtrip(
        entries: Vec<Entry>,
        tamper: impl FnOnce(&mut Vec<pb::ManifestMessage>),
    ) -> Result<Manifest, ManifestError> {
        let m = Manifest { version: 3, root: Meta::default(), entries };
        let mut msgs: Vec<_> = manifest_messages(&m, &m.identity(), 2).collect();
        tamper(&mut msgs);
        let mut asm = ManifestAssembler::default();
        for msg in msgs {
            asm.push(msg)?;
        }
        asm.finish()
    }

    fn batch(msgs: &mut [pb::ManifestMessage], i: usize) -> &mut Vec<pb::Entry> {
        match &mut msgs[i].msg {
            Some(pb::manifest_message::Msg::Batch(b)) => &mut b.entries,
            _ => panic!("message {i} is not a batch"),
        }
    }

    #[test]
    fn a_valid_manifest_round_trips() {
        let entries = vec![dir("etc"), file("etc/a"), file("etc/b"), file("z")];
        let m = roundtrip(entries.clone(), |_| {}).unwrap();
        assert_eq!(m.entries, entries);
        assert_eq!(m.version, 3);
    }

    #[test]
    fn hostile_paths_are_rejected_with_the_path() {
        for bad in [&b"../x"[..], b"/abs", b"a/../../x", b".", b"", b"a\0b", b"a//b"] {
            let bad = bad.to_vec();
            let err = roundtrip(vec![file("a")], |m| batch(m, 1)[0].path = bad.clone().into()).unwrap_err();
            assert!(matches!(err, ManifestError::BadPath { .. }), "{:?}: {err}", String::from_utf8_lossy(&bad));
        }
    }

    #[test]
    fn duplicates_and_disorder_are_rejected() {
        let err = roundtrip(vec![file("a"), file("b")], |m| batch(m, 1)[1].path = "a".into()).unwrap_err();
        assert!(matches!(err, ManifestError::NotSorted { .. }), "{err}");
        let err = roundtrip(vec![file("a"), file("b")], |m| batch(m, 1).reverse()).unwrap_err();
        assert!(matches!(err, ManifestError::NotSorted { .. }), "{err}");
    }

    #[test]
    fn an_entry_beneath_a_symlink_is_rejected() {
        // `evil -> /etc` followed by `evil/passwd`: the parent is not a directory.
        let mut evil = file("evil");
        evil.kind = Kind::Symlink;
        evil.size = 0;
        evil.hash = None;
        evil.target = Some(b"/etc".as_slice().into());
        let err = roundtrip(vec![evil, file("evil/passwd")], |_| {}).unwrap_err();
        assert!(matches!(err, ManifestError::ParentNotDir { .. }), "{err}");
        assert!(err.to_string().contains("evil/passwd"), "{err}");
    }

    #[test]
    fn missing_parent_is_rejected() {
        let err = roundtrip(vec![file("nodir/x")], |_| {}).unwrap_err();
        assert!(matches!(err, ManifestError::ParentNotDir { .. }), "{err}");
        // Siblings share a parent checked once; a missing parent after them is still caught.
        let err = roundtrip(vec![dir("d"), file("d/a"), file("d/b"), file("e/c")], |_| {}).unwrap_err();
        assert!(matches!(&err, ManifestError::ParentNotDir { path, .. } if path.as_bytes() == b"e/c"), "{err}");
        // A file's children: its name is a parent, but not a directory.
        let err = roundtrip(vec![dir("d"), file("d/a"), file("d/a/x")], |_| {}).unwrap_err();
        assert!(matches!(&err, ManifestError::ParentNotDir { path, .. } if path.as_bytes() == b"d/a/x"), "{err}");
        roundtrip(vec![dir("d"), file("d/a"), dir("d/b"), file("d/b/c"), file("d/c")], |_| {}).unwrap();
    }

    #[test]
    fn a_hard_link_group_beyond_u32_is_rejected() {
        let err = roundtrip(vec![file("a")], |m| batch(m, 1)[0].link_group = 1 << 32).unwrap_err();
        assert!(err.to_string().contains("hard-link group"), "{err}");
    }

    #[test]
    fn tampering_breaks_the_identity() {
        let err = roundtrip(vec![file("a"), file("b")], |m| batch(m, 1)[1].mode = 0o4755).unwrap_err();
        assert!(matches!(err, ManifestError::IdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn more_or_fewer_entries_than_declared_are_rejected() {
        let err = roundtrip(vec![file("a")], |m| batch(m, 1).push(entry_to_wire(&file("b")))).unwrap_err();
        assert!(matches!(err, ManifestError::CountMismatch { .. }), "{err}");
        let err = roundtrip(vec![file("a"), file("b")], |m| batch(m, 1).pop().map(|_| ()).unwrap()).unwrap_err();
        assert!(matches!(err, ManifestError::CountMismatch { .. }), "{err}");
    }

    #[test]
    fn fields_must_fit_the_kind() {
        let err = roundtrip(vec![file("a")], |m| batch(m, 1)[0].hash = vec![1u8; 31].into()).unwrap_err();
        assert!(err.to_string().contains("32 bytes"), "{err}");
        let err = roundtrip(vec![file("a")], |m| batch(m, 1)[0].kind = 99).unwrap_err();
        assert!(err.to_string().contains("unknown kind"), "{err}");
        let err = roundtrip(vec![file("a")], |m| batch(m, 1)[0].mode = 0o170644).unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
        let err = roundtrip(vec![dir("d")], |m| batch(m, 1)[0].rdev = 5).unwrap_err();
        assert!(err.to_string().contains("device number"), "{err}");
    }

    #[test]
    fn a_batch_before_the_header_is_rejected() {
        let err = roundtrip(vec![file("a")], |m| m.swap(0, 1)).unwrap_err();
        assert!(matches!(err, ManifestError::NoHeader), "{err}");
    }

    /// The header of `m`, then its entries packed; `tamper` may change the packed messages.
    fn packed_roundtrip(
        m: &Manifest,
        tamper: impl FnOnce(&mut Vec<pb::PackedBatches>),
    ) -> Result<Manifest, ManifestError> {
        let mut asm = ManifestAssembler::default();
        asm.push(manifest_messages(m, &m.identity(), 2).next().unwrap())?;
        let mut packed = packed_batches(m, 2, 3).unwrap();
        tamper(&mut packed);
        for p in packed {
            asm.push(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Packed(p)) })?;
        }
        asm.finish()
    }

    #[test]
    fn packed_batches_round_trip_and_refuse_damage() {
        let mut entries = vec![dir("etc")];
        entries.extend((0..9).map(|i| file(&format!("etc/f{i}"))));
        let m = Manifest { version: 3, root: Meta::default(), entries };
        let packed = packed_batches(&m, 2, 3).unwrap();
        assert_eq!(packed.len(), 1, "10 entries fit one packed message");
        assert_eq!(packed[0].entries, 10);
        assert_eq!(packed_roundtrip(&m, |_| {}).unwrap(), m);
        // The counts it claims are checked.
        let e = packed_roundtrip(&m, |p| p[0].entries = 9).unwrap_err();
        assert!(e.to_string().contains("10 entries, the message says 9"), "{e}");
        let e = packed_roundtrip(&m, |p| p[0].raw_bytes -= 1).unwrap_err();
        assert!(e.to_string().contains("do not decompress"), "{e}");
        let e = packed_roundtrip(&m, |p| p[0].raw_bytes = PACKED_RAW_MAX as u64 + 1).unwrap_err();
        assert!(e.to_string().contains("more than the limit"), "{e}");
        // Entries inside are checked as if they came batch by batch: a tampered frame whose
        // entries no longer hash to the identity is refused.
        let e = packed_roundtrip(&m, |p| {
            let mut b = pb::EntryBatch { entries: vec![entry_to_wire(&file("etc/f0"))] };
            b.entries[0].size = 2;
            let mut raw = Vec::new();
            prost::Message::encode_length_delimited(&b, &mut raw).unwrap();
            p.insert(
                0,
                pb::PackedBatches {
                    zstd: zstd::bulk::compress(&raw, 1).unwrap().into(),
                    entries: 1,
                    raw_bytes: raw.len() as u64,
                },
            );
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                ManifestError::ParentNotDir { .. }
                    | ManifestError::CountMismatch { .. }
                    | ManifestError::NotSorted { .. }
            ),
            "{e}"
        );
        // Packed entries before the header are refused.
        let mut asm = ManifestAssembler::default();
        let p = packed_batches(&m, 2, 3).unwrap().remove(0);
        assert!(matches!(
            asm.push(pb::ManifestMessage { msg: Some(pb::manifest_message::Msg::Packed(p)) }),
            Err(ManifestError::NoHeader)
        ));
    }

    #[test]
    fn many_entries_are_cut_into_several_packed_messages() {
        let mut entries = vec![dir("d")];
        let long = "x".repeat(200);
        entries.extend((0..60_000).map(|i| file(&format!("d/{long}{i:06}"))));
        let m = Manifest { version: 1, root: Meta::default(), entries };
        let packed = packed_batches(&m, 1024, 1).unwrap();
        assert!(packed.len() >= 2, "{} packed messages", packed.len());
        assert!(packed.iter().all(|p| p.raw_bytes as usize <= PACKED_RAW_MAX));
        assert_eq!(packed.iter().map(|p| p.entries).sum::<u64>(), 60_001);
        assert_eq!(packed_roundtrip(&m, |_| {}).unwrap(), m);
    }
}

//! The entry model: what a root partition needs recorded about each path.

use std::fmt;

use crate::RelPath;

/// A blake3 content hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(b: &[u8]) -> Option<Hash> {
        Some(Hash(b.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(Hash(b))
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Hash {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Kind {
    /// The `S_IFMT` bits for this kind.
    pub fn ifmt(self) -> u32 {
        match self {
            Kind::File => libc_consts::S_IFREG,
            Kind::Dir => libc_consts::S_IFDIR,
            Kind::Symlink => libc_consts::S_IFLNK,
            Kind::CharDevice => libc_consts::S_IFCHR,
            Kind::BlockDevice => libc_consts::S_IFBLK,
            Kind::Fifo => libc_consts::S_IFIFO,
            Kind::Socket => libc_consts::S_IFSOCK,
        }
    }

    pub fn from_mode(st_mode: u32) -> Option<Kind> {
        Some(match st_mode & libc_consts::S_IFMT {
            libc_consts::S_IFREG => Kind::File,
            libc_consts::S_IFDIR => Kind::Dir,
            libc_consts::S_IFLNK => Kind::Symlink,
            libc_consts::S_IFCHR => Kind::CharDevice,
            libc_consts::S_IFBLK => Kind::BlockDevice,
            libc_consts::S_IFIFO => Kind::Fifo,
            libc_consts::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }

    /// The letter `rsync -i` uses for this kind.
    pub fn itemize_char(self) -> char {
        match self {
            Kind::File => 'f',
            Kind::Dir => 'd',
            Kind::Symlink => 'L',
            Kind::CharDevice | Kind::BlockDevice => 'D',
            Kind::Fifo | Kind::Socket => 'S',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "char device",
            Kind::BlockDevice => "block device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::CharDevice => 4,
            Kind::BlockDevice => 5,
            Kind::Fifo => 6,
            Kind::Socket => 7,
        }
    }
}

/// File-type bits, spelled out so this crate needs no libc dependency.
mod libc_consts {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// Permission bits, including setuid (0o4000), setgid (0o2000) and sticky (0o1000).
pub const PERM_MASK: u32 = 0o7777;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// An entry's xattrs, sorted by name, names unique. Most entries have none, and a million-entry
/// tree is held twice in a pass (image and host), so the empty list costs one word and no
/// allocation, where a `Vec` costs three.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
// The box is the point: one thin pointer, where a `Vec` or a boxed slice is two or three words.
#[allow(clippy::box_collection)]
pub struct Xattrs(Option<Box<Vec<Xattr>>>);

impl std::ops::Deref for Xattrs {
    type Target = [Xattr];
    fn deref(&self) -> &[Xattr] {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

impl From<Vec<Xattr>> for Xattrs {
    fn from(v: Vec<Xattr>) -> Xattrs {
        Xattrs((!v.is_empty()).then(|| Box::new(v)))
    }
}

impl FromIterator<Xattr> for Xattrs {
    fn from_iter<I: IntoIterator<Item = Xattr>>(it: I) -> Xattrs {
        it.into_iter().collect::<Vec<_>>().into()
    }
}

impl<'a> IntoIterator for &'a Xattrs {
    type Item = &'a Xattr;
    type IntoIter = std::slice::Iter<'a, Xattr>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for Xattrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Metadata every kind of entry has, the root directory included.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits only ([`PERM_MASK`]).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds since the epoch (the whole `i64` range, before 1970 too,
    /// as Linux stores it) and nanoseconds, `0..1_000_000_000`.
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: Xattrs,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    pub kind: Kind,
    pub meta: Meta,
    /// Content length for regular files; 0 otherwise.
    pub size: u64,
    /// Content hash, for regular files. `None` on a host entry that was not hashed.
    pub hash: Option<Hash>,
    /// Symlink target bytes, for symlinks.
    pub target: Option<Box<[u8]>>,
    /// Device number, for char and block devices.
    pub rdev: u64,
    /// Non-zero: all entries with this value are one hard-linked inode. The first in path
    /// order is the group's leader; the others are links to it. (u32 keeps `Entry` at 120
    /// bytes; a tree has fewer groups than entries. The wire and the identity carry a u64.)
    pub link_group: u32,
    /// A regular file with holes (fewer blocks allocated than its size needs): written with
    /// its all-zero blocks left as holes. Not compared: the same content with other holes is
    /// not drift.
    pub sparse: bool,
}

/// Where canonical encodings are fed: a blake3 hasher, or a [`BufferedHasher`] in front of one.
pub trait HashSink {
    fn update(&mut self, bytes: &[u8]);
}

impl HashSink for blake3::Hasher {
    fn update(&mut self, bytes: &[u8]) {
        blake3::Hasher::update(self, bytes);
    }
}

/// A blake3 hasher fed in 64 KiB blocks. An entry's encoding is a dozen updates of a few bytes
/// each, and blake3 pays per call: over a million entries, buffering makes hashing the
/// encodings several times faster. Same digest as feeding the hasher directly.
pub struct BufferedHasher {
    hasher: blake3::Hasher,
    buf: Vec<u8>,
}

impl BufferedHasher {
    const BLOCK: usize = 64 * 1024;

    pub fn new() -> BufferedHasher {
        BufferedHasher { hasher: blake3::Hasher::new(), buf: Vec::with_capacity(Self::BLOCK) }
    }

    pub fn finalize(mut self) -> Hash {
        self.hasher.update(&self.buf);
        self.hasher.finalize().into()
    }
}

impl Default for BufferedHasher {
    fn default() -> BufferedHasher {
        BufferedHasher::new()
    }
}

impl HashSink for BufferedHasher {
    fn update(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > Self::BLOCK {
            self.hasher.update(&self.buf);
            self.buf.clear();
            if bytes.len() >= Self::BLOCK {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buf.extend_from_slice(bytes);
    }
}

impl Entry {
    /// Feeds the canonical encoding of this entry into `h`: every field, length-prefixed,
    /// in a fixed order, so equal entries always hash equal and different ones never collide
    /// by concatenation.
    pub fn hash_into(&self, h: &mut impl HashSink) {
        put_bytes(h, self.path.as_bytes());
        h.update(&[self.kind.code()]);
        self.meta.hash_into(h);
        h.update(&self.size.to_le_bytes());
        match &self.hash {
            Some(x) => put_bytes(h, &x.0),
            None => put_bytes(h, b""),
        };
        put_bytes(h, self.target.as_deref().unwrap_or(b""));
        h.update(&self.rdev.to_le_bytes());
        h.update(&u64::from(self.link_group).to_le_bytes());
        h.update(&[u8::from(self.sparse)]);
    }
}

impl Meta {
    pub fn hash_into(&self, h: &mut impl HashSink) {
        h.update(&self.mode.to_le_bytes());
        h.update(&self.uid.to_le_bytes());
        h.update(&self.gid.to_le_bytes());
        h.update(&self.mtime_sec.to_le_bytes());
        h.update(&self.mtime_nsec.to_le_bytes());
        h.update(&(self.xattrs.len() as u64).to_le_bytes());
        for x in &self.xattrs {
            put_bytes(h, &x.name);
            put_bytes(h, &x.value);
        }
    }

    /// `mode` formatted like `ls -l` (without the type letter), e.g. `rwsr-xr-x`.
    pub fn mode_string(&self) -> String {
        let m = self.mode;
        let mut s = String::with_capacity(9);
        for (shift, special, lower, upper) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
            let bits = (m >> shift) & 7;
            s.push(if bits & 4 != 0 { 'r' } else { '-' });
            s.push(if bits & 2 != 0 { 'w' } else { '-' });
            s.push(match (bits & 1 != 0, m & special != 0) {
                (true, true) => lower,
                (false, true) => upper,
                (true, false) => 'x',
                (false, false) => '-',
            });
        }
        s
    }
}

fn put_bytes(h: &mut impl HashSink, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_hashing_gives_the_same_digest() {
        let mut direct = blake3::Hasher::new();
        let mut buffered = BufferedHasher::new();
        for i in 0..50_000u32 {
            let piece = vec![i as u8; (i % 97) as usize];
            HashSink::update(&mut direct, &piece);
            buffered.update(&piece);
        }
        let big = vec![7u8; 200 * 1024];
        HashSink::update(&mut direct, &big);
        buffered.update(&big);
        assert_eq!(Hash::from(direct.finalize()), buffered.finalize());
    }

    #[test]
    fn entries_stay_compact() {
        // A million-file tree is held twice per pass (image and host): every word counts.
        assert_eq!(std::mem::size_of::<Xattrs>(), 8);
        assert!(std::mem::size_of::<Entry>() <= 120, "Entry is {} bytes", std::mem::size_of::<Entry>());
        let x: Xattrs = vec![Xattr { name: b"user.a".to_vec(), value: b"1".to_vec() }].into();
        assert_eq!(x.len(), 1);
        assert_eq!(Xattrs::from(Vec::new()), Xattrs::default(), "an empty list is the unallocated one");
    }

    #[test]
    fn mode_string_shows_special_bits() {
        let m = |mode| Meta { mode, ..Meta::default() }.mode_string();
        assert_eq!(m(0o4755), "rwsr-xr-x");
        assert_eq!(m(0o2644), "rw-r-Sr--");
        assert_eq!(m(0o1777), "rwxrwxrwt");
    }
}

//! Choosing the old file that a new file's content is sent as a delta against.
//!
//! A host that holds an old version of a file can be sent only what differs: a zstd frame made
//! with the old content as its dictionary (`zstd --patch-from`). The master compresses such
//! frames once per published image, against the previous image; a host offers, per object, the
//! hash of the old file it would diff against. Both choose that base with the rules here, from
//! their own old tree (the master's previous image, the host's root), so when the host is at the
//! previous image they agree and the stored delta is used; when they do not, the host is sent
//! the whole object, which is never wrong, only larger.
//!
//! The base is the old file at the same path, or else (a renamed file: `libfoo.so.1.2` →
//! `libfoo.so.1.3`) the old file in the same directory that is gone from the new tree and whose
//! name shares the longest prefix and suffix with the new name, as rsync's `--fuzzy` does.

use std::collections::HashMap;

use crate::{Hash, RelPath};

/// Largest base or object sent as a delta: the decoder's window must span both (32 MiB, the
/// most a host accepts), and both are held in memory while decoding.
pub const MAX_DELTA_BYTES: u64 = 16 << 20;
/// Smaller objects gain nothing worth a dictionary.
pub const MIN_DELTA_BYTES: u64 = 128;
/// Largest object, and largest base, a solid delta carries: one over [`MAX_DELTA_BYTES`] gets a
/// segment of its own, whose window spans it and its base (128 MiB at most; see
/// [`crate::solid`]).
pub const MAX_SOLID_BYTES: u64 = 64 << 20;

/// An old regular file that may serve as a base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub path: &'a RelPath,
    pub size: u64,
    pub hash: Hash,
}

/// Whether an object of `size` bytes may be sent against a base of `base_size` bytes.
pub fn usable(size: u64, base_size: u64) -> bool {
    (MIN_DELTA_BYTES..=MAX_DELTA_BYTES).contains(&size) && (MIN_DELTA_BYTES..=MAX_DELTA_BYTES).contains(&base_size)
}

/// The zstd window log a delta frame uses: it must reach from the end of the object back to the
/// start of the base, and never exceeds what a host accepts (25: 32 MiB).
pub fn window_log(base_size: u64, size: u64) -> u32 {
    let span = (base_size + size).max(1).next_power_of_two();
    span.trailing_zeros().clamp(17, 25)
}

/// zstd reads a dictionary that starts with its dictionary magic number as a trained
/// dictionary, not as raw content: such a base is never used.
pub fn raw_content_ok(base: &[u8]) -> bool {
    !base.starts_with(&[0x37, 0xA4, 0x30, 0xEC])
}

/// The directory part of `path` (empty at the top): the scope of a renamed file's search.
pub fn dir_of(path: &RelPath) -> &[u8] {
    let b = path.as_bytes();
    b.iter().rposition(|&c| c == b'/').map_or(&b[..0], |i| &b[..i])
}

/// How alike two names are: the length of their common prefix plus that of their common
/// suffix, not counting a byte twice.
fn likeness(a: &[u8], b: &[u8]) -> usize {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let room = a.len().min(b.len()) - prefix;
    let suffix = a.iter().rev().zip(b.iter().rev()).take(room).take_while(|(x, y)| x == y).count();
    prefix + suffix
}

/// Old files that are no longer files in the new tree, by directory: the candidates for a new
/// file that has no old version at its own path.
#[derive(Default)]
pub struct Gone<'a> {
    by_dir: HashMap<&'a [u8], Vec<Candidate<'a>>>,
}

impl<'a> Gone<'a> {
    /// `old` must come in path order (both sides then break ties alike).
    pub fn new(old: impl IntoIterator<Item = Candidate<'a>>) -> Gone<'a> {
        let mut by_dir: HashMap<&'a [u8], Vec<Candidate<'a>>> = HashMap::new();
        for c in old {
            by_dir.entry(dir_of(c.path)).or_default().push(c);
        }
        Gone { by_dir }
    }

    /// The gone file in `path`'s directory whose name is most like `path`'s, if it is alike
    /// enough (prefix and suffix together cover at least half the new name) and usable as a
    /// base for `size` bytes. The first such file in path order wins a tie.
    pub fn base_for(&self, path: &RelPath, size: u64) -> Option<Candidate<'a>> {
        self.most_alike(path, |c| usable(size, c.size))
    }

    /// Like [`Gone::base_for`], among the gone files of at least `min` bytes, whatever their
    /// size: the old file whose chunks a large new file may reuse (a host-side choice only;
    /// see syncd's `client::chunked`).
    pub fn seed_for(&self, path: &RelPath, min: u64) -> Option<Candidate<'a>> {
        self.most_alike(path, |c| c.size >= min)
    }

    fn most_alike(&self, path: &RelPath, fits: impl Fn(&Candidate<'a>) -> bool) -> Option<Candidate<'a>> {
        let name = path.file_name();
        let mut best: Option<(usize, Candidate<'a>)> = None;
        for c in self.by_dir.get(dir_of(path))?.iter().filter(|c| fits(c)) {
            let score = likeness(name, c.path.file_name());
            if score * 2 >= name.len() && score >= 3 && best.is_none_or(|(b, _)| score > b) {
                best = Some((score, *c));
            }
        }
        best.map(|(_, c)| c)
    }
}

/// The base for a new file at `path` of `size` bytes: `same`, the old file at that path (if it
/// is a regular file with other content), or else the most alike gone file beside it.
pub fn choose<'a>(
    path: &RelPath,
    size: u64,
    hash: &Hash,
    same: Option<Candidate<'a>>,
    gone: &Gone<'a>,
) -> Option<Candidate<'a>> {
    choose_by(path, hash, same, gone, |base| usable(size, base))
}

/// `same` if it has other content and its size `fits`, else (no old file at the path) the most
/// alike gone file beside it whose size `fits`.
fn choose_by<'a>(
    path: &RelPath,
    hash: &Hash,
    same: Option<Candidate<'a>>,
    gone: &Gone<'a>,
    fits: impl Fn(u64) -> bool,
) -> Option<Candidate<'a>> {
    match same {
        Some(c) if c.hash != *hash => fits(c.size).then_some(c),
        Some(_) => None,
        None => gone.most_alike(path, |c| fits(c.size)),
    }
}

/// The base of a new file of `size` bytes over [`MAX_DELTA_BYTES`] (and at most
/// [`MAX_SOLID_BYTES`]) in a solid delta, where it travels in a segment of its own: `same`, the
/// old file at its path (if it is a regular file with other content), or else the most alike
/// gone file beside it (the bullseye apt `Packages` list for the bookworm one), each of at most
/// [`MAX_SOLID_BYTES`]. Never a per-object delta's base: those stop at [`MAX_DELTA_BYTES`].
/// Master and host choose alike.
pub fn choose_large<'a>(
    path: &RelPath,
    size: u64,
    hash: &Hash,
    same: Option<Candidate<'a>>,
    gone: &Gone<'a>,
) -> Option<Candidate<'a>> {
    if size <= MAX_DELTA_BYTES || size > MAX_SOLID_BYTES {
        return None;
    }
    choose_by(path, hash, same, gone, |base| (MIN_DELTA_BYTES..=MAX_SOLID_BYTES).contains(&base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn likeness_counts_prefix_and_suffix_once() {
        assert_eq!(likeness(b"libfoo.so.1.2", b"libfoo.so.1.3"), 12);
        assert_eq!(likeness(b"aaa", b"aaa"), 3);
        assert_eq!(likeness(b"abc", b"xyz"), 0);
        assert_eq!(likeness(b"a", b"aa"), 1);
    }

    #[test]
    fn same_path_wins_and_unchanged_content_is_no_base() {
        let (p, q) = (rel("usr/bin/perl"), rel("usr/bin/perl5.32"));
        let h = Hash::of(b"new");
        let same = Candidate { path: &p, size: 1000, hash: Hash::of(b"old") };
        let gone = Gone::new([Candidate { path: &q, size: 1000, hash: Hash::of(b"x") }]);
        assert_eq!(choose(&p, 900, &h, Some(same), &gone), Some(same));
        let unchanged = Candidate { hash: h, ..same };
        assert_eq!(choose(&p, 900, &h, Some(unchanged), &gone), None);
        let tiny = Candidate { size: 10, ..same };
        assert_eq!(choose(&p, 900, &h, Some(tiny), &gone), None, "too small to be worth a delta");
    }

    #[test]
    fn renamed_file_finds_its_old_name_in_the_same_directory_only() {
        let old = [rel("lib/libc-2.31.so"), rel("lib/libfoo.so.1.2"), rel("lib/zz"), rel("other/libfoo.so.1.4")];
        let gone = Gone::new(old.iter().map(|p| Candidate { path: p, size: 5000, hash: Hash::of(p.as_bytes()) }));
        let new = rel("lib/libfoo.so.1.3");
        assert_eq!(gone.base_for(&new, 5000).map(|c| c.path), Some(&old[1]));
        assert_eq!(gone.base_for(&rel("lib/unrelated-name"), 5000), None, "not alike enough");
        assert_eq!(gone.base_for(&rel("elsewhere/libfoo.so.1.3"), 5000), None);
        assert_eq!(gone.base_for(&new, MAX_DELTA_BYTES + 1), None, "too large for a delta");
    }

    #[test]
    fn a_large_renamed_file_is_a_seed_but_no_base() {
        let old = [rel("usr/lib/libLLVM-15.so"), rel("usr/lib/small-15.so")];
        let sizes = [150 << 20, 4000];
        let gone =
            Gone::new(old.iter().zip(sizes).map(|(p, size)| Candidate { path: p, size, hash: Hash::of(p.as_bytes()) }));
        let new = rel("usr/lib/libLLVM-16.so");
        assert_eq!(gone.seed_for(&new, 1 << 20).map(|c| c.path), Some(&old[0]));
        assert_eq!(gone.base_for(&new, 160 << 20), None);
        assert_eq!(gone.seed_for(&rel("usr/lib/small-16.so"), 1 << 20), None, "below the minimum");
    }

    #[test]
    fn a_large_renamed_file_has_a_solid_base_up_to_the_solid_limit() {
        let old = [rel("lists/x_bullseye_Packages"), rel("lists/huge_bullseye_Packages"), rel("lists/y")];
        let sizes = [45 << 20, MAX_SOLID_BYTES + 1, 100 << 20];
        let gone =
            Gone::new(old.iter().zip(sizes).map(|(p, size)| Candidate { path: p, size, hash: Hash::of(p.as_bytes()) }));
        let h = Hash::of(b"new");
        let new = rel("lists/x_bookworm_Packages");
        assert_eq!(choose_large(&new, 50 << 20, &h, None, &gone).map(|c| c.path), Some(&old[0]));
        assert_eq!(choose(&new, 50 << 20, &h, None, &gone), None, "no per-object delta that large");
        assert_eq!(choose_large(&new, MAX_DELTA_BYTES, &h, None, &gone), None, "small: choose's business");
        assert_eq!(choose_large(&new, MAX_SOLID_BYTES + 1, &h, None, &gone), None, "too large");
        assert_eq!(
            choose_large(&rel("lists/huge_bookworm_Packages"), 50 << 20, &h, None, &gone),
            None,
            "the only alike gone file is over the limit"
        );
        let same = Candidate { path: &old[2], size: 100 << 20, hash: Hash::of(b"old") };
        assert_eq!(choose_large(&old[2], 50 << 20, &h, Some(same), &gone), None, "its old version is too large");
        let same = Candidate { size: 30 << 20, ..same };
        assert_eq!(choose_large(&old[2], 50 << 20, &h, Some(same), &gone), Some(same));
    }

    #[test]
    fn window_spans_base_and_object_within_the_host_limit() {
        assert_eq!(window_log(1, 1), 17);
        assert_eq!(window_log(3 << 20, 1 << 20), 22);
        assert_eq!(window_log(MAX_DELTA_BYTES, MAX_DELTA_BYTES), 25);
        assert!(!raw_content_ok(&[0x37, 0xA4, 0x30, 0xEC, 1]));
        assert!(raw_content_ok(b"\x7fELF"));
    }
}

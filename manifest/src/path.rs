//! `RelPath`: the one path type every tree operation is keyed by.
//!
//! A `RelPath` is relative, `/`-separated, never empty, and has no `.`, `..` or empty
//! components and no NUL byte, so joining it beneath a root can never climb out of it.
//! Paths are raw bytes (Linux file names need not be UTF-8) and sort byte-wise, so two
//! sorted listings can be merged side by side.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use compact_bytes::CompactBytesSlice;

/// Longest path accepted, in bytes (Linux `PATH_MAX`, less the terminating NUL).
pub const MAX_PATH: usize = 4095;
/// Longest single component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;

/// Stored as a [`CompactBytesSlice`]: the same 16 bytes as a `Box<[u8]>`, but a path of up to
/// 15 bytes lives inline, with no allocation. A tree holds one path per entry, and most
/// names near the top of a root, or in a flat tree of many small files, are that short:
/// on a million-file tree this saves two allocations per file (the host's and the
/// manifest's copy), about 64 MB.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RelPath(CompactBytesSlice);

impl Ord for RelPath {
    fn cmp(&self, other: &RelPath) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &RelPath) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why a byte string is not a valid [`RelPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0} is absolute (hint: paths in a manifest are relative to the root)")]
    Absolute(String),
    #[error("path {0} has an empty component")]
    EmptyComponent(String),
    #[error("path {0} has a '.' or '..' component")]
    DotComponent(String),
    #[error("path {0} contains a NUL byte")]
    Nul(String),
    #[error("path {0} is longer than {MAX_PATH} bytes")]
    TooLong(String),
    #[error("path {0} has a component longer than {MAX_NAME} bytes")]
    NameTooLong(String),
}

fn show(bytes: &[u8]) -> String {
    // Cap what goes into an error message: a hostile path may be megabytes long.
    let shown = &bytes[..bytes.len().min(200)];
    format!("{:?}", String::from_utf8_lossy(shown))
}

impl RelPath {
    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<RelPath, PathError> {
        let b = bytes.as_ref();
        if b.is_empty() {
            return Err(PathError::Empty);
        }
        if b.len() > MAX_PATH {
            return Err(PathError::TooLong(show(b)));
        }
        if b.contains(&0) {
            return Err(PathError::Nul(show(b)));
        }
        if b[0] == b'/' {
            return Err(PathError::Absolute(show(b)));
        }
        for comp in b.split(|&c| c == b'/') {
            match comp {
                b"" => return Err(PathError::EmptyComponent(show(b))),
                b"." | b".." => return Err(PathError::DotComponent(show(b))),
                c if c.len() > MAX_NAME => return Err(PathError::NameTooLong(show(b))),
                _ => {}
            }
        }
        Ok(RelPath(CompactBytesSlice::new(b)))
    }

    /// The path of `rel` beneath `root`, if `rel` is a valid relative path under it.
    pub fn from_fs(root: &Path, path: &Path) -> Result<RelPath, PathError> {
        let rel = path.strip_prefix(root).unwrap_or(path);
        RelPath::new(rel.as_os_str().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_slice()
    }

    pub fn as_path(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }

    /// Components, outermost first.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.0.split(|&c| c == b'/')
    }

    /// The containing directory, or `None` for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        self.parent_bytes().map(|b| RelPath(CompactBytesSlice::new(b)))
    }

    /// The bytes of [`RelPath::parent`], without building it.
    pub fn parent_bytes(&self) -> Option<&[u8]> {
        let i = self.0.iter().rposition(|&c| c == b'/')?;
        Some(&self.0[..i])
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&c| c == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Appends one component (already validated as a name: no `/`, NUL, `.` or `..`).
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        v.push(b'/');
        v.extend_from_slice(name);
        RelPath::new(v)
    }

    /// True when `self` is `other` or lies beneath it.
    pub fn is_within(&self, other: &RelPath) -> bool {
        self.0.starts_with(&other.0) && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.components().count()
    }
}

/// Writes `bytes` for humans and line-oriented tools, the way rsync does: printable characters
/// as they are, and every control character, backslash and byte that is not UTF-8 as `\#ooo`
/// (octal). A hostile name can then neither forge an output line nor hide as another name.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let octal = |out: &mut String, b: u8| out.push_str(&format!("\\#{b:03o}"));
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    octal(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            octal(&mut out, b);
        }
    }
    out
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_bytes(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes_and_junk() {
        for bad in [&b""[..], b"/abs", b"..", b"../x", b"a/../../x", b".", b"a/./b", b"a//b", b"a/", b"a\0b"] {
            assert!(RelPath::new(bad).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        assert!(RelPath::new(vec![b'a'; MAX_PATH + 1]).is_err());
        assert!(RelPath::new(vec![b'a'; MAX_NAME + 1]).is_err());
        assert!(RelPath::new(vec![b'a'; MAX_NAME]).is_ok());
    }

    #[test]
    fn accepts_odd_but_valid_names() {
        for good in [&b"a"[..], b"...", b"a/b/c", b".hidden", b"\xff\xfe", b"$(touch x)"] {
            RelPath::new(good).unwrap();
        }
    }

    #[test]
    fn parent_name_within() {
        let p = RelPath::new("usr/lib/x.so").unwrap();
        assert_eq!(p.parent().unwrap().as_bytes(), b"usr/lib");
        assert_eq!(p.file_name(), b"x.so");
        assert!(p.is_within(&RelPath::new("usr").unwrap()));
        assert!(!p.is_within(&RelPath::new("us").unwrap()));
        assert!(RelPath::new("a").unwrap().parent().is_none());
    }

    #[test]
    fn display_escapes_what_could_forge_or_hide() {
        let p = RelPath::new(b"etc/evil\n>f+++++++++ passwd").unwrap();
        assert_eq!(p.to_string(), "etc/evil\\#012>f+++++++++ passwd");
        assert_eq!(RelPath::new(b"\xff\xfe").unwrap().to_string(), "\\#377\\#376");
        assert_eq!(RelPath::new("a\\#012").unwrap().to_string(), "a\\#134#012");
        assert_eq!(RelPath::new("ünï").unwrap().to_string(), "ünï");
    }

    #[test]
    fn sorts_bytewise() {
        let mut v: Vec<RelPath> = ["a/b", "a.b", "a", "B"].iter().map(|s| RelPath::new(s).unwrap()).collect();
        v.sort();
        let got: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["B", "a", "a.b", "a/b"]);
    }

    #[test]
    fn short_and_long_paths_behave_alike() {
        // 15 bytes and less live inline, longer ones on the heap: nothing else may differ.
        let names = ["a", "d486/f312", "fifteen_bytes_x", "sixteen_bytes_xy", "usr/share/doc/libc6/copyright"];
        let mut v: Vec<RelPath> = names.iter().map(|s| RelPath::new(s).unwrap()).collect();
        for (p, s) in v.iter().zip(names) {
            assert_eq!(p.as_bytes(), s.as_bytes());
            assert_eq!(p.clone(), *p);
            assert_eq!(p.parent_bytes(), p.parent().as_ref().map(RelPath::as_bytes));
        }
        let long = RelPath::new("usr/share/doc/libc6/copyright").unwrap();
        assert_eq!(long.parent().unwrap().as_bytes(), b"usr/share/doc/libc6");
        assert_eq!(long.parent().unwrap().parent().unwrap().as_bytes(), b"usr/share/doc");
        assert!(long.is_within(&RelPath::new("usr/share").unwrap()));
        v.reverse();
        v.sort();
        let mut want: Vec<&str> = names.to_vec();
        want.sort();
        assert_eq!(v.iter().map(|p| p.to_string()).collect::<Vec<_>>(), want);
        // Hashed as its bytes, inline or not (as the boxed slice it replaced was).
        use std::hash::{BuildHasher, BuildHasherDefault};
        let state = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        for s in names {
            assert_eq!(state.hash_one(RelPath::new(s).unwrap()), state.hash_one(s.as_bytes()), "{s}");
        }
    }
}

//! A persistent hash cache: (dev, inode) → (size, mtime, ctime, blake3).
//!
//! A file whose size, mtime and ctime are unchanged since it was hashed is not read again, so a
//! rescan of an unchanged tree costs about one stat walk. ctime is in the key because nothing in
//! userspace can set it: an edit that restores the mtime (`touch -r`) still changes the ctime and
//! is caught.

use foldhash::{HashMap, HashMapExt};
use std::io::{self, Read, Write};
use std::path::Path;

use crate::scan::ScannedEntry;
use crate::{Hash, Kind};

const MAGIC: &[u8; 8] = b"GISHC01\n";
const RECORD: usize = 8 * 5 + 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<(u64, u64), (Stamp, Hash)>,
}

fn stamp(e: &ScannedEntry) -> Stamp {
    Stamp { size: e.entry.size, mtime_ns: e.entry.meta.mtime_ns, ctime_ns: e.ctime_ns }
}

impl HashCache {
    /// Loads a cache; a missing, unreadable or damaged file is an empty cache (it is only ever an
    /// optimisation, and a damaged one must not be trusted).
    pub fn load(path: &Path) -> HashCache {
        Self::load_checked(path).0
    }

    /// Like [`HashCache::load`], and says why an existing file could not be used, so the caller
    /// can warn that everything will be hashed afresh.
    pub fn load_checked(path: &Path) -> (HashCache, Option<String>) {
        let mut map = HashMap::new();
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (HashCache { map }, None),
            Err(e) => return (HashCache { map }, Some(format!("cannot read {}: {e}", path.display()))),
        };
        let damaged = || Some(format!("{} is damaged", path.display()));
        let mut buf = Vec::new();
        if let Err(e) = f.read_to_end(&mut buf) {
            return (HashCache { map }, Some(format!("cannot read {}: {e}", path.display())));
        }
        if buf.len() < MAGIC.len() + 32 || &buf[..8] != MAGIC {
            return (HashCache { map }, damaged());
        }
        let (body, sum) = buf[8..].split_at(buf.len() - 8 - 32);
        if blake3::hash(body).as_bytes() != sum || body.len() % RECORD != 0 {
            return (HashCache { map }, damaged());
        }
        let u = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        for r in body.chunks_exact(RECORD) {
            let key = (u(&r[0..8]), u(&r[8..16]));
            let st = Stamp { size: u(&r[16..24]), mtime_ns: u(&r[24..32]) as i64, ctime_ns: u(&r[32..40]) as i64 };
            map.insert(key, (st, Hash(r[40..72].try_into().expect("32 bytes"))));
        }
        (HashCache { map }, None)
    }

    /// Fills in the hash of every regular file whose stamp matches the cache.
    pub fn apply(&self, entries: &mut [ScannedEntry]) -> usize {
        let mut hits = 0;
        for e in entries.iter_mut().filter(|e| e.entry.kind == Kind::File && e.entry.hash.is_none()) {
            if let Some((st, h)) = self.map.get(&(e.dev, e.ino)) {
                if *st == stamp(e) {
                    e.entry.hash = Some(*h);
                    hits += 1;
                }
            }
        }
        hits
    }

    /// Replaces the cache's content with the hashed regular files of `entries`. Returns whether
    /// anything changed (so an unchanged cache need not be written again).
    pub fn refresh(&mut self, entries: &[ScannedEntry]) -> bool {
        let mut map = HashMap::with_capacity(self.map.len());
        for e in entries.iter().filter(|e| e.entry.kind == Kind::File) {
            if let Some(h) = e.entry.hash {
                map.insert((e.dev, e.ino), (stamp(e), h));
            }
        }
        let changed = map != self.map;
        self.map = map;
        changed
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Writes the cache atomically (temp file, fsync, rename), with a checksum over the records.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut body = Vec::with_capacity(self.map.len() * RECORD);
        for ((dev, ino), (st, h)) in &self.map {
            for v in [*dev, *ino, st.size, st.mtime_ns as u64, st.ctime_ns as u64] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&h.0);
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&body)?;
        f.write_all(blake3::hash(&body).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan;

    #[test]
    fn unchanged_files_hit_and_edited_files_miss_even_with_the_old_mtime() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let mut s = scan::walk(d.path()).unwrap();
        assert!(scan::hash_files(d.path(), &mut s.entries, &throttle::Limiter::unlimited(), |_| true).is_empty());
        let mut c = HashCache::default();
        c.refresh(&s.entries);
        let cache_file = d.path().join("cache.bin");
        c.save(&cache_file).unwrap();
        let c = HashCache::load(&cache_file);
        assert_eq!(c.len(), 1);

        let mut again = scan::walk(d.path()).unwrap().entries;
        again.retain(|e| e.entry.path.as_bytes() == b"a");
        assert_eq!(c.apply(&mut again), 1, "an unchanged file is not re-hashed");

        // Same size, mtime restored (touch -r): only ctime tells.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"two").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        let mut edited = scan::walk(d.path()).unwrap().entries;
        edited.retain(|e| e.entry.path.as_bytes() == b"a");
        assert_eq!(c.apply(&mut edited), 0, "an edit hidden by touch -r must not hit the cache");
    }

    #[test]
    fn a_damaged_cache_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c");
        std::fs::write(&p, b"GISHC01\ngarbage-garbage-garbage-garbage-garbage").unwrap();
        let (c, warning) = HashCache::load_checked(&p);
        assert!(c.is_empty());
        assert!(warning.unwrap().contains("damaged"));
        assert!(HashCache::load_checked(&d.path().join("missing")).1.is_none(), "a missing cache is no problem");
    }
}

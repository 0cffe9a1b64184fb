//! A persistent hash cache: (dev, inode) → (size, mtime, ctime, blake3), sorted by (dev, inode).
//!
//! A file whose size, mtime and ctime are unchanged since it was hashed is not read again, so a
//! rescan of an unchanged tree costs about one stat walk. ctime is in the key because nothing in
//! userspace can set it: an edit that restores the mtime (`touch -r`) still changes the ctime and
//! is caught.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    key: (u64, u64),
    stamp: Stamp,
    hash: Hash,
}

/// Records sorted by (dev, inode), one per inode: 72 bytes each, with no hash-table overhead
/// (a million files cost 72 MB, not the 150 MB of a map).
#[derive(Debug, Default)]
pub struct HashCache {
    records: Vec<Record>,
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
        match Self::read(path) {
            Ok(c) => (c, None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (HashCache::default(), None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                (HashCache::default(), Some(format!("{} is damaged", path.display())))
            }
            Err(e) => (HashCache::default(), Some(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Reads record by record (no second copy of the file in memory), checking the checksum.
    fn read(path: &Path) -> io::Result<HashCache> {
        let damaged = || io::Error::new(io::ErrorKind::InvalidData, "damaged");
        let f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len < (MAGIC.len() + 32) as u64 || !(len - MAGIC.len() as u64 - 32).is_multiple_of(RECORD as u64) {
            return Err(damaged());
        }
        let mut r = io::BufReader::with_capacity(256 * 1024, f);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(damaged());
        }
        let n = ((len - MAGIC.len() as u64 - 32) / RECORD as u64) as usize;
        let mut records = Vec::with_capacity(n);
        let mut sum = blake3::Hasher::new();
        let mut rec = [0u8; RECORD];
        let u = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        for _ in 0..n {
            r.read_exact(&mut rec)?;
            sum.update(&rec);
            records.push(Record {
                key: (u(&rec[0..8]), u(&rec[8..16])),
                stamp: Stamp {
                    size: u(&rec[16..24]),
                    mtime_ns: u(&rec[24..32]) as i64,
                    ctime_ns: u(&rec[32..40]) as i64,
                },
                hash: Hash(rec[40..72].try_into().expect("32 bytes")),
            });
        }
        let mut expect = [0u8; 32];
        r.read_exact(&mut expect)?;
        if sum.finalize().as_bytes() != &expect {
            return Err(damaged());
        }
        // Files written before the records were kept sorted are in any order.
        if !records.is_sorted_by_key(|r| r.key) {
            records.sort_unstable_by_key(|r| r.key);
            records.dedup_by_key(|r| r.key);
        }
        Ok(HashCache { records })
    }

    /// Fills in the hash of every regular file whose stamp matches the cache.
    pub fn apply(&self, entries: &mut [ScannedEntry]) -> usize {
        let mut hits = 0;
        for e in entries.iter_mut().filter(|e| e.entry.kind == Kind::File && e.entry.hash.is_none()) {
            if let Ok(i) = self.records.binary_search_by_key(&(e.dev, e.ino), |r| r.key) {
                let r = &self.records[i];
                if r.stamp == stamp(e) {
                    e.entry.hash = Some(r.hash);
                    hits += 1;
                }
            }
        }
        hits
    }

    /// Replaces the cache's content with the hashed regular files of `entries`. Returns whether
    /// anything changed (so an unchanged cache need not be written again).
    pub fn refresh(&mut self, entries: &[ScannedEntry]) -> bool {
        if self.same_as(entries) {
            // The common case (nothing changed): no second copy of the records is built.
            return false;
        }
        let mut records: Vec<Record> = entries
            .iter()
            .filter(|e| e.entry.kind == Kind::File)
            .filter_map(|e| Some(Record { key: (e.dev, e.ino), stamp: stamp(e), hash: e.entry.hash? }))
            .collect();
        records.sort_unstable_by_key(|r| r.key);
        // Hard links: one record per inode.
        records.dedup_by_key(|r| r.key);
        let changed = records != self.records;
        self.records = records;
        changed
    }

    /// Whether the hashed regular files of `entries` are exactly the cache's records.
    fn same_as(&self, entries: &[ScannedEntry]) -> bool {
        let mut matched = vec![false; self.records.len()];
        for e in entries.iter().filter(|e| e.entry.kind == Kind::File) {
            let Some(hash) = e.entry.hash else { continue };
            match self.records.binary_search_by_key(&(e.dev, e.ino), |r| r.key) {
                Ok(i) if self.records[i].stamp == stamp(e) && self.records[i].hash == hash => matched[i] = true,
                _ => return false,
            }
        }
        matched.iter().all(|m| *m)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Writes the cache atomically (temp file, fsync, rename), with a checksum over the records.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut w = io::BufWriter::with_capacity(256 * 1024, std::fs::File::create(&tmp)?);
        w.write_all(MAGIC)?;
        let mut sum = blake3::Hasher::new();
        let mut rec = [0u8; RECORD];
        for r in &self.records {
            let (dev, ino) = r.key;
            for (i, v) in [dev, ino, r.stamp.size, r.stamp.mtime_ns as u64, r.stamp.ctime_ns as u64].iter().enumerate()
            {
                rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            rec[40..72].copy_from_slice(&r.hash.0);
            sum.update(&rec);
            w.write_all(&rec)?;
        }
        w.write_all(sum.finalize().as_bytes())?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
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
    fn refresh_reports_exactly_when_the_records_change() {
        let d = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(d.path().join(name), name).unwrap();
        }
        let scan_all = || {
            let mut s = scan::walk(d.path()).unwrap();
            assert!(scan::hash_files(d.path(), &mut s.entries, &throttle::Limiter::unlimited(), |_| true).is_empty());
            s.entries
        };
        let mut c = HashCache::default();
        assert!(c.refresh(&scan_all()), "first fill");
        assert_eq!(c.len(), 3);
        assert!(!c.refresh(&scan_all()), "an unchanged tree leaves the cache as it is");
        // Saved and loaded back, still the same records.
        let file = d.path().join("cache.bin");
        c.save(&file).unwrap();
        let mut c = HashCache::load(&file);
        std::fs::remove_file(&file).unwrap();
        assert!(!c.refresh(&scan_all()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(d.path().join("b"), "changed").unwrap();
        assert!(c.refresh(&scan_all()), "an edited file");
        std::fs::remove_file(d.path().join("c")).unwrap();
        assert!(c.refresh(&scan_all()), "a deleted file leaves a stale record");
        assert_eq!(c.len(), 2);
        // A file hashed by nobody this time (not selected) drops out too.
        assert!(c.refresh(&[]));
        assert!(c.is_empty());
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

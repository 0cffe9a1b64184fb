//! The hash index: (dev, inode) → (size, mtime, ctime, blake3), sorted by (dev, inode). syncd
//! keeps one per root (the host index, `host-index-*.bin` in its state dir), syncmaster one per
//! image store (`hash-cache.bin`).
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
pub struct HashIndex {
    records: Vec<Record>,
}

fn stamp(e: &ScannedEntry) -> Stamp {
    let m = &e.entry.meta;
    Stamp {
        size: e.entry.size,
        mtime_ns: crate::scan::stamp_ns(m.mtime_sec, m.mtime_nsec.into()),
        ctime_ns: e.ctime_ns,
    }
}

impl HashIndex {
    /// Loads a cache; a missing, unreadable or damaged file is an empty cache (it is only ever an
    /// optimisation, and a damaged one must not be trusted).
    pub fn load(path: &Path) -> HashIndex {
        Self::load_checked(path).0
    }

    /// Like [`HashIndex::load`], and says why an existing file could not be used, so the caller
    /// can warn that everything will be hashed afresh.
    pub fn load_checked(path: &Path) -> (HashIndex, Option<String>) {
        match Self::read(path) {
            Ok(c) => (c, None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (HashIndex::default(), None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                (HashIndex::default(), Some(format!("{} is damaged", path.display())))
            }
            Err(e) => (HashIndex::default(), Some(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Reads record by record (no second copy of the file in memory), checking the checksum.
    fn read(path: &Path) -> io::Result<HashIndex> {
        let mut r = RecordReader::open(path)?;
        let mut records = Vec::with_capacity(r.remaining);
        while let Some(rec) = r.next_record()? {
            records.push(rec);
        }
        r.finish()?;
        // Files written before the records were kept sorted are in any order.
        if !records.is_sorted_by_key(|r| r.key) {
            records.sort_unstable_by_key(|r| r.key);
            records.dedup_by_key(|r| r.key);
        }
        Ok(HashIndex { records })
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

    /// Records that each inode `(dev, ino)`, with this size, mtime and ctime (nanoseconds, as
    /// [`crate::scan::stamp_ns`] makes them), holds its hash: content a pass has just written
    /// and verified, so the next scan need not read it. Replaces records of the same inodes.
    pub fn insert_known(&mut self, known: impl IntoIterator<Item = ((u64, u64), (u64, i64, i64), Hash)>) {
        let mut records: Vec<Record> = known
            .into_iter()
            .map(|(key, (size, mtime_ns, ctime_ns), hash)| Record {
                key,
                stamp: Stamp { size, mtime_ns, ctime_ns },
                hash,
            })
            .collect();
        if records.is_empty() {
            return;
        }
        records.append(&mut self.records);
        // Stable: for one inode, the new record comes first and is the one kept.
        records.sort_by_key(|r| r.key);
        records.dedup_by_key(|r| r.key);
        self.records = records;
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Writes the cache atomically (temp file, fsync, rename), with a checksum over the records.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        write_records(path, self.records.iter().copied())
    }
}

fn damaged() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "damaged")
}

/// Reads a cache file's records in file order, summing them for the checksum at its end. The
/// file is read, and summed, a block of records at a time: blake3 pays per call.
struct RecordReader {
    r: std::fs::File,
    remaining: usize,
    sum: blake3::Hasher,
    block: Vec<u8>,
    at: usize,
}

const BLOCK_RECORDS: usize = 4096;

impl RecordReader {
    fn open(path: &Path) -> io::Result<RecordReader> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        if len < (MAGIC.len() + 32) as u64 || !(len - MAGIC.len() as u64 - 32).is_multiple_of(RECORD as u64) {
            return Err(damaged());
        }
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(damaged());
        }
        let remaining = ((len - MAGIC.len() as u64 - 32) / RECORD as u64) as usize;
        Ok(RecordReader { r: f, remaining, sum: blake3::Hasher::new(), block: Vec::new(), at: 0 })
    }

    fn next_record(&mut self) -> io::Result<Option<Record>> {
        if self.at == self.block.len() {
            if self.remaining == 0 {
                return Ok(None);
            }
            let n = self.remaining.min(BLOCK_RECORDS);
            self.block.resize(n * RECORD, 0);
            self.r.read_exact(&mut self.block)?;
            self.sum.update(&self.block);
            self.remaining -= n;
            self.at = 0;
        }
        let rec = &self.block[self.at..self.at + RECORD];
        self.at += RECORD;
        let u = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        Ok(Some(Record {
            key: (u(&rec[0..8]), u(&rec[8..16])),
            stamp: Stamp { size: u(&rec[16..24]), mtime_ns: u(&rec[24..32]) as i64, ctime_ns: u(&rec[32..40]) as i64 },
            hash: Hash(rec[40..72].try_into().expect("32 bytes")),
        }))
    }

    /// Checks the checksum, once every record has been read.
    fn finish(mut self) -> io::Result<()> {
        while self.next_record()?.is_some() {}
        let mut expect = [0u8; 32];
        self.r.read_exact(&mut expect)?;
        if self.sum.finalize().as_bytes() != &expect {
            return Err(damaged());
        }
        Ok(())
    }
}

/// Writes `records` (sorted by key, one per key) as a cache file, atomically: temp file, fsync,
/// rename.
fn write_records(path: &Path, records: impl Iterator<Item = Record>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut w = io::BufWriter::with_capacity(256 * 1024, std::fs::File::create(&tmp)?);
    w.write_all(MAGIC)?;
    let mut sum = blake3::Hasher::new();
    let mut rec = [0u8; RECORD];
    for r in records {
        let (dev, ino) = r.key;
        for (i, v) in [dev, ino, r.stamp.size, r.stamp.mtime_ns as u64, r.stamp.ctime_ns as u64].iter().enumerate() {
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

/// The regular files of `entries` in (dev, inode) order, the order of a cache file's
/// records: each as its inode number and its index in `entries`. `dev` is the device they all
/// share, when they do (the usual case): the merge then reads every key from here, in order,
/// instead of from a million entries in random order. 12 bytes per file, where a loaded
/// cache costs 72.
struct InodeOrder {
    dev: Option<u64>,
    files: Vec<InodeOf>,
}

/// A file's inode number and index, packed into 12 bytes (a million files: 12 MB, not 16).
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct InodeOf {
    ino: u64,
    at: u32,
}

impl InodeOf {
    fn key(self) -> (u64, u32) {
        (self.ino, self.at)
    }
}

impl InodeOrder {
    fn of(entries: &[ScannedEntry]) -> InodeOrder {
        use rayon::slice::ParallelSliceMut;
        let (mut dev, mut one_dev) = (None, true);
        let mut files: Vec<InodeOf> = Vec::new();
        for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.entry.kind == Kind::File) {
            match dev {
                None => dev = Some(e.dev),
                Some(d) if d != e.dev => one_dev = false,
                Some(_) => {}
            }
            files.push(InodeOf { ino: e.ino, at: i as u32 });
        }
        if one_dev {
            files.par_sort_unstable_by_key(|f| f.key());
        } else {
            files.par_sort_unstable_by_key(|f| (entries[f.at as usize].dev, f.ino, f.at));
            dev = None;
        }
        InodeOrder { dev, files }
    }

    fn key(&self, entries: &[ScannedEntry], at: usize) -> (u64, u64) {
        let InodeOf { ino, at } = self.files[at];
        (self.dev.unwrap_or_else(|| entries[at as usize].dev), ino)
    }
}

/// What [`apply_file`] did: how many files took their hash from the cache, and whether the
/// cache file already holds exactly what [`save_entries`] would write for these entries
/// once the rest are hashed (see [`Applied::unchanged`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    /// Entries given their hash from a record (hard links: several per record).
    pub filled: usize,
    /// Records in the file.
    records: usize,
    /// Records some entry matched.
    matched: usize,
    /// The file was damaged or unreadable: whatever is hashed, write it anew.
    rewrite: bool,
}

impl Applied {
    /// Whether saving `entries` (hashed since [`apply_file`]) would write the same records:
    /// every hashed file took its hash from a record, and every record was used.
    pub fn unchanged(&self, entries: &[ScannedEntry]) -> bool {
        let hashed = entries.iter().filter(|e| e.entry.kind == Kind::File && e.entry.hash.is_some()).count();
        !self.rewrite && hashed == self.filled && self.matched == self.records
    }
}

/// Fills in the hash of every regular file of `entries` whose (dev, inode) and stamp match a
/// record of the cache file at `path`, reading the file as a stream merged with the files in
/// inode order: the records are never all in memory. A file that is missing is an empty
/// cache; one that cannot be read, is damaged (checksum) or is not in key order (written by
/// an old version) fills nothing, and the returned message says why.
pub fn apply_file(path: &Path, entries: &mut [ScannedEntry]) -> (Applied, Option<String>) {
    let order = InodeOrder::of(entries);
    // Which files (by position in `order`) took a hash, to take it back if the checksum fails.
    let mut filled = vec![0u64; order.files.len().div_ceil(64)];
    let mut applied = Applied::default();
    let result = (|| -> io::Result<()> {
        let mut r = RecordReader::open(path)?;
        applied.records = r.remaining;
        let mut at = 0;
        let mut last: Option<(u64, u64)> = None;
        while let Some(rec) = r.next_record()? {
            if last.is_some_and(|k| k >= rec.key) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "not in inode order (an old format)"));
            }
            last = Some(rec.key);
            while at < order.files.len() && order.key(entries, at) < rec.key {
                at += 1;
            }
            let mut used = false;
            while at < order.files.len() && order.key(entries, at) == rec.key {
                let e = &mut entries[order.files[at].at as usize];
                if e.entry.hash.is_none() && stamp(e) == rec.stamp {
                    e.entry.hash = Some(rec.hash);
                    filled[at / 64] |= 1 << (at % 64);
                    used = true;
                }
                at += 1;
            }
            applied.matched += used as usize;
        }
        // Nothing read is trusted until the checksum over all of it holds.
        r.finish()
    })();
    match result {
        Ok(()) => {
            applied.filled = filled.iter().map(|w| w.count_ones() as usize).sum();
            (applied, None)
        }
        Err(e) => {
            for (at, f) in order.files.iter().enumerate() {
                if filled[at / 64] & (1 << (at % 64)) != 0 {
                    entries[f.at as usize].entry.hash = None;
                }
            }
            let problem = match e.kind() {
                io::ErrorKind::NotFound => None,
                io::ErrorKind::InvalidData => Some(format!("{} is damaged ({e})", path.display())),
                _ => Some(format!("cannot read {}: {e}", path.display())),
            };
            (Applied { rewrite: problem.is_some(), ..Applied::default() }, problem)
        }
    }
}

/// Writes the hashed regular files of `entries` as the cache file at `path` (atomically), one
/// record per inode, without building the records in memory first.
pub fn save_entries(path: &Path, entries: &[ScannedEntry]) -> io::Result<()> {
    let order = InodeOrder::of(entries);
    let mut last = None;
    let records = order.files.iter().filter_map(|&InodeOf { at: i, .. }| {
        let e = &entries[i as usize];
        let key = (e.dev, e.ino);
        // Hard links: one record per inode.
        if last == Some(key) {
            return None;
        }
        let hash = e.entry.hash?;
        last = Some(key);
        Some(Record { key, stamp: stamp(e), hash })
    });
    write_records(path, records)
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
        let mut c = HashIndex::default();
        c.refresh(&s.entries);
        let cache_file = d.path().join("cache.bin");
        c.save(&cache_file).unwrap();
        let c = HashIndex::load(&cache_file);
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
    fn inserted_records_of_written_files_hit_and_replace_the_old_record_of_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        std::fs::write(&f, b"new content").unwrap();
        let md = std::fs::metadata(&f).unwrap();
        let stamp =
            (md.len(), scan::stamp_ns(md.mtime(), md.mtime_nsec()), scan::stamp_ns(md.ctime(), md.ctime_nsec()));
        let mut c = HashIndex::default();
        // An older record of the same inode, and another inode's.
        c.insert_known([
            ((md.dev(), md.ino()), (3, 0, 0), Hash([1; 32])),
            ((md.dev(), md.ino() + 1), (1, 0, 0), Hash([2; 32])),
        ]);
        let right = Hash(*blake3::hash(b"new content").as_bytes());
        c.insert_known([((md.dev(), md.ino()), stamp, right)]);
        assert_eq!(c.len(), 2, "one record per inode");
        let mut entries = scan::walk(d.path()).unwrap().entries;
        entries.retain(|e| e.entry.path.as_bytes() == b"a");
        assert_eq!(c.apply(&mut entries), 1);
        assert_eq!(entries[0].entry.hash, Some(right));
        // A later edit misses it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"edited").unwrap();
        let mut entries = scan::walk(d.path()).unwrap().entries;
        entries.retain(|e| e.entry.path.as_bytes() == b"a");
        assert_eq!(c.apply(&mut entries), 0);
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
        let mut c = HashIndex::default();
        assert!(c.refresh(&scan_all()), "first fill");
        assert_eq!(c.len(), 3);
        assert!(!c.refresh(&scan_all()), "an unchanged tree leaves the cache as it is");
        // Saved and loaded back, still the same records.
        let file = d.path().join("cache.bin");
        c.save(&file).unwrap();
        let mut c = HashIndex::load(&file);
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
    fn a_streamed_cache_fills_hashes_and_tells_whether_it_changed() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(tree.join(name), name).unwrap();
        }
        std::fs::hard_link(tree.join("a"), tree.join("a-link")).unwrap();
        let walk = || scan::walk(&tree).unwrap().entries;
        let hash_rest = |entries: &mut [ScannedEntry]| {
            assert!(scan::hash_files(&tree, entries, &throttle::Limiter::unlimited(), |_| true).is_empty());
        };
        let file = d.path().join("index.bin");
        let hashed = |entries: &[ScannedEntry]| entries.iter().filter(|e| e.entry.hash.is_some()).count();

        // No file yet: nothing filled, and saving is needed once anything is hashed.
        let mut e = walk();
        let (applied, problem) = apply_file(&file, &mut e);
        assert!(problem.is_none(), "a missing index is no problem");
        assert_eq!(applied.filled, 0);
        hash_rest(&mut e);
        assert!(!applied.unchanged(&e));
        save_entries(&file, &e).unwrap();
        assert_eq!(HashIndex::load(&file).len(), 3, "one record per inode");

        // Unchanged: every file filled from the index (both names of the hard link).
        let mut e = walk();
        let (applied, _) = apply_file(&file, &mut e);
        assert_eq!(applied.filled, 4);
        let all = walk();
        let mut rehashed = all.clone();
        hash_rest(&mut rehashed);
        for (a, b) in e.iter().zip(&rehashed) {
            assert_eq!(a.entry.hash, b.entry.hash, "{}", a.entry.path);
        }
        hash_rest(&mut e);
        assert!(applied.unchanged(&e));

        // An edited file misses, is hashed afresh, and the index must be rewritten.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(tree.join("b"), "changed").unwrap();
        let mut e = walk();
        assert_eq!(apply_file(&file, &mut e).0.filled, 3);
        hash_rest(&mut e);
        assert!(!apply_file(&file, &mut walk()).0.unchanged(&e));
        save_entries(&file, &e).unwrap();
        let mut e = walk();
        let (applied, _) = apply_file(&file, &mut e);
        assert_eq!(applied.filled, 4);
        assert!(applied.unchanged(&e));

        // A record no file uses (a deleted file) means a rewrite too.
        std::fs::remove_file(tree.join("c")).unwrap();
        let mut e = walk();
        let (applied, _) = apply_file(&file, &mut e);
        assert_eq!(applied.filled, 3);
        assert!(!applied.unchanged(&e));

        // A damaged file fills nothing, even the records before the damage, and is rewritten.
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let mut e = walk();
        let (applied, problem) = apply_file(&file, &mut e);
        assert!(problem.unwrap().contains("damaged"));
        assert_eq!((applied.filled, hashed(&e)), (0, 0));
        assert!(!applied.unchanged(&e));

        // Records out of inode order (an old format) are refused rather than half-merged.
        let mut c = HashIndex::default();
        let mut all = walk();
        hash_rest(&mut all);
        c.refresh(&all);
        c.records.reverse();
        write_records(&file, c.records.iter().copied()).unwrap();
        let mut e = walk();
        let (applied, problem) = apply_file(&file, &mut e);
        assert!(problem.unwrap().contains("inode order"));
        assert_eq!((applied.filled, hashed(&e)), (0, 0));
    }

    #[test]
    fn files_on_several_devices_merge_in_device_then_inode_order() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        for n in ["a", "b", "c", "d", "e"] {
            std::fs::write(tree.join(n), n).unwrap();
        }
        // As if b and d were bind-mounted files from other filesystems.
        let fake_devs = |mut e: Vec<ScannedEntry>| {
            for x in e.iter_mut() {
                match x.entry.path.as_bytes() {
                    b"b" => x.dev = 1,
                    b"d" => x.dev = u64::MAX,
                    _ => {}
                }
            }
            e
        };
        let walk = || fake_devs(scan::walk(&tree).unwrap().entries);
        let order = InodeOrder::of(&walk());
        assert_eq!(order.dev, None, "no one device");
        let e = walk();
        let keys: Vec<(u64, u64)> = (0..order.files.len()).map(|at| order.key(&e, at)).collect();
        assert!(keys.is_sorted(), "{keys:?}");
        assert_eq!(keys.len(), 5);

        let mut hashed = scan::walk(&tree).unwrap().entries;
        assert!(scan::hash_files(&tree, &mut hashed, &throttle::Limiter::unlimited(), |_| true).is_empty());
        let hashed = fake_devs(hashed);
        let file = d.path().join("index.bin");
        save_entries(&file, &hashed).unwrap();
        let mut e = walk();
        let (applied, problem) = apply_file(&file, &mut e);
        assert!(problem.is_none());
        assert_eq!(applied.filled, 5);
        assert!(applied.unchanged(&e));
        for (a, b) in e.iter().zip(&hashed) {
            assert_eq!(a.entry.hash, b.entry.hash, "{}", a.entry.path);
        }
    }

    #[test]
    fn a_damaged_cache_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c");
        std::fs::write(&p, b"GISHC01\ngarbage-garbage-garbage-garbage-garbage").unwrap();
        let (c, warning) = HashIndex::load_checked(&p);
        assert!(c.is_empty());
        assert!(warning.unwrap().contains("damaged"));
        assert!(HashIndex::load_checked(&d.path().join("missing")).1.is_none(), "a missing cache is no problem");
    }
}

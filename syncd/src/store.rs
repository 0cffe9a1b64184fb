//! The local content store, in the state dir: content fetched ahead of a commit (`syncd
//! prefetch`), and the old content a commit replaced or deleted, kept for a local rollback.
//!
//! Layout, beneath `STATE_DIR/store-<root key>/`:
//! - `objects/<blake3 hex>`: one regular file per content hash. Prefetched content is written
//!   there (temp name, verified against its hash while written, renamed); old content comes in
//!   as a hard link to the old inode, made just before the commit renames the new file over
//!   it, which on the root's filesystem costs no data copy (across filesystems it is copied).
//! - `objects.idx`: for each object, the inode, size and mtime it had when its content was
//!   last verified. An object whose inode still matches is used as verified; any other is read
//!   and hashed again before use, and removed if it no longer matches (then the commit falls
//!   back to the master, or refuses). That is the trust the host index gives unchanged files.
//! - `manifests/<identity hex>.bin` (the manifest-cache format, checked against its identity
//!   on every load) and `.lists.json` (the master's exclusion lists for the host with it).
//! - `state.json`: the current, previous and prefetched versions, and a version refused after
//!   it was rolled back.
//!
//! The store keeps the content of those three versions and nothing else ([`Store::gc`]), within
//! `store_max_bytes`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use manifest::{Hash, Manifest};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::hostfs::fsops;
use crate::state::StateDir;

/// A version the store knows of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionRef {
    pub version: u64,
    pub identity: String,
    /// When the host moved to it (current, previous) or the prefetch began, Unix milliseconds.
    #[serde(default)]
    pub at_unix_ms: u64,
}

impl VersionRef {
    pub fn new(version: u64, identity: &Hash) -> VersionRef {
        VersionRef { version, identity: identity.to_hex(), at_unix_ms: triggers::journal::now_ms() }
    }

    pub fn hash(&self) -> Option<Hash> {
        Hash::from_hex(&self.identity)
    }

    pub fn is(&self, identity: &Hash) -> bool {
        self.identity == identity.to_hex()
    }
}

/// A version being fetched into the store, or fetched.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Prefetch {
    pub version: u64,
    pub identity: String,
    pub complete: bool,
    pub objects_total: u64,
    pub objects_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub finished_unix_ms: u64,
}

/// A version this host rolled back after its health checks failed: not taken again until the
/// master targets another one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refused {
    pub version: u64,
    pub identity: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub current: Option<VersionRef>,
    pub previous: Option<VersionRef>,
    pub prefetched: Option<Prefetch>,
    pub refused: Option<Refused>,
    /// A rollback left what it replaced in the store: the next pass or prefetch removes it.
    #[serde(default)]
    pub gc_pending: bool,
}

/// What an object's inode was when its content was last verified.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    /// For an object written with a path's metadata ([`Store::add`]): its ctime then, and a
    /// fingerprint of the xattrs it was given. While the ctime holds, nothing changed the
    /// inode's metadata since, and a commit need not read its xattrs back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<MetaMark>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct MetaMark {
    ctime_ns: i128,
    xattrs: u64,
}

impl Stamp {
    /// The content check: the inode, size and mtime it had when verified.
    fn holds_for(&self, st: &rustix::fs::Stat) -> bool {
        let now = stamp_of(st);
        (self.ino, self.size, self.mtime_ns) == (now.ino, now.size, now.mtime_ns)
    }
}

fn stamp_of(st: &rustix::fs::Stat) -> Stamp {
    Stamp {
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
        meta: None,
    }
}

fn ctime_ns(st: &rustix::fs::Stat) -> i128 {
    st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128
}

/// A fingerprint of a set of xattrs (names and values, in order).
fn xattrs_mark(x: &manifest::Xattrs) -> u64 {
    let mut h = blake3::Hasher::new();
    for a in x.iter() {
        h.update(&(a.name.len() as u64).to_le_bytes());
        h.update(&a.name);
        h.update(&(a.value.len() as u64).to_le_bytes());
        h.update(&a.value);
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// What of `meta` an object (with `stamp`, and `st` before it was lent) lacks: see
/// [`fsops::meta_needed`]. The xattrs need no reading back when the object still has the ones
/// it was written (or kept) with, and they are the path's.
fn needs_of(stamp: &Stamp, st: &rustix::fs::Stat, meta: &manifest::Meta) -> fsops::MetaParts {
    let xattrs_hold = stamp.meta.is_some_and(|m| m.ctime_ns == ctime_ns(st) && m.xattrs == xattrs_mark(&meta.xattrs));
    let mut needs = fsops::meta_needed(st, meta);
    needs.xattrs = needs.xattrs || !xattrs_hold;
    needs
}

/// An object linked under a temp name by [`Store::link_into`].
pub struct Lent {
    /// The temp name in the path's directory.
    pub temp: String,
    /// The object's name in the store (for [`Store::placed`]).
    pub object: String,
    /// The metadata the linked inode still needs to become the path's.
    pub needs: fsops::MetaParts,
    /// The object had other names before this link (one may be the path itself, which a
    /// rename then leaves: see `settle` in `apply`).
    pub shared: bool,
}

pub struct Store {
    dir: PathBuf,
    objects: OwnedFd,
    dev: u64,
    /// By object name: `<hex>`, or `<hex>.<n>` for another inode with the same content (old
    /// content of several paths, kept so each gets its own inode back).
    stamps: Mutex<HashMap<String, Stamp>>,
    /// Which inodes the store has for each content: bit `n` for `<hex>.<n>` (0: `<hex>`).
    alts: Mutex<HashMap<Hash, u64>>,
    /// Objects (names) linked into the root by this pass: each is lent once (sharing an inode
    /// would make two paths one hard-link group the image does not have).
    used: Mutex<HashSet<String>>,
    /// Objects lent this pass whose link was renamed into the root: the root holds them now.
    placed: Mutex<Vec<String>>,
    /// Objects whose stamp is taken at [`Store::flush`] (kept old inodes: the commit's rename
    /// changes their link count, and so their ctime, after they are linked in), with the
    /// fingerprint of their xattrs when known.
    unstamped: Mutex<Vec<(String, Option<u64>)>>,
    /// Objects verified by this pass, with what `stat` said then: a pass checks each once.
    checked: Mutex<HashMap<String, rustix::fs::Stat>>,
    /// The next `<hex>.<n>` to try for old content kept this pass, by hash.
    next_alternate: Mutex<HashMap<String, usize>>,
    /// The inodes kept this pass (the paths of a hard-link group are one inode, kept once).
    kept_inodes: Mutex<HashSet<u64>>,
    /// The [`BUSY`] marker is made (this pass).
    busy: std::sync::atomic::AtomicBool,
}

/// The marker of a pass or prefetch under way (see [`Store::mark_busy`]).
const BUSY: &str = "busy";

/// Most inodes kept for one content (the object and `.1` to `.63`).
pub const MAX_ALTERNATES: usize = 63;

/// The content hash an object name stands for.
fn hash_of(name: &str) -> Option<Hash> {
    Hash::from_hex(name.split('.').next().unwrap_or_default())
}

/// The content hash and alternate number of an object name (`<hex>`: 0, `<hex>.<n>`: n).
fn split_name(name: &str) -> Option<(Hash, usize)> {
    let (hex, n) = match name.split_once('.') {
        None => (name, 0),
        Some((hex, n)) => (hex, n.parse::<usize>().ok().filter(|n| (1..=MAX_ALTERNATES).contains(n))?),
    };
    Some((Hash::from_hex(hex)?, n))
}

fn alternate(hex: &str, n: usize) -> String {
    if n == 0 {
        hex.to_owned()
    } else {
        format!("{hex}.{n}")
    }
}

/// The store's state alone, without opening the store (its object index is not read): for the
/// daemon's checks before each pass. Missing or damaged: the default.
pub fn read_state(state: &StateDir) -> State {
    read_state_in(&state.store())
}

/// Writes the state of an existing store (see [`read_state`]).
pub fn write_state(state: &StateDir, s: &State) -> io::Result<()> {
    write_state_in(&state.store(), s)
}

fn read_state_in(dir: &Path) -> State {
    std::fs::read(dir.join("state.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write_state_in(dir: &Path, s: &State) -> io::Result<()> {
    fsops::write_replacing(&dir.join("state.json"), &serde_json::to_vec_pretty(s).expect("plain struct"))
}

impl Store {
    /// Opens (creating it if need be) the store of `root` in `state_dir` for a pass that holds
    /// the root's lock. If a pass or prefetch was interrupted (its [`BUSY`] marker is still
    /// there), removes the temp files it left and releases the objects it linked into the root
    /// ([`Store::release_lent`]); otherwise the objects are not even listed.
    pub fn open(state: &StateDir, read: &throttle::Limiter) -> io::Result<Store> {
        let s = Store::open_unlocked(state)?;
        if s.dir.join(BUSY).exists() {
            for name in s.names()? {
                if fsops::is_temp_name(name.as_bytes()) {
                    let _ = rustix::fs::unlinkat(&s.objects, name.as_str(), AtFlags::empty());
                }
            }
            s.release(s.names()?, 0);
            // Old content the pass kept but did not live to stamp: read and hashed now, then
            // kept (or removed, if it does not match its name).
            let mut found = 0;
            for name in s.names()? {
                let Some((h, _)) = split_name(&name) else { continue };
                if !s.stamps.lock().expect("store lock").contains_key(&name) && s.verify_name(&name, &h, read)? {
                    s.note(&name, true);
                    found += 1;
                }
            }
            if found > 0 {
                tracing::info!(objects = found, store = %s.dir.display(), "local store: old content an interrupted pass kept was verified and is kept");
                s.flush()?;
            }
        }
        Ok(s)
    }

    /// Marks the store as being written or lent from, until [`Store::release_lent`]: a pass
    /// killed before that leaves the marker, and the next [`Store::open`] cleans up after it.
    pub fn mark_busy(&self) -> io::Result<()> {
        if self.busy.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        std::fs::File::create(self.dir.join(BUSY)).map(drop)
    }

    /// Opens the store without changing anything in it (`syncd status`, which takes no lock).
    pub fn open_unlocked(state: &StateDir) -> io::Result<Store> {
        let dir = state.store();
        std::fs::DirBuilder::new().recursive(true).create(dir.join("objects"))?;
        // Root only: the store holds old versions of setuid programs (kept for a rollback),
        // which no other user may reach to run.
        {
            use std::os::unix::fs::PermissionsExt;
            if std::fs::metadata(&dir)?.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        std::fs::DirBuilder::new().recursive(true).create(dir.join("manifests"))?;
        let objects =
            rustix::fs::open(dir.join("objects"), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let dev = rustix::fs::fstat(&objects)?.st_dev;
        let stamps: HashMap<String, Stamp> = std::fs::read(dir.join("objects.idx"))
            .ok()
            .and_then(|b| serde_json::from_slice::<HashMap<String, Stamp>>(&b).ok())
            .map(|m| m.into_iter().filter(|(k, _)| split_name(k).is_some()).collect())
            .unwrap_or_default();
        let mut alts: HashMap<Hash, u64> = HashMap::new();
        for k in stamps.keys() {
            if let Some((h, n)) = split_name(k) {
                *alts.entry(h).or_default() |= 1 << n;
            }
        }
        let s = Store {
            dir,
            objects,
            dev,
            stamps: Mutex::new(stamps),
            alts: Mutex::new(alts),
            used: Mutex::new(HashSet::new()),
            placed: Mutex::new(Vec::new()),
            unstamped: Mutex::new(Vec::new()),
            checked: Mutex::new(HashMap::new()),
            next_alternate: Mutex::new(HashMap::new()),
            kept_inodes: Mutex::new(HashSet::new()),
            busy: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn dev(&self) -> u64 {
        self.dev
    }

    fn names(&self) -> io::Result<Vec<String>> {
        Ok(std::fs::read_dir(self.dir.join("objects"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    pub fn state(&self) -> State {
        read_state_in(&self.dir)
    }

    pub fn save_state(&self, s: &State) -> io::Result<()> {
        write_state_in(&self.dir, s)
    }

    /// Whether the store has an object for `hash` (not yet verified: see [`Store::verify`]).
    pub fn has(&self, hash: &Hash) -> bool {
        self.alts.lock().expect("store lock").get(hash).is_some_and(|b| *b != 0)
    }

    /// The names of the inodes the store has for `hash`, `<hex>` first.
    fn names_of(&self, hash: &Hash) -> Vec<String> {
        let bits = self.alts.lock().expect("store lock").get(hash).copied().unwrap_or(0);
        if bits == 0 {
            return Vec::new();
        }
        let hex = hash.to_hex();
        (0..=MAX_ALTERNATES).filter(|n| bits & (1 << n) != 0).map(|n| alternate(&hex, n)).collect()
    }

    /// Records that the object `name` is in the store, or no longer is.
    fn note(&self, name: &str, present: bool) {
        let Some((h, n)) = split_name(name) else { return };
        let mut alts = self.alts.lock().expect("store lock");
        let bits = alts.entry(h).or_default();
        match present {
            true => *bits |= 1 << n,
            false => *bits &= !(1 << n),
        }
        if *bits == 0 {
            alts.remove(&h);
        }
    }

    /// [`Store::verify`] of each of `hashes`, on one thread per core (a commit checks every
    /// object before it changes anything): those the store cannot vouch for, in order.
    pub fn missing(&self, hashes: &[Hash], read: &throttle::Limiter) -> Vec<Hash> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4).min(hashes.len() / 256).max(1);
        let part = |hs: &[Hash]| -> Vec<Hash> {
            hs.iter().filter(|h| !self.verify(h, read).unwrap_or(false)).copied().collect()
        };
        if threads == 1 {
            return part(hashes);
        }
        std::thread::scope(|scope| {
            let per = hashes.len().div_ceil(threads);
            let handles: Vec<_> = hashes.chunks(per).map(|c| (c, scope.spawn(move || part(c)))).collect();
            handles.into_iter().flat_map(|(c, h)| h.join().unwrap_or_else(|_| c.to_vec())).collect()
        })
    }

    /// Checks that the store has an inode with the content `hash`: as when verified, else read
    /// and hashed again. A missing or damaged object is forgotten (and removed): if no other
    /// inode of that content holds, `Ok(false)`.
    pub fn verify(&self, hash: &Hash, read: &throttle::Limiter) -> io::Result<bool> {
        for name in self.names_of(hash) {
            if self.verify_name(&name, hash, read)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Store::verify`] of the object `name` (`<hex>` or `<hex>.<n>`).
    fn verify_name(&self, name: &str, hash: &Hash, read: &throttle::Limiter) -> io::Result<bool> {
        self.checked_stat(name, hash, read).map(|st| st.is_some())
    }

    /// [`Store::verify_name`], with the object's `stat` when it holds. Once per pass: the
    /// store is the pass's own (root only, under the root's lock) until it ends.
    fn checked_stat(&self, name: &str, hash: &Hash, read: &throttle::Limiter) -> io::Result<Option<rustix::fs::Stat>> {
        if let Some(st) = self.checked.lock().expect("store lock").get(name) {
            return Ok(Some(*st));
        }
        let st = self.verify_uncached(name, hash, read)?;
        if let Some(st) = st {
            self.checked.lock().expect("store lock").insert(name.to_owned(), st);
        }
        Ok(st)
    }

    fn verify_uncached(
        &self,
        name: &str,
        hash: &Hash,
        read: &throttle::Limiter,
    ) -> io::Result<Option<rustix::fs::Stat>> {
        let st = match rustix::fs::statat(&self.objects, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                self.forget(name);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let recorded = self.stamps.lock().expect("store lock").get(name).copied();
        if recorded.is_some_and(|r| r.holds_for(&st)) {
            return Ok(Some(st));
        }
        tracing::debug!(object = %name, recorded = recorded.is_some(), "local store: object changed since verified, or never stamped: hashing it again");
        let f = fsops::open_regular(self.objects.as_fd(), name)?;
        let mut h = blake3::Hasher::new();
        manifest::scan::for_each_read(throttle::Throttled::new(&f, read), |b| {
            h.update(b);
            Ok(())
        })?;
        if Hash(*h.finalize().as_bytes()) == *hash {
            let st = rustix::fs::fstat(&f)?;
            self.stamps.lock().expect("store lock").insert(name.to_owned(), stamp_of(&st));
            return Ok(Some(st));
        }
        tracing::warn!(object = %name, store = %self.dir.display(), "a local store object no longer matches its hash: removed, never used");
        let _ = rustix::fs::unlinkat(&self.objects, name, AtFlags::empty());
        self.forget(name);
        Ok(None)
    }

    fn forget(&self, name: &str) {
        self.stamps.lock().expect("store lock").remove(name);
        self.checked.lock().expect("store lock").remove(name);
        self.note(name, false);
    }

    /// Hard-links the (verified) object for `hash` under a fresh temp name in `dir`, the first
    /// time this pass asks for it, and says what of `meta` the inode still lacks. `Ok(None)`:
    /// not here, already lent once this pass, or on another filesystem; the caller copies
    /// instead.
    pub fn link_into(
        &self,
        hash: &Hash,
        meta: &manifest::Meta,
        dir: &OwnedFd,
        read: &throttle::Limiter,
    ) -> io::Result<Option<Lent>> {
        let Some((name, stamp, st)) = self.choose(hash, read)? else { return Ok(None) };
        match fsops::link_temp(self.objects.as_fd(), name.as_bytes(), dir.as_fd()) {
            Ok(temp) => {
                self.used.lock().expect("store lock").insert(name.clone());
                let needs = needs_of(&stamp, &st, meta);
                Ok(Some(Lent { temp, object: name, needs, shared: st.st_nlink > 1 }))
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The first verified, unlent inode for `hash` (`<hex>`, then `<hex>.<n>`), marking the
    /// store busy.
    fn choose(&self, hash: &Hash, read: &throttle::Limiter) -> io::Result<Option<(String, Stamp, rustix::fs::Stat)>> {
        for name in self.names_of(hash) {
            if self.used.lock().expect("store lock").contains(&name) {
                continue;
            }
            let Some(st) = self.checked_stat(&name, hash, read)? else { continue };
            self.mark_busy()?;
            // (Stamped by the check, if it was not.)
            let Some(stamp) = self.stamps.lock().expect("store lock").get(&name).copied() else { continue };
            return Ok(Some((name, stamp, st)));
        }
        Ok(None)
    }

    /// An object lent by [`Store::link_into`] is now at its path in the root:
    /// [`Store::release_lent`] removes it from the store without looking.
    pub fn placed(&self, object: &str) {
        self.placed.lock().expect("store lock").push(object.to_owned());
    }

    /// The (verified) object for `hash`, opened for a copy.
    pub fn open_object(&self, hash: &Hash, read: &throttle::Limiter) -> io::Result<std::fs::File> {
        for name in self.names_of(hash) {
            if self.verify_name(&name, hash, read)? {
                return fsops::open_regular(self.objects.as_fd(), name.as_str());
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, format!("object {hash} is not in the local store")))
    }

    /// Writes a new object for `hash` of `size` bytes with `fill`, verified against the hash as
    /// it is written; it becomes visible only once complete. Not yet durable: see
    /// [`Store::sync`].
    pub fn add(
        &self,
        hash: &Hash,
        size: u64,
        meta: Option<&manifest::Meta>,
        write: &throttle::Limiter,
        fill: impl FnOnce(&mut fsops::VerifyingWriter) -> io::Result<()>,
    ) -> io::Result<()> {
        self.add_as(0, hash, size, meta, write, fill)
    }

    /// Whether the store has the `n`th inode for `hash` (`<hex>.<n>`; the object itself for 0).
    pub fn has_alternate(&self, hash: &Hash, n: usize) -> bool {
        self.alts.lock().expect("store lock").get(hash).is_some_and(|b| b & (1 << n) != 0)
    }

    /// Another inode of the (verified) object for `hash`, `<hex>.<n>` (`0 < n <=
    /// MAX_ALTERNATES`), with `meta`: a commit that puts this content at several paths (each
    /// its own inode) links them all instead of copying.
    pub fn add_alternate(
        &self,
        hash: &Hash,
        n: usize,
        size: u64,
        meta: &manifest::Meta,
        read: &throttle::Limiter,
        write: &throttle::Limiter,
    ) -> io::Result<()> {
        if n == 0 || n > MAX_ALTERNATES {
            return Err(io::Error::other(format!("no alternate {n} for an object")));
        }
        let src = self.open_object(hash, read)?;
        self.add_as(n, hash, size, Some(meta), write, |w| {
            fsops::copy(throttle::Throttled::new(&src, read), w).map(|_| ())
        })
    }

    fn add_as(
        &self,
        n: usize,
        hash: &Hash,
        size: u64,
        meta: Option<&manifest::Meta>,
        write: &throttle::Limiter,
        fill: impl FnOnce(&mut fsops::VerifyingWriter) -> io::Result<()>,
    ) -> io::Result<()> {
        let (file, temp) = fsops::create_temp_file(self.objects.as_fd())?;
        let r = (|| {
            let mut w = fsops::VerifyingWriter::new(&file, size, write.clone());
            if size > 0 {
                fill(&mut w)?;
            }
            w.finish(*hash)?;
            // The metadata of the first path that needs it: a commit then has none to set there.
            if let Some(m) = meta {
                fsops::set_fd_meta(file.as_fd(), m, fsops::MetaParts::ALL)?;
            }
            let name = alternate(&hash.to_hex(), n);
            rustix::fs::renameat(&self.objects, temp.as_str(), &self.objects, name.as_str())?;
            let st = rustix::fs::fstat(&file)?;
            let stamp = Stamp {
                meta: meta.map(|m| MetaMark { ctime_ns: ctime_ns(&st), xattrs: xattrs_mark(&m.xattrs) }),
                ..stamp_of(&st)
            };
            self.stamps.lock().expect("store lock").insert(name.clone(), stamp);
            self.checked.lock().expect("store lock").remove(&name);
            self.note(&name, true);
            Ok(())
        })();
        if r.is_err() {
            let _ = rustix::fs::unlinkat(&self.objects, temp.as_str(), AtFlags::empty());
        }
        r
    }

    /// Keeps the old content `hash` at `name` in `dir` (about to be replaced or deleted): a hard
    /// link to its inode (once per inode), or, across filesystems, a copy unless the store has
    /// that content.
    ///
    /// `scanned`: the inode, ctime and xattrs the pass's scan saw at `name`. If the inode is
    /// still as scanned, its xattrs are those, and the object's stamp says so (taken by the
    /// [`Store::flush`] after the commit, whose rename changes the ctime): a rollback then need
    /// not read them back.
    pub fn keep(
        &self,
        hash: &Hash,
        dir: &OwnedFd,
        name: &[u8],
        scanned: Option<(u64, i64, &manifest::Xattrs)>,
        write: &throttle::Limiter,
    ) -> io::Result<()> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let ino = st.st_ino;
        if self.kept_inodes.lock().expect("store lock").contains(&ino) {
            return Ok(());
        }
        // Killed before the pass stamps what it kept, the next open finds it again.
        self.mark_busy()?;
        let xattrs =
            scanned.filter(|(i, c, _)| *i == ino && *c as i128 == ctime_ns(&st)).map(|(_, _, x)| xattrs_mark(x));
        // One link, straight to the object's name (an existing inode, so the name never shows
        // partial content). Another path's old inode with the same content is kept too, under
        // `<hex>.<n>`, so a rollback gives each its own inode back instead of copying; so is
        // one whose content's object this pass lent or takes into the root (that name is
        // taken until the pass ends). Alternates this pass took already are not tried again
        // (a Debian root has 33 identical dpkg trigger files).
        let hex = hash.to_hex();
        let first = self.next_alternate.lock().expect("store lock").get(&hex).copied().unwrap_or(0);
        for n in first..=MAX_ALTERNATES {
            let alt = alternate(&hex, n);
            match rustix::fs::linkat(dir, name, &self.objects, alt.as_str(), AtFlags::empty()) {
                Ok(()) => {
                    self.kept_inodes.lock().expect("store lock").insert(ino);
                    self.next_alternate.lock().expect("store lock").insert(hex, n + 1);
                    self.unstamped.lock().expect("store lock").push((alt, xattrs));
                    return Ok(());
                }
                Err(Errno::EXIST) => {
                    // Verified on use, like any object; the same inode is kept already.
                    let same = rustix::fs::statat(&self.objects, alt.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| st.st_ino == ino);
                    if same {
                        return Ok(());
                    }
                }
                Err(Errno::XDEV) => {
                    if self.has(hash) {
                        return Ok(());
                    }
                    let (src, size) = fsops::open_regular_sized(dir.as_fd(), name)?;
                    return self.add(hash, size, None, write, |w| fsops::copy(&src, w).map(|_| ()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// At the end of a pass: removes every object it lent whose link was renamed into place
    /// ([`Store::placed`]), and every other lent object that shares its inode with another
    /// name, which is a root file (with the [`BUSY`] marker of an interrupted pass: every such
    /// object); then stamps what the pass kept. The root holds that content now, and a root file must not share its
    /// inode with the store: the next scan would see a name outside the root and replace the
    /// file again, and a change of its metadata in place would change the store's copy. (A
    /// later commit keeps it again, as old content, if it replaces the file.) An object whose
    /// staged link was removed again (a pass rolled back, a rename that failed) has one name,
    /// and stays. Then the marker goes.
    pub fn release_lent(&self) {
        let placed = std::mem::take(&mut *self.placed.lock().expect("store lock"));
        let mut used = std::mem::take(&mut *self.used.lock().expect("store lock"));
        let mut released = 0;
        for name in &placed {
            if used.remove(name) {
                let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
                self.forget(name);
                released += 1;
            }
        }
        self.release(used.into_iter().collect(), released);
    }

    /// Removes the objects of `names` that share their inode with another name (see
    /// [`Store::release_lent`]), saves the index if these or `released` others went, then
    /// removes the [`BUSY`] marker.
    fn release(&self, names: Vec<String>, mut released: usize) {
        for name in names {
            if hash_of(&name).is_none() {
                continue;
            }
            let shared = rustix::fs::statat(&self.objects, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| st.st_nlink > 1);
            if shared {
                let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
                self.forget(&name);
                released += 1;
            }
        }
        if released > 0 || !self.unstamped.lock().expect("store lock").is_empty() {
            if let Err(e) = self.flush() {
                tracing::warn!(store = %self.dir.display(), "cannot save the local store's index: {e}");
            }
        }
        let _ = std::fs::remove_file(self.dir.join(BUSY));
        self.busy.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Makes every object durable (one `syncfs` of the store's filesystem).
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&self.objects)?)
    }

    /// Stamps the objects kept this pass and saves the stamps.
    pub fn flush(&self) -> io::Result<()> {
        let kept = std::mem::take(&mut *self.unstamped.lock().expect("store lock"));
        let mut stamps = self.stamps.lock().expect("store lock");
        for (name, xattrs) in kept {
            if let Ok(st) = rustix::fs::statat(&self.objects, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                let meta = xattrs.map(|x| MetaMark { ctime_ns: ctime_ns(&st), xattrs: x });
                if let Some((h, n)) = split_name(&name) {
                    *self.alts.lock().expect("store lock").entry(h).or_default() |= 1 << n;
                }
                stamps.insert(name, Stamp { meta, ..stamp_of(&st) });
            }
        }
        let bytes = serde_json::to_vec(&*stamps).expect("plain map");
        drop(stamps);
        fsops::write_replacing(&self.dir.join("objects.idx"), &bytes)
    }

    fn manifest_path(&self, identity: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{identity}.bin"))
    }

    pub fn has_manifest(&self, identity: &Hash) -> bool {
        self.manifest_path(&identity.to_hex()).exists()
    }

    /// Keeps `m` (with the master's exclusion lists for this host) as the manifest of
    /// `identity`: a hard link to `cached` (the manifest cache file, if it holds that identity),
    /// else written anew.
    pub fn save_manifest(
        &self,
        identity: &Hash,
        m: Option<&Manifest>,
        cached: Option<&Path>,
        lists: &[exclusions::PatternList],
        write: &throttle::Limiter,
    ) -> io::Result<()> {
        let hex = identity.to_hex();
        let path = self.manifest_path(&hex);
        let lists: Vec<(String, Vec<(usize, String)>)> =
            lists.iter().map(|l| (l.source.clone(), l.patterns.clone())).collect();
        let lists = serde_json::to_vec(&lists).expect("plain data");
        let lists_path = path.with_extension("lists.json");
        // Every converged pass comes here: an unchanged file is not written again.
        if std::fs::read(&lists_path).ok().as_ref() != Some(&lists) {
            fsops::write_replacing(&lists_path, &lists)?;
        }
        if path.exists() {
            return Ok(());
        }
        if let Some(c) = cached.filter(|c| crate::mcache::peek_identity(c) == Some(*identity)) {
            let tmp = path.with_extension("link");
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(c, &tmp).and_then(|()| std::fs::rename(&tmp, &path)).is_ok() {
                return Ok(());
            }
        }
        match m {
            Some(m) => crate::mcache::save(&path, m, identity, write),
            None => Err(io::Error::other(format!("no manifest of {hex} to keep"))),
        }
    }

    /// The manifest of `identity` and its exclusion lists, checked against the identity.
    pub fn load_manifest(
        &self,
        identity: &Hash,
        read: &throttle::Limiter,
    ) -> Result<(Manifest, Vec<exclusions::PatternList>), crate::mcache::LoadError> {
        use crate::mcache::LoadError;
        let path = self.manifest_path(&identity.to_hex());
        let m = crate::mcache::load(&path, identity, read)?;
        let lists_path = path.with_extension("lists.json");
        let bytes =
            std::fs::read(&lists_path).map_err(|source| LoadError::Lists { path: lists_path.clone(), source })?;
        let lists: Vec<(String, Vec<(usize, String)>)> = serde_json::from_slice(&bytes)
            .map_err(|source| LoadError::ListsDamaged { path: lists_path.clone(), source })?;
        Ok((m, lists.into_iter().map(|(source, patterns)| exclusions::PatternList { source, patterns }).collect()))
    }

    /// Makes `to` (the manifest cache) hold the kept manifest of `identity`: a hard link,
    /// renamed over it (the cache is only ever replaced whole, never written in place).
    pub fn link_manifest_to(&self, identity: &Hash, to: &Path) -> io::Result<()> {
        let tmp = to.with_extension("link");
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(self.manifest_path(&identity.to_hex()), &tmp)?;
        std::fs::rename(&tmp, to)
    }

    /// Removes every object no manifest of `keep` names, and the manifests not in `keep`.
    /// Returns the objects removed.
    pub fn gc(&self, keep: &[Hash], read: &throttle::Limiter) -> io::Result<usize> {
        let mut wanted: HashSet<Hash> = HashSet::new();
        for id in keep {
            match self.load_manifest(id, read) {
                Ok((m, _)) => wanted.extend(m.entries.iter().filter_map(|e| e.hash)),
                // Its content cannot be told: keep everything rather than guess.
                Err(e) => {
                    tracing::warn!("local store: {}; nothing removed this time", crate::error::chain(&e));
                    return Ok(0);
                }
            }
        }
        let mut removed = 0;
        for name in self.names()? {
            let Some(h) = hash_of(&name) else { continue };
            if !wanted.contains(&h) {
                let _ = rustix::fs::unlinkat(&self.objects, name.as_str(), AtFlags::empty());
                self.forget(&name);
                removed += 1;
            }
        }
        let keep_hex: HashSet<String> = keep.iter().map(|h| h.to_hex()).collect();
        for e in std::fs::read_dir(self.dir.join("manifests"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or_default();
            if !keep_hex.contains(id) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.flush()?;
        Ok(removed)
    }

    /// The store's size: bytes of objects only the store holds (old content, prefetched
    /// content), and of objects shared with the root (linked into it: no extra room).
    pub fn usage(&self) -> (u64, u64) {
        let (mut own, mut shared) = (0, 0);
        for name in self.names().unwrap_or_default() {
            if let Ok(st) = rustix::fs::statat(&self.objects, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                let bytes = st.st_blocks as u64 * 512;
                if st.st_nlink > 1 {
                    shared += bytes;
                } else {
                    own += bytes;
                }
            }
        }
        (own, shared)
    }
}

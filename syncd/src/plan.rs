//! The Plan: what it takes to make the host tree identical to the manifest, as pure data.
//!
//! [`Plan::compute`] merges the sorted manifest with the sorted host scan and does no I/O. The
//! dry run prints a Plan, the real run executes the same Plan and prints the same lines for
//! what it did, so the two cannot disagree.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::fmt;

use exclusions::Exclusions;
use manifest::scan::ScannedEntry;
use manifest::{delta, Entry, Hash, Kind, Manifest, Meta, RelPath};

/// What differs between a host entry and the image entry at the same path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub content: bool,
    pub size: bool,
    pub mtime: bool,
    pub perms: bool,
    pub owner: bool,
    pub group: bool,
    pub xattrs: bool,
    pub target: bool,
    pub rdev: bool,
    /// Not (or no longer) the same inode as its hard-link group's leader, or sharing an inode
    /// with a path it should not.
    pub link: bool,
}

impl Diff {
    pub fn any(&self) -> bool {
        *self != Diff::default()
    }

    /// Differences in the metadata every kind shares.
    pub fn of_meta(old: &Meta, new: &Meta) -> Diff {
        Diff {
            mtime: (old.mtime_sec, old.mtime_nsec) != (new.mtime_sec, new.mtime_nsec),
            perms: old.mode != new.mode,
            owner: old.uid != new.uid,
            group: old.gid != new.gid,
            xattrs: old.xattrs != new.xattrs,
            ..Diff::default()
        }
    }

    /// Whether the entry must be built anew (staged and renamed over the old one) rather than
    /// having its metadata changed in place.
    pub fn needs_new_inode(&self) -> bool {
        self.content || self.size || self.target || self.rdev || self.link
    }
}

/// Where a new regular file's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Not a regular file, or an empty one: nothing to read.
    Nothing,
    /// Downloaded from the master (once per distinct hash per pass).
    Fetch(Hash),
    /// Copied from a host file that already holds this content (verified while copying).
    Local(RelPath, Hash),
    /// A hard link to the group's leader, once the leader is in place.
    Link(RelPath),
    /// A temp file an interrupted pass left at this path, whose content hashed to what is
    /// needed: verified again, then renamed into place instead of fetching or copying anything.
    Resume(RelPath, Hash),
}

#[derive(Clone, Debug)]
pub enum Op {
    /// Nothing is at the path on the host.
    Create { new: Entry, source: Source },
    /// Same kind on both sides; `diff` says what differs.
    Update { old: Box<ScannedEntry>, new: Entry, diff: Diff, source: Source },
    /// A different kind is on the host (for instance a symlink where the image has a directory).
    Replace { old: Box<ScannedEntry>, new: Entry, source: Source },
    /// On the host only.
    Delete { old: Box<ScannedEntry> },
}

#[derive(Clone, Debug)]
pub struct Change {
    pub path: RelPath,
    pub op: Op,
}

/// A path the plan leaves alone, and why.
#[derive(Clone, Debug)]
pub struct Skip {
    pub path: RelPath,
    pub reason: SkipReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Another filesystem is mounted here on the host.
    MountPoint,
    /// Beneath a host mount point.
    BeneathMountPoint(RelPath),
    /// Beneath a host directory that could not be read; its true state is unknown.
    Unreadable(RelPath),
    /// Removing or replacing it would remove this excluded host path with it.
    HoldsExcluded(RelPath),
    /// A filesystem is mounted beneath it on the host, so it cannot be removed or replaced.
    HoldsMountPoint(RelPath),
}

impl SkipReason {
    /// Whether this skip leaves the host short of the image in a way the operator must fix
    /// (as opposed to a mount point or an exclusion doing its job).
    pub fn is_failure(&self) -> bool {
        matches!(self, SkipReason::Unreadable(_) | SkipReason::HoldsMountPoint(_))
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::MountPoint => {
                f.write_str("a filesystem is mounted here on the host; syncd never crosses mount points")
            }
            SkipReason::BeneathMountPoint(p) => write!(f, "beneath {p}, where a filesystem is mounted on the host"),
            SkipReason::HoldsMountPoint(p) => {
                write!(f, "a filesystem is mounted at /{p} beneath it; syncd never removes across a mount point")
            }
            SkipReason::HoldsExcluded(p) => write!(f, "it holds excluded path /{p}, which must not be removed"),
            SkipReason::Unreadable(p) => write!(f, "host directory {p} could not be read, so its contents are unknown"),
        }
    }
}

/// The host tree as scanned: the input [`Plan::compute`] needs besides the manifest.
#[derive(Debug, Default)]
pub struct HostTree {
    pub root: Meta,
    /// Sorted by path.
    pub entries: Vec<ScannedEntry>,
    /// Directories whose listing failed.
    pub unreadable: Vec<RelPath>,
    /// Paths the exclusions kept the scan from reading, with whether each is a directory.
    pub excluded: Vec<(RelPath, bool)>,
}

/// The smallest object a seed is recorded for: the smallest chunk threshold a master takes.
pub const SEED_MIN: u64 = 256 << 10;

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub image_version: u64,
    /// Regular files of the host walk, and those whose hash the host index gave (not read).
    pub host_files: u64,
    pub index_hits: u64,
    /// In path order.
    pub changes: Vec<Change>,
    /// Metadata of the root directory itself, when it differs.
    pub root: Option<(Meta, Meta, Diff)>,
    pub skipped: Vec<Skip>,
    /// Distinct objects to download, in the order the apply first needs them.
    pub fetch: Vec<(Hash, u64)>,
    /// One per `fetch`: the host file (path and content hash) the master may send that object
    /// as a delta against, chosen as [`manifest::delta`] says. Empty when no object has one
    /// (a cold sync): a million `None`s would cost 48 MB.
    pub fetch_bases: Vec<Option<(RelPath, Hash)>>,
    /// One per `fetch`, for an object of at least [`SEED_MIN`] bytes: the host file an update
    /// replaces, or else the gone file most like it by name (as for delta bases, any size), to
    /// reuse the chunks of when the object is stored as chunks (see `client::chunked`). Empty
    /// when no object has one.
    pub fetch_seeds: Vec<Option<RelPath>>,
    /// The bases of objects too large for a per-object delta (over
    /// [`manifest::delta::MAX_DELTA_BYTES`]) that a solid delta may have used, chosen as
    /// [`manifest::delta::choose_large`] says: offered to the solid delta only.
    pub solid_bases: Vec<(RelPath, Hash)>,
    /// Content that more than one change needs: the apply remembers where it put the first
    /// copy of these (and only these) to copy it locally for the others.
    pub reused: HashSet<Hash>,
    /// Paths of the image or the host left alone because an exclusion rule covers them (the
    /// contents of an excluded host directory are never read, so it counts once).
    pub excluded: usize,
    /// Temp entries an interrupted pass left behind and this pass cannot reuse: removed before
    /// anything is staged, so repeated crashes never hold more than one pass's worth of
    /// staged data. (The reusable ones are [`Source::Resume`] sources.)
    pub leftovers: Vec<Leftover>,
}

/// A temp entry of an earlier pass (its name is syncd's, see [`crate::hostfs::fsops::is_temp_name`]).
#[derive(Clone, Debug)]
pub struct Leftover {
    pub path: RelPath,
    pub kind: Kind,
    /// Bytes it holds (regular files only).
    pub size: u64,
}

/// Whether a host entry is a leftover of an interrupted pass: some component of its path is
/// a syncd temp name, and the image has no entry there.
fn is_leftover(path: &RelPath) -> bool {
    path.components().any(crate::hostfs::fsops::is_temp_name)
}

/// Paths that must not be touched: mount points, and whatever lies beneath a mount point or
/// beneath a directory that could not be listed.
struct Fences<'a>(Vec<(&'a RelPath, bool)>);

impl<'a> Fences<'a> {
    fn of(host: &'a HostTree) -> Fences<'a> {
        let mut f: Vec<(&RelPath, bool)> = host.unreadable.iter().map(|p| (p, false)).collect();
        f.extend(host.entries.iter().filter(|h| h.mount_point).map(|h| (&h.entry.path, true)));
        Fences(f)
    }

    /// Why `p` must be left alone, if it must.
    fn reason(&self, p: &RelPath) -> Option<SkipReason> {
        self.0.iter().find_map(|&(f, mount)| match (p == f, p.is_within(f), mount) {
            (true, _, true) => Some(SkipReason::MountPoint),
            (false, true, true) => Some(SkipReason::BeneathMountPoint(f.clone())),
            (false, true, false) => Some(SkipReason::Unreadable(f.clone())),
            _ => None,
        })
    }
}

/// What the merge left alone for an exclusion: the tops of excluded directories, and every
/// excluded path.
struct Excluded {
    dirs: Vec<RelPath>,
    paths: HashSet<RelPath>,
}

impl Plan {
    /// The plan that takes `host` to `manifest`, leaving alone what `rules` exclude. Four
    /// steps: [`Plan::merge`] the two sorted listings into changes (fencing off excluded and
    /// unreachable paths), [`Plan::keep_holding_dirs`], [`Plan::schedule_leftovers`] of an
    /// interrupted pass, and [`Plan::schedule_fetches`] with their delta bases and chunk seeds.
    pub fn compute(manifest: &Manifest, host: &HostTree, rules: &Exclusions) -> Plan {
        let mut plan = Plan { image_version: manifest.version, ..Plan::default() };
        let root_diff = Diff::of_meta(&host.root, &manifest.root);
        if root_diff.any() {
            plan.root = Some((host.root.clone(), manifest.root.clone(), root_diff));
        }
        let fences = Fences::of(host);
        let excluded = plan.merge(manifest, host, rules, &fences);
        plan.excluded = excluded.paths.len();
        plan.keep_holding_dirs(host);
        plan.schedule_leftovers(manifest, host, &fences, &excluded);
        plan.schedule_fetches();
        plan
    }

    /// Merges the two sorted listings into changes, each with the source of its content.
    /// Exclusions are decided top-down in path order, so an excluded directory's whole subtree
    /// follows it; a path counts as a directory if it is one on either side, so a
    /// directory-only rule protects a host directory the image would turn into a file. Paths
    /// behind a fence are skipped.
    fn merge(&mut self, manifest: &Manifest, host: &HostTree, rules: &Exclusions, fences: &Fences) -> Excluded {
        // syncd's own temp entries are not the host's: they are resumed or removed, never
        // compared (nor reported as drift). One the image itself has is an ordinary entry.
        let leftover = |h: &ScannedEntry| is_leftover(&h.entry.path) && manifest.get(&h.entry.path).is_none();
        // Host content available for local copies (built on first need: a pass with nothing
        // to fetch never builds it).
        let local = LocalContent { entries: &host.entries, leftover: &leftover, map: std::cell::OnceCell::new() };
        let host_links = host_link_sets(&host.entries, &leftover);
        let leaders = manifest.link_leaders();
        let host_excluded: HashMap<&RelPath, bool> = host.excluded.iter().map(|(p, d)| (p, *d)).collect();
        let mut excluded_dirs: Vec<RelPath> = Vec::new();
        let mut excluded: HashSet<RelPath> = host.excluded.iter().map(|(p, _)| p.clone()).collect();

        // Leaders whose inode is replaced: their members must be linked again.
        let mut fresh_leaders: HashSet<u32> = HashSet::new();
        let mut mi = manifest.entries.iter().peekable();
        let mut hi = host.entries.iter().filter(|h| !leftover(h)).peekable();
        loop {
            let (new, old) = match (mi.peek(), hi.peek()) {
                (None, None) => break,
                (Some(m), Some(h)) if m.path == h.entry.path => (mi.next(), hi.next()),
                (Some(m), Some(h)) if m.path < h.entry.path => (mi.next(), None),
                (Some(_), None) => (mi.next(), None),
                _ => (None, hi.next()),
            };
            let path = new.map(|n| &n.path).or(old.map(|o| &o.entry.path)).expect("one side is present");
            let is_dir = new.is_some_and(|n| n.kind == Kind::Dir)
                || old.is_some_and(|o| o.entry.kind == Kind::Dir)
                || host_excluded.get(path) == Some(&true);
            let inside_excluded = excluded_dirs.iter().any(|d| path.is_within(d));
            if inside_excluded || host_excluded.contains_key(path) || rules.matches_self(path, is_dir).is_excluded() {
                // Only the top of an excluded subtree is recorded: everything beneath it is
                // covered by that one entry, which keeps this check short.
                if is_dir && !inside_excluded {
                    excluded_dirs.push(path.clone());
                }
                excluded.insert(path.clone());
                continue;
            }
            if let Some(reason) = fences.reason(path) {
                self.skipped.push(Skip { path: path.clone(), reason });
                continue;
            }
            let op = match (new, old) {
                (Some(new), None) => {
                    let source = plan_source(new, &leaders, &local);
                    Op::Create { new: new.clone(), source }
                }
                (None, Some(old)) => Op::Delete { old: Box::new(old.clone()) },
                (Some(new), Some(old)) if new.kind != old.entry.kind => {
                    let source = plan_source(new, &leaders, &local);
                    Op::Replace { old: Box::new(old.clone()), new: new.clone(), source }
                }
                (Some(new), Some(old)) => {
                    let mut diff = Diff::of_meta(&old.entry.meta, &new.meta);
                    if new.kind == Kind::File {
                        diff.size = old.entry.size != new.size;
                        diff.content = diff.size || old.entry.hash != new.hash;
                    }
                    diff.target = old.entry.target != new.target;
                    diff.rdev = old.entry.rdev != new.rdev;
                    diff.link = link_differs(new, old, manifest, &leaders, &host_links, &host.entries, &fresh_leaders);
                    if !diff.any() {
                        continue;
                    }
                    let source = if diff.needs_new_inode() {
                        match plan_source(new, &leaders, &local) {
                            // Same content, new inode needed (to split a hard link): copy it.
                            Source::Fetch(h) if !diff.content => Source::Local(old.entry.path.clone(), h),
                            s => s,
                        }
                    } else {
                        Source::Nothing
                    };
                    Op::Update { old: Box::new(old.clone()), new: new.clone(), diff, source }
                }
                (None, None) => unreachable!(),
            };
            if let Some(new) = op.new_entry() {
                if new.link_group != 0 && leaders.get(&new.link_group) == Some(&&new.path) && op.makes_new_inode() {
                    fresh_leaders.insert(new.link_group);
                }
            }
            self.changes.push(Change { path: path.clone(), op });
        }

        Excluded { dirs: excluded_dirs, paths: excluded }
    }

    /// Never removes a host directory that holds an excluded path or a mount point: the rmdir
    /// or the swap that replaces it would take the excluded path with it, or fail.
    fn keep_holding_dirs(&mut self, host: &HostTree) {
        let mounts: Vec<&RelPath> = host.entries.iter().filter(|h| h.mount_point).map(|h| &h.entry.path).collect();
        if !host.excluded.is_empty() || !mounts.is_empty() {
            let held_by = |c: &Change| -> Option<SkipReason> {
                match &c.op {
                    Op::Delete { old } | Op::Replace { old, .. } if old.entry.kind == Kind::Dir => {}
                    _ => return None,
                }
                let inside = |x: &RelPath| x.is_within(&c.path) && *x != c.path;
                if let Some((x, _)) = host.excluded.iter().find(|(x, _)| inside(x)) {
                    return Some(SkipReason::HoldsExcluded(x.clone()));
                }
                mounts.iter().find(|m| inside(m)).map(|m| SkipReason::HoldsMountPoint((*m).clone()))
            };
            let mut kept = Vec::with_capacity(self.changes.len());
            for c in std::mem::take(&mut self.changes) {
                match held_by(&c) {
                    Some(reason) => self.skipped.push(Skip { path: c.path, reason }),
                    None => kept.push(c),
                }
            }
            self.changes = kept;
        }
    }

    /// Leftovers of an interrupted pass: beneath a fence or an exclusion they are left alone;
    /// a temp directory goes whole, so nothing beneath it is resumed. A regular file with a
    /// single name whose content hashed to what a staged file needs is resumed; the rest is
    /// removed.
    fn schedule_leftovers(&mut self, manifest: &Manifest, host: &HostTree, fences: &Fences, excl: &Excluded) {
        let leftover = |h: &ScannedEntry| is_leftover(&h.entry.path) && manifest.get(&h.entry.path).is_none();
        let mut resumable: HashMap<Hash, Vec<&RelPath>> = HashMap::new();
        let mut top_dirs: Vec<&RelPath> = Vec::new();
        for h in host.entries.iter().filter(|h| leftover(h)) {
            let p = &h.entry.path;
            if fences.reason(p).is_some() || excl.dirs.iter().any(|d| p.is_within(d)) || excl.paths.contains(p) {
                continue;
            }
            if top_dirs.iter().any(|d| p.is_within(d)) {
                continue;
            }
            if !crate::hostfs::fsops::is_temp_name(p.file_name()) {
                continue; // beneath a temp directory the image has (edited by hand): leave it
            }
            if h.entry.kind == Kind::Dir {
                top_dirs.push(p);
            }
            match (h.entry.kind, h.entry.hash, h.nlink) {
                (Kind::File, Some(hash), 1) => resumable.entry(hash).or_default().push(p),
                _ => self.leftovers.push(Leftover { path: p.clone(), kind: h.entry.kind, size: h.entry.size }),
            }
        }
        if !resumable.is_empty() {
            for c in &mut self.changes {
                let staged_file = c.op.makes_new_inode() && c.op.new_entry().is_some_and(|n| n.kind == Kind::File);
                let source = match &mut c.op {
                    Op::Create { source, .. } | Op::Update { source, .. } | Op::Replace { source, .. } => source,
                    Op::Delete { .. } => continue,
                };
                let h = match source {
                    Source::Fetch(h) | Source::Local(_, h) if staged_file => *h,
                    _ => continue,
                };
                if let Some(p) = resumable.get_mut(&h).and_then(Vec::pop) {
                    *source = Source::Resume(p.clone(), h);
                }
            }
        }
        for (_, paths) in resumable {
            for p in paths {
                let size =
                    host.entries.binary_search_by(|h| h.entry.path.cmp(p)).map_or(0, |i| host.entries[i].entry.size);
                self.leftovers.push(Leftover { path: p.clone(), kind: Kind::File, size });
            }
        }
        self.leftovers.sort_by(|a, b| a.path.cmp(&b.path));
    }

    /// The objects to fetch, each once, in the order the apply first needs them, with the
    /// delta base and the chunk seed the host offers for each, and the bases a solid delta may
    /// use.
    fn schedule_fetches(&mut self) {
        let gone = delta::Gone::new(self.changes.iter().filter_map(|c| match &c.op {
            Op::Delete { old } | Op::Replace { old, .. } => candidate(old),
            _ => None,
        }));
        // Whether each content hash has been seen, and whether it is fetched already.
        let mut seen: HashMap<Hash, bool> = HashMap::new();
        for c in &self.changes {
            let (h, fetch) = match (c.op.source(), c.op.new_entry()) {
                (Some(Source::Fetch(h)), Some(_)) => (h, true),
                (Some(Source::Local(_, h) | Source::Resume(_, h)), Some(_)) => (h, false),
                _ => continue,
            };
            let first_fetch = match seen.entry(*h) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(fetch);
                    fetch
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    self.reused.insert(*h);
                    let first = fetch && !*o.get();
                    *o.get_mut() |= fetch;
                    first
                }
            };
            if first_fetch {
                let new = c.op.new_entry().expect("matched above");
                self.fetch.push((*h, new.size));
                let base = match &c.op {
                    // An old file at the path: it is the base or there is none (the master,
                    // seeing that file in its previous image, would not look further).
                    Op::Update { old, .. } if old.entry.kind == Kind::File => {
                        candidate(old).and_then(|b| delta::choose(&c.path, new.size, h, Some(b), &gone))
                    }
                    _ => delta::choose(&c.path, new.size, h, None, &gone),
                };
                if let Some(b) = base {
                    self.fetch_bases.resize(self.fetch.len() - 1, None);
                    self.fetch_bases.push(Some((b.path.clone(), b.hash)));
                } else {
                    let large = match &c.op {
                        Op::Update { old, .. } if old.entry.kind == Kind::File => {
                            candidate(old).and_then(|b| delta::choose_large(&c.path, new.size, h, Some(b), &gone))
                        }
                        _ => delta::choose_large(&c.path, new.size, h, None, &gone),
                    };
                    if let Some(b) = large {
                        self.solid_bases.push((b.path.clone(), b.hash));
                    }
                }
                let seed = match &c.op {
                    _ if new.size < SEED_MIN => None,
                    Op::Update { old, .. } if old.entry.kind == Kind::File => Some(c.path.clone()),
                    // A renamed file (libLLVM-15.so → libLLVM-16.so): the gone one most alike.
                    Op::Update { .. } => None,
                    _ => gone.seed_for(&c.path, SEED_MIN).map(|g| g.path.clone()),
                };
                if let Some(seed) = seed {
                    self.fetch_seeds.resize(self.fetch.len() - 1, None);
                    self.fetch_seeds.push(Some(seed));
                }
            }
        }
        if !self.fetch_bases.is_empty() {
            self.fetch_bases.resize(self.fetch.len(), None);
        }
        if !self.fetch_seeds.is_empty() {
            self.fetch_seeds.resize(self.fetch.len(), None);
        }
    }

    /// True when the host already matches (and no leftover of an interrupted pass is there).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.root.is_none() && self.leftovers.is_empty()
    }

    /// Changes that stage a new entry under a temp name before it is renamed into place.
    /// Drops from the fetch list the objects `have` says are at hand (the local store), with
    /// their delta bases and chunk seeds; returns how many were dropped.
    pub fn drop_fetches(&mut self, mut have: impl FnMut(&Hash) -> bool) -> usize {
        let before = self.fetch.len();
        let keep: Vec<bool> = self.fetch.iter().map(|(h, _)| !have(h)).collect();
        if keep.iter().all(|k| *k) {
            return 0;
        }
        let mut i = 0;
        self.fetch.retain(|_| (keep[i], i += 1).0);
        if !self.fetch_bases.is_empty() {
            i = 0;
            self.fetch_bases.retain(|_| (keep[i], i += 1).0);
        }
        if !self.fetch_seeds.is_empty() {
            i = 0;
            self.fetch_seeds.retain(|_| (keep[i], i += 1).0);
        }
        before - self.fetch.len()
    }

    pub fn staged(&self) -> impl Iterator<Item = (usize, &Change, &Entry)> {
        self.changes.iter().enumerate().filter_map(|(i, c)| {
            let new = c.op.new_entry()?;
            (new.kind != Kind::Dir && c.op.makes_new_inode()).then_some((i, c, new))
        })
    }

    /// What staging this whole plan takes on the host's filesystem: bytes (whole 4 KiB blocks
    /// for new content, a block for each new directory and long symlink) and new inodes.
    /// Resumed leftovers and hard links take no new space.
    pub fn stage_needs(&self) -> (u64, u64) {
        const BLOCK: u64 = 4096;
        let (mut bytes, mut inodes) = (0u64, 0u64);
        for c in &self.changes {
            let Some(new) = c.op.new_entry() else { continue };
            if !c.op.makes_new_inode() {
                continue;
            }
            match (new.kind, c.op.source()) {
                (_, Some(Source::Resume(..))) => {}
                (_, Some(Source::Link(_))) => {}
                (Kind::File, _) => {
                    bytes += new.size.div_ceil(BLOCK) * BLOCK;
                    inodes += 1;
                }
                (Kind::Dir, _) => {
                    bytes += BLOCK;
                    inodes += 1;
                }
                // A symlink target over 60 bytes does not fit in the inode (ext4).
                (Kind::Symlink, _) if new.target.as_ref().is_some_and(|t| t.len() > 60) => {
                    bytes += BLOCK;
                    inodes += 1;
                }
                _ => inodes += 1,
            }
        }
        (bytes, inodes)
    }

    /// Bytes the leftovers to be removed hold (freed before staging begins).
    pub fn leftover_bytes(&self) -> u64 {
        self.leftovers.iter().map(|l| l.size.div_ceil(4096) * 4096).sum()
    }

    pub fn fetch_bytes(&self) -> u64 {
        self.fetch.iter().map(|(_, n)| n).sum()
    }

    /// Counts of creates, updates (incl. type changes) and deletes among the changes `pick`
    /// selects by index.
    pub fn counts_where(&self, pick: impl Fn(usize) -> bool) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for ch in self.changes.iter().enumerate().filter(|(i, _)| pick(*i)).map(|(_, ch)| ch) {
            match ch.op {
                Op::Create { .. } => c.0 += 1,
                Op::Update { .. } | Op::Replace { .. } => c.1 += 1,
                Op::Delete { .. } => c.2 += 1,
            }
        }
        c
    }

    /// The itemized line for the root directory's own metadata, if it changes.
    pub fn root_line(&self) -> Option<String> {
        self.root.as_ref().map(|(_, _, d)| format!("{} ./", itemize_update(Kind::Dir, '.', d)))
    }
}

impl Op {
    pub fn new_entry(&self) -> Option<&Entry> {
        match self {
            Op::Create { new, .. } | Op::Update { new, .. } | Op::Replace { new, .. } => Some(new),
            Op::Delete { .. } => None,
        }
    }

    pub fn old_entry(&self) -> Option<&ScannedEntry> {
        match self {
            Op::Update { old, .. } | Op::Replace { old, .. } | Op::Delete { old } => Some(old),
            Op::Create { .. } => None,
        }
    }

    pub fn source(&self) -> Option<&Source> {
        match self {
            Op::Create { source, .. } | Op::Update { source, .. } | Op::Replace { source, .. } => Some(source),
            Op::Delete { .. } => None,
        }
    }

    /// Whether this op puts a new inode at the path (as opposed to editing metadata in place).
    pub fn makes_new_inode(&self) -> bool {
        match self {
            Op::Create { .. } | Op::Replace { .. } => true,
            Op::Update { diff, .. } => diff.needs_new_inode(),
            Op::Delete { .. } => false,
        }
    }
}

/// A hashed host regular file, as a delta base.
fn candidate(old: &ScannedEntry) -> Option<delta::Candidate<'_>> {
    match (old.entry.kind, old.entry.hash) {
        (Kind::File, Some(hash)) => Some(delta::Candidate { path: &old.entry.path, size: old.entry.size, hash }),
        _ => None,
    }
}

/// Host content available for local copies: hash -> a path holding it, built on first use.
struct LocalContent<'a, F> {
    entries: &'a [ScannedEntry],
    /// Leftovers are resumed or removed, never copied from.
    leftover: &'a F,
    map: std::cell::OnceCell<HashMap<Hash, &'a RelPath>>,
}

impl<'a, F: Fn(&ScannedEntry) -> bool> LocalContent<'a, F> {
    fn get(&self, hash: &Hash) -> Option<&'a RelPath> {
        let map = self.map.get_or_init(|| {
            let mut m = HashMap::new();
            for h in self.entries.iter().filter(|h| !(self.leftover)(h)) {
                if let (Kind::File, Some(hash)) = (h.entry.kind, h.entry.hash) {
                    m.entry(hash).or_insert(&h.entry.path);
                }
            }
            m
        });
        map.get(hash).copied()
    }
}

fn plan_source<F: Fn(&ScannedEntry) -> bool>(
    new: &Entry,
    leaders: &HashMap<u32, &RelPath>,
    local: &LocalContent<F>,
) -> Source {
    if new.link_group != 0 {
        if let Some(&leader) = leaders.get(&new.link_group) {
            if *leader != new.path {
                return Source::Link(leader.clone());
            }
        }
    }
    match (new.kind, new.hash) {
        (Kind::File, Some(h)) if new.size > 0 => match local.get(&h) {
            Some(p) => Source::Local(p.clone(), h),
            None => Source::Fetch(h),
        },
        _ => Source::Nothing,
    }
}

/// For every host inode with several names in the tree: the set of its names. A leftover hard
/// link of an interrupted pass is not one of them: it is removed before anything is staged.
fn host_link_sets<'a>(
    entries: &'a [ScannedEntry],
    leftover: &impl Fn(&ScannedEntry) -> bool,
) -> HashMap<(u64, u64), Vec<&'a RelPath>> {
    let mut m: HashMap<(u64, u64), Vec<&RelPath>> = HashMap::new();
    for e in entries.iter().filter(|e| e.nlink > 1 && e.entry.kind != Kind::Dir && !leftover(e)) {
        m.entry((e.dev, e.ino)).or_default().push(&e.entry.path);
    }
    m.retain(|_, v| v.len() > 1);
    m
}

fn link_differs(
    new: &Entry,
    old: &ScannedEntry,
    manifest: &Manifest,
    leaders: &HashMap<u32, &RelPath>,
    host_links: &HashMap<(u64, u64), Vec<&RelPath>>,
    host: &[ScannedEntry],
    fresh_leaders: &HashSet<u32>,
) -> bool {
    // An inode with names the scan did not see (outside the root, or excluded) must never be
    // changed in place: that would change those files too. It gets a fresh inode instead.
    if old.nlink > 1 && new.kind != Kind::Dir {
        let seen = host_links.get(&(old.dev, old.ino)).map_or(1, Vec::len) as u64;
        let nlink = u64::from(old.nlink);
        if nlink > seen {
            return true;
        }
    }
    // Names sharing this host inode must all belong to the same image group.
    if let Some(names) = host_links.get(&(old.dev, old.ino)) {
        let foreign = names.iter().any(|n| {
            *n != &new.path && (new.link_group == 0 || manifest.get(n).is_none_or(|e| e.link_group != new.link_group))
        });
        if foreign {
            return true;
        }
    }
    if new.link_group == 0 {
        return false;
    }
    let Some(&leader) = leaders.get(&new.link_group) else { return false };
    if *leader == new.path {
        return false;
    }
    if fresh_leaders.contains(&new.link_group) {
        return true;
    }
    // The host entries are sorted by path.
    match host.binary_search_by(|h| h.entry.path.cmp(leader)) {
        Ok(i) => (host[i].dev, host[i].ino) != (old.dev, old.ino),
        Err(_) => true,
    }
}

/// rsync's `YXcstpoguax` item string for an entry that exists on both sides.
fn itemize_update(kind: Kind, y: char, d: &Diff) -> String {
    let f = |b: bool, c: char| if b { c } else { '.' };
    let c = if kind == Kind::Symlink { d.target } else { d.content || d.rdev };
    [
        y,
        kind.itemize_char(),
        f(c, 'c'),
        f(d.size, 's'),
        f(d.mtime, 't'),
        f(d.perms, 'p'),
        f(d.owner, 'o'),
        f(d.group, 'g'),
        '.',
        '.',
        f(d.xattrs, 'x'),
    ]
    .iter()
    .collect()
}

fn display_name(e: &Entry) -> String {
    if e.kind == Kind::Dir {
        format!("{}/", e.path)
    } else if let Some(t) = &e.target {
        format!("{} -> {}", e.path, manifest::escape_bytes(t))
    } else {
        e.path.to_string()
    }
}

impl Change {
    /// The `rsync -i`-style line for this change, e.g. `>f+++++++++ usr/bin/foo`,
    /// `.f...p..... etc/x`, `*deleting   etc/old`.
    pub fn itemize(&self) -> String {
        match &self.op {
            Op::Delete { old } => {
                let slash = if old.entry.kind == Kind::Dir { "/" } else { "" };
                format!("*deleting   {}{slash}", self.path)
            }
            Op::Create { new, source } | Op::Replace { new, source, .. } => {
                let y = match (source, new.kind) {
                    (Source::Link(_), _) => 'h',
                    (_, Kind::File) => '>',
                    _ => 'c',
                };
                let mut line = format!("{y}{}+++++++++ {}", new.kind.itemize_char(), display_name(new));
                if let Source::Link(leader) = source {
                    line = format!("{line} => {leader}");
                }
                if let Op::Replace { old, .. } = &self.op {
                    line = format!("{line} (replaces {})", old.entry.kind.name());
                }
                line
            }
            Op::Update { new, diff, source, .. } => {
                let y = match source {
                    Source::Link(_) => 'h',
                    _ if new.kind == Kind::File && diff.needs_new_inode() => '>',
                    _ if diff.needs_new_inode() => 'c',
                    _ => '.',
                };
                let mut line = format!("{} {}", itemize_update(new.kind, y, diff), display_name(new));
                if let Source::Link(leader) = source {
                    line = format!("{line} => {leader}");
                }
                line
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind, content: &[u8]) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind,
            meta: Meta { mode: 0o644, ..Meta::default() },
            size: if kind == Kind::File { content.len() as u64 } else { 0 },
            hash: (kind == Kind::File).then(|| Hash::of(content)),
            target: (kind == Kind::Symlink).then(|| content.into()),
            rdev: 0,
            link_group: 0,
            sparse: false,
        }
    }

    fn host(e: Entry, ino: u64) -> ScannedEntry {
        ScannedEntry { entry: e, dev: 1, ino, nlink: 1, ctime_ns: 0, mount_point: false }
    }

    fn lines(p: &Plan) -> Vec<String> {
        p.changes.iter().map(|c| c.itemize()).collect()
    }

    #[test]
    fn creates_updates_deletes_itemized_like_rsync() {
        let m = Manifest::new(
            7,
            Meta::default(),
            vec![
                entry("etc", Kind::Dir, b""),
                entry("etc/new", Kind::File, b"new"),
                entry("etc/x", Kind::File, b"same"),
                entry("etc/y", Kind::File, b"changed!"),
                entry("link", Kind::Symlink, b"etc/x"),
            ],
        )
        .unwrap();
        let mut x = entry("etc/x", Kind::File, b"same");
        x.meta.mode = 0o600;
        let host_tree = HostTree {
            root: Meta::default(),
            entries: vec![
                host(entry("etc", Kind::Dir, b""), 1),
                host(entry("etc/old", Kind::File, b"old"), 2),
                host(x, 3),
                host(entry("etc/y", Kind::File, b"original"), 4),
                host(entry("link", Kind::Dir, b""), 5),
            ],
            unreadable: vec![],
            excluded: vec![],
        };
        let plan = Plan::compute(&m, &host_tree, &Exclusions::default());
        assert_eq!(
            lines(&plan),
            [
                ">f+++++++++ etc/new",
                "*deleting   etc/old",
                ".f...p..... etc/x",
                ">fc........ etc/y",
                "cL+++++++++ link -> etc/x (replaces directory)",
            ]
        );
        assert_eq!(plan.fetch.len(), 2);
        assert_eq!(plan.image_version, 7);
    }

    #[test]
    fn leftovers_of_an_interrupted_pass_are_resumed_or_removed_never_drift() {
        let m = Manifest::new(
            1,
            Meta::default(),
            vec![entry("etc", Kind::Dir, b""), entry("etc/a", Kind::File, b"wanted"), entry("etc/b", Kind::File, b"x")],
        )
        .unwrap();
        let mut linked = host(entry("etc/.syncd-00000000000000bb", Kind::File, b"x"), 9);
        linked.nlink = 2;
        let mut h = HostTree {
            root: Meta::default(),
            entries: vec![
                host(entry("etc", Kind::Dir, b""), 1),
                // Verified content the pass needs, under a temp name: resumed.
                host(entry("etc/.syncd-00000000000000aa", Kind::File, b"wanted"), 2),
                // A hard link (to etc/b, say): never reused, its name removed.
                linked,
                host(entry("etc/.syncd-00000000000000cc", Kind::File, b"stale"), 3),
                host(entry("etc/.syncd-00000000000000dd", Kind::Dir, b""), 4),
                host(entry("etc/.syncd-00000000000000dd/.syncd-00000000000000ee", Kind::File, b"wanted"), 5),
                host(entry("etc/b", Kind::File, b"x"), 9),
                // Not syncd's name: an ordinary extra entry.
                host(entry("etc/.syncd-notours", Kind::File, b"y"), 6),
            ],
            unreadable: vec![],
            excluded: vec![],
        };
        h.entries.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
        let plan = Plan::compute(&m, &h, &Exclusions::default());
        assert_eq!(lines(&plan), ["*deleting   etc/.syncd-notours", ">f+++++++++ etc/a"]);
        assert!(
            matches!(plan.changes[1].op.source(), Some(Source::Resume(p, _)) if p.to_string() == "etc/.syncd-00000000000000aa")
        );
        assert!(plan.fetch.is_empty(), "resumed content is not fetched");
        let removed: Vec<String> = plan.leftovers.iter().map(|l| l.path.to_string()).collect();
        assert_eq!(
            removed,
            ["etc/.syncd-00000000000000bb", "etc/.syncd-00000000000000cc", "etc/.syncd-00000000000000dd"]
        );
        assert_eq!(plan.stage_needs(), (0, 0), "a resumed file needs no new room");
    }

    #[test]
    fn identical_trees_make_an_empty_plan() {
        let m = Manifest::new(1, Meta::default(), vec![entry("a", Kind::File, b"x")]).unwrap();
        let h = HostTree {
            root: Meta::default(),
            entries: vec![host(entry("a", Kind::File, b"x"), 1)],
            unreadable: vec![],
            excluded: vec![],
        };
        assert!(Plan::compute(&m, &h, &Exclusions::default()).is_empty());
    }

    #[test]
    fn moved_content_is_copied_locally_not_fetched() {
        let m = Manifest::new(1, Meta::default(), vec![entry("b", Kind::File, b"payload")]).unwrap();
        let h = HostTree {
            root: Meta::default(),
            entries: vec![host(entry("a", Kind::File, b"payload"), 1)],
            unreadable: vec![],
            excluded: vec![],
        };
        let plan = Plan::compute(&m, &h, &Exclusions::default());
        assert!(plan.fetch.is_empty());
        assert!(matches!(plan.changes[1].op.source(), Some(Source::Local(p, _)) if p.to_string() == "a"));
        assert_eq!(lines(&plan), ["*deleting   a", ">f+++++++++ b"]);
    }

    #[test]
    fn mount_points_and_their_contents_are_skipped() {
        let m =
            Manifest::new(1, Meta::default(), vec![entry("proc", Kind::Dir, b""), entry("proc/x", Kind::File, b"x")])
                .unwrap();
        let mut p = host(entry("proc", Kind::Dir, b""), 1);
        p.mount_point = true;
        p.entry.meta.mode = 0o555;
        let plan = Plan::compute(
            &m,
            &HostTree { root: Meta::default(), entries: vec![p], ..HostTree::default() },
            &Exclusions::default(),
        );
        assert!(plan.changes.is_empty(), "{:?}", lines(&plan));
        assert_eq!(plan.skipped.len(), 2);
    }

    #[test]
    fn hard_link_members_follow_a_replaced_leader() {
        let mut a = entry("a", Kind::File, b"v2");
        a.link_group = 1;
        let mut b = entry("b", Kind::File, b"v2");
        b.link_group = 1;
        let m = Manifest::new(1, Meta::default(), vec![a, b]).unwrap();
        let mut ha = host(entry("a", Kind::File, b"v1"), 9);
        ha.nlink = 2;
        let mut hb = host(entry("b", Kind::File, b"v1"), 9);
        hb.nlink = 2;
        let plan = Plan::compute(
            &m,
            &HostTree { root: Meta::default(), entries: vec![ha, hb], ..HostTree::default() },
            &Exclusions::default(),
        );
        assert_eq!(lines(&plan), [">fc........ a", "hfc........ b => a"]);
    }
}

#[cfg(test)]
mod exclusion_tests {
    use super::*;
    use exclusions::PatternList;

    fn e(path: &str, kind: Kind, content: &[u8]) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind,
            meta: Meta::default(),
            size: if kind == Kind::File { content.len() as u64 } else { 0 },
            hash: (kind == Kind::File).then(|| Hash::of(content)),
            target: None,
            rdev: 0,
            link_group: 0,
            sparse: false,
        }
    }

    fn h(entry: Entry) -> ScannedEntry {
        ScannedEntry { entry, dev: 1, ino: 1, nlink: 1, ctime_ns: 0, mount_point: false }
    }

    fn rules(text: &str) -> Exclusions {
        Exclusions::compile([&PatternList::parse("local", text)]).unwrap()
    }

    #[test]
    fn excluded_paths_are_never_created_changed_or_deleted_only_counted() {
        let m = Manifest::new(
            1,
            Meta::default(),
            vec![e("etc", Kind::Dir, b""), e("etc/hostname", Kind::File, b"golden"), e("etc/new", Kind::File, b"n")],
        )
        .unwrap();
        let host = HostTree {
            entries: vec![
                h(e("etc", Kind::Dir, b"")),
                h(e("etc/hostname", Kind::File, b"mine")),
                h(e("etc/local", Kind::File, b"x")),
            ],
            ..HostTree::default()
        };
        let plan = Plan::compute(&m, &host, &rules("/etc/hostname\n/etc/local\n/etc/new\n"));
        assert!(plan.changes.is_empty(), "{:?}", plan.changes);
        assert_eq!(plan.excluded, 3);
    }

    #[test]
    fn an_excluded_directory_covers_its_whole_subtree_on_both_sides() {
        let m = Manifest::new(1, Meta::default(), vec![e("ssh", Kind::Dir, b""), e("ssh/key", Kind::File, b"golden")])
            .unwrap();
        // The host scan never entered ssh/: it only knows it is there and excluded.
        let host = HostTree { excluded: vec![(RelPath::new("ssh").unwrap(), true)], ..HostTree::default() };
        let plan = Plan::compute(&m, &host, &rules("/ssh/\n"));
        assert!(plan.changes.is_empty(), "{:?}", plan.changes);
        assert_eq!(plan.excluded, 2);
    }

    #[test]
    fn a_directory_only_rule_protects_a_host_directory_the_image_makes_a_file() {
        let m = Manifest::new(1, Meta::default(), vec![e("cache", Kind::File, b"f")]).unwrap();
        let host = HostTree { excluded: vec![(RelPath::new("cache").unwrap(), true)], ..HostTree::default() };
        let plan = Plan::compute(&m, &host, &rules("cache/\n"));
        assert!(plan.changes.is_empty(), "{:?}", plan.changes);
    }

    #[test]
    fn a_host_directory_holding_an_excluded_path_is_not_removed() {
        let m = Manifest::new(1, Meta::default(), vec![]).unwrap();
        let host = HostTree {
            entries: vec![h(e("srv", Kind::Dir, b"")), h(e("srv/junk", Kind::File, b"j"))],
            excluded: vec![(RelPath::new("srv/keep").unwrap(), false)],
            ..HostTree::default()
        };
        let plan = Plan::compute(&m, &host, &rules("/srv/keep\n"));
        let lines: Vec<String> = plan.changes.iter().map(|c| c.itemize()).collect();
        assert_eq!(lines, ["*deleting   srv/junk"]);
        assert_eq!(plan.skipped.len(), 1);
        assert_eq!(plan.skipped[0].reason, SkipReason::HoldsExcluded(RelPath::new("srv/keep").unwrap()));
    }
}

//! What the apply takes and gives: how to stage, the failures kept as data, the counts, and
//! where a single object comes from when the stream's copy failed.

use manifest::{Hash, RelPath};

use crate::fetch::ObjectStream;

/// How a pass stages its content before committing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Staging {
    /// Stage everything, then commit in one short phase; a failure while staging leaves the
    /// root as it was. Needs room for all new content at once.
    #[default]
    Whole,
    /// Commit batch by batch as content is staged (at most 2,048 files or 256 MiB each).
    Batches,
}

impl std::str::FromStr for Staging {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "whole" => Ok(Staging::Whole),
            "batches" => Ok(Staging::Batches),
            other => Err(format!("unknown staging mode {other:?} (expected \"whole\" or \"batches\")")),
        }
    }
}

/// One thing a pass could not do, kept as data: where, what, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: FailedAt,
    pub kind: FailureKind,
    /// Why, for people: what was not done and the error.
    pub error: String,
}

/// Where a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailedAt {
    /// An entry of the tree, relative to the root.
    Entry(RelPath),
    /// No one entry: the pass as a whole, on the root's filesystem (a halt, a flush, a
    /// roll-back that left temp entries).
    Root(std::path::PathBuf),
    /// A file outside the tree: a host path the scan could not read, or a state file.
    File(std::path::PathBuf),
}

impl std::fmt::Display for FailedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailedAt::Entry(p) => write!(f, "{p}"),
            FailedAt::Root(p) | FailedAt::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What could not be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The host path could not be read.
    Scan,
    /// Left alone: a mount point, beneath one, or beneath an unreadable directory.
    LeftAlone,
    /// A temp entry of an interrupted pass could not be removed.
    Leftover,
    /// A directory could not be made.
    Directory,
    /// New content could not be staged (written, verified, flushed) or linked.
    Stage,
    /// Not made because something it depends on failed (a link's leader, a symlink's target,
    /// a parent directory).
    HeldBack,
    /// The staged entry could not be renamed or swapped into place.
    Commit,
    /// Metadata could not be changed in place.
    Metadata,
    /// The entry could not be deleted.
    Delete,
    /// A directory's metadata could not be set after the pass.
    DirectoryMetadata,
    /// The pass as a whole (staging stopped, a flush failed, deletions held back).
    Pass,
    /// A state file could not be written.
    State,
}

#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    pub wire_bytes: u64,
    /// Fetched objects that came as deltas against the host's old version.
    pub delta_objects: u64,
    /// Set when objects were fetched from an object store (its URL); then the counts below.
    pub store_url: Option<String>,
    /// Objects from the store, verified.
    pub store_objects: u64,
    /// Objects from the master, verified (after a store failure, or re-fetched).
    pub master_objects: u64,
    /// Of those, the ones the store failed to give (error, missing, deadline).
    pub store_fallback_objects: u64,
    /// Objects from the store whose content did not match their hash, fetched again.
    pub store_refused: u64,
    /// Objects the store gave as chunks, their chunks reused from the host's old version of
    /// the file and fetched, the bytes of those fetched (as stored) and of the chunk indexes.
    pub store_chunked_objects: u64,
    pub store_chunks_reused: u64,
    pub store_chunks_fetched: u64,
    pub store_chunk_bytes: u64,
    pub store_index_bytes: u64,
    /// GETs sent to the store, the bytes it sent, and the objects cut from ranges of packs.
    pub store_gets: u64,
    pub store_bytes: u64,
    pub store_packed: u64,
    /// Of the objects from the store, those decoded out of its solid delta.
    pub solid_objects: u64,
    pub local_copies: u64,
    pub local_bytes: u64,
    /// Temp files of an interrupted pass renamed into place instead of fetched again.
    pub resumed: u64,
    /// Leftovers of an interrupted pass removed.
    pub leftovers_removed: u64,
    /// True if the object stream broke (master gone mid-pass).
    pub master_lost: bool,
    /// True if a stop request cut the pass short.
    pub cancelled: bool,
    /// True if staging stopped because the filesystem ran out of space (or quota).
    pub no_space: bool,
    /// Files staged as hard links to local store objects (prefetched or kept content).
    pub store_links: u64,
    /// Files copied from local store objects (a second path with the same content, or the
    /// store on another filesystem).
    pub store_copies: u64,
    /// Old files kept in the local store before the commit replaced or deleted them, and
    /// those that could not be kept (a later local rollback needs the master for them).
    pub kept_old: u64,
    pub keep_failed: u64,
}

/// What the apply did: which plan changes succeeded, and the failures.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<bool>,
    pub root_done: bool,
    pub failures: Vec<Failure>,
    pub stats: ApplyStats,
    /// Whole-tree staging did not complete: everything it staged was removed and nothing was
    /// committed, so the root is as it was before the pass.
    pub rolled_back: bool,
    /// Changes not made because other content failed: deletions, symlinks to content that
    /// failed, hard links to a leader that failed.
    pub held_back: usize,
}

/// Where the apply gets one object on its own, when the copy the stream gave (or the local
/// store's) failed: the master, in a pass that reaches it. The apply knows nothing else of
/// the network.
pub trait ContentSource: Send {
    /// A stream of this one object (`size`: the most it may hold).
    fn fetch_one(&self, hash: Hash, size: u64) -> ObjectStream;
}

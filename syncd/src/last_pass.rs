//! The last pass's outcome, kept in the state dir (`last-pass-<root key>.json`) for
//! `syncd status`: its result word (as the master and the metrics name it), the version, when
//! it ended and its first errors. Written after every pass that may change the root (not a dry
//! run or `syncd drift`, which write nothing), atomically.

use serde::{Deserialize, Serialize};

use crate::error::SyncError;
use crate::options::SyncOptions;
use crate::report::PassReport;
use crate::state::StateDir;

/// Errors kept, at most.
const ERRORS: usize = 5;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastPass {
    /// `converged`, `partial`, `unreachable`, `render-failed`, … ([`crate::metrics::result_word`]).
    pub result: String,
    /// The image version of the pass (0 when it failed before a manifest was accepted).
    pub version: u64,
    pub ended_unix: u64,
    /// The pass's error, or its first failed paths (`PATH: error`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl LastPass {
    pub fn of(r: &Result<PassReport, SyncError>, ended_unix: u64) -> LastPass {
        let (version, errors) = match r {
            Ok(rep) => {
                (rep.image_version, rep.failures().take(ERRORS).map(|f| format!("{}: {}", f.at, f.error)).collect())
            }
            Err(e) => (0, vec![e.report()]),
        };
        LastPass { result: crate::metrics::result_word(r).to_owned(), version, ended_unix, errors }
    }
}

/// Records `r` in the state dir of `opts` (when one was chosen), warning on failure: the pass
/// itself is not failed for it.
pub fn record(opts: &SyncOptions, r: &Result<PassReport, SyncError>) {
    if !opts.index || opts.dry_run {
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let path = opts.state().last_pass();
    let text = serde_json::to_vec(&LastPass::of(r, now)).expect("plain struct");
    if let Err(e) = crate::hostfs::fsops::write_replacing(&path, &text) {
        tracing::warn!(path = %path.display(), "cannot record the last pass: {e}");
    }
}

/// The last pass recorded for this root, if any (a damaged record reads as none).
pub fn read(state: &StateDir) -> Option<LastPass> {
    serde_json::from_slice(&std::fs::read(state.last_pass()).ok()?).ok()
}

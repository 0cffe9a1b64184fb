//! Health checks after a pass that moved the host to a new image version (the checks
//! themselves are [`triggers::health`]), and the record that tells a new version from the one
//! the host already had.
//!
//! That record is not the trust record ([`crate::trust`]), for two reasons: the trust record
//! keeps the highest version *applied*, even in part (a partly applied v2 is already a reason
//! to refuse v1), while a host has moved to v2 only once a pass converged to it, and the checks
//! belong to that pass; and the trust record is kept only when manifests are verified, while
//! checks must also work without signatures. So this one holds the version the host last
//! converged to, written after its checks ran.

use std::path::{Path, PathBuf};

use manifest::Hash;
use serde::{Deserialize, Serialize};

use crate::{exit, PassReport, SyncOptions};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Converged {
    version: u64,
    identity: String,
}

/// Where the version `root` last converged to is kept.
pub fn record_path(state_dir: &Path, root: &Path) -> PathBuf {
    state_dir.join(format!("converged-version-{}.json", crate::root_key(root)))
}

/// The version and identity recorded at `path`. A missing record is `None`; so is a damaged
/// one, with a warning: the checks then run once more than needed, the safe side to err on.
pub fn load(path: &Path) -> Option<(u64, Hash)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the converged-version record: {e}; health checks run as for a new version");
            return None;
        }
    };
    let parsed =
        serde_json::from_str::<Converged>(&text).ok().and_then(|c| Some((c.version, Hash::from_hex(&c.identity)?)));
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "the converged-version record is damaged; health checks run as for a new version (the record is rewritten after them)");
    }
    parsed
}

/// Records `version` (`identity`) as the one the host converged to: temp file, fsync, rename,
/// fsync of the directory.
pub fn record(path: &Path, version: u64, identity: &Hash) -> Result<(), String> {
    let c = Converged { version, identity: identity.to_hex() };
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string(&c).expect("plain struct").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot record the converged version in {}: {e}", path.display()))
}

/// Runs the configured checks, in config order, if this pass moved the host to a new version:
/// it applied (not a dry run) and converged (its triggers may have failed: the report then
/// carries both), and the version differs from the one recorded, or none is. The results go
/// into `report.health`; the version is recorded once every check has run, passed or not, so
/// the next pass of the same version runs none.
pub async fn after_pass(opts: &SyncOptions, report: &mut PassReport) {
    if opts.health.is_empty() || opts.dry_run || report.outcome.is_none() {
        return;
    }
    let path = record_path(&opts.state_dir, &opts.root);
    let (version, identity) = (report.image_version, report.identity);
    let previous = load(&path);
    if previous == Some((version, identity)) {
        tracing::debug!(version, "the host was already at this version: no health checks");
        return;
    }
    let code = report.exit_code();
    if !matches!(code, exit::OK | exit::TRIGGER_FAILED) {
        tracing::warn!(
            version,
            "health checks not run: the pass did not converge to image v{version} (exit {code}); they run after the pass that does"
        );
        return;
    }
    tracing::info!(version, previous = ?previous.map(|(v, _)| v), checks = opts.health.len(), "new version: running health checks");
    let checks = opts.health.clone();
    let cancel = opts.cancel.clone();
    let stopping = move || cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    // Blocking: each check is waited for (at most its timeout and the kill grace).
    let ran = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        for c in &checks {
            // A daemon told to stop does not start another check: its shutdown would wait
            // for it. The version is then not recorded, so they all run on the next pass.
            if stopping() {
                return (results, false);
            }
            results.push(triggers::health::run(c, version));
        }
        (results, true)
    })
    .await;
    let (results, all) = match ran {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("health check task failed: {e}");
            return;
        }
    };
    report.health = results;
    if !all {
        tracing::warn!(version, "stopping: the remaining health checks were not run; they run on the next pass");
        return;
    }
    if let Err(e) = record(&path, version, &identity) {
        // Not a failure of the pass: the checks merely run again on the next one.
        tracing::warn!("{e}; the health checks will run again on the next pass");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = record_path(dir.path(), Path::new("/"));
        assert_eq!(load(&p), None);
        record(&p, 7, &Hash([3; 32])).unwrap();
        assert_eq!(load(&p), Some((7, Hash([3; 32]))));
        std::fs::write(&p, "{not json").unwrap();
        assert_eq!(load(&p), None);
    }
}

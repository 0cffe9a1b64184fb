//! The host's side of signed versions: which keys it trusts, and the highest version it has
//! applied (kept in the state dir, so a restart cannot be talked into a rollback).

use std::path::Path;

use manifest::trust::{self, PublicKey, VersionSignature};
use manifest::Hash;
use serde::{Deserialize, Serialize};

use crate::error::SyncError;

/// What this host accepts.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Keys whose signatures are accepted. Empty only with `--insecure`: nothing is verified.
    pub keys: Vec<PublicKey>,
    /// The operator's one-off override for a deliberate downgrade.
    pub allow_downgrade: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Applied {
    version: u64,
    identity: String,
    /// The render serial of files rendered for this host in that version (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    render_serial: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn load(path: &Path) -> Result<Option<(u64, Hash, u64)>, SyncError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SyncError::StateFile { path: path.to_owned(), source }),
    };
    let damaged = |why: String| SyncError::StateFileDamaged { path: path.to_owned(), why };
    let a: Applied = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
    let id = Hash::from_hex(&a.identity).ok_or_else(|| damaged("bad identity".into()))?;
    Ok(Some((a.version, id, a.render_serial)))
}

/// Checks a received manifest (version `version`, whose entries were checked to hash to
/// `identity`) before anything is read or written for it. With `binding` (files rendered for a
/// host), the signature must cover it, and it must name this host (`host_id`, when the host
/// knows its name: under mTLS the master names it by its certificate).
pub fn check(
    policy: &Policy,
    record: &Path,
    version: u64,
    identity: &Hash,
    sig: Option<&VersionSignature>,
    binding: Option<&trust::RenderBinding>,
    host_id: &str,
) -> Result<(), SyncError> {
    if policy.keys.is_empty() {
        tracing::warn!(version, "--insecure: the manifest's signature is not checked");
        return Ok(());
    }
    trust::verify_bound(&policy.keys, sig, identity, version, binding, trust::now_unix())
        .map_err(SyncError::Untrusted)?;
    if let Some(b) = binding.filter(|b| !host_id.is_empty() && b.host != host_id) {
        return Err(SyncError::Untrusted(trust::TrustError::OtherHost {
            offered: b.host.clone(),
            this: host_id.into(),
        }));
    }
    let applied = load(record)?;
    let serial = binding.map_or(0, |b| b.serial);
    trust::check_not_rollback(
        applied.as_ref().map(|(v, h, s)| (*v, h, *s)),
        version,
        identity,
        serial,
        policy.allow_downgrade,
    )
    .map_err(SyncError::Untrusted)?;
    if policy.allow_downgrade && applied.is_some_and(|(v, _, _)| v > version) {
        tracing::warn!(offered = version, "--allow-downgrade: accepting a version lower than one applied before");
    }
    Ok(())
}

/// Records version `version` (identity `identity`) as applied: later passes refuse anything older.
pub fn record(policy: &Policy, record: &Path, version: u64, identity: &Hash, render_serial: u64) -> Result<(), String> {
    if policy.keys.is_empty() {
        return Ok(());
    }
    if !policy.allow_downgrade {
        if let Ok(Some((v, _, _))) = load(record) {
            if v > version {
                return Ok(());
            }
        }
    }
    let a = Applied { version, identity: identity.to_hex(), render_serial };
    let write = || -> std::io::Result<()> {
        let dir = record.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
        let tmp = record.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string(&a).expect("plain struct").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, record)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot record the applied version in {}: {e}", record.display()))
}

//! `metrics_textfile`: what the last pass did, in the Prometheus text format, for
//! node_exporter's textfile collector (the way Puppet's `last_run_summary.yaml` is read by an
//! exporter). Written after every pass, atomically (a temp file beside it, then a rename, so the
//! collector never reads half a file). Gauges of the last pass, named by Prometheus's
//! conventions (`syncd_` prefix, unit suffixes, no path or host labels).

use std::path::Path;

use promtext::{family, gauge, Registry, Unit};

use crate::error::{exit, SyncError};
use crate::report::PassReport;

/// The pass's result as one word, as the master's fleet status shows it: one table, for the
/// master's reports and the metrics alike.
pub fn result_word(r: &Result<PassReport, SyncError>) -> &'static str {
    match r {
        Ok(rep) => match rep.exit_code() {
            exit::OK => "converged",
            exit::PARTIAL => "partial",
            exit::UNREACHABLE => "unreachable",
            exit::TRIGGER_FAILED => "trigger-failed",
            exit::HEALTH_FAILED => "health-failed",
            exit::ROLLED_BACK => "rolled-back",
            exit::NO_SPACE => "no-space",
            _ => "error",
        },
        Err(e) => match e {
            SyncError::BadManifest(_) => "rejected",
            SyncError::Untrusted(t) if t.is_stale() => "stale",
            SyncError::Untrusted(_) => "rejected",
            SyncError::Unreachable { .. } => "unreachable",
            SyncError::NoSpace { .. } | SyncError::StoreNoSpace { .. } => "no-space",
            SyncError::Render { .. } => "render-failed",
            _ => "error",
        },
    }
}

/// The text of the metrics file for the pass that ended at `ended_unix` (seconds).
pub fn render(r: &Result<PassReport, SyncError>, ended_unix: f64) -> String {
    let mut reg = Registry::with_prefix("syncd");
    promtext::build_info(&mut reg, env!("CARGO_PKG_VERSION"));
    gauge(&mut reg, "last_pass_timestamp", "When the last pass ended, Unix time", Some(Unit::Seconds), ended_unix);
    let code = match r {
        Ok(rep) => rep.exit_code() as f64,
        Err(e) => e.exit_code() as f64,
    };
    gauge(&mut reg, "last_pass_exit_code", "The last pass's exit code (see the README's exit codes)", None, code);
    family(
        &mut reg,
        "last_pass_result",
        "The last pass's result (1 for the one it had)",
        vec![(vec![("result", result_word(r).to_owned())], 1.0)],
    );
    let ok = matches!(r, Ok(rep) if rep.exit_code() == exit::OK);
    gauge(&mut reg, "last_pass_success", "1 if the last pass converged with no failure", None, ok as u8 as f64);
    if let Ok(rep) = r {
        gauge(
            &mut reg,
            "last_pass_duration",
            "How long the last pass took",
            Some(Unit::Seconds),
            rep.duration.as_secs_f64(),
        );
        gauge(&mut reg, "image_version", "The image version of the last pass", None, rep.image_version as f64);
        gauge(
            &mut reg,
            "last_pass_dry_run",
            "1 if the last pass changed nothing on purpose (drift, --dry-run)",
            None,
            rep.outcome.is_none() as u8 as f64,
        );
        let (missing, changed, extra) = rep.plan.counts_where(|_| true);
        family(
            &mut reg,
            "last_pass_drift_entries",
            "Entries that differed from the image when the last pass began, by kind",
            [("missing", missing), ("changed", changed), ("extra", extra)]
                .into_iter()
                .map(|(kind, n)| (vec![("kind", kind.to_owned())], n as f64))
                .collect(),
        );
        gauge(
            &mut reg,
            "last_pass_excluded_entries",
            "Entries left alone by an exclusion",
            None,
            rep.plan.excluded as f64,
        );
        gauge(
            &mut reg,
            "last_pass_failed_entries",
            "Paths the last pass could not bring in",
            None,
            rep.failures().count() as f64,
        );
        let s = rep.outcome.as_ref().map(|o| o.stats.clone()).unwrap_or_default();
        gauge(
            &mut reg,
            "last_pass_fetched_objects",
            "Objects fetched by the last pass",
            None,
            s.fetched_objects as f64,
        );
        gauge(
            &mut reg,
            "last_pass_fetched",
            "Content fetched by the last pass (decoded)",
            Some(Unit::Bytes),
            s.fetched_bytes as f64,
        );
        gauge(
            &mut reg,
            "last_pass_wire",
            "Bytes the last pass's fetches took on the wire",
            Some(Unit::Bytes),
            s.wire_bytes as f64,
        );
        gauge(
            &mut reg,
            "last_pass_delta_objects",
            "Objects fetched as deltas against the host's old version",
            None,
            s.delta_objects as f64,
        );
        gauge(
            &mut reg,
            "last_pass_copied",
            "Content copied from the host or the local store instead of fetched",
            Some(Unit::Bytes),
            s.local_bytes as f64,
        );
        gauge(
            &mut reg,
            "last_pass_copied_objects",
            "Objects copied from the host instead of fetched",
            None,
            s.local_copies as f64,
        );
        gauge(
            &mut reg,
            "last_pass_trigger_failures",
            "Triggers that failed in the last pass",
            None,
            rep.triggers.iter().filter(|t| !t.ok).count() as f64,
        );
        gauge(
            &mut reg,
            "last_pass_health_failures",
            "Health checks that failed after the last pass",
            None,
            rep.health.iter().filter(|h| !h.ok).count() as f64,
        );
        let (files, hits) = (rep.plan.host_files, rep.plan.index_hits);
        gauge(&mut reg, "last_pass_host_files", "Regular files the last pass found on the host", None, files as f64);
        gauge(
            &mut reg,
            "last_pass_index_hits",
            "Of those, the ones whose hash the host index gave (not read)",
            None,
            hits as f64,
        );
        if files > 0 {
            gauge(
                &mut reg,
                "last_pass_index_hit_ratio",
                "Share of the host's regular files whose hash the host index gave",
                None,
                hits as f64 / files as f64,
            );
        }
    }
    promtext::text(&reg, "syncd")
}

/// After a pass: its metrics into `path`, if one is configured; a failure is logged (the pass's
/// own result stands).
pub fn record(path: Option<&Path>, r: &Result<PassReport, SyncError>) {
    let Some(path) = path else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    if let Err(e) = crate::hostfs::fsops::write_replacing(path, render(r, now).as_bytes()) {
        tracing::warn!(path = %path.display(), "cannot write the metrics textfile: {e} (hint: metrics_textfile must name a file in a writable directory, such as node_exporter's textfile directory)");
    }
}

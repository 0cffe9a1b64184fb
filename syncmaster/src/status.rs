//! Rendering `syncmaster status`: a table for people, JSON for scripts.

use proto::v1 as pb;
use serde_json::json;

fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = ((now_ms - then_ms).max(0) / 1000) as u64;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub fn table(s: &pb::StatusReply) -> String {
    let mut out = format!("image v{} ({})\n", s.version, &hex::encode(&s.identity)[..16.min(s.identity.len() * 2)]);
    out.push_str(&format!(
        "{:<24} {:<5} {:>8} {:<10} {:>10} {:>8} {:>8} {:>6} {:<16} {}\n",
        "HOST",
        "STATE",
        "VERSION",
        "CONVERGED",
        "LAST SEEN",
        "MISSING",
        "CHANGED",
        "EXTRA",
        "RESULT",
        "FAILED TRIGGERS"
    ));
    for h in &s.hosts {
        let l = h.last.clone().unwrap_or_default();
        let version = if h.last.is_some() { format!("v{}", l.image_version) } else { "-".into() };
        out.push_str(&format!(
            "{:<24} {:<5} {:>8} {:<10} {:>10} {:>8} {:>8} {:>6} {:<16} {}\n",
            h.host_id,
            h.state,
            version,
            if h.converged { "yes" } else { "no" },
            ago(s.now_unix_ms, h.last_seen_unix_ms),
            l.missing,
            l.changed,
            l.extra,
            if h.last.is_some() { l.result.as_str() } else { "(no pass yet)" },
            l.failed_triggers.join(","),
        ));
    }
    let count = |st: &str| s.hosts.iter().filter(|h| h.state == st).count();
    out.push_str(&format!(
        "{} hosts: {} converged, {} up, {} down (>{}s), {} out (>{}s)\n",
        s.hosts.len(),
        s.hosts.iter().filter(|h| h.converged).count(),
        count("up"),
        count("down"),
        s.down_after_secs,
        count("out"),
        s.out_after_secs
    ));
    out
}

pub fn json(s: &pb::StatusReply) -> String {
    let hosts: Vec<_> = s
        .hosts
        .iter()
        .map(|h| {
            let last = h.last.as_ref().map(|l| {
                json!({
                    "image_version": l.image_version,
                    "identity": hex::encode(&l.identity),
                    "result": l.result,
                    "missing": l.missing,
                    "changed": l.changed,
                    "extra": l.extra,
                    "excluded": l.excluded,
                    "failed_paths": l.failed_paths,
                    "failed_triggers": l.failed_triggers,
                    "errors": l.errors,
                    "duration_secs": l.duration_secs,
                    "dry_run": l.dry_run,
                })
            });
            json!({
                "host_id": h.host_id,
                "state": h.state,
                "converged": h.converged,
                "connected": h.connected,
                "last_seen_unix_ms": h.last_seen_unix_ms,
                "version": h.last.as_ref().map(|l| l.image_version),
                "last_pass": last,
            })
        })
        .collect();
    let v = json!({
        "image_version": s.version,
        "identity": hex::encode(&s.identity),
        "now_unix_ms": s.now_unix_ms,
        "down_after_secs": s.down_after_secs,
        "out_after_secs": s.out_after_secs,
        "hosts": hosts,
    });
    serde_json::to_string_pretty(&v).expect("status always serializes") + "\n"
}

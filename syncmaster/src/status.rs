//! Rendering `syncmaster status`: a table for people, JSON for scripts.

use proto::v1 as pb;
use serde_json::json;

pub(crate) fn ago(now_ms: i64, then_ms: i64) -> String {
    let s = ((now_ms - then_ms).max(0) / 1000) as u64;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub fn table(s: &pb::StatusReply) -> String {
    let mut out = format!(
        "image v{} ({}), baseline v{}\n",
        s.version,
        &hex::encode(&s.identity)[..16.min(s.identity.len() * 2)],
        s.baseline_version
    );
    out.push_str(&format!(
        "{:<24} {:<5} {:>8} {:>8} {:<10} {:<10} {:>10} {:>8} {:>8} {:>6} {:<16} {}\n",
        "HOST",
        "STATE",
        "VERSION",
        "TARGET",
        "WAVE",
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
            "{:<24} {:<5} {:>8} {:>8} {:<10} {:<10} {:>10} {:>8} {:>8} {:>6} {:<16} {}\n",
            h.host_id,
            h.state,
            version,
            format!("v{}", h.target_version),
            if h.wave.is_empty() { "-" } else { h.wave.as_str() },
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
    serde_json::to_string_pretty(&json_value(s)).expect("status always serializes") + "\n"
}

/// The fleet as `syncmaster status --format json` prints it (also the fleet page's JSON).
pub fn json_value(s: &pb::StatusReply) -> serde_json::Value {
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
                    "health": l.health.iter().map(|h| json!({
                        "name": h.name,
                        "ok": h.ok,
                        "status": h.status,
                        "output_tail": h.output_tail,
                        "duration_secs": h.duration_secs,
                    })).collect::<Vec<_>>(),
                })
            });
            json!({
                "host_id": h.host_id,
                "state": h.state,
                "converged": h.converged,
                "connected": h.connected,
                "last_seen_unix_ms": h.last_seen_unix_ms,
                "version": h.last.as_ref().map(|l| l.image_version),
                "current_version": (h.current_version != 0).then_some(h.current_version),
                "target_version": h.target_version,
                "wave": (!h.wave.is_empty()).then_some(h.wave.as_str()),
                "last_pass": last,
            })
        })
        .collect();
    json!({
        "image_version": s.version,
        "identity": hex::encode(&s.identity),
        "now_unix_ms": s.now_unix_ms,
        "down_after_secs": s.down_after_secs,
        "out_after_secs": s.out_after_secs,
        "baseline_version": s.baseline_version,
        "hosts": hosts,
    })
}

pub(crate) fn when(now_ms: i64, at_ms: i64) -> String {
    if at_ms == 0 {
        "-".into()
    } else if at_ms > now_ms {
        format!("in {}s", (at_ms - now_ms + 999) / 1000)
    } else {
        ago(now_ms, at_ms)
    }
}

/// `syncmaster rollout status` for people: the rollout, each wave with its hosts, and why it
/// halted.
pub fn rollout_table(s: &pb::RolloutStatusReply) -> String {
    let mut out = String::new();
    if !s.has_policy {
        out.push_str("no [rollout] policy in the inventory: a new version goes to every host at once\n");
    }
    let Some(r) = &s.rollout else {
        out.push_str(&format!("no rollout yet; baseline v{}\n", s.baseline_version));
        return out;
    };
    out.push_str(&format!(
        "rollout #{}: v{} -> v{}, {}{}, started {}{}; baseline v{}\n",
        r.id,
        r.from_version,
        r.version,
        r.state.to_uppercase(),
        if r.in_window { "" } else { " (window closed: no new grants)" },
        ago(s.now_unix_ms, r.started_unix_ms),
        if r.ended_unix_ms != 0 { format!(", ended {}", ago(s.now_unix_ms, r.ended_unix_ms)) } else { String::new() },
        s.baseline_version
    ));
    out.push_str(&format!("{} host(s) granted, {} failure(s) counting towards a halt\n", r.granted, r.failures));
    if !r.rollback_versions.is_empty() {
        let v: Vec<String> = r.rollback_versions.iter().map(|v| format!("v{v}")).collect();
        out.push_str(&format!("rolled back: hosts moved to {} (their old trees under new numbers)\n", v.join(", ")));
    }
    if let Some(h) = &r.halt {
        let label = if r.state == "halted" { "HALTED" } else { "halted earlier" };
        out.push_str(&format!("{label} {}: {}\n", ago(s.now_unix_ms, h.at_unix_ms), h.reason));
        for f in &h.failures {
            out.push_str(&format!("  {} (wave {}): {}\n", f.host_id, f.wave, f.reason));
            if !f.check.is_empty() {
                out.push_str(&format!("    check: {}\n", f.check));
            }
            for line in f.output_tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev() {
                out.push_str(&format!("    | {line}\n"));
            }
        }
        if r.state == "halted" {
            out.push_str("  (hint: `syncmaster rollout abort` sends these hosts back; `resume` acknowledges the failures and goes on)\n");
        }
    }
    for (i, w) in r.waves.iter().enumerate() {
        let count = |st: &str| w.hosts.iter().filter(|h| h.state == st).count();
        let marker =
            if i as u32 == r.current_wave && (r.state == "running" || r.state == "paused" || r.state == "halted") {
                ">"
            } else {
                " "
            };
        out.push_str(&format!(
            "{marker} wave {i} {:<12} {:<9} {} host(s): {} succeeded, {} converged, {} in progress, {} failed, {} skipped, {} waiting (max_concurrent {}){}\n",
            w.name,
            w.state,
            w.hosts.len(),
            count("succeeded"),
            count("converged"),
            count("granted"),
            count("failed"),
            count("skipped"),
            count("waiting"),
            w.max_concurrent,
            if w.state == "soaking" { format!(", soak ends {}", when(s.now_unix_ms, w.soak_until_unix_ms)) } else { String::new() },
        ));
        for h in &w.hosts {
            let line = format!(
                "    {:<24} {:<11} {}{}",
                h.host_id,
                h.state,
                if h.granted_unix_ms != 0 {
                    format!("granted {}", ago(s.now_unix_ms, h.granted_unix_ms))
                } else {
                    String::new()
                },
                if h.reason.is_empty() { String::new() } else { format!("  {}", h.reason) },
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}

pub fn rollout_json(s: &pb::RolloutStatusReply) -> String {
    serde_json::to_string_pretty(&rollout_json_value(s)).expect("status always serializes") + "\n"
}

/// The rollout as `syncmaster rollout status --format json` prints it (also in the fleet
/// page's JSON).
pub fn rollout_json_value(s: &pb::RolloutStatusReply) -> serde_json::Value {
    let r = s.rollout.as_ref().map(|r| {
        json!({
            "id": r.id,
            "version": r.version,
            "from_version": r.from_version,
            "state": r.state,
            "started_unix_ms": r.started_unix_ms,
            "ended_unix_ms": (r.ended_unix_ms != 0).then_some(r.ended_unix_ms),
            "current_wave": r.current_wave,
            "in_window": r.in_window,
            "granted": r.granted,
            "failures": r.failures,
            "rollback_versions": r.rollback_versions,
            "halt": r.halt.as_ref().map(|h| json!({
                "reason": h.reason,
                "at_unix_ms": h.at_unix_ms,
                "failures": h.failures.iter().map(|f| json!({
                    "host_id": f.host_id,
                    "wave": f.wave,
                    "reason": f.reason,
                    "check": f.check,
                    "output_tail": f.output_tail,
                    "at_unix_ms": f.at_unix_ms,
                })).collect::<Vec<_>>(),
            })),
            "waves": r.waves.iter().map(|w| json!({
                "name": w.name,
                "state": w.state,
                "max_concurrent": w.max_concurrent,
                "soak_until_unix_ms": (w.soak_until_unix_ms != 0).then_some(w.soak_until_unix_ms),
                "hosts": w.hosts.iter().map(|h| json!({
                    "host_id": h.host_id,
                    "state": h.state,
                    "granted_unix_ms": (h.granted_unix_ms != 0).then_some(h.granted_unix_ms),
                    "reason": h.reason,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "has_policy": s.has_policy,
        "baseline_version": s.baseline_version,
        "now_unix_ms": s.now_unix_ms,
        "rollout": r,
    })
}

/// `syncmaster rollout log`: one line an event, or JSON lines.
pub fn events(evs: &[pb::RolloutEvent], json_lines: bool) -> String {
    let mut out = String::new();
    for e in evs {
        if json_lines {
            let v = json!({
                "id": e.id,
                "at_unix_ms": e.at_unix_ms,
                "rollout": e.rollout_id,
                "kind": e.kind,
                "host_id": e.host_id,
                "version": e.version,
                "wave": (e.wave >= 0).then_some(e.wave),
                "detail": e.detail,
                "caller": e.caller,
            });
            out.push_str(&v.to_string());
            out.push('\n');
        } else {
            out.push_str(&format!(
                "{:>6} {} {:<4} {:<5} {:<15} {:<20} {}{}\n",
                e.id,
                manifest::units::format_utc_ms(e.at_unix_ms),
                if e.rollout_id == 0 { "-".to_owned() } else { format!("#{}", e.rollout_id) },
                if e.version == 0 { "-".to_owned() } else { format!("v{}", e.version) },
                e.kind,
                if e.host_id.is_empty() { "-" } else { e.host_id.as_str() },
                e.detail,
                if e.caller.is_empty() { String::new() } else { format!(" (by {})", e.caller) },
            ));
        }
    }
    out
}

/// systemd's `STATUS=` line for the master: `serving v3; 12 hosts: 11 up, 1 down, 0 out, 10
/// converged; rollout of v3: wave 2/3 running`.
pub fn notify_line(control: &crate::control::Control) -> String {
    let f = control.fleet_status();
    let n = |state: &str| f.hosts.iter().filter(|h| h.state == state).count();
    let mut line = format!(
        "serving v{}; {} hosts: {} up, {} down, {} out, {} converged",
        f.version,
        f.hosts.len(),
        n("up"),
        n("down"),
        n("out"),
        f.hosts.iter().filter(|h| h.converged).count()
    );
    if let Some(r) = control.rollout_status().rollout {
        line.push_str(&format!(
            "; rollout of v{}: wave {}/{} {}",
            r.version,
            (r.current_wave as usize + 1).min(r.waves.len().max(1)),
            r.waves.len(),
            r.state
        ));
    }
    line
}

//! What the master knows about each host: its last pass report, when it was last seen, and
//! whether it is watching for versions now. `down` and `out` follow Ceph: a host not seen for a
//! while is down; one not seen for much longer is out.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::v1 as pb;

#[derive(Default)]
struct Record {
    last: Option<pb::PassResult>,
    /// When `last` arrived.
    last_at_ms: i64,
    last_seen_ms: i64,
    /// Open Watch streams from this host.
    watching: u32,
    /// The version of its last converged, non-dry-run pass.
    current_version: u64,
}

/// One host as [`Fleet::snapshot`] saw it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub last: Option<pb::PassResult>,
    pub last_at_ms: i64,
    pub up: bool,
}

/// What the rollout state says of a host, for its status row.
pub struct TargetInfo {
    pub version: u64,
    pub identity: Vec<u8>,
    pub wave: String,
}

pub struct Fleet {
    hosts: Mutex<BTreeMap<String, Record>>,
    pub down_after: Duration,
    pub out_after: Duration,
    /// When this master started: for `down_after` after it, a host known from before the
    /// restart counts as up (it has not had the time to reconnect yet).
    started_ms: i64,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Fleet {
    pub fn new(down_after: Duration, out_after: Duration) -> Fleet {
        Fleet { hosts: Mutex::new(BTreeMap::new()), down_after, out_after, started_ms: now_ms() }
    }

    fn with<T>(&self, host: &str, f: impl FnOnce(&mut Record) -> T) -> T {
        let mut h = self.hosts.lock().expect("fleet lock");
        let r = h.entry(host.to_owned()).or_default();
        r.last_seen_ms = now_ms();
        f(r)
    }

    pub fn seen(&self, host: &str) {
        if !host.is_empty() {
            self.with(host, |_| ());
        }
    }

    /// Records a host's pass report; returns when it arrived.
    pub fn report(&self, r: pb::PassResult) -> i64 {
        let host = r.host_id.clone();
        self.with(&host, |rec| {
            if r.result == "converged" && !r.dry_run {
                rec.current_version = r.image_version;
            }
            rec.last = Some(r);
            rec.last_at_ms = rec.last_seen_ms;
            rec.last_at_ms
        })
    }

    /// A report kept from before a restart: the host was last seen when it arrived.
    pub fn restore(&self, r: pb::PassResult, at_ms: i64) {
        let mut h = self.hosts.lock().expect("fleet lock");
        let rec = h.entry(r.host_id.clone()).or_default();
        rec.last_seen_ms = rec.last_seen_ms.max(at_ms);
        rec.last_at_ms = at_ms;
        if r.result == "converged" && !r.dry_run {
            rec.current_version = r.image_version;
        }
        rec.last = Some(r);
    }

    fn is_up_at(&self, r: &Record, now: i64) -> bool {
        let within = |t: i64| Duration::from_millis((now - t).max(0) as u64) < self.down_after;
        r.watching > 0 || within(r.last_seen_ms) || within(self.started_ms)
    }

    /// Every host's last report, when it arrived, and whether the host is up now.
    pub fn snapshot(&self) -> BTreeMap<String, Snapshot> {
        let now = now_ms();
        let hosts = self.hosts.lock().expect("fleet lock");
        hosts
            .iter()
            .map(|(id, r)| {
                (id.clone(), Snapshot { last: r.last.clone(), last_at_ms: r.last_at_ms, up: self.is_up_at(r, now) })
            })
            .collect()
    }

    pub fn watching(&self, host: &str, delta: i32) {
        self.with(host, |r| r.watching = r.watching.saturating_add_signed(delta));
    }

    /// The fleet's rows. `version`/`identity` are the newest published image; `target_of` says
    /// what each host should be on, and `converged` is judged against that.
    pub fn status(
        &self,
        version: u64,
        identity: &[u8],
        baseline: u64,
        target_of: impl Fn(&str) -> TargetInfo,
    ) -> pb::StatusReply {
        let now = now_ms();
        let hosts = self.hosts.lock().expect("fleet lock");
        let hosts = hosts
            .iter()
            .map(|(id, r)| {
                let age = Duration::from_millis((now - r.last_seen_ms).max(0) as u64);
                let target = target_of(id);
                let state = if self.is_up_at(r, now) {
                    "up"
                } else if age < self.out_after {
                    "down"
                } else {
                    "out"
                };
                let converged = r.last.as_ref().is_some_and(|l| {
                    l.result == "converged"
                        && !l.dry_run
                        && l.image_version == target.version
                        && l.identity.as_ref() == target.identity.as_slice()
                });
                pb::HostStatus {
                    host_id: id.clone(),
                    state: state.into(),
                    converged,
                    last_seen_unix_ms: r.last_seen_ms,
                    last: r.last.clone(),
                    connected: r.watching > 0,
                    target_version: target.version,
                    current_version: r.current_version,
                    wave: target.wave,
                }
            })
            .collect();
        pb::StatusReply {
            version,
            identity: identity.to_vec().into(),
            now_unix_ms: now,
            hosts,
            down_after_secs: self.down_after.as_secs(),
            out_after_secs: self.out_after.as_secs(),
            baseline_version: baseline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_known_from_before_a_restart_count_as_up_until_they_could_have_reconnected() {
        let fleet = Fleet::new(Duration::from_secs(120), Duration::from_secs(3600));
        let old = pb::PassResult { host_id: "web01".into(), result: "converged".into(), ..Default::default() };
        fleet.restore(old, now_ms() - 3_600_000);
        let s = fleet.snapshot();
        assert!(s["web01"].up, "a master that just started cannot know web01 is down");
        assert_eq!(s["web01"].last_at_ms, s["web01"].last_at_ms);
        let late =
            Fleet { started_ms: now_ms() - 121_000, ..Fleet::new(Duration::from_secs(120), Duration::from_secs(3600)) };
        let old = pb::PassResult { host_id: "web01".into(), ..Default::default() };
        late.restore(old, now_ms() - 3_600_000);
        assert!(!late.snapshot()["web01"].up, "once down_after has passed since the start, it is down");
    }
}

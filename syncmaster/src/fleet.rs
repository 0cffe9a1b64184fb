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
    last_seen_ms: i64,
    /// Open Watch streams from this host.
    watching: u32,
}

pub struct Fleet {
    hosts: Mutex<BTreeMap<String, Record>>,
    pub down_after: Duration,
    pub out_after: Duration,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Fleet {
    pub fn new(down_after: Duration, out_after: Duration) -> Fleet {
        Fleet { hosts: Mutex::new(BTreeMap::new()), down_after, out_after }
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

    pub fn report(&self, r: pb::PassResult) {
        let host = r.host_id.clone();
        self.with(&host, |rec| rec.last = Some(r));
    }

    pub fn watching(&self, host: &str, delta: i32) {
        self.with(host, |r| r.watching = r.watching.saturating_add_signed(delta));
    }

    pub fn status(&self, version: u64, identity: &[u8]) -> pb::StatusReply {
        let now = now_ms();
        let hosts = self.hosts.lock().expect("fleet lock");
        let hosts = hosts
            .iter()
            .map(|(id, r)| {
                let age = Duration::from_millis((now - r.last_seen_ms).max(0) as u64);
                let state = if r.watching > 0 || age < self.down_after {
                    "up"
                } else if age < self.out_after {
                    "down"
                } else {
                    "out"
                };
                let converged = r.last.as_ref().is_some_and(|l| {
                    l.result == "converged"
                        && !l.dry_run
                        && l.image_version == version
                        && l.identity.as_ref() == identity
                });
                pb::HostStatus {
                    host_id: id.clone(),
                    state: state.into(),
                    converged,
                    last_seen_unix_ms: r.last_seen_ms,
                    last: r.last.clone(),
                    connected: r.watching > 0,
                    ..Default::default()
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
            ..Default::default()
        }
    }
}

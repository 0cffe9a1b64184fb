//! The master's state in SQLite (`STATE_DIR/fleet.db`): versions, the fleet's baseline,
//! per-host targets, rollouts with their grants, every host's last report, and the event log.
//!
//! Every decision is written in one transaction before any host hears of it, with
//! `synchronous = FULL`, so a master killed at any point and restarted resumes from what it
//! had decided, never from less. A grant is a row with the primary key (rollout, host): a host
//! cannot be granted twice in one rollout, even by a bug.
//!
//! The schema is versioned with `PRAGMA user_version`; [`MIGRATIONS`] are applied in order, each
//! in its own transaction, and a database from a newer syncmaster is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use proto::v1 as pb;
use rusqlite::{params, Connection, OptionalExtension};

use crate::rollout::{Grant, GrantState, Halt, Rollout, State, Wave};

/// Schema migrations, in order: migration `i` takes the schema from version `i` to `i + 1`.
/// Append only; never edit one that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: rollouts, grants, targets, reports and the event log.
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        identity TEXT NOT NULL,
        source TEXT NOT NULL,
        rollback_of INTEGER,
        published_ms INTEGER NOT NULL
    );
    CREATE TABLE targets (
        host TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        rollout INTEGER NOT NULL,
        wave TEXT NOT NULL,
        since_ms INTEGER NOT NULL,
        origin INTEGER NOT NULL
    );
    CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        version INTEGER NOT NULL,
        identity TEXT NOT NULL,
        from_version INTEGER NOT NULL,
        state TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        ended_ms INTEGER NOT NULL,
        current_wave INTEGER NOT NULL,
        policy TEXT NOT NULL,
        waves TEXT NOT NULL,
        halt TEXT,
        rollback_versions TEXT NOT NULL
    );
    CREATE TABLE grants (
        rollout INTEGER NOT NULL REFERENCES rollouts(id),
        host TEXT NOT NULL,
        wave INTEGER NOT NULL,
        from_version INTEGER NOT NULL,
        granted_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        converged_ms INTEGER NOT NULL,
        ended_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        check_name TEXT NOT NULL,
        output_tail TEXT NOT NULL,
        acknowledged INTEGER NOT NULL,
        PRIMARY KEY (rollout, host)
    );
    CREATE TABLE reports (
        host TEXT PRIMARY KEY,
        report BLOB NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        rollout INTEGER NOT NULL,
        kind TEXT NOT NULL,
        host TEXT NOT NULL,
        version INTEGER NOT NULL,
        wave INTEGER NOT NULL,
        detail TEXT NOT NULL,
        caller TEXT NOT NULL
    );
    CREATE INDEX events_rollout ON events (rollout, id);
    "#,
];

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub version: u64,
    pub identity: String,
    /// The directory the tree was scanned from.
    pub source: PathBuf,
    /// A rollback re-publishes this older version's tree under a new number.
    pub rollback_of: Option<u64>,
    pub published_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub version: u64,
    /// The rollout that set it (0: none, e.g. a rollback).
    pub rollout: u64,
    /// The wave that granted it, or why it was set ("rollback").
    pub wave: String,
    pub since_ms: i64,
    /// For a target a rollout granted: the version the host had before that rollout (or
    /// before a rollout it superseded), where an abort sends it back. 0 for a rollback target.
    pub origin: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub at_ms: i64,
    pub rollout: u64,
    pub kind: String,
    pub host: String,
    pub version: u64,
    pub wave: Option<usize>,
    pub detail: String,
    pub caller: String,
}

/// One transaction's worth of changes.
#[derive(Default)]
pub struct Change<'a> {
    pub baseline: Option<u64>,
    pub versions: Vec<VersionRow>,
    pub set_targets: Vec<(String, Target)>,
    pub clear_targets: Vec<String>,
    /// The rollout row to write, and the hosts whose grants changed (or are new: `new_grants`).
    pub rollout: Option<&'a Rollout>,
    pub changed_grants: Vec<String>,
    pub new_grants: Vec<String>,
    pub events: Vec<EventRow>,
}

pub struct Store {
    conn: Connection,
    shown: String,
}

fn err(shown: &str, e: rusqlite::Error) -> anyhow::Error {
    anyhow::anyhow!("state database {shown}: {e}")
}

impl Store {
    /// Opens (creating and migrating) `path`, or an in-memory database for `None` (a master
    /// without a state dir: nothing survives a restart).
    pub fn open(path: Option<&Path>) -> anyhow::Result<Store> {
        let shown = path.map_or_else(|| "(in memory)".to_owned(), |p| p.display().to_string());
        let conn = match path {
            Some(p) => Connection::open(p),
            None => Connection::open_in_memory(),
        }
        .map_err(|e| err(&shown, e))?;
        let mut s = Store { conn, shown };
        s.conn
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(|e| err(&s.shown, e))?;
        s.conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| err(&s.shown, e))?;
        s.migrate()?;
        Ok(s)
    }

    /// The schema version this database is at.
    pub fn schema_version(&self) -> anyhow::Result<u32> {
        self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| err(&self.shown, e))
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        let at = self.schema_version()? as usize;
        if at > MIGRATIONS.len() {
            anyhow::bail!(
                "state database {} has schema version {at}, newer than this syncmaster knows ({}): it was written by a newer syncmaster (hint: run that version, or restore a backup of the state dir)",
                self.shown,
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(at) {
            let tx = self.conn.transaction().map_err(|e| err(&self.shown, e))?;
            tx.execute_batch(sql)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as u32))
                .and_then(|_| tx.commit())
                .map_err(|e| {
                    anyhow::anyhow!("state database {}: migration to schema {} failed: {e}", self.shown, i + 1)
                })?;
            tracing::info!(db = %self.shown, schema = i + 1, "state database migrated");
        }
        Ok(())
    }

    pub fn baseline(&self) -> anyhow::Result<u64> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'baseline'", [], |r| r.get(0))
            .optional()
            .map_err(|e| err(&self.shown, e))?;
        Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    pub fn versions(&self) -> anyhow::Result<BTreeMap<u64, VersionRow>> {
        let mut st = self
            .conn
            .prepare("SELECT version, identity, source, rollback_of, published_ms FROM versions")
            .map_err(|e| err(&self.shown, e))?;
        let rows = st
            .query_map([], |r| {
                Ok(VersionRow {
                    version: r.get::<_, i64>(0)? as u64,
                    identity: r.get(1)?,
                    source: PathBuf::from(r.get::<_, String>(2)?),
                    rollback_of: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    published_ms: r.get(4)?,
                })
            })
            .map_err(|e| err(&self.shown, e))?;
        rows.map(|r| r.map(|v| (v.version, v)).map_err(|e| err(&self.shown, e))).collect()
    }

    pub fn targets(&self) -> anyhow::Result<BTreeMap<String, Target>> {
        let mut st = self
            .conn
            .prepare("SELECT host, version, rollout, wave, since_ms, origin FROM targets")
            .map_err(|e| err(&self.shown, e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Target {
                        version: r.get::<_, i64>(1)? as u64,
                        rollout: r.get::<_, i64>(2)? as u64,
                        wave: r.get(3)?,
                        since_ms: r.get(4)?,
                        origin: r.get::<_, i64>(5)? as u64,
                    },
                ))
            })
            .map_err(|e| err(&self.shown, e))?;
        rows.map(|r| r.map_err(|e| err(&self.shown, e))).collect()
    }

    /// Every host's last report and when it arrived.
    pub fn reports(&self) -> anyhow::Result<Vec<(pb::PassResult, i64)>> {
        let mut st = self.conn.prepare("SELECT report, received_ms FROM reports").map_err(|e| err(&self.shown, e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| err(&self.shown, e))?;
        let mut out = Vec::new();
        for row in rows {
            let (blob, at) = row.map_err(|e| err(&self.shown, e))?;
            match pb::PassResult::decode(blob.as_slice()) {
                Ok(r) => out.push((r, at)),
                Err(e) => tracing::warn!(db = %self.shown, "a stored report does not decode ({e}); skipped"),
            }
        }
        Ok(out)
    }

    pub fn save_report(&self, r: &pb::PassResult, received_ms: i64) -> anyhow::Result<()> {
        self.conn
            .execute(
                "INSERT INTO reports (host, report, received_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (host) DO UPDATE SET report = excluded.report, received_ms = excluded.received_ms",
                params![r.host_id, r.encode_to_vec(), received_ms],
            )
            .map(|_| ())
            .map_err(|e| err(&self.shown, e))
    }

    /// The newest rollout, with its grants.
    pub fn latest_rollout(&self) -> anyhow::Result<Option<Rollout>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, version, identity, from_version, state, started_ms, ended_ms, current_wave, policy, waves, halt, rollback_versions
                 FROM rollouts ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)? as u64,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)? as usize,
                        r.get::<_, String>(8)?,
                        r.get::<_, String>(9)?,
                        r.get::<_, Option<String>>(10)?,
                        r.get::<_, String>(11)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| err(&self.shown, e))?;
        let Some((
            id,
            version,
            identity,
            from_version,
            state,
            started_ms,
            ended_ms,
            current_wave,
            policy,
            waves,
            halt,
            rb,
        )) = row
        else {
            return Ok(None);
        };
        let bad = |what: &str, e: String| anyhow::anyhow!("state database {}: rollout #{id}: {what}: {e}", self.shown);
        let mut id_bytes = [0u8; 32];
        hex::decode_to_slice(&identity, &mut id_bytes).map_err(|e| bad("identity", e.to_string()))?;
        let mut r = Rollout {
            id,
            version,
            identity: id_bytes,
            from_version,
            state: State::parse(&state).ok_or_else(|| bad("state", state.clone()))?,
            started_ms,
            ended_ms,
            current_wave,
            policy: serde_json::from_str(&policy).map_err(|e| bad("policy", e.to_string()))?,
            waves: serde_json::from_str::<Vec<Wave>>(&waves).map_err(|e| bad("waves", e.to_string()))?,
            grants: BTreeMap::new(),
            halt: halt.map(|h| serde_json::from_str::<Halt>(&h)).transpose().map_err(|e| bad("halt", e.to_string()))?,
            rollback_versions: serde_json::from_str(&rb).map_err(|e| bad("rollback versions", e.to_string()))?,
        };
        let mut st = self
            .conn
            .prepare(
                "SELECT host, wave, from_version, granted_ms, state, converged_ms, ended_ms, reason, check_name, output_tail, acknowledged
                 FROM grants WHERE rollout = ?1",
            )
            .map_err(|e| err(&self.shown, e))?;
        let grants = st
            .query_map([id as i64], |row| {
                Ok((
                    row.get::<_, String>(4)?,
                    Grant {
                        host: row.get(0)?,
                        wave: row.get::<_, i64>(1)? as usize,
                        from_version: row.get::<_, i64>(2)? as u64,
                        granted_ms: row.get(3)?,
                        state: GrantState::Granted,
                        converged_ms: row.get(5)?,
                        ended_ms: row.get(6)?,
                        reason: row.get(7)?,
                        check: row.get(8)?,
                        output_tail: row.get(9)?,
                        acknowledged: row.get::<_, i64>(10)? != 0,
                    },
                ))
            })
            .map_err(|e| err(&self.shown, e))?;
        for g in grants {
            let (state, mut g) = g.map_err(|e| err(&self.shown, e))?;
            g.state = GrantState::parse(&state).ok_or_else(|| bad("grant state", state.clone()))?;
            r.grants.insert(g.host.clone(), g);
        }
        Ok(Some(r))
    }

    pub fn max_rollout_id(&self) -> anyhow::Result<u64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM rollouts", [], |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
            .map_err(|e| err(&self.shown, e))
    }

    /// Events with an id above `after`, oldest first, at most `limit` (0: all).
    pub fn events(&self, after: u64, limit: u32) -> anyhow::Result<Vec<pb::RolloutEvent>> {
        let limit = if limit == 0 { -1 } else { limit as i64 };
        let mut st = self
            .conn
            .prepare(
                "SELECT id, at_ms, rollout, kind, host, version, wave, detail, caller FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| err(&self.shown, e))?;
        let rows = st
            .query_map(params![after as i64, limit], |r| {
                Ok(pb::RolloutEvent {
                    id: r.get::<_, i64>(0)? as u64,
                    at_unix_ms: r.get(1)?,
                    rollout_id: r.get::<_, i64>(2)? as u64,
                    kind: r.get(3)?,
                    host_id: r.get(4)?,
                    version: r.get::<_, i64>(5)? as u64,
                    wave: r.get::<_, i64>(6)? as i32,
                    detail: r.get(7)?,
                    caller: r.get(8)?,
                })
            })
            .map_err(|e| err(&self.shown, e))?;
        rows.map(|r| r.map_err(|e| err(&self.shown, e))).collect()
    }

    /// Writes `c` in one transaction: all of it, or (on error) none of it.
    pub fn commit(&mut self, c: &Change) -> anyhow::Result<()> {
        let shown = self.shown.clone();
        let tx = self.conn.transaction().map_err(|e| err(&shown, e))?;
        write(&tx, c).map_err(|e| err(&shown, e))?;
        tx.commit().map_err(|e| err(&shown, e))
    }
}

fn write(tx: &rusqlite::Transaction, c: &Change) -> rusqlite::Result<()> {
    if let Some(b) = c.baseline {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('baseline', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [b.to_string()],
        )?;
    }
    for v in &c.versions {
        tx.execute(
            "INSERT INTO versions (version, identity, source, rollback_of, published_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                v.version as i64,
                v.identity,
                v.source.to_string_lossy(),
                v.rollback_of.map(|x| x as i64),
                v.published_ms
            ],
        )?;
    }
    for h in &c.clear_targets {
        tx.execute("DELETE FROM targets WHERE host = ?1", [h])?;
    }
    for (h, t) in &c.set_targets {
        tx.execute(
            "INSERT INTO targets (host, version, rollout, wave, since_ms, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (host) DO UPDATE SET version = excluded.version, rollout = excluded.rollout,
               wave = excluded.wave, since_ms = excluded.since_ms, origin = excluded.origin",
            params![h, t.version as i64, t.rollout as i64, t.wave, t.since_ms, t.origin as i64],
        )?;
    }
    if let Some(r) = c.rollout {
        let json = |v: serde_json::Result<String>| v.map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)));
        tx.execute(
            "INSERT INTO rollouts (id, version, identity, from_version, state, started_ms, ended_ms, current_wave, policy, waves, halt, rollback_versions)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (id) DO UPDATE SET state = excluded.state, ended_ms = excluded.ended_ms,
               current_wave = excluded.current_wave, waves = excluded.waves, halt = excluded.halt,
               rollback_versions = excluded.rollback_versions",
            params![
                r.id as i64,
                r.version as i64,
                hex::encode(r.identity),
                r.from_version as i64,
                r.state.as_str(),
                r.started_ms,
                r.ended_ms,
                r.current_wave as i64,
                json(serde_json::to_string(&r.policy))?,
                json(serde_json::to_string(&r.waves))?,
                r.halt.as_ref().map(serde_json::to_string).transpose().map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                json(serde_json::to_string(&r.rollback_versions))?,
            ],
        )?;
        for h in &c.new_grants {
            let g = &r.grants[h];
            // A plain INSERT: a second grant of one host in one rollout violates the primary
            // key and fails the whole transaction.
            tx.execute(
                "INSERT INTO grants (rollout, host, wave, from_version, granted_ms, state, converged_ms, ended_ms, reason, check_name, output_tail, acknowledged)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    r.id as i64,
                    g.host,
                    g.wave as i64,
                    g.from_version as i64,
                    g.granted_ms,
                    g.state.as_str(),
                    g.converged_ms,
                    g.ended_ms,
                    g.reason,
                    g.check,
                    g.output_tail,
                    g.acknowledged as i64
                ],
            )?;
        }
        for h in &c.changed_grants {
            let Some(g) = r.grants.get(h) else { continue };
            tx.execute(
                "UPDATE grants SET state = ?3, converged_ms = ?4, ended_ms = ?5, reason = ?6, check_name = ?7,
                   output_tail = ?8, acknowledged = ?9 WHERE rollout = ?1 AND host = ?2",
                params![
                    r.id as i64,
                    g.host,
                    g.state.as_str(),
                    g.converged_ms,
                    g.ended_ms,
                    g.reason,
                    g.check,
                    g.output_tail,
                    g.acknowledged as i64
                ],
            )?;
        }
    }
    for e in &c.events {
        tx.execute(
            "INSERT INTO events (at_ms, rollout, kind, host, version, wave, detail, caller) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                e.at_ms,
                e.rollout as i64,
                e.kind,
                e.host,
                e.version as i64,
                e.wave.map_or(-1, |w| w as i64),
                e.detail,
                e.caller
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::{Policy, Select, WaveSpec};

    fn sample() -> Rollout {
        let policy = Policy {
            source: "hosts.toml".into(),
            waves: vec![WaveSpec {
                name: "canary".into(),
                select: Select::Hosts(vec!["a".into()]),
                max_concurrent: 1,
                max_per_period: Some((2, Duration::from_secs(3600))),
                soak: Duration::from_secs(600),
            }],
            window: None,
            timeout: Duration::from_secs(1800),
            max_failures: 1,
            max_failure_ratio: Some(0.25),
        };
        let mut r = Rollout {
            id: 1,
            version: 5,
            identity: [5; 32],
            from_version: 4,
            state: State::Running,
            started_ms: 10,
            ended_ms: 0,
            current_wave: 0,
            policy,
            waves: vec![Wave { hosts: vec!["a".into()], ..Default::default() }],
            grants: BTreeMap::new(),
            halt: None,
            rollback_versions: vec![],
        };
        r.grants.insert(
            "a".into(),
            Grant {
                host: "a".into(),
                wave: 0,
                from_version: 4,
                granted_ms: 11,
                state: GrantState::Granted,
                converged_ms: 0,
                ended_ms: 0,
                reason: String::new(),
                check: String::new(),
                output_tail: String::new(),
                acknowledged: false,
            },
        );
        r
    }

    #[test]
    fn a_rollout_and_its_grants_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let mut s = Store::open(Some(&path)).unwrap();
        assert_eq!(s.schema_version().unwrap() as usize, MIGRATIONS.len());
        let mut r = sample();
        s.commit(&Change { rollout: Some(&r), new_grants: vec!["a".into()], baseline: Some(4), ..Default::default() })
            .unwrap();
        r.state = State::Halted;
        r.halt = Some(Halt { reason: "1 host(s) failed".into(), at_ms: 12, hosts: vec!["a".into()] });
        let g = r.grants.get_mut("a").unwrap();
        g.state = GrantState::Failed;
        g.check = "app".into();
        g.output_tail = "boom\n".into();
        s.commit(&Change { rollout: Some(&r), changed_grants: vec!["a".into()], ..Default::default() }).unwrap();
        drop(s);
        let s = Store::open(Some(&path)).unwrap();
        assert_eq!(s.latest_rollout().unwrap().unwrap(), r);
        assert_eq!(s.baseline().unwrap(), 4);
    }

    #[test]
    fn a_second_grant_of_one_host_fails_the_whole_transaction() {
        let mut s = Store::open(None).unwrap();
        let r = sample();
        s.commit(&Change { rollout: Some(&r), new_grants: vec!["a".into()], ..Default::default() }).unwrap();
        let again =
            Change { rollout: Some(&r), new_grants: vec!["a".into()], baseline: Some(99), ..Default::default() };
        let e = s.commit(&again).unwrap_err().to_string();
        assert!(e.contains("UNIQUE") || e.contains("constraint"), "{e}");
        assert_eq!(s.baseline().unwrap(), 0, "nothing of the failed transaction was kept");
    }

    #[test]
    fn a_database_from_a_newer_syncmaster_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        drop(Store::open(Some(&path)).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = Store::open(Some(&path)).err().unwrap().to_string();
        assert!(e.contains("schema version 99") && e.contains("newer"), "{e}");
    }

    #[test]
    fn reports_and_events_round_trip() {
        let mut s = Store::open(None).unwrap();
        let rep =
            pb::PassResult { host_id: "a".into(), image_version: 3, result: "converged".into(), ..Default::default() };
        s.save_report(&rep, 5).unwrap();
        s.save_report(&rep, 6).unwrap();
        assert_eq!(s.reports().unwrap(), vec![(rep, 6)]);
        let ev = EventRow {
            at_ms: 1,
            rollout: 0,
            kind: "paused".into(),
            host: String::new(),
            version: 3,
            wave: None,
            detail: "x".into(),
            caller: "admin".into(),
        };
        s.commit(&Change { events: vec![ev.clone(), ev], ..Default::default() }).unwrap();
        let got = s.events(0, 0).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].caller, "admin");
        assert_eq!(got[0].wave, -1);
        assert_eq!(s.events(got[0].id, 0).unwrap().len(), 1);
    }
}

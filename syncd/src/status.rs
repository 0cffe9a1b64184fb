//! `syncd status`: the local view of a root, from the state dir alone (no master).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::SyncError;
use crate::report::human_bytes;
use crate::store::{Prefetch, Refused, State, VersionRef};

#[derive(Debug, Serialize)]
pub struct LocalStatus {
    pub root: PathBuf,
    pub store: PathBuf,
    pub current: Option<VersionRef>,
    pub previous: Option<VersionRef>,
    pub prefetched: Option<Prefetch>,
    pub refused: Option<Refused>,
    /// `apply = "window"`: the windows, and when the next one opens (RFC 3339, UTC).
    pub commit_windows: Vec<String>,
    pub next_window: Option<String>,
    /// Bytes only the store holds (prefetched and kept old content), and bytes it shares with
    /// the root (hard links: no extra room).
    pub store_own_bytes: u64,
    pub store_shared_bytes: u64,
    /// The last pass that could change the root: its result, version and first errors.
    pub last_pass: Option<crate::last_pass::LastPass>,
}

impl LocalStatus {
    pub fn read(state_dir: &Path, root: &Path, windows: &[crate::window::Window]) -> Result<LocalStatus, SyncError> {
        let sd = crate::state::StateDir::new(state_dir, root);
        let dir = sd.store();
        let (state, own, shared) = if dir.join("objects").is_dir() {
            let st = crate::store::Store::open_unlocked(&sd).map_err(|source| crate::error::LocalError::Store {
                store: dir.clone(),
                action: "open",
                source,
            })?;
            let (own, shared) = st.usage();
            (st.state(), own, shared)
        } else {
            (State::default(), 0, 0)
        };
        let now = jiff::Timestamp::now();
        Ok(LocalStatus {
            root: root.to_owned(),
            store: dir,
            current: state.current,
            previous: state.previous,
            prefetched: state.prefetched,
            refused: state.refused,
            commit_windows: windows.iter().map(|w| w.text().to_owned()).collect(),
            next_window: crate::window::next_open(windows, now).map(|t| t.to_string()),
            store_own_bytes: own,
            store_shared_bytes: shared,
            last_pass: crate::last_pass::read(&sd),
        })
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data")
    }

    pub fn text(&self) -> String {
        let v = |r: &Option<VersionRef>| match r {
            Some(r) => format!("v{} ({})", r.version, &r.identity[..16.min(r.identity.len())]),
            None => "none".into(),
        };
        let mut out = format!("root:       {}\n", self.root.display());
        if let Some(p) = &self.last_pass {
            let when = jiff::Timestamp::from_second(p.ended_unix as i64).map_or_else(|_| "?".into(), |t| t.to_string());
            let version = if p.version > 0 { format!(" (image v{})", p.version) } else { String::new() };
            out += &format!("last pass:  {}{version}, ended {when}\n", p.result);
            for e in &p.errors {
                out += &format!("            {e}\n");
            }
        }
        out += &format!("current:    {}\n", v(&self.current));
        out += &format!(
            "previous:   {}{}\n",
            v(&self.previous),
            if self.previous.is_some() { " (syncd rollback goes back to it)" } else { "" }
        );
        out += &match &self.prefetched {
            Some(p) => format!(
                "prefetched: v{} ({}): {}, {} of {} objects, {} of {}\n",
                p.version,
                &p.identity[..16.min(p.identity.len())],
                if p.complete { "complete, waits for the commit" } else { "in progress" },
                p.objects_done,
                p.objects_total,
                human_bytes(p.bytes_done),
                human_bytes(p.bytes_total)
            ),
            None => "prefetched: none\n".into(),
        };
        if let Some(r) = &self.refused {
            out += &format!(
                "refused:    v{} (rolled back: {}); taken again once the master targets another version\n",
                r.version, r.reason
            );
        }
        out += &match (&self.next_window, self.commit_windows.is_empty()) {
            (_, true) => "window:     none (apply = \"immediately\")\n".into(),
            (Some(t), false) => format!("window:     next opens {t} ({})\n", self.commit_windows.join(", ")),
            (None, false) => format!("window:     {}\n", self.commit_windows.join(", ")),
        };
        out += &format!(
            "store:      {}: {} of its own, {} shared with the root\n",
            self.store.display(),
            human_bytes(self.store_own_bytes),
            human_bytes(self.store_shared_bytes)
        );
        out
    }
}

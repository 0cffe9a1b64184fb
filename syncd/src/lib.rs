//! syncd: converges a host root to the golden image served by syncmaster.
//!
//! This file only declares and re-exports; the logic lives in the modules, in the order of the
//! data path:
//!
//! - what a pass is asked: [`options`] (and [`config`], the file behind it);
//! - the host: [`lock`] (one syncd per root), [`host`] (the walk and hashes), [`unchanged`]
//!   (the walk that proves nothing changed), [`hostfs`] (every file operation, beneath the
//!   root, without following symlinks);
//! - the master: [`fetch`] (connection, manifest, objects, decode, queues), [`trust`]
//!   (signatures and versions), [`mcache`] (the last manifest);
//! - [`plan`]: the pure diff of manifest and host;
//! - [`apply`]: stage, verify, commit, roll back; [`store`] and [`local`] (prefetch, commit
//!   and rollback from the local store);
//! - after the commit: triggers (the `triggers` crate), [`health`];
//! - one pass from start to end: [`pass`]; what it did: [`report`], [`error`] (exit codes),
//!   [`metrics`], [`last_pass`], [`progress`], [`drift`], [`status`];
//! - the daemon around passes: [`daemon`], [`window`], [`notify`].

pub mod apply;
pub mod config;
pub mod daemon;
pub mod drift;
pub mod error;
pub mod fetch;
pub mod health;
pub mod host;
pub mod hostfs;
pub mod last_pass;
pub mod local;
pub mod lock;
pub mod mcache;
pub mod metrics;
pub mod notify;
pub mod options;
pub mod pass;
pub mod plan;
pub mod progress;
pub mod report;
mod solid;
pub mod state;
pub mod status;
pub mod store;
pub mod trust;
pub mod unchanged;
pub mod window;

pub use error::{exit, LocalError, SyncError};
pub use local::{commit_once, converge, prefetch_once, rollback_once, PrefetchReport};
pub use options::{Mode, SyncOptions};
pub use pass::{compile_rules, load_local_lists, sync_once};
pub use report::{human_bytes, PassReport, RolledBack};
pub use state::{root_key, StateDir};

//! How syncd reaches the master: the transport (TLS, object store settings), the deadlines
//! every call and stream runs under, and how a failed call is described.

use std::time::Duration;

use exclusions::PatternList;
use proto::v1 as pb;
use tonic::transport::Endpoint;

use crate::error::{SyncError, UrlProblem};

/// Largest zstd window a host accepts (32 MiB): bounds decoder memory whatever the master sends.
pub(super) const MAX_WINDOW_LOG: u32 = 25;
/// Objects smaller than this that the store has in a pack come from the pack even when the
/// host offers a base: a GET of their own (often a miss: no delta) costs more than the bytes
/// a delta would save. Larger ones ask for the delta against the base first.
pub(super) const DELTA_GET_MIN: u64 = 64 * 1024;

/// How to reach the master: mTLS, or plain TCP only when asked for by name.
#[derive(Clone, Debug, Default)]
pub struct Transport {
    /// CA for the master's certificate, and this host's certificate and key.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// `--insecure`: a plain `http://` master is allowed (tests and demos).
    pub insecure: bool,
    /// How long to wait on the master before calling it gone.
    pub deadlines: Deadlines,
    /// Where objects come from when an object store is named.
    pub store: StoreConfig,
}

/// The host's object store settings (issue 25): fetch objects from the store the master's
/// manifest header names (`object_store_url`), or the one configured here, falling back to
/// the master for any object the store fails to give.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `object_store`: a URL overriding the header's (a nearby cache, a read-only bucket), or
    /// `none`: always fetch from the master.
    pub url: Option<String>,
    /// `object_store_fallback` (default true): fetch from the master what the store fails to
    /// give; off, a store failure breaks the pass like a lost master (exit 3).
    pub fallback: bool,
    /// `object_store_concurrency` (default 8): GETs in flight, their output kept in order.
    pub concurrency: usize,
    /// `object_store_anonymous` (default false): unsigned S3 requests when no AWS credentials
    /// are set.
    pub anonymous: bool,
    /// `object_store_solid` (default true): an upgrade tries the solid delta to the image
    /// first ([`crate::solid`]).
    pub solid: bool,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig { url: None, fallback: true, concurrency: 8, anonymous: false, solid: true }
    }
}

/// Every wait on the network path is bounded: a master that accepts the connection and then
/// says nothing, or freezes mid-transfer, is reported unreachable within these, never waited
/// on forever. Each names the config key that sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The connection: TCP, TLS and the HTTP/2 preface (`connect_timeout`).
    pub connect: Duration,
    /// A unary call whole, and a streaming call until its response headers (`rpc_timeout`).
    pub rpc: Duration,
    /// No message for this long on a manifest or object stream (`stream_idle_timeout`). Time
    /// this host spends not reading (a full queue, a rate limit) does not count. The version
    /// watch, idle by design, is exempt: keepalive pings watch it instead.
    pub stream_idle: Duration,
    /// An HTTP/2 PING this often, with or without a call open (`keepalive_interval`) …
    pub keepalive_interval: Duration,
    /// … and the connection is dropped if one goes unanswered this long (`keepalive_timeout`).
    pub keepalive_timeout: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            connect: Duration::from_secs(10),
            rpc: Duration::from_secs(30),
            stream_idle: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// `d` as a config value is written: whole seconds as `30s`, else milliseconds.
pub(super) fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Why a call timed out, naming the key that sets its deadline. `hint` leads the parenthesis
/// with "hint: " where no other hint follows (an [`SyncError::Unreachable`] adds its own).
pub(super) fn no_reply(d: &Deadlines, call: &str, hint: bool) -> String {
    let hint = if hint { "hint: " } else { "" };
    format!(
        "no reply to {call} within {} ({hint}the master may be hung or overloaded; rpc_timeout sets this deadline)",
        secs(d.rpc)
    )
}

/// Why a stream was given up: nothing arrived on it for `stream_idle_timeout`.
pub(super) fn stalled(d: &Deadlines, stream: &str, hint: bool) -> String {
    let hint = if hint { "hint: " } else { "" };
    format!(
        "no data for {} on the {stream} stream ({hint}the master may be hung or overloaded; stream_idle_timeout sets this deadline)",
        secs(d.stream_idle)
    )
}

/// `fut`, or `Err(on_timeout())` if it has not finished within `limit`.
pub(super) async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, SyncError>>,
    on_timeout: impl FnOnce() -> SyncError,
) -> Result<T, SyncError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| Err(on_timeout()))
}

/// Checks that `url` can name a master at all, over the transport configured (a usage error
/// otherwise, not "unreachable").
pub fn check_url(url: &str, transport: &Transport) -> Result<Endpoint, SyncError> {
    let bad = |problem: UrlProblem| SyncError::MasterUrl { url: url.to_owned(), problem };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad(UrlProblem::Scheme));
    }
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(UrlProblem::Invalid(e.to_string())))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(bad(UrlProblem::NoHost));
    }
    if url.starts_with("http://") && !transport.insecure {
        return Err(bad(UrlProblem::PlainTcp));
    }
    if url.starts_with("https://") {
        let tls = transport.tls.clone().ok_or_else(|| bad(UrlProblem::NoTls))?;
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(UrlProblem::TlsRefused(e)))?;
    }
    Ok(endpoint)
}

pub(super) fn lists_from_wire(lists: &[pb::ExclusionList]) -> Vec<PatternList> {
    lists.iter().map(exclusions::wire::from_wire).collect()
}

/// A call's failure in a line: its code and message, and what caused it.
pub fn describe_status(s: &tonic::Status) -> String {
    crate::error::with_causes(format!("{}: {}", s.code(), s.message()), std::error::Error::source(s))
}

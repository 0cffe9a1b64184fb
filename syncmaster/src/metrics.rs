//! `syncmaster serve --metrics-listen ADDR`: Prometheus metrics at `/metrics`, on a plain HTTP
//! port of their own (like node_exporter's), named by Prometheus's conventions. Fleet and
//! rollout gauges are read from the same state `syncmaster status` shows, at each scrape; RPC
//! and object counters accumulate from the start.

use std::sync::LazyLock;
use std::time::Instant;

use promtext::prometheus_client::metrics::counter::Counter;
use promtext::prometheus_client::metrics::family::Family;
use promtext::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use promtext::{family, gauge, Labels, Registry, Unit};

use crate::control::Control;

fn rpc_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

struct Counters {
    requests: Family<Labels, Counter>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    object_bytes: Counter,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    requests: Family::default(),
    durations: Family::new_with_constructor(rpc_histogram),
    object_bytes: Counter::default(),
});

/// Counts one RPC and, when dropped, its duration (for a streaming RPC: until its stream
/// began).
pub struct Rpc {
    method: &'static str,
    started: Instant,
}

pub fn rpc(method: &'static str) -> Rpc {
    COUNTERS.requests.get_or_create(&vec![("method", method.to_owned())]).inc();
    Rpc { method, started: Instant::now() }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        COUNTERS
            .durations
            .get_or_create(&vec![("method", self.method.to_owned())])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Object bytes sent to hosts (as sent: compressed frames, deltas or raw).
pub fn object_bytes_sent(n: u64) {
    COUNTERS.object_bytes.inc_by(n);
}

/// The text of `/metrics`.
pub fn render(control: &Control) -> String {
    let mut reg = Registry::with_prefix("syncmaster");
    promtext::build_info(&mut reg, env!("CARGO_PKG_VERSION"));

    let fleet = control.fleet_status();
    gauge(&mut reg, "image_version", "The image version the master serves now", None, fleet.version as f64);
    gauge(
        &mut reg,
        "baseline_version",
        "The version hosts without a target of their own converge to",
        None,
        fleet.baseline_version as f64,
    );
    let count = |state: &str| fleet.hosts.iter().filter(|h| h.state == state).count() as f64;
    family(
        &mut reg,
        "hosts",
        "Hosts by state: up (watching or seen recently), down, out",
        ["up", "down", "out"].iter().map(|s| (vec![("state", (*s).to_owned())], count(s))).collect(),
    );
    gauge(
        &mut reg,
        "hosts_converged",
        "Hosts whose last pass converged to their target",
        None,
        fleet.hosts.iter().filter(|h| h.converged).count() as f64,
    );
    gauge(
        &mut reg,
        "hosts_connected",
        "Hosts with a Watch stream open now",
        None,
        fleet.hosts.iter().filter(|h| h.connected).count() as f64,
    );

    let rollout = control.rollout_status();
    if let Some(r) = &rollout.rollout {
        const STATES: [&str; 6] = ["running", "paused", "halted", "aborted", "completed", "superseded"];
        family(
            &mut reg,
            "rollout_state",
            "The latest rollout's state (1 for the one it is in)",
            STATES.iter().map(|s| (vec![("state", (*s).to_owned())], (r.state == *s) as u8 as f64)).collect(),
        );
        gauge(&mut reg, "rollout_version", "The version the latest rollout takes hosts to", None, r.version as f64);
        gauge(
            &mut reg,
            "rollout_wave",
            "The wave the latest rollout is granting or soaking (from 0)",
            None,
            r.current_wave as f64,
        );
        gauge(&mut reg, "rollout_waves", "Waves in the latest rollout", None, r.waves.len() as f64);
        gauge(
            &mut reg,
            "rollout_failures",
            "Failures counted towards the latest rollout's halt conditions",
            None,
            r.failures as f64,
        );
    }

    let cache = control.published().cache();
    gauge(
        &mut reg,
        "object_cache",
        "Compressed frames kept in the object cache",
        Some(Unit::Bytes),
        cache.bytes() as f64,
    );
    reg.register("rpc_requests", "RPCs received, by method", COUNTERS.requests.clone());
    reg.register_with_unit(
        "rpc_duration",
        "RPC handling time, by method (a streaming RPC: until its stream began)",
        Unit::Seconds,
        COUNTERS.durations.clone(),
    );
    reg.register_with_unit(
        "object_sent",
        "Object bytes sent to hosts, as sent",
        Unit::Bytes,
        COUNTERS.object_bytes.clone(),
    );

    promtext::text(&reg, "syncmaster")
}

/// Serves `GET /metrics` on `listener` until `stopped` says so. Read-only: nothing else is
/// served there.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: std::sync::Arc<Control>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let control = control.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || render(&control)).await.unwrap_or_default();
                ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
}

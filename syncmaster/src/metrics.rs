//! `syncmaster serve --metrics-listen ADDR`: Prometheus metrics at `/metrics`, on a plain HTTP
//! port of their own (like node_exporter's), named by Prometheus's conventions. Fleet and
//! rollout gauges are read from the same state `syncmaster status` shows, at each scrape; RPC
//! and object counters accumulate from the start.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::control::Control;

type Labels = Vec<(&'static str, String)>;

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
    let gauge = |reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: f64| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, g),
            None => reg.register(name, help, g),
        }
    };
    let family = |reg: &mut Registry, name: &str, help: &str, rows: Vec<(Labels, f64)>| {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, v) in rows {
            f.get_or_create(&labels).set(v);
        }
        reg.register(name, help, f);
    };
    family(
        &mut reg,
        "build",
        "The syncmaster build (always 1)",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0)],
    );

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

    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    text_format(&out)
}

/// prometheus-client writes OpenMetrics; Prometheus's text format (what `promtool check
/// metrics` and older scrapers read) names a counter's HELP and TYPE with its `_total`, has
/// no end marker, and `syncmaster_build` is a gauge named `_info` by convention.
fn text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let mut line = line.to_owned();
        for kind in ["HELP", "TYPE"] {
            for (from, to) in counters
                .iter()
                .map(|c| (c.to_string(), format!("{c}_total")))
                .chain([("syncmaster_build".to_owned(), "syncmaster_build_info".to_owned())])
            {
                if let Some(rest) = line.strip_prefix(&format!("# {kind} {from} ")) {
                    line = format!("# {kind} {to} {rest}");
                }
            }
        }
        if let Some(rest) = line.strip_prefix("syncmaster_build{") {
            line = format!("syncmaster_build_info{{{rest}");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
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

//! Metrics for syncd's textfile and syncmaster's `/metrics`: a thin layer over
//! `prometheus-client` that registers one-off gauges and writes the Prometheus text format.
//!
//! prometheus-client encodes OpenMetrics. Prometheus's text format, which node_exporter's
//! textfile collector and `promtool check metrics` read, differs in three ways that matter
//! here: a counter's `HELP` and `TYPE` lines carry its `_total`, there is no `# EOF`, and an
//! info metric is a gauge whose name ends in `_info` (OpenMetrics' `info` type is unknown to it).

use std::sync::atomic::AtomicU64;

pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::registry::{Registry, Unit};

/// Label pairs of a family.
pub type Labels = Vec<(&'static str, String)>;

/// Registers a gauge `name` (with `unit`'s suffix, if any) holding `value`.
pub fn gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, g),
        None => reg.register(name, help, g),
    }
}

/// Registers a gauge family `name` with one sample per row.
pub fn family(reg: &mut Registry, name: &str, help: &str, rows: Vec<(Labels, f64)>) {
    let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    reg.register(name, help, f);
}

/// Registers `<prefix>_build_info{version}` 1 (a gauge, by the text format's convention),
/// where the registry's prefix is `prefix`.
pub fn build_info(reg: &mut Registry, version: &str) {
    family(reg, "build", "The build (always 1)", vec![(vec![("version", version.to_owned())], 1.0)]);
}

/// `reg` in the Prometheus text format (see the crate docs); `prefix` is the registry's.
pub fn text(reg: &Registry, prefix: &str) -> String {
    let mut om = String::new();
    encode(&mut om, reg).expect("writing to a String");
    let counters: Vec<&str> = om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let build = format!("{prefix}_build");
    let renames: Vec<(String, String)> = counters
        .iter()
        .map(|c| (c.to_string(), format!("{c}_total")))
        .chain([(build.clone(), format!("{build}_info"))])
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines().filter(|l| *l != "# EOF") {
        let mut line = line.to_owned();
        for kind in ["HELP", "TYPE", "UNIT"] {
            for (from, to) in &renames {
                if let Some(rest) = line.strip_prefix(&format!("# {kind} {from} ")) {
                    line = format!("# {kind} {to} {rest}");
                }
            }
        }
        if let Some(rest) = line.strip_prefix(&format!("{build}{{")) {
            line = format!("{build}_info{{{rest}");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn counters_carry_total_on_help_and_type_and_build_is_an_info_gauge() {
        let mut reg = Registry::with_prefix("x");
        build_info(&mut reg, "1.2.3");
        gauge(&mut reg, "size", "Size", Some(Unit::Bytes), 3.0);
        let c = Counter::<u64>::default();
        c.inc_by(5);
        reg.register("requests", "Requests", c);
        let t = text(&reg, "x");
        assert!(t.contains("# HELP x_build_info The build (always 1).\n# TYPE x_build_info gauge\nx_build_info{version=\"1.2.3\"} 1"), "{t}");
        assert!(
            t.contains("# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 5"),
            "{t}"
        );
        assert!(t.contains("x_size_bytes 3"), "{t}");
        assert!(!t.contains("# EOF"), "{t}");
    }
}

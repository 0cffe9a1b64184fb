//! `metrics_textfile`: the last pass's metrics for node_exporter's textfile collector, checked
//! with `promtool check metrics` (Debian package `prometheus`), after a sync, a drift check and
//! a pass whose master is unreachable.

use std::path::Path;

use gis_tests::{http_get, promtool_check, run_syncd, samples, scratch, Builder, Master};

fn syncd(cmd: &str, master: &str, root: &Path, state: &Path, cfg: &Path) -> gis_tests::Output {
    run_syncd([
        cmd,
        "--insecure",
        "--master",
        master,
        "--host-id",
        "e2e-host",
        "--root",
        root.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ])
}

#[test]
fn every_pass_writes_its_metrics_atomically_and_promtool_accepts_them() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img)
        .dir("etc", 0o755)
        .file("etc/app.conf", 0o644, b"version = 1\n")
        .file("etc/motd", 0o644, b"hello\n")
        .dir("usr", 0o755)
        .file("usr/tool", 0o755, &vec![7u8; 100_000])
        .symlink("usr/tool.link", "tool")
        .finish();
    let m = Master::start(&img);
    let (root, state, textdir) = (s.dir("root"), s.join("state"), s.dir("textfile"));
    let prom = textdir.join("syncd.prom");
    let cfg = s.join("syncd.toml");
    std::fs::write(&cfg, format!("metrics_textfile = {:?}\n", prom.to_str().unwrap())).unwrap();

    // A cold sync: everything was missing, then fetched.
    let out = syncd("sync", m.url(), &root, &state, &cfg);
    out.expect_code(0, &[&root]);
    promtool_check(&prom);
    let v = samples(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(v["syncd_last_pass_result{result=\"converged\"}"], 1.0, "{v:?}");
    assert_eq!(v["syncd_last_pass_success"], 1.0);
    assert_eq!(v["syncd_last_pass_exit_code"], 0.0);
    assert_eq!(v["syncd_image_version"], 1.0);
    assert_eq!(v["syncd_last_pass_drift_entries{kind=\"missing\"}"], 6.0, "{v:?}");
    assert_eq!(v["syncd_last_pass_drift_entries{kind=\"changed\"}"], 0.0);
    assert!(v["syncd_last_pass_fetched_bytes"] >= 100_000.0, "{v:?}");
    assert!(v["syncd_last_pass_duration_seconds"] > 0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - v["syncd_last_pass_timestamp_seconds"]).abs() < 120.0, "{v:?}");
    assert_eq!(v["syncd_build_info{version=\"0.1.0\"}"], 1.0, "{v:?}");
    // Written by rename: the collector's directory holds the file and nothing half-written.
    let names: Vec<String> =
        std::fs::read_dir(&textdir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["syncd.prom".to_owned()], "{names:?}");

    // A hand edit, seen by a drift check (which changes nothing), then a pass that repairs it
    // with every hash from the host index.
    std::fs::write(root.join("etc/motd"), b"edited\n").unwrap();
    let out = syncd("drift", m.url(), &root, &state, &cfg);
    assert_eq!(out.code, 4, "drift exits 4 when a path differs: {}", out.stderr);
    promtool_check(&prom);
    let v = samples(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(v["syncd_last_pass_drift_entries{kind=\"changed\"}"], 1.0, "{v:?}");
    assert_eq!(v["syncd_last_pass_dry_run"], 1.0);
    let out = syncd("sync", m.url(), &root, &state, &cfg);
    out.expect_code(0, &[&root]);
    let v = samples(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(v["syncd_last_pass_drift_entries{kind=\"changed\"}"], 1.0, "{v:?}");
    assert_eq!(v["syncd_last_pass_host_files"], 3.0, "{v:?}");
    // The edited file is read again; the other two come from the index.
    assert_eq!(v["syncd_last_pass_index_hits"], 2.0, "{v:?}");

    // A master that cannot be reached: the last result, the same word the master would see.
    drop(m);
    let out = syncd("sync", "http://127.0.0.1:9", &root, &state, &cfg);
    assert_ne!(out.code, 0);
    promtool_check(&prom);
    let v = samples(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(v["syncd_last_pass_result{result=\"unreachable\"}"], 1.0, "{v:?}");
    assert_eq!(v["syncd_last_pass_success"], 0.0);
    assert_eq!(v["syncd_last_pass_exit_code"], out.code as f64, "{v:?}");
}

#[test]
fn a_metrics_textfile_in_a_missing_directory_is_reported_and_the_pass_stands() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img).file("a", 0o644, b"a\n").finish();
    let m = Master::start(&img);
    let (root, state) = (s.dir("root"), s.join("state"));
    let cfg = s.join("syncd.toml");
    let prom = s.join("no-such-dir/syncd.prom");
    std::fs::write(&cfg, format!("metrics_textfile = {:?}\n", prom.to_str().unwrap())).unwrap();
    let out = syncd("sync", m.url(), &root, &state, &cfg);
    out.expect_code(0, &[&root]);
    assert!(
        out.stderr.contains("cannot write the metrics textfile") && out.stderr.contains("no-such-dir"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_master_serves_fleet_rpc_and_object_metrics_that_promtool_accepts() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img).dir("etc", 0o755).file("etc/a", 0o644, &vec![3u8; 50_000]).file("etc/b", 0o644, b"b\n").finish();
    let m = gis_tests::Master::start_with(&[
        std::ffi::OsStr::new("--image"),
        img.as_os_str(),
        std::ffi::OsStr::new("--metrics-listen"),
        std::ffi::OsStr::new("127.0.0.1:0"),
    ]);
    let url = m.metrics_url().expect("the master printed `metrics on ADDR`").to_owned();
    let (root, state) = (s.dir("root"), s.join("state"));
    let cfg = s.join("syncd.toml");
    std::fs::write(&cfg, "").unwrap();
    syncd("sync", m.url(), &root, &state, &cfg).expect_code(0, &[&root]);

    let (status, body) = http_get(&url);
    assert!(status.contains("200"), "{status}\n{body}");
    let prom = s.join("master.prom");
    std::fs::write(&prom, &body).unwrap();
    promtool_check(&prom);
    let v = samples(&body);
    assert_eq!(v["syncmaster_image_version"], 1.0, "{body}");
    assert_eq!(v["syncmaster_hosts{state=\"up\"}"], 1.0, "{body}");
    assert_eq!(v["syncmaster_hosts{state=\"down\"}"], 0.0, "{body}");
    assert!(v["syncmaster_rpc_requests_total{method=\"GetManifest\"}"] >= 1.0, "{body}");
    assert!(v["syncmaster_rpc_duration_seconds_count{method=\"FetchObjects\"}"] >= 1.0, "{body}");
    assert!(v["syncmaster_object_sent_bytes_total"] > 0.0, "{body}");
    assert!(v.contains_key("syncmaster_object_cache_bytes"), "{body}");
    assert_eq!(v["syncmaster_build_info{version=\"0.1.0\"}"], 1.0, "{body}");
    // Read-only: nothing but /metrics is served there.
    let (status, _) = http_get(&url.replace("/metrics", "/rollout/abort"));
    assert!(status.contains("404"), "{status}");
}

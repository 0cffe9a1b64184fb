//! Throttling settings: bad values are refused up front; good ones leave the result exact and
//! put the whole process (down to the triggers it runs) in the requested I/O class and nice
//! level. The rates themselves are measured by `bench/throttle.sh`, not by a timed test.

use std::fs;

use gis_tests::{assert_converged, build_fixture, random_bytes, run_syncd, scratch, sync, Builder, Master};

#[test]
fn bad_rates_and_priorities_exit_2_naming_the_value() {
    let s = scratch();
    let root = s.dir("root");
    let r = root.to_string_lossy().into_owned();
    for (flag, value) in [
        ("--write-bytes-per-sec", "fast"),
        ("--read-bytes-per-sec", "20 parsecs"),
        ("--net-bytes-per-sec", "1.5 furlongs"),
        ("--io-priority", "realtime"),
        ("--nice", "42"),
    ] {
        let out = run_syncd(["sync", "--insecure", "--master", "http://127.0.0.1:9", "--root", &r, flag, value]);
        out.expect_code(2, &[]);
        out.check(out.stderr.contains(value), format!("stderr does not name {value:?}"), &[]);
    }
    // The same through the config file, where the message names the key.
    for (key, value) in [("write_bytes_per_sec", "\"20 parsecs\""), ("io_priority", "\"realtime\""), ("nice", "-21")] {
        let out = gis_tests::sync_with_config(&s, &root, &format!("{key} = {value}\n"));
        out.expect_code(2, &[]);
        out.check(out.stderr.contains(key.split('_').next().unwrap()), format!("stderr does not name {key}"), &[]);
    }
    // Drift keeps its own code for a configuration error.
    let out =
        run_syncd(["drift", "--insecure", "--master", "http://127.0.0.1:9", "--root", &r, "--io-priority", "realtime"]);
    out.expect_code(16, &[]);
}

#[test]
fn throttled_sync_is_exact_and_runs_in_the_idle_class_at_the_nice_level() {
    let s = scratch();
    let img = s.dir("img");
    build_fixture(&img);
    // Enough content to cross several write buffers and limiter bursts.
    Builder::new(&img).file("big.bin", 0o644, &random_bytes(7, 3 << 20)).file("watched", 0o644, b"v1\n");
    let master = Master::start(&img);
    let root = s.dir("root");
    let seen = s.join("seen");
    let cfg = s.join("syncd.toml");
    fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\nwrite_bytes_per_sec = \"64MiB\"\nread_bytes_per_sec = 67108864\nnet_bytes_per_sec = \"64MiB\"\nio_priority = \"idle\"\nnice = 7\n\n\
             [[trigger]]\nname = \"probe\"\nwatch = [\"/watched\"]\n\
             run = [\"sh\", \"-c\", \"ionice -p $$ > {}; awk '{{print $19}}' /proc/$$/stat >> {}\"]\n",
            s.join("state"),
            seen.display(),
            seen.display()
        ),
    )
    .unwrap();

    let out = sync(&master, &root, &["--config", cfg.to_str().unwrap()]);
    out.expect_code(0, &[&root]);
    assert_converged(&img, &root, &out);
    let seen = fs::read_to_string(&seen).unwrap_or_default();
    out.check(seen.starts_with("idle"), format!("trigger saw I/O class {seen:?}, expected idle"), &[]);
    out.check(seen.lines().nth(1) == Some("7"), format!("trigger saw nice {seen:?}, expected 7"), &[]);

    // A full re-hash under a read limit (drift reads every same-size file) still finds drift.
    fs::write(root.join("big.bin"), random_bytes(8, 3 << 20)).unwrap();
    let out = run_syncd([
        "drift",
        "--insecure",
        "--master",
        master.url(),
        "--root",
        &root.to_string_lossy(),
        "--read-bytes-per-sec",
        "64MiB",
    ]);
    out.expect_code(4, &[]);
    out.check(out.stdout.contains("big.bin"), "drift under a read limit missed big.bin", &[]);
}

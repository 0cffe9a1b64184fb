//! Bad input fails early, with the documented exit code and a message naming what is wrong.

use std::net::TcpListener;

use gis_tests::{build_fixture, run_syncd, scratch, sync, Builder, Master, Sentinel};

#[test]
fn missing_root_exits_2_and_names_it() {
    let s = scratch();
    let img = s.dir("img");
    Builder::new(&img).file("f", 0o644, b"x\n").finish();
    let master = Master::start(&img);
    let missing = s.join("no-such-root");

    let out = sync(&master, &missing, &[]);
    out.expect_code(2, &[s.path()]);
    out.check(out.stderr.contains(&*missing.to_string_lossy()), "stderr does not name the missing root", &[]);
    out.check(!missing.exists(), "the missing root was created", &[]);
}

#[test]
fn unreachable_master_exits_3_and_names_it() {
    let s = scratch();
    let root = s.dir("root");
    build_fixture(&root);
    let host = Sentinel::take(&root);
    // A port that was free a moment ago and has nobody listening now.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");

    let out = run_syncd(["sync", "--insecure", "--master", &url, "--root", &root.to_string_lossy()]);
    out.expect_code(3, &[]);
    out.check(out.stderr.contains(&url), "stderr does not name the master URL", &[]);
    host.assert_unchanged("a pass that could not reach its master");
}

#[test]
fn malformed_master_url_exits_2() {
    let s = scratch();
    let root = s.dir("root");

    let out = run_syncd(["sync", "--insecure", "--master", "not-a-url", "--root", &root.to_string_lossy()]);
    out.expect_code(2, &[]);
    out.check(out.stderr.contains("not-a-url"), "stderr does not name the bad URL", &[]);
}

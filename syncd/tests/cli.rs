//! The syncd command line: argument errors and exit codes, without a master.

use std::process::{Command, Output};

fn syncd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_syncd")).args(args).output().expect("syncd runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_sync_command() {
    let o = syncd(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("sync"));
}

#[test]
fn missing_master_is_a_usage_error() {
    let o = syncd(&["sync", "--root", "/tmp"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--master"));
}

#[test]
fn nonexistent_root_is_a_config_error_naming_it() {
    let o = syncd(&["sync", "--insecure", "--master", "http://127.0.0.1:9", "--root", "/nonexistent/gis-root"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("/nonexistent/gis-root"), "{}", stderr(&o));
}

#[test]
fn root_that_is_a_file_is_a_config_error() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let o = syncd(&["sync", "--insecure", "--master", "http://127.0.0.1:9", "--root", f.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
}

#[test]
fn bad_master_url_is_a_config_error() {
    let d = tempfile::tempdir().unwrap();
    let o = syncd(&["sync", "--insecure", "--master", "not a url", "--root", d.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not a url"), "{}", stderr(&o));
}

#[test]
fn unreachable_master_exits_3_naming_the_url() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let d = tempfile::tempdir().unwrap();
    let o = syncd(&["sync", "--insecure", "--master", &url, "--root", d.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains(&url), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "nothing may be written");
}

#[test]
fn plain_http_and_unsigned_manifests_need_insecure() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().to_str().unwrap();
    // Plain TCP is refused by name, before any connection.
    let key = "ed25519:ddd66d3e4e01b66337f46958020f5acf635dcaf234e8a3888b9456af7a69b4ae";
    let o = syncd(&["sync", "--master", "http://127.0.0.1:9", "--root", root, "--trusted-key", key]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("plain TCP") && stderr(&o).contains("--insecure"), "{}", stderr(&o));
    // No trusted key means any manifest would do: refused unless --insecure.
    let o = syncd(&["sync", "--master", "https://127.0.0.1:9", "--root", root]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("trusted"), "{}", stderr(&o));
    // https without TLS material names what is missing.
    let o = syncd(&["sync", "--master", "https://127.0.0.1:9", "--root", root, "--trusted-key", key]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("tls_ca"), "{}", stderr(&o));
    // A malformed key names itself.
    let o = syncd(&[
        "sync",
        "--insecure",
        "--master",
        "http://127.0.0.1:9",
        "--root",
        root,
        "--trusted-key",
        "ed25519:beef",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("ed25519:beef"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "nothing may be written");
}

//! The syncmaster command line: start-up, the ready line, shutdown, bad input.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn missing_image_is_a_usage_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_syncmaster"))
        .args(["serve", "--insecure", "--image", "/nonexistent/gis-image", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/gis-image"));
}

#[test]
fn prints_its_address_once_ready_and_stops_on_sigterm() {
    let image = tempfile::tempdir().unwrap();
    std::fs::write(image.path().join("motd"), "hello\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncmaster"))
        .args(["serve", "--insecure", "--image", image.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr =
        line.trim().strip_prefix("listening on ").expect("ready line").parse().expect("an address");
    assert_ne!(addr.port(), 0, "port 0 must be resolved to the bound port");
    std::net::TcpStream::connect(addr).expect("the master accepts connections");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status:?}");
}

#[test]
fn refuses_plain_tcp_unless_insecure_and_a_readable_signing_key() {
    let image = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_syncmaster"))
            .args(["serve", "--image", image.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = serve(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--insecure"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = serve(&["--tls-cert", "/nonexistent/cert.pem"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("all three"));
    // A signing key others can read is refused, naming the file and the fix.
    let key = image.path().join("signing.key");
    let o = Command::new(env!("CARGO_BIN_EXE_syncmaster")).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ed25519:"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = serve(&["--insecure", "--signing-key", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"));
    // keygen never overwrites a key.
    let o = Command::new(env!("CARGO_BIN_EXE_syncmaster")).args(["keygen", "--out"]).arg(&key).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

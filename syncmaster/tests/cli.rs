//! The syncmaster command line: start-up, the ready line, shutdown, bad input.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn missing_image_is_a_usage_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_syncmaster"))
        .args(["serve", "--image", "/nonexistent/gis-image", "--listen", "127.0.0.1:0"])
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
        .args(["serve", "--image", image.path().to_str().unwrap(), "--listen", "127.0.0.1:0"])
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

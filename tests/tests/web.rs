//! The fleet page (`syncmaster serve --http-listen`), read by headless Chromium (Debian package
//! `chromium`) against a master with three real hosts: one daemon, one that stopped, one with
//! drift, and a rollout in its canary wave. The DOM must list each host with its state, and a
//! screenshot is taken. Under mTLS the page needs a client certificate from the same CA as
//! the gRPC port (checked with curl); the page and its JSON are read-only.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gis_tests::{flip, run_syncd, scratch, spawn_syncd_run, wait_until, Builder, KillOnDrop, Master, Pki, Scratch};

const WAIT: Duration = Duration::from_secs(60);

/// Headless Chromium as a test runs it: as root it needs --no-sandbox; a profile of its own.
fn chromium(s: &Scratch, args: &[&str]) -> std::process::Output {
    let profile = s.join("chromium-profile");
    Command::new("timeout")
        .args(["120", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run chromium: {e}"))
}

fn require_chromium() {
    let ok = Command::new("chromium").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "this test needs headless Chromium (hint: apt-get install chromium)");
}

fn image(dir: &Path, motd: &[u8], status: &[u8]) {
    Builder::new(dir)
        .dir("etc", 0o755)
        .file("etc/motd", 0o644, motd)
        .file("etc/app-status", 0o644, status)
        .dir("usr", 0o755)
        .file("usr/tool", 0o755, &[5u8; 4096])
        .finish();
}

/// `syncd run` as `host` (reconciling hourly: passes come from announcements), with a health
/// check that fails when the root's `etc/app-status` is not `ok`.
fn daemon(s: &Scratch, m: &Master, host: &str) -> KillOnDrop {
    let root = s.join(host);
    fs::create_dir_all(&root).unwrap();
    let cfg = s.join(format!("{host}.toml"));
    fs::write(
        &cfg,
        format!(
            "master = {:?}\nroot = {root:?}\nhost_id = {host:?}\nstate_dir = {:?}\nreconcile_interval = \"1h\"\n\
             reconcile_jitter = \"0s\"\nannounce_jitter = \"0s\"\nmax_backoff = \"1s\"\nhealth_grace = \"1s\"\n\
             [[health]]\nname = \"app\"\nrun = [\"/bin/sh\", \"-c\", \"read s < {root}/etc/app-status && [ \\\"$s\\\" = ok ] || {{ echo \\\"app: status is $s\\\"; exit 1; }}\"]\n",
            m.url(),
            s.join(format!("{host}-state")),
            root = root.display(),
        ),
    )
    .unwrap();
    spawn_syncd_run(&cfg, fs::File::create(s.join(format!("{host}.log"))).unwrap())
}

/// The `<tr class="host">` rows of the DOM Chromium dumped: (host, state, converged, changed).
fn host_rows(dom: &str) -> Vec<(String, String, String, String)> {
    dom.split("<tr ")
        .skip(1)
        .map(|t| t.split('>').next().unwrap())
        .filter(|t| t.contains("class=\"host\""))
        .map(|t| (attr(t, "data-host"), attr(t, "data-state"), attr(t, "data-converged"), attr(t, "data-changed")))
        .collect()
}

fn attr(tag: &str, name: &str) -> String {
    let k = format!(" {name}=\"");
    tag.find(&k).map(|i| tag[i + k.len()..].split('"').next().unwrap().to_owned()).unwrap_or_default()
}

#[test]
fn chromium_shows_three_real_hosts_with_their_states_and_the_halted_rollout() {
    require_chromium();
    let s = scratch();
    let images = s.dir("images");
    image(&images.join("v1"), b"version 1\n", b"ok\n");
    image(&images.join("v2"), b"version 2\n", b"broken\n");
    flip(&images, "v1");
    let hosts = s.join("hosts.toml");
    fs::write(
        &hosts,
        "[hosts.web01]\n[hosts.web02]\n[hosts.db01]\n\n[rollout]\ntimeout = \"10m\"\nmax_failures = 1\n\n\
         [[rollout.wave]]\nname = \"canary\"\nhosts = [\"db01\"]\nsoak = \"10m\"\n\n\
         [[rollout.wave]]\nname = \"rest\"\npercent = 100\n",
    )
    .unwrap();
    let state = s.dir("master-state");
    let m = Master::start_with(
        &[
            "--images",
            images.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--hosts",
            hosts.to_str().unwrap(),
            "--poll",
            "200ms",
            "--down-after",
            "3s",
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(OsStr::new),
    );
    let page = format!("http://{}/", m.http_addr().expect("the master printed `http on ADDR`"));
    let fleet = || {
        let (status, body) = gis_tests::http_get(&format!("{page}fleet.json"));
        assert!(status.contains(" 200 "), "{status}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let host = |v: &serde_json::Value, h: &str| {
        v["fleet"]["hosts"].as_array().unwrap().iter().find(|x| x["host_id"] == h).cloned().unwrap_or_default()
    };

    // web02 starts with a stale motd, so its one pass changes a file; then it stops and is
    // down after 3 s. web01 and db01 keep running.
    fs::create_dir_all(s.join("web02/etc")).unwrap();
    fs::write(s.join("web02/etc/motd"), b"stale\n").unwrap();
    let mut daemons: Vec<(&str, KillOnDrop)> =
        ["web01", "web02", "db01"].into_iter().map(|h| (h, daemon(&s, &m, h))).collect();
    let all_on_v1 = || {
        let v = fleet();
        ["web01", "web02", "db01"].iter().all(|h| host(&v, h)["converged"] == true)
    };
    assert!(wait_until(WAIT, all_on_v1), "{:#}\n{}", fleet(), m.stderr());
    daemons.retain(|(h, _)| *h != "web02");

    // v2 fails db01's health check: the canary fails, the rollout halts, nobody else moves.
    flip(&images, "v2");
    let halted = || {
        let v = fleet();
        v["rollout"]["rollout"]["state"] == "halted" && host(&v, "web02")["state"] == "down"
    };
    assert!(wait_until(WAIT, halted), "{:#}\n{}", fleet(), m.stderr());

    let out = chromium(&s, &["--dump-dom", &page]);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut rows = host_rows(&dom);
    rows.sort();
    let row = |h: &str, st: &str, conv: &str, changed: &str| (h.into(), st.into(), conv.into(), changed.into());
    assert_eq!(
        rows,
        vec![
            row("db01", "up", "no", &rows[0].3),
            row("web01", "up", "yes", "0"),
            row("web02", "down", "yes", &rows[2].3)
        ],
        "{dom}"
    );
    assert_ne!(rows[2].3, "0", "web02's pass replaced its stale motd: {dom}");
    // db01 rolled back by itself: it is on v1 again, and its last pass says so.
    assert!(dom.contains("data-host=\"db01\" data-state=\"up\" data-converged=\"no\" data-version=\"1\""), "{dom}");
    assert!(dom.contains("<td>rolled-back (v2)</td>"), "{dom}");
    // Each host's drift counts are its last report's.
    let v = fleet();
    for (h, _, _, changed) in &rows {
        assert_eq!(changed, &host(&v, h)["last_pass"]["changed"].to_string(), "{h}: {dom}");
    }
    assert!(dom.contains("<span id=\"image-version\">v2</span>"), "{dom}");
    assert!(dom.contains("id=\"rollout\" data-state=\"halted\" data-wave=\"0\""), "{dom}");
    let reason = v["rollout"]["rollout"]["halt"]["reason"].as_str().unwrap();
    assert!(
        dom.contains(&format!("<span id=\"halt-reason\">{}</span>", reason.replace('"', "&quot;"))),
        "{reason}\n{dom}"
    );
    assert!(dom.contains("app: status is broken"), "the failing check's output is not shown: {dom}");
    assert!(dom.contains("class=\"grant\" data-host=\"db01\" data-state=\"failed\""), "{dom}");
    assert!(dom.contains("data-wave=\"canary\" data-state=\"halted\""), "{dom}");
    assert!(dom.contains("data-wave=\"rest\" data-state=\"pending\""), "{dom}");
    assert!(dom.contains("http-equiv=\"refresh\""), "the page does not reload itself: {dom}");
    assert!(!dom.contains("<script"), "the page has no JavaScript: {dom}");

    // A screenshot, as a person would see it.
    let shot = s.join("fleet.png");
    let out = chromium(&s, &["--window-size=1280,800", &format!("--screenshot={}", shot.display()), &page]);
    assert!(out.status.success(), "chromium --screenshot failed: {}", String::from_utf8_lossy(&out.stderr));
    let png = fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{} bytes, not a rendered page", png.len());
    if let Ok(dir) = std::env::var("GIS_SCREENSHOT_DIR") {
        fs::copy(&shot, Path::new(&dir).join("fleet-page.png")).unwrap();
    }

    // The JSON is `syncmaster status --format json` and `rollout status --format json`.
    let mut names: Vec<&str> =
        v["fleet"]["hosts"].as_array().unwrap().iter().map(|h| h["host_id"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["db01", "web01", "web02"]);
    assert_eq!(v["rollout"]["rollout"]["waves"][0]["name"], "canary");

    // Read-only: no method but GET (and HEAD) is served, and nothing changed.
    for method in ["POST", "PUT", "DELETE"] {
        let reply = raw(m.http_addr().unwrap(), &format!("{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"));
        assert!(reply.starts_with("HTTP/1.1 405"), "{method} /: {reply}");
    }
    assert_eq!(fleet()["rollout"]["rollout"]["state"], "halted");
    drop(daemons);
}

/// One HTTP/1.1 request (`head` without the blank line), its whole reply.
fn raw(addr: &str, head: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "{head}Connection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

#[test]
fn under_mtls_the_page_needs_a_client_certificate_from_the_client_ca() {
    let s = scratch();
    let Some(pki) = Pki::new(&s) else { return };
    let img = s.dir("img");
    image(&img, b"hello\n", b"ok\n");
    let m = Master::start_with(
        &[
            "--image",
            img.to_str().unwrap(),
            "--tls-cert",
            &pki.path("master.pem"),
            "--tls-key",
            &pki.path("master.key"),
            "--client-ca",
            &pki.path("ca.pem"),
            "--http-listen",
            "127.0.0.1:0",
        ]
        .map(OsStr::new),
    );
    let root = s.dir("root");
    let mut args: Vec<String> = ["sync", "--master", &m.https_url(), "--root", root.to_str().unwrap(), "--insecure"]
        .map(str::to_owned)
        .to_vec();
    args.extend(pki.client("web01"));
    run_syncd(args).expect_code(0, &[&root]);

    let url = format!("https://{}/fleet.json", m.http_addr().unwrap());
    let curl = |cert: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "20", "--cacert", &pki.path("ca.pem")]);
        if let Some(cert) = cert {
            c.args(["--cert", &pki.path(&format!("{cert}.pem")), "--key", &pki.path(&format!("{cert}.key"))]);
        }
        c.arg(&url).output().expect("this test needs curl (hint: apt-get install curl)")
    };
    // A host's certificate (and the operator's) from the client CA: the fleet, as JSON.
    for cert in ["web01", "admin"] {
        let out = curl(Some(cert));
        assert!(out.status.success(), "{cert}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["fleet"]["hosts"][0]["host_id"], "web01", "{v}");
    }
    // No certificate, another CA's, an expired one: no page.
    for (cert, what) in
        [(None, "no certificate"), (Some("web01-evil"), "another CA's"), (Some("web01-expired"), "expired")]
    {
        let out = curl(cert);
        assert!(!out.status.success(), "{what}: served anyway: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "{what}: {}", String::from_utf8_lossy(&out.stdout));
    }
    // Plain HTTP to the TLS port gets nothing either.
    let reply = raw(m.http_addr().unwrap(), "GET /fleet.json HTTP/1.1\r\nHost: x\r\n");
    assert!(!reply.contains("web01"), "{reply}");
    assert!(
        wait_until(Duration::from_secs(5), || m.stderr().contains("fleet page: TLS handshake refused")),
        "{}",
        m.stderr()
    );
}

//! `syncmaster serve --http-listen ADDR`: the fleet page. One HTML page, rendered on the
//! master with no JavaScript at all, that reloads itself every [`REFRESH_SECS`]; and the same
//! data as JSON at `/fleet.json`. Both are read-only: the router has GET routes only, so
//! nothing reachable here changes the fleet.
//!
//! The port gets the gRPC port's transport rules. Under mTLS it serves HTTPS with the master's
//! certificate and requires a client certificate signed by `--client-ca`, exactly as reading
//! `syncmaster status` over gRPC does; with `--insecure` it is plain HTTP. Every string that
//! came from a host or an inventory (names, reasons, check output) is escaped.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderName;
use proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Control;
use crate::status::{ago, json_value, rollout_json_value, when};

/// How often the page reloads itself.
pub const REFRESH_SECS: u32 = 5;

/// A TLS handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The page's JSON: `{"fleet": <syncmaster status --format json>, "rollout": <syncmaster
/// rollout status --format json>}`.
pub fn data(fleet: &pb::StatusReply, rollout: &pb::RolloutStatusReply) -> serde_json::Value {
    serde_json::json!({ "fleet": json_value(fleet), "rollout": rollout_json_value(rollout) })
}

/// HTML-escapes `s` for text and for double-quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}\
.meta{color:#555}table{border-collapse:collapse;margin:.3em 0}\
th,td{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.up,.yes,.succeeded,.converged,.completed,.done{color:#17692b}\
.down,.granted,.soaking,.granting,.paused,.waiting,.pending{color:#8a5a00}\
.out,.no,.failed,.halted,.aborted,.rolled-back,.skipped{color:#b00020;font-weight:600}\
.halt{border:2px solid #b00020;padding:.5em 1em;margin:.6em 0;background:#fff5f5}\
pre{margin:.2em 0;white-space:pre-wrap;color:#444}";

/// The fleet page: the image version, every host, and the latest rollout.
pub fn page(f: &pb::StatusReply, r: &pb::RolloutStatusReply) -> String {
    let count = |st: &str| f.hosts.iter().filter(|h| h.state == st).count();
    let converged = f.hosts.iter().filter(|h| h.converged).count();
    let mut o = String::with_capacity(8192);
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    o.push_str(&format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">"));
    o.push_str(&format!("<title>fleet: image v{}</title><style>{STYLE}</style></head><body>\n", f.version));
    o.push_str(&format!(
        "<h1>Fleet: image <span id=\"image-version\">v{}</span></h1>\n<p class=\"meta\">identity {} &middot; baseline v{} &middot; \
         <span id=\"summary\">{} hosts: {converged} converged, {} up, {} down, {} out</span> &middot; \
         reloads every {REFRESH_SECS}s &middot; <a href=\"fleet.json\">JSON</a></p>\n",
        f.version,
        esc(&hex::encode(&f.identity)[..16.min(f.identity.len() * 2)]),
        f.baseline_version,
        f.hosts.len(),
        count("up"),
        count("down"),
        count("out"),
    ));
    o.push_str("<h2>Hosts</h2>\n");
    if f.hosts.is_empty() {
        o.push_str("<p id=\"no-hosts\">No host has reported yet.</p>\n");
    } else {
        o.push_str(
            "<table id=\"hosts\"><thead><tr><th>Host</th><th>State</th><th>Version</th><th>Target</th><th>Wave</th>\
             <th>Converged</th><th>Last seen</th><th>Missing</th><th>Changed</th><th>Extra</th><th>Excluded</th>\
             <th>Last pass</th><th>Failed triggers</th></tr></thead><tbody>\n",
        );
        for h in &f.hosts {
            let last = h.last.clone().unwrap_or_default();
            let seen = h.last.is_some();
            let num = |n: u64| if seen { n.to_string() } else { "-".into() };
            let result = if !seen {
                "(no pass yet)".to_owned()
            } else if last.dry_run {
                format!("{} (drift report, v{})", last.result, last.image_version)
            } else {
                format!("{} (v{})", last.result, last.image_version)
            };
            // The version it is on: its last converged pass's (a rolled-back pass is not).
            let on = (h.current_version != 0).then_some(h.current_version);
            let conv = if h.converged { "yes" } else { "no" };
            o.push_str(&format!(
                "<tr class=\"host\" data-host=\"{id}\" data-state=\"{st}\" data-converged=\"{conv}\" \
                 data-version=\"{ver}\" data-target=\"{tgt}\" data-missing=\"{mi}\" data-changed=\"{ch}\" data-extra=\"{ex}\">\
                 <td>{id}{conn}</td><td class=\"{st}\">{st}</td><td>{vtext}</td><td>v{tgt}</td><td>{wave}</td>\
                 <td class=\"{conv}\">{conv}</td><td>{seen_ago}</td><td class=\"n\">{mi}</td><td class=\"n\">{ch}</td>\
                 <td class=\"n\">{ex}</td><td class=\"n\">{exc}</td><td>{result}</td><td>{trig}</td></tr>\n",
                id = esc(&h.host_id),
                st = esc(&h.state),
                conn = if h.connected { " <small title=\"watching\">&#9679;</small>" } else { "" },
                ver = on.map(|v| v.to_string()).unwrap_or_default(),
                vtext = on.map_or_else(|| "-".to_owned(), |v| format!("v{v}")),
                tgt = h.target_version,
                wave = if h.wave.is_empty() { "-".into() } else { esc(&h.wave) },
                seen_ago = if h.last_seen_unix_ms == 0 { "never".into() } else { ago(f.now_unix_ms, h.last_seen_unix_ms) },
                mi = num(last.missing),
                ch = num(last.changed),
                ex = num(last.extra),
                exc = num(last.excluded),
                result = esc(&result),
                trig = esc(&last.failed_triggers.join(", ")),
            ));
        }
        o.push_str("</tbody></table>\n");
    }
    rollout_section(&mut o, r);
    o.push_str("</body></html>\n");
    o
}

fn rollout_section(o: &mut String, s: &pb::RolloutStatusReply) {
    o.push_str("<h2>Rollout</h2>\n");
    if !s.has_policy {
        o.push_str("<p class=\"meta\">No <code>[rollout]</code> policy in the inventory: a new version goes to every host at once.</p>\n");
    }
    let Some(r) = &s.rollout else {
        o.push_str(&format!("<p id=\"no-rollout\">No rollout yet; baseline v{}.</p>\n", s.baseline_version));
        return;
    };
    o.push_str(&format!(
        "<p id=\"rollout\" data-state=\"{st}\" data-wave=\"{cw}\">Rollout #{id}: v{from} &rarr; v{to}, \
         <span class=\"{st}\">{st}</span>{win}, started {started}{ended}; {granted} host(s) granted, \
         {failures} failure(s) counting towards a halt.</p>\n",
        st = esc(&r.state),
        cw = r.current_wave,
        id = r.id,
        from = r.from_version,
        to = r.version,
        win = if r.in_window { "" } else { " (window closed: no new grants)" },
        started = ago(s.now_unix_ms, r.started_unix_ms),
        ended = if r.ended_unix_ms != 0 {
            format!(", ended {}", ago(s.now_unix_ms, r.ended_unix_ms))
        } else {
            String::new()
        },
        granted = r.granted,
        failures = r.failures,
    ));
    if let Some(h) = &r.halt {
        o.push_str(&format!(
            "<div class=\"halt\" id=\"halt\"><b>{}</b> {}: <span id=\"halt-reason\">{}</span>\n",
            if r.state == "halted" { "Halted" } else { "Halted earlier" },
            ago(s.now_unix_ms, h.at_unix_ms),
            esc(&h.reason)
        ));
        for f in &h.failures {
            o.push_str(&format!("<p>{} (wave {}): {}", esc(&f.host_id), f.wave, esc(&f.reason)));
            if !f.check.is_empty() {
                o.push_str(&format!("<br>check: <code>{}</code>", esc(&f.check)));
            }
            o.push_str("</p>");
            if !f.output_tail.is_empty() {
                o.push_str(&format!("<pre>{}</pre>", esc(&f.output_tail)));
            }
            o.push('\n');
        }
        if r.state == "halted" {
            o.push_str(
                "<p class=\"meta\">On the master: <code>syncmaster rollout abort</code> sends these hosts back; \
                 <code>syncmaster rollout resume</code> acknowledges the failures and goes on.</p>\n",
            );
        }
        o.push_str("</div>\n");
    }
    o.push_str(
        "<table id=\"waves\"><thead><tr><th>#</th><th>Wave</th><th>State</th><th>Max at once</th><th>Hosts</th></tr></thead><tbody>\n",
    );
    for (i, w) in r.waves.iter().enumerate() {
        let hosts: Vec<String> = w
            .hosts
            .iter()
            .map(|h| {
                format!(
                    "<span class=\"grant\" data-host=\"{id}\" data-state=\"{st}\">{id}: <span class=\"{st}\">{st}</span>{why}</span>",
                    id = esc(&h.host_id),
                    st = esc(&h.state),
                    why = if h.reason.is_empty() { String::new() } else { format!(" ({})", esc(&h.reason)) },
                )
            })
            .collect();
        let soak = if w.state == "soaking" {
            format!(", soak ends {}", when(s.now_unix_ms, w.soak_until_unix_ms))
        } else {
            String::new()
        };
        o.push_str(&format!(
            "<tr class=\"wave\" data-wave=\"{name}\" data-state=\"{st}\"><td>{mark}{i}</td><td>{name}</td>\
             <td class=\"{st}\">{st}{soak}</td><td class=\"n\">{mc}</td><td>{hosts}</td></tr>\n",
            mark = if i as u32 == r.current_wave { "&#9654; " } else { "" },
            name = esc(&w.name),
            st = esc(&w.state),
            mc = w.max_concurrent,
            hosts = hosts.join("<br>"),
        ));
    }
    o.push_str("</tbody></table>\n");
}

/// The HTTPS side of `--tls-cert`, `--tls-key` and `--client-ca`: the same certificate, and
/// client certificates required and checked against the same CA as on the gRPC port.
pub fn tls_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect())
        .map_err(|e| format!("certificate {}: {e} (hint: see README, Trust: certificates)", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("private key {}: {e} (hint: see README, Trust: certificates)", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .map_err(|e| format!("client CA certificate {}: {e}", client_ca.display()))?
    {
        let ca = ca.map_err(|e| format!("client CA certificate {}: {e}", client_ca.display()))?;
        roots.add(ca).map_err(|e| format!("client CA certificate {}: {e}", client_ca.display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("client CA certificate {}: {e}", client_ca.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration refused: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate {} and its key: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Connections whose TLS handshake (client certificate checked) has finished. Handshakes run
/// on tasks of their own, so one slow or silent client holds up no other.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: back off rather than spin.
                        tracing::warn!("fleet page: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, ready) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, "fleet page: TLS handshake refused: {e}"),
                        Err(_) => tracing::info!(%peer, "fleet page: TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(TlsListener { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ends only when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A GET route answering with `render` of the fleet and the rollout, read off the async
/// workers, as `ctype`.
fn view(
    control: Arc<Control>,
    ctype: &'static str,
    render: fn(&pb::StatusReply, &pb::RolloutStatusReply) -> String,
) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let c = control.clone();
        async move {
            let body = tokio::task::spawn_blocking(move || render(&c.fleet_status(), &c.rollout_status()))
                .await
                .unwrap_or_default();
            let headers = [
                (CONTENT_TYPE, ctype),
                (CACHE_CONTROL, "no-store"),
                // No script, no frame, nothing fetched: the page is its own markup and style.
                (
                    HeaderName::from_static("content-security-policy"),
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'none'",
                ),
                (HeaderName::from_static("x-content-type-options"), "nosniff"),
                (HeaderName::from_static("referrer-policy"), "no-referrer"),
            ];
            (headers, body)
        }
    })
}

fn router(control: Arc<Control>) -> axum::Router {
    axum::Router::new().route("/", view(control.clone(), "text/html; charset=utf-8", page)).route(
        "/fleet.json",
        view(control, "application/json", |f, r| serde_json::to_string_pretty(&data(f, r)).unwrap_or_default() + "\n"),
    )
}

/// Serves the page on `listener` until `stopped` turns true: HTTPS with client certificates
/// under `tls`, else plain HTTP.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    control: Arc<Control>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = router(control);
    let stop = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    match tls {
        Some(config) => axum::serve(TlsListener::new(listener, config)?, app).with_graceful_shutdown(stop).await,
        None => axum::serve(listener, app).with_graceful_shutdown(stop).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> pb::StatusReply {
        pb::StatusReply {
            version: 7,
            identity: vec![0xab; 32].into(),
            now_unix_ms: 100_000,
            hosts: vec![
                pb::HostStatus {
                    host_id: "web01".into(),
                    state: "up".into(),
                    converged: true,
                    last_seen_unix_ms: 99_000,
                    last: Some(pb::PassResult { image_version: 7, result: "converged".into(), ..Default::default() }),
                    connected: true,
                    target_version: 7,
                    ..Default::default()
                },
                pb::HostStatus {
                    host_id: "<script>alert(1)</script>".into(),
                    state: "down".into(),
                    target_version: 7,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn the_page_lists_every_host_and_escapes_what_hosts_sent() {
        let rollout = pb::RolloutStatusReply {
            rollout: Some(pb::Rollout {
                id: 3,
                version: 7,
                from_version: 6,
                state: "halted".into(),
                halt: Some(pb::Halt {
                    reason: "1 failure in wave \"canary\" (max 0)".into(),
                    failures: vec![pb::HostFailure {
                        host_id: "web01".into(),
                        reason: "health check \"app\" failed: exit 1".into(),
                        output_tail: "<b>boom</b>".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                waves: vec![pb::WaveStatus {
                    name: "canary".into(),
                    state: "granting".into(),
                    max_concurrent: 1,
                    hosts: vec![pb::HostGrant {
                        host_id: "web01".into(),
                        state: "failed".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            has_policy: true,
            ..Default::default()
        };
        let html = page(&fleet(), &rollout);
        assert!(html.contains("data-host=\"web01\" data-state=\"up\" data-converged=\"yes\""), "{html}");
        assert!(html.contains("data-host=\"&lt;script&gt;alert(1)&lt;/script&gt;\" data-state=\"down\""), "{html}");
        assert!(!html.contains("<script>") && !html.contains("<b>boom"), "{html}");
        assert!(
            html.contains("<span id=\"halt-reason\">1 failure in wave &quot;canary&quot; (max 0)</span>"),
            "{html}"
        );
        assert!(html.contains("data-wave=\"canary\" data-state=\"granting\""), "{html}");
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"), "{html}");
        let json = data(&fleet(), &rollout);
        assert_eq!(json["fleet"]["hosts"][1]["host_id"], "<script>alert(1)</script>");
        assert_eq!(json["rollout"]["rollout"]["halt"]["failures"][0]["host_id"], "web01");
    }

    #[test]
    fn a_fleet_without_hosts_or_rollouts_says_so() {
        let html = page(&pb::StatusReply::default(), &pb::RolloutStatusReply::default());
        assert!(html.contains("id=\"no-hosts\"") && html.contains("id=\"no-rollout\""), "{html}");
    }
}

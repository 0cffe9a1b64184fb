//! Binding the ports (gRPC, metrics, fleet page) and serving until shutdown, with the rollout
//! engine's clock and systemd's watchdog.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::service::{Security, Service};
use crate::{control, fleet, metrics, render, status, web};

/// Where [`serve`] listens (port 0 picks a free port), or, once bound, where it listens.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// gRPC: hosts and the CLI.
    pub grpc: SocketAddr,
    /// Prometheus `/metrics` (plain HTTP), if any.
    pub metrics: Option<SocketAddr>,
    /// The fleet page ([`web`]), if any: HTTPS with client certificates under mTLS.
    pub http: Option<SocketAddr>,
}

async fn bind(addr: Option<SocketAddr>, flag: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(a) => {
            Ok(Some(TcpListener::bind(a).await.map_err(|e| anyhow::anyhow!("cannot listen on {a} ({flag}): {e}"))?))
        }
        None => Ok(None),
    }
}

/// Binds every address in `listen`, calls `on_ready` with the bound addresses, and serves
/// until `shutdown` resolves.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    control: Arc<control::Control>,
    fleet: Arc<fleet::Fleet>,
    renders: Arc<render::Renders>,
    listen: Listen,
    zstd_level: i32,
    security: Security,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Listen),
) -> anyhow::Result<()> {
    let listener = bind(Some(listen.grpc), "--listen").await?.expect("bound");
    let metrics_listener = bind(listen.metrics, "--metrics-listen").await?;
    let http_listener = bind(listen.http, "--http-listen").await?;
    let bound = Listen {
        grpc: listener.local_addr()?,
        metrics: metrics_listener.as_ref().map(|l| l.local_addr()).transpose()?,
        http: http_listener.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // The rollout engine's clock: grants, timeouts and soaks move on without any host asking.
    // It also pings systemd's watchdog (a `Type=notify` unit with `WatchdogSec`): an engine
    // step that hangs (a stuck database, say) stops the pings, and systemd restarts the master.
    {
        let control = control.clone();
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let ping_every = sd_notify::watchdog_enabled().map(|d| d / 2);
            let (mut pinged, mut told) = (std::time::Instant::now(), std::time::Instant::now());
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let c = control.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || c.tick()).await {
                    tracing::error!("rollout engine step failed: {e}");
                    continue;
                }
                if ping_every.is_some_and(|p| pinged.elapsed() >= p) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    pinged = std::time::Instant::now();
                }
                if told.elapsed() >= std::time::Duration::from_secs(5) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status::notify_line(&control))]);
                    told = std::time::Instant::now();
                }
            }
        });
    }
    if let Some(l) = metrics_listener {
        let (control, stopped) = (control.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(l, control, stopped).await {
                tracing::error!("the metrics listener stopped: {e}");
            }
        });
    }
    if let Some(l) = http_listener {
        let (control, stopped, tls) = (control.clone(), stop_rx.clone(), security.web_tls.clone());
        tokio::spawn(async move {
            if let Err(e) = web::serve(l, tls, control, stopped).await {
                tracing::error!("the fleet page's listener stopped: {e}");
            }
        });
    }
    let control_for_status = control.clone();
    let service = Service::new(control, fleet, renders, zstd_level, &security, stop_rx);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        builder = builder.tls_config(tls).map_err(|e| anyhow::anyhow!("TLS configuration refused: {e}"))?;
    }
    on_ready(bound);
    // Scanned and listening: systemd may start what depends on the master.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status::notify_line(&control_for_status)),
    ]);
    builder
        .add_service(service.into_server())
        // No Nagle: a header-only manifest reply must not wait for the host's delayed ACK
        // (40 ms on Linux, a quarter of a no-change pass).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(std::time::Duration::from_secs(60))),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )
        .await?;
    Ok(())
}

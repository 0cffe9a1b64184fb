//! What the `syncd` and `syncmaster` command lines share, kept once: how they log, how they
//! take a stop request, and the man pages and completions made from their clap definitions.

pub mod assets;

/// Logs to stderr (colours only on a terminal), filtered by `RUST_LOG`, else by `default`.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A future that resolves at the first SIGINT or SIGTERM. The handlers are installed when this
/// is called (so call it early: a signal sent before would take the default action, death),
/// not when the future is first polled.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

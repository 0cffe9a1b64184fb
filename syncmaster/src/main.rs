//! `syncmaster`: command line over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "syncmaster", version, about = "Serve a golden root image to syncd hosts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Scan a golden root tree and serve it over gRPC until SIGINT or SIGTERM.
    Serve {
        /// Top directory of the golden root tree.
        #[arg(long, value_name = "DIR")]
        image: PathBuf,
        /// Address to listen on; port 0 picks a free port (printed once ready).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7411")]
        listen: SocketAddr,
        /// Version number announced for this image.
        #[arg(long, value_name = "N", default_value_t = 1)]
        image_version: u64,
        /// Host inventory (TOML): groups and hosts with their exclusion lists.
        #[arg(long, value_name = "FILE")]
        hosts: Option<PathBuf>,
        /// zstd level for objects on the wire (1-22).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd_level: i32,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { image, listen, image_version, zstd_level, hosts } => {
            if !image.is_dir() {
                eprintln!(
                    "syncmaster: image {} is not a directory (hint: pass the top of a root tree)",
                    image.display()
                );
                return ExitCode::from(2);
            }
            // Validate configuration before scanning or opening a port.
            let inventory = match hosts.as_deref().map(syncmaster::inventory::Inventory::load).transpose() {
                Ok(inv) => inv.unwrap_or_default(),
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            let rt = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
            match rt.block_on(serve(image, Arc::new(inventory), listen, image_version, zstd_level)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("syncmaster: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn serve(
    image: PathBuf,
    inventory: Arc<syncmaster::inventory::Inventory>,
    listen: SocketAddr,
    version: u64,
    zstd_level: i32,
) -> anyhow::Result<()> {
    // Install the handlers before anything else, so a signal sent right after the ready line
    // is a clean shutdown rather than the default kill.
    let shutdown = shutdown_signal()?;
    let started = std::time::Instant::now();
    let scanned = {
        let image = image.clone();
        tokio::task::spawn_blocking(move || syncmaster::Image::scan(&image, version)).await??
    };
    tracing::info!(
        image = %image.display(),
        version,
        entries = scanned.manifest.entries.len(),
        bytes = scanned.manifest.content_bytes(),
        identity = %scanned.manifest.identity(),
        secs = started.elapsed().as_secs_f64(),
        "image scanned"
    );
    syncmaster::serve(Arc::new(scanned), inventory, listen, zstd_level, shutdown, |addr| {
        // A stable, parseable line for scripts and tests; logs go to stderr.
        println!("listening on {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, "serving");
    })
    .await
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

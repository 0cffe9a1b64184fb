//! `syncmaster`: command line over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use syncmaster::{fleet, inventory, publish};

#[derive(Parser)]
#[command(name = "syncmaster", version, about = "Serve a golden root image to syncd hosts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn duration(s: &str) -> Result<Duration, String> {
    manifest::units::parse_duration(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Scan a golden root tree and serve it over gRPC until SIGINT or SIGTERM.
    Serve {
        /// Serve this tree, scanned once at start.
        #[arg(long, value_name = "DIR", required_unless_present = "images", conflicts_with = "images")]
        image: Option<PathBuf>,
        /// Serve DIR/current (a symlink to a version directory); flipping the symlink publishes.
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
        /// Address to listen on; port 0 picks a free port (printed once ready).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7411")]
        listen: SocketAddr,
        /// State directory: the last version number and the hash cache
        /// [default with --images: /var/lib/syncmaster; with --image: none].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Lowest version number to announce.
        #[arg(long, value_name = "N", default_value_t = 1)]
        image_version: u64,
        /// How often to check DIR/current (with --images).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
        poll: Duration,
        /// Host inventory (TOML): groups and hosts with their exclusion lists.
        #[arg(long, value_name = "FILE")]
        hosts: Option<PathBuf>,
        /// A host not seen for this long is `down`.
        #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = duration)]
        down_after: Duration,
        /// A host not seen for this long is `out`.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
        out_after: Duration,
        /// zstd level for objects on the wire (1-19).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
    },
    /// Show the fleet as a running master sees it: one row per host.
    Status {
        /// URL of the running master.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:7411")]
        master: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
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
    let rt = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    match cli.cmd {
        Cmd::Serve {
            image,
            images,
            listen,
            state_dir,
            image_version,
            poll,
            hosts,
            down_after,
            out_after,
            zstd_level,
        } => {
            // Validate configuration before scanning or opening a port.
            let tree = match (&image, &images) {
                (Some(dir), _) => dir.clone(),
                // Resolved once, so a flip during the first scan cannot mix two trees.
                (None, Some(dir)) => match std::fs::read_link(dir.join("current")) {
                    Ok(target) => dir.join(target),
                    Err(e) => {
                        eprintln!(
                            "syncmaster: cannot read {}: {e} (hint: IMAGES/current must be a symlink to a version directory)",
                            dir.join("current").display()
                        );
                        return ExitCode::from(2);
                    }
                },
                (None, None) => unreachable!("clap requires one"),
            };
            if !tree.is_dir() {
                let hint = if images.is_some() {
                    "hint: DIR/current must be a symlink to a version directory"
                } else {
                    "hint: pass the top of a root tree"
                };
                eprintln!("syncmaster: image {} is not a directory ({hint})", tree.display());
                return ExitCode::from(2);
            }
            let inventory = match hosts.as_deref().map(inventory::Inventory::load).transpose() {
                Ok(inv) => inv.unwrap_or_default(),
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            let state_dir = state_dir.or_else(|| images.as_ref().map(|_| PathBuf::from("/var/lib/syncmaster")));
            let opts =
                ServeOpts { tree, images, listen, state_dir, image_version, poll, down_after, out_after, zstd_level };
            match rt.block_on(serve(opts, Arc::new(inventory))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("syncmaster: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Status { master, format } => match rt.block_on(status(&master, format)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("syncmaster: {e:#}");
                ExitCode::from(3)
            }
        },
    }
}

struct ServeOpts {
    tree: PathBuf,
    images: Option<PathBuf>,
    listen: SocketAddr,
    state_dir: Option<PathBuf>,
    image_version: u64,
    poll: Duration,
    down_after: Duration,
    out_after: Duration,
    zstd_level: i32,
}

async fn serve(o: ServeOpts, inventory: Arc<inventory::Inventory>) -> anyhow::Result<()> {
    // Install the handlers before anything else, so a signal sent right after the ready line
    // is a clean shutdown rather than the default kill.
    let shutdown = shutdown_signal()?;
    let started = std::time::Instant::now();
    let mut versions = publish::Versions::open(o.state_dir.as_deref(), o.image_version)?;
    let tree = o.tree.clone();
    let (versions, scanned) = tokio::task::spawn_blocking(move || {
        let r = versions.scan(&tree);
        (versions, r)
    })
    .await?;
    let scanned = scanned?;
    tracing::info!(
        image = %o.tree.display(),
        version = scanned.manifest.version,
        entries = scanned.manifest.entries.len(),
        bytes = scanned.manifest.content_bytes(),
        identity = %scanned.manifest.identity(),
        secs = started.elapsed().as_secs_f64(),
        "image scanned"
    );
    let published = Arc::new(publish::Published::new(scanned));
    if let Some(images) = o.images {
        let w = publish::watch_current(images, published.clone(), Arc::new(Mutex::new(versions)), o.poll);
        tokio::spawn(w);
    }
    let fleet = Arc::new(fleet::Fleet::new(o.down_after, o.out_after));
    syncmaster::serve(published, fleet, inventory, o.listen, o.zstd_level, shutdown, |addr| {
        // A stable, parseable line for scripts and tests; logs go to stderr.
        println!("listening on {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, "serving");
    })
    .await
}

async fn status(url: &str, format: Format) -> anyhow::Result<()> {
    use proto::v1::image_sync_client::ImageSyncClient;
    let mut client = ImageSyncClient::connect(url.to_owned())
        .await
        .map_err(|e| anyhow::anyhow!("master {url} is unreachable: {e} (hint: is syncmaster serve running there?)"))?;
    let s = client.fleet_status(proto::v1::StatusRequest {}).await?.into_inner();
    let out = match format {
        Format::Json => syncmaster::status::json(&s),
        Format::Text => syncmaster::status::table(&s),
    };
    print!("{out}");
    Ok(())
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

//! `syncd`: command line over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use syncd::{exit, SyncOptions};

#[derive(Parser)]
#[command(name = "syncd", version, about = "Converge this host's root to the golden image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one convergence pass and exit.
    Sync {
        /// URL of syncmaster, e.g. http://10.0.0.1:7411.
        #[arg(long, value_name = "URL")]
        master: String,
        /// Root to converge.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print what would change, itemized like `rsync -i`, and change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Name this host gives the master (default: the hostname).
        #[arg(long, value_name = "NAME")]
        host_id: Option<String>,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Sync { master, root, dry_run, host_id, quiet } => {
            let host_id = host_id.unwrap_or_else(default_host_id);
            let opts = SyncOptions { master, root, host_id, dry_run };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("syncd: cannot start the async runtime: {e}");
                    return ExitCode::from(exit::PARTIAL);
                }
            };
            match rt.block_on(syncd::sync_once(&opts)) {
                Ok(report) => {
                    if !quiet {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        for l in report.lines() {
                            let _ = writeln!(out, "{l}");
                        }
                    }
                    for f in report.failures() {
                        eprintln!("syncd: error: {}: {}", f.path, f.error);
                    }
                    eprintln!("syncd: {}", report.summary());
                    ExitCode::from(report.exit_code())
                }
                Err(e) => {
                    eprintln!("syncd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

fn default_host_id() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

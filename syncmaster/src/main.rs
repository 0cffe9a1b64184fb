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

/// `--chunk-threshold`: 0, or at least 256 KiB (the largest chunk).
fn chunk_threshold(s: &str) -> Result<u64, String> {
    let n = throttle::parse_bytes(s)?;
    if n != 0 && n < 256 << 10 {
        return Err(format!("{s} is below 256KiB, the largest chunk (hint: 16MiB, or 0 to chunk no file)"));
    }
    Ok(n)
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
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
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, read-only; port 0 picks
        /// a free port, printed once ready as "metrics on ADDR"). Default: none.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// Serve the fleet page at /, and its data at /fleet.json (read-only; HTTPS requiring a
        /// client certificate from --client-ca, as on the gRPC port; plain HTTP with
        /// --insecure; port 0 picks a free port, printed once ready as "http on ADDR").
        /// Default: none.
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<SocketAddr>,
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
        /// zstd level at which each published image's objects are compressed once, in the
        /// background, for every host (1-19); 0 compresses per request only.
        #[arg(long, value_name = "N", default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
        cache_level: i32,
        /// Most memory the compressed objects may take (`512MiB`, `2GiB`); objects beyond it
        /// are compressed per request.
        #[arg(long, value_name = "BYTES", default_value = "1GiB", value_parser = throttle::parse_bytes)]
        cache_size: u64,
        /// Sign every manifest with this ed25519 key (made by `syncmaster keygen`).
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// How long a manifest signature stays valid; hosts refuse it after that (freeze attack).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
        signature_ttl: Duration,
        /// Upload every version's objects to this store (`s3://BUCKET/PREFIX`, credentials from
        /// the AWS_* variables; or `file:///DIR`) before announcing the version. See README,
        /// Object store.
        #[arg(long, value_name = "URL")]
        object_store: Option<String>,
        /// The store's location as hosts will see it, sent in every manifest header
        /// [default: the --object-store URL].
        #[arg(long, value_name = "URL", requires = "object_store")]
        object_store_public_url: Option<String>,
        /// Objects uploaded at a time.
        #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
        object_store_concurrency: u16,
        /// With --object-store: regular files of at least this size (`16MiB`, at least `256KiB`)
        /// are stored as content-defined chunks plus a chunk index, so hosts fetch only the
        /// chunks they lack; `0`: no file is chunked. See README, Object store.
        #[arg(long, value_name = "BYTES", default_value = "16MiB", value_parser = chunk_threshold)]
        chunk_threshold: u64,
        /// Objects smaller than this also go into packs in the object store, with a pack index
        /// per version, so a host fetches them in a few range GETs (`0`: no packs).
        #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = throttle::parse_bytes)]
        pack_max_object: u64,
        /// A pack is cut once it holds this many bytes.
        #[arg(long, value_name = "BYTES", default_value = "8MiB", value_parser = throttle::parse_bytes)]
        pack_size: u64,
        #[command(flatten)]
        tls: ServerTls,
    },
    /// Show the fleet as a running master sees it: one row per host.
    Status {
        /// URL of the running master (https:// with mTLS; http:// needs --insecure).
        #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:7411")]
        master: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        tls: ClientTls,
    },
    /// Show or steer the newest rollout on a running master (same mTLS rules as `status`; every
    /// action is logged with its caller).
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Make an ed25519 signing key: the secret goes to FILE (mode 0600, never overwritten), the
    /// public key (for syncd's trusted_keys) to FILE.pub and stdout.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print a host's context data from the inventory, merged ([vars], then its groups' in its
    /// order, then its own), with the level each key came from.
    Vars {
        /// Host inventory (TOML), as given to `serve --hosts`.
        #[arg(long, value_name = "FILE", default_value = "/etc/syncmaster/hosts.toml")]
        hosts: PathBuf,
        /// The host, as named in the inventory.
        host: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Write man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// The rollout, each wave's hosts, and why it halted.
    Status {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Stop granting the new version (hosts already granted carry on).
    Pause {
        #[command(flatten)]
        remote: Remote,
        /// Why, for the event log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Go on granting after a pause or a halt; the failures that halted it are acknowledged.
    Resume {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Stop the rollout and send every host that took the new version back to the version it
    /// had (re-published under a new number, so hosts accept it without --allow-downgrade).
    Abort {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The event log: grants, successes, failures, halts and operator actions, oldest first.
    Log {
        #[command(flatten)]
        remote: Remote,
        /// Only events after this id.
        #[arg(long, value_name = "ID", default_value_t = 0)]
        after: u64,
        /// Text, or JSON (one object a line).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// Where the running master is, and how to reach it.
#[derive(clap::Args)]
struct Remote {
    /// URL of the running master (https:// with mTLS; http:// needs --insecure).
    #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:7411")]
    master: String,
    #[command(flatten)]
    tls: ClientTls,
}

/// Transport security of `serve`: mTLS, or plain TCP only when asked for by name.
#[derive(clap::Args)]
struct ServerTls {
    /// This master's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA whose certificates hosts must present; a host's identity is its certificate's name.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Serve plain TCP without TLS (tests and demos only): hosts are who they claim to be.
    #[arg(long)]
    insecure: bool,
    /// Under mTLS, a certificate name that may pause, resume and abort rollouts (repeatable);
    /// reading the status is open to every certificate --client-ca signed.
    #[arg(long = "operator", value_name = "NAME")]
    operators: Vec<String>,
}

/// Transport security of a client of the master.
#[derive(clap::Args)]
struct ClientTls {
    /// CA that signed the master's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Allow a plain http:// master (tests and demos only).
    #[arg(long)]
    insecure: bool,
}

impl ServerTls {
    fn config(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, String> {
        match (&self.tls_cert, &self.tls_key, &self.client_ca, self.insecure) {
            (None, None, None, true) => {
                tracing::warn!("--insecure: serving plain TCP; anyone who can connect can claim to be any host");
                Ok(None)
            }
            (Some(c), Some(k), Some(ca), false) => proto::tls::server(c, k, ca).map(Some),
            (None, None, None, false) => Err("refusing to serve without TLS: give --tls-cert, --tls-key and --client-ca (see README, Trust), or --insecure for a test or demo".into()),
            (_, _, _, true) => Err("--insecure cannot be combined with --tls-cert/--tls-key/--client-ca".into()),
            _ => Err("mTLS needs all three of --tls-cert, --tls-key and --client-ca".into()),
        }
    }
}

impl ServerTls {
    /// The fleet page's HTTPS from the same files (checked by [`ServerTls::config`] first).
    fn web_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        match (&self.tls_cert, &self.tls_key, &self.client_ca) {
            (Some(c), Some(k), Some(ca)) => syncmaster::web::tls_config(c, k, ca).map(Some),
            _ => Ok(None),
        }
    }
}

impl ClientTls {
    fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, String> {
        let e =
            tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| format!("master URL {url:?}: {e}"))?;
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(c), Some(k)) => {
                e.tls_config(proto::tls::client(ca, c, k)?).map_err(|e| format!("TLS configuration refused: {e}"))
            }
            (None, None, None) if self.insecure && url.starts_with("http://") => Ok(e),
            (None, None, None) => Err(format!(
                "no TLS material for {url} (hint: --tls-ca, --tls-cert and --tls-key; or an http:// URL with --insecure)"
            )),
            _ => Err("mTLS needs all three of --tls-ca, --tls-cert and --tls-key".into()),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn main() -> ExitCode {
    cmdline::init_logging("info");
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    match cli.cmd {
        Cmd::GenerateAssets { dir } => {
            use clap::CommandFactory;
            match cmdline::assets::generate(Cli::command(), &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("syncmaster: cannot write man pages and completions into {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Serve {
            image,
            images,
            listen,
            metrics_listen,
            http_listen,
            state_dir,
            image_version,
            poll,
            hosts,
            down_after,
            out_after,
            zstd_level,
            cache_level,
            cache_size,
            signing_key,
            signature_ttl,
            object_store,
            object_store_public_url,
            object_store_concurrency,
            chunk_threshold,
            pack_max_object,
            pack_size,
            tls,
        } => {
            // Validate configuration before scanning or opening a port.
            let tls_operators = tls.operators.clone();
            let (tls, web_tls) = match tls.config().and_then(|t| Ok((t, tls.web_config()?))) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            let signing_key = match signing_key.as_deref().map(manifest::trust::SigningKey::load).transpose() {
                Ok(k) => k.map(Arc::new),
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            match &signing_key {
                Some(k) => tracing::info!(key = %k.public(), ttl = ?signature_ttl, "signing manifests"),
                None => {
                    tracing::warn!("no --signing-key: manifests are unsigned, and hosts with trusted_keys refuse them")
                }
            }
            if tls.is_some() && tls_operators.is_empty() {
                tracing::warn!("no --operator: nobody can pause, resume or abort a rollout over mTLS");
            }
            // Objects are stored as they are sent: at the cache level when there is a cache.
            let store_level = if cache_level > 0 { cache_level } else { zstd_level };
            let store = match object_store
                .as_deref()
                .map(|u| {
                    syncmaster::objstore::ObjectStoreTarget::new(u, object_store_concurrency.into(), store_level)
                        .map(|t| t.with_chunk_threshold(chunk_threshold))
                })
                .transpose()
            {
                Ok(s) => s.map(|s| {
                    let packs = (pack_max_object > 0).then_some(syncmaster::objstore::PackConfig {
                        max_object: pack_max_object,
                        pack_size: pack_size.max(1),
                    });
                    Arc::new(s.with_packs(packs))
                }),
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(match e {
                        syncmaster::objstore::OpenError::BadUrl(_) => 2,
                        syncmaster::objstore::OpenError::Unreachable(_) => 1,
                    });
                }
            };
            let chunk_threshold = if store.is_some() { chunk_threshold } else { 0 };
            let object_store_url = object_store_public_url.or(object_store).unwrap_or_default();
            let security = syncmaster::Security {
                signing_key,
                signature_ttl,
                tls,
                web_tls,
                operators: tls_operators,
                object_store_url,
                chunk_threshold,
            };
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
            if let (Some(p), None) = (&inventory.policy, &images) {
                eprintln!(
                    "syncmaster: {} has a [rollout] policy, which needs --images DIR (each version in its own directory, so older versions stay servable); with --image there is only one tree",
                    p.source
                );
                return ExitCode::from(2);
            }
            let state_dir = state_dir.or_else(|| images.as_ref().map(|_| PathBuf::from("/var/lib/syncmaster")));
            let opts = ServeOpts {
                tree,
                hosts: hosts.clone(),
                images,
                listen: syncmaster::Listen { grpc: listen, metrics: metrics_listen, http: http_listen },
                state_dir,
                image_version,
                poll,
                down_after,
                out_after,
                zstd_level,
                cache: (cache_level > 0 && cache_size > 0)
                    .then_some(syncmaster::objcache::CacheConfig { level: cache_level, max_bytes: cache_size }),
                security,
                store,
            };
            match rt.block_on(serve(opts, Arc::new(inventory))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("syncmaster: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Status { master, format, tls } => {
            let endpoint = match tls.endpoint(&master) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(status(&master, endpoint, format)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("syncmaster: {e:#}");
                    ExitCode::from(3)
                }
            }
        }
        Cmd::Rollout { cmd } => {
            let remote = match &cmd {
                RolloutCmd::Status { remote, .. }
                | RolloutCmd::Pause { remote, .. }
                | RolloutCmd::Resume { remote, .. }
                | RolloutCmd::Abort { remote, .. }
                | RolloutCmd::Log { remote, .. } => remote,
            };
            let endpoint = match remote.tls.endpoint(&remote.master) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            let url = remote.master.clone();
            match rt.block_on(rollout(&url, endpoint, cmd)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(RemoteError::Refused(m)) => {
                    eprintln!("syncmaster: refused: {m}");
                    ExitCode::from(4)
                }
                Err(RemoteError::Other(e)) => {
                    eprintln!("syncmaster: {e:#}");
                    ExitCode::from(3)
                }
            }
        }
        Cmd::Vars { hosts, host, format } => {
            let inv = match inventory::Inventory::load(&hosts) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("syncmaster: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(v) = inv.vars_for(&host) else {
                eprintln!(
                    "syncmaster: {} names no host {host:?} (hint: its hosts are {})",
                    hosts.display(),
                    inv.hosts().join(", ")
                );
                return ExitCode::from(2);
            };
            let text = match format {
                Format::Text => syncmaster::render::vars_text(&host, inv.groups_of(&host), v),
                Format::Json => syncmaster::render::vars_json(&host, inv.groups_of(&host), v) + "\n",
            };
            print!("{text}");
            ExitCode::SUCCESS
        }
        Cmd::Keygen { out } => {
            let key = manifest::trust::SigningKey::generate();
            let public = key.public().to_string();
            let pub_path = PathBuf::from(format!("{}.pub", out.display()));
            if let Err(e) = key.save(&out) {
                eprintln!("syncmaster: cannot write {}: {e} (an existing key is never overwritten)", out.display());
                return ExitCode::from(2);
            }
            if let Err(e) = std::fs::write(&pub_path, format!("{public}\n")) {
                eprintln!("syncmaster: cannot write {}: {e}", pub_path.display());
                return ExitCode::from(2);
            }
            println!("{public}");
            eprintln!(
                "syncmaster: secret key in {} (mode 0600; keep it on the master only), public key in {}",
                out.display(),
                pub_path.display()
            );
            ExitCode::SUCCESS
        }
    }
}

struct ServeOpts {
    tree: PathBuf,
    /// `--hosts`: reloaded on SIGHUP.
    hosts: Option<PathBuf>,
    images: Option<PathBuf>,
    listen: syncmaster::Listen,
    state_dir: Option<PathBuf>,
    image_version: u64,
    poll: Duration,
    down_after: Duration,
    out_after: Duration,
    zstd_level: i32,
    cache: Option<syncmaster::objcache::CacheConfig>,
    security: syncmaster::Security,
    store: Option<Arc<syncmaster::objstore::ObjectStoreTarget>>,
}

async fn serve(o: ServeOpts, inventory: Arc<inventory::Inventory>) -> anyhow::Result<()> {
    let renders = Arc::new(syncmaster::render::Renders::new(inventory.clone(), o.state_dir.as_deref()));
    // Install the handlers before anything else, so a signal sent right after the ready line
    // is a clean shutdown rather than the default kill.
    let stop = cmdline::shutdown_signal()?;
    let shutdown = async move {
        stop.await;
        tracing::info!("shutting down");
    };
    if let Some(store) = &o.store {
        // Before scanning: a store that cannot be used is refused at once.
        store.probe().await?;
        tracing::info!(url = store.url(), "object store reachable");
    }
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
        identity = %scanned.identity,
        secs = started.elapsed().as_secs_f64(),
        "image scanned"
    );
    // Templates that cannot be used refuse the start (naming the template or inventory line).
    renders.check_image(&scanned).map_err(|e| anyhow::anyhow!("cannot serve image {}: {e}", o.tree.display()))?;
    let scanned = match &o.store {
        // Serving (and so announcing) begins once the first version's objects are all stored.
        Some(store) => {
            let shared = Arc::new(scanned);
            store.upload(&shared, None).await.map_err(|e| {
                anyhow::anyhow!("cannot upload version {} to the object store: {e:#}", shared.manifest.version)
            })?;
            Arc::try_unwrap(shared).unwrap_or_else(|a| a.renumbered(a.manifest.version))
        }
        None => scanned,
    };
    let published = Arc::new(publish::Published::with_cache(scanned, o.cache));
    let fleet = Arc::new(fleet::Fleet::new(o.down_after, o.out_after));
    let versions = Arc::new(Mutex::new(versions));
    let db = o.state_dir.as_ref().map(|d| d.join("fleet.db"));
    if db.is_none() {
        tracing::warn!(
            "no --state-dir: rollouts, targets and reports are kept in memory only, and a restart forgets them"
        );
    }
    let control = {
        let (published, fleet, versions, inventory) =
            (published.clone(), fleet.clone(), versions.clone(), inventory.clone());
        tokio::task::spawn_blocking(move || {
            let store = syncmaster::store::Store::open(db.as_deref())?;
            syncmaster::control::Control::open(store, published, fleet, versions, &inventory)
        })
        .await??
    };
    match (&inventory.policy, control.has_policy()) {
        (Some(p), _) => {
            tracing::info!(waves = p.waves.len(), source = %p.source, "rollout policy loaded: new versions go out wave by wave")
        }
        (None, _) => tracing::info!("no [rollout] policy: a new version goes to every host at once"),
    }
    if let Some(images) = o.images {
        let w = publish::watch_current(images, control.clone(), versions, o.poll, o.store.clone(), renders.clone());
        tokio::spawn(w);
    }
    {
        let (renders, current) = (renders.clone(), control.published().current());
        tokio::task::spawn_blocking(move || renders.prerender(&current));
    }
    reload_on_sighup(o.hosts.clone(), renders.clone(), control.clone())?;
    let serving = syncmaster::serve(control, fleet, renders, o.listen, o.zstd_level, o.security, shutdown, |bound| {
        // Stable, parseable lines for scripts and tests; logs go to stderr.
        if let Some(m) = bound.metrics {
            println!("metrics on {m}");
        }
        if let Some(h) = bound.http {
            println!("http on {h}");
        }
        println!("listening on {}", bound.grpc);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(addr = %bound.grpc, "serving");
    });
    serving.await
}

async fn status(url: &str, endpoint: tonic::transport::Endpoint, format: Format) -> anyhow::Result<()> {
    use proto::v1::image_sync_client::ImageSyncClient;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("master {url} is unreachable: {e} (hint: is syncmaster serve running there?)"))?;
    let mut client = ImageSyncClient::new(channel);
    let s = client.fleet_status(proto::v1::StatusRequest {}).await?.into_inner();
    let out = match format {
        Format::Json => syncmaster::status::json(&s),
        Format::Text => syncmaster::status::table(&s),
    };
    print!("{out}");
    Ok(())
}

enum RemoteError {
    /// The master understood and refused (nothing to resume, nothing to abort): exit 4.
    Refused(String),
    Other(anyhow::Error),
}

impl From<tonic::Status> for RemoteError {
    fn from(s: tonic::Status) -> RemoteError {
        match s.code() {
            tonic::Code::FailedPrecondition => RemoteError::Refused(s.message().to_owned()),
            tonic::Code::PermissionDenied => RemoteError::Refused(s.message().to_owned()),
            _ => RemoteError::Other(anyhow::anyhow!("the master answered: {}", s.message())),
        }
    }
}

async fn rollout(url: &str, endpoint: tonic::transport::Endpoint, cmd: RolloutCmd) -> Result<(), RemoteError> {
    use proto::v1 as pb;
    use proto::v1::image_sync_client::ImageSyncClient;
    let channel = endpoint.connect().await.map_err(|e| {
        RemoteError::Other(anyhow::anyhow!(
            "master {url} is unreachable: {e} (hint: is syncmaster serve running there?)"
        ))
    })?;
    let mut client = ImageSyncClient::new(channel);
    let action = |a: &str, reason: String| pb::RolloutControlRequest { action: a.into(), reason };
    let (reply, format) = match cmd {
        RolloutCmd::Status { format, .. } => (client.rollout_status(pb::RolloutStatusRequest {}).await?, format),
        RolloutCmd::Pause { reason, .. } => (client.rollout_control(action("pause", reason)).await?, Format::Text),
        RolloutCmd::Resume { reason, .. } => (client.rollout_control(action("resume", reason)).await?, Format::Text),
        RolloutCmd::Abort { reason, .. } => (client.rollout_control(action("abort", reason)).await?, Format::Text),
        RolloutCmd::Log { after, format, .. } => {
            let evs = client.rollout_events(pb::RolloutEventsRequest { after_id: after, limit: 0 }).await?.into_inner();
            print!("{}", syncmaster::status::events(&evs.events, matches!(format, Format::Json)));
            return Ok(());
        }
    };
    let reply = reply.into_inner();
    print!(
        "{}",
        match format {
            Format::Json => syncmaster::status::rollout_json(&reply),
            Format::Text => syncmaster::status::rollout_table(&reply),
        }
    );
    Ok(())
}

/// On SIGHUP, reads the inventory again: its vars, templates and exclusion lists take effect at
/// once (every host is rendered again, under a higher serial, and watching hosts are told of a
/// changed identity). Its hosts and `[rollout]` are read at start only. A file that does not
/// load is logged and the one in use kept. Without `--hosts`, SIGHUP is logged and ignored
/// (rather than ending the master, its default action).
fn reload_on_sighup(
    path: Option<PathBuf>,
    renders: Arc<syncmaster::render::Renders>,
    control: Arc<syncmaster::control::Control>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(path) = path.clone() else {
                tracing::warn!("SIGHUP: no --hosts inventory to reload; ignored");
                continue;
            };
            let loaded = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || inventory::Inventory::load(&path)).await
            };
            let inv = match loaded {
                Ok(Ok(inv)) => inv,
                Ok(Err(e)) => {
                    tracing::error!("SIGHUP: inventory not reloaded, the one loaded before stays in use: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::error!("SIGHUP: inventory not reloaded: {e}");
                    continue;
                }
            };
            let before = renders.inventory();
            if before.hosts() != inv.hosts() || before.policy.is_some() != inv.policy.is_some() {
                tracing::warn!(
                    "SIGHUP: the inventory's hosts or [rollout] changed; they take effect at the next restart (vars, templates and exclusion lists take effect now)"
                );
            }
            renders.reload(Arc::new(inv));
            let serial = renders.serial();
            let (r, current) = (renders.clone(), control.published().current());
            let _ = tokio::task::spawn_blocking(move || r.prerender(&current)).await;
            control.poke();
            tracing::info!(path = %path.display(), serial, "inventory reloaded");
        }
    });
    Ok(())
}

//! The object store a URL names (`s3://BUCKET/PREFIX`, `file:///DIR`), opened the same way by
//! syncmaster (which uploads) and syncd (which fetches), and the layout of objects in it:
//!
//! ```text
//! PREFIX/objects/<first two hex digits>/<blake3 hex>.zst   one zstd frame of the content
//! PREFIX/objects/<first two hex digits>/<blake3 hex>.raw   the content itself
//! PREFIX/chunks/<first two hex digits>/<blake3 hex>.idx    a large file's chunk index (see [`chunks`])
//! PREFIX/packs/<blake3 hex>.pack                           small objects, concatenated
//! PREFIX/packs/index/<manifest identity hex>.idx           where they lie (see [`pack`])
//! PREFIX/deltas/<ab>/<blake3 hex>-<base blake3 hex>.zst  one zstd frame made against the base
//! PREFIX/solid/<new identity hex>/index                  the solid delta to that image
//! PREFIX/solid/<new identity hex>/<n>.zst                its segments
//! ```
//!
//! S3 credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, …). TLS is
//! rustls with ring as its only provider (see the root Cargo.toml): never aws-lc-rs.

pub mod chunks;

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path as StorePath;
use object_store::ObjectStore;

pub use object_store;

pub mod pack;

/// Why a store cannot be used. `BadUrl` is a configuration error; `Unreachable` one of the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    BadUrl(String),
    #[error("{0}")]
    Unreachable(String),
}

/// An opened store: its URL, the client, and the `PREFIX/objects` directory.
#[derive(Clone)]
pub struct Store {
    pub url: String,
    pub store: Arc<dyn ObjectStore>,
    /// `PREFIX/objects`.
    pub objects: StorePath,
    /// `PREFIX/packs`.
    pub packs: StorePath,
    /// `PREFIX`.
    pub prefix: StorePath,
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct Options {
    /// Names the setting in errors: `--object-store`, `config key object_store`, ….
    pub setting: String,
    /// S3: send unsigned requests when no credentials are set (a public or proxied bucket).
    pub anonymous: bool,
    /// S3: the retries object_store makes itself on a transient error.
    pub retry: object_store::RetryConfig,
    /// S3: the most one request may take, body included (`None`: object_store's 30 s). A
    /// client that bounds its waits itself (no reply, or no data for a while) sets it long: a
    /// whole-request limit cuts a large range that arrives slowly but steadily from a store
    /// shared by many hosts (bench/fleet.sh, 200 hosts: 4 MiB ranges at ~125 KiB/s each).
    pub request_timeout: Option<Duration>,
}

impl Options {
    /// The master's: patient retries (an upload that fails holds back a version).
    pub fn new(setting: &str) -> Options {
        Options {
            setting: setting.to_owned(),
            anonymous: false,
            retry: object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            },
            request_timeout: None,
        }
    }
}

/// Whether the environment holds AWS credentials (or asks for unsigned requests).
pub fn has_aws_credentials() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    (set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY"))
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        || std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v == "true")
}

impl Store {
    /// Parses `url` into a store. Does not touch the network (a `file://` directory must exist).
    pub fn open(url: &str, opts: &Options) -> Result<Store, OpenError> {
        let setting = &opts.setting;
        let bad = |why: String| OpenError::BadUrl(format!("{setting} {url}: {why}"));
        let parsed = url::Url::parse(url)
            .map_err(|e| bad(format!("not a URL ({e}); hint: s3://BUCKET/PREFIX or file:///DIR")))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "s3" | "s3a" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(bad("no bucket (hint: s3://BUCKET/PREFIX)".into()));
                }
                if !opts.anonymous && !has_aws_credentials() {
                    return Err(bad(
                        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION; AWS_ENDPOINT_URL for a store other than AWS, AWS_ALLOW_HTTP=true for a plain-http one)".into(),
                    ));
                }
                // reqwest's rustls has no provider of its own here (see the root Cargo.toml): ring,
                // as for tonic. An error means one is installed already.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url).with_retry(opts.retry.clone());
                if opts.anonymous && !has_aws_credentials() {
                    b = b.with_skip_signature(true);
                }
                if let Some(t) = opts.request_timeout {
                    use object_store::aws::AmazonS3ConfigKey;
                    use object_store::ClientConfigKey;
                    b = b.with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        format!("{}s", t.as_secs().max(1)),
                    );
                }
                let s3 = b.build().map_err(|e| bad(format!("{e}")))?;
                (Arc::new(s3), parsed.path().to_owned())
            }
            "file" => {
                let dir = parsed.to_file_path().map_err(|()| bad("not a local path (hint: file:///DIR)".into()))?;
                if !dir.is_dir() {
                    return Err(OpenError::Unreachable(format!(
                        "{setting} {url}: {} is not a directory (hint: create it)",
                        dir.display()
                    )));
                }
                let fs =
                    object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| bad(format!("{e}")))?;
                (Arc::new(fs), String::new())
            }
            other => {
                return Err(bad(format!("unsupported scheme {other:?} (hint: s3://BUCKET/PREFIX or file:///DIR)")))
            }
        };
        let prefix = StorePath::from(prefix.trim_matches('/'));
        let (objects, packs) = (prefix.clone().join("objects"), prefix.clone().join("packs"));
        Ok(Store { url: url.to_owned(), store, objects, packs, prefix })
    }

    /// The key of the object whose blake3 is `hex` (64 lowercase hex digits), stored raw or as
    /// a zstd frame.
    pub fn key(&self, hex: &str, raw: bool) -> StorePath {
        self.objects.clone().join(&hex[..2]).join(format!("{hex}.{}", if raw { "raw" } else { "zst" }))
    }

    /// `PREFIX/deltas`.
    pub fn deltas(&self) -> StorePath {
        self.prefix.clone().join("deltas")
    }

    /// The key of the delta of object `hex` against base `base_hex`: one zstd frame.
    pub fn delta_key(&self, hex: &str, base_hex: &str) -> StorePath {
        self.deltas().join(&hex[..2]).join(format!("{hex}-{base_hex}.zst"))
    }

    /// `PREFIX/solid/<identity hex>`: the solid delta to the image `identity_hex`.
    pub fn solid(&self, identity_hex: &str) -> StorePath {
        self.prefix.clone().join("solid").join(identity_hex)
    }

    /// The index of the solid delta to the image `identity_hex` (zstd-compressed).
    pub fn solid_index_key(&self, identity_hex: &str) -> StorePath {
        self.solid(identity_hex).join("index")
    }

    /// Segment `n` of the solid delta to the image `identity_hex`.
    pub fn solid_segment_key(&self, identity_hex: &str, n: usize) -> StorePath {
        self.solid(identity_hex).join(format!("{n}.zst"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_bad_urls() {
        let dir = std::env::temp_dir();
        let url = format!("file://{}", dir.display());
        let s = Store::open(&url, &Options::new("--object-store")).unwrap();
        let hex = "ab".repeat(32);
        assert_eq!(s.key(&hex, true).as_ref(), format!("objects/ab/{hex}.raw"));
        let cd = "cd".repeat(32);
        assert_eq!(s.delta_key(&hex, &cd).as_ref(), format!("deltas/ab/{hex}-{cd}.zst"));
        assert_eq!(s.solid_index_key(&cd).as_ref(), format!("solid/{cd}/index"));
        assert_eq!(s.solid_segment_key(&cd, 3).as_ref(), format!("solid/{cd}/3.zst"));
        for url in ["s4://x", "not a url", "file:///no/such/dir/anywhere"] {
            let e = Store::open(url, &Options::new("config key object_store")).err().unwrap();
            assert!(e.to_string().contains(url) && e.to_string().contains("object_store"), "{e}");
        }
    }
}

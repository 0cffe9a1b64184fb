//! Wire protocol between `syncmaster` and `syncd`: generated prost messages and tonic stubs.
//!
//! The schema lives in `proto/sync.proto`; this crate adds only the limits both sides agree on.

#![allow(clippy::large_enum_variant)]

pub mod v1 {
    tonic::include_proto!("gis.v1");
}

/// Entries per manifest batch: large images are streamed, never sent as one message.
pub const MANIFEST_BATCH: usize = 1024;
/// Bytes of (possibly compressed) object data per `ObjectChunk`.
pub const OBJECT_CHUNK: usize = 256 * 1024;
/// Largest message either side accepts. A batch of entries with large xattrs stays far below this.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// An `ObjectBatch` is sent once it holds this many bytes of object data…
pub const BATCH_BYTES: usize = 128 * 1024;
/// … or this many chunks.
pub const BATCH_CHUNKS: usize = 512;
/// Most hashes one `FetchObjects` request may name.
pub const MAX_FETCH_HASHES: usize = 4096;

/// TLS material from PEM files, with errors that name the file.
pub mod tls {
    use std::path::Path;

    use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

    fn pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
        let b = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        if !b.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(format!("{what} {} is not PEM (hint: see README, Trust: certificates)", path.display()));
        }
        Ok(b)
    }

    /// The client side: trust `ca` for the master, present `cert`/`key` as this host.
    pub fn client(ca: &Path, cert: &Path, key: &Path) -> Result<ClientTlsConfig, String> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem(ca, "CA certificate")?))
            .identity(Identity::from_pem(pem(cert, "certificate")?, pem(key, "private key")?)))
    }

    /// The server side: present `cert`/`key`, require client certificates signed by `client_ca`.
    pub fn server(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerTlsConfig, String> {
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(pem(cert, "certificate")?, pem(key, "private key")?))
            .client_ca_root(Certificate::from_pem(pem(client_ca, "client CA certificate")?)))
    }
}

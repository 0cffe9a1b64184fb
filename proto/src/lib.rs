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
/// Most hashes one `FetchObjects` request may name.
pub const MAX_FETCH_HASHES: usize = 4096;

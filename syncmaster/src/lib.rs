//! The master: holds a scanned golden image and serves it to hosts.
//!
//! This file only declares and re-exports. [`image`] is a scanned image; [`publish`] versions
//! and publishes images; [`service`] is the gRPC service, which streams manifests in batches
//! and objects through `encode` (zstd frames, deltas, raw), each fed by a producer through a
//! bounded channel, so a slow host costs memory of a few chunks, never of the image; [`server`]
//! binds the ports and runs until shutdown. [`fleet`], [`control`], [`rollout`], [`policy`] and
//! [`store`] keep the fleet's state and rollouts; [`objcache`], [`storedelta`] and
//! [`objstore`] prepare content; [`status`], [`metrics`] and [`web`] show it all.

pub mod control;
mod encode;
pub mod fleet;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod metrics;
pub mod objcache;
pub mod objstore;
pub mod policy;
pub mod publish;
pub mod render;
pub mod rollout;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
pub mod storedelta;
pub mod web;

pub use image::Image;
pub use server::{serve, Listen};
pub use service::{Security, Service};

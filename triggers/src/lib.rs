//! Shell triggers.

pub mod config;

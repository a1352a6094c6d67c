//! The `zerotouch` service: HTTP, MQTT, storage and the command line.
//!
//! This crate wires the pure libraries (`attestation`, `policies`, `certs`) to the network and
//! the database. It is the only crate that knows HTTP, MQTT or SQL. It must never log or return
//! key material, and never answer a client's bad input with a panic or a 500.
#![forbid(unsafe_code)]

pub mod amqp;
pub mod auth;
pub mod bootstrap;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod db;
pub mod dps;
pub mod enrollment;
pub mod http;
pub mod hub;
pub mod ids;
pub mod lock;
pub mod logging;
pub mod mqtt;
pub mod pki;
pub mod server;
pub mod telemetry;
pub mod time;
pub mod tls;

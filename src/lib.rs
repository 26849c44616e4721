//! tollgate: a security gateway for microservices and devices.
//!
//! The module tree follows the architecture: `transport` accepts connections,
//! `http` runs the request stack and proxies to upstream pools, `config` is
//! gateway.yaml, `admin` serves health and metrics, `gateway` ties them
//! together with reload and shutdown.

pub mod admin;
pub mod authz;
pub mod bus;
pub mod config;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod mqtt;
pub mod oauth;
pub mod pki;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod tunnel;
pub mod wamp;

pub use gateway::{Gateway, Reloaded, StartError};

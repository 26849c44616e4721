//! Listeners: bind, accept under a connection limit, terminate TLS (verifying
//! client certificates), serve HTTP/1.1 and HTTP/2 on each connection with
//! header/idle timeouts, and drain on shutdown.

mod conn;
mod h1;
mod listener;
pub mod tls;

pub use conn::{ConnState, RequestGuard};
pub use listener::{ListenerInfo, Shutdown, bind_shared, serve};

//! Listeners: bind, accept under a connection limit, serve HTTP/1.1 and h2c on
//! each connection with header/idle timeouts, and drain on shutdown.

mod conn;
mod listener;

pub use conn::{ConnState, RequestGuard};
pub use listener::{ListenerInfo, Shutdown, bind_shared, serve};

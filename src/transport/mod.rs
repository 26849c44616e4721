//! Listeners: bind, accept under a connection limit, terminate TLS (verifying
//! client certificates), hand each connection and its facts to the
//! listener's front-end (`FrontEnd`), and drain on shutdown. Protocol-free:
//! no front-end is imported here.

pub mod carried;
mod conn;
pub mod hop_by_hop;
pub mod http_client;
mod listener;
mod local;
pub mod tls;
pub mod websocket;

pub use carried::{CarriedRequest, CarriedResponse, CarryError, CarryFuture, TunnelLink};
pub use conn::{ActivityIo, ConnState, RequestGuard};
pub use listener::{
    FrontEnd, ListenerInfo, Shutdown, Stream, bind_shared, hyper_server, serve, serve_hyper,
};
pub use local::{
    LocalBody, LocalFuture, LocalService, LocalServices, Switch, Takeover, UpgradedIo,
};

/// Lets the worker's other ready tasks run first: the task goes to the
/// back of its worker's run queue. `tokio::task::yield_now` would wait for
/// the event loop's next look at its sockets instead (an `epoll_wait` each
/// time) and clone the task's waker to do so.
pub(crate) async fn after_ready_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

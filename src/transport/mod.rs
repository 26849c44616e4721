//! Listeners: bind, accept under a connection limit, terminate TLS (verifying
//! client certificates), serve HTTP/1.1 and HTTP/2 on each connection with
//! header/idle timeouts, and drain on shutdown.

mod conn;
mod h1;
mod listener;
pub mod tls;

pub use conn::{ConnState, RequestGuard};
pub use listener::{ListenerInfo, Shutdown, bind_shared, serve};

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

//! The HTTP front-end of a listener: tollgate's HTTP/1 codec (`h1`) reads
//! every HTTP/1 connection; hyper's HTTP/2 server the connections that
//! chose HTTP/2, by ALPN or by its preface. Both hand each request to the
//! worker's one pipeline.

use std::sync::Arc;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::h1::{self, Ended, Rewind};
use super::{HttpEntry, Pipeline};
use crate::config::Limits;
use crate::transport::{self, ConnState, FrontEnd, Shutdown, Stream};

/// Serves a gateway listener's connections on one worker.
pub struct HttpFrontEnd {
    pipeline: Arc<Pipeline>,
    http2: auto::Builder<TokioExecutor>,
}

impl HttpFrontEnd {
    pub fn new(pipeline: Arc<Pipeline>, limits: &Limits) -> HttpFrontEnd {
        HttpFrontEnd {
            pipeline,
            http2: transport::hyper_server(limits, true),
        }
    }
}

impl FrontEnd for HttpFrontEnd {
    async fn serve<S: Stream>(&self, io: S, conn: Arc<ConnState>, shutdown: Shutdown) {
        let entry = HttpEntry::new(self.pipeline.clone(), conn.clone());
        if io.alpn() == Some(b"h2") {
            return transport::serve_hyper(&self.http2, io, conn, entry, shutdown).await;
        }
        // No watch on `shutdown.force` here: gateway connections run on a
        // worker's event loop, which is dropped with them at the drain
        // deadline (and a watch would be polled on every wake-up).
        if let Ended::Http2(io, read) = h1::serve(io, conn.clone(), entry.clone(), &shutdown).await
        {
            let io = Rewind::new(io, read);
            transport::serve_hyper(&self.http2, io, conn, entry, shutdown).await;
        }
    }
}

//! The HTTP gateway: one pipeline every request passes (`pipeline.rs`), the
//! stages it is made of, and the proxy to upstream pools.

mod access_log;
pub mod auth;
pub mod authz;
pub mod body;
pub mod canonical;
mod carry;
pub mod error;
mod h1;
pub mod headers;
mod limits;
mod pipeline;
mod proxy;
mod request_id;
pub mod router;
mod serve;
pub mod upstream;
pub mod wire;
pub mod xfcc;

pub use pipeline::{ConnMemo, HttpEntry, Pipeline, PipelineConfig};
pub use serve::HttpFrontEnd;

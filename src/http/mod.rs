//! The HTTP gateway: one pipeline every request passes (`pipeline.rs`), the
//! stages it is made of, and the proxy to upstream pools.

mod access_log;
pub mod auth;
pub mod authz;
pub mod body;
pub mod canonical;
pub mod error;
pub mod headers;
mod limits;
mod pipeline;
mod proxy;
mod request_id;
pub mod router;
pub mod upstream;
pub mod wire;
pub mod xfcc;

pub use pipeline::{ConnMemo, HttpEntry, Pipeline, PipelineConfig};

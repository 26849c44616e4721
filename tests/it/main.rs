//! Black-box tests: a real gateway on 127.0.0.1 ports, real upstream servers,
//! real HTTP/1.1, h2c and WebSocket clients.

mod admin;
mod blame;
mod boundary;
mod bus_nats;
mod cli;
#[cfg(feature = "cluster")]
mod cluster;
mod frontend;
mod h1;
mod jwt;
mod layering;
mod lifecycle;
mod limits;
mod local_upgrade;
mod mqtt;
mod mqtt5;
mod oauth;
mod proxy;
mod routing;
mod state;
mod store_etcd;
mod support;
mod tls;
mod tunnel;
mod tunnel_client;
mod upstreams;
mod wamp;
mod wamp_autobahn;
#[cfg(feature = "cluster")]
mod wamp_cluster;
mod wamp_router;

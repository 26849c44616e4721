//! The shape of gateway.yaml. Every struct rejects unknown keys so a typo is an
//! error that names the key, never a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::units::{self, ByteSize};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Front-end listeners. Default: one plain-HTTP sidecar listener on 127.0.0.1:8082.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: default_listeners(),
            admin: AdminConfig::default(),
            routes: Vec::new(),
            proxy: ProxyConfig::default(),
            shutdown: ShutdownConfig::default(),
            reload: ReloadConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: "sidecar".into(),
        bind: SocketAddr::from(([127, 0, 0, 1], 8082)),
        protocol: Protocol::Http,
        limits: Limits::default(),
    }]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub limits: Limits,
}

/// Listener protocols. `http` serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http,
}

impl Protocol {
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Http => "http",
        }
    }
}

/// Per-listener limits. Every buffer, header, body and connection is bounded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent connections; further connections are accepted and closed at once.
    pub max_connections: usize,
    /// Total size of request header names and values (431 beyond it).
    pub max_header_bytes: ByteSize,
    /// Number of request headers (431 beyond it).
    pub max_headers: usize,
    /// Length of the request target (414 beyond it).
    pub max_uri_bytes: ByteSize,
    /// Request body size (413 beyond it, whether declared or streamed).
    pub max_body_bytes: ByteSize,
    /// Time a client has to send a complete request head (slowloris guard).
    #[serde(deserialize_with = "units::duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no bytes moving is closed after this.
    #[serde(deserialize_with = "units::duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams a client may have open at once.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_header_bytes: ByteSize::kib(16),
            max_headers: 100,
            max_uri_bytes: ByteSize::kib(8),
            max_body_bytes: ByteSize::mib(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/healthz`, `/readyz`, `/metrics`.
    pub bind: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    /// Remove the matched path prefix before forwarding (`/bar/x` -> `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched path prefix with this one (`/bar/x` -> `/api/x`).
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Forward the client's Host header instead of the target's host.
    #[serde(default)]
    pub preserve_host: bool,
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    /// Segment-aware: `/bar` matches `/bar` and `/bar/x`, not `/barn`.
    pub path_prefix: String,
    /// Exact host (`api.internal`) or a wildcard suffix (`*.internal`).
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
    /// Header name -> exact value that must be present.
    pub headers: BTreeMap<String, String>,
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch {
            path_prefix: "/".into(),
            host: None,
            methods: None,
            headers: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` URLs; a DNS name contributes every address it resolves to.
    pub targets: Vec<String>,
    #[serde(default)]
    pub lb: LoadBalancing,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time allowed for connecting, sending the request and receiving the response head.
    #[serde(default = "default_timeout", deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Extra attempts after a failed one (another target when there is one).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Upstream statuses that make an idempotent request without body retryable.
    #[serde(default)]
    pub retry_on_status: Vec<u16>,
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// How often DNS names among `targets` are resolved again.
    #[serde(default = "default_dns_refresh", deserialize_with = "units::duration")]
    pub dns_refresh: Duration,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
}

fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_retries() -> u32 {
    2
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    /// Least outstanding requests among two random choices.
    LeastRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

/// Retries may add at most `ratio` of the route's request rate, plus `min_per_second`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub path: String,
    #[serde(default = "default_hc_interval", deserialize_with = "units::duration")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Consecutive passing checks that bring an unhealthy target back.
    #[serde(default = "default_two")]
    pub healthy_threshold: u32,
    /// Consecutive failing checks that take a target out.
    #[serde(default = "default_three")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_two() -> u32 {
    2
}
fn default_three() -> u32 {
    3
}

/// Ejects a target after consecutive gateway errors (connect failure, timeout, 502/503/504).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveHealthConfig {
    /// 0 turns passive ejection off.
    pub consecutive_failures: u32,
    #[serde(deserialize_with = "units::duration")]
    pub ejection_time: Duration,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
        }
    }
}

/// Settings shared by all upstream connections.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
    /// Idle keep-alive connections to upstreams are closed after this.
    #[serde(deserialize_with = "units::duration")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_target: usize,
    /// Write access log events (target `tollgate::access`).
    pub access_log: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_target: 256,
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// In-flight requests get this long to finish after SIGTERM/SIGINT.
    #[serde(deserialize_with = "units::duration")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Reload when the config file changes (SIGHUP always reloads).
    pub watch: bool,
    /// Changes closer together than this are applied as one reload.
    #[serde(deserialize_with = "units::duration")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce: Duration::from_millis(200),
        }
    }
}

/// Threads that serve connections: each runs its own single-threaded event
/// loop with its own accept socket (SO_REUSEPORT) and upstream connection pool,
/// so a request never crosses threads.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// 0: one per CPU the process may run on.
    pub workers: usize,
}

impl RuntimeConfig {
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

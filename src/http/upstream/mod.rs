//! Upstream pools: targets (every address a target URL resolves to), load
//! balancing, keep-alive clients, passive ejection, and the background DNS and
//! health-check tasks. Request-path state is atomics only.

mod budget;
mod h1;
mod health;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;

pub use budget::RetryBudget;
pub use h1::{
    Exchange, H1Body, H1Error, RequestFraming, TlsOrigin, Upgraded as UpgradedConn, send_encoded,
    start_worker_pool,
};

use super::body::{BoxError, RequestBody};
use crate::config::{
    LoadBalancing, ProxyConfig, TargetHost, TargetUrl, UpstreamConfig, UpstreamProtocol,
};
use crate::metrics::RouteMetrics;
use crate::transport::tls::UpstreamTlsMaterial;

pub type HttpClient = Client<HttpConnector, RequestBody>;
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// How a request reaches a target. HTTP/1.1 has one client, ours; HTTP/2
/// targets are hyper's.
pub enum Sender<'a> {
    /// HTTP/1.1, plain or TLS, on the worker's own connection pool (`h1`).
    H1 {
        proxy: &'a ProxyConfig,
        tls: Option<&'a TlsOrigin>,
    },
    /// HTTP/2 with prior knowledge (`h2c`).
    H2c(&'a HttpClient),
    /// HTTP/2 over TLS, the client of the target's URL.
    H2(&'a HttpsClient),
}

/// How an `https://` target URL is reached.
#[derive(Clone)]
enum TargetTls {
    H1(Arc<TlsOrigin>),
    H2(Box<HttpsClient>),
}

/// A target's response body, from whichever client carried the request.
pub enum UpstreamBody {
    /// Its head's hop-by-hop fields are gone already (`h1` removes them as
    /// it reads the head).
    H1(H1Body),
    Hyper(Incoming),
}

impl UpstreamBody {
    /// Whether the whole body is in hand: it can no longer break off.
    pub fn arrived(&self) -> bool {
        match self {
            UpstreamBody::H1(body) => body.arrived(),
            UpstreamBody::Hyper(body) => http_body::Body::is_end_stream(body),
        }
    }

    /// The target's fields as they came, when our client kept them.
    pub fn lines(&self) -> Option<&crate::http::wire::ResponseLines> {
        match self {
            UpstreamBody::H1(body) => body.lines(),
            UpstreamBody::Hyper(_) => None,
        }
    }

    pub fn lines_mut(&mut self) -> Option<&mut crate::http::wire::ResponseLines> {
        match self {
            UpstreamBody::H1(body) => body.lines_mut(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// Why sending to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    H1(#[from] H1Error),
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl SendError {
    /// No connection was made: nothing was sent.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::H1(e) => matches!(e, H1Error::Connect(_) | H1Error::Tls(_)),
            SendError::Client(e) => e.is_connect(),
        }
    }
}

impl Sender<'_> {
    /// Sends an HTTP/2 request with hyper's client; HTTP/1.1 requests go by
    /// [`send_encoded`] instead.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        Ok(match self {
            Sender::H1 { .. } => {
                return Err(SendError::H1(H1Error::Invalid(
                    "our own client takes encoded heads only",
                )));
            }
            Sender::H2c(c) => c.request(request).await?.map(UpstreamBody::Hyper),
            Sender::H2(c) => c.request(request).await?.map(UpstreamBody::Hyper),
        })
    }
}

/// The HTTP/2 client for plain targets, shared by every route and kept
/// across reloads, so a reload does not drop warm connections (HTTP/1.1
/// connections wait in each worker's own pool).
#[derive(Clone)]
pub struct UpstreamClients {
    h2c: HttpClient,
    proxy: ProxyConfig,
}

impl UpstreamClients {
    pub fn new(cfg: &ProxyConfig) -> UpstreamClients {
        UpstreamClients {
            h2c: client_builder(cfg)
                .http2_only(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .build(connector(cfg, false)),
            proxy: cfg.clone(),
        }
    }

    /// How to reach `target` for a request of the route's `protocol`.
    pub fn sender<'a>(&'a self, target: &'a Target, protocol: UpstreamProtocol) -> Sender<'a> {
        match (&target.tls, protocol) {
            (Some(TargetTls::H2(client)), _) => Sender::H2(client),
            (Some(TargetTls::H1(origin)), _) => Sender::H1 {
                proxy: &self.proxy,
                tls: Some(origin),
            },
            (None, UpstreamProtocol::H2c) => Sender::H2c(&self.h2c),
            // `h2` targets are always `https://` (config validation).
            (None, UpstreamProtocol::Http1 | UpstreamProtocol::H2) => Sender::H1 {
                proxy: &self.proxy,
                tls: None,
            },
        }
    }

    /// How one `https://` target URL is reached: SNI and certificate
    /// verification use `server_name`; ALPN offers the one protocol the
    /// route speaks.
    fn tls(
        &self,
        tls: &UpstreamTlsMaterial,
        server_name: ServerName<'static>,
        protocol: UpstreamProtocol,
    ) -> TargetTls {
        if protocol != UpstreamProtocol::H2 {
            return TargetTls::H1(TlsOrigin::new(&tls.config, server_name));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.config.clone())
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(server_name))
            .enable_http2()
            .wrap_connector(connector(&self.proxy, true));
        let mut client = client_builder(&self.proxy);
        client
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
        TargetTls::H2(Box::new(client.build(https)))
    }
}

/// TCP keepalive probes on upstream connections start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// TCP connections to targets; `under_tls` when a TLS connector wraps it
/// (which hands it https:// URIs).
fn connector(cfg: &ProxyConfig, under_tls: bool) -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(cfg.connect_timeout));
    c.set_keepalive(Some(TCP_KEEPALIVE));
    c.enforce_http(!under_tls);
    c
}

fn client_builder(cfg: &ProxyConfig) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_target);
    b
}

/// One address of an upstream.
pub struct Target {
    pub addr: SocketAddr,
    /// `ip:port`: the request URI's authority, so keep-alive pooling is per address.
    pub uri_authority: Authority,
    /// What the upstream expects as Host (`tasks.bar:8080`).
    pub host_header: HeaderValue,
    /// `https://` targets: how their URL is reached (shared by its addresses).
    tls: Option<TargetTls>,
    pool: Weak<UpstreamPool>,
    inflight: AtomicU32,
    /// Active health-check verdict.
    healthy: AtomicBool,
    /// Passive ejection: milliseconds since the pool's epoch; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// While ejected: when the next trial request may go (same clock).
    trial_at_ms: AtomicU64,
    consecutive_failures: AtomicU32,
}

impl Target {
    fn new(
        addr: SocketAddr,
        host_header: HeaderValue,
        tls: Option<TargetTls>,
        pool: Weak<UpstreamPool>,
    ) -> Option<Target> {
        Some(Target {
            pool,
            addr,
            uri_authority: Authority::try_from(addr.to_string()).ok()?,
            host_header,
            tls,
            inflight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            trial_at_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
        })
    }

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Whether a request may go to this target now. An ejected target
    /// takes one trial request per `trial_every`: the caller that claims
    /// it sends the trial.
    fn available(&self, now_ms: u64, trial_every: u64) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        if !self.ejected(now_ms) {
            return true;
        }
        let trial_at = self.trial_at_ms.load(Ordering::Relaxed);
        trial_at <= now_ms
            && self
                .trial_at_ms
                .compare_exchange(
                    trial_at,
                    now_ms + trial_every,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// A response came whole (or the connection switched protocols): a
    /// success of the target's, which ends its run of failures and lets it
    /// back at once if it was ejected (a trial request's success).
    pub fn succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0
            && let Some(pool) = self.pool.upgrade()
        {
            pool.readmit(self, "a request succeeded");
        }
    }

    /// A response body from this target broke off (reset, short, stalled):
    /// the target's fault, counted as such (the request's log line says why).
    pub fn body_failed(&self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        pool.metrics.upstream_protocol.inc();
        pool.report_failure(self);
    }
}

/// Counts a request against its target until dropped (after the response body).
pub struct InflightGuard(Arc<Target>);

impl InflightGuard {
    pub fn new(target: Arc<Target>) -> InflightGuard {
        target.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(target)
    }

    pub fn target(&self) -> SocketAddr {
        self.0.addr
    }

    pub fn counted(&self) -> &Arc<Target> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct UpstreamPool {
    /// Its targets' way back to it (a response body reports to it).
    me: Weak<UpstreamPool>,
    route: Arc<str>,
    pub config: UpstreamConfig,
    urls: Vec<TargetUrl>,
    /// Per URL: how it is reached when it is `https://`.
    tls_clients: Vec<Option<TargetTls>>,
    /// The TLS material the clients were built from.
    pub tls: Option<Arc<UpstreamTlsMaterial>>,
    targets: ArcSwap<Vec<Arc<Target>>>,
    rr: AtomicUsize,
    epoch: Instant,
    /// Health checks go the way requests go: our own client to HTTP/1.1
    /// targets (with these settings), hyper's to HTTP/2 ones.
    health_clients: UpstreamClients,
    pub budget: RetryBudget,
    metrics: RouteMetrics,
}

impl UpstreamPool {
    /// Builds the pool, resolving DNS names once, and starts its background
    /// tasks; they end by themselves once the pool is dropped.
    pub async fn start(
        route: Arc<str>,
        config: UpstreamConfig,
        clients: &UpstreamClients,
        tls: Option<Arc<UpstreamTlsMaterial>>,
        metrics: RouteMetrics,
    ) -> Arc<UpstreamPool> {
        let urls: Vec<TargetUrl> = config
            .targets
            .iter()
            .filter_map(|t| TargetUrl::parse(t).ok())
            .collect();
        let tls_clients = urls
            .iter()
            .map(|u| {
                let material = tls.as_ref().filter(|_| u.tls)?;
                let name = material
                    .server_name
                    .clone()
                    .unwrap_or_else(|| u.server_name().to_owned());
                let name = ServerName::try_from(name).ok()?;
                Some(clients.tls(material, name, config.protocol))
            })
            .collect();
        let pool = Arc::new_cyclic(|me| UpstreamPool {
            me: me.clone(),
            tls_clients,
            tls,
            budget: RetryBudget::new(&config.retry_budget),
            health_clients: clients.clone(),
            route,
            urls,
            targets: ArcSwap::from_pointee(Vec::new()),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            metrics,
            config,
        });
        pool.refresh_targets().await;
        if pool
            .urls
            .iter()
            .any(|u| matches!(u.host, TargetHost::Name(_)))
        {
            tokio::spawn(dns_refresh_loop(Arc::downgrade(&pool)));
        }
        if pool.config.health_check.is_some() {
            tokio::spawn(health::check_loop(Arc::downgrade(&pool)));
        }
        pool
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    pub fn targets(&self) -> Arc<Vec<Arc<Target>>> {
        self.targets.load_full()
    }

    /// Each target with its state: `/admin/routes`.
    pub fn target_states(&self) -> Vec<serde_json::Value> {
        let now = self.now_ms();
        self.targets
            .load()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "address": t.addr.to_string(),
                    "host": t.host_header.to_str().unwrap_or(""),
                    "healthy": t.healthy.load(Ordering::Relaxed),
                    "ejected": t.ejected_until_ms.load(Ordering::Relaxed) > now,
                    "in_flight": t.inflight(),
                })
            })
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.ms_since_epoch(Instant::now())
    }

    fn ms_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Chooses a target for an attempt. `avoid` are targets that failed
    /// this request already: another is taken when one is usable, else one
    /// of them again; `never` (targets that timed out on this request) are
    /// never taken again. Ejections are judged as of `now` (the caller's
    /// clock reading, so a request reads the clock once).
    pub fn pick(
        &self,
        avoid: &[Arc<Target>],
        never: &[Arc<Target>],
        now: Instant,
    ) -> Option<Arc<Target>> {
        let targets = self.targets.load();
        let now = self.ms_since_epoch(now);
        let listed = |list: &[Arc<Target>], t: &Arc<Target>| list.iter().any(|a| Arc::ptr_eq(a, t));
        self.pick_from(&targets, now, |t| !listed(avoid, t) && !listed(never, t))
            .or_else(|| {
                if avoid.is_empty() {
                    return None;
                }
                self.pick_from(&targets, now, |t| !listed(never, t))
            })
    }

    fn pick_from(
        &self,
        targets: &[Arc<Target>],
        now: u64,
        allowed: impl Fn(&Arc<Target>) -> bool,
    ) -> Option<Arc<Target>> {
        let n = targets.len();
        let trial_every = self.config.passive_health.trial_interval.as_millis() as u64;
        let usable = |t: &Arc<Target>| allowed(t) && t.available(now, trial_every);
        let scan_from = |start: usize| {
            (0..n)
                .map(|i| &targets[(start + i) % n])
                .find(|t| usable(t))
                .cloned()
        };
        match (n, self.config.lb) {
            (0, _) => None,
            // One target: no turn to take (and no shared counter to bump).
            (1, _) => scan_from(0),
            (_, LoadBalancing::RoundRobin) => scan_from(self.rr.fetch_add(1, Ordering::Relaxed)),
            (_, LoadBalancing::LeastRequest) => {
                // Power of two choices: two distinct random targets, fewer in flight wins.
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ta, tb) = (&targets[a], &targets[b]);
                match (usable(ta), usable(tb)) {
                    (true, true) if tb.inflight() < ta.inflight() => Some(tb.clone()),
                    (true, _) => Some(ta.clone()),
                    (false, true) => Some(tb.clone()),
                    (false, false) => scan_from(a),
                }
            }
        }
    }

    /// Whether a target's status counts as its failure.
    pub fn failure_status(&self, status: http::StatusCode) -> bool {
        self.config
            .passive_health
            .failure_statuses
            .contains(&status.as_u16())
    }

    /// Passive health, told a target's faults only (the caller's never
    /// count): enough in a row eject it for `ejection_time`, unless that
    /// would take out more than `max_ejected_percent` of the targets.
    /// Successes are told to the target ([`Target::succeeded`]).
    pub fn report_failure(&self, target: &Target) {
        let passive = &self.config.passive_health;
        let failures = target.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if passive.consecutive_failures == 0 || failures < passive.consecutive_failures {
            return;
        }
        let now = self.now_ms();
        let targets = self.targets.load();
        let out = targets
            .iter()
            .filter(|t| {
                !std::ptr::eq(&***t, target)
                    && (t.ejected(now) || !t.healthy.load(Ordering::Relaxed))
            })
            .count();
        if (out + 1) * 100 > usize::from(passive.max_ejected_percent) * targets.len() {
            tracing::debug!(route = %self.route, target = %target.addr, failures,
                "target failing, but ejecting it would leave too few in service");
            return;
        }
        let was_ejected = target.ejected(now);
        target.ejected_until_ms.store(
            now + passive.ejection_time.as_millis() as u64,
            Ordering::Relaxed,
        );
        target.trial_at_ms.store(
            now + passive.trial_interval.as_millis() as u64,
            Ordering::Relaxed,
        );
        target.consecutive_failures.store(0, Ordering::Relaxed);
        if !was_ejected {
            self.metrics.ejections.inc();
            tracing::warn!(
                route = %self.route,
                target = %target.addr,
                failures,
                ejection_ms = passive.ejection_time.as_millis() as u64,
                "upstream target ejected after consecutive failures"
            );
        }
    }

    /// Ends a target's ejection.
    pub(super) fn readmit(&self, target: &Target, why: &str) {
        if target.ejected_until_ms.swap(0, Ordering::Relaxed) > self.now_ms() {
            tracing::info!(route = %self.route, target = %target.addr, why, "ejected upstream target back in service");
        }
    }

    /// Resolves every target URL; a name that fails to resolve keeps its
    /// previous addresses (stale on error), and known addresses keep their state.
    async fn refresh_targets(&self) {
        let previous = self.targets.load_full();
        let mut next: Vec<Arc<Target>> = Vec::with_capacity(previous.len().max(self.urls.len()));
        let mut seen = HashSet::new();
        for (url, tls) in self.urls.iter().zip(&self.tls_clients) {
            let Ok(host_header) = HeaderValue::from_str(url.authority.as_str()) else {
                continue;
            };
            let addrs: Vec<SocketAddr> = match &url.host {
                TargetHost::Ip(ip) => vec![SocketAddr::new(*ip, url.port)],
                TargetHost::Name(name) => match resolve(name, url.port).await {
                    Ok(addrs) => addrs,
                    Err(e) => {
                        tracing::warn!(route = %self.route, host = %name, error = %e,
                            "upstream DNS resolution failed; keeping previous addresses");
                        previous
                            .iter()
                            .filter(|t| t.host_header == host_header)
                            .map(|t| t.addr)
                            .collect()
                    }
                },
            };
            for addr in addrs {
                if !seen.insert((addr, host_header.clone())) {
                    continue;
                }
                let known = previous
                    .iter()
                    .find(|t| t.addr == addr && t.host_header == host_header);
                match known {
                    Some(t) => next.push(t.clone()),
                    None => next.extend(
                        Target::new(addr, host_header.clone(), tls.clone(), self.me.clone())
                            .map(Arc::new),
                    ),
                }
            }
        }
        let changed = next.len() != previous.len()
            || next
                .iter()
                .zip(previous.iter())
                .any(|(a, b)| !Arc::ptr_eq(a, b));
        if changed {
            let addrs: Vec<String> = next.iter().map(|t| t.addr.to_string()).collect();
            if next.is_empty() {
                tracing::warn!(route = %self.route, "upstream has no resolvable targets");
            } else {
                tracing::info!(route = %self.route, targets = ?addrs, "upstream targets updated");
            }
            self.metrics.targets.set(next.len() as i64);
            self.targets.store(Arc::new(next));
        }
    }
}

const DNS_TIMEOUT: Duration = Duration::from_secs(5);

async fn resolve(name: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let lookup = tokio::net::lookup_host((name, port));
    let mut addrs: Vec<SocketAddr> = tokio::time::timeout(DNS_TIMEOUT, lookup)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "name has no A/AAAA records",
        ));
    }
    Ok(addrs)
}

/// Re-resolves DNS names every `dns_refresh` so `tasks.<service>` follows a
/// Swarm service as it scales; ends when the pool is gone.
async fn dns_refresh_loop(pool: Weak<UpstreamPool>) {
    let Some(every) = pool.upgrade().map(|p| p.config.dns_refresh) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.refresh_targets().await;
    }
}

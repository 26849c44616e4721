//! Prometheus metrics: one registry per gateway, families named
//! `tollgate_<subsystem>_<name>_<unit>`, labels of low cardinality only.
//! Hot-path handles (per route, per listener) are resolved once when a config
//! is built, so a request touches atomics, not the family's label map.
//!
//! The families here are the shared ones (listeners, HTTP routes,
//! authentication, TLS, the store); a front-end registers its own families
//! on the same registry ([`Metrics::counter`], [`Metrics::gauge`],
//! [`Metrics::histogram`]) when it is built.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub http_upstream_errors: IntCounterVec,
    pub http_retries: IntCounterVec,
    pub http_limit_exceeded: IntCounterVec,
    /// Access log lines dropped because the log's writer fell behind.
    pub access_log_dropped: IntCounter,
    pub transport_active_connections: IntGaugeVec,
    pub transport_connections: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub upstream_ejections: IntCounterVec,
    pub upstream_health_changes: IntCounterVec,
    pub upstream_targets: IntGaugeVec,
    pub auth_tokens: IntCounterVec,
    pub auth_jwks_fetches: IntCounterVec,
    pub authz_decisions: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
    /// The store's generation as last read (`stored`) and as served (`applied`).
    pub store_generation: IntGaugeVec,
    /// 1 while what the gateway serves is what the store holds.
    pub store_in_sync: IntGauge,
}

/// Latency buckets from 0.5 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric families are registered once per registry");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let access_log_dropped = reg(
            &registry,
            IntCounter::new(
                "tollgate_access_log_dropped_total",
                "Access log lines dropped because the log's writer fell behind",
            )
            .expect("valid metric"),
        );
        Metrics {
            access_log_dropped,
            http_requests: counter(
                "tollgate_http_requests_total",
                "HTTP requests by listener, route and status class",
                &["listener", "route", "class"],
            ),
            http_request_duration: reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tollgate_http_request_duration_seconds",
                        "Time from request head to the response's end (its head when the whole body came with it), by route",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            http_upstream_errors: counter(
                "tollgate_http_upstream_errors_total",
                "Failed upstream attempts by route and kind",
                &["route", "kind"],
            ),
            http_retries: counter(
                "tollgate_http_retries_total",
                "Retry decisions by route and outcome (retried | budget_exhausted)",
                &["route", "outcome"],
            ),
            http_limit_exceeded: counter(
                "tollgate_http_limit_exceeded_total",
                "Requests refused for exceeding a limit, by listener and limit",
                &["listener", "limit"],
            ),
            transport_active_connections: gauge(
                "tollgate_transport_active_connections",
                "Open client connections by listener",
                &["listener"],
            ),
            transport_connections: counter(
                "tollgate_transport_connections_total",
                "Accepted connections by listener and outcome (served | rejected_limit)",
                &["listener", "outcome"],
            ),
            config_reloads: counter(
                "tollgate_config_reloads_total",
                "Config reloads by outcome (ok | rejected)",
                &["outcome"],
            ),
            upstream_ejections: counter(
                "tollgate_upstream_ejections_total",
                "Targets ejected after consecutive failures, by route",
                &["route"],
            ),
            upstream_health_changes: counter(
                "tollgate_upstream_health_changes_total",
                "Active health check transitions by route and new state",
                &["route", "state"],
            ),
            upstream_targets: gauge(
                "tollgate_upstream_targets",
                "Resolved upstream targets by route",
                &["route"],
            ),
            auth_tokens: counter(
                "tollgate_auth_tokens_total",
                "Bearer tokens checked, by provider and outcome (valid | cached | invalid | expired | revoked)",
                &["provider", "outcome"],
            ),
            auth_jwks_fetches: counter(
                "tollgate_auth_jwks_fetches_total",
                "JWK Set fetches by provider, reason (refresh | unknown_kid) and outcome (ok | error | rate_limited)",
                &["provider", "reason", "outcome"],
            ),
            authz_decisions: counter(
                "tollgate_authz_decisions_total",
                "Authentication and policy decisions by route and outcome (allow | deny | unauthenticated)",
                &["route", "outcome"],
            ),
            tls_handshakes: counter(
                "tollgate_tls_handshakes_total",
                "TLS handshakes by listener and outcome (ok | bad_certificate | failed | timeout)",
                &["listener", "outcome"],
            ),
            tls_cert_expiry: gauge(
                "tollgate_tls_cert_expiry_seconds",
                "Seconds until a served certificate or trusted client CA expires (negative once expired)",
                &["listener", "cert", "subject"],
            ),
            store_generation: gauge(
                "tollgate_store_generation",
                "Write transactions the store has committed: as last read (stored) and as the gateway serves (applied)",
                &["state"],
            ),
            store_in_sync: reg(
                &registry,
                IntGauge::new(
                    "tollgate_store_in_sync",
                    "1 while the gateway serves what the store holds; 0 while a change waits to be applied",
                )
                .expect("valid metric"),
            ),
            registry,
        }
    }

    /// A front-end's counter family on the one registry. Each family is
    /// registered once per gateway; a second registration is a bug.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.registry
            .register(Box::new(c.clone()))
            .expect("metric families are registered once per registry");
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.registry
            .register(Box::new(g.clone()))
            .expect("metric families are registered once per registry");
        g
    }

    /// With the latency buckets every duration family shares.
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .expect("valid metric");
        self.registry
            .register(Box::new(h.clone()))
            .expect("metric families are registered once per registry");
        h
    }

    /// Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// Handles for one route, resolved once per config.
    pub fn route(&self, route: &str, listeners: &[String]) -> RouteMetrics {
        RouteMetrics {
            requests: listeners
                .iter()
                .map(|l| {
                    ["1xx", "2xx", "3xx", "4xx", "5xx"]
                        .map(|class| self.http_requests.with_label_values(&[l, route, class]))
                })
                .collect(),
            duration: self.http_request_duration.with_label_values(&[route]),
            retried: self.http_retries.with_label_values(&[route, "retried"]),
            allowed: self.authz_decisions.with_label_values(&[route, "allow"]),
            denied: self.authz_decisions.with_label_values(&[route, "deny"]),
            unauthenticated: self
                .authz_decisions
                .with_label_values(&[route, "unauthenticated"]),
            budget_exhausted: self
                .http_retries
                .with_label_values(&[route, "budget_exhausted"]),
            upstream_connect: self
                .http_upstream_errors
                .with_label_values(&[route, "connect"]),
            upstream_timeout: self
                .http_upstream_errors
                .with_label_values(&[route, "timeout"]),
            upstream_protocol: self
                .http_upstream_errors
                .with_label_values(&[route, "protocol"]),
            upstream_status: self
                .http_upstream_errors
                .with_label_values(&[route, "status"]),
            ejections: self.upstream_ejections.with_label_values(&[route]),
            became_healthy: self
                .upstream_health_changes
                .with_label_values(&[route, "healthy"]),
            became_unhealthy: self
                .upstream_health_changes
                .with_label_values(&[route, "unhealthy"]),
            targets: self.upstream_targets.with_label_values(&[route]),
        }
    }
}

impl Metrics {
    /// Drops a removed route's series, so routes that come and go (API
    /// registrations) do not grow the registry without bound.
    pub fn forget_route(&self, route: &str, listeners: &[String]) {
        for l in listeners {
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                let _ = self.http_requests.remove_label_values(&[l, route, class]);
            }
        }
        let _ = self.http_request_duration.remove_label_values(&[route]);
        for outcome in ["retried", "budget_exhausted"] {
            let _ = self.http_retries.remove_label_values(&[route, outcome]);
        }
        for outcome in ["allow", "deny", "unauthenticated"] {
            let _ = self.authz_decisions.remove_label_values(&[route, outcome]);
        }
        for kind in ["connect", "timeout", "protocol", "status"] {
            let _ = self
                .http_upstream_errors
                .remove_label_values(&[route, kind]);
        }
        let _ = self.upstream_ejections.remove_label_values(&[route]);
        for state in ["healthy", "unhealthy"] {
            let _ = self
                .upstream_health_changes
                .remove_label_values(&[route, state]);
        }
        let _ = self.upstream_targets.remove_label_values(&[route]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    /// `[listener index][status class]`.
    requests: Vec<[IntCounter; 5]>,
    pub duration: Histogram,
    pub retried: IntCounter,
    pub budget_exhausted: IntCounter,
    pub allowed: IntCounter,
    pub denied: IntCounter,
    pub unauthenticated: IntCounter,
    pub upstream_connect: IntCounter,
    pub upstream_timeout: IntCounter,
    pub upstream_protocol: IntCounter,
    pub upstream_status: IntCounter,
    pub ejections: IntCounter,
    pub became_healthy: IntCounter,
    pub became_unhealthy: IntCounter,
    pub targets: IntGauge,
}

impl RouteMetrics {
    pub fn count(&self, listener: usize, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(by_class) = self.requests.get(listener) {
            by_class[class].inc();
        }
    }
}

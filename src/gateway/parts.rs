//! Each front-end's share of a config: built when the gateway starts from
//! the config and the material every part shares (JWT providers, upstream
//! TLS), and rebuilt and swapped in whole on every reload. The gateway
//! applies the parts in order; one that fails rejects the reload and
//! leaves what runs as it was (a part that succeeded before it serves the
//! new config's share; every part is safe to re-apply).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::admin::auth::AdminAuth;
use crate::config::{Config, ConfigError};
use crate::http::router::RouteTable;
use crate::http::upstream::UpstreamClients;
use crate::identity::Providers;
use crate::identity::jwt::SelfKeys;
use crate::metrics::Metrics;
use crate::oauth::OAuthRuntime;
use crate::transport::tls::UpstreamTlsConfigs;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What every part is built with besides the config.
pub struct Material {
    pub providers: Providers,
    pub upstream_tls: UpstreamTlsConfigs,
}

impl Material {
    pub fn load(
        cfg: &Config,
        previous: Option<&Providers>,
        metrics: &Metrics,
        self_keys: Option<&SelfKeys>,
    ) -> Result<Material, Vec<ConfigError>> {
        let providers = Providers::build(cfg, previous, metrics, self_keys);
        let upstream_tls = UpstreamTlsConfigs::load(cfg);
        match (providers, upstream_tls) {
            (Ok(providers), Ok(upstream_tls)) => Ok(Material {
                providers,
                upstream_tls,
            }),
            (p, u) => Err(p.err().into_iter().chain(u.err()).flatten().collect()),
        }
    }
}

pub trait Part: Send + Sync {
    /// Builds this part for `cfg` and swaps it in; on error nothing of it
    /// changes, and the errors name their key paths.
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>>;
}

/// The token server and everything else read from the store (users).
pub struct TokenServerPart(pub Arc<OAuthRuntime>);

impl Part for TokenServerPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        Box::pin(async move {
            // Store I/O (and perhaps a wait for the CLI's lock): off the
            // control loop.
            let (oauth, cfg, revocations) = (
                self.0.clone(),
                cfg.clone(),
                material.providers.revocations.clone(),
            );
            tokio::task::spawn_blocking(move || oauth.apply(&cfg, &revocations))
                .await
                .unwrap_or_else(|e| {
                    Err(vec![ConfigError {
                        path: "oauth".into(),
                        message: e.to_string(),
                    }])
                })
        })
    }
}

/// The HTTP front-end's routes (and whether it writes access lines).
pub struct HttpPart {
    pub table: Arc<ArcSwap<RouteTable>>,
    pub clients: UpstreamClients,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<AtomicBool>,
}

impl HttpPart {
    pub async fn build(cfg: &Config, material: &Material, metrics: Arc<Metrics>) -> HttpPart {
        let clients = UpstreamClients::new(&cfg.proxy);
        let table = RouteTable::build(
            cfg,
            &clients,
            &metrics,
            &material.providers,
            &material.upstream_tls,
            None,
        )
        .await;
        HttpPart {
            table: Arc::new(ArcSwap::from_pointee(table)),
            clients,
            metrics,
            access_log: Arc::new(AtomicBool::new(access_log_on(cfg))),
        }
    }
}

impl Part for HttpPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        Box::pin(async move {
            let previous = self.table.load_full();
            let table = RouteTable::build(
                cfg,
                &self.clients,
                &self.metrics,
                &material.providers,
                &material.upstream_tls,
                Some(&previous),
            )
            .await;
            let listeners: Vec<String> = cfg.listeners.iter().map(|l| l.name.clone()).collect();
            for gone in previous
                .routes()
                .iter()
                .filter(|r| !table.routes().iter().any(|n| n.name == r.name))
            {
                self.metrics.forget_route(&gone.name, &listeners);
            }
            self.table.store(Arc::new(table));
            self.access_log.store(access_log_on(cfg), Ordering::Relaxed);
            Ok(())
        })
    }
}

/// Whether access log lines are written: the config asks for them and the
/// log filter lets `tollgate::access` through at info.
pub fn access_log_on(config: &Config) -> bool {
    config.proxy.access_log && tracing::enabled!(target: "tollgate::access", tracing::Level::INFO)
}

/// The MQTT broker's settings (rules, authentication, limits).
pub struct MqttPart {
    pub broker: Arc<crate::mqtt::Broker>,
    pub users: Arc<crate::identity::Users>,
}

impl Part for MqttPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        let built = crate::mqtt::settings(cfg, &material.providers, &self.users);
        Box::pin(async move {
            self.broker.apply(built?);
            Ok(())
        })
    }
}

/// The WAMP router's settings (rules, authentication, limits).
pub struct WampPart {
    pub router: Arc<crate::wamp::Router>,
    pub users: Arc<crate::identity::Users>,
}

impl Part for WampPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        let built = crate::wamp::settings(cfg, &material.providers, &self.users);
        Box::pin(async move {
            self.router.apply(built?);
            Ok(())
        })
    }
}

/// The tunnel relays.
pub struct TunnelPart(pub Arc<crate::tunnel::Tunnels>);

impl Part for TunnelPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        _material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        let built = crate::tunnel::settings(cfg);
        Box::pin(async move {
            self.0.apply(built?);
            Ok(())
        })
    }
}

/// Who may use the admin API.
pub struct AdminPart(pub ArcSwap<AdminAuth>);

impl Part for AdminPart {
    fn apply<'a>(
        &'a self,
        cfg: &'a Arc<Config>,
        material: &'a Material,
    ) -> BoxFuture<'a, Result<(), Vec<ConfigError>>> {
        self.0
            .store(Arc::new(AdminAuth::build(cfg, &material.providers)));
        Box::pin(async { Ok(()) })
    }
}

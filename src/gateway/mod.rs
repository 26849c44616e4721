//! The running gateway: binds listeners, builds each front-end's part of
//! the config (`parts`), reloads them atomically and shuts down with a drain.

mod parts;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};

use crate::admin::auth::AdminAuth;
use crate::admin::dynamic;
use crate::admin::{AdminBackend, AdminFrontEnd, Readiness};
pub use crate::config::Reloaded;
use crate::config::{self, Config, ConfigError, ConfigErrors, Limits, Protocol};
use crate::http::upstream::{self, UpstreamClients};
use crate::http::{HttpFrontEnd, PipelineConfig};
use crate::identity::Providers;
use crate::identity::jwt::SelfKeys;
use crate::metrics::Metrics;
use crate::oauth::OAuthRuntime;
use crate::transport::tls::{ServerMaterial, TlsListener, load_server};
use crate::transport::websocket::WsEndpoint;
use crate::transport::{self, ListenerInfo, Shutdown};
use parts::{AdminPart, HttpPart, Material, MqttPart, Part, TokenServerPart, TunnelPart, WampPart};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config:\n{0}")]
    Config(ConfigErrors),
    #[error("cannot start a worker thread: {0}")]
    Worker(std::io::Error),
    #[error("listener `{listener}` cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A handle to a running gateway; cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config_path: Option<PathBuf>,
    /// What is served: gateway.yaml plus the routes registered through the
    /// admin API.
    config: ArcSwap<Config>,
    /// gateway.yaml alone (with its environment overrides).
    file_config: ArcSwap<Config>,
    /// API routes left out of `config`, with why.
    skipped_routes: ArcSwap<Vec<(String, String)>>,
    /// One admin API write at a time (read, validate, store, apply).
    admin_write: Mutex<()>,
    providers: ArcSwap<Providers>,
    oauth: Arc<OAuthRuntime>,
    http: Arc<HttpPart>,
    admin: Arc<AdminPart>,
    mqtt: Option<Arc<MqttPart>>,
    wamp: Option<Arc<WampPart>>,
    /// Cluster mode's bus to the other nodes (`bus.nats`).
    bus: Option<Arc<crate::bus::Bus>>,
    tunnels: Arc<TunnelPart>,
    /// Applied in this order on every reload.
    parts: Vec<Arc<dyn Part>>,
    /// Password and ticket users (gateway.yaml's and the store's), loaded
    /// with the store.
    users: Arc<crate::identity::Users>,
    /// Device self-registration, when configured.
    registration: Option<Arc<crate::mqtt::Registration>>,
    tls_listeners: Vec<Arc<TlsListener>>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: Shutdown,
    reload_lock: Mutex<()>,
    listeners: Vec<(String, SocketAddr)>,
    admin_addr: SocketAddr,
    /// Closed once every worker thread has finished.
    workers_done: Mutex<mpsc::Receiver<()>>,
    /// The shared store's change feed, while one is followed.
    store_feed: arc_swap::ArcSwapOption<crate::store::ChangeFeed>,
}

/// One worker thread: its event loop serves its share of every listener.
struct Worker {
    pipeline: Arc<PipelineConfig>,
    /// Serves `protocol: mqtt` listeners.
    mqtt: Option<Arc<crate::mqtt::Broker>>,
    /// Serves `protocol: wamp` listeners.
    wamp: Option<Arc<crate::wamp::Router>>,
    proxy: crate::config::ProxyConfig,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    /// Dropped when the worker ends.
    _done: mpsc::Sender<()>,
}

impl Worker {
    fn run(
        self,
        runtime: tokio::runtime::Runtime,
        sockets: Vec<(Arc<ListenerInfo>, std::net::TcpListener)>,
    ) {
        let shutdown = self.shutdown.clone();
        runtime.block_on(async move {
            upstream::start_worker_pool(&self.proxy);
            crate::telemetry::spawn_access_flusher();
            let pipeline = self.pipeline.build(UpstreamClients::new(&self.proxy));
            for (info, socket) in sockets {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(listener = %info.name, error = %e, "worker cannot use its listening socket");
                        continue;
                    }
                };
                // The listener's protocol picks its front-end.
                let metrics = self.metrics.clone();
                match (info.protocol, &self.mqtt, &self.wamp) {
                    (Protocol::Mqtt, Some(broker), _) => {
                        let broker = broker.clone();
                        let front_end = Arc::new(crate::mqtt::MqttFrontEnd { broker });
                        spawn_listener(&shutdown, listener, info, front_end, metrics);
                    }
                    (Protocol::Wamp, _, Some(router)) => {
                        let router = router.clone();
                        let front_end = Arc::new(crate::wamp::WampFrontEnd { router });
                        spawn_listener(&shutdown, listener, info, front_end, metrics);
                    }
                    (Protocol::Mqtt | Protocol::Wamp, _, _) => {
                        tracing::error!(listener = %info.name, "no broker or router for this listener");
                    }
                    (Protocol::Http | Protocol::Https, _, _) => {
                        let front_end =
                            Arc::new(HttpFrontEnd::new(pipeline.clone(), &info.limits));
                        spawn_listener(&shutdown, listener, info, front_end, metrics);
                    }
                }
            }
            // Keep serving this worker's connections through the drain.
            shutdown.graceful.cancelled().await;
            shutdown.tracker.close();
            tokio::select! {
                _ = shutdown.tracker.wait() => {}
                _ = shutdown.force.cancelled() => {}
            }
        });
        // The lines of the requests this worker served, before it ends.
        crate::telemetry::flush_access_lines();
        // Dropping the runtime closes whatever the drain deadline cut short.
    }
}

/// Serves a listener's share of connections on this worker.
fn spawn_listener<F: transport::FrontEnd>(
    shutdown: &Shutdown,
    listener: TcpListener,
    info: Arc<ListenerInfo>,
    front_end: Arc<F>,
    metrics: Arc<Metrics>,
) {
    shutdown.tracker.spawn(transport::serve(
        listener,
        info,
        front_end,
        shutdown.for_worker(),
        metrics,
    ));
}

/// Loads a config and everything it points at (key files, secrets,
/// certificates) without starting anything: `tollgate check-config`.
pub fn check_config(path: &std::path::Path) -> Result<Config, ConfigErrors> {
    let cfg = config::parse(path)?;
    let mut errors = config::problems(&cfg);
    if let Err(mut more) = Material::load(&cfg, None, &Metrics::new(), Some(&SelfKeys::default())) {
        errors.append(&mut more);
    }
    if let Err(mut more) = listener_tls(&cfg) {
        errors.append(&mut more);
    }
    ConfigErrors::check(path, errors)?;
    Ok(cfg)
}

/// What routes need from disk, loaded: JWT keys and secrets, upstream TLS.
/// The TLS material of every listener, in `listeners` order.
fn listener_tls(cfg: &Config) -> Result<Vec<Option<ServerMaterial>>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(cfg.listeners.len());
    for (i, l) in cfg.listeners.iter().enumerate() {
        let Some(tls) = &l.tls else {
            out.push(None);
            continue;
        };
        match load_server(&format!("listeners[{i}].tls"), tls, &|p| cfg.resolve(p)) {
            Ok(m) => out.push(Some(m)),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if let Some(tls) = &cfg.admin.tls
        && let Err(mut e) = load_server("admin.tls", tls, &|p| cfg.resolve(p))
    {
        errors.append(&mut e);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Config errors in one line.
/// gateway.yaml merged with the routes registered through the admin API
/// (read from the store when it exists; never creates it).
fn effective(file: &Config) -> Result<(Config, dynamic::Merged), String> {
    let routes = match dynamic::existing_store(file)? {
        None => Vec::new(),
        Some(store) => dynamic::api_routes(&*store)?,
    };
    let (cfg, merged) = dynamic::merge(file, &routes);
    for (name, why) in &merged.skipped {
        tracing::warn!(route = %name, reason = %why, "route registered through the admin API is not served");
    }
    Ok((cfg, merged))
}

/// The material of a merged config. An API route whose files do not load
/// (an upstream CA, a client key) is left out and reported, so one bad
/// registration never stops the gateway from loading or starting.
fn load_material(
    cfg: &mut Config,
    file_routes: usize,
    merged: &mut dynamic::Merged,
    previous: Option<&Providers>,
    metrics: &Metrics,
    self_keys: &SelfKeys,
) -> Result<Material, Vec<ConfigError>> {
    loop {
        let errors = match Material::load(cfg, previous, metrics, Some(self_keys)) {
            Ok(m) => return Ok(m),
            Err(errors) => errors,
        };
        let mut bad: Vec<usize> = errors
            .iter()
            .filter_map(|e| dynamic::route_index(&e.path))
            .filter(|i| *i >= file_routes && *i < cfg.routes.len())
            .collect();
        if bad.is_empty() {
            return Err(errors);
        }
        bad.sort_unstable();
        bad.dedup();
        for i in bad.into_iter().rev() {
            let route = cfg.routes.remove(i);
            let prefix = format!("routes[{i}]");
            let why: Vec<ConfigError> = errors
                .iter()
                .filter(|e| e.path.starts_with(&prefix))
                .cloned()
                .collect();
            tracing::warn!(route = %route.name, reason = %dynamic::describe(&why),
                "route registered through the admin API is not served");
            merged.skipped.push((route.name, dynamic::describe(&why)));
        }
    }
}

impl Gateway {
    /// Binds every listener and starts serving: one worker thread per
    /// `runtime.workers`, each with its own event loop, accept sockets and
    /// upstream connections. The caller's runtime is the control plane: admin
    /// listener, reloads, DNS refresh and health checks. `config_path` is where
    /// reloads read from (and what is watched when `reload.watch` is on).
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Gateway, StartError> {
        let file_config = config.clone();
        // A store that cannot be used (a full or read-only disk, a file held
        // by another process) does not keep the gateway down: it starts with
        // the file's routes, without the token server, and takes the store's
        // part in once it can (`recover_store`).
        let mut store_down: Option<String> = None;
        let (mut config, mut merged) = effective(&file_config).unwrap_or_else(|why| {
            store_down = Some(why);
            dynamic::merge(&file_config, &[])
        });
        let metrics = Arc::new(Metrics::new());
        let users = Arc::new(crate::identity::Users::default());
        let oauth = Arc::new(OAuthRuntime::new(metrics.clone(), vec![users.clone()]));
        let config_error = |errors| {
            StartError::Config(ConfigErrors::new(
                config_path.as_deref().unwrap_or(std::path::Path::new("")),
                errors,
            ))
        };
        let material = load_material(
            &mut config,
            file_config.routes.len(),
            &mut merged,
            None,
            &metrics,
            &oauth.self_keys,
        )
        .map_err(config_error)?;
        let tls_material = listener_tls(&config).map_err(config_error)?;
        let config = Arc::new(config);
        let token_server = Arc::new(TokenServerPart(oauth.clone()));
        match token_server.apply(&config, &material).await {
            Ok(()) => {}
            Err(errors)
                if errors
                    .iter()
                    .all(|e| crate::config::StoreConfig::is_key(&e.path)) =>
            {
                let why = dynamic::describe(&errors);
                oauth.start_without_store(&config, &material.providers.revocations, &why);
                store_down.get_or_insert(why);
            }
            Err(errors) => return Err(config_error(errors)),
        }
        if let Some(why) = &store_down {
            tracing::error!(error = %why,
                "the store cannot be used: serving the file's routes; the token server and admin API routes wait for it (retrying)");
            oauth.sync.failed(why);
        }
        material.providers.start();
        let http = Arc::new(HttpPart::build(&config, &material, metrics.clone()).await);
        let admin = Arc::new(AdminPart(ArcSwap::from_pointee(AdminAuth::build(
            &config,
            &material.providers,
        ))));
        // The MQTT broker, when a listener or WebSocket path serves it.
        let mqtt = match crate::mqtt::enabled(&config) {
            false => None,
            true => {
                let settings = crate::mqtt::settings(&config, &material.providers, &users)
                    .map_err(config_error)?;
                Some(Arc::new(MqttPart {
                    broker: crate::mqtt::Broker::start(&config, settings, &metrics)
                        .map_err(config_error)?,
                    users: users.clone(),
                }))
            }
        };
        crate::telemetry::count_dropped_lines(metrics.access_log_dropped.clone());
        let readiness = Arc::new(Readiness::default());
        let shutdown = Shutdown::default();
        // Cluster mode: the bus to the other nodes, and the MQTT broker on
        // it. It connects in the background; readiness does not wait for it.
        let bus = crate::bus::Bus::start(&config, &metrics, shutdown.force.clone())
            .await
            .map_err(config_error)?;
        if let (Some(bus), Some(m)) = (&bus, &mqtt) {
            crate::mqtt::join_bus(&m.broker, bus.clone(), shutdown.force.clone());
        }
        // The WAMP router, when a listener or WebSocket path serves it.
        let wamp = match crate::wamp::enabled(&config) {
            false => None,
            true => {
                let settings = crate::wamp::settings(&config, &material.providers, &users)
                    .map_err(config_error)?;
                Some(Arc::new(WampPart {
                    router: Arc::new(crate::wamp::Router::new(
                        settings,
                        shutdown.graceful.clone(),
                        &metrics,
                    )),
                    users: users.clone(),
                }))
            }
        };
        if let (Some(bus), Some(w)) = (&bus, &wamp) {
            crate::wamp::join_bus(&w.router, bus.clone(), shutdown.force.clone());
        }
        end_sessions_of_changed_users(
            &users,
            mqtt.as_ref().map(|m| m.broker.clone()),
            wamp.as_ref().map(|w| w.router.clone()),
            shutdown.force.clone(),
        );
        let tunnels = Arc::new(TunnelPart(Arc::new(crate::tunnel::Tunnels::new(
            crate::tunnel::settings(&config).map_err(config_error)?,
            &metrics,
            &config
                .listeners
                .iter()
                .map(|l| l.name.clone())
                .collect::<Vec<_>>(),
            shutdown.graceful.clone(),
        ))));
        let workers = config.runtime.worker_count();

        // Bind everything before starting anything, so a taken port is a clean error.
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let (addr, per_worker) =
                transport::bind_shared(l.bind, workers).map_err(|source| StartError::Bind {
                    listener: l.name.clone(),
                    addr: l.bind,
                    source,
                })?;
            listeners.push((l.name.clone(), addr));
            sockets.push(per_worker);
        }
        let admin_tls = match &config.admin.tls {
            None => None,
            Some(tls) => {
                Some(load_server("admin.tls", tls, &|p| config.resolve(p)).map_err(config_error)?)
            }
        };
        let admin_listener = TcpListener::bind(config.admin.bind)
            .await
            .map_err(|source| StartError::Bind {
                listener: "admin".into(),
                addr: config.admin.bind,
                source,
            })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.bind);

        let mut tls_listeners = Vec::new();
        let infos: Vec<Arc<ListenerInfo>> = config
            .listeners
            .iter()
            .zip(tls_material)
            .enumerate()
            .map(|(index, (l, material))| {
                let tls = l.tls.clone().zip(material).map(|(settings, material)| {
                    let tls = Arc::new(TlsListener::new(
                        &l.name,
                        format!("listeners[{index}].tls"),
                        settings,
                        config.base_dir.clone(),
                        material,
                        metrics.tls_cert_expiry.clone(),
                    ));
                    tls.clone()
                        .watch(config.reload.debounce, shutdown.graceful.clone());
                    tls_listeners.push(tls.clone());
                    tls
                });
                Arc::new(ListenerInfo::new(&l.name, index, l.limits.clone(), tls).with_headers(l))
            })
            .collect();
        let listener_names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let registration = match &config.mqtt.registration {
            None => None,
            Some(r) => Some(Arc::new(
                crate::mqtt::Registration::build(
                    &config,
                    r,
                    users.clone(),
                    metrics.route("mqtt-register", &listener_names),
                )
                .map_err(|message| {
                    config_error(vec![ConfigError {
                        path: "mqtt.registration".into(),
                        message,
                    }])
                })?,
            )),
        };
        let pipeline = Arc::new(PipelineConfig {
            table: http.table.clone(),
            local: Arc::new(LocalSet {
                token_server: TokenServerSlot {
                    server: oauth.server.clone(),
                    waiting: oauth.waiting.clone(),
                },
                registration: registration.clone(),
                tunnels: tunnels.0.clone(),
                wamp: wamp
                    .as_ref()
                    .zip(config.wamp.websocket.as_ref())
                    .map(|(w, ws)| {
                        Arc::new(WsEndpoint {
                            name: "wamp-ws",
                            listeners: ws.listeners.clone(),
                            path: ws.path.clone(),
                            subprotocols: crate::wamp::WS_SUBPROTOCOLS,
                            metrics: metrics.route("wamp-ws", &listener_names),
                            service: w.router.clone(),
                        })
                    }),
                mqtt: mqtt
                    .as_ref()
                    .zip(config.mqtt.websocket.as_ref())
                    .map(|(m, ws)| {
                        Arc::new(WsEndpoint {
                            name: "mqtt-ws",
                            listeners: ws.listeners.clone(),
                            path: ws.path.clone(),
                            subprotocols: crate::mqtt::WS_SUBPROTOCOLS,
                            metrics: metrics.route("mqtt-ws", &listener_names),
                            service: Arc::new(crate::mqtt::MqttWebSocket {
                                broker: m.broker.clone(),
                                shutdown: shutdown.graceful.clone(),
                                allowed_origins: ws.allowed_origins.clone(),
                            }),
                        })
                    }),
            }),
            tunnels: Some(tunnels.0.clone() as Arc<dyn crate::transport::TunnelLink>),
            metrics: metrics.clone(),
            access_log: http.access_log.clone(),
            unmatched: metrics.route(
                "none",
                &config
                    .listeners
                    .iter()
                    .map(|l| l.name.clone())
                    .collect::<Vec<_>>(),
            ),
        });
        let (worker_done, workers_done) = mpsc::channel::<()>(1);
        for w in 0..workers {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(StartError::Worker)?;
            let assigned: Vec<(Arc<ListenerInfo>, std::net::TcpListener)> = infos
                .iter()
                .cloned()
                .zip(sockets.iter_mut().map(|per_worker| per_worker.remove(0)))
                .collect();
            let worker = Worker {
                pipeline: pipeline.clone(),
                mqtt: mqtt.as_ref().map(|m| m.broker.clone()),
                wamp: wamp.as_ref().map(|w| w.router.clone()),
                proxy: config.proxy.clone(),
                shutdown: shutdown.clone(),
                metrics: metrics.clone(),
                _done: worker_done.clone(),
            };
            std::thread::Builder::new()
                .name(format!("tollgate-worker-{w}"))
                .spawn(move || worker.run(runtime, assigned))
                .map_err(StartError::Worker)?;
        }
        drop(worker_done);
        for (name, addr) in &listeners {
            tracing::info!(listener = %name, addr = %addr, workers, "listening");
        }

        let gateway = Gateway {
            inner: Arc::new(Inner {
                config_path,
                config: ArcSwap::new(config.clone()),
                file_config: ArcSwap::from_pointee(file_config),
                skipped_routes: ArcSwap::from_pointee(merged.skipped),
                admin_write: Mutex::new(()),
                oauth: oauth.clone(),
                users,
                registration,
                // Parts that can refuse a reload go first, those that cannot last,
                // so a refused reload changes nothing: MQTT and WAMP refuse
                // only rules that validation refused already; the token
                // server refuses a store it cannot read.
                parts: [
                    mqtt.clone().map(|m| m as Arc<dyn Part>),
                    wamp.clone().map(|w| w as Arc<dyn Part>),
                    Some(tunnels.clone() as Arc<dyn Part>),
                    Some(token_server as Arc<dyn Part>),
                    Some(http.clone() as Arc<dyn Part>),
                    Some(admin.clone() as Arc<dyn Part>),
                ]
                .into_iter()
                .flatten()
                .collect(),
                mqtt: mqtt.clone(),
                wamp: wamp.clone(),
                bus,
                tunnels,
                http,
                admin,
                providers: ArcSwap::from_pointee(material.providers),
                tls_listeners,
                metrics,
                readiness,
                shutdown,
                reload_lock: Mutex::new(()),
                listeners,
                admin_addr,
                workers_done: Mutex::new(workers_done),
                store_feed: arc_swap::ArcSwapOption::empty(),
            }),
        };
        // The admin listener outlives the drain so /readyz can report it; it
        // stops with the force token.
        let admin_shutdown = Shutdown {
            graceful: gateway.inner.shutdown.force.clone(),
            force: gateway.inner.shutdown.force.clone(),
            tracker: tokio_util::task::TaskTracker::new(),
            drain: Default::default(),
        };
        let admin_tls = config
            .admin
            .tls
            .clone()
            .zip(admin_tls)
            .map(|(settings, material)| {
                let tls = Arc::new(TlsListener::new(
                    "admin",
                    "admin.tls".into(),
                    settings,
                    config.base_dir.clone(),
                    material,
                    gateway.inner.metrics.tls_cert_expiry.clone(),
                ));
                tls.clone()
                    .watch(config.reload.debounce, gateway.inner.shutdown.force.clone());
                tls
            });
        tracing::info!(addr = %admin_addr, tls = admin_tls.is_some(),
            authenticated = config.admin.authenticated(), "admin listening");
        let admin_limits = Limits {
            max_connections: 256,
            ..Limits::default()
        };
        tokio::spawn(transport::serve(
            admin_listener,
            Arc::new(ListenerInfo::new(
                "admin",
                0,
                admin_limits.clone(),
                admin_tls,
            )),
            Arc::new(AdminFrontEnd::new(Arc::new(gateway.clone()), &admin_limits)),
            admin_shutdown,
            gateway.inner.metrics.clone(),
        ));
        gateway.watch_config();
        gateway.inner.oauth.maintain(
            gateway.inner.config.load().reload.debounce,
            gateway.inner.shutdown.graceful.clone(),
        );
        gateway.purge_revocations();
        gateway.follow_store();
        if let Some(m) = &gateway.inner.mqtt {
            m.broker
                .publish_sys(gateway.inner.shutdown.graceful.clone());
        }
        if store_down.is_some() {
            tokio::spawn(gateway.clone().recover_store());
        }
        gateway.inner.readiness.set_ready();
        Ok(gateway)
    }

    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner
            .listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.inner.admin_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn readiness(&self) -> &Readiness {
        &self.inner.readiness
    }

    /// Why store changes wait to be applied, if they do (`/readyz`).
    pub fn store_waiting(&self) -> Option<String> {
        self.inner.oauth.sync.waiting().or_else(|| {
            self.inner
                .store_feed
                .load()
                .as_ref()
                .is_some_and(|f| !f.connected())
                .then(|| {
                    "the shared store's watch is down; other nodes' changes arrive once it is back"
                        .to_owned()
                })
        })
    }

    pub fn admin_auth(&self) -> Arc<AdminAuth> {
        self.inner.admin.0.load_full()
    }

    /// gateway.yaml as running (without the API routes).
    pub fn file_config(&self) -> Arc<Config> {
        self.inner.file_config.load_full()
    }

    pub async fn admin_write_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.admin_write.lock().await
    }

    /// Why an API route is not served, if it is not.
    pub fn not_served(&self, name: &str) -> Option<String> {
        self.inner
            .skipped_routes
            .load()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, why)| why.clone())
    }

    /// `GET /admin/status`: version, listeners with open connections, routes.
    pub fn status(&self) -> serde_json::Value {
        let inner = &self.inner;
        let listeners: Vec<serde_json::Value> = inner
            .listeners
            .iter()
            .map(|(name, addr)| {
                serde_json::json!({
                    "name": name,
                    "address": addr.to_string(),
                    "active_connections": inner.metrics.transport_active_connections.with_label_values(&[name]).get(),
                })
            })
            .collect();
        let cfg = inner.config.load();
        let file_routes = inner.file_config.load().routes.len();
        let mut store = inner.oauth.sync.status();
        if let (Some(o), Some(feed)) = (store.as_object_mut(), &*inner.store_feed.load()) {
            o.insert("watching".into(), feed.connected().into());
        }
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": inner.readiness.is_ready(),
            "listeners": listeners,
            "routes": { "total": cfg.routes.len(), "from_file": file_routes, "from_api": cfg.routes.len().saturating_sub(file_routes), "not_served": inner.skipped_routes.load().len() },
            "oauth_clients": inner.oauth.server.load().as_ref().map(|s| s.clients.len()),
            "store": store,
            "password_users": inner.users.len(),
            "bus": inner.bus.as_ref().map(|b| b.status()),
        })
    }

    /// `GET /admin/config`: gateway.yaml with environment overrides, secrets
    /// redacted, and the routes registered through the API.
    pub fn redacted_config(&self) -> serde_json::Value {
        let file = match &self.inner.config_path {
            Some(p) => config::redacted(p).unwrap_or_else(|e| serde_json::json!({ "error": e })),
            None => serde_json::json!({}),
        };
        let api: Vec<String> = self.api_route_names();
        serde_json::json!({ "file": file, "api_routes": api })
    }

    fn api_route_names(&self) -> Vec<String> {
        let file = self.inner.file_config.load();
        self.inner
            .config
            .load()
            .routes
            .iter()
            .filter(|r| !file.routes.iter().any(|f| f.name == r.name))
            .map(|r| r.name.clone())
            .collect()
    }

    /// `GET /admin/routes`: every served route with its targets' health, and
    /// API routes that are not served.
    pub fn routes_status(&self) -> serde_json::Value {
        let api = self.api_route_names();
        let table = self.inner.http.table.load();
        let data: Vec<serde_json::Value> = table
            .routes()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": &*r.name,
                    "source": if api.iter().any(|a| **a == *r.name) { "api" } else { "file" },
                    "targets": r.pool.target_states(),
                    "tunnel": r.tunnel.as_deref(),
                })
            })
            .collect();
        let skipped: Vec<serde_json::Value> = self
            .inner
            .skipped_routes
            .load()
            .iter()
            .map(|(name, why)| serde_json::json!({ "name": name, "reason": why }))
            .collect();
        serde_json::json!({ "data": data, "not_served": skipped })
    }

    /// `GET /admin/clients`: the token server's clients, without secrets.
    pub fn oauth_clients(&self) -> Option<Vec<serde_json::Value>> {
        self.inner
            .oauth
            .server
            .load()
            .as_ref()
            .map(|s| s.clients.summary())
    }

    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// Reads the config file again; on success the new routes serve every new
    /// request while in-flight ones finish on the old. On failure the running
    /// config stays and the errors are returned (and logged).
    pub async fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let inner = &self.inner;
        let Some(path) = &inner.config_path else {
            return Ok(Reloaded::Unchanged);
        };
        let _serial = inner.reload_lock.lock().await;
        let file = match config::load(path) {
            Ok(c) => c,
            Err(e) => return self.rejected(e),
        };
        if let Err(why) = self.keeps_routes(path, &file) {
            return self.rejected(ConfigErrors::new(path, vec![why]));
        }
        // Listener certificates follow their files (they are also watched);
        // a reload reads them too. Admin route changes need not.
        for tls in &inner.tls_listeners {
            let _ = tls.reload();
        }
        self.apply_with_store(file, path).await
    }

    /// [`apply`](Self::apply), and when it found nothing changed, the
    /// store read again all the same (a change the CLI made may not have
    /// come through).
    async fn apply_with_store(
        &self,
        file: Config,
        path: &std::path::Path,
    ) -> Result<Reloaded, ConfigErrors> {
        let applied = self.apply(file, path).await?;
        if applied == Reloaded::Unchanged
            && let Err(why) = self.inner.oauth.clone().reapply().await
        {
            return self.rejected(ConfigErrors::new(
                path,
                vec![crate::config::ConfigError {
                    path: self.inner.config.load().store.key().into(),
                    message: why,
                }],
            ));
        }
        Ok(applied)
    }

    /// After a start without the store: tries it again, with backoff, until
    /// the running file applies with it (admin API routes merged, the token
    /// server loaded).
    async fn recover_store(self) {
        let stop = self.inner.shutdown.graceful.clone();
        let mut wait = Duration::from_millis(250);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let recovered = {
                let _serial = self.inner.reload_lock.lock().await;
                let file = Config::clone(&self.inner.file_config.load());
                let path = self.inner.config_path.clone().unwrap_or_default();
                self.apply_with_store(file, &path).await
            };
            if recovered.is_ok() {
                self.inner.oauth.sync.usable_again();
                tracing::info!(
                    "the store is usable again: the token server and admin API routes are served"
                );
                return;
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    /// A reloaded file may not take every route away by accident: an empty
    /// or comments-only file is refused (it is what a truncating save
    /// leaves for a moment), and so is one with no routes where the running
    /// file had some, unless it sets `reload.allow_no_routes`.
    fn keeps_routes(
        &self,
        path: &std::path::Path,
        file: &Config,
    ) -> Result<(), crate::config::ConfigError> {
        let running = self.inner.file_config.load().routes.len();
        if config::is_empty_document(path) {
            return Err(crate::config::ConfigError {
                path: String::new(),
                message: format!(
                    "the file is empty (or only comments); it would remove the {running} running route(s). \
                     To run without routes, write `routes: []` with `reload: {{ allow_no_routes: true }}`"
                ),
            });
        }
        if file.routes.is_empty() && running > 0 && !file.reload.allow_no_routes {
            return Err(crate::config::ConfigError {
                path: "routes".into(),
                message: format!(
                    "no routes, where the running file has {running}; set reload.allow_no_routes: true to remove them all"
                ),
            });
        }
        Ok(())
    }

    /// The routes registered through the admin API changed: the running
    /// gateway.yaml is merged with them again and applied atomically.
    pub async fn routes_changed(&self) -> Result<(), String> {
        let _serial = self.inner.reload_lock.lock().await;
        let file = Config::clone(&self.inner.file_config.load());
        let path = self.inner.config_path.clone().unwrap_or_default();
        self.apply(file, &path)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn rejected(&self, e: ConfigErrors) -> Result<Reloaded, ConfigErrors> {
        self.inner
            .metrics
            .config_reloads
            .with_label_values(&["rejected"])
            .inc();
        tracing::error!(errors = %e, "config reload rejected; the running config stays in effect");
        Err(e)
    }

    /// Applies a validated gateway.yaml (merged with the API routes): under
    /// the reload lock.
    async fn apply(&self, file: Config, path: &std::path::Path) -> Result<Reloaded, ConfigErrors> {
        let inner = &self.inner;
        let reject = |e: ConfigErrors| self.rejected(e);
        let merged_file = file.clone();
        let merged = tokio::task::spawn_blocking(move || effective(&merged_file)).await;
        let (mut new, mut merged) = match merged {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return reject(ConfigErrors::new(
                    path,
                    vec![crate::config::ConfigError {
                        path: file.store.key().into(),
                        message: e,
                    }],
                ));
            }
            Err(e) => {
                return reject(ConfigErrors::new(
                    path,
                    vec![crate::config::ConfigError {
                        path: String::new(),
                        message: e.to_string(),
                    }],
                ));
            }
        };
        // Key files, secrets and CA files are read again: a rotated key is a
        // change even when gateway.yaml is not.
        let current = inner.providers.load_full();
        let material = match load_material(
            &mut new,
            file.routes.len(),
            &mut merged,
            Some(&current),
            &inner.metrics,
            &inner.oauth.self_keys,
        ) {
            Ok(m) => m,
            Err(errors) => return reject(ConfigErrors::new(path, errors)),
        };
        let old = inner.config.load_full();
        if *old == new
            && material.providers.same_as(&current)
            && inner.http.table.load().same_tls(&material.upstream_tls)
        {
            tracing::debug!("config file changed but its content is the same; nothing to do");
            inner.file_config.store(Arc::new(file));
            inner.skipped_routes.store(Arc::new(merged.skipped));
            return Ok(Reloaded::Unchanged);
        }
        if old.listeners != new.listeners
            || old.admin.bind != new.admin.bind
            || old.admin.tls != new.admin.tls
            || old.proxy.connect_timeout != new.proxy.connect_timeout
            || old.proxy.pool_idle_timeout != new.proxy.pool_idle_timeout
            || old.proxy.pool_max_idle_per_target != new.proxy.pool_max_idle_per_target
            || old.bus != new.bus
        {
            tracing::warn!(
                "changes to listeners, admin, bus or proxy connection settings take effect after a restart"
            );
        }
        let new = Arc::new(new);
        for part in &inner.parts {
            if let Err(errors) = part.apply(&new, &material).await {
                return reject(ConfigErrors::new(path, errors));
            }
        }
        material.providers.start();
        let routes = inner.http.table.load().routes().len();
        inner.providers.store(Arc::new(material.providers));
        inner.config.store(new);
        inner.file_config.store(Arc::new(file));
        inner.skipped_routes.store(Arc::new(merged.skipped));
        inner
            .metrics
            .config_reloads
            .with_label_values(&["ok"])
            .inc();
        tracing::info!(routes, "config reloaded");
        Ok(Reloaded::Applied)
    }

    /// Revoked token ids are dropped once their tokens would have expired
    /// (leeway included), in memory and in the store.
    fn purge_revocations(&self) {
        let gateway = self.clone();
        let stop = self.inner.shutdown.graceful.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let (revocations, leeway) = {
                    let providers = gateway.inner.providers.load();
                    (providers.revocations.clone(), providers.max_leeway())
                };
                let expired_by = crate::identity::jwt::unix_now().saturating_sub(leeway.as_secs());
                let purged = revocations.purge(expired_by);
                if purged > 0 {
                    tracing::debug!(purged, "expired revocations purged");
                    // The store holds the same list (it is loaded from there).
                    gateway
                        .inner
                        .oauth
                        .purge_stored_revocations(expired_by)
                        .await;
                }
            }
        });
    }

    /// On a store shared by several nodes (etcd): applies what other nodes
    /// write as it happens. Revocations are added at once; changed clients,
    /// keys and users reload the token server; changed API routes re-merge
    /// the routes. A change that cannot be applied is tried again with
    /// backoff; what arrives meanwhile is merged into it.
    fn follow_store(&self) {
        let gateway = self.clone();
        let stop = self.inner.shutdown.graceful.clone();
        tokio::spawn(async move {
            let inner = &gateway.inner;
            let mut followed: Option<crate::store::FeedSubscription> = None;
            // Applied later: (routes, token server), after a failure.
            let mut owed = (false, false);
            let mut wait = Duration::from_millis(250);
            let mut retry_at: Option<tokio::time::Instant> = None;
            loop {
                // The store in use now: a reload may name another, and a
                // client whose TLS files changed is a new one.
                let cfg = inner.config.load_full();
                let feed = match cfg.store.etcd {
                    None => None,
                    Some(_) => tokio::task::spawn_blocking(move || crate::store::open(&cfg))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|s| s.feed()),
                };
                let same = match (&followed, &feed) {
                    (Some(sub), Some(feed)) => Arc::ptr_eq(sub.feed(), feed),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    inner.store_feed.store(feed.clone());
                    followed = feed.map(|f| f.subscribe());
                }
                // The feed is always read: revocations apply at once, even
                // while a re-read that failed waits for its retry.
                let changes = async {
                    match &followed {
                        Some(feed) => feed.next().await,
                        None => std::future::pending().await,
                    }
                };
                // Re-check the store now and then (a reload may name
                // another); retry what is owed when its time comes.
                let wake = retry_at
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(2));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    c = changes => {
                        if !c.revoked.is_empty() {
                            inner.providers.load().revocations.extend(&c.revoked);
                        }
                        owed.0 |= c.touches(crate::store::Table::ApiRoutes)
                            || c.touches(crate::store::Table::KongServices);
                        owed.1 |= c.resync || c.tables.iter().any(|t| t.announced());
                        // The watch is back: catch up now, not at the retry.
                        if c.resync {
                            retry_at = None;
                        }
                    }
                    _ = tokio::time::sleep_until(wake) => {}
                }
                if owed == (false, false)
                    || retry_at.is_some_and(|at| tokio::time::Instant::now() < at)
                {
                    continue;
                }
                let applied = if owed.0 {
                    // Merges the routes again; when they are the same, the
                    // token server is read again all the same.
                    let _serial = inner.reload_lock.lock().await;
                    let file = Config::clone(&inner.file_config.load());
                    let path = inner.config_path.clone().unwrap_or_default();
                    gateway
                        .apply_with_store(file, &path)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                } else {
                    inner.oauth.clone().reapply().await
                };
                match applied {
                    Ok(()) => {
                        owed = (false, false);
                        retry_at = None;
                        wait = Duration::from_millis(250);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64,
                            "another node's store change cannot be applied yet; retrying");
                        retry_at = Some(tokio::time::Instant::now() + wait);
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }

    fn watch_config(&self) {
        let inner = &self.inner;
        let Some(path) = inner.config_path.clone() else {
            return;
        };
        let settings = inner.config.load().reload.clone();
        if !settings.watch {
            return;
        }
        let watch = match config::watch::watch(&path) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e,
                    "cannot watch the config file; reload with SIGHUP instead");
                return;
            }
        };
        let gateway = self.clone();
        let stop = inner.shutdown.graceful.clone();
        tokio::spawn(async move {
            // Own the whole watch (not just its channel): dropping the OS
            // watcher would silently end the notifications.
            let mut watch = watch;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    change = watch.changes.recv() => if change.is_none() { return },
                }
                // Let a burst of writes (editor save, ConfigMap swap) settle,
                // then wait until the file has stopped changing: a file still
                // being written is not read.
                tokio::time::sleep(settings.debounce).await;
                settled(&path, settings.debounce).await;
                while watch.changes.try_recv().is_ok() {}
                tracing::debug!(file = %path.display(), "config file changed; reloading");
                let _ = gateway.reload().await;
            }
        });
    }

    /// Starts the drain: readiness turns false, listeners stop accepting and
    /// connections close once their current requests are done.
    pub fn shutdown(&self) {
        if !self.inner.shutdown.graceful.is_cancelled() {
            tracing::info!("shutting down: draining in-flight requests");
        }
        self.inner.readiness.set_draining();
        self.inner.shutdown.graceful.cancel();
    }

    /// After [`shutdown`](Self::shutdown): waits until every connection has
    /// finished or the configured drain timeout passes, then closes the rest.
    /// Returns whether the drain completed in time.
    pub async fn drained(&self) -> bool {
        let inner = &self.inner;
        inner.shutdown.graceful.cancelled().await;
        inner.shutdown.tracker.close();
        let deadline = inner.config.load().shutdown.drain_timeout;
        let done = tokio::time::timeout(deadline, inner.shutdown.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                deadline_ms = deadline.as_millis() as u64,
                "drain deadline passed; closing remaining connections"
            );
        }
        inner.shutdown.force.cancel();
        // Workers end once their connections are closed.
        let mut workers = inner.workers_done.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), workers.recv()).await;
        tracing::info!(drained = done, "shutdown complete");
        done
    }
}

/// Waits until `path`'s size and modification time hold still for a
/// quarter of `debounce` (at least 25 ms), for at most ten times `debounce`.
async fn settled(path: &std::path::Path, debounce: Duration) {
    let look = || {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let step = (debounce / 4).max(Duration::from_millis(25));
    let give_up = tokio::time::Instant::now() + debounce * 10;
    let mut seen = look();
    while tokio::time::Instant::now() < give_up {
        tokio::time::sleep(step).await;
        let now = look();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Ends the MQTT and WAMP sessions of password users who are changed or
/// removed (through the admin API, the CLI, the store or a reload): a
/// device whose password was revoked does not stay connected.
fn end_sessions_of_changed_users(
    users: &crate::identity::Users,
    broker: Option<Arc<crate::mqtt::Broker>>,
    router: Option<Arc<crate::wamp::Router>>,
    stop: tokio_util::sync::CancellationToken,
) {
    if broker.is_none() && router.is_none() {
        return;
    }
    let mut changes = users.changes();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let names = tokio::select! {
                _ = stop.cancelled() => return,
                n = changes.recv() => n,
            };
            match names {
                Ok(names) => {
                    if let Some(b) = &broker {
                        b.end_sessions_of_users(&names);
                    }
                    if let Some(r) = &router {
                        r.end_sessions_of_users(&names);
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "user changes came faster than sessions could be checked; some sessions of changed users may stay"
                    );
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// The admin API's view of the running gateway.
impl AdminBackend for Gateway {
    fn mqtt_register(
        &self,
        device_type: String,
    ) -> Option<crate::admin::BoxFuture<'_, Result<serde_json::Value, (http::StatusCode, String)>>>
    {
        let r = self.inner.registration.clone()?;
        Some(Box::pin(async move {
            r.create(&device_type, "the admin API")
                .await
                .map_err(|e| (e.status, e.message.to_owned()))
        }))
    }
    fn password_users(&self) -> Arc<crate::identity::Users> {
        self.inner.users.clone()
    }
    fn mqtt_sessions(&self) -> Option<serde_json::Value> {
        self.inner.mqtt.as_ref().map(|m| m.broker.sessions_status())
    }
    fn mqtt_kick(&self, client_id: &str) -> Option<bool> {
        self.inner.mqtt.as_ref().map(|m| m.broker.kick(client_id))
    }
    fn wamp_sessions(&self) -> Option<serde_json::Value> {
        self.inner.wamp.as_ref().map(|w| w.router.sessions_status())
    }
    fn wamp_kill(&self, session: u64) -> Option<bool> {
        self.inner.wamp.as_ref().map(|w| w.router.kill(session))
    }
    fn tunnels_status(&self) -> serde_json::Value {
        self.inner.tunnels.0.status()
    }
    fn status(&self) -> serde_json::Value {
        Gateway::status(self)
    }
    fn redacted_config(&self) -> serde_json::Value {
        Gateway::redacted_config(self)
    }
    fn routes_status(&self) -> serde_json::Value {
        Gateway::routes_status(self)
    }
    fn oauth_clients(&self) -> Option<Vec<serde_json::Value>> {
        Gateway::oauth_clients(self)
    }
    fn file_config(&self) -> Arc<Config> {
        Gateway::file_config(self)
    }
    fn not_served(&self, name: &str) -> Option<String> {
        Gateway::not_served(self, name)
    }
    fn admin_auth(&self) -> Arc<AdminAuth> {
        Gateway::admin_auth(self)
    }
    fn metrics(&self) -> &Metrics {
        Gateway::metrics(self)
    }
    fn readiness(&self) -> &Readiness {
        Gateway::readiness(self)
    }
    fn store_waiting(&self) -> Option<String> {
        Gateway::store_waiting(self)
    }
    fn reload(&self) -> crate::admin::BoxFuture<'_, Result<Reloaded, ConfigErrors>> {
        Box::pin(Gateway::reload(self))
    }
    fn routes_changed(&self) -> crate::admin::BoxFuture<'_, Result<(), String>> {
        Box::pin(Gateway::routes_changed(self))
    }
    fn admin_write_lock(&self) -> crate::admin::BoxFuture<'_, tokio::sync::MutexGuard<'_, ()>> {
        Box::pin(Gateway::admin_write_lock(self))
    }
}

/// The local services of the gateway's listeners: the token server, as
/// the current config has it (none without an `oauth` section).
struct TokenServerSlot {
    server: Arc<arc_swap::ArcSwapOption<crate::oauth::OAuthServer>>,
    /// Answers 503 while the token server waits for its store.
    waiting: Arc<arc_swap::ArcSwapOption<crate::oauth::StoreWaiting>>,
}

/// Every local service on HTTP listeners: the token server, MQTT over
/// WebSocket.
struct LocalSet {
    token_server: TokenServerSlot,
    registration: Option<Arc<crate::mqtt::Registration>>,
    mqtt: Option<Arc<WsEndpoint<crate::mqtt::MqttWebSocket>>>,
    wamp: Option<Arc<WsEndpoint<crate::wamp::Router>>>,
    tunnels: Arc<crate::tunnel::Tunnels>,
}

impl crate::transport::LocalServices for LocalSet {
    fn find(
        &self,
        listener: &str,
        path: &str,
    ) -> Option<(Arc<dyn crate::transport::LocalService>, u16)> {
        use crate::transport::LocalService;
        if let Some(m) = &self.mqtt
            && let Some(ep) = m.endpoint(listener, path)
        {
            return Some((m.clone(), ep));
        }
        if let Some(r) = &self.registration
            && let Some(ep) = r.endpoint(listener, path)
        {
            return Some((r.clone(), ep));
        }
        if let Some(w) = &self.wamp
            && let Some(ep) = w.endpoint(listener, path)
        {
            return Some((w.clone(), ep));
        }
        if let Some(ep) = self.tunnels.endpoint(listener, path) {
            return Some((self.tunnels.clone(), ep));
        }
        self.token_server.find(listener, path)
    }
}

impl crate::transport::LocalServices for TokenServerSlot {
    fn find(
        &self,
        listener: &str,
        path: &str,
    ) -> Option<(Arc<dyn crate::transport::LocalService>, u16)> {
        use crate::transport::LocalService;
        // Cloned only when it answers the path: most requests go to routes.
        let current = self.server.load();
        if let Some(server) = current.as_ref() {
            let endpoint = LocalService::endpoint(&**server, listener, path)?;
            return Some((server.clone(), endpoint));
        }
        let waiting = self.waiting.load();
        let waiting = waiting.as_ref()?;
        let endpoint = LocalService::endpoint(&**waiting, listener, path)?;
        Some((waiting.clone(), endpoint))
    }
}

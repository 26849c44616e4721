//! The shape of gateway.yaml. Every struct rejects unknown keys so a typo is an
//! error that names the key, never a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::mqtt::MqttConfig;
use super::units::{self, ByteSize, Cidr};

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
    #[serde(default)]
    pub auth: AuthConfig,
    /// The token server; off unless present.
    #[serde(default)]
    pub oauth: Option<OAuthConfig>,
    /// The MQTT broker; its listeners have `protocol: mqtt`.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The WAMP router.
    #[serde(default)]
    pub wamp: super::wamp::WampConfig,
    /// WebSocket tunnel relays (Micronets' ws-proxy).
    #[serde(default)]
    pub tunnels: Vec<super::tunnel::TunnelConfig>,
    #[serde(default)]
    pub store: StoreConfig,
    /// Cluster mode's bus to the other nodes (`bus.nats`); absent: one node.
    #[serde(default)]
    pub bus: BusConfig,
    /// The directory of the config file: relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Config {
    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        resolve_path(&self.base_dir, path)
    }
}

/// `path` as written in a config whose file is in `base_dir`.
pub fn resolve_path(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base_dir.join(path)
    }
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
            auth: AuthConfig::default(),
            oauth: None,
            mqtt: MqttConfig::default(),
            wamp: super::wamp::WampConfig::default(),
            tunnels: Vec::new(),
            store: StoreConfig::default(),
            bus: BusConfig::default(),
            base_dir: PathBuf::new(),
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: "sidecar".into(),
        bind: SocketAddr::from(([127, 0, 0, 1], 8082)),
        protocol: Protocol::Http,
        tls: None,
        limits: Limits::default(),
        underscores_in_headers: false,
        trusted_proxies: Vec::new(),
    }]
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// Certificates and client authentication; required for `https`.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    #[serde(default)]
    pub limits: Limits,
    /// Keep request header fields whose names hold `_`. Off by default (as
    /// nginx): CGI, WSGI, PHP and Rack backends read `X_User` as `X-User`.
    /// Kept or not, no `_` spelling of a field the gateway sets travels.
    #[serde(default)]
    pub underscores_in_headers: bool,
    /// Peers (address blocks) whose forwarding fields (`X-Forwarded-For`,
    /// `Forwarded`, `Via`) are kept and extended, such as a load balancer in
    /// front; from any other peer they are replaced by this hop's own.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
}

/// Listener protocols. `http` serves HTTP/1.1 and HTTP/2 with prior knowledge
/// (h2c); `https` serves both over TLS, chosen by ALPN; `mqtt` is the MQTT
/// broker (3.1.1 and 5), over TLS when `tls:` is set; `wamp` is the WAMP
/// router, RawSocket and WebSocket on one port, over TLS when `tls:` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http,
    Https,
    Mqtt,
    Wamp,
}

impl Protocol {
    /// Whether the HTTP front-end serves it.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// A TLS listener's material. Every file is watched: new handshakes use new
/// material once it loads; a broken file keeps the old material.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain (leaf first) served when no `sni` entry matches.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: PathBuf,
    /// More certificates, chosen by the client's server name against their DNS SANs.
    #[serde(default)]
    pub sni: Vec<CertKeyFiles>,
    /// `none`, `optional` (verified when sent) or `required`; `required` when
    /// `client_ca` is given, else `none`.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// PEM bundles of the CAs client certificates must chain to.
    #[serde(default)]
    pub client_ca: PathList,
    /// PEM or DER certificate revocation lists of those CAs.
    #[serde(default)]
    pub crls: PathList,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// A certificate closer to expiry than this is warned about in the log.
    #[serde(
        default = "default_expiry_warning",
        deserialize_with = "units::duration"
    )]
    pub expiry_warning: Duration,
}

fn default_expiry_warning() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKeyFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

impl ServerTls {
    pub fn client_auth(&self) -> ClientAuth {
        self.client_auth.unwrap_or(if self.client_ca.is_empty() {
            ClientAuth::None
        } else {
            ClientAuth::Required
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// One path or a list of paths.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(from = "OneOrManyPaths")]
pub struct PathList(pub Vec<PathBuf>);

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrManyPaths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl From<OneOrManyPaths> for PathList {
    fn from(p: OneOrManyPaths) -> PathList {
        match p {
            OneOrManyPaths::One(p) => PathList(vec![p]),
            OneOrManyPaths::Many(v) => PathList(v),
        }
    }
}

impl std::ops::Deref for PathList {
    type Target = [PathBuf];
    fn deref(&self) -> &[PathBuf] {
        &self.0
    }
}

/// The store (OAuth clients, signing keys, revoked tokens, users, API
/// routes): the embedded redb file at `path`, or etcd (`etcd`, cluster mode).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "StoreFields")]
pub struct StoreConfig {
    /// The embedded store's file (unused when `etcd` is given).
    pub path: PathBuf,
    /// The cluster store; the embedded file when absent.
    pub etcd: Option<EtcdStoreConfig>,
    /// Whether `path` was written in the config (it may not be with `etcd`).
    pub(super) path_given: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreFields::default().into()
    }
}

impl StoreConfig {
    /// The key a problem with the configured store is reported under.
    pub fn key(&self) -> &'static str {
        match self.etcd {
            Some(_) => "store.etcd",
            None => "store.path",
        }
    }

    /// Whether a problem's key is the store's (the store cannot be used,
    /// as opposed to the config being wrong).
    pub fn is_key(path: &str) -> bool {
        path == "store.path" || path == "store.etcd"
    }
}

/// `store:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFields {
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    etcd: Option<EtcdStoreConfig>,
}

impl From<StoreFields> for StoreConfig {
    fn from(f: StoreFields) -> StoreConfig {
        StoreConfig {
            path_given: f.path.is_some(),
            path: f
                .path
                .unwrap_or_else(|| PathBuf::from("data/tollgate.redb")),
            etcd: f.etcd,
        }
    }
}

/// `store.etcd`: the store on an etcd v3 cluster (needs a build with the
/// `cluster` feature).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdStoreConfig {
    /// `http://host:port`, or `https://` with `tls`.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// Every key tollgate writes starts with it (several gateways can share
    /// one etcd under different prefixes).
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// Bounds every store call (connecting included).
    #[serde(default = "default_etcd_timeout", deserialize_with = "units::duration")]
    pub timeout: Duration,
}

/// TLS to etcd: the CA its certificates chain to, and a client
/// certificate when etcd asks for one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".to_owned()]
}

fn default_etcd_prefix() -> String {
    "/tollgate/".to_owned()
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `bus`: how cluster nodes reach each other (MQTT publishes today).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// The bus on NATS (needs a build with the `cluster` feature).
    #[serde(default)]
    pub nats: Option<NatsBusConfig>,
}

/// `bus.nats`: core NATS between the nodes of one gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsBusConfig {
    /// `nats://host:port`, or `tls://host:port` with `tls`; no user or
    /// password in them (see `token_file` and `credentials`).
    #[serde(default = "default_nats_servers")]
    pub servers: Vec<String>,
    /// The first token(s) of every subject tollgate uses (several gateways
    /// can share one NATS under different prefixes): dot-separated tokens
    /// of letters, digits, `-` and `_`.
    #[serde(default = "default_nats_prefix")]
    pub prefix: String,
    /// The CA NATS's certificate chains to, and a client certificate when
    /// NATS asks for one (the same block as `store.etcd.tls`).
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// A file holding the token NATS's `authorization` asks for.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A NATS credentials file (user JWT and NKey seed).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Bounds each attempt to connect.
    #[serde(
        default = "default_nats_connect_timeout",
        deserialize_with = "units::duration"
    )]
    pub connect_timeout: Duration,
    /// Messages waiting to be sent to NATS; a message that finds it full
    /// is dropped and counted (`tollgate_bus_dropped_total{reason="queue_full"}`).
    #[serde(default = "default_nats_queue")]
    pub send_queue: usize,
    /// Messages received from NATS waiting for the broker (per subscription
    /// inside the client, and once more before routing); beyond it NATS
    /// drops them (`reason="slow_consumer"`).
    #[serde(default = "default_nats_queue")]
    pub receive_queue: usize,
}

/// Whether `prefix` is NATS subject tokens tollgate may start its
/// subjects with: dot-separated, each of letters, digits, `-` and `_`.
pub fn valid_subject_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn default_nats_servers() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".to_owned()]
}

fn default_nats_prefix() -> String {
    "tollgate".to_owned()
}

fn default_nats_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_nats_queue() -> usize {
    8192
}

/// The OAuth 2.0 token server (client credentials grant).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// `iss` of issued tokens, and the base of the metadata's endpoint URLs.
    pub issuer: String,
    #[serde(default = "default_token_ttl", deserialize_with = "units::duration")]
    pub token_ttl: Duration,
    #[serde(default)]
    pub signing_algorithm: SigningAlgorithm,
    /// Listeners that serve the endpoints; default: `sidecar` (else the first).
    #[serde(default)]
    pub listeners: Option<Vec<String>>,
    /// PEM private keys to sign with instead of generated ones (the first
    /// signs; the others stay in the JWKS).
    #[serde(default)]
    pub signing_keys: Vec<PathBuf>,
    /// Clients defined here; more live in the store (`tollgate clients add`).
    #[serde(default)]
    pub clients: Vec<OAuthClientConfig>,
    /// Largest request body the endpoints read.
    #[serde(default = "default_oauth_body")]
    pub max_body_bytes: ByteSize,
    #[serde(default)]
    pub client_auth_limit: ClientAuthLimit,
    /// Rotate the signing key when it is this old (the previous key stays
    /// published until its tokens expire); off when absent.
    #[serde(default, deserialize_with = "units::option_duration")]
    pub key_rotation: Option<Duration>,
}

/// Failed client authentications allowed per client id and per source
/// address in a window; past it, 429 until the window ends. 0 turns it off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAuthLimit {
    pub max_failures: u32,
    #[serde(deserialize_with = "units::duration")]
    pub window: Duration,
}

impl Default for ClientAuthLimit {
    fn default() -> Self {
        ClientAuthLimit {
            max_failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_oauth_body() -> ByteSize {
    ByteSize::kib(16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum SigningAlgorithm {
    #[default]
    EdDSA,
    ES256,
    RS256,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthClientConfig {
    pub id: String,
    /// Hex SHA-256 of the client secret (client_secret_basic / _post).
    #[serde(default)]
    pub secret_sha256: Option<String>,
    /// PEM public key or JWK (Set) file the client signs assertions with
    /// (private_key_jwt, RFC 7523).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// JWK Set URL with the client's assertion keys (private_key_jwt).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The certificate that identifies the client (tls_client_auth, RFC 8705).
    #[serde(default)]
    pub tls_client_auth: Option<TlsClientAuth>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Overrides `oauth.token_ttl` for this client.
    #[serde(default, deserialize_with = "units::option_duration")]
    pub token_ttl: Option<Duration>,
    /// Extra claims in this client's tokens (roles, organisation, ...).
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// May introspect other clients' tokens (a resource server); without it
    /// a client learns only about its own.
    #[serde(default)]
    pub introspect: bool,
}

/// Which field of a verified client certificate names an OAuth client
/// (RFC 8705 §2.1.2); exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TlsClientAuth {
    /// RFC 4514 subject, e.g. `CN=foo,O=backend`.
    SubjectDn(String),
    SanDns(String),
    SanUri(String),
    SanEmail(String),
    SanIp(String),
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
    /// Requests of one HTTP/2 connection forwarded at once (each may hold
    /// an upstream connection); further streams wait their turn.
    pub max_forwarded_per_connection: usize,
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
            max_forwarded_per_connection: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/healthz`, `/readyz`, `/metrics` (always open) and the admin API.
    pub bind: SocketAddr,
    /// Hex SHA-256 of a token the admin API accepts as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// JWT providers whose tokens the admin API accepts (then `policy` decides).
    #[serde(default)]
    pub providers: Option<Vec<String>>,
    /// Who may use the admin API by token claims or client certificate, e.g.
    /// `- allow: { scopes: [tollgate.admin] }` or `- allow: { cert: { o: ops } }`.
    #[serde(default)]
    pub policy: Option<Vec<RuleConfig>>,
    /// Serve the admin listener over TLS (with `client_ca` for certificate policies).
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

impl AdminConfig {
    /// Whether the admin API asks callers for credentials.
    pub fn authenticated(&self) -> bool {
        self.token_sha256.is_some() || self.policy.is_some()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token_sha256: None,
            providers: None,
            policy: None,
            tls: None,
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
    /// A path holding an escaped `/` or `\` (`%2F`, `%5C`): `reject` (400,
    /// the default) or `keep` (forwarded escaped; it never separates
    /// segments, so it cannot select another route).
    #[serde(default)]
    pub encoded_slashes: EncodedSlashes,
    /// Protocols a client may switch to on this route (`Upgrade`), passed
    /// on to the target; any other upgrade request goes as a plain request.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    pub upstream: UpstreamConfig,
    /// What a caller must present: `none` (default), `jwt`, `mtls`, `any`
    /// (a JWT or a client certificate), `{any_of: [...]}`, `{all_of: [...]}`.
    #[serde(default)]
    pub auth: AuthRequirement,
    /// JWT providers this route accepts (by name); default: all of them.
    #[serde(default)]
    pub providers: Option<Vec<String>>,
    /// Rules checked in order, the first that matches decides; no match is a
    /// denial. Without a policy every authenticated caller is allowed.
    #[serde(default)]
    pub policy: Option<Vec<RuleConfig>>,
    /// Request header -> identity field or claim (`x-user: sub`) set for the
    /// upstream. Client-supplied copies of these headers are always removed.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    /// Pass the caller's `Authorization` header on to the upstream.
    #[serde(default = "default_true")]
    pub forward_token: bool,
    /// Which fields of a verified client certificate go upstream in
    /// `x-forwarded-client-cert` (Envoy's XFCC format); `false` sends none.
    /// A client-supplied copy of the header is always removed.
    #[serde(default)]
    pub forward_client_cert: ForwardClientCert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    #[default]
    Reject,
    Keep,
}

fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_owned()]
}

fn default_true() -> bool {
    true
}

/// The credential a route requires.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthRequirement {
    #[default]
    None,
    Jwt,
    Mtls,
    /// A JWT or a verified client certificate.
    Any,
    AnyOf(Vec<Credential>),
    AllOf(Vec<Credential>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    Jwt,
    Mtls,
}

pub use crate::authz::syntax::{
    CertMatch, ClaimMatch, ClaimOps, Conditions, RuleConfig, ScalarValue, SetMatch,
};

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The realm named in `WWW-Authenticate` challenges.
    pub realm: String,
    pub providers: Vec<ProviderConfig>,
    /// Validated tokens remembered (per provider) so repeat requests skip the
    /// signature check; an entry never outlives its token's `exp`.
    pub token_cache_entries: u64,
    /// Users who log in with a name and a password (MQTT) or ticket (WAMP),
    /// besides those in the store: `{name, password_hash, roles, claims}`.
    pub users: Vec<crate::identity::User>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            realm: "tollgate".into(),
            providers: Vec::new(),
            token_cache_entries: 100_000,
            users: Vec::new(),
        }
    }
}

/// A JWT issuer the gateway trusts, and where its keys come from (exactly
/// one of `public_keys`, `jwks_uri`, `secret`, `keys: self`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// Required value of `iss`.
    pub issuer: String,
    /// `aud` must hold at least one of these.
    pub audiences: Vec<String>,
    /// Accepted `alg` values; default: every asymmetric algorithm the keys
    /// support (HS* only with a `secret`). `none` is never accepted.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "units::duration")]
    pub leeway: Duration,
    /// PEM public keys (SPKI, RSA) or JWK / JWK Set files.
    #[serde(default)]
    pub public_keys: Vec<PathBuf>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks: JwksConfig,
    /// Shared HMAC secret for HS256/384/512, never inline: `{env: VAR}` or `{file: path}`.
    #[serde(default)]
    pub secret: Option<SecretSource>,
    /// `self`: tokens of tollgate's own token server.
    #[serde(default)]
    pub keys: Option<KeysFrom>,
    /// Where the token is read from, in order.
    #[serde(default = "default_token_from")]
    pub token_from: Vec<TokenSource>,
    /// Claims a token must carry besides `exp` (always required).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Required `typ` header (e.g. `at+jwt`, RFC 9068).
    #[serde(default)]
    pub typ: Option<String>,
    /// Claim (or dotted path) holding the caller's roles.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Longer tokens are rejected before any parsing.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: ByteSize,
}

fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
fn default_token_from() -> Vec<TokenSource> {
    vec![TokenSource::Authorization]
}
fn default_roles_claim() -> String {
    "roles".into()
}
fn default_max_token() -> ByteSize {
    ByteSize::kib(8)
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Authorization,
    /// The whole value of this header.
    Header(String),
    Cookie(String),
    /// A query parameter (RFC 6750 2.3; avoid: URLs end up in logs).
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeysFrom {
    #[serde(rename = "self")]
    SelfIssued,
}

/// Fetching a remote JWK Set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    /// PEM CA bundle for an https `jwks_uri`; default: the system roots.
    pub ca_file: Option<PathBuf>,
    #[serde(deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Bounds on the refresh interval; within them the response's
    /// `Cache-Control: max-age` decides (default 5m without one).
    #[serde(deserialize_with = "units::duration")]
    pub min_refresh: Duration,
    #[serde(deserialize_with = "units::duration")]
    pub max_refresh: Duration,
    /// A token with an unknown `kid` triggers a refetch at most this often.
    #[serde(deserialize_with = "units::duration")]
    pub unknown_kid_refetch: Duration,
    pub max_bytes: ByteSize,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            ca_file: None,
            timeout: Duration::from_secs(5),
            min_refresh: Duration::from_secs(60),
            max_refresh: Duration::from_secs(3600),
            unknown_kid_refetch: Duration::from_secs(30),
            max_bytes: ByteSize::kib(512),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    /// Segment-aware: `/bar` matches `/bar` and `/bar/x`, not `/barn`. One
    /// prefix or a list (any of them).
    pub path_prefix: OneOrMany,
    /// Exact host (`api.internal`) or a wildcard suffix (`*.internal`); one
    /// or a list (any of them).
    pub host: Option<OneOrMany>,
    pub methods: Option<Vec<String>>,
    /// Header name -> exact value that must be present.
    pub headers: BTreeMap<String, String>,
}

impl RouteMatch {
    /// Each host the route serves, lower-cased; one `None` when it serves any.
    pub fn hosts(&self) -> Vec<Option<String>> {
        match &self.host {
            None => vec![None],
            Some(h) => h
                .values()
                .iter()
                .map(|h| Some(h.to_ascii_lowercase()))
                .collect(),
        }
    }
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch {
            path_prefix: OneOrMany::One("/".into()),
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
    #[serde(default)]
    pub targets: Vec<String>,
    /// Instead of targets: the peers on this tunnel id (or `<prefix><id>`)
    /// answer, each request carried as a REST:REQUEST message.
    #[serde(default)]
    pub tunnel: Option<String>,
    #[serde(default)]
    pub lb: LoadBalancing,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Time allowed for connecting, sending the request and receiving the response head.
    #[serde(default = "default_timeout", deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Longest wait for the next bytes of a response body, once its head has
    /// come; a target quiet for longer has its response cut off.
    #[serde(default = "default_read_timeout", deserialize_with = "units::duration")]
    pub read_timeout: Duration,
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
    /// TLS settings for `https://` targets.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive_health: PassiveHealthConfig,
}

/// TLS to `https://` targets.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs the upstream's certificate must chain to; the
    /// system's roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name sent as SNI and verified against the upstream certificate; the
    /// target URL's host when absent.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Client certificate chain and key presented to the upstream (mTLS).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
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
    /// HTTP/2 over TLS (ALPN `h2`), for `https://` targets.
    H2,
}

/// Fields of Envoy's `x-forwarded-client-cert` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XfccField {
    /// URI SAN of the gateway's own certificate.
    By,
    /// SHA-256 of the client certificate (hex).
    Hash,
    Subject,
    Uri,
    Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "ForwardClientCertSetting")]
pub struct ForwardClientCert(pub Vec<XfccField>);

impl Default for ForwardClientCert {
    fn default() -> Self {
        ForwardClientCert(vec![
            XfccField::By,
            XfccField::Hash,
            XfccField::Subject,
            XfccField::Uri,
            XfccField::Dns,
        ])
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ForwardClientCertSetting {
    Enabled(bool),
    Fields(Vec<XfccField>),
}

impl From<ForwardClientCertSetting> for ForwardClientCert {
    fn from(s: ForwardClientCertSetting) -> ForwardClientCert {
        match s {
            ForwardClientCertSetting::Enabled(true) => ForwardClientCert::default(),
            ForwardClientCertSetting::Enabled(false) => ForwardClientCert(Vec::new()),
            ForwardClientCertSetting::Fields(f) => ForwardClientCert(f),
        }
    }
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
    /// An ejected target gets one trial request this often; a success lets
    /// it back at once.
    #[serde(deserialize_with = "units::duration")]
    pub trial_interval: Duration,
    /// Ejection never takes out more than this share (percent) of a
    /// route's targets: its last healthy ones stay in service.
    pub max_ejected_percent: u8,
    /// Target statuses that count as its failures (besides connect errors,
    /// timeouts and broken responses).
    pub failure_statuses: Vec<u16>,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            trial_interval: Duration::from_secs(1),
            max_ejected_percent: 50,
            failure_statuses: vec![502, 503, 504],
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
    /// A reload may leave the gateway with no routes from the file where the
    /// running one had some. Off: such a file (a truncated save, a `>`
    /// redirect) is refused and the running routes stay.
    pub allow_no_routes: bool,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce: Duration::from_millis(200),
            allow_no_routes: false,
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

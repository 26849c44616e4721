//! The `tollgate` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config::TlsClientAuth;
use tollgate::identity::passwords;
use tollgate::oauth::manage;
use tollgate::pki::{self, CertKind, KeyAlgorithm};
use tollgate::telemetry::{self, LogFormat};
use tollgate::{Gateway, config};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A security gateway for microservices and devices"
)]
struct Cli {
    /// Config file [default: ./gateway.yaml, then ./config/gateway.yaml]
    #[arg(short, long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,

    /// Log output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TOLLGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config file and list every problem found.
    CheckConfig,
    /// Certificate tools: a CA, server and client certificates, CRLs.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// OAuth clients in the store (the running gateway picks changes up).
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// The token server's signing keys in the store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Register this device with a gateway (`mqtt.registration`) and write
    /// its MQTT credentials as YAML for its application.
    Register {
        /// The registration endpoint, e.g. `https://gw.example.com/register.json`.
        #[arg(long)]
        url: String,
        /// The registration key.
        #[arg(long, env = "TOLLGATE_REGISTRATION_KEY")]
        key: String,
        #[arg(long, default_value = "device")]
        device_type: String,
        /// A CA (PEM) to trust for an https URL, besides the system's.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Where the YAML goes (its directory is made; the file is owner-only).
        #[arg(long)]
        out: PathBuf,
    },
    /// MQTT tools.
    #[command(subcommand)]
    Mqtt(MqttCommand),
    /// Users who log in with a name and password (MQTT) or ticket (WAMP),
    /// in the store (the running gateway picks changes up).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Register this service's route with a gateway's admin API (for start
    /// scripts; exits non-zero when the gateway refuses or cannot be reached).
    RegisterService(RegisterArgs),
    /// Exit 0 when the gateway answers its health endpoint (for container
    /// healthchecks in images without a shell or curl).
    Healthcheck {
        #[arg(
            long,
            default_value = "http://127.0.0.1:9090/healthz",
            env = "TOLLGATE_HEALTHCHECK_URL"
        )]
        url: String,
    },
    /// WebSocket tunnel peers (Micronets' ws-proxy clients).
    #[command(subcommand)]
    Tunnel(TunnelCommand),
}

#[derive(Subcommand)]
enum TunnelCommand {
    /// Join a tunnel relay as a peer, with a client certificate, and carry
    /// HTTP over it: serve HTTP locally and send each request through the
    /// tunnel (--serve-http), or answer the tunnel's requests from a local
    /// service (--forward-to). Reconnects until SIGTERM or SIGINT.
    Connect(TunnelConnectArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("side").required(true).args(["serve_http", "forward_to"])))]
struct TunnelConnectArgs {
    /// The relay's tunnel URL: wss://host:port/<prefix><id>
    /// (e.g. wss://gw:8443/micronets/v1/ws-proxy/dhcp-0001; mTLS only, so
    /// not ws://).
    url: String,
    /// Client certificate (PEM, leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// The client certificate's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The CA (PEM) the relay's certificate must chain to; nothing else is trusted.
    #[arg(long)]
    ca: PathBuf,
    /// Serve HTTP/1.1 on this address and carry each request over the
    /// tunnel (port 0: any free port, logged).
    #[arg(long, value_name = "ADDR")]
    serve_http: Option<std::net::SocketAddr>,
    /// Answer the tunnel's requests from this local service
    /// (http://host:port, optionally with a base path).
    #[arg(long, value_name = "URL")]
    forward_to: Option<String>,
    /// The `peerClass` of the CONN:HELLO.
    #[arg(long, default_value = tollgate::tunnel::client::DEFAULT_PEER_CLASS)]
    peer_class: String,
    /// The `peerId` of the CONN:HELLO [default: the host name].
    #[arg(long)]
    peer_id: Option<String>,
    /// Connecting, and each carried request, at most this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// The largest WebSocket message, and the largest HTTP body read.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    max_message: usize,
}

fn parse_size(s: &str) -> Result<usize, String> {
    config::units::parse_byte_size(s)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("`{s}` is not a size like 64KiB or 1MiB"))
}

#[derive(clap::Args)]
struct RegisterArgs {
    /// The admin API's base URL.
    #[arg(long, default_value = "http://127.0.0.1:9090", env = "TOLLGATE_ADMIN")]
    admin: String,
    /// The route's name.
    #[arg(long)]
    name: String,
    /// Path prefix routed to the service (repeatable).
    #[arg(long = "path")]
    paths: Vec<String>,
    /// Only requests for this Host (repeatable).
    #[arg(long = "match-host")]
    match_hosts: Vec<String>,
    /// Where the service listens: host name or address...
    #[arg(long)]
    host: String,
    /// ...and port.
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "http")]
    scheme: String,
    /// Forward the whole path instead of stripping the matched prefix.
    #[arg(long)]
    no_strip: bool,
    /// Send the caller's Host header to the service.
    #[arg(long)]
    preserve_host: bool,
    /// Admin API token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Keep trying this long while the gateway is not reachable yet.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wait: std::time::Duration,
    /// Remove the registration instead.
    #[arg(long)]
    deregister: bool,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ClientsCommand {
    /// Add a client. It authenticates with exactly one of: --public-key or
    /// --jwks-uri (private_key_jwt), a --tls-* identity (tls_client_auth), or
    /// else a new secret, printed once and stored only as a hash.
    Add {
        id: String,
        /// Allowed scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Allowed audience (repeatable).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// Token lifetime for this client, e.g. 10m (default: oauth.token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Extra claim NAME=VALUE (a JSON value, or text); repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Add it disabled.
        #[arg(long)]
        disabled: bool,
        /// Let it introspect other clients' tokens (a resource server).
        #[arg(long)]
        introspect: bool,
        /// PEM public key or JWK (Set) file for private_key_jwt assertions.
        #[arg(long, conflicts_with = "jwks_uri")]
        public_key: Option<PathBuf>,
        /// URL of the client's JWK Set, for private_key_jwt assertions.
        #[arg(long)]
        jwks_uri: Option<String>,
        /// tls_client_auth: the certificate subject (RFC 4514, e.g. "CN=foo,O=backend").
        #[arg(long, conflicts_with_all = ["tls_san_uri", "tls_san_dns"])]
        tls_subject: Option<String>,
        /// tls_client_auth: a URI SAN of the certificate (e.g. a SPIFFE id).
        #[arg(long, conflicts_with = "tls_san_dns")]
        tls_san_uri: Option<String>,
        /// tls_client_auth: a DNS SAN of the certificate.
        #[arg(long)]
        tls_san_dns: Option<String>,
    },
    /// List clients (store and gateway.yaml).
    List,
    /// Show one stored client (without its secret hash).
    Show {
        id: String,
    },
    /// Remove a stored client.
    Remove {
        id: String,
    },
    /// Give a client a new secret (printed once); the old one stops working.
    RotateSecret {
        id: String,
    },
    Enable {
        id: String,
    },
    Disable {
        id: String,
    },
}

#[derive(Subcommand)]
enum MqttCommand {
    /// Print a mosquitto `acl_file` as `mqtt.policy` rules for gateway.yaml.
    ImportAcl { file: PathBuf },
    /// Device users (the same as `tollgate users`).
    #[command(subcommand)]
    Users(UsersCommand),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add a user, or replace one of that name. Without --password-stdin a
    /// password is generated and printed once.
    Add {
        name: String,
        /// A role the policy engine can match (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// The user's own topic rule: `read:a/#`, `write:b`, `deny:c` or a
        /// filter for both (repeat for several; `%u` is the user).
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// A user's roles and topic rules (never its password).
    Show {
        name: String,
    },
    /// A new password (generated and printed once, or from standard input).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    Remove {
        name: String,
    },
    List,
    /// Print an argon2id hash of a password read from standard input, for
    /// `auth.users[].password_hash` in gateway.yaml.
    Hash,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Start signing with a new key; the previous one stays published until
    /// the tokens it signed have expired.
    Rotate,
    /// List signing keys.
    List,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a certificate authority: DIR/ca.pem and DIR/ca.key (0600).
    InitCa {
        #[arg(long)]
        org: String,
        #[arg(long)]
        cn: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[arg(long, value_enum, default_value = "ecdsa-p256")]
        key: KeyAlgorithm,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing CA key.
        #[arg(long)]
        force: bool,
    },
    /// Issue a server or client certificate: PREFIX.pem and PREFIX.key (0600).
    Issue {
        /// Directory made by `init-ca`.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, value_enum)]
        kind: CertKind,
        #[arg(long)]
        cn: String,
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        ou: Option<String>,
        /// Subject alternative name: DNS:x, URI:x, IP:x, email:x, or a bare
        /// value; repeatable. A server certificate gets its CN when none is given.
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long, value_enum, default_value = "ecdsa-p256")]
        key: KeyAlgorithm,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a CRL, signed by the CA, revoking the given certificates.
    Crl {
        #[arg(long)]
        ca: PathBuf,
        /// Certificate files to revoke (repeatable; none writes an empty CRL).
        #[arg(long)]
        revoke: Vec<PathBuf>,
        /// Days until the CRL's next update.
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print subject, SANs, validity and fingerprints of a certificate file.
    Show { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(Command::Pki(cmd)) => return pki_command(cmd),
        Some(Command::RegisterService(args)) => return register_service(&args),
        Some(Command::Healthcheck { url }) => return healthcheck(&url),
        Some(Command::Tunnel(TunnelCommand::Connect(args))) => {
            telemetry::init(cli.log_format);
            return tunnel_connect(args);
        }
        Some(Command::Users(UsersCommand::Hash)) => return hash_password(),
        Some(Command::Mqtt(MqttCommand::ImportAcl { file })) => return import_acl(&file),
        Some(Command::Register {
            url,
            key,
            device_type,
            ca,
            out,
        }) => return register_device(&url, &key, &device_type, ca.as_deref(), &out),
        other => other,
    };
    let path = match config::locate(cli.config.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(2);
        }
    };
    match command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&path),
        Command::Clients(cmd) => store_command(&path, |cfg| clients_command(cfg, cmd)),
        Command::Keys(cmd) => store_command(&path, |cfg| {
            match cmd {
            KeysCommand::Rotate => manage::rotate_keys(cfg)
                .map(|kid| format!("signing with new key {kid}; the previous key stays published until its tokens expire")),
            KeysCommand::List => manage::list_keys(cfg).map(|s| s.trim_end().to_owned()),
        }
        }),
        Command::Users(cmd) => store_command(&path, |cfg| users_command(cfg, cmd)),
        Command::Run => {
            telemetry::init(cli.log_format);
            run(path)
        }
        Command::Pki(cmd) => pki_command(cmd),
        Command::RegisterService(args) => register_service(&args),
        Command::Healthcheck { url } => healthcheck(&url),
        Command::Tunnel(TunnelCommand::Connect(args)) => tunnel_connect(args),
        Command::Register {
            url,
            key,
            device_type,
            ca,
            out,
        } => register_device(&url, &key, &device_type, ca.as_deref(), &out),
        Command::Mqtt(MqttCommand::ImportAcl { file }) => import_acl(&file),
        Command::Mqtt(MqttCommand::Users(UsersCommand::Hash)) => hash_password(),
        Command::Mqtt(MqttCommand::Users(cmd)) => {
            store_command(&path, |cfg| users_command(cfg, cmd))
        }
    }
}

#[allow(clippy::print_stdout)] // the command's output
fn import_acl(file: &std::path::Path) -> ExitCode {
    let imported = std::fs::read_to_string(file)
        .map_err(|e| format!("{}: {e}", file.display()))
        .and_then(|text| tollgate::mqtt::acl_file::import(&text, &file.display().to_string()));
    match imported {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate mqtt import-acl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate tunnel connect`: exits 0 after SIGTERM or SIGINT, 2 on bad input.
fn tunnel_connect(a: TunnelConnectArgs) -> ExitCode {
    use tollgate::tunnel::client::{Client, Mode, Options};
    let bad_input = |e: &dyn std::fmt::Display| {
        eprintln!("tollgate tunnel connect: {e}");
        ExitCode::from(2)
    };
    let mode = match (a.serve_http, a.forward_to) {
        (Some(addr), None) => Mode::ServeHttp(addr),
        (None, Some(url)) => Mode::ForwardTo(url),
        _ => return bad_input(&"give one of --serve-http and --forward-to"),
    };
    let client = match Client::new(Options {
        url: a.url,
        cert: a.cert,
        key: a.key,
        ca: a.ca,
        mode,
        peer_class: Some(a.peer_class),
        peer_id: a.peer_id,
        timeout: a.timeout,
        max_message: a.max_message,
    }) {
        Ok(c) => c,
        Err(e) => return bad_input(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate tunnel connect: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("tollgate tunnel connect: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: closing the tunnel"),
                _ = int.recv() => tracing::info!("SIGINT: closing the tunnel"),
            }
            on_signal.cancel();
        });
        match client.run(stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => bad_input(&e),
        }
    })
}

fn healthcheck(url: &str) -> ExitCode {
    match tollgate::admin::register::probe(url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)] // the command's output
fn register_service(a: &RegisterArgs) -> ExitCode {
    let registration = tollgate::admin::register::Registration {
        admin: &a.admin,
        name: &a.name,
        paths: &a.paths,
        hosts: &a.match_hosts,
        upstream_url: format!("{}://{}:{}", a.scheme, a.host, a.port),
        strip_path: !a.no_strip,
        preserve_host: a.preserve_host,
        token: a.token.as_deref(),
        wait: a.wait,
    };
    match tollgate::admin::register::run(&registration, a.deregister) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate register-service: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)] // the command's output
fn register_device(
    url: &str,
    key: &str,
    device_type: &str,
    ca: Option<&std::path::Path>,
    out: &std::path::Path,
) -> ExitCode {
    match tollgate::mqtt::register::register_device(url, key, device_type, ca, out) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate register: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first line of standard input, without its line end.
fn password_from_stdin() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err("an empty password".into());
    }
    Ok(password)
}

#[allow(clippy::print_stdout)] // the command's output
fn hash_password() -> ExitCode {
    match password_from_stdin().and_then(|p| passwords::hash_password(p.as_bytes())) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate users hash: {e}");
            ExitCode::FAILURE
        }
    }
}

fn shown_password(name: &str, password: &str, shown: bool, done: &str) -> String {
    match shown {
        true => format!("user: {name}\npassword: {password}\n(the password is not shown again)"),
        false => format!("user {name} {done}"),
    }
}

fn users_command(cfg: &config::Config, cmd: UsersCommand) -> Result<String, String> {
    let store = tollgate::store::open(cfg).map_err(|e| e.to_string())?;
    match cmd {
        UsersCommand::Add {
            name,
            roles,
            topics,
            password_stdin,
        } => {
            let topics = topics
                .iter()
                .map(|t| passwords::UserTopic::parse(t))
                .collect::<Result<Vec<_>, _>>()?;
            let (password, shown) =
                passwords::new_password(password_stdin.then(password_from_stdin).transpose()?)?;
            let user = tollgate::identity::User {
                password_hash: passwords::hash_password(password.as_bytes())?,
                name,
                roles,
                claims: serde_json::Map::new(),
                topics,
            };
            passwords::put_user(&*store, &user)?;
            Ok(shown_password(&user.name, &password, shown, "saved"))
        }
        UsersCommand::Show { name } => match passwords::stored_user(&*store, &name)? {
            Some(u) => {
                serde_json::to_string_pretty(&passwords::describe(&u)).map_err(|e| e.to_string())
            }
            None => Err(format!("no user {name} in the store")),
        },
        UsersCommand::Passwd {
            name,
            password_stdin,
        } => {
            let Some(mut user) = passwords::stored_user(&*store, &name)? else {
                return Err(format!("no user {name} in the store"));
            };
            let (password, shown) =
                passwords::new_password(password_stdin.then(password_from_stdin).transpose()?)?;
            user.password_hash = passwords::hash_password(password.as_bytes())?;
            passwords::put_user(&*store, &user)?;
            Ok(shown_password(
                &name,
                &password,
                shown,
                "has a new password",
            ))
        }
        UsersCommand::Remove { name } => match passwords::remove_user(&*store, &name)? {
            true => Ok(format!("user {name} removed")),
            false => Err(format!("no user {name} in the store")),
        },
        UsersCommand::List => {
            let users: Vec<tollgate::identity::User> = store
                .records(tollgate::store::Table::Users)
                .map_err(|e| e.to_string())?;
            Ok(users
                .iter()
                .map(|u| format!("{}\troles={}", u.name, u.roles.join(",")))
                .collect::<Vec<_>>()
                .join("\n"))
        }
        UsersCommand::Hash => Err("handled before the config is read".into()),
    }
}

fn clients_command(cfg: &config::Config, cmd: ClientsCommand) -> Result<String, String> {
    match cmd {
        ClientsCommand::Add {
            id,
            scopes,
            audiences,
            ttl,
            claims,
            disabled,
            introspect,
            public_key,
            jwks_uri,
            tls_subject,
            tls_san_uri,
            tls_san_dns,
        } => {
            let public_key = match public_key {
                None => None,
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| format!("--public-key {}: {e}", p.display()))?,
                ),
            };
            let tls_client_auth = tls_subject
                .map(TlsClientAuth::SubjectDn)
                .or(tls_san_uri.map(TlsClientAuth::SanUri))
                .or(tls_san_dns.map(TlsClientAuth::SanDns));
            manage::add_client(
                cfg,
                &manage::NewClient {
                    id: &id,
                    scopes,
                    audiences,
                    ttl,
                    claims: &claims,
                    enabled: !disabled,
                    introspect,
                    public_key,
                    jwks_uri,
                    tls_client_auth,
                },
            )
            .map(|secret| match secret {
                Some(secret) => format!(
                    "client_id: {id}\nclient_secret: {secret}\n(the secret is not shown again)"
                ),
                None => format!("client_id: {id}"),
            })
        }
        ClientsCommand::List => manage::list_clients(cfg).map(|s| s.trim_end().to_owned()),
        ClientsCommand::Show { id } => manage::show_client(cfg, &id),
        ClientsCommand::Remove { id } => {
            manage::remove_client(cfg, &id).map(|()| format!("client {id} removed"))
        }
        ClientsCommand::RotateSecret { id } => manage::rotate_secret(cfg, &id).map(|secret| {
            format!("client_id: {id}\nclient_secret: {secret}\n(the old secret no longer works)")
        }),
        ClientsCommand::Enable { id } => {
            manage::set_enabled(cfg, &id, true).map(|()| format!("client {id} enabled"))
        }
        ClientsCommand::Disable { id } => {
            manage::set_enabled(cfg, &id, false).map(|()| format!("client {id} disabled"))
        }
    }
}

/// Runs a store command against the store the config names.
#[allow(clippy::print_stdout)] // the command's output
fn store_command(
    path: &std::path::Path,
    f: impl FnOnce(&config::Config) -> Result<String, String>,
) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match f(&cfg) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)] // the command's output
fn pki_command(cmd: PkiCommand) -> ExitCode {
    let done = match cmd {
        PkiCommand::InitCa {
            org,
            cn,
            days,
            key,
            out,
            force,
        } => pki::init_ca(&pki::CaRequest {
            org: &org,
            cn: &cn,
            days,
            algorithm: key,
            out: &out,
            force,
        })
        .map(|cert| {
            format!(
                "CA written: {} (key: {})",
                cert.display(),
                pki::ca_files(&out).1.display()
            )
        }),
        PkiCommand::Issue {
            ca,
            kind,
            cn,
            org,
            ou,
            sans,
            days,
            key,
            out,
        } => pki::issue(&pki::IssueRequest {
            ca: &ca,
            kind,
            cn: &cn,
            org: org.as_deref(),
            ou: ou.as_deref(),
            sans: &sans,
            days,
            algorithm: key,
            out: &out,
        })
        .map(|(cert, key)| {
            format!(
                "certificate written: {} (key: {})",
                cert.display(),
                key.display()
            )
        }),
        PkiCommand::Crl {
            ca,
            revoke,
            days,
            out,
        } => pki::crl(&ca, &revoke, days, &out)
            .map(|()| format!("CRL written: {} ({} revoked)", out.display(), revoke.len())),
        PkiCommand::Show { file } => pki::show(&file).map(|s| s.trim_end().to_owned()),
    };
    match done {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate pki: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)] // the command's output
fn check_config(path: &std::path::Path) -> ExitCode {
    match tollgate::gateway::check_config(path) {
        Ok(cfg) => {
            println!(
                "{}: ok ({} listeners, {} routes)",
                path.display(),
                cfg.listeners.len(),
                cfg.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{} problem{} found",
                e.errors.len(),
                if e.errors.len() == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf) -> ExitCode {
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid config:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    // The control plane (signals, admin, reloads, health checks) needs one
    // thread; the worker threads that serve traffic have their own loops.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a SIGHUP right after "listening" must reload, not
        // kill the process (the default action).
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "starting tollgate");
        let gateway = match Gateway::start(cfg, Some(path)).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        signals.run(&gateway).await;
        let drained = gateway.drained().await;
        tollgate::telemetry::finish_access_log();
        // Connections cut off at the deadline are a failure to report.
        if drained {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// SIGHUP reloads; SIGTERM or SIGINT starts the drain (a second one exits at once).
    async fn run(mut self, gateway: &Gateway) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = gateway.reload().await;
                }
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
            }
        }
        gateway.shutdown();
        tokio::spawn(async move {
            // 128 + the signal's number, as a shell reports a process the
            // signal killed.
            let code = tokio::select! {
                _ = self.term.recv() => 128 + 15,
                _ = self.int.recv() => 128 + 2,
            };
            tracing::warn!("second shutdown signal: exiting without waiting for the drain");
            tollgate::telemetry::finish_access_log();
            std::process::exit(code);
        });
    }
}

/// mimalloc: fewer cycles per allocation than glibc's malloc on the request
/// path, and per-thread heaps that suit the one-loop-per-worker design.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

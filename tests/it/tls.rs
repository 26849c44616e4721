//! TLS and mTLS through real handshakes: listeners in every client-auth mode,
//! CRLs, expired and foreign certificates, certificate policies and XFCC,
//! certificate reload, SNI, https upstreams, and the `tollgate pki` CLI with
//! openssl and curl.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tollgate::identity::CertIdentity;
use tollgate::pki::{self, CertKind, KeyAlgorithm};

use crate::support::*;

/// A CA made with `tollgate::pki`, and certificates it issues, in a temp dir.
pub struct TestCa {
    dir: TempDir,
    ca: PathBuf,
}

impl TestCa {
    pub fn new(org: &str) -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        pki::init_ca(&pki::CaRequest {
            org,
            cn: &format!("{org} Root"),
            days: 30,
            algorithm: KeyAlgorithm::EcdsaP256,
            out: &ca,
            force: false,
        })
        .unwrap();
        TestCa { dir, ca }
    }

    pub fn pem(&self) -> PathBuf {
        self.ca.join("ca.pem")
    }

    fn issue(&self, name: &str, kind: CertKind, cn: &str, org: &str, sans: &[&str]) -> Identity {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let (cert, key) = pki::issue(&pki::IssueRequest {
            ca: &self.ca,
            kind,
            cn,
            org: Some(org),
            ou: None,
            sans: &sans,
            days: 10,
            algorithm: KeyAlgorithm::EcdsaP256,
            out: &self.dir.path().join(name),
        })
        .unwrap();
        Identity { cert, key }
    }

    pub fn server(&self, name: &str, cn: &str) -> Identity {
        self.issue(
            name,
            CertKind::Server,
            cn,
            "gateway",
            &["127.0.0.1", "localhost"],
        )
    }

    pub fn client(&self, name: &str, org: &str) -> Identity {
        self.issue(
            name,
            CertKind::Client,
            name,
            org,
            &[&format!("spiffe://test/{name}")],
        )
    }

    /// A client certificate whose validity ended yesterday.
    fn expired_client(&self, name: &str) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(self.pem()).unwrap(),
            rcgen::KeyPair::from_pem(&std::fs::read_to_string(self.ca.join("ca.key")).unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(10 * 86_400);
        params.not_after = now - Duration::from_secs(86_400);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let id = Identity {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        };
        std::fs::write(&id.cert, cert.pem()).unwrap();
        std::fs::write(&id.key, key.serialize_pem()).unwrap();
        id
    }

    fn crl(&self, revoked: &[&Identity]) -> PathBuf {
        let out = self.dir.path().join("ca.crl");
        let files: Vec<PathBuf> = revoked.iter().map(|i| i.cert.clone()).collect();
        pki::crl(&self.ca, &files, 7, &out).unwrap();
        out
    }
}

#[derive(Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    pub fn sha256(&self) -> String {
        self.parsed().sha256
    }

    pub fn parsed(&self) -> CertIdentity {
        let pem = std::fs::read(&self.cert).unwrap();
        let der = tollgate::transport::tls::certificates(&pem).unwrap();
        CertIdentity::from_der(&der[0]).unwrap()
    }
}

/// A gateway config whose listeners are given as YAML list items.
pub fn config(listeners: &str, routes: &str) -> String {
    config_with_routes(routes).replace(
        "listeners:\n  - name: sidecar\n    bind: 127.0.0.1:0\n",
        &format!("listeners:\n{listeners}"),
    ) + "reload: { debounce: 50ms }\n"
}

pub fn https_listener(name: &str, server: &Identity, extra: &str) -> String {
    format!(
        "  - name: {name}\n    bind: 127.0.0.1:0\n    protocol: https\n    tls: {{ cert: {}, key: {}{extra} }}\n",
        server.cert.display(),
        server.key.display()
    )
}

pub(crate) fn client_config(
    ca: &Path,
    me: Option<&Identity>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = tollgate::transport::tls::ca_roots(&std::fs::read(ca).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match me {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain =
                tollgate::transport::tls::certificates(&std::fs::read(&id.cert).unwrap()).unwrap();
            let key =
                tollgate::transport::tls::private_key(&std::fs::read(&id.key).unwrap()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// An established TLS connection to a listener, with its HTTP/1.1 sender.
pub struct TlsConn {
    server_cert: CertIdentity,
    sender: hyper::client::conn::http1::SendRequest<TestBody>,
}

impl TlsConn {
    pub async fn open(
        addr: SocketAddr,
        server_name: &str,
        ca: &Path,
        me: Option<&Identity>,
    ) -> Result<TlsConn, String> {
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, me, &[b"http/1.1"])));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let server_cert = CertIdentity::from_der(&der).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(TlsConn {
            server_cert,
            sender,
        })
    }

    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<TestResponse, String> {
        self.request(http::Method::GET, path, headers, "").await
    }

    /// A GET that must get a response.
    pub async fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> TestResponse {
        self.get(path, headers).await.expect("a response")
    }

    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<TestResponse, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        // The connection's task may not have finished the previous exchange yet.
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            self.sender
                .send_request(req.body(full(body.to_owned())).unwrap()),
        )
        .await
        .map_err(|_| "no response in 10s".to_string())?
        .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(TestResponse {
            status: parts.status,
            headers: parts.headers,
            version: parts.version,
            body,
        })
    }
}

/// One request on a new connection; `Err` when the handshake or the request fails.
async fn tls_get(
    addr: SocketAddr,
    ca: &Path,
    me: Option<&Identity>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TestResponse, String> {
    let mut conn = TlsConn::open(addr, "localhost", ca, me).await?;
    conn.get(path, headers).await
}

fn xfcc(r: &TestResponse) -> Option<String> {
    r.json()["headers"]["x-forwarded-client-cert"]
        .as_str()
        .map(str::to_owned)
}

/// none / optional / required listeners with a certificate from the trusted
/// CA, one from another CA, and none; HTTP/2 over ALPN.
#[tokio::test]
async fn client_auth_modes() {
    let up = Upstream::echo("up").await;
    let ca = TestCa::new("Acme");
    let other = TestCa::new("Other");
    let server = ca.server("server", "localhost");
    let alice = ca.client("alice", "backend");
    let mallory = other.client("mallory", "backend");
    let client_ca = format!(", client_ca: {}", ca.pem().display());
    let listeners = [
        https_listener("none", &server, ""),
        https_listener(
            "optional",
            &server,
            &format!("{client_ca}, client_auth: optional"),
        ),
        https_listener("required", &server, &client_ca),
    ]
    .concat();
    let gw = TestGateway::start(&config(&listeners, &route("r", "/", &[&up], ""))).await;
    let addr = |n: &str| gw.gw.listener_addr(n).unwrap();
    let ok = |r: Result<TestResponse, String>| {
        let r = r.expect("request succeeds");
        assert_eq!(r.status, 200, "{}", r.text());
        r
    };

    let none = addr("none");
    assert_eq!(
        xfcc(&ok(tls_get(none, &ca.pem(), None, "/", &[]).await)),
        None
    );
    // The listener asks for no certificate, so the client sends none.
    assert_eq!(
        xfcc(&ok(tls_get(none, &ca.pem(), Some(&alice), "/", &[]).await)),
        None
    );

    let optional = addr("optional");
    assert_eq!(
        xfcc(&ok(tls_get(optional, &ca.pem(), None, "/", &[]).await)),
        None
    );
    let forwarded = xfcc(&ok(
        tls_get(optional, &ca.pem(), Some(&alice), "/", &[]).await
    ))
    .expect("XFCC for a verified certificate");
    assert!(
        forwarded.contains("Subject=\"CN=alice,O=backend\""),
        "{forwarded}"
    );
    let rejected = tls_get(optional, &ca.pem(), Some(&mallory), "/", &[]).await;
    assert!(rejected.is_err(), "a foreign CA's certificate is refused");

    let required = addr("required");
    assert!(tls_get(required, &ca.pem(), None, "/", &[]).await.is_err());
    assert!(
        tls_get(required, &ca.pem(), Some(&mallory), "/", &[])
            .await
            .is_err()
    );
    ok(tls_get(required, &ca.pem(), Some(&alice), "/", &[]).await);

    // ALPN h2: the same listener speaks HTTP/2.
    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, TestBody>(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(client_config(&ca.pem(), Some(&alice), &[]))
                .https_only()
                .enable_http2()
                .build(),
        );
    let r = h2
        .request(
            Request::get(format!("https://127.0.0.1:{}/h2", required.port()))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);

    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "tollgate_tls_handshakes_total{listener=\"required\",outcome=\"bad_certificate\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tollgate_tls_handshakes_total{listener=\"optional\",outcome=\"ok\"}"
        ) >= 2.0
    );
    let expiry = metric(
        &m,
        &format!(
            "tollgate_tls_cert_expiry_seconds{{cert=\"{}\",listener=\"none\"",
            server.cert.display()
        ),
    );
    assert!(
        expiry > 9.0 * 86_400.0 && expiry <= 10.0 * 86_400.0,
        "{expiry}"
    );
}

/// `auth: mtls` routes on an optional listener: 401 without a certificate,
/// 403 when the policy denies its O, 200 with XFCC when it allows; a forged
/// XFCC header never reaches the upstream.
#[tokio::test]
async fn mtls_routes_authorize_by_certificate() {
    let up = Upstream::echo("up").await;
    let ca = TestCa::new("Acme");
    let server = ca.server("server", "localhost");
    let alice = ca.client("alice", "backend");
    let eve = ca.client("eve", "frontend");
    let listeners = https_listener(
        "sidecar",
        &server,
        &format!(", client_ca: {}, client_auth: optional", ca.pem().display()),
    );
    let routes = [
        route(
            "svc",
            "/svc",
            &[&up],
            "    auth: mtls\n    policy:\n      - allow: { cert: { o: backend, san_uri_prefix: \"spiffe://test/\" } }\n",
        ),
        route(
            "quiet",
            "/quiet",
            &[&up],
            "    auth: mtls\n    forward_client_cert: false\n",
        ),
        route(
            "hash",
            "/hash",
            &[&up],
            "    forward_client_cert: [hash]\n",
        ),
        route("open", "/open", &[&up], ""),
    ]
    .concat();
    let gw = TestGateway::start(&config(&listeners, &routes)).await;
    let addr = gw.addr();
    let pem = ca.pem();

    let r = tls_get(addr, &pem, None, "/svc", &[]).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "unauthorized");
    let r = tls_get(addr, &pem, Some(&eve), "/svc", &[]).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "forbidden");
    let forged = [(
        "x-forwarded-client-cert",
        "Hash=forged;Subject=\"CN=admin\"",
    )];
    let r = tls_get(addr, &pem, Some(&alice), "/svc", &forged)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        xfcc(&r).unwrap(),
        format!(
            "Hash={};Subject=\"CN=alice,O=backend\";URI=spiffe://test/alice",
            alice.sha256()
        )
    );

    // Not forwarded when the route says so, nor when no certificate was sent.
    let r = tls_get(addr, &pem, Some(&alice), "/quiet", &forged)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(xfcc(&r), None);
    let r = tls_get(addr, &pem, None, "/open", &forged).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(xfcc(&r), None, "a client-supplied XFCC is removed");
    let r = tls_get(addr, &pem, Some(&alice), "/hash", &[])
        .await
        .unwrap();
    assert_eq!(xfcc(&r).unwrap(), format!("Hash={}", alice.sha256()));
}

/// Revoked and expired certificates fail the handshake, and the gateway's log
/// says why; an accepted certificate is logged with CN, O and fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_certificates_are_rejected_and_logged() {
    let up = Upstream::echo("up").await;
    let ca = TestCa::new("Acme");
    let server = ca.server("server", "localhost");
    let alice = ca.client("alice", "backend");
    let bob = ca.client("bob", "backend");
    let carol = ca.expired_client("carol");
    let crl = ca.crl(&[&bob]);
    let listeners = https_listener(
        "sidecar",
        &server,
        &format!(
            ", client_ca: {}, crls: [{}]",
            ca.pem().display(),
            crl.display()
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config(&listeners, &route("r", "/", &[&up], ""))).unwrap();
    let (mut child, addr, logs) = run_binary(&file);

    let r = tls_get(addr, &ca.pem(), Some(&alice), "/", &[]).await;
    assert_eq!(r.expect("alice is accepted").status, 200);
    assert!(
        tls_get(addr, &ca.pem(), Some(&bob), "/", &[])
            .await
            .is_err()
    );
    assert!(
        tls_get(addr, &ca.pem(), Some(&carol), "/", &[])
            .await
            .is_err()
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let logs = logs.join().unwrap();
    let rejected: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("client certificate rejected"))
        .collect();
    assert!(
        rejected.iter().any(|l| l.contains("Revoked")),
        "{rejected:#?}"
    );
    assert!(
        rejected.iter().any(|l| l.contains("expired")),
        "{rejected:#?}"
    );
    let accepted = logs
        .iter()
        .find(|l| l.contains("client certificate verified"))
        .expect("accepted certificate logged");
    assert!(accepted.contains("\"cn\":\"alice\""), "{accepted}");
    assert!(accepted.contains("\"o\":\"backend\""), "{accepted}");
    assert!(accepted.contains(&alice.sha256()), "{accepted}");
    // The server certificate is valid for 10 days, inside the 30-day warning.
    assert!(
        logs.iter()
            .any(|l| l.contains("certificate expires soon") && l.contains("server.pem")),
        "{logs:#?}"
    );
}

/// Replacing the certificate on disk: new handshakes get the new one while an
/// open connection keeps working; a broken replacement keeps the last good one.
#[tokio::test]
async fn certificates_reload_from_disk() {
    let up = Upstream::echo("up").await;
    let ca = TestCa::new("Acme");
    let v1 = ca.server("v1", "gw-v1");
    let v2 = ca.server("v2", "gw-v2");
    let v3 = ca.server("v3", "gw-v3");
    let live = Identity {
        cert: ca.dir.path().join("live.pem"),
        key: ca.dir.path().join("live.key"),
    };
    let install = |from: &Identity| {
        // Key first, then certificate, each replaced by rename.
        for (src, dst) in [(&from.key, &live.key), (&from.cert, &live.cert)] {
            let tmp = dst.with_extension("tmp");
            std::fs::copy(src, &tmp).unwrap();
            std::fs::rename(&tmp, dst).unwrap();
        }
    };
    install(&v1);
    let gw = TestGateway::start(&config(
        &https_listener("sidecar", &live, ""),
        &route("r", "/", &[&up], ""),
    ))
    .await;
    let addr = gw.addr();
    let pem = ca.pem();
    let served_cn = || async {
        TlsConn::open(addr, "localhost", &pem, None)
            .await
            .map(|c| c.server_cert.cn.unwrap_or_default())
            .unwrap_or_default()
    };

    let mut old = TlsConn::open(addr, "localhost", &pem, None).await.unwrap();
    assert_eq!(old.server_cert.cn.as_deref(), Some("gw-v1"));
    assert_eq!(old.get("/", &[]).await.unwrap().status, 200);

    install(&v2);
    wait_until(
        Duration::from_secs(10),
        "new handshakes serve v2",
        || async { served_cn().await == "gw-v2" },
    )
    .await;
    assert_eq!(
        old.get("/", &[]).await.unwrap().status,
        200,
        "the connection made before the swap continues"
    );

    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    gw.gw.reload().await.unwrap();
    assert_eq!(
        served_cn().await,
        "gw-v2",
        "a broken file keeps the old cert"
    );

    install(&v3);
    wait_until(
        Duration::from_secs(10),
        "new handshakes serve v3",
        || async { served_cn().await == "gw-v3" },
    )
    .await;
}

/// SNI picks the certificate whose DNS name matches (exact or wildcard); other
/// names get the default certificate.
#[tokio::test]
async fn sni_selects_certificates() {
    let up = Upstream::echo("up").await;
    let ca = TestCa::new("Acme");
    let default = ca.server("default", "default");
    let b = ca.issue("b", CertKind::Server, "b", "gateway", &["b.example"]);
    let w = ca.issue("w", CertKind::Server, "w", "gateway", &["*.w.example"]);
    let extra = format!(
        ", sni: [{{ cert: {}, key: {} }}, {{ cert: {}, key: {} }}]",
        b.cert.display(),
        b.key.display(),
        w.cert.display(),
        w.key.display()
    );
    let gw = TestGateway::start(&config(
        &https_listener("sidecar", &default, &extra),
        &route("r", "/", &[&up], ""),
    ))
    .await;
    for (name, cn) in [
        ("b.example", "b"),
        ("B.Example", "b"),
        ("x.w.example", "w"),
        ("localhost", "default"),
        ("other.example", "default"),
    ] {
        let conn = TlsConn::open(gw.addr(), name, &ca.pem(), None).await;
        // The default certificate is not valid for other names: the client
        // refuses it, which is the point. Read the served CN either way.
        match conn {
            Ok(c) => assert_eq!(c.server_cert.cn.as_deref(), Some(cn), "{name}"),
            Err(e) => {
                assert_eq!(cn, "default", "{name}: {e}");
                assert!(e.contains("not valid for name"), "{name}: {e}");
            }
        }
    }
}

/// An https upstream behind a private CA; upstream mTLS with the gateway's
/// client certificate; SNI override; HTTP/2 by ALPN.
#[tokio::test]
async fn https_upstreams() {
    let ca = TestCa::new("Upstream");
    let server = ca.server("upstream", "bar.internal");
    let named = ca.issue("named", CertKind::Server, "bar", "up", &["bar.internal"]);
    let gateway_cert = ca.client("gateway", "edge");
    let plain = TlsUpstream::start(&ca, &server, false).await;
    let mutual = TlsUpstream::start(&ca, &server, true).await;
    let by_name = TlsUpstream::start(&ca, &named, false).await;
    let ca_file = ca.pem().display().to_string();
    let client = format!(
        "cert: {}, key: {}",
        gateway_cert.cert.display(),
        gateway_cert.key.display()
    );
    let https_route = |name: &str, addr: SocketAddr, tls: &str, extra: &str| {
        format!(
            "  - name: {name}\n    match: {{ path_prefix: /{name} }}\n    upstream:\n      targets: [https://{addr}]\n      retries: 0\n      tls: {{ {tls} }}\n{extra}"
        )
    };
    let routes = [
        https_route("tls", plain.addr, &format!("ca_file: {ca_file}"), ""),
        https_route("system", plain.addr, "", ""),
        https_route(
            "mtls",
            mutual.addr,
            &format!("ca_file: {ca_file}, {client}"),
            "",
        ),
        https_route("nocert", mutual.addr, &format!("ca_file: {ca_file}"), ""),
        https_route(
            "named",
            by_name.addr,
            &format!("ca_file: {ca_file}, server_name: bar.internal"),
            "",
        ),
        https_route(
            "wrongname",
            by_name.addr,
            &format!("ca_file: {ca_file}"),
            "",
        ),
        https_route(
            "h2",
            plain.addr,
            &format!("ca_file: {ca_file}"),
            "      protocol: h2\n",
        ),
    ]
    .concat();
    let gw = TestGateway::start(
        &config_with_routes(&routes).replace("access_log: false", "access_log: true"),
    )
    .await;

    let r = get(&gw.url("/tls/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/tls/x");
    assert_eq!(r.json()["version"], "HTTP/1.1");
    let r = get(&gw.url("/system")).await;
    assert_eq!(r.status, 502, "the system roots do not know the private CA");
    assert_eq!(r.json()["error"], "upstream_unavailable");

    let r = get(&gw.url("/mtls")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["client_cn"], "gateway");
    assert_eq!(get(&gw.url("/nocert")).await.status, 502);

    assert_eq!(get(&gw.url("/named")).await.status, 200);
    let r = get(&gw.url("/wrongname")).await;
    assert_eq!(r.status, 502, "the IP is not a name in the certificate");

    let r = get(&gw.url("/h2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");
}

/// HTTP/1.1 to an https target goes by the gateway's own client: one kept
/// connection carries a client connection's requests, request bodies go out
/// whole (TLS flushed while the body streams), long chunked responses come
/// back whole, and a WebSocket upgrade relays over the TLS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_target_keeps_connections_carries_bodies_and_upgrades() {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let ca = TestCa::new("Upstream");
    let server = ca.server("upstream", "bar.internal");
    let acceptor = tls_acceptor(&ca, &server, false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        if req.headers().contains_key(http::header::UPGRADE) {
                            let (resp, socket) = ws_accept(&mut req);
                            tokio::spawn(async move {
                                let Ok(upgraded) = socket.await else { return };
                                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                                    TokioIo::new(upgraded),
                                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                                    None,
                                )
                                .await;
                                while let Some(Ok(msg)) = ws.next().await {
                                    if (msg.is_text() || msg.is_binary())
                                        && ws.send(msg).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            });
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        if req.uri().path() == "/big" {
                            let chunks = (0..256).map(|i| {
                                Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                    bytes::Bytes::from(vec![i as u8; 4096]),
                                ))
                            });
                            let body =
                                http_body_util::StreamBody::new(futures_util::stream::iter(chunks))
                                    .map_err(|e| match e {});
                            return Ok(http::Response::new(TestBody::new(body)));
                        }
                        if req.uri().path() == "/slow" {
                            // The gateway's writes block on a full socket meanwhile.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Ok(http::Response::new(full(body)))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    let routes = format!(
        "  - name: tls\n    match: {{ path_prefix: / }}\n    upstream:\n      targets: [https://{addr}]\n      tls: {{ ca_file: {} }}\n",
        ca.pem().display()
    );
    let gw = TestGateway::start(&config_with_routes(&routes)).await;

    let mut conn = connection(gw.addr()).await;
    for i in 0..20 {
        let body = format!("request {i}").repeat(i * 1000 + 1);
        let r = send_on(
            &mut conn,
            Request::post(gw.url("/echo"))
                .body(full(body.clone()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), body, "request {i}: the body went out whole");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one client connection's requests share one kept TLS connection"
    );
    let big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
    let r = send_on(
        &mut conn,
        Request::post(gw.url("/slow"))
            .body(full(big.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.body == big,
        "a body larger than the socket buffers went out whole"
    );
    let r = send_on(
        &mut conn,
        Request::get(gw.url("/big")).body(full("")).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 256 * 4096);
    assert!(
        r.body
            .chunks(4096)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == i as u8))
    );

    let mut ws = websocket_echoes(&format!("ws://{}/ws", gw.addr()), 3).await;
    ws.close(None).await.unwrap();
    task.abort();
}

/// A WebSocket handshake's `101` to `req`, and its upgraded connection.
fn ws_accept(
    req: &mut Request<hyper::body::Incoming>,
) -> (http::Response<TestBody>, hyper::upgrade::OnUpgrade) {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
    let resp = http::Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", derive_accept_key(&key))
        .body(full(""))
        .unwrap();
    (resp, hyper::upgrade::on(req))
}

/// A TLS server answering with the request's path, version and the CN of the
/// client certificate (when `require_client` asks for one).
struct TlsUpstream {
    addr: SocketAddr,
    _task: tokio::task::JoinHandle<()>,
}

/// A TLS acceptor for `id` offering h2 and http/1.1, asking for a client
/// certificate from `ca` when `require_client`.
fn tls_acceptor(ca: &TestCa, id: &Identity, require_client: bool) -> tokio_rustls::TlsAcceptor {
    let read = |p: &Path| std::fs::read(p).unwrap();
    let chain = tollgate::transport::tls::certificates(&read(&id.cert)).unwrap();
    let key = tollgate::transport::tls::private_key(&read(&id.key)).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client {
        let roots = tollgate::transport::tls::ca_roots(&read(&ca.pem())).unwrap();
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(chain, key).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

impl TlsUpstream {
    async fn start(ca: &TestCa, id: &Identity, require_client: bool) -> TlsUpstream {
        let acceptor = tls_acceptor(ca, id, require_client);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|d| CertIdentity::from_der(d).ok())
                        .and_then(|c| c.cn);
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        let body = serde_json::json!({
                            "path": req.uri().path(),
                            "version": format!("{:?}", req.version()),
                            "client_cn": client_cn,
                        });
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(full(
                                body.to_string(),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream { addr, _task: task }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// The `tollgate pki` commands: their certificates verify with openssl and
/// work with curl against a tollgate mTLS listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_cli_with_openssl_and_curl() {
    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tollgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[
        "pki",
        "init-ca",
        "--org",
        "Acme",
        "--cn",
        "Acme Dev Root",
        "--out",
        &d("ca"),
    ]);
    run(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--kind",
        "server",
        "--cn",
        "localhost",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
        "--out",
        &d("server"),
        "--key",
        "rsa2048",
    ]);
    run(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--kind",
        "client",
        "--cn",
        "device-7",
        "--org",
        "devices",
        "--san",
        "spiffe://acme/device-7",
        "--out",
        &d("device"),
    ]);
    run(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--kind",
        "client",
        "--cn",
        "sensor",
        "--out",
        &d("sensor"),
        "--key",
        "ed25519",
    ]);
    let shown = run(&["pki", "show", &d("device.pem")]);
    assert!(shown.contains("CN=device-7,O=devices"), "{shown}");
    assert!(shown.contains("spiffe://acme/device-7"), "{shown}");
    let refused = Command::new(BIN)
        .args([
            "pki",
            "init-ca",
            "--org",
            "A",
            "--cn",
            "B",
            "--out",
            &d("ca"),
        ])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "an existing CA key is not replaced"
    );

    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            &d("ca/ca.pem"),
            &d("server.pem"),
            &d("device.pem"),
            &d("sensor.pem"),
        ])
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let server = Identity {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
    };
    let gw = TestGateway::start(&config(
        &https_listener(
            "sidecar",
            &server,
            &format!(", client_ca: {}", d("ca/ca.pem")),
        ),
        &route("r", "/", &[&up], ""),
    ))
    .await;
    let url = format!("https://localhost:{}/curl", gw.addr().port());
    let port = gw.addr().port();
    let curl_args = |with_cert: bool| {
        let mut args = vec![
            "-sS".to_string(),
            "--cacert".into(),
            d("ca/ca.pem"),
            "--resolve".into(),
            format!("localhost:{port}:127.0.0.1"),
        ];
        if with_cert {
            args.extend([
                "--cert".into(),
                d("device.pem"),
                "--key".into(),
                d("device.key"),
            ]);
        }
        args.push(url.clone());
        args
    };
    let (with_cert, without_cert) = (curl_args(true), curl_args(false));
    let out = tokio::task::spawn_blocking(move || {
        let curl = |args: Vec<String>| {
            Command::new("curl")
                .args(args)
                .output()
                .expect("curl is installed (.ci/run installs it)")
        };
        (curl(with_cert), curl(without_cert))
    })
    .await
    .unwrap();
    let (with, without) = out;
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&with.stdout).unwrap();
    let xfcc = body["headers"]["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.contains("Subject=\"CN=device-7,O=devices\""), "{xfcc}");
    assert!(
        !without.status.success(),
        "no client certificate, no service"
    );
}

/// TLS config problems name the key and the file.
#[test]
fn tls_config_errors_name_the_key() {
    let ca = TestCa::new("Acme");
    let a = ca.server("a", "a");
    let b = ca.server("b", "b");
    let mismatched = Identity {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let listeners = [
        https_listener("mismatch", &mismatched, ""),
        https_listener(
            "missing",
            &Identity {
                cert: dir.path().join("nope.pem"),
                key: a.key.clone(),
            },
            ", client_auth: required",
        ),
        "  - name: bare\n    bind: 127.0.0.1:0\n    protocol: https\n".into(),
    ]
    .concat();
    let routes = "  - name: r\n    match: { path_prefix: / }\n    upstream: { targets: [\"https://127.0.0.1:1\", \"http://127.0.0.1:2\"], tls: { ca_file: nope.pem } }\n";
    std::fs::write(&path, config(&listeners, routes)).unwrap();
    let err = tollgate::gateway::check_config(&path)
        .unwrap_err()
        .to_string();
    for want in [
        "listeners[0].tls.cert:",
        "the key does not belong to the certificate",
        "listeners[1].tls.cert: cannot read",
        "nope.pem",
        "listeners[1].tls.client_ca: client_auth is optional or required",
        "listeners[2].tls: protocol https needs `tls`",
        "routes[0].upstream.targets: mixes http:// and https://",
        "routes[0].upstream.tls.ca_file: cannot read",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}

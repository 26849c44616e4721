//! The store on etcd (cluster mode): the same conformance checks run
//! against the embedded redb store and against a real `etcd` started on
//! free 127.0.0.1 ports, plus what only a shared store has (two nodes, etcd
//! going away). The config check runs in every build.

use std::path::Path;

/// `store.etcd` is refused, naming the key, by a build without cluster
/// support; a build with it takes the key, and refuses it next to `path`.
#[test]
fn store_etcd_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let load = |yaml: &str| {
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, yaml).unwrap();
        tollgate::config::load(&file)
    };
    let etcd_only = "store:\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n    prefix: /tollgate/\n    timeout: 2s\n";
    let both = "store:\n  path: data/t.redb\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n";
    if cfg!(feature = "cluster") {
        let cfg = load(etcd_only).unwrap();
        let etcd = cfg.store.etcd.as_ref().unwrap();
        assert_eq!(etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(etcd.prefix, "/tollgate/");
        assert_eq!(etcd.timeout, std::time::Duration::from_secs(2));
        let errs = load(both).unwrap_err();
        assert!(errs.errors.iter().any(|e| e.path == "store.path"), "{errs}");
        let errs =
            load("store:\n  etcd:\n    endpoints: [https://etcd:2379]\n    prefix: tollgate\n")
                .unwrap_err();
        assert!(
            errs.errors
                .iter()
                .any(|e| e.path == "store.etcd.endpoints[0]" && e.message.contains("tls.ca")),
            "{errs}"
        );
        assert!(
            errs.errors.iter().any(|e| e.path == "store.etcd.prefix"),
            "{errs}"
        );
    } else {
        for yaml in [etcd_only, both] {
            let errs = load(yaml).unwrap_err();
            assert!(
                errs.errors.iter().any(|e| e.path == "store.etcd"
                    && e.message
                        == "this build has no cluster support (build with --features cluster)"),
                "{errs}"
            );
        }
    }
    // Existing configs keep working unchanged.
    let cfg = load("store:\n  path: data/t.redb\n").unwrap();
    assert!(cfg.store.etcd.is_none());
    assert_eq!(cfg.store.path, Path::new("data/t.redb"));
    let cfg = load("{}\n").unwrap();
    assert_eq!(cfg.store.path, Path::new("data/tollgate.redb"));
}

#[cfg(feature = "cluster")]
pub(crate) mod cluster {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use std::path::Path;

    use tollgate::config::{EtcdStoreConfig, EtcdTls};
    use tollgate::store::{EtcdStore, RedbStore, Store, StoreError, Table};

    /// A single-member etcd on free ports with its own data directory,
    /// killed when dropped.
    pub(crate) struct Etcd {
        child: Option<Child>,
        pub(crate) endpoint: String,
        peer_url: String,
        /// The CA, a client certificate and its key, when it serves TLS.
        tls: Option<EtcdTls>,
        dir: tempfile::TempDir,
    }

    /// PEM files in `dir`: a CA, a certificate for 127.0.0.1 signed by it
    /// (etcd's), and a client certificate (tollgate's).
    fn make_certs(dir: &Path) -> EtcdTls {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, PKCS_ECDSA_P256_SHA256,
        };
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "test etcd CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}-key.pem"), key.serialize_pem()),
            )
        };
        leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
        let (cert, key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
        EtcdTls {
            ca: write("ca.pem", ca_cert.pem()),
            cert: Some(cert),
            key: Some(key),
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    impl Etcd {
        pub(crate) fn start() -> Etcd {
            Etcd::start_with(false)
        }

        /// With `tls`: clients must present a certificate of its CA.
        fn start_with(tls: bool) -> Etcd {
            let dir = tempfile::tempdir().unwrap();
            let (client, peer) = (free_port(), free_port());
            let scheme = if tls { "https" } else { "http" };
            let tls = tls.then(|| make_certs(dir.path()));
            let mut etcd = Etcd {
                child: None,
                endpoint: format!("{scheme}://127.0.0.1:{client}"),
                peer_url: format!("http://127.0.0.1:{peer}"),
                tls,
                dir,
            };
            etcd.resume();
            etcd
        }

        /// Starts it (again, with its data), and waits until it answers.
        pub(crate) fn resume(&mut self) {
            assert!(self.child.is_none(), "etcd runs already");
            let d = self.dir.path();
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("etcd.log"))
                .unwrap();
            let mut cmd = Command::new("etcd");
            if self.tls.is_some() {
                cmd.arg("--cert-file")
                    .arg(d.join("server.pem"))
                    .arg("--key-file")
                    .arg(d.join("server-key.pem"))
                    .arg("--trusted-ca-file")
                    .arg(d.join("ca.pem"))
                    .arg("--client-cert-auth");
            }
            let (endpoint, peer_url) = (&self.endpoint, &self.peer_url);
            self.child = Some(
                cmd.args(["--name", "t", "--data-dir"])
                    .arg(d.join("data"))
                    .args(["--listen-client-urls", endpoint])
                    .args(["--advertise-client-urls", endpoint])
                    .args(["--listen-peer-urls", peer_url])
                    .args(["--initial-advertise-peer-urls", peer_url])
                    .args(["--initial-cluster", &format!("t={peer_url}")])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("etcd (Debian's etcd-server) must be installed"),
            );
            // Ready when it answers a read.
            let probe = self.store("/probe/");
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(e) = probe.generation() {
                assert!(Instant::now() < deadline, "etcd did not start: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        /// Kills it (its data stays for [`resume`](Self::resume)).
        pub(crate) fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn config(&self, prefix: &str) -> EtcdStoreConfig {
            EtcdStoreConfig {
                endpoints: vec![self.endpoint.clone()],
                prefix: prefix.to_owned(),
                tls: self.tls.clone(),
                timeout: Duration::from_secs(2),
            }
        }

        /// A handle of its own (a node's client).
        fn store(&self, prefix: &str) -> EtcdStore {
            EtcdStore::connect(&self.config(prefix)).unwrap()
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn row(k: &str, v: &str) -> (String, Vec<u8>) {
        (k.to_owned(), v.as_bytes().to_vec())
    }

    /// What every store does; `a` and `b` are two handles on one store
    /// (two nodes, for etcd).
    fn conformance(a: &dyn Store, b: &dyn Store) {
        let g0 = a.generation().unwrap();

        // put / scan / remove, each one generation.
        a.put(Table::Clients, "b", b"2").unwrap();
        a.put(Table::Clients, "a", b"1").unwrap();
        a.put(Table::Users, "a", b"user").unwrap();
        assert_eq!(a.generation().unwrap(), g0 + 3);
        assert_eq!(
            a.scan(Table::Clients).unwrap(),
            [row("a", "1"), row("b", "2")]
        );
        assert_eq!(b.scan(Table::Users).unwrap(), [row("a", "user")]);
        assert!(a.scan(Table::ApiRoutes).unwrap().is_empty());
        a.put(Table::Clients, "a", b"one").unwrap();
        assert!(b.remove(Table::Clients, "b").unwrap());
        assert!(!a.remove(Table::Clients, "b").unwrap());
        assert_eq!(a.scan(Table::Clients).unwrap(), [row("a", "one")]);
        assert_eq!(b.generation().unwrap(), g0 + 6);

        // update: replaces the table; None and a refusal write nothing.
        let g = a.generation().unwrap();
        assert!(
            a.update(Table::Clients, &mut |rows| {
                assert_eq!(rows, [row("a", "one")]);
                Ok(Some(vec![row("c", "3"), row("d", "4")]))
            })
            .unwrap()
        );
        assert_eq!(
            b.scan(Table::Clients).unwrap(),
            [row("c", "3"), row("d", "4")]
        );
        assert!(!a.update(Table::Clients, &mut |_| Ok(None)).unwrap());
        let refused = a.update(Table::Clients, &mut |_| Err("no".into()));
        assert!(
            matches!(refused, Err(StoreError::Refused { .. })),
            "{refused:?}"
        );
        assert_eq!(a.generation().unwrap(), g + 1);
        assert_eq!(a.scan(Table::Users).unwrap(), [row("a", "user")]);

        // Two writers racing through update lose no rows.
        let g = a.generation().unwrap();
        const EACH: usize = 15;
        std::thread::scope(|s| {
            for (name, store) in [("a", a), ("b", b)] {
                s.spawn(move || {
                    for i in 0..EACH {
                        store
                            .update(Table::ApiRoutes, &mut |mut rows| {
                                // A read-modify-write of one row, and a row added.
                                let count = match rows.iter().position(|(k, _)| k == "count") {
                                    Some(at) => {
                                        let (_, v) = rows.remove(at);
                                        String::from_utf8(v).unwrap().parse::<usize>().unwrap()
                                    }
                                    None => 0,
                                };
                                rows.push(row("count", &(count + 1).to_string()));
                                rows.push(row(&format!("{name}{i:02}"), name));
                                Ok(Some(rows))
                            })
                            .unwrap();
                    }
                });
            }
        });
        let rows = a.scan(Table::ApiRoutes).unwrap();
        assert_eq!(rows.len(), 2 * EACH + 1, "{rows:?}");
        assert!(
            rows.contains(&row("count", &(2 * EACH).to_string())),
            "{rows:?}"
        );
        assert_eq!(a.generation().unwrap(), g + 2 * EACH as u64);

        // Revocations.
        let g = a.generation().unwrap();
        a.revoke("j1", 10).unwrap();
        b.revoke("j2", 100).unwrap();
        assert_eq!(
            b.revoked().unwrap(),
            [("j1".to_owned(), 10), ("j2".to_owned(), 100)]
        );
        assert_eq!(a.purge_revoked(50).unwrap(), 1);
        assert_eq!(b.revoked().unwrap(), [("j2".to_owned(), 100)]);
        assert_eq!(a.generation().unwrap(), g + 3);
        assert_eq!(b.purge_revoked(50).unwrap(), 0);
        assert_eq!(
            a.generation().unwrap(),
            g + 3,
            "nothing purged, nothing written"
        );
    }

    #[test]
    fn redb_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("t.redb")).unwrap();
        conformance(&store, &store);
    }

    #[test]
    fn etcd_store_conforms_across_two_nodes() {
        let etcd = Etcd::start();
        let (a, b) = (etcd.store("/t/"), etcd.store("/t/"));
        conformance(&a, &b);
        assert_eq!(a.change_marker(), None);
        // Another prefix is another store.
        let other = etcd.store("/other/");
        assert_eq!(other.generation().unwrap(), 0);
        assert!(other.scan(Table::Clients).unwrap().is_empty());
        assert!(other.revoked().unwrap().is_empty());
    }

    /// `store::open` picks etcd from the config, one client per etcd, and
    /// its calls work from inside a current-thread runtime (no deadlock).
    #[test]
    fn open_picks_etcd_and_works_inside_a_runtime() {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.yaml");
        let yaml = format!(
            "store:\n  etcd:\n    endpoints: [{}]\n    prefix: /open/\n    timeout: 2s\n",
            etcd.endpoint
        );
        std::fs::write(&file, yaml).unwrap();
        let cfg = tollgate::config::load(&file).unwrap();
        let store = tollgate::store::open(&cfg).unwrap();
        assert!(
            store.describe().contains(&etcd.endpoint),
            "{}",
            store.describe()
        );
        assert!(Arc::ptr_eq(&store, &tollgate::store::open(&cfg).unwrap()));
        assert!(tollgate::store::existing(&cfg).unwrap().is_some());
        assert_eq!(tollgate::store::change_marker(&cfg), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            store
                .put_client("c1", &serde_json::json!({"id": "c1"}))
                .unwrap();
            let clients: Vec<serde_json::Value> = store.clients().unwrap();
            assert_eq!(clients, [serde_json::json!({"id": "c1"})]);
        });
        let keys = store
            .update_signing_keys(|keys: Vec<serde_json::Value>| {
                Ok((
                    Some(vec![("k1".to_owned(), serde_json::json!({"kid": "k1"}))]),
                    keys.len(),
                ))
            })
            .unwrap();
        assert_eq!(keys, 0);
        assert_eq!(store.generation().unwrap(), 2);
    }

    /// TLS with a client certificate, the files named in gateway.yaml
    /// relative to it; without the client certificate etcd refuses (an
    /// error, not a hang).
    #[test]
    fn etcd_over_tls_with_a_client_certificate() {
        let etcd = Etcd::start_with(true);
        let tls = etcd.tls.clone().unwrap();
        let dir = tls.ca.parent().unwrap();
        let file = dir.join("gateway.yaml");
        let yaml = format!(
            "store:\n  etcd:\n    endpoints: [{}]\n    prefix: /tls/\n    tls: {{ ca: ca.pem, cert: client.pem, key: client-key.pem }}\n",
            etcd.endpoint
        );
        std::fs::write(&file, yaml).unwrap();
        let cfg = tollgate::config::load(&file).unwrap();
        let store = tollgate::store::open(&cfg).unwrap();
        store.put(Table::Users, "u", b"1").unwrap();
        assert_eq!(store.scan(Table::Users).unwrap(), [row("u", "1")]);
        assert_eq!(store.generation().unwrap(), 1);

        // Rotated files (here: rewritten) make a new client that reads them.
        for f in ["client.pem", "client-key.pem"] {
            let path = dir.join(f);
            let pem = std::fs::read(&path).unwrap();
            std::fs::write(&path, [pem.as_slice(), b"\n"].concat()).unwrap();
        }
        let rotated = tollgate::store::open(&cfg).unwrap();
        assert!(!Arc::ptr_eq(&store, &rotated), "a new client");
        assert_eq!(rotated.scan(Table::Users).unwrap(), [row("u", "1")]);
        assert!(Arc::ptr_eq(&rotated, &tollgate::store::open(&cfg).unwrap()));

        let mut anonymous = etcd.config("/tls/");
        anonymous.tls = Some(EtcdTls {
            cert: None,
            key: None,
            ..tls
        });
        let started = Instant::now();
        let refused = EtcdStore::connect(&anonymous)
            .and_then(|s| s.scan(Table::Users))
            .expect_err("no client certificate");
        assert!(started.elapsed() < anonymous.timeout + Duration::from_millis(1500));
        assert!(refused.to_string().contains(&etcd.endpoint), "{refused}");
    }

    type Call = Box<dyn Fn(&dyn Store) -> Result<(), StoreError>>;

    /// etcd gone: every call fails within the timeout, naming the
    /// endpoint, and none hangs.
    #[test]
    fn etcd_unreachable_fails_every_call_within_the_timeout() {
        let mut etcd = Etcd::start();
        let store = etcd.store("/down/");
        store.put(Table::Clients, "a", b"1").unwrap();
        etcd.stop();
        let timeout = etcd.config("/down/").timeout;
        let calls: Vec<(&str, Call)> = vec![
            ("generation", Box::new(|s| s.generation().map(drop))),
            ("scan", Box::new(|s| s.scan(Table::Clients).map(drop))),
            ("put", Box::new(|s| s.put(Table::Clients, "b", b"2"))),
            (
                "remove",
                Box::new(|s| s.remove(Table::Clients, "a").map(drop)),
            ),
            (
                "update",
                Box::new(|s| s.update(Table::Clients, &mut |r| Ok(Some(r))).map(drop)),
            ),
            ("revoked", Box::new(|s| s.revoked().map(drop))),
            ("revoke", Box::new(|s| s.revoke("j", 1))),
            ("purge_revoked", Box::new(|s| s.purge_revoked(1).map(drop))),
        ];
        // A fresh client too (a node starting while etcd is down).
        let fresh = etcd.store("/down/");
        for store in [&store, &fresh] {
            for (name, call) in &calls {
                let started = Instant::now();
                let err = call(store).expect_err(name);
                let took = started.elapsed();
                assert!(
                    took < timeout + Duration::from_millis(1500),
                    "{name} took {took:?}"
                );
                let message = err.to_string();
                assert!(message.contains(&etcd.endpoint), "{name}: {message}");
            }
        }

        // An endpoint that takes connections and never answers: every
        // call ends at the timeout.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let timeout = Duration::from_millis(300);
        let store = EtcdStore::connect(&EtcdStoreConfig {
            endpoints: vec![endpoint.clone()],
            prefix: "/silent/".to_owned(),
            tls: None,
            timeout,
        })
        .unwrap();
        for (name, call) in &calls {
            let started = Instant::now();
            let err = call(&store).expect_err(name);
            let took = started.elapsed();
            assert!(
                took < timeout + Duration::from_millis(1500),
                "{name} took {took:?}"
            );
            let message = err.to_string();
            assert!(message.contains(&endpoint), "{name}: {message}");
        }
    }
}

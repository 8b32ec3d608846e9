//! TLS: upstreams and targets behind a private certificate authority, made here with rcgen, and
//! a target that requires a client certificate. The emulator and the sink speak plain HTTP;
//! a TLS-terminating proxy on 127.0.0.1 stands in front of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use sse_relay_fixtures::emulator::{Api, Upstream};
use sse_relay_fixtures::sink::Sink;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{DEADLINE, LoggedRelay, TestRelay, eventually, parse_config, quiet_upstream};

/// A certificate authority of the test's own, a server certificate (for 127.0.0.1 and localhost
/// unless named otherwise) and a client certificate, all signed by it; the PEM files in a
/// temporary directory.
pub struct TestPki {
    directory: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl TestPki {
    pub fn new() -> TestPki {
        TestPki::for_server(&["127.0.0.1", "localhost"])
    }

    /// With a server certificate for `names`.
    pub fn for_server(names: &[&str]) -> TestPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sse-relay test CA");
        let ca_certificate = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut server_params = CertificateParams::new(names).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_certificate = server_params.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["relay.internal".to_owned()]).unwrap();
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_certificate = client_params.signed_by(&client_key, &issuer).unwrap();
        let other_key = KeyPair::generate().unwrap();

        let directory = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(directory.path().join(name), text).unwrap();
        write("ca.pem", &ca_certificate.pem());
        write("server.pem", &server_certificate.pem());
        write("server.key", &server_key.serialize_pem());
        write("client.pem", &client_certificate.pem());
        write("client.key", &client_key.serialize_pem());
        write("other.key", &other_key.serialize_pem());
        TestPki {
            ca_der: ca_certificate.der().clone(),
            server_chain: vec![server_certificate.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            directory,
        }
    }

    /// The path of one of the PEM files: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`, `other.key`.
    pub fn path(&self, name: &str) -> String {
        self.directory.path().join(name).display().to_string()
    }

    /// A server's TLS settings, requiring a client certificate signed by the CA or not.
    fn server_config(&self, require_client_certificate: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_certificate {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(self.server_key.clone_key());
        Arc::new(builder.with_single_cert(self.server_chain.clone(), key).unwrap())
    }
}

/// A TLS-terminating proxy on 127.0.0.1 in front of a plain HTTP server.
pub struct TlsProxy {
    pub addr: SocketAddr,
    handshakes_failed: Arc<AtomicUsize>,
}

impl TlsProxy {
    pub async fn start(pki: &TestPki, backend: SocketAddr, require_client_certificate: bool) -> TlsProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(require_client_certificate));
        let handshakes_failed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::clone(&handshakes_failed);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, failed) = (acceptor.clone(), Arc::clone(&failed));
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    if let Ok(mut server) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        TlsProxy {
            addr,
            handshakes_failed,
        }
    }

    /// `url` (an emulator's or sink's) with this proxy's `https` origin instead.
    pub fn url(&self, url: &str, backend: SocketAddr) -> String {
        url.replace(&format!("http://{backend}"), &format!("https://{}", self.addr))
    }

    pub fn handshakes_failed(&self) -> usize {
        self.handshakes_failed.load(Ordering::SeqCst)
    }
}

/// `yaml` for a relay in this process: its admin server on a free port.
fn in_process(yaml: &str) -> String {
    format!("admin: {{ listen: \"127.0.0.1:0\" }}\n{yaml}")
}

/// Stream `chat` from `stream_url` and target `hook` at `target_url`, each with its extra YAML
/// (a `tls:` line, say); every event goes to the target.
fn chat_to_hook(stream_url: &str, stream_extra: &str, target_url: &str, target_extra: &str) -> String {
    format!(
        r#"
streams:
  chat:
    url: {stream_url}
    event_type: [/type]
    keepalive: [keepalive]
    reconnect: {{ initial_delay: 50ms, max_delay: 200ms }}
    {stream_extra}
targets:
  hook:
    url: {target_url}
    retry: {{ initial_delay: 50ms, max_delay: 200ms }}
    {target_extra}
routes:
  - stream: chat
    targets: [hook]
"#
    )
}

#[tokio::test]
async fn an_upstream_behind_a_private_ca_is_refused_with_a_clear_error_until_ca_file_trusts_it() {
    let pki = TestPki::new();
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let proxy = TlsProxy::start(&pki, upstream.addr(), false).await;
    let sink = Sink::start().await.unwrap();
    let stream_url = proxy.url(&upstream.chat_url("3f1c"), upstream.addr());

    let untrusting = LoggedRelay::start(&chat_to_hook(&stream_url, "", &sink.url("/hook"), ""), &[]).await;
    let line = untrusting.wait_for_log("UnknownIssuer").await;
    assert!(
        line.contains("tls.ca_file") && line.contains("\"stream\":\"chat\""),
        "the error says what to do: {line}"
    );
    assert!(proxy.handshakes_failed() >= 1);
    assert_eq!(upstream.connected_clients(Api::Chat), 0);
    drop(untrusting);

    let ca_file = format!("tls: {{ ca_file: {} }}", pki.path("ca.pem"));
    let relay = TestRelay::start(&in_process(&chat_to_hook(
        &stream_url,
        &ca_file,
        &sink.url("/hook"),
        "",
    )))
    .await;
    assert!(
        upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await,
        "connects over TLS"
    );
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":1}"#);
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(delivered.len(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_target_behind_a_private_ca_and_requiring_a_client_certificate_gets_one() {
    let pki = TestPki::new();
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let sink = Sink::start().await.unwrap();
    let proxy = TlsProxy::start(&pki, sink.addr(), true).await;
    let target_url = proxy.url(&sink.url("/hook"), sink.addr());

    // Trusting the server is not enough: it wants a certificate from the relay.
    let ca_only = format!("tls: {{ ca_file: {} }}", pki.path("ca.pem"));
    let refused = LoggedRelay::start(
        &chat_to_hook(&upstream.chat_url("3f1c"), "", &target_url, &ca_only),
        &[],
    )
    .await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":1}"#);
    let line = refused.wait_for_log("client certificate").await;
    assert!(line.contains("tls.client_cert"), "the error says what to do: {line}");
    assert!(proxy.handshakes_failed() >= 1);
    assert!(sink.requests("/hook").is_empty(), "nothing reached the sink");
    drop(refused);
    eventually("the first relay's stream connection closes", DEADLINE, || async {
        upstream.connected_clients(Api::Chat) == 0
    })
    .await;

    let identity = format!(
        "tls: {{ ca_file: {}, client_cert: {}, client_key: {} }}",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let relay = LoggedRelay::start(
        &chat_to_hook(&upstream.chat_url("3f1c"), "", &target_url, &identity),
        &[],
    )
    .await;
    assert!(upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await);
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":2}"#);
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(delivered.len(), 1, "delivered with the client certificate");
    drop(relay);
}

#[tokio::test]
async fn ssl_cert_file_adds_to_the_trusted_roots_of_streams_and_targets() {
    let pki = TestPki::new();
    let upstream = Upstream::start(quiet_upstream()).await.unwrap();
    let upstream_proxy = TlsProxy::start(&pki, upstream.addr(), false).await;
    let sink = Sink::start().await.unwrap();
    let sink_proxy = TlsProxy::start(&pki, sink.addr(), false).await;
    let yaml = chat_to_hook(
        &upstream_proxy.url(&upstream.chat_url("3f1c"), upstream.addr()),
        "",
        &sink_proxy.url(&sink.url("/hook"), sink.addr()),
        "",
    );

    let relay = LoggedRelay::start(&yaml, &[("SSL_CERT_FILE", &pki.path("ca.pem"))]).await;
    assert!(
        upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await,
        "the stream connects"
    );
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":1}"#);
    let delivered = sink.wait_for_delivered("/hook", 1, DEADLINE).await;
    assert_eq!(delivered.len(), 1, "the target is trusted too");
    let line = relay.wait_for_log("trusting the system's certificate store").await;
    assert!(line.contains("SSL_CERT_FILE"), "{line}");
    drop(relay);
    eventually("the first relay's connection closes", DEADLINE, || async {
        upstream.connected_clients(Api::Chat) == 0
    })
    .await;

    // SSL_CERT_DIR: a directory of PEM files, as OpenSSL reads it.
    let directory = tempfile::tempdir().unwrap();
    std::fs::copy(pki.path("ca.pem"), directory.path().join("test-ca.pem")).unwrap();
    let cert_dir = directory.path().display().to_string();
    let _relay = LoggedRelay::start(&yaml, &[("SSL_CERT_DIR", &cert_dir)]).await;
    assert!(
        upstream.wait_for_clients(Api::Chat, 1, DEADLINE).await,
        "the stream connects"
    );
    upstream.publish_event(Api::Chat, r#"{"type":"workflow_update","n":2}"#);
    eventually("the second relay delivers over TLS", DEADLINE, || async {
        sink.delivered("/hook")
            .iter()
            .any(|request| request.body.ends_with(b"\"n\":2}"))
    })
    .await;
}

/// Config text in, an error naming the place out; the key's contents never appear.
#[test]
fn tls_config_errors_name_the_place_and_never_show_key_material() {
    let pki = TestPki::new();
    let not_pem = pki.directory.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let broken = pki.directory.path().join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let missing = pki.directory.path().join("missing.pem");
    let key_text = std::fs::read_to_string(pki.path("client.key")).unwrap();
    let key_body = key_text.lines().nth(1).unwrap().to_owned();

    let check = |tls: &str, expected: &str| {
        let yaml = format!(
            "streams:\n  chat:\n    url: https://127.0.0.1:1/listen\ntargets:\n  hook:\n    url: https://127.0.0.1:2/hook\n    tls: {tls}\n"
        );
        let err = parse_config(&yaml, &[]).expect_err(&yaml).to_string();
        assert_eq!(err, expected, "for:\n{yaml}");
        assert!(!err.contains(&key_body), "{err}");
    };
    let (ca, cert, key, other) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("other.key"),
    );
    let (missing, not_pem, broken) = (
        missing.display().to_string(),
        not_pem.display().to_string(),
        broken.display().to_string(),
    );
    check(
        &format!("{{ ca_file: {missing} }}"),
        &format!(
            "test.yaml:7:21: targets.hook.tls.ca_file: cannot read {missing}: No such file or directory (os error 2)"
        ),
    );
    check(
        &format!("{{ ca_file: {not_pem} }}"),
        &format!(
            "test.yaml:7:21: targets.hook.tls.ca_file: {not_pem} holds no certificate (a PEM block -----BEGIN CERTIFICATE-----)"
        ),
    );
    check(
        &format!("{{ ca_file: {broken} }}"),
        &format!(
            "test.yaml:7:21: targets.hook.tls.ca_file: {broken} cannot be read as PEM: a PEM block has no END line"
        ),
    );
    // A key is not a certificate, and a certificate is not a key.
    check(
        &format!("{{ ca_file: {key} }}"),
        &format!(
            "test.yaml:7:21: targets.hook.tls.ca_file: {key} holds no certificate (a PEM block -----BEGIN CERTIFICATE-----)"
        ),
    );
    check(
        &format!("{{ client_cert: {cert}, client_key: {ca} }}"),
        &format!(
            "test.yaml:7:{}: targets.hook.tls.client_key: {ca} holds no private key (a PEM block -----BEGIN PRIVATE KEY-----, or RSA or EC PRIVATE KEY)",
            25 + cert.len() + 2 + 12
        ),
    );
    check(
        &format!("{{ client_cert: {cert} }}"),
        "test.yaml:7:10: targets.hook.tls: client_cert needs `client_key`, the certificate's private key",
    );
    check(
        &format!("{{ client_cert: {cert}, client_key: {other} }}"),
        &format!(
            "test.yaml:7:10: targets.hook.tls: the private key in client_key {other} does not belong to the first certificate in client_cert {cert}"
        ),
    );
    check(
        "{ ca: x }",
        "test.yaml:7:12: targets.hook.tls: unknown key `ca`; expected one of `ca_file`, `client_cert`, `client_key`",
    );
    // The same section on a stream.
    let yaml = format!(
        "streams:\n  chat:\n    url: https://127.0.0.1:1/listen\n    tls: {{ client_key: {key} }}\ntargets:\n  hook:\n    url: https://127.0.0.1:2/hook\n"
    );
    assert_eq!(
        parse_config(&yaml, &[]).unwrap_err().to_string(),
        "test.yaml:4:10: streams.chat.tls: client_key needs `client_cert`, the key's certificate"
    );
    let valid = format!("{{ ca_file: {ca}, client_cert: {cert}, client_key: {key} }}");
    let yaml = format!(
        "streams:\n  chat:\n    url: https://127.0.0.1:1/listen\ntargets:\n  hook:\n    url: https://127.0.0.1:2/hook\n    tls: {valid}\n"
    );
    let config = parse_config(&yaml, &[]).unwrap();
    assert!(!format!("{config:?}").contains(&key_body), "Debug never shows the key");
    let described = sse_relay::check::describe(&config);
    assert!(
        described.contains(&format!(
            "    tls trusts {ca} (1 certificates) besides the system's store\n"
        )) && described.contains(&format!("    tls client certificate {cert}, key {key}\n")),
        "{described}"
    );
}

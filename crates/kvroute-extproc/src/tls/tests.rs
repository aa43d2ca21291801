use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

use super::*;

/// Accepts whatever the server shows (as the data planes that front upstream's picker do)
/// and remembers nothing: the test reads the peer certificate off the connection.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects, handshakes offering h2, and returns the server's leaf certificate and the
/// protocol agreed.
async fn handshake(port: u16) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().unwrap()[0].to_vec();
    (leaf, session.alpn_protocol().map(<[u8]>::to_vec))
}

/// Serves `tls` on an ephemeral port: each accepted connection echoes one message.
async fn serve(tls: &Tls, stop: &CancellationToken) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = Box::pin(tls.incoming(listener, stop.clone()));
    tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let mut conn = conn.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if conn.read_exact(&mut buf).await.is_ok() {
                    let _ = conn.write_all(&buf).await;
                }
            });
        }
    });
    port
}

fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
    let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), made.signing_key.serialize_pem()).unwrap();
    made.cert.der().to_vec()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvroute-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn without_a_path_a_self_signed_certificate_is_served_over_h2() {
    let stop = CancellationToken::new();
    let tls = Tls::new(TlsSettings::default()).unwrap();
    let port = serve(&tls, &stop).await;
    let (leaf, alpn) = handshake(port).await;
    assert!(!leaf.is_empty());
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    stop.cancel();
}

#[tokio::test]
async fn the_given_pair_is_served_and_a_renewed_one_replaces_it() {
    let dir = scratch("reload");
    let first = write_pair(&dir, "kvroute.llm.svc");
    let stop = CancellationToken::new();
    let tls = Tls::new(TlsSettings {
        cert_dir: Some(dir.clone()),
        reload: true,
        min_version: TlsVersion::Tls12,
    })
    .unwrap();
    tokio::spawn(tls.clone().watch(stop.clone()));
    let port = serve(&tls, &stop).await;
    assert_eq!(handshake(port).await.0, first);

    // A broken renewal is refused and the served certificate stays.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(RELOAD_EVERY * 2).await;
    assert_eq!(handshake(port).await.0, first);

    let second = write_pair(&dir, "kvroute.llm.svc");
    let deadline = tokio::time::Instant::now() + RELOAD_EVERY * 4;
    while handshake(port).await.0 != second {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_files_are_refused_with_their_path() {
    let dir = scratch("bad");
    let settings = |d: &Path| TlsSettings {
        cert_dir: Some(d.to_owned()),
        ..TlsSettings::default()
    };
    let err = Tls::new(settings(&dir.join("missing")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.crt"), "{err}");
    std::fs::write(dir.join("tls.crt"), "garbage").unwrap();
    std::fs::write(dir.join("tls.key"), "garbage").unwrap();
    let err = Tls::new(settings(&dir)).unwrap_err().to_string();
    assert!(err.contains("tls.crt"), "{err}");
    // A certificate with another pair's key.
    write_pair(&dir, "a");
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("tls.key"), other.serialize_pem()).unwrap();
    assert!(Tls::new(settings(&dir)).is_err(), "mismatched key accepted");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A peer that connects and never speaks does not hold up the next one.
#[tokio::test]
async fn a_silent_peer_does_not_block_the_others() {
    let stop = CancellationToken::new();
    let tls = Tls::new(TlsSettings::default()).unwrap();
    let port = serve(&tls, &stop).await;
    let _silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(2), handshake(port)).await;
    assert!(done.is_ok(), "the handshake waited behind a silent peer");
    stop.cancel();
}

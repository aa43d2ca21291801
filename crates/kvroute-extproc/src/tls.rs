//! TLS on the ext_proc port, as upstream's picker serves it (`--secure-serving`, on by
//! default): the certificate and key from `--cert-path` (`tls.crt`, `tls.key`), re-read when
//! they change with `--enable-cert-reload`, or a self-signed certificate made at start when
//! no path is given (the data planes that front the upstream picker do not verify it). ALPN
//! offers `h2`. Handshakes run beside the accept loop, each bounded in time, so a peer that
//! opens connections and never speaks holds neither the listener nor a worker.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A handshake that has not completed in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 1_024;

/// How often `--enable-cert-reload` looks at the files.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The oldest TLS version accepted (upstream's `--tls-min-version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// How the ext_proc port serves TLS.
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    /// A directory holding `tls.crt` (the chain, PEM) and `tls.key` (PEM); None: a
    /// self-signed certificate made at start.
    pub cert_dir: Option<PathBuf>,
    /// Re-read the files when they change (a renewed certificate from cert-manager).
    pub reload: bool,
    /// The oldest version accepted.
    pub min_version: TlsVersion,
}

/// Why TLS could not be set up; the process does not start without it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM of the kind needed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificate, the key or the versions.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// The server side of TLS: an acceptor whose certificate may be swapped while it serves.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    keys: Arc<Keys>,
    settings: TlsSettings,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Keys(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Keys {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl Tls {
    /// Loads (or makes) the certificate and builds the acceptor.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let key = match &settings.cert_dir {
            Some(dir) => load(dir)?,
            None => self_signed()?,
        };
        let keys = Arc::new(Keys(ArcSwap::from_pointee(key)));
        let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::clone(&keys) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            keys,
            settings,
        })
    }

    /// The TLS connections `listener` accepts, until `stop`; handshakes run concurrently,
    /// each at most 10 s, at most 1,024 at once.
    pub fn incoming(
        &self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> impl Stream<Item = io::Result<TlsConn>> + use<> {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            let mut handshakes = JoinSet::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                    accepted = listener.accept() => {
                        let (tcp, peer) = match accepted {
                            Ok(a) => a,
                            Err(e) => {
                                // Out of descriptors and the like: the listener stays.
                                warn!(error = %e, "ext_proc accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        if handshakes.len() >= MAX_HANDSHAKES {
                            debug!(%peer, "too many TLS handshakes under way: connection closed");
                            continue;
                        }
                        if let Err(e) = tcp.set_nodelay(true) {
                            debug!(error = %e, "TCP_NODELAY not set");
                        }
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => {
                                    let _ = tx.send(Ok(TlsConn(tls))).await;
                                }
                                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            handshakes.abort_all();
        });
        ReceiverStream::new(rx)
    }

    /// With reload on, re-reads the files every 2 s while they change, until `stop`; a pair
    /// that does not load is logged and the served certificate stays.
    pub async fn watch(self, stop: CancellationToken) {
        let Some(dir) = self.settings.cert_dir.filter(|_| self.settings.reload) else {
            return;
        };
        let mut seen = stamps(&dir);
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamps(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&dir) {
                Ok(key) => {
                    self.keys.0.store(Arc::new(key));
                    info!(dir = %dir.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    warn!(error = %e, "TLS certificate not reloaded: still serving the previous one")
                }
            }
        }
    }
}

/// Modification times of the pair, to notice a change (a Kubernetes secret update swaps a
/// symlink, which changes them too).
fn stamps(dir: &Path) -> [Option<SystemTime>; 2] {
    ["tls.crt", "tls.key"].map(|f| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    })
}

fn load(dir: &Path) -> Result<CertifiedKey, TlsError> {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .map_err(|e| file_err(&crt, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&crt, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(&crt, "no certificate in it".into()));
    }
    let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| file_err(&key, e.to_string()))?;
    certified(certs, &private)
}

fn certified(
    certs: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<CertifiedKey, TlsError> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key)?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match()?;
    Ok(certified)
}

/// A certificate for `localhost` and this host's name, made now; what upstream's picker
/// serves without `--cert-path`.
fn self_signed() -> Result<CertifiedKey, TlsError> {
    let mut names = vec!["localhost".to_owned()];
    if let Ok(host) = std::env::var("HOSTNAME")
        && !host.is_empty()
    {
        names.push(host);
    }
    let made = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    certified(vec![made.cert.der().clone()], &key)
}

/// One accepted TLS connection, as tonic serves it.
#[derive(Debug)]
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;

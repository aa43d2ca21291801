//! The admin HTTP port: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (the endpoints were listed and the process is not draining).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use kvroute_discovery::{MetricsAuth, Verdict};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A client that has not sent a whole request head this long after connecting (or after its
/// last answer) is disconnected: probes and scrapes send theirs at once, and an idle or
/// trickling connection must not hold a task and a socket for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the admin handlers read.
pub(crate) struct AdminState {
    /// kvroute's own metrics, then upstream's names for the same things; served as one
    /// exposition.
    pub(crate) metrics: [prometheus_client::registry::Registry; 2],
    /// True once the endpoint source was read in full (a static list at once; a pool after
    /// its first full list of pods).
    pub(crate) listed: watch::Receiver<bool>,
    /// Who may read `/metrics`, with `--metrics-endpoint-auth`.
    pub(crate) metrics_auth: Option<MetricsAuth>,
    pub(crate) draining: CancellationToken,
}

/// Serves the admin port until `shutdown` is cancelled, then waits for open connections.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        // Small answers (probes, /metrics) must not wait for a delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "admin socket: TCP_NODELAY not set");
        }
        let state = Arc::clone(&state);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move {
                        if let Some(refused) = authorize(&state, &req).await {
                            return Ok::<_, Infallible>(refused);
                        }
                        Ok::<_, Infallible>(handle(&state, &req))
                    }
                }),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
    graceful.shutdown().await;
}

/// With `--metrics-endpoint-auth`, `/metrics` answers only a bearer token the API server
/// vouches for and whose user may `get /metrics`; the probes stay open (the kubelet sends
/// no token). None: go on.
async fn authorize(state: &AdminState, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let auth = state.metrics_auth.as_ref()?;
    if req.uri().path() != "/metrics" {
        return None;
    }
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Some(text(StatusCode::UNAUTHORIZED, "Unauthorized\n"));
    };
    match auth.review(token).await {
        Ok(Verdict::Allowed) => None,
        Ok(Verdict::Unauthenticated) => Some(text(StatusCode::UNAUTHORIZED, "Unauthorized\n")),
        Ok(Verdict::Forbidden) => Some(text(StatusCode::FORBIDDEN, "Forbidden\n")),
        Err(e) => {
            warn!(error = %e, "metrics authentication: the API server could not be asked");
            Some(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication unavailable\n",
            ))
        }
    }
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            let encoded = state
                .metrics
                .iter()
                .try_for_each(|r| encode_registry(&mut body, r))
                .and_then(|()| encode_eof(&mut body));
            match encoded {
                Ok(()) => Response::builder()
                    .header(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encode\n")),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.draining.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !*state.listed.borrow() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "endpoints not listed yet\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A client that never finishes its request head is disconnected after the timeout,
    /// while one that sends it is answered at once.
    #[tokio::test]
    async fn a_client_that_never_finishes_its_request_is_disconnected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AdminState {
            metrics: Default::default(),
            listed: watch::channel(true).1,
            metrics_auth: None,
            draining: CancellationToken::new(),
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, state, stop.clone()));

        let started = Instant::now();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: kvroute\r\n")
            .await
            .unwrap();
        let mut prompt = tokio::net::TcpStream::connect(addr).await.unwrap();
        prompt
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: kvroute\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        prompt.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(HEADER_READ_TIMEOUT * 3, slow.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "a trickling client still holds its connection"
        );
        assert!(started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_millis(200));
        assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
        stop.cancel();
        server.await.unwrap();
    }
}

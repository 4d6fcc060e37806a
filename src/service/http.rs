//! The node's own HTTP port (`[http] listen`), apart from the message path:
//! `GET /healthz`, `GET /readyz`, `GET /metrics`, `POST /reload`. HTTP/1.1
//! only, small header limit, bounded connections and a header timeout, so
//! a scanner or a slow client cannot disturb the node.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::health::{Probe, Readiness};
use super::metrics::Metrics;
use super::reload::Reloader;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Request head larger than this is refused (431).
const MAX_HEAD: usize = 16 * 1024;
/// A client must send its request head within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives (Prometheus simply reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What the endpoints answer from. Reload and the probe exist once IPL
/// has built them.
pub struct Endpoints {
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub probe: std::sync::OnceLock<Arc<Probe>>,
    pub reloader: std::sync::OnceLock<Arc<Reloader>>,
    /// Pause and prefetch of each broker, set by admin commands.
    pub controls: crate::broker::control::Controls,
}

/// Binds `listen` (before IPL, so a taken port fails fast and `/healthz`
/// answers during IPL) and serves until `stop`.
pub async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, not spin.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // All slots taken: wait for one (an idle client gives its slot up
        // at the head timeout, any client at the connection deadline), but
        // never past the stop.
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let endpoints = endpoints.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(route(&endpoints, peer, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            // However the client behaves (answers it never reads, pipelined
            // requests), its connection ends by the deadline.
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => match r {
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http: connection ended with an error"),
                    Err(_) => tracing::debug!(%peer, "http: connection closed at its deadline"),
                    Ok(Ok(())) => {}
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Answer {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    answer(status, "application/json", body)
}

async fn route(e: &Endpoints, peer: SocketAddr, req: Request<Incoming>) -> Answer {
    let (path, method) = (req.uri().path(), req.method());
    let allowed = match path {
        "/healthz" | "/readyz" | "/metrics" => Method::GET,
        "/reload" => Method::POST,
        _ => {
            return answer(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz, /metrics or POST /reload\n",
            )
        }
    };
    // HEAD is GET without a body (hyper drops the body).
    if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
        let mut r = answer(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("{path} takes {allowed}\n"),
        );
        let allow = if allowed == Method::GET {
            "GET, HEAD"
        } else {
            "POST"
        };
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    match path {
        // The process answers: its runtime runs (the probe proves more).
        "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let status = if e.readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &e.readiness.report())
        }
        "/metrics" => {
            if let Some(p) = e.probe.get() {
                p.local();
            }
            answer(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                e.metrics.encode(),
            )
        }
        _ => {
            // Reload changes what the node serves: only from this machine,
            // whatever address the port is open on.
            if !peer.ip().to_canonical().is_loopback() {
                return answer(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "reload is accepted from loopback only\n",
                );
            }
            match e.reloader.get() {
                None => answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the node is still starting: nothing to reload yet\n",
                ),
                Some(r) => {
                    // Its own task: a client that hangs up must not cut a
                    // reload short (systemd would wait for READY=1).
                    let r = r.clone();
                    let Ok(out) = tokio::spawn(async move { r.reload().await }).await else {
                        return answer(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain",
                            "the reload failed; see the node's log\n",
                        );
                    };
                    let status = if out.ok {
                        StatusCode::OK
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                    json(status, &out)
                }
            }
        }
    }
}

/// `POST /reload` to a node (for `beds reload`): the status and the body.
pub async fn post_reload(addr: &str, limit: Duration) -> Result<(u16, String), String> {
    let ask = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::post("/reload")
            .header(hyper::header::HOST, addr)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(limit, ask)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

//! The node's operations HTTP listener: `GET /metrics` (Prometheus/OpenMetrics text),
//! `GET /healthz` (the process answers), `GET /readyz` (connected, holding its node
//! lease, not halted, no edge upstream gap, lag under the configured bound; 503 with the
//! reasons otherwise) and `GET /status` (the node's status as JSON, for `jetsync top`
//! while NATS is down).
//! HTTP/1.1 through hyper; connections are bounded in number and in how long their headers may take, so a slow or
//! hostile client cannot tie the listener up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::Probe;

/// Most connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A running listener; stops when dropped or on [`OpsServer::shutdown`].
pub struct OpsServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl OpsServer {
    /// The address it listens on (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Binds `listen` and serves `probe` until the returned server is shut down or dropped.
pub async fn serve(listen: SocketAddr, probe: Arc<dyn Probe>) -> std::io::Result<OpsServer> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopped.wait_for(|s| *s) => return,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "ops listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let probe = probe.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let probe = probe.clone();
                    async move { Ok::<_, Infallible>(route(probe.as_ref(), req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "ops listener: connection ended with an error");
                }
                drop(permit);
            });
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /status");
    Ok(OpsServer {
        addr,
        stop,
        task: Some(task),
    })
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";
/// prometheus-client writes OpenMetrics; Prometheus reads it under this type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn route(probe: &dyn Probe, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, OPENMETRICS, probe.metrics().await),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/status" => match probe.status().await {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{e}\n")),
        },
        "/readyz" => {
            let r = probe.readiness().await;
            if r.ready {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            } else {
                let mut body = String::from("not ready\n");
                for reason in &r.reasons {
                    body.push_str(reason);
                    body.push('\n');
                }
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz, /readyz, /status\n".into(),
        ),
    }
}

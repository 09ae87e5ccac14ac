//! `--metrics-addr`: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use super::Telemetry;

/// How long the main loop may stay silent before `/healthz` fails.
const MAX_SILENCE_S: u64 = 90;
/// A client must send its request headers within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections served at once; more are closed at once (a scraper and two probes need 3).
const MAX_CONNECTIONS: usize = 8;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn handle(path: &str, t: &Telemetry, registry: &Registry) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", out),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding failed: {e}\n")),
            }
        }
        "/healthz" => {
            let silent = t.silent_for();
            if silent <= MAX_SILENCE_S {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("main loop silent for {silent} s\n"))
            }
        }
        "/readyz" => {
            if t.is_ready() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: programs not attached or first sync not done\n".into(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".into()),
    }
}

/// Serves until the process exits.
pub async fn serve(addr: SocketAddr, t: Arc<Telemetry>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let registry = Arc::new(t.registry());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Closing at once keeps a slow or hostile client from holding the agent's
                // memory; Prometheus retries at its next scrape.
                warn!(%peer, max = MAX_CONNECTIONS, "too many metrics connections; closing this one");
                continue;
            };
            let (t, registry) = (t.clone(), registry.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = handle(req.uri().path(), &t, &registry);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_and_liveness_follow_the_agent() {
        let t = Arc::new(Telemetry::default());
        let r = t.registry();
        assert_eq!(handle("/readyz", &t, &r).status(), StatusCode::SERVICE_UNAVAILABLE);
        t.set_ready();
        assert_eq!(handle("/readyz", &t, &r).status(), StatusCode::OK);
        assert_eq!(handle("/healthz", &t, &r).status(), StatusCode::OK);
        assert_eq!(handle("/nope", &t, &r).status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn metrics_follow_prometheus_naming() {
        let t = Arc::new(Telemetry::default());
        t.reconciles.inc();
        t.drift("address");
        let r = t.registry();
        let resp = handle("/metrics", &t, &r);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        for needle in [
            "ballast_reconcile_total 1",
            "ballast_drift_repairs_total{kind=\"address\"} 1",
            "# TYPE ballast_reconcile_duration_seconds histogram",
            "ballast_build_info{version=",
            "ballast_ready 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }
}

//! `--metrics-addr`: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::{convert::Infallible, fmt, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame},
    server::conn::http1,
    service::service_fn,
};
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
/// A scrape is sent in pieces of about this size as it is encoded.
const CHUNK: usize = 64 * 1024;
/// Pieces encoded ahead of the client.
const CHUNKS_AHEAD: usize = 4;

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    with_type(Response::new(Full::new(body.into()).boxed()), status, content_type)
}

fn with_type(mut r: Response<Body>, status: StatusCode, content_type: &str) -> Response<Body> {
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Hands the text written into it on in [`CHUNK`]-sized pieces, waiting while
/// [`CHUNKS_AHEAD`] are unsent: a scrape of 10 000 Services' series is never whole in
/// memory (it was 14 MB, the agent's peak on a warm restart).
struct ChunkWriter {
    buf: String,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl ChunkWriter {
    fn send(&mut self) -> fmt::Result {
        let chunk = std::mem::replace(&mut self.buf, String::with_capacity(CHUNK));
        // The client went away: stop encoding.
        self.tx.blocking_send(Bytes::from(chunk)).map_err(|_| fmt::Error)
    }
}

impl fmt::Write for ChunkWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.buf.push_str(s);
        if self.buf.len() >= CHUNK { self.send() } else { Ok(()) }
    }
}

/// The scrape, encoded on a blocking thread while it is sent.
fn metrics(registry: Arc<Registry>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHUNKS_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter { buf: String::with_capacity(CHUNK), tx };
        let r = prometheus_client::encoding::text::encode(&mut w, &registry).and_then(|()| w.send());
        if r.is_err() && !w.tx.is_closed() {
            // The status line is gone already: the body ends short, without `# EOF`,
            // which tells the scraper.
            warn!("encoding the metrics failed; the scrape ends short");
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    with_type(
        Response::new(StreamBody::new(frames).boxed()),
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

fn handle(path: &str, t: &Telemetry, registry: &Arc<Registry>) -> Response<Body> {
    match path {
        "/metrics" => metrics(registry.clone()),
        "/healthz" => {
            let silent = t.silent_for();
            if silent <= MAX_SILENCE_S {
                reply(StatusCode::OK, "text/plain", "ok\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("main loop silent for {silent} s\n"))
            }
        }
        "/readyz" => {
            if t.is_ready() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: programs not attached or first sync not done\n",
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n"),
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
                    async move { Ok::<_, Infallible>(resp) }
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

    #[tokio::test]
    async fn readiness_and_liveness_follow_the_agent() {
        let t = Arc::new(Telemetry::default());
        let r = Arc::new(t.registry());
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
        let r = Arc::new(t.registry());
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

    #[tokio::test]
    async fn a_large_scrape_is_sent_in_pieces_and_arrives_whole() {
        let t = Arc::new(Telemetry::default());
        for i in 0..5000 {
            t.drift(&format!("kind-{i}"));
        }
        let resp = handle("/metrics", &t, &Arc::new(t.registry()));
        let mut body = resp.into_body();
        let (mut pieces, mut text) = (0, String::new());
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                pieces += 1;
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert!(pieces > 2, "{pieces} piece(s) for {} bytes", text.len());
        assert!(text.contains("ballast_drift_repairs_total{kind=\"kind-4999\"} 1"));
        assert!(text.ends_with("# EOF\n"), "the scrape ends whole");
    }
}

//! Controller latencies against the real kube-apiserver: Service creation → address in
//! status → traffic through the VIP, and EndpointSlice change → data path map update.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    k8sbed::{K8sBed, ingress_ip},
    servers::{Servers, tcp_ask},
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::{WatchStreamExt, watcher};
use lb_agent::dataplane::Maps;
use lb_common::{proto, service::ServiceKey};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Measures and returns a markdown section.
pub async fn run(quick: bool) -> Result<String> {
    let n = if quick { 10 } else { 100 };
    let mut bed = K8sBed::new("bench", 3).await?;
    let _servers: Vec<Servers> = bed
        .tb
        .backends
        .iter()
        .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[]))
        .collect::<Result<_>>()?;
    bed.config("pool", K8sBed::pool(true, &["10.20.0.0/24"])).await?;
    bed.start_agent()?;

    // When each service's status first names an address, as seen by a watch.
    let seen: Arc<Mutex<HashMap<String, (Instant, Ipv4Addr)>>> = Arc::default();
    {
        let seen = seen.clone();
        let stream = watcher(bed.services(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            futures_util::pin_mut!(stream);
            while let Some(Ok(svc)) = stream.next().await {
                let svc: Service = svc;
                if let (Some(name), Some(ip)) = (svc.metadata.name.clone(), ingress_ip(&svc)) {
                    seen.lock().map(|mut m| m.entry(name).or_insert((Instant::now(), ip)).to_owned()).ok();
                }
            }
        });
    }

    let endpoints: Vec<String> = bed.tb.backends.iter().map(|b| b.ip.to_string()).collect();
    let eps: Vec<(&str, bool, bool, bool)> = endpoints.iter().map(|e| (e.as_str(), true, true, false)).collect();
    let mut to_status = Vec::new();
    let mut to_traffic = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        bed.slice(&name, &[("http", "TCP", 8080)], &eps).await?;
        let t0 = Instant::now();
        bed.service(&name, &[(80, "TCP", "http")], &[]).await?;
        let (t_status, ip) = loop {
            if let Some(v) = seen.lock().ok().and_then(|m| m.get(&name).copied()) {
                break v;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("{name} got no address; agent log:\n{}", bed.agent_log());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let vip = SocketAddrV4::new(ip, 80);
        let first_answer = tokio::task::block_in_place(|| {
            bed.tb.client.run(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if tcp_ask(vip, "ping").is_ok() {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        })?
        .with_context(|| format!("no traffic through {vip}"))?;
        to_status.push(t_status.duration_since(t0));
        to_traffic.push(first_answer.duration_since(t0));
    }

    // EndpointSlice change → map update, on the first service.
    let ip = seen.lock().ok().and_then(|m| m.get("svc-0").map(|v| v.1)).context("svc-0 address")?;
    let maps = Maps::open(bed.tb.pins.path())?;
    let key = ServiceKey { vip: ip.octets(), port: 80, proto: proto::TCP, _pad: 0 };
    let m = if quick { 10 } else { 50 };
    let mut to_map = Vec::new();
    for j in 0..m {
        let count = if j % 2 == 0 { 2 } else { 3 };
        let t0 = Instant::now();
        bed.slice("svc-0", &[("http", "TCP", 8080)], &eps[..count]).await?;
        loop {
            if maps.active_backends(&key)?.is_some_and(|b| b.len() == count) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("map never reached {count} backends");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        to_map.push(t0.elapsed());
    }
    let _ = bed.stop_agent();

    for v in [&mut to_status, &mut to_traffic, &mut to_map] {
        v.sort();
    }
    let mut out = String::new();
    writeln!(out, "### Controller latency against a real kube-apiserver ({n} Services, one at a time)\n")?;
    writeln!(out, "| interval | samples | p50 ms | p99 ms | max ms |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (label, v) in [
        ("Service created → address in status (watch)", &to_status),
        ("Service created → first TCP answer through the VIP", &to_traffic),
        ("EndpointSlice changed → backend set in the BPF map", &to_map),
    ] {
        writeln!(
            out,
            "| {label} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        )?;
    }
    writeln!(
        out,
        "\nThe agent runs as the ballast-agent ServiceAccount in a network namespace; each Service has an EndpointSlice with 3 ready endpoints created just before it; the client retries its connection every 2 ms."
    )?;
    Ok(out)
}

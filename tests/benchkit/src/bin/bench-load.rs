//! The benchmark's load generator, one process in the client namespace, blocking threads
//! (every operation is a few syscalls; threads keep the pacing of the latency mode exact).
//! Prints one JSON line: operations, errors, seconds, bytes, latency percentiles, and the
//! CPU the whole machine (and the listed processes) spent during the measured window.
//!
//! Modes:
//! - `crr`: connections per second: connect, send a line, read the answer, close (like
//!   netperf TCP_CRR), as fast as `--threads` closed loops can go.
//! - `latency`: the same request on a fresh connection at a fixed offered rate; latency is
//!   measured from the time each request was due, so a stall delays and counts every
//!   request behind it (no coordinated omission).
//! - `bulk`: one or more streams writing as fast as they can to a sink for `--secs`.
//! - `udp`: request/answer datagrams, each flow (own source port) keeping `--window`
//!   datagrams in flight.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_benchkit::{addrs, machine_busy, process_cpu};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Crr,
    Latency,
    Bulk,
    Udp,
}

#[derive(Parser)]
struct Args {
    /// What to measure.
    mode: Mode,
    /// Targets, used in turn (one per connection or flow).
    #[arg(long, value_parser = addrs)]
    targets: std::vec::Vec<SocketAddr>,
    /// Measured seconds.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Parallel closed loops (crr), pacing threads (latency), streams (bulk), flows (udp).
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Offered requests per second (latency).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Datagrams in flight per flow (udp).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Processes whose CPU time to report (e.g. a userspace proxy).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
}

#[derive(Default)]
struct Tally {
    ops: u64,
    errors: u64,
    bytes: u64,
    lat_ns: Vec<u64>,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.ops += o.ops;
        self.errors += o.errors;
        self.bytes += o.bytes;
        self.lat_ns.extend(o.lat_ns);
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.targets.is_empty() {
        anyhow::bail!("--targets: at least one address");
    }
    // Precise sleeps for the paced mode: the default 50 µs timer slack would add to
    // every measured latency.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this process's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let targets = Arc::new(a.targets.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let threads = a.threads.max(1);
    let secs = Duration::from_secs_f64(a.secs);
    let cpu0 = machine_busy();
    let pids0: f64 = a.pids.iter().map(|p| process_cpu(*p)).sum();
    let start = Instant::now();
    let deadline = start + secs;
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let (targets, next) = (targets.clone(), next.clone());
            let (mode, rate, window) = (a.mode, a.rate, a.window);
            std::thread::spawn(move || match mode {
                Mode::Crr => crr(&targets, &next, deadline),
                Mode::Latency => paced(&targets, &next, start, secs, rate, threads, k),
                Mode::Bulk => bulk(targets[k % targets.len()], deadline),
                Mode::Udp => udp(targets[k % targets.len()], window, deadline),
            })
        })
        .collect();
    let mut t = Tally::default();
    for h in handles {
        t.add(h.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = machine_busy() - cpu0;
    let pids_cpu: f64 = a.pids.iter().map(|p| process_cpu(*p)).sum::<f64>() - pids0;
    t.lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.lat_ns.is_empty() {
            return 0.0;
        }
        t.lat_ns[((t.lat_ns.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    println!(
        "{{\"ops\":{},\"errors\":{},\"secs\":{elapsed:.4},\"bytes\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"cpu_busy_s\":{cpu:.3},\"pids_cpu_s\":{pids_cpu:.3}}}",
        t.ops,
        t.errors,
        t.bytes,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0)
    );
    Ok(())
}

/// One short request on a fresh connection.
fn request(to: SocketAddr) -> std::io::Result<()> {
    let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    (&s).write_all(b"x\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn pick(targets: &[SocketAddr], next: &AtomicUsize) -> SocketAddr {
    targets[next.fetch_add(1, Ordering::Relaxed) % targets.len()]
}

fn crr(targets: &[SocketAddr], next: &AtomicUsize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    while Instant::now() < deadline {
        match request(pick(targets, next)) {
            Ok(()) => t.ops += 1,
            Err(_) => t.errors += 1,
        }
    }
    t
}

/// Thread `k` of `threads` sends requests `k, k + threads, ...` of a schedule with `rate`
/// requests per second.
fn paced(
    targets: &[SocketAddr],
    next: &AtomicUsize,
    start: Instant,
    secs: Duration,
    rate: u32,
    threads: usize,
    k: usize,
) -> Tally {
    let mut t = Tally::default();
    let step = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut i = k as u32;
    loop {
        let due = start + step * i;
        if due >= start + secs {
            return t;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        match request(pick(targets, next)) {
            Ok(()) => {
                t.ops += 1;
                t.lat_ns.push(due.elapsed().as_nanos() as u64);
            }
            Err(_) => t.errors += 1,
        }
        i += threads as u32;
    }
}

fn bulk(to: SocketAddr, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let run = || -> std::io::Result<u64> {
        let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
        let buf = vec![0x5au8; 128 * 1024];
        let mut sent = 0u64;
        while Instant::now() < deadline {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        // The sink closes after reading everything: EOF means every byte arrived.
        s.shutdown(Shutdown::Write)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(sent)
    };
    match run() {
        Ok(b) => {
            t.ops = 1;
            t.bytes = b;
        }
        Err(_) => t.errors = 1,
    }
    t
}

fn udp(to: SocketAddr, window: usize, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
        t.errors = 1;
        return t;
    };
    if s.connect(to).is_err() || s.set_read_timeout(Some(Duration::from_millis(20))).is_err() {
        t.errors = 1;
        return t;
    }
    let msg = [0x42u8; 64];
    let mut buf = [0u8; 2048];
    let fill = |s: &UdpSocket| {
        for _ in 0..window.max(1) {
            let _ = s.send(&msg);
        }
    };
    fill(&s);
    while Instant::now() < deadline {
        match s.recv(&mut buf) {
            Ok(_) => {
                t.ops += 1;
                let _ = s.send(&msg);
            }
            // A lost window: start it again.
            Err(_) => {
                t.errors += 1;
                fill(&s);
            }
        }
    }
    t
}

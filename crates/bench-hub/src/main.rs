//! `hub-bench`: routed module→module MQTT QoS 1 throughput and latency of
//! verge-hub, against Mosquitto doing plain QoS 1 pub→sub, in the same run
//! and with the same load generator (this file; `hub-amqp` publishes over
//! AMQPS instead, `amqp.rs`), plus the idle RSS of
//! verge-hub and a cross-check with `mosquitto_pub`/`mosquitto_sub`.
//!
//! Everything binds or dials 127.0.0.1 only, every run is bounded in message
//! count and in time, and every process this program starts is stopped by it.
//!
//! The load generator: each publisher is one MQTT 3.1.1 connection that keeps
//! up to `window` QoS 1 PUBLISHes unacknowledged; each payload carries the
//! send instant, the publisher index and a sequence number. One subscriber
//! connection receives (QoS 1, PUBACKing each delivery), drops duplicates,
//! and records the end-to-end latency of every message. The routed rate is
//! the unique messages received divided by the time from the first publish
//! to the last arrival.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use clap::Parser;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Subscribe};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use verge_core::{ModuleId, SasToken, SharedAccessKey};

const IOTHUB: &str = "benchhub.azure-devices.net";
const DEVICE: &str = "edge1";
const DEVICE_KEY: &str = "dmVyZ2UtaHViLWJlbmNobWFyay1kZXZpY2Uta2V5LTA=";
const LEAF_KEY: &str = "dmVyZ2UtaHViLWJlbmNobWFyay1sZWFmLWtleS0wMDA=";
const SINK: &str = "sink";
const MAX_PACKET: usize = 1 << 20;

/// Command line.
#[derive(Parser, Debug)]
#[command(about = "verge-hub vs Mosquitto: routed QoS 1 throughput, latency and idle RSS")]
struct Args {
    /// verge-hub binary (release build).
    #[arg(long, default_value = "target/release/verge-hub")]
    hub_bin: PathBuf,
    /// Mosquitto broker binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// mosquitto_pub (cross-check); skipped when missing.
    #[arg(long, default_value = "mosquitto_pub")]
    mosquitto_pub: String,
    /// mosquitto_sub (cross-check); skipped when missing.
    #[arg(long, default_value = "mosquitto_sub")]
    mosquitto_sub: String,
    /// Scratch directory (created, emptied first, removed at the end).
    #[arg(long, default_value = "target/bench-hub")]
    work_dir: PathBuf,
    /// Publishing time per run, seconds (a run also stops at --max-messages).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Upper bound on messages per run (split over the publishers).
    #[arg(long, default_value_t = 300_000)]
    max_messages: u64,
    /// How long the subscriber may take to drain after publishing stopped, seconds.
    #[arg(long, default_value_t = 30.0)]
    drain_secs: f64,
    /// Payload size, bytes (at least 16).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Unacknowledged QoS 1 publishes per publisher connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Unacknowledged deliveries each broker keeps per subscriber: verge-hub's
    /// `limits.max_inflight`, Mosquitto's `max_inflight_messages` (both set,
    /// so the two compare like for like; 128 is verge-hub's default).
    #[arg(long, default_value_t = 128)]
    inflight: usize,
    /// Publisher counts to measure with --window (comma separated).
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    publishers: Vec<usize>,
    /// Rounds of every measurement (median reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds to wait before reading idle RSS.
    #[arg(long, default_value_t = 3.0)]
    idle_secs: f64,
    /// Messages for the mosquitto_pub/mosquitto_sub cross-check (0 = skip).
    #[arg(long, default_value_t = 10_000)]
    cli_messages: u64,
    /// Keep the scratch directory (logs, configs) after the run.
    #[arg(long)]
    keep: bool,
    /// Measure Mosquitto only (for checking the load generator).
    #[arg(long)]
    skip_hub: bool,
    /// Which load measurements to run (hub, hub-amqp, mosq-tls, mosq-tcp,
    /// mosq-persist); hub-amqp is the hub with AMQP publishers.
    #[arg(
        long,
        default_value = "hub,mosq-tls,mosq-tcp,mosq-persist",
        value_delimiter = ','
    )]
    brokers: Vec<String>,
    /// Skip the publisher-count-1, window-1 (unloaded latency) measurement.
    #[arg(long)]
    no_pingpong: bool,
    /// mqttwrk binary for a cross-check against Mosquitto (plain TCP); skipped when missing.
    #[arg(long, default_value = "target/tools/bin/mqttwrk")]
    mqttwrk: PathBuf,
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

mod amqp;
mod brokers;
mod crosscheck;
mod load;
mod transport;

use brokers::*;
use crosscheck::*;
use load::*;
use transport::*;

// ---------------------------------------------------------------- main

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Hub,
    HubAmqp,
    MosqTls,
    MosqTcp,
    MosqTlsPersist,
}

impl Broker {
    fn label(self) -> &'static str {
        match self {
            Broker::Hub => "verge-hub, TLS, routed, fsync'd store",
            Broker::HubAmqp => "verge-hub, AMQPS publishers, routed, fsync'd",
            Broker::MosqTls => "mosquitto, TLS, persistence false",
            Broker::MosqTcp => "mosquitto, plain TCP, persistence false",
            Broker::MosqTlsPersist => "mosquitto, TLS, persistence true",
        }
    }
}

struct Row {
    broker: Broker,
    pubs: usize,
    window: usize,
    runs: Vec<RunResult>,
}

fn median_run(runs: &[RunResult]) -> Option<&RunResult> {
    let mut v: Vec<&RunResult> = runs.iter().collect();
    v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    v.get(v.len() / 2).copied()
}

#[allow(clippy::too_many_arguments)]
async fn one(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    broker: Broker,
    pubs: usize,
    window: usize,
    tag: &str,
    hub_hwm: &mut Vec<(String, u64)>,
) -> anyhow::Result<RunResult> {
    let r = match broker {
        Broker::Hub | Broker::HubAmqp => {
            let amqp = broker == Broker::HubAmqp;
            let (mut p, addr, amqps) = start_hub(args, dir, pki, tag, amqp)?;
            wait_listening(addr, &mut p).await?;
            if let Some(a) = amqps {
                wait_listening(a, &mut p).await?;
            }
            let t = Target {
                addr,
                tls: Some(pki.connector.clone()),
                hub: true,
                amqp: amqps,
            };
            let c0 = cpu_time(p.pid());
            let r = run_load(&t, pubs, window, args).await.map(|mut r| {
                r.broker_cpu = cpu_time(p.pid()).saturating_sub(c0);
                r
            });
            hub_hwm.push((format!("{pubs} pub × window {window}"), rss_kib(p.pid()).1));
            p.stop();
            let _ = std::fs::remove_dir_all(dir.join(format!("hub-store-{tag}")));
            r?
        }
        _ => {
            let mut m = start_mosquitto(args, dir, pki, broker == Broker::MosqTlsPersist, tag)?;
            wait_listening(m.tcp, &mut m.proc).await?;
            wait_listening(m.tls, &mut m.proc).await?;
            let t = match broker {
                Broker::MosqTcp => Target {
                    addr: m.tcp,
                    tls: None,
                    hub: false,
                    amqp: None,
                },
                _ => Target {
                    addr: m.tls,
                    tls: Some(pki.connector.clone()),
                    hub: false,
                    amqp: None,
                },
            };
            let c0 = cpu_time(m.proc.pid());
            let r = run_load(&t, pubs, window, args).await.map(|mut r| {
                r.broker_cpu = cpu_time(m.proc.pid()).saturating_sub(c0);
                r
            });
            m.proc.stop();
            r?
        }
    };
    Ok(r)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn fmt_rate(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn idle_rss(args: &Args, dir: &Path, pki: &Pki) -> anyhow::Result<((u64, u64), (u64, u64))> {
    let (mut hub, addr, _) = start_hub(args, dir, pki, "idle", false)?;
    wait_listening(addr, &mut hub).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let idle0 = rss_kib(hub.pid());
    let split0 = rss_split(hub.pid());
    let t = Target {
        addr,
        tls: Some(pki.connector.clone()),
        hub: true,
        amqp: None,
    };
    let mut idle_clients = Vec::new();
    for m in ["pub0", SINK] {
        let (mut io, _) = t.connect(m).await?;
        if m == SINK {
            let mut s = Subscribe::new(t.sub_filter(), QoS::AtLeastOnce);
            s.pkid = 1;
            let mut out = BytesMut::new();
            Packet::Subscribe(s).write(&mut out, MAX_PACKET)?;
            io.write_all(&out).await?;
            io.flush().await?;
        }
        idle_clients.push(io);
    }
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let idle2 = rss_kib(hub.pid());
    let split2 = rss_split(hub.pid());
    drop(idle_clients);
    hub.stop();
    println!(
        "verge-hub idle: VmRSS {:.1} MiB (VmHWM {:.1} MiB; {split0}); with 2 idle clients: VmRSS {:.1} MiB (VmHWM {:.1} MiB; {split2})",
        idle0.0 as f64 / 1024.0,
        idle0.1 as f64 / 1024.0,
        idle2.0 as f64 / 1024.0,
        idle2.1 as f64 / 1024.0
    );

    Ok((idle0, idle2))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.payload < 16 {
        bail!("--payload must be at least 16 bytes");
    }
    if args.publishers.iter().any(|&p| p == 0 || p > MAX_PUBS) {
        bail!("--publishers must be between 1 and {MAX_PUBS}");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    epoch();
    let dir = args.work_dir.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let pki = make_pki(&dir)?;
    println!("# hub-bench  (load average at start: {})", loadavg());
    println!(
        "payload {} B, QoS 1, up to {} msgs or {} s of publishing per run, {} round(s), scratch {}",
        args.payload,
        args.max_messages,
        args.secs,
        args.rounds,
        dir.display()
    );

    // 1. Idle RSS.
    let (idle0, idle2) = if args.skip_hub {
        ((0, 0), (0, 0))
    } else {
        idle_rss(&args, &dir, &pki).await?
    };

    // 2. Load: interleave brokers within each round so drift hits all alike.
    let mut plan: Vec<(Broker, usize, usize)> = Vec::new();
    let want = |name: &str| args.brokers.iter().any(|b| b == name);
    let pingpong = (!args.no_pingpong).then_some((1usize, 1usize));
    for (p, w) in pingpong
        .into_iter()
        .chain(args.publishers.iter().map(|&p| (p, args.window)))
    {
        for (b, name) in [
            (Broker::Hub, "hub"),
            (Broker::HubAmqp, "hub-amqp"),
            (Broker::MosqTls, "mosq-tls"),
            (Broker::MosqTcp, "mosq-tcp"),
        ] {
            let hub = matches!(b, Broker::Hub | Broker::HubAmqp);
            if want(name) && !(args.skip_hub && hub) {
                plan.push((b, p, w));
            }
        }
    }
    let maxp = args.publishers.iter().copied().max().unwrap_or(1);
    if want("mosq-persist") {
        plan.push((Broker::MosqTlsPersist, maxp, args.window));
    }
    let mut rows: Vec<Row> = plan
        .iter()
        .map(|&(broker, pubs, window)| Row {
            broker,
            pubs,
            window,
            runs: Vec::new(),
        })
        .collect();
    let mut hub_hwm = Vec::new();
    for round in 0..args.rounds {
        println!(
            "round {}/{} (load average {})",
            round + 1,
            args.rounds,
            loadavg()
        );
        for (i, row) in rows.iter_mut().enumerate() {
            let tag = format!("r{round}-{i}");
            let r = one(
                &args,
                &dir,
                &pki,
                row.broker,
                row.pubs,
                row.window,
                &tag,
                &mut hub_hwm,
            )
            .await
            .with_context(|| format!("{} {} pub(s)", row.broker.label(), row.pubs))?;
            println!(
                "  {:<42} {:>2} pub × w{:<3} {:>9} msgs/s routed (acks {:>9}/s) p50 {:>7.2} ms p99 {:>7.2} ms  broker CPU {:>5.1} µs/msg  recv {}/{} (sent {}) dup {}{}",
                row.broker.label(),
                row.pubs,
                row.window,
                fmt_rate(r.rate()),
                fmt_rate(r.ack_rate()),
                r.pct(0.5),
                r.pct(0.99),
                r.cpu_us_per_msg(),
                r.received,
                r.acked,
                r.sent,
                r.duplicates,
                if r.complete { "" } else { "  INCOMPLETE" }
            );
            row.runs.push(r);
        }
    }

    // 3. Cross-check with libmosquitto's own clients (single publisher).
    let mut cli = Vec::new();
    if args.cli_messages > 0 && !args.skip_hub {
        let (mut hub, addr, _) = start_hub(&args, &dir, &pki, "cli", false)?;
        wait_listening(addr, &mut hub).await?;
        cli.push(("verge-hub, TLS", cli_check(&args, addr, Some(&pki))));
        hub.stop();
        let mut m = start_mosquitto(&args, &dir, &pki, false, "cli")?;
        wait_listening(m.tcp, &mut m.proc).await?;
        cli.push(("mosquitto, plain TCP", cli_check(&args, m.tcp, None)));
        m.proc.stop();
    }
    let mut wrk = None;
    if args.cli_messages > 0 && args.mqttwrk.exists() {
        let mut m = start_mosquitto(&args, &dir, &pki, false, "mqttwrk")?;
        wait_listening(m.tcp, &mut m.proc).await?;
        wrk = Some(mqttwrk_check(&args, m.tcp));
        m.proc.stop();
    }

    // 4. Summary.
    println!(
        "\n## Summary (median of {} round(s); load average now {})\n",
        args.rounds,
        loadavg()
    );
    println!(
        "| broker | publishers × window | routed msgs/s, median (min–max) | PUBACKs/s | p50 ms | p99 ms | max ms | broker CPU µs/msg | received / acked | dups | verge ÷ this |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let Some(m) = median_run(&row.runs) else {
            continue;
        };
        let lo = row
            .runs
            .iter()
            .map(RunResult::rate)
            .fold(f64::INFINITY, f64::min);
        let hi = row.runs.iter().map(RunResult::rate).fold(0.0, f64::max);
        let hub_rate = rows
            .iter()
            .find(|r| r.broker == Broker::Hub && r.pubs == row.pubs && r.window == row.window)
            .and_then(|r| median_run(&r.runs))
            .map(RunResult::rate);
        let ratio = match (row.broker, hub_rate) {
            (Broker::Hub, _) | (_, None) => "—".to_owned(),
            // The AMQP row against the MQTT one, the other way round.
            (Broker::HubAmqp, Some(h)) => format!("AMQP {:.2}× MQTT", m.rate() / h),
            (_, Some(h)) => format!("{:.2}×", h / m.rate()),
        };
        let max_ms = m
            .lat_us
            .last()
            .map(|&u| f64::from(u) / 1000.0)
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {} × {} | {} ({}–{}) | {} | {:.2} | {:.2} | {:.1} | {:.1} | {}/{}{} | {} | {} |",
            row.broker.label(),
            row.pubs,
            row.window,
            fmt_rate(m.rate()),
            fmt_rate(lo),
            fmt_rate(hi),
            fmt_rate(m.ack_rate()),
            m.pct(0.5),
            m.pct(0.99),
            max_ms,
            m.cpu_us_per_msg(),
            m.received,
            m.acked,
            if row.runs.iter().all(|r| r.complete) {
                ""
            } else {
                " ⚠ incomplete"
            },
            m.duplicates,
            ratio
        );
    }
    println!(
        "\nverge-hub idle RSS: **{:.1} MiB** ({:.1} MB) VmRSS ({:.1} MiB VmHWM) with no client; {:.1} MiB ({:.1} MiB VmHWM) with 2 idle clients (target ≤ 10 MB)",
        idle0.0 as f64 / 1024.0,
        idle0.0 as f64 * 1024.0 / 1e6,
        idle0.1 as f64 / 1024.0,
        idle2.0 as f64 / 1024.0,
        idle2.1 as f64 / 1024.0
    );
    let worst = hub_hwm.iter().map(|(_, k)| *k).max().unwrap_or(0);
    println!(
        "verge-hub peak RSS under load (VmHWM, worst run): {:.1} MiB",
        worst as f64 / 1024.0
    );
    for (what, r) in &cli {
        match r {
            Ok(x) => println!(
                "cross-check mosquitto_pub → mosquitto_sub, 1 pub, -M 32, {} msgs, {what}: {} msgs/s end to end",
                args.cli_messages,
                fmt_rate(*x)
            ),
            Err(e) => println!("cross-check mosquitto_pub → mosquitto_sub, {what}: FAILED: {e:#}"),
        }
    }
    match wrk {
        Some(Ok((p, sub))) => println!(
            "cross-check mqttwrk bench, 1 pub → 1 sub, QoS 1, -i {}, {} msgs, mosquitto plain TCP: publisher {} msgs/s, subscriber {} msgs/s",
            args.window,
            args.cli_messages * 5,
            fmt_rate(p),
            fmt_rate(sub)
        ),
        Some(Err(e)) => println!("cross-check mqttwrk: FAILED: {e:#}"),
        None => println!(
            "cross-check mqttwrk: skipped (--cli-messages 0, or {} missing)",
            args.mqttwrk.display()
        ),
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

//! `hub-bench`: routed module→module MQTT QoS 1 throughput and latency of
//! verge-hub, against Mosquitto doing plain QoS 1 pub→sub, in the same run
//! and with the same load generator (this file), plus the idle RSS of
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
    /// Which load measurements to run (hub, mosq-tls, mosq-tcp, mosq-persist).
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

// ---------------------------------------------------------------- transport

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One broker endpoint as the load generator sees it.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    /// verge-hub (identities, SAS, routed topics) or a plain broker.
    hub: bool,
}

impl Target {
    fn pub_topic(&self, i: usize) -> String {
        format!("devices/{DEVICE}/modules/pub{i}/messages/events/%24.on=out1")
    }
    fn sub_filter(&self) -> String {
        if self.hub {
            format!("devices/{DEVICE}/modules/{SINK}/inputs/#")
        } else {
            format!("devices/{DEVICE}/modules/+/messages/events/#")
        }
    }

    async fn connect(&self, module: &str) -> anyhow::Result<(Box<dyn Io>, BytesMut)> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let mut io: Box<dyn Io> = match &self.tls {
            Some(c) => {
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                Box::new(c.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let client_id = format!("{DEVICE}/{module}");
        let mut c = Connect::new(client_id.clone());
        c.clean_session = true;
        c.keep_alive = 120;
        if self.hub {
            c.set_credentials(username(&client_id), module_token(module));
        }
        let mut out = BytesMut::new();
        Packet::Connect(c).write(&mut out, MAX_PACKET)?;
        io.write_all(&out).await?;
        io.flush().await?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match read_packet(&mut io, &mut buf).await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok((io, buf)),
            other => bail!("{client_id}: CONNECT refused: {other:?}"),
        }
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> anyhow::Result<Packet> {
    loop {
        if !buf.is_empty() {
            match Packet::read(buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet from broker: {e}"),
            }
        }
        if r.read_buf(buf).await? == 0 {
            bail!("broker closed the connection");
        }
    }
}

fn username(client_id: &str) -> String {
    format!("{IOTHUB}/{client_id}/?api-version=2021-04-12&DeviceClientType=verge-hub-bench")
}

fn generation(module: &str) -> String {
    format!("gen-{module}")
}

fn module_token(module: &str) -> String {
    let key = SharedAccessKey::from_base64(DEVICE_KEY)
        .ok()
        .zip(ModuleId::new(module).ok())
        .map(|(k, m)| k.derive_module_key(&m, &generation(module)));
    let Some(key) = key else {
        return String::new();
    };
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    SasToken::sign(
        &format!("{IOTHUB}/devices/{DEVICE}/modules/{module}"),
        &key,
        expiry,
        None,
    )
    .to_string()
}

/// Appends a QoS 1 PUBLISH (hand-encoded: no allocation per message).
fn put_publish(out: &mut BytesMut, topic: &[u8], pkid: u16, payload: &[u8]) {
    let remaining = 2 + topic.len() + 2 + payload.len();
    out.extend_from_slice(&[0x32]);
    let mut x = remaining;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        out.extend_from_slice(&[b]);
        if x == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

// ---------------------------------------------------------------- load

#[derive(Default)]
struct Shared {
    acked: AtomicU64,
    sent: AtomicU64,
    publishers_done: AtomicU64,
    failed: AtomicBool,
}

#[derive(Debug, Clone)]
struct RunResult {
    sent: u64,
    acked: u64,
    received: u64,
    duplicates: u64,
    /// First publish → last arrival.
    elapsed: Duration,
    /// First publish → last PUBACK.
    ack_elapsed: Duration,
    lat_us: Vec<u32>,
    complete: bool,
    /// CPU time (user + system) the broker process used during the run.
    broker_cpu: Duration,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn ack_rate(&self) -> f64 {
        self.acked as f64 / self.ack_elapsed.as_secs_f64().max(1e-9)
    }
    /// Broker CPU per routed message, microseconds.
    fn cpu_us_per_msg(&self) -> f64 {
        self.broker_cpu.as_secs_f64() * 1e6 / (self.received.max(1) as f64)
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.lat_us[i]) / 1000.0
    }
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    target: Target,
    idx: usize,
    n: u64,
    payload_len: usize,
    window: usize,
    stop_at: Instant,
    shared: Arc<Shared>,
    last_ack: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (io, mut buf) = target.connect(&format!("pub{idx}")).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let sem = Arc::new(Semaphore::new(window));
    let reader = {
        let sem = sem.clone();
        let shared = shared.clone();
        let last_ack = last_ack.clone();
        tokio::spawn(async move {
            loop {
                match read_packet(&mut rd, &mut buf).await {
                    Ok(Packet::PubAck(_)) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                        last_ack.fetch_max(now_ns(), Ordering::Relaxed);
                        sem.add_permits(1);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
    };
    let topic = target.pub_topic(idx).into_bytes();
    let mut payload = vec![b'x'; payload_len.max(16)];
    payload[8..12].copy_from_slice(&(idx as u32).to_le_bytes());
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    while seq < n && Instant::now() < stop_at {
        sem.acquire().await?.forget();
        let mut k = 1;
        while k < 64 && seq + k < n {
            match sem.try_acquire() {
                Ok(p) => {
                    p.forget();
                    k += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        for _ in 0..k {
            pkid = pkid.wrapping_add(1).max(1);
            payload[0..8].copy_from_slice(&now_ns().to_le_bytes());
            payload[12..16].copy_from_slice(&(seq as u32).to_le_bytes());
            put_publish(&mut out, &topic, pkid, &payload);
            seq += 1;
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        shared.sent.fetch_add(k, Ordering::Relaxed);
    }
    // Wait for every outstanding PUBACK.
    let all = u32::try_from(window).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(Duration::from_secs(60), sem.acquire_many(all)).await;
    reader.abort();
    let _ = wr.write_all(&[0xe0, 0x00]).await; // DISCONNECT
    let _ = wr.flush().await;
    if !matches!(drained, Ok(Ok(_))) {
        bail!("pub{idx}: PUBACKs missing after 60 s");
    }
    Ok(())
}

/// One measurement: `pubs` publishers → one subscriber on `target`.
async fn run_load(
    target: &Target,
    pubs: usize,
    window: usize,
    args: &Args,
) -> anyhow::Result<RunResult> {
    let per_pub = (args.max_messages / pubs as u64).max(1);
    let total_cap = per_pub * pubs as u64;
    let (sub_io, mut sub_buf) = target.connect(SINK).await.context("subscriber connect")?;
    let (mut srd, mut swr) = tokio::io::split(sub_io);
    let mut s = Subscribe::new(target.sub_filter(), QoS::AtLeastOnce);
    s.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Subscribe(s).write(&mut out, MAX_PACKET)?;
    swr.write_all(&out).await?;
    swr.flush().await?;
    match read_packet(&mut srd, &mut sub_buf).await? {
        Packet::SubAck(_) => {}
        other => bail!("expected SUBACK, got {other:?}"),
    }

    let shared = Arc::new(Shared::default());
    let last_ack = Arc::new(AtomicU64::new(0));
    let start_ns = now_ns();
    let stop_at = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut handles = Vec::new();
    for i in 0..pubs {
        let (t, sh, la) = (target.clone(), shared.clone(), last_ack.clone());
        let payload = args.payload;
        handles.push(tokio::spawn(async move {
            let r = publisher(t, i, per_pub, payload, window, stop_at, sh.clone(), la).await;
            if let Err(e) = &r {
                eprintln!("  publisher {i}: {e:#}");
                sh.failed.store(true, Ordering::Relaxed);
            }
            sh.publishers_done.fetch_add(1, Ordering::Relaxed);
        }));
    }

    // Subscriber: count, dedupe, time; PUBACK every delivery.
    let mut seen = vec![false; usize::try_from(total_cap).unwrap_or(usize::MAX)];
    let mut lat_us: Vec<u32> = Vec::with_capacity(seen.len().min(4_000_000));
    let (mut received, mut duplicates, mut last_rx) = (0u64, 0u64, start_ns);
    let mut acks = BytesMut::with_capacity(4096);
    let mut drain_deadline: Option<Instant> = None;
    let hard_deadline = stop_at + Duration::from_secs_f64(args.drain_secs + 60.0);
    let complete = loop {
        let done = shared.publishers_done.load(Ordering::Relaxed) == pubs as u64;
        if done {
            if received >= shared.acked.load(Ordering::Relaxed) {
                break !shared.failed.load(Ordering::Relaxed);
            }
            let d = *drain_deadline
                .get_or_insert_with(|| Instant::now() + Duration::from_secs_f64(args.drain_secs));
            if Instant::now() > d {
                break false;
            }
        }
        if Instant::now() > hard_deadline {
            break false;
        }
        // Parse whatever is buffered, then read more (bounded wait).
        loop {
            if sub_buf.is_empty() {
                break;
            }
            match Packet::read(&mut sub_buf, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    let t = now_ns();
                    if p.qos == QoS::AtLeastOnce {
                        acks.extend_from_slice(&[0x40, 0x02]);
                        acks.extend_from_slice(&p.pkid.to_be_bytes());
                    }
                    let b = &p.payload;
                    if b.len() < 16 {
                        continue;
                    }
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&b[0..8]);
                    let sent = u64::from_le_bytes(w);
                    let mut w4 = [0u8; 4];
                    w4.copy_from_slice(&b[8..12]);
                    let who = u64::from(u32::from_le_bytes(w4));
                    w4.copy_from_slice(&b[12..16]);
                    let seq = u64::from(u32::from_le_bytes(w4));
                    let slot = usize::try_from(who * per_pub + seq).unwrap_or(usize::MAX);
                    match seen.get_mut(slot) {
                        Some(s) if !*s => {
                            *s = true;
                            received += 1;
                            last_rx = t;
                            let us = t.saturating_sub(sent) / 1000;
                            lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                        _ => duplicates += 1,
                    }
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("subscriber: bad packet: {e}"),
            }
        }
        if !acks.is_empty() {
            swr.write_all(&acks).await?;
            swr.flush().await?;
            acks.clear();
        }
        match tokio::time::timeout(Duration::from_millis(50), srd.read_buf(&mut sub_buf)).await {
            Ok(Ok(0)) => bail!("subscriber: broker closed the connection"),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => bail!("subscriber: {e}"),
        }
    };
    for h in handles {
        let _ = h.await;
    }
    let _ = swr.write_all(&[0xe0, 0x00]).await;
    let _ = swr.flush().await;
    lat_us.sort_unstable();
    Ok(RunResult {
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        received,
        duplicates,
        elapsed: Duration::from_nanos(last_rx.saturating_sub(start_ns)),
        ack_elapsed: Duration::from_nanos(
            last_ack.load(Ordering::Relaxed).saturating_sub(start_ns),
        ),
        lat_us,
        complete,
        broker_cpu: Duration::ZERO,
    })
}

// ---------------------------------------------------------------- processes

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn stop(mut self) {
        // SIGINT first (the hub shuts down cleanly on ctrl-c), then SIGKILL.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("  {} did not stop on SIGINT; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn wait_listening(addr: SocketAddr, p: &mut Proc) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(addr).await {
            drop(s);
            return Ok(());
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            bail!("{} exited early: {st}", p.name);
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{} not listening on {addr} after 20 s", p.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    static TCK: OnceLock<f64> = OnceLock::new();
    let tck = *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_secs_f64(f.iter().sum::<f64>() / tck)
}

/// (VmRSS, VmHWM) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// "RssAnon x MiB + RssFile y MiB" of a process.
fn rss_split(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    format!(
        "RssAnon {:.1} MiB + RssFile {:.1} MiB + RssShmem {:.1} MiB",
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:")
    )
}

struct Pki {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "verge hub-bench CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate()?;
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
    let (cert, key, ca) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    std::fs::write(&key, leaf_key.serialize_pem())?;
    std::fs::write(&ca, ca_cert.pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Pki {
        cert,
        key,
        ca,
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    })
}

const MAX_PUBS: usize = 16;

fn write_hub_config(
    dir: &Path,
    pki: &Pki,
    (mqtt, https): (u16, u16),
    inflight: usize,
    tag: &str,
) -> anyhow::Result<PathBuf> {
    let mut routes = String::from("{\n  \"schemaVersion\": \"1.1\",\n  \"routes\": {\n");
    for i in 0..MAX_PUBS {
        let _ = writeln!(
            routes,
            "    \"pub{i}ToSink\": \"FROM /messages/modules/pub{i}/outputs/out1 INTO BrokeredEndpoint(\\\"/modules/{SINK}/inputs/in1\\\")\","
        );
    }
    routes.push_str(
        "    \"sinkAlerts\": \"FROM /messages/modules/sink/outputs/alerts WHERE alert = 'high' INTO $upstream\",\n    \"leafUp\": \"FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream\"\n  },\n  \"storeAndForwardConfiguration\": {\"timeToLiveSecs\": 7200}\n}\n",
    );
    let routes_file = dir.join("routes.json");
    std::fs::write(&routes_file, routes)?;
    let mut modules = String::new();
    for m in (0..MAX_PUBS)
        .map(|i| format!("pub{i}"))
        .chain([SINK.to_owned()])
    {
        let _ = writeln!(modules, "{m} = \"{}\"", generation(&m));
    }
    let storage = dir.join(format!("hub-store-{tag}"));
    let _ = std::fs::remove_dir_all(&storage);
    let text = format!(
        r#"iothub_hostname = "{IOTHUB}"
hostname = "localhost"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
[listen]
mqtt = "127.0.0.1:{mqtt}"
https = "127.0.0.1:{https}"
[tls]
cert = "{cert}"
key = "{key}"
[modules]
{modules}[devices]
leaf1 = "{LEAF_KEY}"
[limits]
max_inflight = {inflight}
"#,
        storage = storage.display(),
        routes = routes_file.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    let path = dir.join(format!("hub-{tag}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn start_hub(args: &Args, dir: &Path, pki: &Pki, tag: &str) -> anyhow::Result<(Proc, SocketAddr)> {
    let (mqtt, https) = (free_port()?, free_port()?);
    let cfg = write_hub_config(dir, pki, (mqtt, https), args.inflight, tag)?;
    let log = std::fs::File::create(dir.join(format!("hub-{tag}.log")))?;
    let child = Command::new(&args.hub_bin)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", args.hub_bin.display()))?;
    Ok((
        Proc {
            name: "verge-hub".into(),
            child,
        },
        SocketAddr::from(([127, 0, 0, 1], mqtt)),
    ))
}

struct Mosq {
    proc: Proc,
    tcp: SocketAddr,
    tls: SocketAddr,
}

fn start_mosquitto(
    args: &Args,
    dir: &Path,
    pki: &Pki,
    persistence: bool,
    tag: &str,
) -> anyhow::Result<Mosq> {
    let (tcp, tls) = (free_port()?, free_port()?);
    let pdir = dir.join(format!("mosq-{tag}"));
    let _ = std::fs::remove_dir_all(&pdir);
    std::fs::create_dir_all(&pdir)?;
    let conf = format!(
        "per_listener_settings false\nallow_anonymous true\nlog_dest none\n\
         max_inflight_messages {inflight}\nmax_queued_messages 1000000\n\
         persistence {persistence}\npersistence_location {pdir}/\n\
         listener {tcp} 127.0.0.1\n\
         listener {tls} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n",
        pdir = pdir.display(),
        inflight = args.inflight,
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    let path = dir.join(format!("mosquitto-{tag}.conf"));
    std::fs::write(&path, conf)?;
    let log = std::fs::File::create(dir.join(format!("mosquitto-{tag}.log")))?;
    let child = Command::new(&args.mosquitto_bin)
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", args.mosquitto_bin.display()))?;
    Ok(Mosq {
        proc: Proc {
            name: "mosquitto".into(),
            child,
        },
        tcp: SocketAddr::from(([127, 0, 0, 1], tcp)),
        tls: SocketAddr::from(([127, 0, 0, 1], tls)),
    })
}

// ---------------------------------------------------------------- cross-check

/// `mosquitto_sub -C n` then `mosquitto_pub --repeat n`; end-to-end msgs/s.
fn cli_check(args: &Args, addr: SocketAddr, hub: Option<&Pki>) -> anyhow::Result<f64> {
    let n = args.cli_messages.to_string();
    let port = addr.port().to_string();
    let payload = "x".repeat(args.payload);
    let mut sub = Command::new(&args.mosquitto_sub);
    sub.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-C",
        &n,
        "-N",
        "--quiet",
    ]);
    let mut publ = Command::new(&args.mosquitto_pub);
    publ.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "--repeat",
        &n,
        "-M",
        "32",
    ]);
    publ.args([
        "-m",
        &payload,
        "-t",
        &format!("devices/{DEVICE}/modules/pub0/messages/events/%24.on=out1"),
    ]);
    publ.args(["-i", &format!("{DEVICE}/pub0")]);
    sub.args(["-i", &format!("{DEVICE}/{SINK}")]);
    if let Some(pki) = hub {
        let ca = pki.ca.display().to_string();
        sub.args([
            "--cafile",
            &ca,
            "-u",
            &username(&format!("{DEVICE}/{SINK}")),
            "-P",
            &module_token(SINK),
        ]);
        sub.args(["-t", &format!("devices/{DEVICE}/modules/{SINK}/inputs/#")]);
        publ.args([
            "--cafile",
            &ca,
            "-u",
            &username(&format!("{DEVICE}/pub0")),
            "-P",
            &module_token("pub0"),
        ]);
    } else {
        sub.args([
            "-t",
            &format!("devices/{DEVICE}/modules/+/messages/events/#"),
        ]);
    }
    let mut sub = sub.stdout(Stdio::null()).stdin(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let st = publ.stdout(Stdio::null()).stdin(Stdio::null()).status()?;
    if !st.success() {
        let _ = sub.kill();
        let _ = sub.wait();
        bail!("mosquitto_pub failed: {st}");
    }
    let limit = Duration::from_secs_f64(args.drain_secs + 30.0);
    loop {
        if let Some(st) = sub.try_wait()? {
            if !st.success() {
                bail!("mosquitto_sub failed: {st}");
            }
            return Ok(args.cli_messages as f64 / t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > limit {
            let _ = sub.kill();
            let _ = sub.wait();
            bail!("mosquitto_sub did not receive {n} messages within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `mqttwrk bench` (it has no username, password, client id or topic options,
/// so it can only drive a plain broker): (publisher, subscriber) msgs/s.
fn mqttwrk_check(args: &Args, addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let n = (args.cli_messages * 5).to_string();
    let out = Command::new("timeout")
        .arg(format!("{}", (args.drain_secs + 60.0) as u64))
        .arg(&args.mqttwrk)
        .args([
            "bench",
            "-S",
            "127.0.0.1",
            "-P",
            &addr.port().to_string(),
            "-n",
            &n,
        ])
        .args(["-p", "1", "-s", "1", "-m", &args.payload.to_string()])
        .args([
            "--publish-qos",
            "1",
            "--subscribe-qos",
            "1",
            "-i",
            &args.window.to_string(),
        ])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rates: Vec<f64> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("throughput:"))
        .filter_map(|l| {
            l.split(':')
                .nth(1)?
                .trim()
                .trim_end_matches(',')
                .parse()
                .ok()
        })
        .collect();
    match rates.as_slice() {
        [p, s, ..] => Ok((*p, *s)),
        _ => bail!("mqttwrk: no throughput in its output ({})", out.status),
    }
}

// ---------------------------------------------------------------- main

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Hub,
    MosqTls,
    MosqTcp,
    MosqTlsPersist,
}

impl Broker {
    fn label(self) -> &'static str {
        match self {
            Broker::Hub => "verge-hub, TLS, routed, fsync'd store",
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
        Broker::Hub => {
            let (mut p, addr) = start_hub(args, dir, pki, tag)?;
            wait_listening(addr, &mut p).await?;
            let t = Target {
                addr,
                tls: Some(pki.connector.clone()),
                hub: true,
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
                },
                _ => Target {
                    addr: m.tls,
                    tls: Some(pki.connector.clone()),
                    hub: false,
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
    let (mut hub, addr) = start_hub(args, dir, pki, "idle")?;
    wait_listening(addr, &mut hub).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let idle0 = rss_kib(hub.pid());
    let split0 = rss_split(hub.pid());
    let t = Target {
        addr,
        tls: Some(pki.connector.clone()),
        hub: true,
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
            (Broker::MosqTls, "mosq-tls"),
            (Broker::MosqTcp, "mosq-tcp"),
        ] {
            if want(name) && !(args.skip_hub && b == Broker::Hub) {
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
        let (mut hub, addr) = start_hub(&args, &dir, &pki, "cli")?;
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

//! upstream-bench: how fast verge-hub drains an `$upstream` backlog into
//! verge-cloud, and how long after the link comes up the first message
//! lands.
//!
//! 1. **Fill**: the backlog is appended straight to a store opened in the
//!    hub's storage directory before the hub starts (stamped as the router
//!    would: sender ids, message id, 256-byte body, `$upstream` target with
//!    the default priority and no TTL), spread round-robin over `--senders`
//!    modules. Direct appends make the fill take seconds rather than the
//!    minutes MQTT publishes would; the drain is what is measured.
//! 2. verge-cloud (in-process: its real state, D2C log and TLS device
//!    endpoint) is created with the edge device and its modules
//!    registered, but its endpoint is not listening yet.
//! 3. verge-hub starts in-process on that storage directory, offline.
//! 4. The cloud's endpoint starts (t0). Measured: link-up (the hub's edge
//!    link connected), the first message in the cloud's D2C log, the last.
//!    Drain rate = messages / (last − first).
//!
//! `--protocol amqp` drains over one AMQP connection (a session per
//! sender) into verge-cloud's AMQPS endpoint instead of an MQTT connection
//! per sender. Everything binds 127.0.0.1; the run ends by itself.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use verge_core::message::Message;
use verge_core::{ModuleId, SharedAccessKey};
use verge_store::{Store, StoreConfig, Target};

const HUB: &str = "bench.azure-devices.net";
const DEVICE: &str = "edge1";
const DEVICE_KEY: &str = "YmVuY2gtZGV2aWNlLWtleS1mb3ItdXBzdHJlYW0tMTI=";

#[derive(Parser)]
#[command(about = "verge-hub $upstream drain into verge-cloud")]
struct Args {
    /// Messages in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Sending modules the backlog is spread over (one upstream link each).
    #[arg(long, default_value_t = 4)]
    senders: u32,
    /// The hub's `upstream.batch_size` (also each link's inflight window).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Body bytes per message.
    #[arg(long, default_value_t = 256)]
    body: usize,
    /// Give up after this many seconds of draining.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// The hub's upstream protocol: `mqtt` (a connection per sender) or
    /// `amqp` (one connection, a session per sender).
    #[arg(long, default_value = "mqtt", value_parser = ["mqtt", "amqp"])]
    protocol: String,
}

fn module_key(m: &str) -> SharedAccessKey {
    SharedAccessKey::from_base64(DEVICE_KEY)
        .unwrap()
        .derive_module_key(&ModuleId::new(m).unwrap(), "gen1")
}

/// A self-signed CA and a `localhost` server certificate for the hub's listeners.
fn hub_pki(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &issuer)?;
    std::fs::write(
        dir.join("hub.pem"),
        format!("{}{}", leaf.pem(), ca_cert.pem()),
    )?;
    std::fs::write(dir.join("hub.key"), key.serialize_pem())?;
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Appends the backlog to the hub's store; returns messages/s of the fill.
async fn fill(store_dir: &Path, args: &Args) -> anyhow::Result<f64> {
    let store = Store::open(
        store_dir,
        StoreConfig {
            default_ttl_secs: None,
            ..StoreConfig::default()
        },
    )?;
    let targets = [Target::new("$upstream")];
    let body = Bytes::from(vec![b'x'; args.body]);
    let started = Instant::now();
    let mut receipts = std::collections::VecDeque::new();
    for i in 0..args.messages {
        let mut m = Message::new(body.clone());
        m.system.message_id = Some(format!("m-{i}"));
        m.system.connection_device_id = Some(DEVICE.into());
        m.system.connection_module_id = Some(format!("mod{}", i % u64::from(args.senders)));
        m.properties.insert("seq", i.to_string());
        receipts.push_back(store.append_submit(&m, targets.to_vec()).await?);
        // A window of appends in flight, so group commits are shared.
        if receipts.len() >= 1024
            && let Some(r) = receipts.pop_front()
        {
            r.await?;
        }
    }
    for r in receipts {
        r.await?;
    }
    let rate = args.messages as f64 / started.elapsed().as_secs_f64();
    tokio::task::spawn_blocking(move || drop(store)).await?;
    Ok(rate)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    verge_hub::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let hub_dir = dir.path().join("hub");
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&hub_dir)?;
    std::fs::create_dir_all(&cloud_dir)?;
    let modules: Vec<String> = (0..args.senders).map(|i| format!("mod{i}")).collect();

    // verge-cloud, endpoint not yet listening.
    let files = verge_cloud::tls::ensure_files(&cloud_dir, HUB, None, None)?;
    let api_tls = verge_cloud::tls::server_config(&files)?;
    let mqtt_tls = verge_cloud::device::mqtt_tls(&api_tls);
    let cloud = verge_cloud::CloudState::open(verge_cloud::CloudOptions {
        data_dir: cloud_dir.clone(),
        hostname: HUB.to_owned(),
    })?;
    let backend =
        verge_cloud::device::CloudBackend::open(cloud.clone(), cloud_dir.join("sessions.json"))
            .await?;
    let keys = |k: &SharedAccessKey| verge_cloud::registry::SymmetricKeys {
        primary: k.to_base64(),
        secondary: SharedAccessKey::from_bytes(vec![9u8; 32]).to_base64(),
    };
    let device_key = SharedAccessKey::from_base64(DEVICE_KEY)?;
    cloud
        .put_device(
            DEVICE,
            verge_cloud::DeviceSpec {
                keys: Some(keys(&device_key)),
                iot_edge: true,
                ..verge_cloud::DeviceSpec::default()
            },
            None,
        )
        .await?;
    for m in &modules {
        let spec = verge_cloud::ModuleSpec {
            keys: Some(keys(&module_key(m))),
            ..verge_cloud::ModuleSpec::default()
        };
        cloud.put_module(DEVICE, m, spec, None).await?;
    }
    let cloud_port = free_port()?;

    // The backlog.
    eprintln!("filling the store with {} messages…", args.messages);
    let fill_rate = fill(&hub_dir.join("store"), &args).await?;
    eprintln!("filled at {fill_rate:.0} msgs/s");

    // The hub, offline.
    hub_pki(dir.path())?;
    let routes = dir.path().join("routes.json");
    std::fs::write(
        &routes,
        r#"{"schemaVersion":"1.1","routes":{"up":"FROM /messages/* INTO $upstream"},"storeAndForwardConfiguration":{"timeToLiveSecs":7200}}"#,
    )?;
    let module_table: String = modules
        .iter()
        .map(|m| format!("{m} = \"gen1\"\n"))
        .collect();
    let toml = format!(
        r#"
iothub_hostname = "{HUB}"
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
{module_table}
[upstream]
hostname = "localhost"
port = {cloud_port}
amqp_port = {cloud_port}
protocol = "{protocol}"
ca_file = "{ca}"
reconnect_ms = 100
batch_size = {batch}
"#,
        storage = hub_dir.display(),
        routes = routes.display(),
        mqtt = free_port()?,
        https = free_port()?,
        cert = dir.path().join("hub.pem").display(),
        key = dir.path().join("hub.key").display(),
        ca = files
            .ca
            .clone()
            .context("verge-cloud made no CA")?
            .display(),
        batch = args.batch_size,
        protocol = args.protocol,
    );
    let cfg = verge_hub::config::Config::from_toml(&toml).map_err(anyhow::Error::msg)?;
    let hub = verge_hub::Hub::start(cfg).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    anyhow::ensure!(
        cloud.d2c_tail() == 0,
        "nothing may arrive before the cloud is up"
    );

    // The cloud comes up.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", cloud_port)).await?;
    let t0 = Instant::now();
    let endpoint = if args.protocol == "amqp" {
        tokio::spawn(verge_cloud::device::serve_amqps(
            listener,
            mqtt_tls,
            backend,
            std::future::pending::<()>(),
        ))
    } else {
        tokio::spawn(verge_cloud::device::serve(
            listener,
            mqtt_tls,
            backend,
            std::future::pending::<()>(),
        ))
    };
    let online = &hub.state.stats.upstream.online;
    let deadline = t0 + Duration::from_secs(args.timeout_secs);
    let (mut link_up, mut first) = (None, None);
    let mut last_report = t0;
    let last = loop {
        let now = Instant::now();
        if link_up.is_none() && online.load(Ordering::Relaxed) {
            link_up = Some(now);
        }
        let n = cloud.d2c_tail();
        if first.is_none() && n > 0 {
            first = Some(now);
        }
        if n >= args.messages {
            break now;
        }
        if now.duration_since(last_report) >= Duration::from_secs(5) {
            eprintln!("  {n} in the cloud after {:.1} s", (now - t0).as_secs_f64());
            last_report = now;
        }
        anyhow::ensure!(
            now < deadline,
            "only {n} of {} drained in time",
            args.messages
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let link_up = link_up.unwrap_or(last);
    let first = first.unwrap_or(last);
    let drain = last.duration_since(first).as_secs_f64().max(1e-9);
    let rate = args.messages as f64 / drain;
    println!(
        "upstream-bench: {} msgs × {} B, {} senders, batch_size {}, {}",
        args.messages, args.body, args.senders, args.batch_size, args.protocol
    );
    println!("  fill (direct store appends): {fill_rate:.0} msgs/s");
    println!(
        "  cloud up → link up: {:.0} ms; link up → first message in the D2C log: {:.0} ms",
        (link_up - t0).as_secs_f64() * 1e3,
        first.saturating_duration_since(link_up).as_secs_f64() * 1e3
    );
    println!(
        "  drain: {rate:.0} msgs/s ({:.2} s first → last; {:.2} s from cloud up)",
        drain,
        (last - t0).as_secs_f64()
    );
    println!(
        "  hub counters: sent {}, expired {}",
        hub.state.stats.upstream.sent.load(Ordering::Relaxed),
        hub.state.stats.upstream.expired.load(Ordering::Relaxed)
    );
    hub.shutdown().await;
    endpoint.abort();
    Ok(())
}

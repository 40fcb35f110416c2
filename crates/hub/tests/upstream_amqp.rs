//! The AMQP upstream at gateway scale, end to end: the `verge-hub` binary
//! with 200 downstream devices drains their offline backlog to verge-cloud's
//! AMQPS endpoint (in-process) through ONE connection, as edgeHub
//! multiplexes; a TCP forwarder between them counts the connections and cuts
//! the link for real. An identity the cloud does not know is refused alone.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use tokio::net::TcpListener;
use verge_core::{ClientId, SasToken, SharedAccessKey};
use verge_testkit::net::free_addr;

const LEAVES: usize = 200;
const PER_LEAF: u64 = 5;
/// In the hub's configuration, not registered in the cloud.
const UNKNOWN: &str = "leaf-unknown";

const ROUTES_UP: &str = r#"{
  "schemaVersion": "1.1",
  "routes": { "up": "FROM /messages/* INTO $upstream" },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
}"#;

fn leaf(i: usize) -> String {
    format!("leaf{i:03}")
}

fn leaf_key(name: &str) -> SharedAccessKey {
    let mut k = name.as_bytes().to_vec();
    k.resize(32, b'k');
    SharedAccessKey::from_bytes(k)
}

/// The hub's config: `leaves` and [`UNKNOWN`] in `[devices]`, everything
/// routed upstream, the upstream over `protocol` to `cloud`.
fn hub_config(
    pki: &Pki,
    storage: &Path,
    mqtt: SocketAddr,
    (cloud, protocol): (SocketAddr, &str),
    ca: &Path,
    leaves: usize,
) -> std::path::PathBuf {
    config(pki, storage, &mqtt.to_string(), &free_addr().to_string());
    std::fs::write(pki.dir.path().join("routes.json"), ROUTES_UP).unwrap();
    let path = pki.dir.path().join("hub.toml");
    let mut devices = String::from("[devices]\n");
    for name in (0..leaves).map(leaf).chain([UNKNOWN.to_owned()]) {
        devices.push_str(&format!("{name} = \"{}\"\n", leaf_key(&name).to_base64()));
    }
    let mut text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("[devices]\n", &devices, 1);
    text.push_str(&format!(
        "[upstream]\nhostname = \"localhost\"\nprotocol = \"{protocol}\"\nport = {port}\namqp_port = {port}\nca_file = \"{}\"\nreconnect_ms = 200\nbatch_size = 50\nkeep_alive_secs = 10\nack_timeout_secs = 5\n",
        ca.display(),
        port = cloud.port(),
    ));
    std::fs::write(&path, &text).unwrap();
    path
}

/// Registers `n` leaf devices in verge-cloud with the keys the hub holds.
async fn register_leaves(cloud: &LocalCloud, n: usize) {
    for i in 0..n {
        let name = leaf(i);
        let k = leaf_key(&name).to_base64();
        let spec = verge_cloud::DeviceSpec {
            keys: Some(verge_cloud::registry::SymmetricKeys {
                primary: k.clone(),
                secondary: k,
            }),
            ..verge_cloud::DeviceSpec::default()
        };
        cloud.state.put_device(&name, spec, None).await.unwrap();
    }
}

/// One test's gateway: verge-cloud in-process (its device endpoint started
/// by [`Gateway::serve`]) with `leaves` registered, and the hub's config
/// dialing `dial` over `protocol`.
struct Gateway {
    cloud: LocalCloud,
    tls: std::sync::Arc<rustls::ServerConfig>,
    pki: Pki,
    storage: tempfile::TempDir,
    mqtt: SocketAddr,
    dial: SocketAddr,
    protocol: &'static str,
    toml: std::path::PathBuf,
}

impl Gateway {
    /// `extra` is appended to the hub's `[upstream]` table.
    async fn new(leaves: usize, protocol: &'static str, extra: &str) -> Gateway {
        let cloud = local_cloud().await;
        register_leaves(&cloud, leaves).await;
        let tls =
            verge_cloud::device::mqtt_tls(&verge_cloud::tls::server_config(&cloud.files).unwrap());
        let ca = cloud.files.ca.clone().unwrap();
        let pki = pki();
        let storage = tempfile::tempdir().unwrap();
        let (mqtt, dial) = (free_addr(), free_addr());
        let toml = hub_config(&pki, storage.path(), mqtt, (dial, protocol), &ca, leaves);
        let mut text = std::fs::read_to_string(&toml).unwrap();
        text.push_str(extra);
        std::fs::write(&toml, text).unwrap();
        Gateway {
            cloud,
            tls,
            pki,
            storage,
            mqtt,
            dial,
            protocol,
            toml,
        }
    }

    async fn hub(&self) -> HubProc {
        HubProc::start(&self.toml, self.mqtt, &self.storage.path().join("hub.log")).await
    }

    /// Starts the cloud's device endpoint for the protocol on `addr`.
    async fn serve(&self, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (tls, backend) = (self.tls.clone(), self.cloud.backend.clone());
        serve_devices(listener, tls, backend, self.protocol == "Amqp")
    }
}

/// `name` connects to the hub over MQTT and sends `seqs` QoS 1 (each
/// acknowledged after the hub's fsync), then leaves.
async fn send(mqtt: SocketAddr, ca: &str, name: &str, seqs: std::ops::Range<u64>) {
    let token = SasToken::sign(
        &format!("{HUB}/devices/{name}"),
        &leaf_key(name),
        now() + 600,
        None,
    )
    .to_string();
    let (mut raw, ack) = Raw::connect(mqtt, ca, name, &username(name), &token, true).await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success, "{name}");
    for seq in seqs {
        let topic = format!("devices/{name}/messages/events/seq={seq}");
        publish_qos1(&mut raw, &topic, name.as_bytes(), (seq % 60_000 + 1) as u16).await;
    }
}

/// Every leaf sends `seqs`, 25 at a time.
async fn all_send(mqtt: SocketAddr, ca: &str, names: &[String], seqs: std::ops::Range<u64>) {
    for chunk in names.chunks(25) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|n| {
                let (n, ca, seqs) = (n.clone(), ca.to_owned(), seqs.clone());
                tokio::spawn(async move { send(mqtt, &ca, &n, seqs).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

/// Which of `want` (sender → seqs) the cloud does not hold yet.
fn missing(got: &HashMap<String, Vec<u64>>, want: &HashMap<String, Vec<u64>>) -> usize {
    want.iter()
        .map(|(id, seqs)| {
            let have: HashSet<u64> = got
                .get(id)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            seqs.iter().filter(|s| !have.contains(s)).count()
        })
        .sum()
}

/// 200 leaf devices' offline backlog drains through one AMQP connection
/// (a session and a CBS token each), in order per sender; a real cut of
/// that connection costs one reconnect and loses nothing; the identity the
/// cloud refuses waits alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_leaves_drain_through_one_amqp_connection() {
    let gw = Gateway::new(LEAVES, "Amqp", "").await;
    let (cloud, mqtt, ca) = (&gw.cloud, gw.mqtt, gw.pki.ca_pem.as_str());
    let hub = gw.hub().await;

    // Offline: nothing listens where the hub dials.
    let names: Vec<String> = (0..LEAVES).map(leaf).collect();
    all_send(mqtt, ca, &names, 0..PER_LEAF).await;
    send(mqtt, ca, UNKNOWN, 0..2).await;
    let mut want: HashMap<String, Vec<u64>> = names
        .iter()
        .map(|n| (n.clone(), (0..PER_LEAF).collect()))
        .collect();

    // The cloud comes up, behind the forwarder.
    let amqps = free_addr();
    let endpoint = gw.serve(amqps).await;
    let up_at = Instant::now();
    let fwd = Forwarder::start(gw.dial, amqps).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first = None;
    while missing(&d2c_seqs(&cloud.state), &want) > 0 {
        if first.is_none() && cloud.state.d2c_tail() > 0 {
            first = Some(up_at.elapsed());
        }
        if Instant::now() >= deadline && std::env::var_os("VERGE_SHOW_LOG").is_some() {
            println!("{}", hub.log());
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} messages missing after 60 s\n{}",
            missing(&d2c_seqs(&cloud.state), &want),
            LEAVES as u64 * PER_LEAF,
            tail(&hub.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "backlog of {} messages from {LEAVES} leaves: first at the cloud after {:?}, all after {:?}",
        LEAVES as u64 * PER_LEAF,
        first,
        up_at.elapsed()
    );
    if std::env::var_os("VERGE_SHOW_LOG").is_some() {
        println!("{}", hub.log());
    }
    assert_eq!(fwd.bridged(), 1, "one connection for every identity");
    assert_eq!(fwd.open(), 1);
    for n in &names {
        let id = ClientId::parse(n).unwrap();
        assert!(cloud.state.is_connected(&id), "{n} has no session upstream");
        assert_eq!(
            cloud.state.get_device(n).unwrap().to_json()["connectionProtocol"],
            "AMQP"
        );
    }

    // A real cut: every identity's session goes with the one connection;
    // what the leaves send meanwhile arrives after the hub redials.
    fwd.cut();
    all_send(mqtt, ca, &names[..20], PER_LEAF..PER_LEAF + 3).await;
    for n in &names[..20] {
        want.get_mut(n).unwrap().extend(PER_LEAF..PER_LEAF + 3);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while missing(&d2c_seqs(&cloud.state), &want) > 0 {
        assert!(
            Instant::now() < deadline,
            "messages sent across the cut missing\n{}",
            tail(&hub.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fwd.bridged(), 2, "one reconnect after the cut");
    assert_eq!(fwd.open(), 1);

    // Order per sender (at least once: a resend may only repeat).
    let got = d2c_seqs(&cloud.state);
    for (id, seqs) in &got {
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{id}: {firsts:?}");
    }
    // The unknown identity was refused and waited alone.
    assert!(!got.contains_key(UNKNOWN));
    let hub_log = hub.log();
    assert!(
        hub_log.contains("the cloud refused this identity") && hub_log.contains(UNKNOWN),
        "{}",
        tail(&hub_log, 40)
    );
    hub.stop();
    endpoint.abort();
}

/// The hub's resident memory (VmRSS), KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What an idle upstream identity costs the hub: 200 leaves each send one
/// message while the cloud is down, the hub restarts (its backlog starts a
/// link task per sender), then the cloud comes up and every identity
/// connects and idles; the hub's RSS before and after, over one AMQP
/// connection and over an MQTT/TLS connection each. A benchmark (run with
/// `--ignored --nocapture`, `VERGE_HUB_BIN` naming an optimized build),
/// recorded in BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn bench_idle_identity_memory_amqp_vs_mqtt() {
    for protocol in ["Mqtt", "Amqp", "Mqtt", "Amqp"] {
        let gw = Gateway::new(LEAVES, protocol, "").await;
        let (cloud, mqtt, ca) = (&gw.cloud, gw.mqtt, gw.pki.ca_pem.as_str());
        // VERGE_HUB_BIN: an optimized build to measure (the test's own is
        // a debug build, whose futures are several times larger).
        let bin = std::env::var("VERGE_HUB_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_verge-hub").to_owned());
        let log = gw.storage.path().join("hub.log");
        let start = || async {
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("--config").arg(&gw.toml);
            HubProc::spawn(&mut cmd, mqtt, &log).await
        };
        let hub = start().await;
        let names: Vec<String> = (0..LEAVES).map(leaf).collect();
        all_send(mqtt, ca, &names, 0..1).await;
        // A fresh process, so the memory the leaves' own connections used
        // is not there to be reused: the backlog makes every link start.
        hub.stop();
        let hub = start().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = rss_kib(hub.pid());
        let endpoint = gw.serve(gw.dial).await;
        let want: HashMap<String, Vec<u64>> = names.iter().map(|n| (n.clone(), vec![0])).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while missing(&d2c_seqs(&cloud.state), &want) > 0 {
            assert!(Instant::now() < deadline, "{}", tail(&hub.log(), 20));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Idle: twins fetched, links settled.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = rss_kib(hub.pid());
        println!(
            "{protocol}: hub RSS {before} KiB with {LEAVES} identities' links down, {after} KiB with them up and idle: {:.1} KiB per identity",
            (after as f64 - before as f64) / LEAVES as f64
        );
        hub.stop();
        endpoint.abort();
    }
}

/// edgeHub's `CloudConnectionIdleTimeoutSecs` over AMQP: a leaf's session
/// ends once it has been idle (its client gone) for the timeout, while the
/// edge's own stays; a new message opens it again (still one connection),
/// and a desired change made while it was closed reaches the hub's twin
/// once its client connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_and_reopen_on_demand() {
    idle_sessions("Amqp").await;
}

/// The same over MQTT: an idle identity's own connection closes, and is
/// dialed again on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mqtt_links_close_and_reopen_on_demand() {
    idle_sessions("Mqtt").await;
}

async fn idle_sessions(protocol: &'static str) {
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Packet, Publish};
    let gw = Gateway::new(2, protocol, "idle_timeout_secs = 1\n").await;
    let (cloud, mqtt, ca) = (&gw.cloud, gw.mqtt, gw.pki.ca_pem.as_str());
    let cloud_addr = free_addr();
    let endpoint = gw.serve(cloud_addr).await;
    let fwd = Forwarder::start(gw.dial, cloud_addr).await;
    let hub = gw.hub().await;
    let connected = |id: &str| cloud.state.is_connected(&ClientId::parse(id).unwrap());
    let (l0, l1) = (leaf(0), leaf(1));

    send(mqtt, ca, &l0, 0..1).await;
    send(mqtt, ca, &l1, 0..1).await;
    wait_until(
        "both leaves' first messages",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || cloud.state.d2c_tail() >= 2,
    )
    .await;
    // Idle (their clients are gone): the sessions end; the edge's stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connected(&l0) || connected(&l1) {
        assert!(
            Instant::now() < deadline,
            "the idle sessions did not end\n{}",
            tail(&hub.log(), 40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(connected(DEVICE), "the edge's own session stays");

    // A message opens the session again, on the same connection.
    send(mqtt, ca, &l0, 1..2).await;
    let want: HashMap<String, Vec<u64>> = [(l0.clone(), vec![0, 1])].into();
    wait_until(
        "the message after the idle close",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || missing(&d2c_seqs(&cloud.state), &want) == 0,
    )
    .await;

    // A desired change while l1's session is closed; l1's client connects:
    // its session opens and the hub's twin takes the change.
    let l1_id = ClientId::parse(&l1).unwrap();
    cloud
        .state
        .update_twin(
            &l1_id,
            serde_json::json!({"properties": {"desired": {"x": 1}}}),
            None,
        )
        .await
        .unwrap();
    let token = SasToken::sign(
        &format!("{HUB}/devices/{l1}"),
        &leaf_key(&l1),
        now() + 600,
        None,
    );
    let (mut raw, ack) =
        Raw::connect(mqtt, ca, &l1, &username(&l1), &token.to_string(), true).await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    wait_until(
        "l1's session back",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || connected(&l1),
    )
    .await;
    let mut rid = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rid += 1;
        assert!(
            subscribe1(&mut raw, "$iothub/twin/res/#").await
                != rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure
        );
        raw.send(Packet::Publish(Publish::new(
            format!("$iothub/twin/GET/?$rid={rid}"),
            QoS::AtMostOnce,
            Vec::new(),
        )))
        .await;
        let p = next_pub(&mut raw).await;
        let twin: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        if twin["desired"]["x"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "desired change not in the hub's twin: {twin}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if protocol == "Amqp" {
        assert_eq!(fwd.bridged(), 1, "sessions come and go on one connection");
    } else {
        // The edge's, each leaf's, and each leaf's again after its close.
        assert!(fwd.bridged() >= 5, "{} connections", fwd.bridged());
    }
    assert!(
        hub.log().contains("upstream session ended while idle"),
        "{}",
        tail(&hub.log(), 30)
    );
    hub.stop();
    endpoint.abort();
}

/// A cloud whose first frame declares a 4 GB value (the input the fuzzer
/// found against the hub's own AMQP endpoint; fe2o3 allocates what a value
/// declares) costs the upstream connection, not the hub: the hub runs under
/// an address-space limit smaller than that, as a small gateway, logs the
/// malformed frame and keeps serving its devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_frame_declaring_gigabytes_costs_the_connection_not_the_hub() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::new(1, "Amqp", "").await;
    // The "cloud": TLS, then its SASL header and a SASL frame whose body is
    // a sym32 declaring 0xffffffff bytes and holding three.
    let listener = TcpListener::bind(gw.dial).await.unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(gw.tls.clone());
    let cloud = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut header = [0u8; 8];
                let _ = tls.read_exact(&mut header).await;
                let _ = tls.write_all(b"AMQP\x03\x01\x00\x00").await;
                let bomb = [
                    0, 0, 0, 16, 2, 1, 0, 0, 0xb3, 0xff, 0xff, 0xff, 0xff, 0x41, 0x41, 0x41,
                ];
                let _ = tls.write_all(&bomb).await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let log = gw.storage.path().join("hub.log");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--as={}", 3u64 << 30))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_verge-hub"))
        .arg("--config")
        .arg(&gw.toml);
    let mut hub = HubProc::spawn(&mut cmd, gw.mqtt, &log).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hub.log().contains("malformed AMQP frame") {
        assert!(!hub.exited(), "the hub died:\n{}", tail(&hub.log(), 20));
        assert!(
            Instant::now() < deadline,
            "no malformed-frame error:\n{}",
            tail(&hub.log(), 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A few more attempts at the same cloud, then the hub still serves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!hub.exited(), "the hub died:\n{}", tail(&hub.log(), 20));
    send(gw.mqtt, &gw.pki.ca_pem, &leaf(0), 0..1).await;
    assert!(!hub.exited());
    hub.stop();
    cloud.abort();
}

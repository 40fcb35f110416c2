//! The hub's upstream, end to end on loopback: the real `verge-hub` binary (or
//! an in-process hub where counters are checked) drains `$upstream` to a cloud
//! peer. The peer here is a minimal MQTT acceptor built on rumqttc's packet
//! codec: it authenticates each identity's SAS token like IoT Hub, records
//! every PUBLISH and PUBACKs it (optionally dropping the connection instead,
//! to prove nothing unacknowledged is checkpointed).
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use verge_core::{ClientId, SasToken, SharedAccessKey};
use verge_testkit::net::free_addr;

const ROUTES_UP: &str = r#"{
  "schemaVersion": "1.1",
  "routes": { "up": "FROM /messages/* INTO $upstream" },
  "storeAndForwardConfiguration": {"timeToLiveSecs": TTL}
}"#;

/// One PUBLISH the cloud received.
#[derive(Debug, Clone)]
struct Got {
    client: String,
    topic: String,
    at: Instant,
}

#[derive(Default)]
struct CloudLog {
    got: Mutex<Vec<Got>>,
    connects: Mutex<Vec<String>>,
    /// Drop the connection instead of acknowledging every n-th PUBLISH (0 = never).
    drop_every: AtomicU64,
    publishes: AtomicU64,
}

impl CloudLog {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// The fake cloud IoT hub: TLS on a fixed loopback port, started and stopped
/// at will (stopping closes the listener and every connection).
struct Cloud {
    pki: Pki,
    ca_file: PathBuf,
    addr: SocketAddr,
    log: Arc<CloudLog>,
    task: Option<JoinHandle<()>>,
}

fn cloud_keys() -> HashMap<String, SharedAccessKey> {
    let mut keys = HashMap::new();
    keys.insert(
        DEVICE.to_owned(),
        SharedAccessKey::from_base64(DEVICE_KEY).unwrap(),
    );
    keys.insert(format!("{DEVICE}/modA"), module_key("modA"));
    keys.insert(format!("{DEVICE}/modB"), module_key("modB"));
    keys.insert(
        "leaf1".to_owned(),
        SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
    );
    keys
}

impl Cloud {
    fn new() -> Cloud {
        let addr = free_addr();
        let pki = pki();
        let ca_file = pki.dir.path().join("cloud-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        Cloud {
            pki,
            ca_file,
            addr,
            log: Arc::new(CloudLog::default()),
            task: None,
        }
    }

    /// (port, CA file) for the hub's `[upstream]` table.
    fn upstream(&self) -> (u16, &Path) {
        (self.addr.port(), &self.ca_file)
    }

    async fn start(&mut self) -> Instant {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let tls = verge_hub::tls::acceptor(&self.pki.cert, &self.pki.key).unwrap();
        let log = self.log.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, log) = (tls.clone(), log.clone());
                conns.spawn(async move {
                    if let Ok(s) = tls.accept(tcp).await {
                        serve_cloud(s, log).await;
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        }));
        Instant::now()
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            // Dropping the task drops the listener and its JoinSet (every connection).
            t.abort();
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn read_pkt<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        if !buf.is_empty() {
            match Packet::read(buf, 1 << 22) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(_) => return None,
            }
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn write_pkt<S: AsyncWrite + Unpin>(s: &mut S, p: Packet) -> bool {
    let mut out = BytesMut::new();
    p.write(&mut out, 1 << 22).unwrap();
    s.write_all(&out).await.is_ok() && s.flush().await.is_ok()
}

/// One device-side connection to the fake cloud, checked as IoT Hub would.
async fn serve_cloud<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, log: Arc<CloudLog>) {
    let mut buf = BytesMut::new();
    let Some(Packet::Connect(c)) = read_pkt(&mut s, &mut buf).await else {
        return;
    };
    let keys = cloud_keys();
    let ok = (|| {
        let (user, pass) = match &c.auth {
            rumqttc::mqttbytes::v4::ConnectAuth::UsernamePassword { username, password } => {
                (username.clone(), password.clone())
            }
            _ => return false,
        };
        // Username `{hub}/{id}/?api-version=2021-04-12…`, token signed for the identity.
        if !user.starts_with(&format!("{HUB}/{}/?api-version=2021-04-12", c.client_id)) {
            return false;
        }
        let Some(key) = keys.get(&c.client_id) else {
            return false;
        };
        let client = ClientId::parse(&c.client_id).unwrap();
        let token = SasToken::parse(std::str::from_utf8(&pass).unwrap_or("")).unwrap();
        token.verify(key, &[HUB], &client, now()).is_ok()
    })();
    let code = if ok {
        ConnectReturnCode::Success
    } else {
        ConnectReturnCode::NotAuthorized
    };
    if !write_pkt(&mut s, Packet::ConnAck(ConnAck::new(code, false))).await || !ok {
        return;
    }
    log.connects.lock().unwrap().push(c.client_id.clone());
    while let Some(p) = read_pkt(&mut s, &mut buf).await {
        match p {
            // Twin traffic (the hub GETs the twin on every connection): an
            // empty twin, as IoT Hub has for a new identity.
            Packet::Publish(p) if p.topic.starts_with(b"$iothub/") => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if let Some(rid) = topic
                    .strip_prefix("$iothub/twin/GET/?$rid=")
                    .map(str::to_owned)
                {
                    let res = Publish::new(
                        format!("$iothub/twin/res/200/?$rid={rid}"),
                        QoS::AtMostOnce,
                        br#"{"desired":{"$version":1},"reported":{"$version":1}}"#.to_vec(),
                    );
                    if !write_pkt(&mut s, Packet::Publish(res)).await {
                        return;
                    }
                }
            }
            Packet::Publish(p) => {
                let n = log.publishes.fetch_add(1, Ordering::SeqCst) + 1;
                let every = log.drop_every.load(Ordering::SeqCst);
                if every > 0 && n.is_multiple_of(every) {
                    // Received but never acknowledged: the hub must send it again.
                    return;
                }
                log.got.lock().unwrap().push(Got {
                    client: c.client_id.clone(),
                    topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                    at: Instant::now(),
                });
                if !write_pkt(&mut s, Packet::PubAck(PubAck::new(p.pkid))).await {
                    return;
                }
            }
            Packet::PingReq if !write_pkt(&mut s, Packet::PingResp).await => return,
            Packet::Disconnect => return,
            _ => {}
        }
    }
}

/// A hub config (written to `{pki.dir}/hub.toml`) with an `[upstream]` table
/// pointing at `cloud`, and routes sending everything upstream with `ttl`.
fn hub_config(
    pki: &Pki,
    storage: &Path,
    mqtt: SocketAddr,
    (cloud_port, cloud_ca): (u16, &Path),
    ttl: u64,
) -> (PathBuf, verge_hub::config::Config) {
    let https = free_addr();
    config(pki, storage, &mqtt.to_string(), &https.to_string());
    std::fs::write(
        pki.dir.path().join("routes.json"),
        ROUTES_UP.replace("TTL", &ttl.to_string()),
    )
    .unwrap();
    let path = pki.dir.path().join("hub.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "[upstream]\nhostname = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\nreconnect_ms = 200\nbatch_size = 10\nkeep_alive_secs = 10\nack_timeout_secs = 5\n",
        cloud_port,
        cloud_ca.display()
    ));
    std::fs::write(&path, &text).unwrap();
    let cfg = verge_hub::config::Config::from_toml(&text).unwrap();
    (path, cfg)
}

/// A connected sender: a module of the edge device, or a leaf device.
struct Sender {
    raw: Raw,
    topic: String,
    pkid: u16,
}

async fn sender(hub: SocketAddr, ca: &str, who: &str) -> Sender {
    let (raw, topic) = if who == "leaf1" {
        let token = SasToken::sign(
            &format!("{HUB}/devices/leaf1"),
            &SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
            now() + 3600,
            None,
        )
        .to_string();
        let (raw, ack) = Raw::connect(hub, ca, "leaf1", &username("leaf1"), &token, true).await;
        assert_eq!(code(ack).0, ConnectReturnCode::Success);
        (raw, "devices/leaf1/messages/events/".to_owned())
    } else {
        let (raw, _) = connect_module(hub, ca, who, true).await;
        (
            raw,
            format!("devices/{DEVICE}/modules/{who}/messages/events/%24.on=out1&"),
        )
    };
    Sender {
        raw,
        topic,
        pkid: 0,
    }
}

impl Sender {
    /// Sends `seq` (as app property and message id) QoS 1; true once the hub PUBACKed.
    async fn send(&mut self, who: &str, seq: u64) -> bool {
        self.pkid = self.pkid % 60000 + 1;
        let topic = format!("{}seq={seq}&%24.mid={who}-{seq}", self.topic);
        let mut p = Publish::new(topic, QoS::AtLeastOnce, format!("{who}:{seq}").into_bytes());
        p.pkid = self.pkid;
        if !write_pkt(&mut self.raw.s, Packet::Publish(p)).await {
            return false;
        }
        let pkid = self.pkid;
        let wait = async {
            loop {
                match read_pkt(&mut self.raw.s, &mut self.raw.buf).await {
                    Some(Packet::PubAck(a)) if a.pkid == pkid => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        };
        tokio::time::timeout(T, wait).await.unwrap_or(false)
    }
}

/// The `seq` values each cloud client id received, in arrival order.
fn by_sender(got: &[Got]) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    for g in got {
        let seq = g
            .topic
            .split(['/', '&'])
            .find_map(|kv| kv.strip_prefix("seq="))
            .unwrap_or_else(|| panic!("no seq in {}", g.topic))
            .parse()
            .unwrap();
        out.entry(g.client.clone()).or_default().push(seq);
    }
    out
}

/// Order per sender with at-least-once: the first occurrences are 0, 1, 2, …
/// (no gap, no reordering); a resend may only repeat what came before.
fn first_occurrences(seqs: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    seqs.iter().copied().filter(|s| seen.insert(*s)).collect()
}

async fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_until(what, limit, Duration::from_millis(20), f).await;
}

const SENDERS: [&str; 3] = ["modA", "modB", "leaf1"];

fn cloud_id(who: &str) -> String {
    if who == "leaf1" {
        who.to_owned()
    } else {
        format!("{DEVICE}/{who}")
    }
}

/// Offline sends from two modules and a leaf device, a hub restart while
/// offline, then the cloud comes back: everything arrives as its own
/// identity, in order per sender, without duplicates, within ~1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_survives_restart_and_drains_on_link_up() {
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::new();
    let mqtt = free_addr();
    let (toml, _) = hub_config(&hub_pki, storage.path(), mqtt, cloud.upstream(), 7200);
    let log = storage.path().join("hub.log");

    // The cloud is down from the start.
    let mut hub = HubProc::start(&toml, mqtt, &log).await;
    let mut next = [0u64; 3];
    for round in 0..2 {
        let mut senders = Vec::new();
        for who in SENDERS {
            senders.push(sender(mqtt, &hub_pki.ca_pem, who).await);
        }
        // Interleaved, so each batch mixes senders.
        for _ in 0..15 + round * 5 {
            for (i, who) in SENDERS.iter().enumerate() {
                assert!(
                    senders[i].send(who, next[i]).await,
                    "{who} not acknowledged"
                );
                next[i] += 1;
            }
        }
        drop(senders);
        if round == 0 {
            // Restart the hub while offline (graceful stop, then a new process).
            hub.stop();
            hub = HubProc::start(&toml, mqtt, &log).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        cloud.log.got().is_empty(),
        "nothing can arrive while the cloud is down"
    );

    let up = cloud.start().await;
    let total: u64 = next.iter().sum();
    wait_for("the backlog to drain", Duration::from_secs(10), || {
        cloud.log.got().len() as u64 >= total
    })
    .await;
    let got = cloud.log.got();
    let first = got[0].at.duration_since(up);
    let last = got[got.len() - 1].at.duration_since(up);
    println!(
        "link up → first message {first:?}, all {} messages {last:?}",
        got.len()
    );
    assert!(
        first < Duration::from_millis(1000),
        "draining started {first:?} after link-up"
    );
    assert!(last < Duration::from_secs(3), "drained in {last:?}");

    let seqs = by_sender(&got);
    for (i, who) in SENDERS.iter().enumerate() {
        let expected: Vec<u64> = (0..next[i]).collect();
        assert_eq!(seqs.get(&cloud_id(who)), Some(&expected), "{who}");
    }
    assert_eq!(got.len() as u64, total, "no duplicates without faults");
    // Each message went out as its sender, with its property bag.
    for g in &got {
        match g.client.as_str() {
            "leaf1" => assert!(
                g.topic.starts_with("devices/leaf1/messages/events/"),
                "{}",
                g.topic
            ),
            c => {
                let m = c.strip_prefix("edge1/").unwrap();
                let prefix = format!("devices/edge1/modules/{m}/messages/events/");
                assert!(g.topic.starts_with(&prefix), "{}", g.topic);
                assert!(
                    g.topic.contains("%24.on=out1"),
                    "output name kept: {}",
                    g.topic
                );
            }
        }
        assert!(g.topic.contains("%24.mid="), "message id kept: {}", g.topic);
        assert!(!g.topic.contains("%24.cdid"), "{}", g.topic);
    }
    let connects = cloud.log.connects.lock().unwrap().clone();
    for id in ["edge1", "edge1/modA", "edge1/modB", "leaf1"] {
        assert!(
            connects.iter().any(|c| c == id),
            "{id} never connected: {connects:?}"
        );
    }

    // The link drops and returns: new messages flow again within ~1 s.
    cloud.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut a = sender(mqtt, &hub_pki.ca_pem, "modA").await;
    assert!(a.send("modA", next[0]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud.log.got().len() as u64, total);
    let up = cloud.start().await;
    wait_for(
        "the message sent while down",
        Duration::from_secs(5),
        || cloud.log.got().len() as u64 > total,
    )
    .await;
    let got = cloud.log.got();
    let at = got[got.len() - 1].at.duration_since(up);
    assert!(
        at < Duration::from_millis(1000),
        "sent {at:?} after link-up"
    );
    hub.stop();
}

/// A backlog drains with several batches in flight while the cloud drops
/// the connection instead of acknowledging every 37th publish: after each
/// reconnect the lost messages go out again before anything newer, so
/// every message arrives and the first occurrences are in order per sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_backlog_keeps_order_through_dropped_connections() {
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::new();
    cloud.log.drop_every.store(37, Ordering::SeqCst);
    let mqtt = free_addr();
    let (toml, _) = hub_config(&hub_pki, storage.path(), mqtt, cloud.upstream(), 7200);
    // Reconnect at once (the shortest interval allowed), so requests queued
    // before a lost connection meet the next one.
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("reconnect_ms = 200", "reconnect_ms = 10"),
    )
    .unwrap();
    let log = storage.path().join("hub.log");
    let hub = HubProc::start(&toml, mqtt, &log).await;
    const EACH: u64 = 300;
    let mut tasks = Vec::new();
    for who in SENDERS {
        let ca = hub_pki.ca_pem.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = sender(mqtt, &ca, who).await;
            for seq in 0..EACH {
                assert!(s.send(who, seq).await, "{who} {seq} not acknowledged");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cloud.start().await;
    let complete = || {
        let seqs = by_sender(&cloud.log.got());
        SENDERS.iter().all(|who| {
            seqs.get(&cloud_id(who))
                .is_some_and(|v| first_occurrences(v).len() as u64 == EACH)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seqs = by_sender(&cloud.log.got());
    for who in SENDERS {
        let got = seqs.get(&cloud_id(who)).cloned().unwrap_or_default();
        assert_eq!(
            first_occurrences(&got),
            (0..EACH).collect::<Vec<_>>(),
            "{who}: every message, first occurrences in order"
        );
    }
    let drops = cloud.log.publishes.load(Ordering::SeqCst) as usize - cloud.log.got().len();
    println!(
        "{} publishes, {drops} dropped connections, {} connects",
        cloud.log.publishes.load(Ordering::SeqCst),
        cloud.log.connects.lock().unwrap().len()
    );
    assert!(
        drops >= 10,
        "the cloud dropped too few connections: {drops}"
    );
    hub.stop();
}

/// The cloud drops the connection instead of acknowledging every 47th
/// publish, and the hub is SIGKILLed twice under load: every message the hub
/// acknowledged to its sender reaches the cloud, in order per sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_lost_pubacks_lose_nothing_acknowledged() {
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::new();
    cloud.log.drop_every.store(47, Ordering::SeqCst);
    cloud.start().await;
    let mqtt = free_addr();
    let (toml, _) = hub_config(&hub_pki, storage.path(), mqtt, cloud.upstream(), 7200);
    let log = storage.path().join("hub.log");
    let (total, hub) = kill9_under_load(&toml, mqtt, &log, &hub_pki.ca_pem, || {
        by_sender(&cloud.log.got())
    })
    .await;
    println!(
        "acknowledged {total}, cloud received {} publishes ({} dropped unacknowledged)",
        cloud.log.got().len(),
        cloud.log.publishes.load(Ordering::SeqCst) as usize - cloud.log.got().len()
    );
    hub.stop();
}

/// Two rounds of: start the hub, three senders publish as fast as the hub
/// acknowledges, SIGKILL the hub under that load. Then a last start must
/// deliver every acknowledged message (as `received` reports them), in
/// order per sender. Returns how many were acknowledged, and the hub.
async fn kill9_under_load(
    toml: &Path,
    mqtt: SocketAddr,
    log: &Path,
    hub_ca: &str,
    received: impl Fn() -> HashMap<String, Vec<u64>>,
) -> (usize, HubProc) {
    let acked: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let mut next = [0u64; 3];
    for _round in 0..2 {
        let hub = HubProc::start(toml, mqtt, log).await;
        let mut tasks = Vec::new();
        for (i, who) in SENDERS.iter().enumerate() {
            let (acked, ca, start) = (acked.clone(), hub_ca.to_owned(), next[i]);
            tasks.push(tokio::spawn(async move {
                let mut s = sender(mqtt, &ca, who).await;
                let mut seq = start;
                // Send until the hub dies under us.
                while seq < start + 2000 && s.send(who, seq).await {
                    acked
                        .lock()
                        .unwrap()
                        .entry(cloud_id(who))
                        .or_default()
                        .push(seq);
                    seq += 1;
                }
                seq
            }));
        }
        // Kill while the senders and the drain are busy.
        let base: usize = acked.lock().unwrap().values().map(Vec::len).sum();
        wait_for("load", Duration::from_secs(20), || {
            acked.lock().unwrap().values().map(Vec::len).sum::<usize>() >= base + 400
        })
        .await;
        hub.kill9();
        for (i, t) in tasks.into_iter().enumerate() {
            // A message sent but not acknowledged may or may not have been
            // stored; its number is not reused, so either way is checkable.
            next[i] = t.await.unwrap() + 1;
        }
    }
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 30, "too little load: {total}");

    // A last start drains what the killed processes left in the store.
    let hub = HubProc::start(toml, mqtt, log).await;
    let missing = || {
        let seqs = received();
        let mut missing: Vec<(String, u64)> = Vec::new();
        for (id, want) in &acked {
            let have: std::collections::HashSet<u64> = seqs
                .get(id)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            missing.extend(
                want.iter()
                    .filter(|s| !have.contains(s))
                    .map(|s| (id.clone(), *s)),
            );
        }
        missing
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = missing();
    if !lost.is_empty() {
        eprintln!("{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged but never delivered, first: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    for (id, got) in &received() {
        let firsts = first_occurrences(got);
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "{id} out of order: {firsts:?}"
        );
    }
    (total, hub)
}

/// Messages whose TTL runs out while the cloud is down are dropped and
/// counted; fresh ones still go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dropped_and_counted() {
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::new();
    let (_, cfg) = hub_config(&hub_pki, storage.path(), free_addr(), cloud.upstream(), 1);
    let hub = verge_hub::Hub::start(cfg).await.unwrap();
    let mut a = sender(hub.mqtt_addr, &hub_pki.ca_pem, "modA").await;
    for seq in 0..5 {
        assert!(a.send("modA", seq).await);
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let upstream = &hub.state.stats.upstream;
    assert!(!upstream.online.load(Ordering::Relaxed));
    assert_eq!(upstream.links().get("edge1"), Some(&false));

    cloud.start().await;
    wait_for("the link", Duration::from_secs(5), || {
        upstream.online.load(Ordering::Relaxed)
    })
    .await;
    for seq in 5..8 {
        assert!(a.send("modA", seq).await);
    }
    wait_for("the fresh messages", Duration::from_secs(5), || {
        cloud.log.got().len() >= 3
    })
    .await;
    wait_for("the expired count", Duration::from_secs(5), || {
        upstream.expired.load(Ordering::Relaxed) == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seqs = by_sender(&cloud.log.got());
    assert_eq!(seqs.get("edge1/modA"), Some(&vec![5, 6, 7]));
    assert_eq!(upstream.sent.load(Ordering::Relaxed), 3);
    assert_eq!(upstream.links().get("edge1/modA"), Some(&true));
    // The same facts in the Prometheus exposition.
    let text = reqwest::get(format!("http://{}/metrics", hub.metrics_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |name: &str, labels: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        series(
            "edgehub_messages_sent_total",
            r#"from="edge1/modA",to="upstream",from_route_output="out1",to_route_input="""#
        )
        .as_deref(),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        series("edgehub_messages_dropped_total", r#"reason="ttl_expiry""#).as_deref(),
        Some("5"),
        "{text}"
    );
    assert_eq!(
        series("verge_upstream_connected", r#"sender="edge1/modA""#).as_deref(),
        Some("1")
    );
    hub.shutdown().await;
}

/// verge-cloud's device endpoint (the real one, in-process, over TLS on a
/// fixed loopback port) as the upstream: the identities are registered in
/// its registry with the keys the hub holds, the endpoint is down while
/// modules and a leaf device send, the hub is SIGKILLed and restarted while
/// offline, then the endpoint comes back and its D2C log must hold every
/// message, stamped with its sender's identity, in order per sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verge_cloud_receives_every_sender_as_itself() {
    let vc = VergeCloud::new().await;
    let (cloud, cloud_addr) = (vc.state.clone(), vc.addr);
    let start_endpoint = || vc.start();
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let ca = vc.ca.clone();
    let (toml, _) = hub_config(
        &hub_pki,
        storage.path(),
        mqtt,
        (cloud_addr.port(), &ca),
        7200,
    );
    let log = storage.path().join("hub.log");

    // Offline: send, SIGKILL the hub, restart it, send more.
    let mut next = [0u64; 3];
    let mut running = None;
    for round in 0..2 {
        let hub = HubProc::start(&toml, mqtt, &log).await;
        let mut senders = Vec::new();
        for who in SENDERS {
            senders.push(sender(mqtt, &hub_pki.ca_pem, who).await);
        }
        for _ in 0..12 {
            for (i, who) in SENDERS.iter().enumerate() {
                assert!(
                    senders[i].send(who, next[i]).await,
                    "{who} not acknowledged"
                );
                next[i] += 1;
            }
        }
        drop(senders);
        if round == 0 {
            hub.kill9();
        } else {
            running = Some(hub);
        }
    }
    assert_eq!(
        cloud.d2c_tail(),
        0,
        "nothing can arrive while the endpoint is down"
    );

    let (endpoint, up) = start_endpoint().await;
    let total: u64 = next.iter().sum();
    let d2c = || cloud.read_d2c(0, 100_000).unwrap();
    wait_for(
        "the backlog in the D2C log",
        Duration::from_secs(15),
        || d2c().len() as u64 >= total,
    )
    .await;
    println!(
        "verge-cloud: all {total} messages {:?} after the endpoint came up",
        up.elapsed()
    );
    assert!(
        up.elapsed() < Duration::from_secs(2),
        "backlog drained in {:?}",
        up.elapsed()
    );
    let entries = d2c();
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &entries {
        let s = &e.message.system;
        let id = match &s.connection_module_id {
            Some(m) => format!("{}/{m}", s.connection_device_id.as_deref().unwrap()),
            None => s.connection_device_id.clone().unwrap(),
        };
        let seq: u64 = e.message.properties.get("seq").unwrap().parse().unwrap();
        let who = id.rsplit('/').next().unwrap().to_owned();
        assert_eq!(
            s.message_id.as_deref(),
            Some(format!("{who}-{seq}").as_str())
        );
        if s.connection_module_id.is_some() {
            assert_eq!(s.output_name.as_deref(), Some("out1"), "output name kept");
        }
        assert_eq!(e.message.body.as_ref(), format!("{who}:{seq}").as_bytes());
        seqs.entry(id).or_default().push(seq);
    }
    for (i, who) in SENDERS.iter().enumerate() {
        let expected: Vec<u64> = (0..next[i]).collect();
        assert_eq!(seqs.get(&cloud_id(who)), Some(&expected), "{who}");
    }
    assert_eq!(entries.len() as u64, total, "no duplicates without faults");

    // Down and up again while the hub runs: a new message goes out within ~1 s.
    endpoint.abort();
    let _ = endpoint.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut a = sender(mqtt, &hub_pki.ca_pem, "modA").await;
    assert!(a.send("modA", next[0]).await);
    let (endpoint, up) = start_endpoint().await;
    wait_for(
        "the message sent while down",
        Duration::from_secs(5),
        || d2c().len() as u64 > total,
    )
    .await;
    let at = up.elapsed();
    assert!(
        at < Duration::from_millis(1500),
        "delivered {at:?} after link-up"
    );
    endpoint.abort();
    if let Some(hub) = running {
        hub.stop();
    }
}

/// Messages stored for a module that is no longer configured (so the hub has
/// no credentials to send them as it) are dropped and counted instead of
/// holding back everyone else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_a_removed_identity_do_not_block_the_queue() {
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::new();
    let mqtt = free_addr();
    let (toml, _) = hub_config(&hub_pki, storage.path(), mqtt, cloud.upstream(), 7200);
    let log = storage.path().join("hub.log");

    let hub = HubProc::start(&toml, mqtt, &log).await;
    let mut a = sender(mqtt, &hub_pki.ca_pem, "modA").await;
    let mut b = sender(mqtt, &hub_pki.ca_pem, "modB").await;
    for seq in 0..5 {
        assert!(b.send("modB", seq).await);
        assert!(a.send("modA", seq).await);
    }
    drop((a, b));
    hub.stop();

    // modB leaves the configuration; the hub restarts (in-process, to read its counters).
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("modB = \"gen-b\"\n"));
    let cfg =
        verge_hub::config::Config::from_toml(&text.replace("modB = \"gen-b\"\n", "")).unwrap();
    let hub = verge_hub::Hub::start(cfg).await.unwrap();
    cloud.start().await;
    wait_for("modA's messages", Duration::from_secs(10), || {
        cloud.log.got().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seqs = by_sender(&cloud.log.got());
    assert_eq!(seqs.get("edge1/modA"), Some(&(0..5).collect::<Vec<u64>>()));
    assert!(!seqs.contains_key("edge1/modB"));
    let up = &hub.state.stats.upstream;
    assert_eq!(up.dropped_no_identity.load(Ordering::Relaxed), 5);
    assert_eq!(up.sent.load(Ordering::Relaxed), 5);
    hub.shutdown().await;
}

/// verge-cloud's real device endpoint and state, in-process, with edge1, its
/// modules modA/modB and leaf1 registered under the keys the hub holds. The
/// endpoint listens on a fixed loopback port and can be stopped and started.
struct VergeCloud {
    _dir: tempfile::TempDir,
    state: verge_cloud::CloudState,
    backend: Arc<verge_cloud::device::CloudBackend>,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    ca: PathBuf,
}

impl VergeCloud {
    async fn new() -> VergeCloud {
        use verge_cloud::{device, tls};

        let LocalCloud {
            dir,
            files,
            state: cloud,
            backend,
        } = local_cloud().await;
        let mqtt_tls = device::mqtt_tls(&tls::server_config(&files).unwrap());
        VergeCloud {
            ca: files.ca.clone().unwrap(),
            _dir: dir,
            state: cloud,
            backend,
            tls: mqtt_tls,
            addr: free_addr(),
        }
    }

    /// Starts the AMQPS device endpoint on `addr`; aborting the task closes
    /// it and every connection.
    async fn start_amqps(&self, addr: SocketAddr) -> JoinHandle<()> {
        let listener = TcpListener::bind(addr).await.unwrap();
        serve_devices(listener, self.tls.clone(), self.backend.clone(), true)
    }

    /// Starts the device endpoint; aborting the task closes it and every connection.
    async fn start(&self) -> (JoinHandle<()>, Instant) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let task = serve_devices(listener, self.tls.clone(), self.backend.clone(), false);
        (task, Instant::now())
    }

    /// The `seq` of each D2C message by sender, as the cloud stamped it.
    fn received(&self) -> HashMap<String, Vec<u64>> {
        d2c_seqs(&self.state)
    }
}

/// kill -9 of the hub under load, with verge-cloud as the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verge_cloud_kill9_under_load_loses_nothing_acknowledged() {
    verge_cloud_kill9(false).await;
}

/// The same over AMQP (one connection for the three senders): nothing
/// acknowledged is lost, order per sender holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verge_cloud_over_amqp_kill9_under_load_loses_nothing_acknowledged() {
    verge_cloud_kill9(true).await;
}

async fn verge_cloud_kill9(amqp: bool) {
    let vc = VergeCloud::new().await;
    let amqps = free_addr();
    let endpoint = if amqp {
        vc.start_amqps(amqps).await
    } else {
        vc.start().await.0
    };
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let (toml, _) = hub_config(
        &hub_pki,
        storage.path(),
        mqtt,
        (vc.addr.port(), &vc.ca),
        7200,
    );
    if amqp {
        let mut text = std::fs::read_to_string(&toml).unwrap();
        text.push_str(&format!(
            "protocol = \"Amqp\"\namqp_port = {}\n",
            amqps.port()
        ));
        std::fs::write(&toml, text).unwrap();
    }
    let log = storage.path().join("hub.log");
    let (total, hub) = kill9_under_load(&toml, mqtt, &log, &hub_pki.ca_pem, || vc.received()).await;
    println!(
        "verge-cloud (AMQP {amqp}): acknowledged {total}, D2C log {}",
        vc.state.d2c_tail()
    );
    assert_eq!(
        hub.log().contains("upstream AMQP connection open"),
        amqp,
        "{}",
        tail(&hub.log(), 40)
    );
    hub.stop();
    endpoint.abort();
}

/// A message whose property bag, encoded for the upstream link, no longer
/// fits an MQTT topic (the hub stamps a message id the device did not send,
/// taking a 65,5xx-byte topic past 65,535 bytes) cannot be sent at all: it is
/// dropped and counted once, and the checkpoint moves past it, so the good
/// messages of another sender behind it reach the cloud exactly once (not
/// again every reconnect interval), and so do its own sender's later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_message_is_dropped_once_and_does_not_hold_back_others() {
    let vc = VergeCloud::new().await;
    let (endpoint, _) = vc.start().await;
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let (_, cfg) = hub_config(
        &hub_pki,
        storage.path(),
        mqtt,
        (vc.addr.port(), &vc.ca),
        7200,
    );
    let hub = verge_hub::Hub::start(cfg).await.unwrap();
    let mut a = sender(mqtt, &hub_pki.ca_pem, "modA").await;
    let mut b = sender(mqtt, &hub_pki.ca_pem, "modB").await;
    // Wait for the edge device's link, so the poison is read with the rest
    // of a live drain (not only after a reconnect).
    wait_for("the upstream link", Duration::from_secs(10), || {
        hub.state.stats.upstream.online.load(Ordering::Relaxed)
    })
    .await;

    // modA's poison, as a store written before ingest refused such messages
    // holds it (ingest now refuses a message whose topic could not be
    // encoded): a property bag too big for any MQTT topic, queued for
    // `$upstream` ahead of everything else.
    {
        use verge_core::message::{Message, MessageKind, Properties, SystemProperties};
        let mut properties = Properties::new();
        properties.insert("seq", "999".to_owned());
        properties.insert("big", "a".repeat(65_600));
        let poison = Message {
            kind: MessageKind::Telemetry,
            body: bytes::Bytes::from_static(b"poison"),
            system: SystemProperties {
                connection_device_id: Some(DEVICE.into()),
                connection_module_id: Some("modA".into()),
                ..Default::default()
            },
            properties,
        };
        hub.state
            .store
            .append(&poison, &[verge_store::Target::new("$upstream")])
            .await
            .unwrap();
    }
    for seq in 0..5 {
        assert!(b.send("modB", seq).await);
    }
    assert!(a.send("modA", 0).await);
    wait_for("the good messages", Duration::from_secs(10), || {
        let got = vc.received();
        got.get("edge1/modB").map_or(0, Vec::len) >= 5 && got.contains_key("edge1/modA")
    })
    .await;
    // Long enough for several reconnect intervals (200 ms) of resends.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = vc.received();
    assert_eq!(got.get("edge1/modB"), Some(&(0..5).collect::<Vec<u64>>()));
    assert_eq!(
        got.get("edge1/modA"),
        Some(&vec![0]),
        "the poison never arrives"
    );
    let up = &hub.state.stats.upstream;
    assert_eq!(up.dropped_unsendable.load(Ordering::Relaxed), 1);
    assert_eq!(up.sent.load(Ordering::Relaxed), 6);
    // Settled: nothing of `$upstream` is left unacknowledged in the store.
    let depth: u64 = hub
        .state
        .store
        .queues()
        .await
        .unwrap()
        .iter()
        .filter(|q| q.endpoint == "$upstream")
        .map(|q| q.depth)
        .sum();
    assert_eq!(depth, 0, "the checkpoint moved past the poison");
    drop((a, b));
    hub.shutdown().await;
    endpoint.abort();
}

/// One sender the cloud refuses (its identity does not exist there) holds
/// back only itself: the other sender's messages, queued behind the refused
/// one's, arrive promptly, in order and once; the refused one's wait, held
/// and counted, shown as `refused` in the stats and in the `$edgeHub`
/// reported properties, and go out in order once the cloud accepts the
/// identity again (the link retries with back-off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_sender_waits_while_the_others_pass() {
    let vc = VergeCloud::new().await;
    vc.state.delete_module(DEVICE, "modB", None).await.unwrap();
    let (endpoint, _) = vc.start().await;
    let hub_pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mqtt = free_addr();
    let (_, cfg) = hub_config(
        &hub_pki,
        storage.path(),
        mqtt,
        (vc.addr.port(), &vc.ca),
        7200,
    );
    let hub = verge_hub::Hub::start(cfg).await.unwrap();
    let up = &hub.state.stats.upstream;
    wait_for("the upstream link", Duration::from_secs(10), || {
        up.online.load(Ordering::Relaxed)
    })
    .await;
    let mut a = sender(mqtt, &hub_pki.ca_pem, "modA").await;
    let mut b = sender(mqtt, &hub_pki.ca_pem, "modB").await;
    // modB's messages first in the queue, then modA's behind them.
    for seq in 0..5 {
        assert!(b.send("modB", seq).await);
    }
    let sent_at = Instant::now();
    for seq in 0..10 {
        assert!(a.send("modA", seq).await);
    }
    wait_for("modA's messages", Duration::from_secs(10), || {
        vc.received().get("edge1/modA").map_or(0, Vec::len) >= 10
    })
    .await;
    let took = sent_at.elapsed();
    println!("modA's 10 messages past the refused modB in {took:?}");
    assert!(took < Duration::from_secs(3), "modA held back {took:?}");

    // modB: refused, its messages waiting and visible.
    wait_for("modB's state", Duration::from_secs(5), || {
        up.senders()
            .get("edge1/modB")
            .is_some_and(|s| s.status == "refused" && s.waiting == 5)
    })
    .await;
    assert_eq!(up.held.load(Ordering::Relaxed), 5);
    let twin_id = format!("{DEVICE}/$edgeHub");
    wait_for(
        "upstream.senders on $edgeHub",
        Duration::from_secs(5),
        || {
            let twin = hub.state.twins.client_json(&twin_id);
            let s = twin.pointer("/reported/upstream/senders/edge1~1modB");
            s.and_then(|s| s.get("status")).and_then(|v| v.as_str()) == Some("refused")
                && s.and_then(|s| s.get("waiting")).and_then(|v| v.as_u64()) == Some(5)
        },
    )
    .await;
    let got = vc.received();
    assert_eq!(got.get("edge1/modA"), Some(&(0..10).collect::<Vec<u64>>()));
    assert!(!got.contains_key("edge1/modB"));
    // The store keeps everything from modB's first message on.
    let depth = || async {
        hub.state
            .store
            .queues()
            .await
            .unwrap()
            .iter()
            .filter(|q| q.endpoint == "$upstream")
            .map(|q| q.depth)
            .sum::<u64>()
    };
    assert_eq!(depth().await, 15, "checkpoint stays before modB's messages");

    // modA keeps flowing while modB is refused.
    for seq in 10..15 {
        assert!(a.send("modA", seq).await);
    }
    wait_for("modA's later messages", Duration::from_secs(5), || {
        vc.received().get("edge1/modA").map_or(0, Vec::len) >= 15
    })
    .await;

    // The cloud gets modB again: its messages go out, in order, once.
    let keys = verge_cloud::registry::SymmetricKeys {
        primary: module_key("modB").to_base64(),
        secondary: SharedAccessKey::from_bytes(vec![9u8; 32]).to_base64(),
    };
    let spec = verge_cloud::ModuleSpec {
        keys: Some(keys),
        ..verge_cloud::ModuleSpec::default()
    };
    vc.state
        .put_module(DEVICE, "modB", spec, None)
        .await
        .unwrap();
    assert!(b.send("modB", 5).await);
    wait_for("modB's messages", Duration::from_secs(20), || {
        vc.received().get("edge1/modB").map_or(0, Vec::len) >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = vc.received();
    assert_eq!(got.get("edge1/modB"), Some(&(0..6).collect::<Vec<u64>>()));
    assert_eq!(got.get("edge1/modA"), Some(&(0..15).collect::<Vec<u64>>()));
    assert_eq!(up.sent.load(Ordering::Relaxed), 21);
    wait_for(
        "the checkpoint past everything",
        Duration::from_secs(5),
        || {
            up.senders()
                .get("edge1/modB")
                .is_some_and(|s| s.status == "connected" && s.waiting == 0)
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while depth().await != 0 {
        assert!(Instant::now() < deadline, "the checkpoint did not move");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((a, b));
    hub.shutdown().await;
    endpoint.abort();
}

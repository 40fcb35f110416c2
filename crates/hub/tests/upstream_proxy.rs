//! The upstream over MQTT-over-WebSocket through a real HTTP proxy
//! (Debian's `tinyproxy`), where the direct route to the cloud is closed.
//!
//! Topology: verge-cloud (in-process: service API and `/$iothub/websocket`
//! on one TLS port) listens on 127.0.0.1 in the test's network namespace.
//! The `verge-hub` binary runs in a network namespace of its own, joined to
//! ours by a veth pair (10.231.x.1 here, 10.231.x.2 there): its 127.0.0.1 is
//! its own loopback, so the cloud cannot be reached directly (the test
//! checks that), only through tinyproxy listening on 10.231.x.1. Needs root
//! (network namespaces), as CI runs the suite.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use verge_core::{ClientId, SasToken, SharedAccessKey};

async fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_until(what, limit, Duration::from_millis(50), f).await;
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

/// A network namespace linked to ours by a veth pair; removed on drop.
struct Netns {
    name: String,
    /// Our end's address (where the proxy listens).
    outer: String,
    /// The namespace's address (where the hub listens).
    inner: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let k = N.fetch_add(1, Ordering::Relaxed);
        let tag = (std::process::id() % 10_000) * 4 + k;
        let name = format!("vrgup{tag}");
        let x = tag % 250 + 1;
        let (outer, inner) = (format!("10.231.{x}.1"), format!("10.231.{x}.2"));
        let (va, vb) = (format!("vu{tag}a"), format!("vu{tag}b"));
        // Leftovers of a killed run with the same tag.
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            outer: outer.clone(),
            inner: inner.clone(),
        };
        run(
            "ip",
            &["link", "add", &va, "type", "veth", "peer", "name", &vb],
        );
        run("ip", &["link", "set", &vb, "netns", &name]);
        run("ip", &["addr", "add", &format!("{outer}/30"), "dev", &va]);
        run("ip", &["link", "set", &va, "up"]);
        run(
            "ip",
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{inner}/30"),
                "dev",
                &vb,
            ],
        );
        run("ip", &["-n", &name, "link", "set", &vb, "up"]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    /// Whether a TCP connection to `addr` from inside the namespace succeeds.
    fn can_connect(&self, addr: SocketAddr) -> bool {
        let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", &script])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// tinyproxy in the foreground on `listen:port`, allowing CONNECT to
/// `connect_port` only; killed on drop.
struct Tinyproxy {
    child: Child,
    conf: PathBuf,
}

impl Tinyproxy {
    fn start(
        dir: &Path,
        listen: &str,
        port: u16,
        connect_port: u16,
        auth: Option<(&str, &str)>,
    ) -> Tinyproxy {
        let conf = dir.join("tinyproxy.conf");
        let mut text = format!(
            "Port {port}\nListen {listen}\nTimeout 60\nMaxClients 50\nAllow 10.231.0.0/16\n\
             ConnectPort {connect_port}\nLogLevel Info\nDisableViaHeader Yes\n"
        );
        if let Some((u, p)) = auth {
            text.push_str(&format!("BasicAuth {u} {p}\n"));
        }
        std::fs::write(&conf, text).unwrap();
        Self::spawn(conf)
    }

    fn spawn(conf: PathBuf) -> Tinyproxy {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(conf.with_extension("log"))
            .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tinyproxy (apt-get install tinyproxy; scripts/test.sh installs it)");
        Tinyproxy { child, conf }
    }

    async fn wait_listening(&self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// verge-cloud in-process: the service API with MQTT over WebSocket on one
/// TLS port (as IoT Hub's 443) on 127.0.0.1; edge1, modA, modB and leaf1
/// registered with the keys the hub holds.
struct VergeCloud {
    _dir: tempfile::TempDir,
    state: verge_cloud::CloudState,
    addr: SocketAddr,
    ca: PathBuf,
    stop: verge_listen::CancellationToken,
}

impl VergeCloud {
    async fn start() -> VergeCloud {
        use verge_cloud::api::{ApiState, ServiceAuth};
        use verge_cloud::tls;

        let LocalCloud {
            dir,
            files,
            state: cloud,
            backend,
        } = local_cloud().await;
        let tls_cfg = tls::server_config(&files).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = verge_listen::CancellationToken::new();
        let auth = ServiceAuth::new(
            HUB.to_owned(),
            "iothubowner".to_owned(),
            SharedAccessKey::from_bytes(vec![7u8; 32]),
        );
        let app = verge_cloud::api::router(ApiState {
            cloud: cloud.clone(),
            auth: Arc::new(auth),
        })
        .merge(verge_cloud::ws::router(backend, stop.clone()));
        tokio::spawn(verge_cloud::api::serve_app(
            listener,
            tls_cfg,
            app,
            stop.clone().cancelled_owned(),
            verge_cloud::api::listen_limits(),
            verge_listen::http::Timeouts::default(),
        ));
        VergeCloud {
            ca: files.ca.clone().unwrap(),
            _dir: dir,
            state: cloud,
            addr,
            stop,
        }
    }

    fn connected(&self, id: &str) -> bool {
        self.state.is_connected(&ClientId::parse(id).unwrap())
    }

    /// The `seq` property of leaf1's D2C messages, in the cloud's order.
    fn leaf_seqs(&self) -> Vec<u64> {
        self.state
            .read_d2c(0, 1_000_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.message.system.connection_device_id.as_deref() == Some("leaf1"))
            .map(|e| e.message.properties.get("seq").unwrap().parse().unwrap())
            .collect()
    }
}

impl Drop for VergeCloud {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The hub binary inside the namespace (`ip netns exec` execs the hub, so
/// the child is the hub itself).
async fn start_hub(
    ns: &Netns,
    toml: &Path,
    mqtt: SocketAddr,
    log: &Path,
    proxy: &str,
    protocol: &str,
) -> HubProc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_verge-hub"))
        .arg("--config")
        .arg(toml)
        // Overrides the file's `protocol = "Mqtt"`.
        .env("UpstreamProtocol", protocol)
        .env("https_proxy", proxy)
        .env_remove("HTTPS_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY");
    HubProc::spawn(&mut cmd, mqtt, log).await
}

/// One test: the namespace, verge-cloud, the proxy, the hub.
struct World {
    ns: Netns,
    cloud: VergeCloud,
    pki: Pki,
    _storage: tempfile::TempDir,
    toml: PathBuf,
    mqtt: SocketAddr,
    log: PathBuf,
    proxy_addr: SocketAddr,
}

impl World {
    async fn new() -> World {
        let ns = Netns::new();
        let cloud = VergeCloud::start().await;
        let pki = pki();
        let storage = tempfile::tempdir().unwrap();
        // A fresh namespace: any port is free there.
        let mqtt: SocketAddr = format!("{}:18883", ns.inner).parse().unwrap();
        let https = format!("{}:18443", ns.inner);
        config(&pki, storage.path(), &mqtt.to_string(), &https);
        let toml = pki.dir.path().join("hub.toml");
        let mut text = std::fs::read_to_string(&toml).unwrap();
        // `port` (MQTT/TLS) is left at a port nothing listens on: only the
        // WebSocket on https_port carries the upstream.
        text.push_str(&format!(
            "[upstream]\nhostname = \"localhost\"\nport = 1\nhttps_port = {}\nca_file = \"{}\"\n\
             reconnect_ms = 200\nbatch_size = 10\nkeep_alive_secs = 10\nack_timeout_secs = 5\n\
             protocol = \"Mqtt\"\n",
            cloud.addr.port(),
            cloud.ca.display()
        ));
        std::fs::write(&toml, &text).unwrap();
        let proxy_addr: SocketAddr = format!(
            "{}:{}",
            ns.outer,
            verge_testkit::net::free_port_on(ns.outer.parse().unwrap())
        )
        .parse()
        .unwrap();
        let log = storage.path().join("hub.log");
        World {
            ns,
            cloud,
            pki,
            _storage: storage,
            toml,
            mqtt,
            log,
            proxy_addr,
        }
    }

    fn proxy(&self, auth: Option<(&str, &str)>) -> Tinyproxy {
        Tinyproxy::start(
            self.pki.dir.path(),
            &self.ns.outer,
            self.proxy_addr.port(),
            self.cloud.addr.port(),
            auth,
        )
    }

    async fn hub(&self, proxy_url: &str, protocol: &str) -> HubProc {
        start_hub(
            &self.ns, &self.toml, self.mqtt, &self.log, proxy_url, protocol,
        )
        .await
    }
}

fn leaf_token() -> String {
    let key = SharedAccessKey::from_base64(LEAF_KEY).unwrap();
    SasToken::sign(&format!("{HUB}/devices/leaf1"), &key, now() + 3600, None).to_string()
}

async fn leaf(mqtt: SocketAddr, ca: &str) -> Raw {
    let (raw, ack) = Raw::connect(mqtt, ca, "leaf1", &username("leaf1"), &leaf_token(), true).await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    raw
}

fn seq_topic(seq: u64) -> String {
    format!("devices/leaf1/messages/events/seq={seq}")
}

/// Telemetry, reported properties and a cloud→module method all go
/// through the proxy; the proxy killed mid-drain loses nothing the hub
/// acknowledged, and the backlog drains, in order, once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_ws_upstream_through_a_proxy_where_the_direct_route_is_closed() {
    through_a_proxy("mqttws", "MQTT_WS").await;
}

/// The same with `AmqpWs`: one AMQP connection over WebSocket (subprotocol
/// `AMQPWSB10`) carries every identity through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_ws_upstream_through_a_proxy_where_the_direct_route_is_closed() {
    through_a_proxy("AmqpWs", "AMQP_WS").await;
}

/// `protocol` as the hub is given it; `shown`: how verge-cloud then shows
/// the identities' connections.
async fn through_a_proxy(protocol: &str, shown: &str) {
    let w = World::new().await;
    // The direct route is closed from the hub's namespace, open from ours.
    assert!(
        !w.ns.can_connect(w.cloud.addr),
        "the cloud must not be directly reachable"
    );
    assert!(TcpStream::connect(w.cloud.addr).await.is_ok());

    let mut proxy = w.proxy(None);
    proxy.wait_listening(w.proxy_addr).await;
    let hub = w.hub(&format!("http://{}", w.proxy_addr), protocol).await;
    wait_for(
        "the edge's link through the proxy",
        Duration::from_secs(20),
        || w.cloud.connected(DEVICE),
    )
    .await;
    let log = hub.log();
    assert!(log.contains("wss://localhost:"), "{log}");
    assert!(
        log.contains(&format!("via proxy http://{}", w.proxy_addr)),
        "{log}"
    );

    // Telemetry.
    let mut l = leaf(w.mqtt, &w.pki.ca_pem).await;
    let mut pkid = 1u16;
    let mut acked = Vec::new();
    for seq in 0..50 {
        publish_qos1(&mut l, &seq_topic(seq), b"x", pkid).await;
        acked.push(seq);
        pkid += 1;
    }
    wait_for("50 messages in the cloud", Duration::from_secs(20), || {
        w.cloud.leaf_seqs().len() >= 50
    })
    .await;

    // Reported properties and a method, on modA's link through the proxy.
    let (mut a, _) = connect_module(w.mqtt, &w.pki.ca_pem, "modA", true).await;
    for f in ["$iothub/methods/POST/#", "$iothub/twin/res/#"] {
        assert!(matches!(
            subscribe1(&mut a, f).await,
            SubscribeReasonCode::Success(_)
        ));
    }
    a.send(Packet::Publish(Publish::new(
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        QoS::AtMostOnce,
        br#"{"via":"proxy"}"#.to_vec(),
    )))
    .await;
    let mod_a = ClientId::parse(&format!("{DEVICE}/modA")).unwrap();
    wait_for(
        "modA's reported patch in the cloud",
        Duration::from_secs(20),
        || {
            w.cloud
                .state
                .get_twin(&mod_a)
                .unwrap()
                .twin
                .reported
                .properties
                .get("via")
                == Some(&json!("proxy"))
        },
    )
    .await;
    wait_for("modA's link", Duration::from_secs(20), || {
        w.cloud.connected(&mod_a.to_string())
    })
    .await;
    let cloud = w.cloud.state.clone();
    let call = {
        let mod_a = mod_a.clone();
        tokio::spawn(async move {
            cloud
                .invoke_method(
                    &mod_a,
                    "ping",
                    json!({"n": 1}),
                    Duration::from_secs(15),
                    Duration::from_secs(0),
                )
                .await
        })
    };
    let rid = loop {
        let p = next_pub(&mut a).await;
        let t = String::from_utf8(p.topic.to_vec()).unwrap();
        if let Some(rid) = t.strip_prefix("$iothub/methods/POST/ping/?$rid=") {
            let body: Value = serde_json::from_slice(&p.payload).unwrap();
            assert_eq!(body, json!({"n": 1}));
            break rid.to_owned();
        }
    };
    a.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        br#"{"pong":true}"#.to_vec(),
    )))
    .await;
    let r = call.await.unwrap().unwrap();
    assert_eq!((r.status, r.payload), (200, json!({"pong": true})));
    for id in ["leaf1", &mod_a.to_string()] {
        let json = match id.split_once('/') {
            Some((d, m)) => w.cloud.state.get_module(d, m).unwrap().to_json(),
            None => w.cloud.state.get_device(id).unwrap().to_json(),
        };
        assert_eq!(json["connectionProtocol"], shown, "{id}");
    }

    // The proxy dies mid-drain (the leaf sending all along), then more is
    // sent while the only route is gone.
    let sender = tokio::spawn(async move {
        for seq in 50..200u64 {
            publish_qos1(&mut l, &seq_topic(seq), b"y", pkid).await;
            acked.push(seq);
            pkid += 1;
            if seq % 25 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        (l, pkid, acked)
    });
    tokio::time::sleep(Duration::from_millis(60)).await;
    proxy.kill();
    let (mut l, mut pkid, mut acked) = sender.await.unwrap();
    wait_for("the edge's link down", Duration::from_secs(30), || {
        !w.cloud.connected(DEVICE)
    })
    .await;
    for seq in 200..300u64 {
        publish_qos1(&mut l, &seq_topic(seq), b"z", pkid).await;
        acked.push(seq);
        pkid += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = w.cloud.leaf_seqs();
    assert!(
        !during.iter().any(|s| *s >= 200),
        "nothing passes while the proxy is down"
    );
    let _proxy = Tinyproxy::spawn(proxy.conf.clone());
    wait_for(
        "every acknowledged message in the cloud",
        Duration::from_secs(40),
        || {
            let got = w.cloud.leaf_seqs();
            acked.iter().all(|s| got.contains(s))
        },
    )
    .await;
    // In order: the first occurrence of each seq (a resend may repeat some).
    let got = w.cloud.leaf_seqs();
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<u64> = got.into_iter().filter(|s| seen.insert(*s)).collect();
    assert_eq!(firsts, acked, "per-sender order kept through the outage");
    drop(hub);
}

/// A proxy that wants credentials: a wrong password in `https_proxy` is
/// logged as the proxy refusing the credentials (not as a cloud outage),
/// nothing reaches the cloud; the right one connects (with `AmqpWs`: the
/// one AMQP connection goes through the proxy too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_wrong_password_is_a_clear_error() {
    let w = World::new().await;
    let proxy = w.proxy(Some(("edge", "right-pass")));
    proxy.wait_listening(w.proxy_addr).await;
    let hub = w
        .hub(
            &format!("http://edge:wrong-pass@{}", w.proxy_addr),
            "MqttWs",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hub
        .log()
        .contains("refused the credentials in the proxy URL (")
    {
        assert!(
            Instant::now() < deadline,
            "no clear refusal in the hub's log:\n{}",
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = hub.log();
    assert!(
        !log.contains("wrong-pass"),
        "the password must not be logged: {log}"
    );
    assert!(!w.cloud.connected(DEVICE));
    drop(hub);

    // The right password, with AmqpWs (edgeHub's default's WebSocket form).
    let hub = w
        .hub(
            &format!("http://edge:right-pass@{}", w.proxy_addr),
            "AmqpWs",
        )
        .await;
    wait_for(
        "the edge's link with the right password",
        Duration::from_secs(20),
        || w.cloud.connected(DEVICE),
    )
    .await;
    let log = hub.log();
    assert!(log.contains("upstream AMQP connection open"), "{log}");
    assert_eq!(
        w.cloud.state.get_device(DEVICE).unwrap().to_json()["connectionProtocol"],
        "AMQP_WS"
    );
}

//! The rest of the upstream, end to end against verge-cloud's real device
//! endpoint and state (in-process, TLS on loopback) with the `verge-hub`
//! binary in between: desired patches (live and, after an outage, as one
//! diff), reported patches queued offline (in order, across a hub restart),
//! direct methods from the cloud to a module behind the edge (answered, or
//! 404 when it is not connected), and C2D to a leaf device (completed in the
//! cloud only after the leaf's PUBACK).
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish, SubscribeReasonCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use verge_core::{ClientId, SasToken, SharedAccessKey};
use verge_testkit::net::free_addr;

async fn wait_for(what: &str, limit: Duration, f: impl FnMut() -> bool) {
    wait_until(what, limit, Duration::from_millis(20), f).await;
}

/// verge-cloud in-process: edge1, modA, modB and leaf1 registered with the
/// keys the hub holds; the device endpoint can be stopped and started.
struct VergeCloud {
    _dir: tempfile::TempDir,
    state: verge_cloud::CloudState,
    backend: Arc<verge_cloud::device::CloudBackend>,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    /// The AMQPS device endpoint (started with the MQTT one).
    amqps: SocketAddr,
    ca: PathBuf,
    endpoints: Vec<JoinHandle<()>>,
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
            amqps: free_addr(),
            endpoints: Vec::new(),
        }
    }

    async fn start(&mut self) {
        for (addr, amqp) in [(self.addr, false), (self.amqps, true)] {
            let listener = TcpListener::bind(addr).await.unwrap();
            let (tls, backend) = (self.tls.clone(), self.backend.clone());
            self.endpoints
                .push(serve_devices(listener, tls, backend, amqp));
        }
    }

    /// Closes the endpoints and every connection (the cloud's state stays).
    async fn stop(&mut self) {
        for t in self.endpoints.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    fn connected(&self, id: &str) -> bool {
        self.state.is_connected(&ClientId::parse(id).unwrap())
    }

    async fn set_desired(&self, id: &str, desired: Value) {
        self.state
            .update_twin(
                &ClientId::parse(id).unwrap(),
                json!({ "properties": { "desired": desired } }),
                None,
            )
            .await
            .unwrap();
    }

    /// How `id` last connected, as verge-cloud shows it (`connectionProtocol`).
    fn protocol(&self, id: &str) -> Value {
        let json = match id.split_once('/') {
            Some((d, m)) => self.state.get_module(d, m).unwrap().to_json(),
            None => self.state.get_device(id).unwrap().to_json(),
        };
        json["connectionProtocol"].clone()
    }

    /// `id` reached the cloud over `up`.
    fn assert_carried(&self, id: &str, up: Up) {
        let want = match up {
            Up::Mqtt => "MQTT",
            Up::Amqp => "AMQP",
        };
        assert_eq!(self.protocol(id), json!(want), "{id}");
    }

    fn twin(&self, id: &str) -> verge_core::twin::Twin {
        self.state
            .get_twin(&ClientId::parse(id).unwrap())
            .unwrap()
            .twin
    }
}

impl Drop for VergeCloud {
    fn drop(&mut self) {
        for t in &self.endpoints {
            t.abort();
        }
    }
}

/// The hub's upstream protocol in a test.
#[derive(Clone, Copy, Debug)]
enum Up {
    Mqtt,
    /// One AMQP connection for every identity.
    Amqp,
}

/// A hub config with an `[upstream]` table pointing at `cloud` over `up`,
/// and AMQPS on `amqps`.
fn hub_config(
    pki: &Pki,
    storage: &Path,
    (mqtt, amqps): (SocketAddr, SocketAddr),
    cloud: &VergeCloud,
    up: Up,
) -> PathBuf {
    config(pki, storage, &mqtt.to_string(), &free_addr().to_string());
    let path = pki.dir.path().join("hub.toml");
    let mut text = std::fs::read_to_string(&path).unwrap().replacen(
        "[listen]\n",
        &format!("[listen]\namqps = \"{amqps}\"\n"),
        1,
    );
    text.push_str(&format!(
        "[upstream]\nhostname = \"localhost\"\nport = {}\nca_file = \"{}\"\nreconnect_ms = 200\nbatch_size = 10\nkeep_alive_secs = 10\nack_timeout_secs = 5\n",
        cloud.addr.port(),
        cloud.ca.display()
    ));
    if let Up::Amqp = up {
        text.push_str(&format!(
            "protocol = \"Amqp\"\namqp_port = {}\n",
            cloud.amqps.port()
        ));
    }
    std::fs::write(&path, &text).unwrap();
    path
}

/// One test's world: verge-cloud, the hub binary between, a storage dir.
struct World {
    cloud: VergeCloud,
    pki: Pki,
    storage: tempfile::TempDir,
    toml: PathBuf,
    mqtt: SocketAddr,
    amqps: SocketAddr,
    log: PathBuf,
}

impl World {
    async fn new() -> World {
        Self::over(Up::Mqtt).await
    }

    async fn over(up: Up) -> World {
        let cloud = VergeCloud::new().await;
        let pki = pki();
        let storage = tempfile::tempdir().unwrap();
        let (mqtt, amqps) = (free_addr(), free_addr());
        let toml = hub_config(&pki, storage.path(), (mqtt, amqps), &cloud, up);
        let log = storage.path().join("hub.log");
        World {
            cloud,
            pki,
            storage,
            toml,
            mqtt,
            amqps,
            log,
        }
    }

    async fn hub(&self) -> HubProc {
        HubProc::start(&self.toml, self.mqtt, &self.log).await
    }

    fn hub_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Module `m` connected (persistent session) and subscribed to `filters`.
    async fn module(&self, m: &str, filters: &[&str]) -> Raw {
        let (mut raw, _) = connect_module(self.mqtt, &self.pki.ca_pem, m, false).await;
        for f in filters {
            assert!(matches!(
                subscribe1(&mut raw, f).await,
                SubscribeReasonCode::Success(_)
            ));
        }
        raw
    }
}

const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const METHODS: &str = "$iothub/methods/POST/#";

fn json_of(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap()
}

fn topic_of(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

/// A desired change made through the cloud reaches the connected module
/// with its `$version`; a desired change made while the hub is cut off from
/// the cloud reaches it after the reconnect as one diff patch (changed and
/// removed keys) with the cloud's latest `$version`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_patches_live_and_as_a_diff_after_an_outage() {
    desired_patches(Up::Mqtt).await;
}

/// The same with the upstream over AMQP (one connection, a session per identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_patches_live_and_as_a_diff_after_an_outage_over_amqp() {
    desired_patches(Up::Amqp).await;
}

async fn desired_patches(up: Up) {
    let mut w = World::over(up).await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    let mut a = w.module("modA", &[DESIRED]).await;
    let id = format!("{DEVICE}/modA");
    wait_for("modA's link", Duration::from_secs(10), || {
        w.cloud.connected(&id)
    })
    .await;
    // Let the link's subscriptions and initial GET settle.
    tokio::time::sleep(Duration::from_millis(300)).await;

    w.cloud
        .set_desired(
            &id,
            json!({"speed": 5, "mode": {"a": 1, "b": 2}, "gone": true}),
        )
        .await;
    let v1 = w.cloud.twin(&id).desired.version;
    let p = next_pub(&mut a).await;
    assert_eq!(
        topic_of(&p),
        format!("$iothub/twin/PATCH/properties/desired/?$version={v1}")
    );
    assert_eq!(
        json_of(&p),
        json!({"speed": 5, "mode": {"a": 1, "b": 2}, "gone": true, "$version": v1})
    );

    // Cut off from the cloud: two changes there.
    w.cloud.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.cloud
        .set_desired(&id, json!({"speed": 7, "gone": null}))
        .await;
    w.cloud
        .set_desired(&id, json!({"mode": {"b": null, "c": 3}, "new": "x"}))
        .await;
    let v3 = w.cloud.twin(&id).desired.version;
    assert_eq!(v3, v1 + 2);
    assert!(
        maybe_pub(&mut a, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing can arrive while the cloud is unreachable"
    );

    w.cloud.start().await;
    let p = next_pub(&mut a).await;
    assert_eq!(
        topic_of(&p),
        format!("$iothub/twin/PATCH/properties/desired/?$version={v3}")
    );
    assert_eq!(
        json_of(&p),
        json!({"gone": null, "speed": 7, "mode": {"b": null, "c": 3}, "new": "x", "$version": v3}),
        "one diff patch from what the module had"
    );
    // And the hub's cached twin (served to a GET) is the cloud's.
    a.send(Packet::Publish(Publish::new(
        "$iothub/twin/GET/?$rid=9",
        QoS::AtMostOnce,
        Vec::new(),
    )))
    .await;
    let p = next_pub(&mut a).await;
    assert!(topic_of(&p).starts_with("$iothub/twin/res/200/?$rid=9"));
    assert_eq!(
        json_of(&p)["desired"],
        json!({"speed": 7, "mode": {"a": 1, "c": 3}, "new": "x", "$version": v3})
    );
    w.cloud.assert_carried(&id, up);
}

/// Sends a reported patch and expects the hub's local 204.
async fn report(raw: &mut Raw, rid: u32, patch: Value) {
    raw.send(Packet::Publish(Publish::new(
        format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
        QoS::AtMostOnce,
        serde_json::to_vec(&patch).unwrap(),
    )))
    .await;
    loop {
        let p = next_pub(raw).await;
        let t = topic_of(&p);
        if t.starts_with("$iothub/twin/res/") && t.contains(&format!("$rid={rid}")) {
            assert!(t.starts_with("$iothub/twin/res/204/"), "{t}");
            return;
        }
    }
}

/// Reported patches accepted while the cloud is unreachable are queued,
/// survive a hub restart, and reach the cloud after it comes back, each
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_made_offline_reach_the_cloud_in_order_after_a_restart() {
    reported_patches(Up::Mqtt).await;
}

/// The same with the upstream over AMQP (one connection, a session per identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_made_offline_reach_the_cloud_in_order_after_a_restart_over_amqp() {
    reported_patches(Up::Amqp).await;
}

async fn reported_patches(up: Up) {
    let mut w = World::over(up).await;
    let id = format!("{DEVICE}/modA");
    let hub = w.hub().await;
    let mut a = w.module("modA", &["$iothub/twin/res/#"]).await;
    report(&mut a, 1, json!({"n": 1, "keep": "k"})).await;
    report(&mut a, 2, json!({"n": 2, "a": {"x": 1, "y": 2}})).await;
    report(&mut a, 3, json!({"a": {"x": null}, "n": 3})).await;
    drop(a);
    hub.stop();

    let _hub = w.hub().await;
    let mut a = w.module("modA", &["$iothub/twin/res/#"]).await;
    report(&mut a, 4, json!({"a": null, "n": 4, "b": true})).await;
    report(&mut a, 5, json!({"b": null, "last": 5})).await;
    let before = w.cloud.twin(&id).reported;
    assert!(before.properties.is_empty(), "the cloud saw nothing yet");

    w.cloud.start().await;
    let want = json!({"n": 4, "keep": "k", "last": 5});
    wait_for(
        "the reported patches in the cloud",
        Duration::from_secs(10),
        || Value::Object(w.cloud.twin(&id).reported.properties) == want,
    )
    .await;
    // Each patch applied exactly once: the cloud's reported version counts them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.cloud.twin(&id).reported.version, before.version + 5);
    // The queue is empty (nothing is sent again after a reconnect).
    w.cloud.stop().await;
    w.cloud.start().await;
    wait_for("the link back", Duration::from_secs(10), || {
        w.cloud.connected(&id)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.cloud.twin(&id).reported.version, before.version + 5);
    // One file per twin: none holds a queued patch any more.
    let mut files = 0;
    for e in std::fs::read_dir(w.storage.path().join("twins")).unwrap() {
        let saved = std::fs::read_to_string(e.unwrap().path()).unwrap();
        assert!(!saved.contains("pending_reported"), "{saved}");
        files += 1;
    }
    assert!(files > 0);
    w.cloud.assert_carried(&id, up);
}

/// A direct method invoked in the cloud on a module behind the edge is
/// relayed to it and returns its answer; a module with a session but no
/// connection is answered 404 by the hub at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_methods_reach_modules_behind_the_edge() {
    cloud_methods(Up::Mqtt).await;
}

/// The same with the upstream over AMQP (one connection, a session per identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_methods_reach_modules_behind_the_edge_over_amqp() {
    cloud_methods(Up::Amqp).await;
}

async fn cloud_methods(up: Up) {
    let mut w = World::over(up).await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    // modB: a persistent session, then gone.
    drop(w.module("modB", &[METHODS]).await);
    let mut a = w.module("modA", &[METHODS]).await;
    for m in ["modA", "modB"] {
        let id = format!("{DEVICE}/{m}");
        wait_for("the links", Duration::from_secs(10), || {
            w.cloud.connected(&id)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cloud = w.cloud.state.clone();
    let call = tokio::spawn(async move {
        cloud
            .invoke_method(
                &ClientId::parse(&format!("{DEVICE}/modA")).unwrap(),
                "reboot",
                json!({"delay": 3}),
                Duration::from_secs(10),
                Duration::from_secs(0),
            )
            .await
    });
    let p = next_pub(&mut a).await;
    let t = topic_of(&p);
    let rid = t
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .unwrap_or_else(|| panic!("{t}"))
        .to_owned();
    assert_eq!(json_of(&p), json!({"delay": 3}));
    a.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/201/?$rid={rid}"),
        QoS::AtMostOnce,
        br#"{"rebooting":true}"#.to_vec(),
    )))
    .await;
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.payload, json!({"rebooting": true}));

    let started = Instant::now();
    let r = w
        .cloud
        .state
        .invoke_method(
            &ClientId::parse(&format!("{DEVICE}/modB")).unwrap(),
            "reboot",
            json!({}),
            Duration::from_secs(10),
            Duration::from_secs(0),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{:?}", r.payload);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered, not timed out"
    );
    w.cloud.assert_carried(&format!("{DEVICE}/modA"), up);
}

/// A C2D message for a leaf device is relayed to it, and completed in the
/// cloud (feedback `Success`) only once the leaf PUBACKed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_to_a_leaf_device_completes_on_its_puback() {
    c2d_to_a_leaf(Up::Mqtt).await;
}

/// The same with the upstream over AMQP (one connection, a session per identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_to_a_leaf_device_completes_on_its_puback_over_amqp() {
    c2d_to_a_leaf(Up::Amqp).await;
}

async fn c2d_to_a_leaf(up: Up) {
    let mut w = World::over(up).await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    let token = SasToken::sign(
        &format!("{HUB}/devices/leaf1"),
        &SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
        now() + 3600,
        None,
    )
    .to_string();
    let (mut leaf, ack) = Raw::connect(
        w.mqtt,
        &w.pki.ca_pem,
        "leaf1",
        &username("leaf1"),
        &token,
        false,
    )
    .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    assert!(matches!(
        subscribe1(&mut leaf, "devices/leaf1/messages/devicebound/#").await,
        SubscribeReasonCode::Success(_)
    ));
    wait_for("leaf1's link", Duration::from_secs(10), || {
        w.cloud.connected("leaf1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut msg = verge_core::message::Message::new("hello leaf");
    msg.system.message_id = Some("c2d-1".into());
    msg.properties.insert("k", "v");
    w.cloud.state.c2d_send("leaf1", msg, 0).await.unwrap();

    // Received, not yet acknowledged: no completion in the cloud.
    let p = loop {
        match leaf.recv().await {
            Some(Packet::Publish(p)) => break p,
            Some(_) => {}
            None => panic!("leaf closed:\n{}", w.hub_log()),
        }
    };
    let t = topic_of(&p);
    assert!(t.starts_with("devices/leaf1/messages/devicebound/"), "{t}");
    assert!(t.contains("k=v"), "{t}");
    assert_eq!(p.payload.as_ref(), b"hello leaf");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.cloud.state.c2d_feedback(0, 10).unwrap().is_empty());

    leaf.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    wait_for("the completion feedback", Duration::from_secs(5), || {
        !w.cloud.state.c2d_feedback(0, 10).unwrap().is_empty()
    })
    .await;
    let f = w.cloud.state.c2d_feedback(0, 10).unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].status_code, "Success");
    assert_eq!(f[0].original_message_id, "c2d-1");
    assert_eq!(f[0].device_id, "leaf1");
    w.cloud.assert_carried("leaf1", up);
}

/// C2D to a leaf device connected over AMQP (Apache Qpid Proton, SASL
/// PLAIN): accepted = completed in the cloud (feedback `Success`); rejected
/// = never delivered again (the MQTT upstream has no reject, so the hub
/// completes it); released = abandoned: not completed, and delivered again
/// once the hub's link to the cloud comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_to_an_amqp_leaf_settles_by_its_outcome() {
    let python = verge_testkit::proton_python();
    let mut w = World::new().await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(w.amqps).await.is_err() {
        assert!(Instant::now() < deadline, "no AMQPS listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = w.pki.dir.path().join("ca.pem");
    std::fs::write(&ca, &w.pki.ca_pem).unwrap();
    let params = w.pki.dir.path().join("c2d-params.json");
    let p = json!({"hub": HUB, "ca": ca, "amqps_port": w.amqps.port(), "key": LEAF_KEY});
    std::fs::write(&params, p.to_string()).unwrap();
    // Killed when dropped; its output lines are collected.
    let mut leaf = verge_testkit::Running::start(
        Command::new(python)
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/amqp_c2d_leaf.py"))
            .arg(&params),
    );
    // The leaf's lines arrive on a blocking channel; the cloud runs on the
    // other worker meanwhile.
    fn wait(leaf: &mut verge_testkit::Running, w: &World, text: &str) {
        tokio::task::block_in_place(|| {
            leaf.wait_for_with(text, || format!("--- hub log\n{}", w.hub_log()))
        });
    }
    wait(&mut leaf, &w, "READY");
    wait_for("leaf1's link", Duration::from_secs(10), || {
        w.cloud.connected("leaf1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    for id in ["c2d-1", "c2d-2", "c2d-3"] {
        let mut msg = verge_core::message::Message::new(format!("body of {id}"));
        msg.system.message_id = Some(id.into());
        msg.properties.insert("k", "v");
        w.cloud.state.c2d_send("leaf1", msg, 0).await.unwrap();
    }
    wait(&mut leaf, &w, "SETTLED");
    for id in ["c2d-1", "c2d-2", "c2d-3"] {
        let got = format!("GOT {id} v body of {id}");
        assert!(leaf.log().contains(&got), "{got:?} not in {:?}", leaf.log());
    }
    wait_for("two settlements", Duration::from_secs(5), || {
        w.cloud.state.c2d_feedback(0, 10).unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut done: Vec<String> = w
        .cloud
        .state
        .c2d_feedback(0, 10)
        .unwrap()
        .into_iter()
        .map(|f| f.original_message_id)
        .collect();
    done.sort();
    assert_eq!(done, ["c2d-1", "c2d-2"], "the released one is not settled");
    assert!(
        w.hub_log().contains("C2D message rejected by the device"),
        "{}",
        w.hub_log()
    );

    // The hub's link comes back; the cloud hands the abandoned one out again.
    w.cloud.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.cloud.start().await;
    wait(&mut leaf, &w, "REDELIVERED c2d-3");
    wait(&mut leaf, &w, "ALL PASS");
    wait_for(
        "the redelivered one's completion",
        Duration::from_secs(10),
        || w.cloud.state.c2d_feedback(0, 10).unwrap().len() == 3,
    )
    .await;
    let f = w.cloud.state.c2d_feedback(0, 10).unwrap();
    assert!(
        f.iter()
            .all(|f| f.status_code == "Success" && f.device_id == "leaf1"),
        "{f:?}"
    );
}

/// The hub's own configuration comes from its `$edgeHub` module twin in the
/// cloud, as a deployment sets it: a route that exists only in the cloud's
/// `$edgeHub` desired properties is put in force (modA/out2 → modB/in2), and
/// the hub reports the outcome on that twin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgehub_desired_from_the_cloud_is_the_hub_configuration() {
    let mut w = World::new().await;
    edgehub_identity(&mut w).await;
    let edgehub = format!("{DEVICE}/$edgeHub");
    w.cloud
        .set_desired(
            &edgehub,
            json!({
                "schemaVersion": "1.1",
                "routes": {
                    "cloudRoute": "FROM /messages/modules/modA/outputs/out2 INTO BrokeredEndpoint(\"/modules/modB/inputs/in2\")"
                },
                "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
            }),
        )
        .await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    let mut b = w
        .module("modB", &["devices/edge1/modules/modB/inputs/#"])
        .await;
    let (mut a, _) = connect_module(w.mqtt, &w.pki.ca_pem, "modA", true).await;
    wait_for("the $edgeHub link", Duration::from_secs(10), || {
        w.cloud.connected(&edgehub)
    })
    .await;

    // Until the cloud's document is in force, out2 has no route: retry.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut pkid = 1;
    let got = loop {
        publish_qos1(
            &mut a,
            &format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out2"),
            b"via-cloud-route",
            pkid,
        )
        .await;
        pkid += 1;
        if let Some(p) = maybe_pub(&mut b, Duration::from_millis(500)).await {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the cloud's $edgeHub routes were never applied:\n{}",
            w.hub_log()
        );
    };
    assert!(topic_of(&got).starts_with("devices/edge1/modules/modB/inputs/in2/"));
    assert_eq!(&got.payload[..], b"via-cloud-route");

    // The outcome reaches the cloud as `$edgeHub` reported properties.
    let desired_version = w.cloud.twin(&edgehub).desired.version;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reported = w.cloud.twin(&edgehub).reported.properties;
        if reported
            .get("lastDesiredStatus")
            .and_then(|s| s.get("code"))
            == Some(&json!(200))
            && reported.get("lastDesiredVersion") == Some(&json!(desired_version))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 200 for version {desired_version} reported: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub holds `$edgeHub`'s key (derived like any module's) and the cloud
/// knows the module with that key, as verged registers it.
async fn edgehub_identity(w: &mut World) {
    let text = std::fs::read_to_string(&w.toml).unwrap();
    std::fs::write(
        &w.toml,
        text.replace("[modules]\n", "[modules]\n\"$edgeHub\" = \"gen-x\"\n"),
    )
    .unwrap();
    let hub_key = module_key("$edgeHub");
    w.cloud
        .state
        .put_module(
            DEVICE,
            "$edgeHub",
            verge_cloud::ModuleSpec {
                keys: Some(verge_cloud::registry::SymmetricKeys {
                    primary: hub_key.to_base64(),
                    secondary: hub_key.to_base64(),
                }),
                ..verge_cloud::ModuleSpec::default()
            },
            // The cloud created `$edgeHub` with the edge device; update it.
            Some("*".to_owned()),
        )
        .await
        .unwrap();
}

/// A deployment for edge1 (as `verge cloud deployment apply` sends it):
/// `routes` for `$edgeHub`, `mod_a` as modA's desired properties.
fn deployment(routes: Value, mod_a: Value) -> Value {
    let image = |i: &str| json!({"image": i, "createOptions": "{}"});
    json!({"modulesContent": {
        "$edgeAgent": {"properties.desired": {
            "schemaVersion": "1.1",
            "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
            "systemModules": {
                "edgeAgent": {"type": "docker", "settings": image("verge-agent")},
                "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                    "settings": image("verge-hub")}
            },
            "modules": {}
        }},
        "$edgeHub": {"properties.desired": {
            "schemaVersion": "1.1",
            "routes": routes,
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
        }},
        "modA": {"properties.desired": mod_a}
    }})
}

/// modA's twin as the hub serves it to a GET (after `rid`'s response).
async fn get_twin(raw: &mut Raw, rid: u32) -> Value {
    raw.send(Packet::Publish(Publish::new(
        format!("$iothub/twin/GET/?$rid={rid}"),
        QoS::AtMostOnce,
        Vec::new(),
    )))
    .await;
    loop {
        let p = next_pub(raw).await;
        if topic_of(&p).starts_with(&format!("$iothub/twin/res/200/?$rid={rid}")) {
            return json_of(&p);
        }
    }
}

/// Publishes on modA's output `out` until modB gets something (a route for
/// it is in force); returns modB's input name.
async fn first_delivery(a: &mut Raw, b: &mut Raw, pkid: &mut u16, out: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on={out}");
        publish_qos1(a, &topic, out.as_bytes(), *pkid).await;
        *pkid += 1;
        if let Some(p) = maybe_pub(b, Duration::from_millis(500)).await {
            assert_eq!(&p.payload[..], out.as_bytes());
            return topic_of(&p).split('/').nth(5).unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no route for {out} came in force"
        );
    }
}

/// A deployment replaces desired properties (IoT Hub semantics), also in the
/// running hub: after a second deployment the route it removed carries
/// nothing, the route it changed goes to its new endpoint, the route it added
/// is in force, and modA's twin holds exactly the new desired properties (a
/// removed key is gone, not merged with the old document). A deployment
/// with a bad route is refused whole and reported; one made while the hub
/// is offline is taken whole after the reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successive_deployments_add_change_and_remove_routes_and_desired_keys() {
    let mut w = World::new().await;
    edgehub_identity(&mut w).await;
    let route = |out: &str, input: &str| {
        format!(
            "FROM /messages/modules/modA/outputs/{out} INTO BrokeredEndpoint(\"/modules/modB/inputs/{input}\")"
        )
    };
    let first = deployment(
        json!({"r1": route("out1", "in1"), "r2": route("out2", "in2")}),
        json!({"a": 1, "b": {"x": 1, "y": 2}, "c": true}),
    );
    w.cloud
        .state
        .apply_configuration(DEVICE, first)
        .await
        .unwrap();
    w.cloud.start().await;
    let _hub = w.hub().await;
    let mut b = w
        .module("modB", &["devices/edge1/modules/modB/inputs/#"])
        .await;
    let mut a = w.module("modA", &["$iothub/twin/res/#"]).await;
    let edgehub = format!("{DEVICE}/$edgeHub");
    wait_for("the $edgeHub link", Duration::from_secs(10), || {
        w.cloud.connected(&edgehub)
    })
    .await;
    let mut pkid = 1;
    assert_eq!(
        first_delivery(&mut a, &mut b, &mut pkid, "out2").await,
        "in2"
    );
    assert_eq!(
        first_delivery(&mut a, &mut b, &mut pkid, "out1").await,
        "in1"
    );

    // Second deployment: r2 removed, r1 changed, r3 added; modA's `c` and
    // `b.y` removed, `a` changed.
    let second = deployment(
        json!({"r1": route("out1", "in1b"), "r3": route("out3", "in3")}),
        json!({"a": 2, "b": {"x": 1}}),
    );
    w.cloud
        .state
        .apply_configuration(DEVICE, second)
        .await
        .unwrap();
    assert_eq!(
        first_delivery(&mut a, &mut b, &mut pkid, "out3").await,
        "in3"
    );
    // The new route set is in force: out2 has no route any more, out1 goes
    // to in1b. Everything modB gets in the next moment is collected.
    for out in ["out2", "out1", "out3"] {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on={out}");
        publish_qos1(&mut a, &topic, out.as_bytes(), pkid).await;
        pkid += 1;
    }
    let mut got = Vec::new();
    while let Some(p) = maybe_pub(&mut b, Duration::from_millis(1500)).await {
        got.push((
            topic_of(&p).split('/').nth(5).unwrap().to_owned(),
            String::from_utf8(p.payload.to_vec()).unwrap(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("in1b".to_owned(), "out1".to_owned()),
            ("in3".into(), "out3".into())
        ],
        "a removed route still carried messages, or a changed one kept its old endpoint:\n{}",
        w.hub_log()
    );

    // modA's twin in the hub is the deployment's document, nothing merged.
    let version = w.cloud.twin(&format!("{DEVICE}/modA")).desired.version;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rid = 1;
    loop {
        let desired = get_twin(&mut a, rid).await["desired"].clone();
        rid += 1;
        if desired["$version"] == json!(version) {
            assert_eq!(desired, json!({"a": 2, "b": {"x": 1}, "$version": version}));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "modA's twin never reached version {version}: {desired}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The hub's own twin holds the deployment's routes only.
    let reported_version = w.cloud.twin(&edgehub).desired.version;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reported = w.cloud.twin(&edgehub).reported.properties;
        if reported.get("lastDesiredVersion") == Some(&json!(reported_version)) {
            assert_eq!(reported["lastDesiredStatus"]["code"], json!(200));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no status for version {reported_version}: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A third deployment with a route that does not parse: the hub refuses
    // it whole (the second's routes stay in force) and reports why to the
    // cloud, where the deployment status reads it.
    let third = deployment(
        json!({"r1": route("out1", "in1"), "bad": "FROM /messages/* INTO"}),
        json!({"a": 3}),
    );
    w.cloud
        .state
        .apply_configuration(DEVICE, third)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let reported = w.cloud.twin(&edgehub).reported.properties;
        if reported["lastDesiredStatus"]["code"] == json!(400) {
            break reported["lastDesiredStatus"].clone();
        }
        assert!(Instant::now() < deadline, "no 400 reported: {reported:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let why = status["description"].as_str().unwrap();
    assert!(
        why.contains("invalid routes") && why.contains("bad"),
        "{status}"
    );
    assert_eq!(
        first_delivery(&mut a, &mut b, &mut pkid, "out1").await,
        "in1b"
    );

    // A deployment made while the hub is cut off from the cloud arrives as
    // the whole twin (GET after the reconnect), which is the whole truth:
    // r1 removed there is removed here too, r4 added is in force.
    w.cloud.stop().await;
    let fourth = deployment(
        json!({"r3": route("out3", "in3"), "r4": route("out4", "in4")}),
        json!({"a": 4}),
    );
    w.cloud
        .state
        .apply_configuration(DEVICE, fourth)
        .await
        .unwrap();
    w.cloud.start().await;
    assert_eq!(
        first_delivery(&mut a, &mut b, &mut pkid, "out4").await,
        "in4"
    );
    for out in ["out1", "out3"] {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on={out}");
        publish_qos1(&mut a, &topic, out.as_bytes(), pkid).await;
        pkid += 1;
    }
    let mut got = Vec::new();
    while let Some(p) = maybe_pub(&mut b, Duration::from_millis(1500)).await {
        got.push(topic_of(&p).split('/').nth(5).unwrap().to_owned());
    }
    assert_eq!(got, ["in3"], "r1 outlived the deployment that removed it");
}

/// A cloud call with a method name IoT Hub refuses, or a payload over
/// 128 KB, is answered by the hub (400 / 413) without reaching the module,
/// which stays connected and answers the next good call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_methods_with_bad_names_or_payloads_are_refused_by_the_hub() {
    let mut w = World::new().await;
    w.cloud.start().await;
    let _hub = w.hub().await;
    let mut a = w.module("modA", &[METHODS]).await;
    let id = format!("{DEVICE}/modA");
    wait_for("the link", Duration::from_secs(10), || {
        w.cloud.connected(&id)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = ClientId::parse(&id).unwrap();
    let invoke = |name: String, payload: Value| {
        let cloud = w.cloud.state.clone();
        let target = target.clone();
        async move {
            cloud
                .invoke_method(
                    &target,
                    &name,
                    payload,
                    Duration::from_secs(10),
                    Duration::from_secs(0),
                )
                .await
                // verge-cloud refuses what IoT Hub refuses before sending
                // (400/413); -1: not answered at all (its own timeout).
                .map_or_else(
                    |e| {
                        if e.status() == 504 {
                            -1
                        } else {
                            i32::from(e.status())
                        }
                    },
                    |r| r.status,
                )
        }
    };
    // IoT Hub (and verge-cloud) refuse these before they reach the device;
    // the hub refuses them too for any other caller (`hub_input.rs`).
    for name in ["a:b".to_owned(), "a$b".to_owned(), "x".repeat(200)] {
        assert_eq!(invoke(name.clone(), json!({})).await, 400, "{name:.20}");
    }
    assert_eq!(invoke("ok".into(), json!("x".repeat(140_000))).await, 413);
    let good = tokio::spawn(invoke("reboot".into(), json!({})));
    let p = next_pub(&mut a).await;
    let t = topic_of(&p);
    let rid = t
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .unwrap_or_else(|| panic!("{t}"))
        .to_owned();
    a.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        b"{}".to_vec(),
    )))
    .await;
    assert_eq!(good.await.unwrap(), 200);
}

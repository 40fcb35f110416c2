//! Input validation at the hub's edges (issue #19): messages whose delivery
//! topic cannot be encoded, direct-method names and payloads, the method
//! API's authorization, route TTLs, subscription caps and MQTT Wills. Each
//! test drives an in-process hub on 127.0.0.1 with a real MQTT client.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, SubscribeReasonCode};
use verge_hub::Hub;

async fn start(pki: &Pki, storage: &std::path::Path) -> Hub {
    Hub::start(config(pki, storage, "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap()
}

const MODB_INPUTS: &str = "devices/edge1/modules/modB/inputs/#";
const MODA_OUT1: &str = "devices/edge1/modules/modA/messages/events/%24.on=out1";

/// A bag of 25,000 raw `:`: 25 KB as sent, 75 KB once the hub percent-encodes
/// each `:` as `%3A` — past MQTT's 65,535-byte topic limit.
fn poison_topic() -> String {
    format!("{MODA_OUT1}&k={}", ":".repeat(25_000))
}

/// Publishes QoS 1; `true` if PUBACKed, `false` if the hub closed the
/// connection instead.
async fn publish_acked(raw: &mut Raw, topic: &str, payload: &[u8], pkid: u16) -> bool {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    raw.send(Packet::Publish(p)).await;
    loop {
        match raw.recv().await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

#[tokio::test]
async fn poison_bag_is_refused_at_ingest_and_the_receiver_keeps_its_inputs() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert_eq!(
        subscribe1(&mut b, MODB_INPUTS).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    assert!(
        !publish_acked(&mut a, &poison_topic(), b"poison", 1).await,
        "a message whose delivery topic cannot be encoded must not be acknowledged"
    );
    assert_eq!(hub.state.stats.refused.load(Ordering::Relaxed), 1);
    // The publisher may go on (after reconnecting, as the SDKs do).
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    publish_qos1(&mut a, &format!("{MODA_OUT1}&k=v"), b"good", 2).await;
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"good"));
    // The receiver is still connected and gets what follows.
    publish_qos1(&mut a, MODA_OUT1, b"after", 3).await;
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"after"));
    hub.shutdown().await;
}

#[tokio::test]
async fn stored_poison_message_is_dead_lettered_not_the_connection() {
    use verge_core::message::{Message, MessageKind, Properties, SystemProperties};
    use verge_store::{Store, StoreConfig, Target};

    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    // A store written before ingest refused such messages: a poison message
    // then a good one, both for modB's input.
    {
        let store = Store::open(storage.path().join("store"), StoreConfig::default()).unwrap();
        let msg = |body: &'static [u8], value: String| {
            let mut properties = Properties::new();
            properties.insert("k", value);
            Message {
                kind: MessageKind::Telemetry,
                body: Bytes::from_static(body),
                system: SystemProperties {
                    message_id: Some(format!("mid-{}", body.len())),
                    connection_device_id: Some(DEVICE.into()),
                    connection_module_id: Some("modA".into()),
                    ..Default::default()
                },
                properties,
            }
        };
        let target = [Target::new("modules/modB/inputs/in1")];
        store
            .append(&msg(b"poison", ":".repeat(25_000)), &target)
            .await
            .unwrap();
        store
            .append(&msg(b"good", "v".into()), &target)
            .await
            .unwrap();
    }
    let hub = start(&pki, storage.path()).await;
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    subscribe1(&mut b, MODB_INPUTS).await;
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"good"));
    assert_eq!(hub.state.stats.dead_lettered.load(Ordering::Relaxed), 1);
    // Still connected: new messages arrive on the same connection.
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    publish_qos1(&mut a, MODA_OUT1, b"after", 1).await;
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"after"));
    // Checkpointed past: a new connection does not see the poison again.
    drop(b);
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    // (A redelivery of "after" is allowed: at least once.)
    while let Some(p) = maybe_pub(&mut b, Duration::from_millis(500)).await {
        assert_ne!(p.payload, Bytes::from_static(b"poison"));
    }
    assert_eq!(hub.state.stats.dead_lettered.load(Ordering::Relaxed), 1);
    hub.shutdown().await;
}

fn https(pki: &Pki, hub: &Hub) -> reqwest::Client {
    https_client()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", hub.https_addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn method_url(hub: &Hub, target: &str) -> String {
    format!(
        "https://localhost:{}/twins/{DEVICE}/modules/{target}/methods?api-version=2019-10-01",
        hub.https_addr.port()
    )
}

/// modB connected and listening for methods.
async fn method_callee(hub: &Hub, pki: &Pki) -> Raw {
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert_eq!(
        subscribe1(&mut b, "$iothub/methods/POST/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    b
}

/// Answers the next method request on `b` with 200 and checks its name.
async fn answer_method(b: &mut Raw, name: &str) {
    let req = next_pub(b).await;
    let topic = std::str::from_utf8(&req.topic).unwrap().to_owned();
    let rid = topic
        .strip_prefix(&format!("$iothub/methods/POST/{name}/?$rid="))
        .unwrap_or_else(|| panic!("{topic}"))
        .to_owned();
    b.send(Packet::Publish(Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        b"{}".to_vec(),
    )))
    .await;
}

#[tokio::test]
async fn bad_method_names_and_payloads_are_refused_before_the_callee() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let mut b = method_callee(&hub, &pki).await;
    let client = https(&pki, &hub);
    let call = |name: String, payload: serde_json::Value| {
        client
            .post(method_url(&hub, "modB"))
            .header("x-ms-edge-moduleId", "edge1/modA")
            .header("Authorization", module_token("modA"))
            .json(&serde_json::json!({"methodName": name, "payload": payload, "responseTimeoutInSeconds": 5}))
            .send()
    };
    for name in [
        "a#b".to_owned(),
        "a+b".to_owned(),
        "a\0b".to_owned(),
        "a/b".to_owned(),
        "a b".to_owned(),
        String::new(),
        "x".repeat(70_000),
    ] {
        let r = call(name.clone(), serde_json::json!({})).await.unwrap();
        assert_eq!(r.status(), 400, "{:.40}", name);
    }
    let big = serde_json::json!("x".repeat(1_500_000));
    assert_eq!(call("ok".into(), big).await.unwrap().status(), 413);
    // The callee never saw any of them and is still connected: a good call
    // (a name with every allowed kind of character) reaches it.
    let name = "Reboot_now-2.x~!*'";
    let good = tokio::spawn(call(name.into(), serde_json::json!({"n": 1})));
    answer_method(&mut b, name).await;
    assert_eq!(good.await.unwrap().unwrap().status(), 200);
    hub.shutdown().await;
}

/// The relay the upstream link hands cloud calls to applies the same checks
/// (one function for both paths).
#[tokio::test]
async fn cloud_method_relay_refuses_bad_names_and_payloads() {
    use verge_hub::methods::{RelayError, relay};
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let mut b = method_callee(&hub, &pki).await;
    let target = format!("{DEVICE}/modB");
    let t = Duration::from_secs(5);
    for name in [
        "a#b".to_owned(),
        "a+b".into(),
        "a\0b".into(),
        "x".repeat(70_000),
    ] {
        let r = relay(&hub.state, &target, &name, Bytes::from_static(b"{}"), t).await;
        assert!(
            matches!(&r, Err(e @ RelayError::BadName(_)) if e.status() == 400),
            "{r:?}"
        );
    }
    let big = Bytes::from(vec![b'1'; 1_500_000]);
    let r = relay(&hub.state, &target, "ok", big, t).await;
    assert!(
        matches!(&r, Err(e @ RelayError::PayloadTooLarge(_)) if e.status() == 413),
        "{r:?}"
    );
    let state = hub.state.clone();
    let good =
        tokio::spawn(
            async move { relay(&state, &target, "ok", Bytes::from_static(b"{}"), t).await },
        );
    answer_method(&mut b, "ok").await;
    assert_eq!(good.await.unwrap().unwrap().0, 200);
    hub.shutdown().await;
}

#[tokio::test]
async fn method_call_without_authorization_is_401() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let _b = method_callee(&hub, &pki).await;
    let r = https(&pki, &hub)
        .post(method_url(&hub, "modB"))
        .header("x-ms-edge-moduleId", "edge1/modA")
        .json(&serde_json::json!({"methodName": "reboot"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    hub.shutdown().await;
}

/// `timeToLiveSecs: 0`, globally and on a route, means "the default", not
/// "expire at once": a message stored while its receiver is away is still
/// delivered when it comes back.
#[tokio::test]
async fn ttl_0_means_the_default_not_expire_at_once() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    std::fs::write(
        pki.dir.path().join("routes.json"),
        r#"{
  "schemaVersion": "1.1",
  "routes": {
    "AtoB": {"route": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")", "priority": 0, "timeToLiveSecs": 0}
  },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 0}
}"#,
    )
    .unwrap();
    let hub = Hub::start(cfg).await.unwrap();
    // modB has a session with its inputs subscribed, then goes away.
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    subscribe1(&mut b, MODB_INPUTS).await;
    drop(b);
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    publish_qos1(&mut a, MODA_OUT1, b"kept", 1).await;
    // Past any whole-second expiry of a zero TTL.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"kept"));
    assert_eq!(hub.state.routes().default_ttl_secs, Some(7200));
    hub.shutdown().await;
}

#[tokio::test]
async fn subscriptions_per_session_are_capped() {
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};
    use verge_hub::session::MAX_SUBSCRIPTIONS;
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    let filters: Vec<String> = (0..MAX_SUBSCRIPTIONS + 6)
        .map(|i| format!("$iothub/methods/POST/m{i}/#"))
        .collect();
    let mut s = Subscribe::new_many(
        filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
    );
    s.pkid = 7;
    b.send(Packet::Subscribe(s)).await;
    let codes = match b.recv().await {
        Some(Packet::SubAck(a)) => a.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    };
    assert_eq!(codes.len(), filters.len());
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert!(
        codes[..MAX_SUBSCRIPTIONS].iter().all(|c| *c == ok),
        "{codes:?}"
    );
    assert!(
        codes[MAX_SUBSCRIPTIONS..]
            .iter()
            .all(|c| *c == SubscribeReasonCode::Failure),
        "{codes:?}"
    );
    // A filter already held is granted again; a new one is not.
    assert_eq!(subscribe1(&mut b, &filters[0]).await, ok);
    assert_eq!(
        subscribe1(&mut b, MODB_INPUTS).await,
        SubscribeReasonCode::Failure
    );
    // After an unsubscribe there is room again.
    let mut u = rumqttc::mqttbytes::v4::Unsubscribe::new(filters[1].clone());
    u.pkid = 8;
    b.send(Packet::Unsubscribe(u)).await;
    assert!(matches!(b.recv().await, Some(Packet::UnsubAck(_))));
    assert_eq!(subscribe1(&mut b, MODB_INPUTS).await, ok);
    assert_eq!(
        hub.state.sessions.subscriptions("edge1/modB").len(),
        MAX_SUBSCRIPTIONS
    );
    hub.shutdown().await;
}

/// Connects modA with a Will on `will_topic`; returns the CONNACK code.
async fn connect_with_will(
    hub: &Hub,
    pki: &Pki,
    will_topic: &str,
) -> (Raw, rumqttc::mqttbytes::v4::ConnectReturnCode) {
    use rumqttc::mqttbytes::v4::{Connect, LastWill};
    let id = format!("{DEVICE}/modA");
    let mut raw = Raw::open(hub.mqtt_addr, &pki.ca_pem).await;
    let mut c = Connect::new(id.as_str());
    c.clean_session = false;
    c.keep_alive = 60;
    c.set_credentials(username(&id), module_token("modA"));
    c.last_will = Some(LastWill::new(
        will_topic,
        b"gone".to_vec(),
        QoS::AtLeastOnce,
        false,
    ));
    raw.send(Packet::Connect(c)).await;
    let ack = raw.recv().await;
    (raw, code(ack).0)
}

#[tokio::test]
async fn will_is_sent_as_telemetry_when_the_connection_drops() {
    use rumqttc::mqttbytes::v4::ConnectReturnCode;
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    subscribe1(&mut b, MODB_INPUTS).await;
    let will_topic = format!("{MODA_OUT1}&cause=power");

    // A Will on a topic that is not the client's own telemetry refuses the CONNECT.
    for bad in [
        "devices/edge1/modules/modB/messages/events/".to_owned(),
        "$iothub/twin/GET/?$rid=1".to_owned(),
        format!("{MODA_OUT1}&k=#"),
    ] {
        let (_r, c) = connect_with_will(&hub, &pki, &bad).await;
        assert_eq!(c, ConnectReturnCode::NotAuthorized, "{bad}");
    }

    // A clean DISCONNECT: no Will.
    let (mut a, c) = connect_with_will(&hub, &pki, &will_topic).await;
    assert_eq!(c, ConnectReturnCode::Success);
    a.send(Packet::Disconnect).await;
    assert!(a.recv().await.is_none());
    assert!(
        maybe_pub(&mut b, Duration::from_millis(500))
            .await
            .is_none()
    );

    // The TCP connection just drops: the Will goes through the routes to modB.
    let (a, c) = connect_with_will(&hub, &pki, &will_topic).await;
    assert_eq!(c, ConnectReturnCode::Success);
    drop(a);
    let p = next_pub(&mut b).await;
    assert_eq!(p.payload, Bytes::from_static(b"gone"));
    let topic = std::str::from_utf8(&p.topic).unwrap();
    assert!(
        topic.starts_with("devices/edge1/modules/modB/inputs/in1/"),
        "{topic}"
    );
    for prop in ["cause=power", "iothub-MessageType=Will", "%24.cmid=modA"] {
        assert!(topic.contains(prop), "{prop} missing in {topic}");
    }
    hub.shutdown().await;
}

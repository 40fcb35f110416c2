//! MQTT integration tests against an in-process hub on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish, SubscribeReasonCode};
use verge_core::SasToken;
use verge_hub::Hub;

async fn start(pki: &Pki, storage: &std::path::Path) -> Hub {
    Hub::start(config(pki, storage, "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap()
}

async fn connect_module(hub: &Hub, pki: &Pki, m: &str, clean: bool) -> (Raw, bool) {
    let id = format!("{DEVICE}/{m}");
    let (raw, ack) = Raw::connect(
        hub.mqtt_addr,
        &pki.ca_pem,
        &id,
        &username(&id),
        &module_token(m),
        clean,
    )
    .await;
    let (c, present) = code(ack);
    assert_eq!(c, ConnectReturnCode::Success);
    (raw, present)
}

#[tokio::test]
async fn connect_accepts_modules_and_devices() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (_a, present) = connect_module(&hub, &pki, "modA", false).await;
    assert!(!present);
    // A downstream device, username variant without '?'.
    let tok = SasToken::sign(
        &format!("{HUB}/devices/leaf1"),
        &verge_core::SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
        now() + 600,
        None,
    );
    let (_d, ack) = Raw::connect(
        hub.mqtt_addr,
        &pki.ca_pem,
        "leaf1",
        &format!("{HUB}/leaf1/api-version=2019-10-01"),
        &tok.to_string(),
        false,
    )
    .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    // The hub's own hostname is also a valid audience.
    let tok = SasToken::sign(
        &format!("localhost/devices/{DEVICE}/modules/modB"),
        &module_key("modB"),
        now() + 600,
        None,
    );
    let id = format!("{DEVICE}/modB");
    let (_b, ack) = Raw::connect(
        hub.mqtt_addr,
        &pki.ca_pem,
        &id,
        &username(&id),
        &tok.to_string(),
        false,
    )
    .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    hub.shutdown().await;
}

#[tokio::test]
async fn connect_rejections_get_connack_5() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let id = format!("{DEVICE}/modA");
    let res = format!("{HUB}/devices/{DEVICE}/modules/modA");
    let wrong_key = verge_core::SharedAccessKey::from_bytes(b"not the key".to_vec());
    let cases: Vec<(&str, String, String, String)> = vec![
        (
            "bad signature",
            id.clone(),
            username(&id),
            SasToken::sign(&res, &wrong_key, now() + 600, None).to_string(),
        ),
        (
            "expired",
            id.clone(),
            username(&id),
            SasToken::sign(&res, &module_key("modA"), now() - 10, None).to_string(),
        ),
        (
            "wrong audience host",
            id.clone(),
            username(&id),
            SasToken::sign(
                &format!("otherhub.azure-devices.net/devices/{DEVICE}/modules/modA"),
                &module_key("modA"),
                now() + 600,
                None,
            )
            .to_string(),
        ),
        (
            "token for another module",
            id.clone(),
            username(&id),
            module_token("modB"),
        ),
        (
            "client id / username mismatch",
            id.clone(),
            username(&format!("{DEVICE}/modB")),
            module_token("modA"),
        ),
        (
            "unknown module",
            format!("{DEVICE}/ghost"),
            username(&format!("{DEVICE}/ghost")),
            SasToken::sign(
                &format!("{HUB}/devices/{DEVICE}/modules/ghost"),
                &module_key("ghost"),
                now() + 600,
                None,
            )
            .to_string(),
        ),
        (
            "garbage password",
            id.clone(),
            username(&id),
            "hello".into(),
        ),
    ];
    for (what, client, user, pass) in cases {
        let (_r, ack) =
            Raw::connect(hub.mqtt_addr, &pki.ca_pem, &client, &user, &pass, false).await;
        assert_eq!(code(ack).0, ConnectReturnCode::NotAuthorized, "{what}");
    }
    // Protocol level 5 → CONNACK 1.
    let mut raw = Raw::open(hub.mqtt_addr, &pki.ca_pem).await;
    raw.send_bytes(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 1, b'x',
    ])
    .await;
    assert_eq!(
        code(raw.recv().await).0,
        ConnectReturnCode::RefusedProtocolVersion
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut good, _) = connect_module(&hub, &pki, "modA", true).await;
    let (mut bad, _) = connect_module(&hub, &pki, "modB", true).await;
    // PUBREL with wrong fixed-header flags, then junk.
    bad.send_bytes(&[0x60, 0x02, 0x00, 0x01, 0xff, 0xff]).await;
    assert!(bad.recv().await.is_none(), "bad connection must be closed");
    good.send(Packet::PingReq).await;
    assert_eq!(good.recv().await, Some(Packet::PingResp));
    // A client that never sends CONNECT is dropped after the timeout.
    let mut idle = Raw::open(hub.mqtt_addr, &pki.ca_pem).await;
    assert!(idle.recv().await.is_none());
    // Publishing outside its namespace closes the connection.
    let (mut nosy, _) = connect_module(&hub, &pki, "modB", true).await;
    let mut p = Publish::new(
        "devices/edge1/modules/modA/messages/events/",
        QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    p.pkid = 1;
    nosy.send(Packet::Publish(p)).await;
    assert!(nosy.recv().await.is_none());
    // Oversized publish: refused and closed.
    let mut p = Publish::new(
        "devices/edge1/modules/modA/messages/events/",
        QoS::AtLeastOnce,
        vec![0u8; 300 * 1024],
    );
    p.pkid = 7;
    good.send(Packet::Publish(p)).await;
    assert!(good.recv().await.is_none());
    hub.shutdown().await;
}

#[tokio::test]
async fn routes_sessions_offline_delivery_and_restart() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let input_filter = format!("devices/{DEVICE}/modules/modB/inputs/#");
    let (mut b, _) = connect_module(&hub, &pki, "modB", false).await;
    assert_eq!(
        subscribe1(&mut b, &input_filter).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(
        subscribe1(&mut b, "devices/edge1/modules/modA/inputs/#").await,
        SubscribeReasonCode::Failure
    );
    let (mut a, _) = connect_module(&hub, &pki, "modA", false).await;
    let out = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out1&k=v1");
    publish_qos1(&mut a, &out, &[0, 1, 2, 255], 1).await;
    let p = next_pub(&mut b).await;
    let topic = std::str::from_utf8(&p.topic).unwrap();
    assert!(
        topic.starts_with("devices/edge1/modules/modB/inputs/in1/"),
        "{topic}"
    );
    assert!(topic.contains("%24.cdid=edge1"), "{topic}");
    assert!(topic.contains("%24.cmid=modA"), "{topic}");
    assert!(topic.contains("k=v1"), "{topic}");
    assert!(!topic.contains("%24.on="), "{topic}");
    assert_eq!(p.payload, Bytes::from_static(&[0, 1, 2, 255]));

    // Unrouted output is dropped (and counted), still PUBACKed.
    let before = hub
        .state
        .stats
        .dropped_no_route
        .load(std::sync::atomic::Ordering::Relaxed);
    publish_qos1(
        &mut a,
        &format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=nowhere"),
        b"x",
        2,
    )
    .await;
    assert_eq!(
        hub.state
            .stats
            .dropped_no_route
            .load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );

    // B goes away; messages queue; B reconnects without re-subscribing.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5u16 {
        publish_qos1(
            &mut a,
            &format!("{out}&n={i}"),
            format!("m{i}").as_bytes(),
            10 + i,
        )
        .await;
    }
    let (mut b, present) = connect_module(&hub, &pki, "modB", false).await;
    assert!(present, "session must be present");
    for i in 0..5 {
        let p = next_pub(&mut b).await;
        assert_eq!(p.payload, Bytes::from(format!("m{i}")));
    }
    // Let the hub process the PUBACKs before the takeover (else it redelivers: at-least-once).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Takeover: a second connection with the same client id closes the first.
    let (b2, present) = connect_module(&hub, &pki, "modB", false).await;
    assert!(present);
    assert!(b.recv().await.is_none(), "old connection must be closed");
    drop(b2.s);

    // Queue two more, restart the hub, then B receives them with its persisted subscription.
    drop(a);
    let (mut a, _) = connect_module(&hub, &pki, "modA", false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_qos1(&mut a, &format!("{out}&n=r1"), b"r1", 20).await;
    publish_qos1(&mut a, &format!("{out}&n=r2"), b"r2", 21).await;
    drop(a);
    hub.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hub = start(&pki, storage.path()).await;
    let (mut b, present) = connect_module(&hub, &pki, "modB", false).await;
    assert!(present, "session must survive a restart");
    assert_eq!(next_pub(&mut b).await.payload, Bytes::from_static(b"r1"));
    assert_eq!(next_pub(&mut b).await.payload, Bytes::from_static(b"r2"));
    hub.shutdown().await;
}

#[tokio::test]
async fn twins_get_reported_desired() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut a, _) = connect_module(&hub, &pki, "modA", false).await;
    subscribe1(&mut a, "$iothub/twin/res/#").await;
    subscribe1(&mut a, "$iothub/twin/PATCH/properties/desired/#").await;
    publish_qos1(
        &mut a,
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        br#"{"fw":"1.2"}"#,
        1,
    )
    .await;
    let p = next_pub(&mut a).await;
    assert_eq!(
        std::str::from_utf8(&p.topic).unwrap(),
        "$iothub/twin/res/204/?$rid=1&$version=1"
    );
    publish_qos1(&mut a, "$iothub/twin/GET/?$rid=2", b" ", 2).await;
    let p = next_pub(&mut a).await;
    assert_eq!(
        std::str::from_utf8(&p.topic).unwrap(),
        "$iothub/twin/res/200/?$rid=2"
    );
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["reported"]["fw"], "1.2");
    assert_eq!(v["reported"]["$version"], 1);
    assert!(v["desired"]["$version"].is_number());
    std::fs::write(
        pki.dir.path().join("twins.json"),
        r#"{"edge1/modA": {"rate": 5}}"#,
    )
    .unwrap();
    let p = next_pub(&mut a).await;
    assert!(
        std::str::from_utf8(&p.topic)
            .unwrap()
            .starts_with("$iothub/twin/PATCH/properties/desired/?$version=")
    );
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["rate"], 5);
    assert!(v["$version"].is_number());
    hub.shutdown().await;
}

#[tokio::test]
async fn direct_methods_over_https() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (mut b, _) = connect_module(&hub, &pki, "modB", false).await;
    subscribe1(&mut b, "$iothub/methods/POST/#").await;
    let client = common::https_client()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", hub.https_addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = |target: &str| {
        format!(
            "https://localhost:{}/twins/{DEVICE}/modules/{target}/methods?api-version=2019-10-01",
            hub.https_addr.port()
        )
    };
    let body = serde_json::json!({"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 5});
    let call = {
        let client = client.clone();
        let url = url("modB");
        let body = body.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-ms-edge-moduleId", "edge1/modA")
                .header("Authorization", module_token("modA"))
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };
    let req = next_pub(&mut b).await;
    let topic = std::str::from_utf8(&req.topic).unwrap().to_owned();
    assert!(
        topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
        "{topic}"
    );
    let rid = topic.rsplit_once("$rid=").unwrap().1;
    let v: serde_json::Value = serde_json::from_slice(&req.payload).unwrap();
    assert_eq!(v["delay"], 1);
    publish_qos1(
        &mut b,
        &format!("$iothub/methods/res/201/?$rid={rid}"),
        br#"{"ok":true}"#,
        9,
    )
    .await;
    let resp = call.await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": 201, "payload": {"ok": true}})
    );

    let send = |target: &str, caller: Option<&str>, token: Option<String>| {
        let mut r = client.post(url(target)).json(&body);
        if let Some(c) = caller {
            r = r.header("x-ms-edge-moduleId", c);
        }
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        r.send()
    };
    // Not connected → 404; bad token → 401; caller mismatch → 401; missing header → 400.
    assert_eq!(
        send("modA", Some("edge1/modB"), Some(module_token("modB")))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        send("modB", Some("edge1/modA"), Some(module_token("modB")))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        send("modB", Some("other/modA"), Some(module_token("modA")))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        send("modB", None, Some(module_token("modA")))
            .await
            .unwrap()
            .status(),
        400
    );
    // Target never answers → 504.
    let slow = serde_json::json!({"methodName": "slow", "responseTimeoutInSeconds": 1});
    let r = client
        .post(url("modB"))
        .header("x-ms-edge-moduleId", "edge1/modA")
        .header("Authorization", module_token("modA"))
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    hub.shutdown().await;
}

#[tokio::test]
async fn keep_alive_is_enforced() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let id = format!("{DEVICE}/modA");
    let mut raw = Raw::open(hub.mqtt_addr, &pki.ca_pem).await;
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id.as_str());
    c.keep_alive = 1;
    c.clean_session = false;
    c.set_credentials(username(&id), module_token("modA"));
    raw.send(Packet::Connect(c)).await;
    assert_eq!(code(raw.recv().await).0, ConnectReturnCode::Success);
    let t0 = std::time::Instant::now();
    assert!(raw.recv().await.is_none(), "silent client must be dropped");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn downstream_device_telemetry_is_stamped_and_routed_upstream() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let tok = SasToken::sign(
        &format!("{HUB}/devices/leaf1"),
        &verge_core::SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
        now() + 600,
        None,
    );
    let (mut leaf, ack) = Raw::connect(
        hub.mqtt_addr,
        &pki.ca_pem,
        "leaf1",
        &username("leaf1"),
        &tok.to_string(),
        false,
    )
    .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    // A device may not listen on a module's inputs.
    assert_eq!(
        subscribe1(
            &mut leaf,
            &format!("devices/{DEVICE}/modules/modB/inputs/#")
        )
        .await,
        SubscribeReasonCode::Failure
    );
    // `$.on` means nothing from a device; the route `leafUp` takes it upstream.
    publish_qos1(
        &mut leaf,
        "devices/leaf1/messages/events/%24.ct=application%2Fjson&%24.on=sneaky&t=21",
        br#"{"t":21.5}"#,
        1,
    )
    .await;
    let queued = hub.state.store.read("$upstream", 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    let m = &queued[0].message;
    assert_eq!(m.body, Bytes::from_static(br#"{"t":21.5}"#));
    assert_eq!(m.system.connection_device_id.as_deref(), Some("leaf1"));
    assert_eq!(m.system.connection_module_id, None);
    assert_eq!(m.system.output_name, None);
    assert_eq!(m.system.content_type.as_deref(), Some("application/json"));
    assert!(m.system.message_id.is_some());
    assert_eq!(m.properties.get("t"), Some("21"));
    // Publishing as another device closes the connection.
    let mut p = Publish::new(
        "devices/leaf2/messages/events/",
        QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    p.pkid = 2;
    leaf.send(Packet::Publish(p)).await;
    assert!(leaf.recv().await.is_none());
    hub.shutdown().await;
}

/// `modA`'s entry in the `$edgeHub` twin's reported `clients`.
fn reported_client(hub: &Hub) -> serde_json::Value {
    hub.state.twins.client_json(&format!("{DEVICE}/$edgeHub"))["reported"]["clients"]
        [format!("{DEVICE}/modA")]
    .clone()
}

/// Waits (up to 5 s) until `modA` is reported with `status`.
async fn wait_reported_status(hub: &Hub, status: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while reported_client(hub)["status"] != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {status}: {}",
            reported_client(hub)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `$edgeHub` twin's reported `clients` follows connections (edgeHub's
/// `clients.<id>`), survives a restart as "Disconnected", and a session
/// take-over does not flap it.
#[tokio::test]
async fn edgehub_twin_reports_clients() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = start(&pki, storage.path()).await;
    let (a, _) = connect_module(&hub, &pki, "modA", false).await;
    wait_reported_status(&hub, "Connected").await;
    let c = reported_client(&hub);
    assert!(c["lastConnectedTimeUtc"].is_string(), "{c}");
    assert!(c["lastDisconnectedTimeUtc"].is_null(), "{c}");

    // A second connection takes the session over: still connected.
    let (a2, _) = connect_module(&hub, &pki, "modA", false).await;
    drop(a);
    tokio::time::sleep(verge_hub::clients::REPORT_DELAY * 2).await;
    assert_eq!(reported_client(&hub)["status"], "Connected");

    drop(a2);
    wait_reported_status(&hub, "Disconnected").await;
    assert!(reported_client(&hub)["lastDisconnectedTimeUtc"].is_string());

    // Connected when the hub stops: "Disconnected" after the restart.
    let (_a3, _) = connect_module(&hub, &pki, "modA", false).await;
    wait_reported_status(&hub, "Connected").await;
    hub.shutdown().await;
    let hub = start(&pki, storage.path()).await;
    wait_reported_status(&hub, "Disconnected").await;
    hub.shutdown().await;
}

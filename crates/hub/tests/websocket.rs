//! MQTT over WebSocket on the HTTPS port (`/$iothub/websocket`, subprotocol
//! `mqtt`), served by the same connection handler as the MQTT port.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use bytes::Bytes;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, SubscribeReasonCode};
use verge_hub::Hub;

const WS_PATH: &str = "/$iothub/websocket";

#[tokio::test]
async fn mqtt_over_websocket_shares_the_mqtt_handler() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();

    // modB over WebSocket, modA over plain MQTT/TLS.
    let id_b = format!("{DEVICE}/modB");
    let ws = ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, Some("mqtt"))
        .await
        .unwrap();
    let (mut b, ack) = ws
        .handshake(&id_b, &username(&id_b), &module_token("modB"), false)
        .await;
    assert_eq!(code(ack), (ConnectReturnCode::Success, false));
    assert_eq!(
        subscribe1(&mut b, &format!("devices/{DEVICE}/modules/modB/inputs/#")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    let out1 = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out1&k=v");
    // A body larger than one WebSocket frame buffer, and a small one: order kept.
    let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    publish_qos1(&mut a, &out1, &big, 1).await;
    publish_qos1(&mut a, &out1, b"small", 2).await;
    let p = next_pub(&mut b).await;
    assert!(
        std::str::from_utf8(&p.topic)
            .unwrap()
            .starts_with("devices/edge1/modules/modB/inputs/in1/")
    );
    assert_eq!(p.payload, Bytes::from(big));
    assert_eq!(next_pub(&mut b).await.payload, Bytes::from_static(b"small"));

    // Twins over the WebSocket too.
    subscribe1(&mut b, "$iothub/twin/res/#").await;
    publish_qos1(
        &mut b,
        "$iothub/twin/PATCH/properties/reported/?$rid=9",
        br#"{"ws":true}"#,
        3,
    )
    .await;
    let p = next_pub(&mut b).await;
    assert_eq!(
        std::str::from_utf8(&p.topic).unwrap(),
        "$iothub/twin/res/204/?$rid=9&$version=1"
    );

    // Session kept across transports: modB comes back over TLS, session present.
    b.send(Packet::Disconnect).await;
    assert!(b.recv().await.is_none());
    let (_b_tls, present) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert!(present);

    // Refusals: bad credentials get CONNACK 5 over WebSocket as well.
    let ws = ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, Some("mqtt"))
        .await
        .unwrap();
    let (mut bad, ack) = ws
        .handshake(&id_b, &username(&id_b), &module_token("modA"), false)
        .await;
    assert_eq!(code(ack).0, ConnectReturnCode::NotAuthorized);
    assert!(bad.recv().await.is_none());
    // Garbage in binary frames closes that connection only.
    let mut junk = ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, Some("mqtt"))
        .await
        .unwrap();
    junk.send_bytes(&[0xf0, 0x00, 0xff, 0xff]).await;
    assert!(junk.recv().await.is_none());
    // No subprotocol, or an unknown one, is refused before the upgrade
    // (AMQPWSB10 is served: AMQP over WebSocket, tested in amqp_interop).
    assert_eq!(
        ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, None)
            .await
            .err(),
        Some(400)
    );
    assert_eq!(
        ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, Some("stomp"))
            .await
            .err(),
        Some(400)
    );
    assert_eq!(
        ws_open(hub.https_addr, &pki.ca_pem, "/$iothub/other", Some("mqtt"))
            .await
            .err(),
        Some(404)
    );
    // The plain MQTT client still works after all that.
    a.send(Packet::PingReq).await;
    assert_eq!(a.recv().await, Some(Packet::PingResp));

    // WebSocket connections end with the hub, like TCP ones.
    let ws = ws_open(hub.https_addr, &pki.ca_pem, WS_PATH, Some("mqtt"))
        .await
        .unwrap();
    let (mut last, ack) = ws
        .handshake(&id_b, &username(&id_b), &module_token("modB"), false)
        .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    hub.shutdown().await;
    assert!(
        last.recv().await.is_none(),
        "the hub must close WebSocket clients on shutdown"
    );
}

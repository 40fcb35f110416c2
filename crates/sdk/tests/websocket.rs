//! The SDK over MQTT-over-WebSocket (`ClientOptions::websocket`, the
//! transport the agent's twin link uses with `UpstreamProtocol=MqttWs`)
//! against a real `verge-hub` on 127.0.0.1, whose HTTPS port serves
//! `/$iothub/websocket`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use bytes::Bytes;
use common::*;
use verge_sdk::{ClientOptions, Message, ModuleClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_over_websocket_sends_and_reads_its_twin() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let opts = ClientOptions {
        port: hub.https_addr.port(),
        websocket: true,
        ..options(&hub)
    };
    let a = ModuleClient::from_connection_string_with(&module_cs("modA"), Some(&env.ca_pem), opts)
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    for i in 0..5u8 {
        tokio::time::timeout(T, a.send_output("out1", Message::new(vec![i, 0xff])))
            .await
            .unwrap()
            .unwrap();
    }
    for i in 0..5u8 {
        let got = tokio::time::timeout(T, inputs.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message.body, Bytes::from(vec![i, 0xff]));
        assert_eq!(
            got.message.system.connection_module_id.as_deref(),
            Some("modA")
        );
    }
    let twin = tokio::time::timeout(T, a.get_twin())
        .await
        .unwrap()
        .unwrap();
    assert!(twin.get("desired").is_some(), "{twin}");

    // The same client on the MQTT/TLS port with `websocket` set fails to
    // connect (no WebSocket upgrade there): the option is really in use.
    let wrong = ClientOptions {
        port: hub.mqtt_addr.port(),
        websocket: true,
        ..options(&hub)
    };
    let c = ModuleClient::from_connection_string_with(&module_cs("modA"), Some(&env.ca_pem), wrong)
        .await
        .unwrap();
    assert!(
        c.wait_connected(std::time::Duration::from_secs(2))
            .await
            .is_err()
    );
    hub.shutdown().await;
}

//! The SDK against a real `verge-hub` started in-process on 127.0.0.1.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::json;
use verge_sdk::{DeviceClient, Error, Message, ModuleClient};

async fn recv<T>(s: &mut verge_sdk::Incoming<T>) -> T {
    tokio::time::timeout(T, s.recv())
        .await
        .expect("timed out waiting for an item")
        .expect("stream closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_routes_to_input_in_order_with_properties_and_binary_body() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let a = module(&hub, &env, "modA").await;
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    // A second stream while one is active is refused.
    assert!(matches!(b.inputs().await, Err(Error::AlreadyReceiving(_))));

    for i in 0..20u8 {
        let mut m = Message::new(vec![0u8, 0xff, i, b'&', b'/']);
        m.system.message_id = Some(format!("mid-{i}"));
        m.system.content_type = Some("application/octet-stream".into());
        m.properties.insert("seq", i.to_string());
        m.properties.insert("a/b c", "x&y=z");
        tokio::time::timeout(T, a.send_output("out1", m))
            .await
            .unwrap()
            .unwrap();
    }
    for i in 0..20u8 {
        let got = recv(&mut inputs).await;
        assert_eq!(got.input, "in1");
        let m = got.message;
        assert_eq!(m.body, Bytes::from(vec![0u8, 0xff, i, b'&', b'/']));
        assert_eq!(m.properties.get("seq"), Some(i.to_string().as_str()));
        assert_eq!(m.properties.get("a/b c"), Some("x&y=z"));
        assert_eq!(
            m.system.message_id.as_deref(),
            Some(format!("mid-{i}").as_str())
        );
        assert_eq!(
            m.system.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(m.system.connection_module_id.as_deref(), Some("modA"));
        assert_eq!(m.system.input_name.as_deref(), Some("in1"));
    }
    // Dropping the stream hands the queue back: a new stream gets later messages.
    drop(inputs);
    a.send_output("out1", Message::new("after")).await.unwrap();
    let mut again = b.inputs().await.unwrap();
    assert_eq!(recv(&mut again).await.message.body, Bytes::from("after"));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_get_patch_reported_and_desired_patches() {
    init_tracing();
    let env = env();
    env.set_desired(&json!({"edge1/modB": {"SendInterval": 5}}));
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let b = module(&hub, &env, "modB").await;

    // The hub loads the desired file in the background; wait for it.
    let deadline = tokio::time::Instant::now() + T;
    let twin = loop {
        let twin = b.get_twin().await.unwrap();
        if twin["desired"]["SendInterval"] == 5 {
            break twin;
        }
        assert!(tokio::time::Instant::now() < deadline, "{twin}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v0 = twin["desired"]["$version"].as_u64().unwrap();

    let v = b
        .patch_reported(&json!({"fw": "1.2", "nested": {"a": 1}}))
        .await
        .unwrap();
    assert!(v.is_some());
    b.patch_reported(&json!({"nested": {"b": 2}}))
        .await
        .unwrap();
    let twin = b.get_twin().await.unwrap();
    assert_eq!(twin["reported"]["fw"], "1.2");
    assert_eq!(twin["reported"]["nested"], json!({"a": 1, "b": 2}));
    assert!(b.patch_reported(&json!([1, 2])).await.is_err());

    let mut desired = b.desired_patches().await.unwrap();
    env.set_desired(&json!({"edge1/modB": {"SendInterval": 1, "Threshold": 30}}));
    let patch = recv(&mut desired).await;
    assert_eq!(patch["SendInterval"], 1);
    assert_eq!(patch["Threshold"], 30);
    assert!(patch["$version"].as_u64().unwrap() > v0);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_methods_between_modules_over_https() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let a = module(&hub, &env, "modA").await;
    let b = module(&hub, &env, "modB").await;

    // Not listening yet: the hub answers 404.
    let e = a
        .invoke_method(
            DEVICE,
            Some("modB"),
            "echo",
            json!(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Service { status: 404, .. }), "{e}");

    b.on_method(|req| async move {
        match req.name.as_str() {
            "echo" => (200, json!({"echo": req.payload})),
            _ => (404, json!({"message": "unknown method"})),
        }
    })
    .await
    .unwrap();
    let r = a
        .invoke_method(
            DEVICE,
            Some("modB"),
            "echo",
            json!({"x": [1, 2, "three"]}),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.payload, json!({"echo": {"x": [1, 2, "three"]}}));
    let r = a
        .invoke_method(
            DEVICE,
            Some("modB"),
            "nope",
            json!(null),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);

    // The raw HTTPS API with the caller's SAS token, as any SDK would call it.
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(env.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let token = verge_core::SasToken::sign(
        &format!("{HUB}/devices/{DEVICE}/modules/modA"),
        &module_key("modA"),
        verge_hub::auth::unix_now() + 600,
        None,
    );
    let resp = http
        .post(format!(
            "https://localhost:{}/twins/{DEVICE}/modules/modB/methods?api-version=2019-10-01",
            hub.https_addr.port()
        ))
        .header("x-ms-edge-moduleId", format!("{DEVICE}/modA"))
        .header("Authorization", token.to_string())
        .json(&json!({"methodName": "echo", "payload": "hi", "responseTimeoutInSeconds": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body, json!({"status": 200, "payload": {"echo": "hi"}}));
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_client_sends_telemetry_through_the_gateway() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    let leaf =
        DeviceClient::from_connection_string_with(&leaf_cs(), Some(&env.ca_pem), options(&hub))
            .await
            .unwrap();
    let mut m = Message::new(r#"{"t":21.5}"#);
    m.properties.insert("kind", "leaf");
    tokio::time::timeout(T, leaf.send_event(m))
        .await
        .unwrap()
        .unwrap();
    let got = recv(&mut inputs).await;
    assert_eq!(got.input, "leaf");
    assert_eq!(got.message.body, Bytes::from(r#"{"t":21.5}"#));
    assert_eq!(got.message.properties.get("kind"), Some("leaf"));
    assert_eq!(
        got.message.system.connection_device_id.as_deref(),
        Some("leaf1")
    );
    // Device twin and C2D subscription work too.
    leaf.patch_reported(&json!({"battery": 90})).await.unwrap();
    assert_eq!(leaf.get_twin().await.unwrap()["reported"]["battery"], 90);
    let _c2d = leaf.c2d_messages().await.unwrap();
    // Module connection strings are refused by DeviceClient and vice versa.
    assert!(
        DeviceClient::from_connection_string(&module_cs("modA"), Some(&env.ca_pem))
            .await
            .is_err()
    );
    assert!(
        ModuleClient::from_connection_string(&leaf_cs(), Some(&env.ca_pem))
            .await
            .is_err()
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_renewed_and_messages_keep_flowing() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let opts = verge_sdk::ClientOptions {
        sas_ttl: Duration::from_secs(4),
        ..options(&hub)
    };
    let a = ModuleClient::from_connection_string_with(&module_cs("modA"), Some(&env.ca_pem), opts)
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    // 9 s with 4 s tokens: at least two renewals (reconnects with a fresh token).
    for i in 0..18u32 {
        tokio::time::timeout(T, a.send_output("out1", Message::new(i.to_string())))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(a.connections() >= 3, "connections: {}", a.connections());
    let mut seen = Vec::new();
    while seen.len() < 18 {
        let m = recv(&mut inputs).await;
        let n: u32 = std::str::from_utf8(&m.message.body)
            .unwrap()
            .parse()
            .unwrap();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..18).collect::<Vec<_>>());
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_hub_restart_and_bounds_the_send_queue() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let (mqtt, https) = (hub.mqtt_addr.port(), hub.https_addr.port());
    let opts = verge_sdk::ClientOptions {
        send_queue: 2,
        ..options(&hub)
    };
    let a = ModuleClient::from_connection_string_with(&module_cs("modA"), Some(&env.ca_pem), opts)
        .await
        .unwrap();
    a.wait_connected(T).await.unwrap();
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    a.send_output("out1", Message::new("before")).await.unwrap();
    assert_eq!(recv(&mut inputs).await.message.body, Bytes::from("before"));

    hub.shutdown().await;
    let deadline = tokio::time::Instant::now() + T;
    while a.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client did not notice"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two sends wait for the hub; a third does not fit the queue.
    let a1 = a.clone();
    let s1 = tokio::spawn(async move { a1.send_output("out1", Message::new("during-1")).await });
    let a2 = a.clone();
    let s2 = tokio::spawn(async move { a2.send_output("out1", Message::new("during-2")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        a.send_output("out1", Message::new("overflow")).await,
        Err(Error::QueueFull)
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!s1.is_finished() && !s2.is_finished());

    let hub = env.start_hub_on(DEFAULT_ROUTES, mqtt, https).await;
    tokio::time::timeout(T, s1).await.unwrap().unwrap().unwrap();
    tokio::time::timeout(T, s2).await.unwrap().unwrap().unwrap();
    // At-least-once: "before" may come again if its PUBACK did not reach the
    // hub before it stopped.
    let mut got = Vec::new();
    while got.len() < 2 {
        let body = recv(&mut inputs).await.message.body;
        if body != "before" && !got.contains(&body) {
            got.push(body);
        }
    }
    got.sort();
    assert_eq!(got, vec![Bytes::from("during-1"), Bytes::from("during-2")]);
    // Subscriptions survived (session kept by the hub): B still receives.
    a.send_output("out1", Message::new("after")).await.unwrap();
    loop {
        if recv(&mut inputs).await.message.body == "after" {
            break;
        }
    }
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_made_again_when_the_hub_lost_the_session() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let (mqtt, https) = (hub.mqtt_addr.port(), hub.https_addr.port());
    let a = module(&hub, &env, "modA").await;
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    b.on_method(|_| async { (200, json!("pong")) })
        .await
        .unwrap();
    a.send_output("out1", Message::new("one")).await.unwrap();
    assert_eq!(recv(&mut inputs).await.message.body, Bytes::from("one"));

    // Restart the hub without its persisted sessions: CONNACK session_present = 0.
    hub.shutdown().await;
    // (One file per session under `sessions/`.)
    std::fs::remove_dir_all(env.storage.join("sessions")).unwrap();
    let hub = env.start_hub_on(DEFAULT_ROUTES, mqtt, https).await;
    let before = b.connections();
    let deadline = tokio::time::Instant::now() + T;
    while b.connections() == before || !b.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Inputs and methods work again without the application doing anything.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match a
            .invoke_method(
                DEVICE,
                Some("modB"),
                "ping",
                json!(null),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(r) => {
                assert_eq!(r.payload, json!("pong"));
                break;
            }
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    a.send_output("out1", Message::new("two")).await.unwrap();
    loop {
        if recv(&mut inputs).await.message.body == "two" {
            break;
        }
    }
    hub.shutdown().await;
}

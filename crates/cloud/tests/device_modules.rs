//! Module registration by the edge device itself over real TLS:
//! `PUT`/`GET`/`DELETE /devices/{d}/modules/{m}` and `GET
//! /devices/{d}/modules` with the device's own SAS token, for its own
//! modules only (another device's token → 403, a bad token → 401), same
//! shapes as with the service policy.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use serde_json::{Value, json};
use verge_cloud::api::{ApiState, ServiceAuth};
use verge_cloud::registry::SymmetricKeys;
use verge_cloud::{CloudOptions, CloudState, DeviceSpec, tls};
use verge_core::{SasToken, SharedAccessKey};

fn key(b: u8) -> String {
    SharedAccessKey::from_bytes(vec![b; 32]).to_base64()
}

fn token(resource: &str, b: u8) -> String {
    SasToken::sign(
        resource,
        &SharedAccessKey::from_bytes(vec![b; 32]),
        4_000_000_000,
        None,
    )
    .to_string()
}

#[tokio::test]
async fn edge_device_registers_its_own_modules_only() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let files = tls::ensure_files(dir.path(), &host, None, None).unwrap();
    let cfg = tls::server_config(&files).unwrap();
    let cloud = CloudState::open(CloudOptions {
        data_dir: dir.path().to_owned(),
        hostname: host.clone(),
    })
    .unwrap();
    let policy = SharedAccessKey::from_bytes(vec![3u8; 32]);
    let state = ApiState {
        cloud: cloud.clone(),
        auth: Arc::new(ServiceAuth::new(
            host.clone(),
            "iothubowner",
            policy.clone(),
        )),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(verge_cloud::api::serve(listener, cfg, state, async {
        let _ = stop_rx.await;
    }));
    for (id, b) in [("edge1", 1u8), ("edge2", 2)] {
        let spec = DeviceSpec {
            keys: Some(SymmetricKeys {
                primary: key(b),
                secondary: key(b),
            }),
            iot_edge: true,
            ..DeviceSpec::default()
        };
        cloud.put_device(id, spec, None).await.unwrap();
    }

    let leaf = DeviceSpec {
        keys: Some(SymmetricKeys {
            primary: key(4),
            secondary: key(4),
        }),
        ..DeviceSpec::default()
    };
    cloud.put_device("leaf", leaf, None).await.unwrap();
    let ca = std::fs::read(files.ca.unwrap()).unwrap();
    // reqwest has no crypto provider of its own: ring, as verge-cloud.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let call = |method: reqwest::Method, path: &str, auth: Option<&str>, body: Option<Value>| {
        let mut r = http.request(
            method,
            format!("https://{host}{path}?api-version=2021-04-12"),
        );
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        if let Some(b) = body {
            r = r.header("If-Match", "\"*\"").json(&b);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let v = r.json::<Value>().await.unwrap_or(Value::Null);
            (status, v)
        }
    };
    let edge1 = token(&format!("{host}/devices/edge1"), 1);
    let module = |k: u8| {
        json!({"moduleId": "modA", "deviceId": "edge1", "managedBy": "iotedge",
            "authentication": {"type": "sas",
                "symmetricKey": {"primaryKey": key(k), "secondaryKey": key(k)}}})
    };
    use reqwest::Method;

    // Create, read, list, update: the service API's shapes.
    let (s, v) = call(
        Method::PUT,
        "/devices/edge1/modules/modA",
        Some(&edge1),
        Some(module(10)),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["authentication"]["symmetricKey"]["primaryKey"], key(10));
    assert_eq!(v["managedBy"], "iotedge");
    let (s, v) = call(
        Method::GET,
        "/devices/edge1/modules/modA",
        Some(&edge1),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deviceId"], "edge1");
    assert_eq!(v["authentication"]["symmetricKey"]["secondaryKey"], key(10));
    let (s, v) = call(Method::GET, "/devices/edge1/modules", Some(&edge1), None).await;
    assert_eq!(s, 200, "{v}");
    let mut ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["$edgeAgent", "$edgeHub", "modA"]);
    let (s, v) = call(
        Method::PUT,
        "/devices/edge1/modules/%24edgeAgent",
        Some(&edge1),
        Some(json!({
        "moduleId": "$edgeAgent", "authentication": {"type": "sas",
            "symmetricKey": {"primaryKey": key(11), "secondaryKey": key(11)}}})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        cloud
            .get_module("edge1", "$edgeAgent")
            .unwrap()
            .record
            .keys
            .primary,
        key(11)
    );
    // The module's own token now works at the device side.
    let mod_token = token(&format!("{host}/devices/edge1/modules/modA"), 10);
    cloud.verify_device_token("edge1/modA", &mod_token).unwrap();

    // Another device's valid token: 403, nothing changed.
    let edge2 = token(&format!("{host}/devices/edge2"), 2);
    for (m, p, b) in [
        (Method::PUT, "/devices/edge1/modules/modA", Some(module(12))),
        (Method::GET, "/devices/edge1/modules/modA", None),
        (Method::GET, "/devices/edge1/modules", None),
        (Method::DELETE, "/devices/edge1/modules/modA", None),
    ] {
        let (s, v) = call(m.clone(), p, Some(&edge2), b).await;
        assert_eq!(s, 403, "{m} {p}: {v}");
    }
    // A leaf device, with its own valid token, has no modules to register.
    let leaf_token = token(&format!("{host}/devices/leaf"), 4);
    let (s, v) = call(
        Method::PUT,
        "/devices/leaf/modules/modX",
        Some(&leaf_token),
        Some(json!({"moduleId": "modX"})),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    // A module's valid token may not manage modules either.
    let (s, _) = call(
        Method::GET,
        "/devices/edge1/modules",
        Some(&mod_token),
        None,
    )
    .await;
    assert_eq!(s, 403);
    // Bad tokens: 401 (edge2's key on edge1's resource, no token, garbage).
    let forged = token(&format!("{host}/devices/edge1"), 2);
    let (s, v) = call(
        Method::PUT,
        "/devices/edge1/modules/modA",
        Some(&forged),
        Some(module(12)),
    )
    .await;
    assert_eq!(s, 401, "{v}");
    let (s, _) = call(Method::GET, "/devices/edge1/modules", None, None).await;
    assert_eq!(s, 401);
    let (s, _) = call(
        Method::GET,
        "/devices/edge1/modules",
        Some("SharedAccessSignature x"),
        None,
    )
    .await;
    assert_eq!(s, 401);
    let expired = SasToken::sign(
        &format!("{host}/devices/edge1"),
        &SharedAccessKey::from_bytes(vec![1u8; 32]),
        10,
        None,
    )
    .to_string();
    let (s, _) = call(Method::GET, "/devices/edge1/modules", Some(&expired), None).await;
    assert_eq!(s, 401);
    assert_eq!(
        cloud
            .get_module("edge1", "modA")
            .unwrap()
            .record
            .keys
            .primary,
        key(10)
    );
    // The device token opens nothing else of the service API.
    for (m, p) in [
        (Method::GET, "/devices/edge1"),
        (Method::GET, "/twins/edge1/modules/modA"),
        (Method::GET, "/devices"),
    ] {
        let (s, _) = call(m.clone(), p, Some(&edge1), None).await;
        assert_eq!(s, 401, "{m} {p}");
    }
    // The service policy still works on the same paths.
    let policy_token =
        SasToken::sign(&host, &policy, 4_000_000_000, Some("iothubowner")).to_string();
    let (s, _) = call(
        Method::GET,
        "/devices/edge1/modules/modA",
        Some(&policy_token),
        None,
    )
    .await;
    assert_eq!(s, 200);

    // Delete with the device token.
    let (s, _) = call(
        Method::DELETE,
        "/devices/edge1/modules/modA",
        Some(&edge1),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(
        Method::GET,
        "/devices/edge1/modules/modA",
        Some(&edge1),
        None,
    )
    .await;
    assert_eq!(s, 404);
    assert!(cloud.verify_device_token("edge1/modA", &mod_token).is_err());

    let _ = stop_tx.send(());
    server.await.unwrap();
}

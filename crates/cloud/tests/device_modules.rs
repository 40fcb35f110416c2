//! Module registration by the edge device itself over real TLS:
//! `PUT`/`GET`/`DELETE /devices/{d}/modules/{m}` and `GET
//! /devices/{d}/modules` with the device's own SAS token, for its own
//! modules only (another device's token → 403, a bad token → 401), same
//! shapes as with the service policy.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::ApiServer;
use serde_json::{Value, json};
use verge_cloud::DeviceSpec;
use verge_cloud::registry::SymmetricKeys;
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
    let api = ApiServer::start().await;
    let (host, cloud) = (&api.host, &api.cloud);
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
    let http = api.client();
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
    let policy_token = api.policy_token();
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

    api.stop().await;
}

/// An X.509 edge device (what verged does with `method = "x509"`): no
/// token, its client certificate authenticates it on its own module
/// registry; a certificate the registry does not know (or a device
/// registered for SAS) is a 401, a leaf's good certificate a 403, and the
/// certificate opens nothing else of the service API.
#[tokio::test]
async fn x509_edge_device_registers_its_modules_by_its_certificate() {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let api = ApiServer::start().await;
    let (host, cloud) = (&api.host, &api.cloud);
    let self_signed = |cn| verge_testkit::x509::leaf(cn, None, false, (-1, 30));
    let edge = self_signed("xedge");
    let leaf = self_signed("xleaf");
    let stranger = self_signed("xedge");
    let by_thumbprint = |der: &[u8], edge: bool| DeviceSpec {
        x509: Some(verge_x509::X509Auth::SelfSigned {
            primary: Some(verge_x509::thumbprints(der).1),
            secondary: None,
        }),
        iot_edge: edge,
        ..DeviceSpec::default()
    };
    cloud
        .put_device("xedge", by_thumbprint(&edge.der, true), None)
        .await
        .unwrap();
    cloud
        .put_device("xleaf", by_thumbprint(&leaf.der, false), None)
        .await
        .unwrap();
    let sas = DeviceSpec {
        keys: Some(SymmetricKeys {
            primary: key(1),
            secondary: key(1),
        }),
        iot_edge: true,
        ..DeviceSpec::default()
    };
    cloud.put_device("sasedge", sas, None).await.unwrap();

    // A client presenting `cert` (verged's TLS set-up for an X.509 device).
    let client = |cert: &verge_testkit::x509::Leaf| {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&api.ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = vec![CertificateDer::from(cert.der.clone())];
        let pk = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, pk)
            .unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .unwrap()
    };
    let call = |http: reqwest::Client, method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut r = http.request(
            method,
            format!("https://{host}{path}?api-version=2021-04-12"),
        );
        if let Some(b) = body {
            r = r.header("If-Match", "\"*\"").json(&b);
        }
        async move {
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let module = |device: &str| {
        json!({"moduleId": "modA", "deviceId": device, "managedBy": "iotedge",
            "authentication": {"type": "sas",
                "symmetricKey": {"primaryKey": key(10), "secondaryKey": key(10)}}})
    };
    use reqwest::Method;

    let (edge_http, leaf_http, stranger_http) = (client(&edge), client(&leaf), client(&stranger));
    let (s, v) = call(
        edge_http.clone(),
        Method::PUT,
        "/devices/xedge/modules/modA",
        Some(module("xedge")),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        cloud
            .get_module("xedge", "modA")
            .unwrap()
            .record
            .keys
            .primary,
        key(10)
    );
    let (s, v) = call(
        edge_http.clone(),
        Method::GET,
        "/devices/xedge/modules",
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");

    // A certificate with the right CN but another thumbprint: 401.
    let (s, v) = call(stranger_http, Method::GET, "/devices/xedge/modules", None).await;
    assert_eq!(s, 401, "{v}");
    // The edge's certificate on a device registered for SAS: 401.
    let (s, v) = call(
        edge_http.clone(),
        Method::GET,
        "/devices/sasedge/modules",
        None,
    )
    .await;
    assert_eq!(s, 401, "{v}");
    // A leaf's good certificate: it has no modules to register (403).
    let (s, v) = call(
        leaf_http,
        Method::PUT,
        "/devices/xleaf/modules/modA",
        Some(module("xleaf")),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    // The certificate opens nothing else of the service API.
    for (m, p) in [
        (Method::GET, "/devices/xedge"),
        (Method::GET, "/twins/xedge/modules/modA"),
        (Method::GET, "/devices"),
    ] {
        let (s, _) = call(edge_http.clone(), m.clone(), p, None).await;
        assert_eq!(s, 401, "{m} {p}");
    }
    let (s, _) = call(
        edge_http,
        Method::DELETE,
        "/devices/xedge/modules/modA",
        None,
    )
    .await;
    assert_eq!(s, 204);

    api.stop().await;
}

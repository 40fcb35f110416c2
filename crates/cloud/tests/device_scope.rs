//! `POST /devices/{edge}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope`
//! over real TLS: the edge device (or its `$edgeHub` module) gets its
//! children with their keys; every other caller or target is refused.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::ApiServer;
use serde_json::{Value, json};
use verge_cloud::DeviceSpec;
use verge_cloud::registry::SymmetricKeys;
use verge_core::{SasToken, SharedAccessKey};

fn keys(b: u8) -> SymmetricKeys {
    let k = SharedAccessKey::from_bytes(vec![b; 32]).to_base64();
    SymmetricKeys {
        primary: k.clone(),
        secondary: k,
    }
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
async fn edge_gets_its_own_scope_only() {
    let api = ApiServer::start().await;
    let (host, cloud) = (&api.host, &api.cloud);

    let edge_spec = |b| DeviceSpec {
        keys: Some(keys(b)),
        iot_edge: true,
        ..DeviceSpec::default()
    };
    let (edge, _) = cloud.put_device("edge1", edge_spec(1), None).await.unwrap();
    cloud.put_device("edge2", edge_spec(2), None).await.unwrap();
    let scope = edge.record.device_scope.clone().unwrap();
    let child = |b| DeviceSpec {
        keys: Some(keys(b)),
        parent_scopes: vec![scope.clone()],
        ..DeviceSpec::default()
    };
    cloud.put_device("leafA", child(10), None).await.unwrap();
    cloud.put_device("leafB", child(11), None).await.unwrap();
    cloud
        .put_device(
            "orphan",
            DeviceSpec {
                keys: Some(keys(12)),
                ..DeviceSpec::default()
            },
            None,
        )
        .await
        .unwrap();
    let hub_module = cloud.get_module("edge1", "$edgeHub").unwrap();
    let hub_key = SharedAccessKey::from_base64(&hub_module.record.keys.primary).unwrap();

    let http = api.client();
    let post = |device: &str, module: &str, auth: Option<String>, body: Value| {
        let mut r = http
            .post(format!(
                "https://{host}/devices/{device}/modules/{}/devicesAndModulesInTargetDeviceScope?api-version=2020-06-30-preview",
                module.replace('$', "%24")
            ))
            .json(&body);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    let body = json!({"pageSize": 100, "authChain": "edge1"});

    // The edge device's own token.
    let r = post(
        "edge1",
        "$edgeHub",
        Some(token(&format!("{host}/devices/edge1"), 1)),
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let mut ids: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["leafA", "leafB"]);
    assert_eq!(
        v["devices"][0]["authentication"]["symmetricKey"]["primaryKey"],
        SharedAccessKey::from_bytes(vec![10u8; 32]).to_base64()
    );
    let modules: Vec<&str> = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert!(modules.contains(&"$edgeHub"), "{modules:?}");
    assert!(v["continuationLink"].is_null());

    // Its $edgeHub module's token, and no body at all.
    let module_token = SasToken::sign(
        &format!("{host}/devices/edge1/modules/$edgeHub"),
        &hub_key,
        4_000_000_000,
        None,
    )
    .to_string();
    let r = post("edge1", "$edgeHub", Some(module_token), Value::Null)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Refused: no token; the service policy; a child's token; another edge's token.
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(post("edge1", "$edgeHub", None, body.clone()).await.unwrap()),
        401
    );
    let policy_token = api.policy_token();
    assert_eq!(
        status(
            post("edge1", "$edgeHub", Some(policy_token), body.clone())
                .await
                .unwrap()
        ),
        401
    );
    let leaf_token = token(&format!("{host}/devices/leafA"), 10);
    assert_eq!(
        status(
            post("edge1", "$edgeHub", Some(leaf_token.clone()), body.clone())
                .await
                .unwrap()
        ),
        401
    );
    let edge2_token = token(&format!("{host}/devices/edge2"), 2);
    assert_eq!(
        status(
            post("edge1", "$edgeHub", Some(edge2_token.clone()), body.clone())
                .await
                .unwrap()
        ),
        401
    );
    // Forbidden: another target in authChain; a module other than $edgeHub;
    // a device that is not an edge device.
    let edge1_token = token(&format!("{host}/devices/edge1"), 1);
    let r = post(
        "edge1",
        "$edgeHub",
        Some(edge1_token.clone()),
        json!({"authChain": "edge2;edge1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["iothub-errorcode"], "IotHubUnauthorizedAccess");
    assert_eq!(
        status(
            post("edge1", "modX", Some(edge1_token), body.clone())
                .await
                .unwrap()
        ),
        403
    );
    let orphan_token = token(&format!("{host}/devices/orphan"), 12);
    assert_eq!(
        status(
            post("orphan", "$edgeHub", Some(orphan_token), json!({}))
                .await
                .unwrap()
        ),
        403
    );
    // edge2 gets its own (empty) scope, never edge1's.
    let r = post(
        "edge2",
        "$edgeHub",
        Some(edge2_token),
        json!({"authChain": "edge2"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["devices"], json!([]));

    api.stop().await;
}

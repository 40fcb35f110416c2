//! Unit tests of the cloud's X.509 rules: the device endpoint's SAS check
//! (an X.509 device refuses its own tokens; an edge device, or its
//! `$edgeHub`, may sign for its own leaves only), certificate checks
//! against the registry, and an update without `authentication` keeping it.
#![allow(clippy::unwrap_used)]

use verge_core::{SasToken, SharedAccessKey};
use verge_x509::X509Auth;

use crate::registry::{DeviceSpec, SymmetricKeys};
use crate::{CloudOptions, CloudState, DeviceStatus};

const HOST: &str = "cloud.test";

fn key(b: u8) -> SharedAccessKey {
    SharedAccessKey::from_bytes(vec![b; 32])
}

fn keys(b: u8) -> Option<SymmetricKeys> {
    Some(SymmetricKeys {
        primary: key(b).to_base64(),
        secondary: key(b.wrapping_add(1)).to_base64(),
    })
}

fn token(resource: &str, k: &SharedAccessKey) -> String {
    SasToken::sign(&format!("{HOST}/{resource}"), k, 4_000_000_000, None).to_string()
}

fn cert(cn: &str) -> verge_x509::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.self_signed(&key).unwrap().der().clone()
}

#[tokio::test]
async fn on_behalf_of_and_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let c = CloudState::open(CloudOptions {
        data_dir: dir.path().to_owned(),
        hostname: HOST.into(),
    })
    .unwrap();
    let put = |id: &'static str, spec: DeviceSpec| {
        let c = c.clone();
        async move { c.put_device(id, spec, None).await.unwrap().0 }
    };
    let edge = put(
        "edge",
        DeviceSpec {
            iot_edge: true,
            keys: keys(1),
            ..DeviceSpec::default()
        },
    )
    .await;
    let other_edge = put(
        "edge2",
        DeviceSpec {
            iot_edge: true,
            keys: keys(3),
            ..DeviceSpec::default()
        },
    )
    .await;
    let scope = edge.record.device_scope.clone().unwrap();
    let leaf_cert = cert("leaf");
    let (_, sha256) = verge_x509::thumbprints(&leaf_cert);
    let x509 = |scope: Option<&str>| DeviceSpec {
        x509: Some(X509Auth::SelfSigned {
            primary: Some(sha256.clone()),
            secondary: None,
        }),
        parent_scopes: scope.map(|s| vec![s.to_owned()]).unwrap_or_default(),
        ..DeviceSpec::default()
    };
    let leaf = put("leaf", x509(Some(&scope))).await;
    put(
        "other",
        x509(Some(other_edge.record.device_scope.as_deref().unwrap())),
    )
    .await;
    assert_eq!(
        leaf.to_json()["authentication"]["type"],
        "selfSigned",
        "{}",
        leaf.to_json()
    );
    assert!(leaf.to_json()["authentication"]["symmetricKey"]["primaryKey"].is_null());

    // The X.509 device refuses its own SAS tokens (its hidden keys included).
    let own = token("devices/leaf", &key(9));
    let e = c
        .verify_device_client("leaf", &own)
        .unwrap_err()
        .to_string();
    assert!(e.contains("registered for X.509"), "{e}");
    // Its edge (device or $edgeHub key) signs for it; not for another's leaf.
    let by_edge = token("devices/edge", &key(1));
    c.verify_device_client("leaf", &by_edge).unwrap();
    let hub_key = c
        .get_module("edge", "$edgeHub")
        .unwrap()
        .record
        .keys
        .decoded()[0]
        .clone();
    let by_hub = token("devices/edge/modules/$edgeHub", &hub_key);
    c.verify_device_client("leaf", &by_hub).unwrap();
    let e = c
        .verify_device_client("other", &by_edge)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in the device scope"), "{e}");
    // A wrong signature of the edge, or a non-hub module, is refused.
    let forged = token("devices/edge", &key(7));
    assert!(c.verify_device_client("leaf", &forged).is_err());
    let agent_key = c
        .get_module("edge", "$edgeAgent")
        .unwrap()
        .record
        .keys
        .decoded()[0]
        .clone();
    let by_agent = token("devices/edge/modules/$edgeAgent", &agent_key);
    assert!(c.verify_device_client("leaf", &by_agent).is_err());
    // A module cannot be signed for.
    assert!(c.verify_device_client("edge/$edgeAgent", &by_edge).is_err());
    // SAS devices keep working as before.
    c.verify_device_client("edge", &by_edge).unwrap();

    // Certificates.
    c.verify_device_cert("leaf", std::slice::from_ref(&leaf_cert))
        .unwrap();
    let e = c
        .verify_device_cert("leaf", &[cert("leaf")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("thumbprint"), "{e}");
    let e = c
        .verify_device_cert("edge", std::slice::from_ref(&leaf_cert))
        .unwrap_err()
        .to_string();
    assert!(e.contains("registered for SAS"), "{e}");
    let e = c
        .verify_device_cert("edge/$edgeHub", std::slice::from_ref(&leaf_cert))
        .unwrap_err()
        .to_string();
    assert!(e.contains("module"), "{e}");

    // An update without `authentication` keeps X.509; `sas` switches back.
    let (d, _) = c
        .put_device(
            "leaf",
            DeviceSpec {
                status: Some(DeviceStatus::Disabled),
                parent_scopes: vec![scope.clone()],
                ..DeviceSpec::default()
            },
            Some("*".into()),
        )
        .await
        .unwrap();
    assert!(d.record.x509.is_some());
    let e = c
        .verify_device_cert("leaf", std::slice::from_ref(&leaf_cert))
        .unwrap_err()
        .to_string();
    assert!(e.contains("disabled"), "{e}");
    assert!(
        c.verify_device_client("leaf", &by_edge).is_err(),
        "disabled"
    );
    let spec = DeviceSpec::from_json(
        "leaf",
        &serde_json::json!({"authentication": {"type": "sas"}, "parentScopes": [scope]}),
    )
    .unwrap();
    let (d, _) = c.put_device("leaf", spec, Some("*".into())).await.unwrap();
    assert!(d.record.x509.is_none());
    assert_eq!(d.to_json()["authentication"]["type"], "sas");
}

//! Unit tests of CloudState's rules (registry, twins, auth, deployments,
//! D2C durability, methods, C2D).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use verge_core::{ClientId, DeviceId, Message, ModuleId, SasToken, SharedAccessKey};
use verge_endpoint::session::Transport;

use crate::registry::{DeviceSpec, ModuleSpec, SymmetricKeys};
use crate::{CloudError, CloudOptions, CloudState, ConnectionEvent, MethodResponse, Settlement};

const HOST: &str = "cloud.test";

fn open(dir: &std::path::Path) -> CloudState {
    CloudState::open(CloudOptions {
        data_dir: dir.to_owned(),
        hostname: HOST.into(),
    })
    .unwrap()
}

fn dev(id: &str) -> ClientId {
    ClientId::device(DeviceId::new(id).unwrap())
}

fn module(d: &str, m: &str) -> ClientId {
    ClientId::module(DeviceId::new(d).unwrap(), ModuleId::new(m).unwrap())
}

fn edge() -> DeviceSpec {
    DeviceSpec {
        iot_edge: true,
        ..DeviceSpec::default()
    }
}

#[tokio::test]
async fn registry_etags_generations_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (d, created) = c
        .put_device("d1", DeviceSpec::default(), None)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(d.record.keys.decoded().len(), 2, "keys generated");
    let gen1 = d.record.generation_id.clone();
    // Existing + no If-Match: 409. Wrong etag: 412. Right etag: update.
    let e = c
        .put_device("d1", DeviceSpec::default(), None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
    let e = c
        .put_device("d1", DeviceSpec::default(), Some("\"nope\"".into()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 412);
    let (d2, created) = c
        .put_device(
            "d1",
            DeviceSpec::default(),
            Some(format!("\"{}\"", d.record.etag())),
        )
        .await
        .unwrap();
    assert!(!created);
    assert_ne!(d2.record.etag(), d.record.etag());
    assert_eq!(d2.record.generation_id, gen1);
    assert_eq!(d2.record.keys, d.record.keys, "keys kept on update");
    // Stale etag after the update: 412 on delete too.
    let e = c
        .delete_device("d1", Some(d.record.etag()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 412);
    c.delete_device("d1", None).await.unwrap();
    assert_eq!(c.get_device("d1").unwrap_err().status(), 404);
    let (d3, _) = c
        .put_device("d1", DeviceSpec::default(), None)
        .await
        .unwrap();
    assert_ne!(
        d3.record.generation_id, gen1,
        "new generation after re-create"
    );
    assert!(
        c.put_device("bad/id", DeviceSpec::default(), None)
            .await
            .is_err()
    );

    // Modules: same rules; a missing device is 404.
    let (m, created) = c
        .put_module("d1", "m1", ModuleSpec::default(), None)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        c.put_module("d1", "m1", ModuleSpec::default(), None)
            .await
            .unwrap_err()
            .status(),
        409
    );
    assert_eq!(
        c.put_module("nodev", "m1", ModuleSpec::default(), None)
            .await
            .unwrap_err()
            .status(),
        404
    );
    let (m2, _) = c
        .put_module("d1", "m1", ModuleSpec::default(), Some("*".into()))
        .await
        .unwrap();
    assert_eq!(m2.record.generation_id, m.record.generation_id);
    assert_eq!(c.list_modules("d1").unwrap().len(), 1);

    // Edge devices get their system modules and a scope; state survives a restart.
    let (e1, _) = c.put_device("edge1", edge(), None).await.unwrap();
    let scope = e1.record.device_scope.clone().unwrap();
    assert!(scope.starts_with("ms-azure-iot-edge://edge1-"));
    let mods: Vec<_> = c
        .list_modules("edge1")
        .unwrap()
        .into_iter()
        .map(|m| m.record.module_id)
        .collect();
    assert_eq!(mods, vec!["$edgeAgent", "$edgeHub"]);
    c.close();
    drop(c);
    let c = open(dir.path());
    assert_eq!(
        c.get_device("edge1").unwrap().record.device_scope,
        Some(scope)
    );
    assert_eq!(
        c.get_module("d1", "m1").unwrap().record.keys,
        m2.record.keys
    );
    assert_eq!(c.list_devices(None).len(), 2);
    assert_eq!(c.list_devices(Some(1)).len(), 1);
}

#[tokio::test]
async fn parent_child_rules() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let (a, _) = c.put_device("edgeA", edge(), None).await.unwrap();
    let (b, _) = c.put_device("edgeB", edge(), None).await.unwrap();
    let sa = a.record.device_scope.clone().unwrap();
    let sb = b.record.device_scope.clone().unwrap();
    // A leaf under A: deviceScope names the parent, parentScopes follows.
    let leaf = DeviceSpec {
        device_scope: Some(sa.clone()),
        ..DeviceSpec::default()
    };
    let (l, _) = c.put_device("leaf", leaf, None).await.unwrap();
    assert_eq!(l.record.parent_scopes, vec![sa.clone()]);
    // At most one parent.
    let two = DeviceSpec {
        parent_scopes: vec![sa.clone(), sb.clone()],
        ..DeviceSpec::default()
    };
    let e = c.put_device("leaf2", two, None).await.unwrap_err();
    assert!(
        matches!(e, CloudError::BadRequest(ref m) if m.contains("at most one parent")),
        "{e}"
    );
    // Unknown scope; a leaf's scope cannot be a parent.
    let unknown = DeviceSpec {
        device_scope: Some("ms-azure-iot-edge://ghost-1".into()),
        ..DeviceSpec::default()
    };
    assert_eq!(
        c.put_device("leaf3", unknown, None)
            .await
            .unwrap_err()
            .status(),
        400
    );
    // B under A, then A under B would be a cycle.
    let b_under_a = DeviceSpec {
        iot_edge: true,
        parent_scopes: vec![sa.clone()],
        ..DeviceSpec::default()
    };
    c.put_device("edgeB", b_under_a, Some("*".into()))
        .await
        .unwrap();
    let a_under_b = DeviceSpec {
        iot_edge: true,
        parent_scopes: vec![sb.clone()],
        ..DeviceSpec::default()
    };
    let e = c
        .put_device("edgeA", a_under_b, Some("*".into()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    let self_parent = DeviceSpec {
        iot_edge: true,
        parent_scopes: vec![sa.clone()],
        ..DeviceSpec::default()
    };
    assert_eq!(
        c.put_device("edgeA", self_parent, Some("*".into()))
            .await
            .unwrap_err()
            .status(),
        400
    );
    // An edge device with children cannot stop being one.
    assert_eq!(
        c.put_device("edgeA", DeviceSpec::default(), Some("*".into()))
            .await
            .unwrap_err()
            .status(),
        400
    );
    // Deleting the parent orphans its children.
    c.delete_device("edgeA", None).await.unwrap();
    assert!(
        c.get_device("leaf")
            .unwrap()
            .record
            .parent_scopes
            .is_empty()
    );
    assert_eq!(c.get_device("leaf").unwrap().record.device_scope, None);
    assert!(
        c.get_device("edgeB")
            .unwrap()
            .record
            .parent_scopes
            .is_empty()
    );
}

#[tokio::test]
async fn twin_versions_etags_and_desired_events() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.put_device("d", DeviceSpec::default(), None)
        .await
        .unwrap();
    let id = dev("d");
    let mut conn = c.connect(&id, Transport::Mqtt).unwrap();
    let mut observer = c.subscribe_desired();
    let t0 = c.get_twin(&id).unwrap();
    assert_eq!(t0.twin.version, 0);
    let t1 = c
        .update_twin(
            &id,
            json!({"tags": {"site": "a", "o": {"x": 1}}, "properties": {"desired": {"rate": 5}}}),
            Some(format!("\"{}\"", t0.twin.etag())),
        )
        .await
        .unwrap();
    assert_eq!(t1.twin.desired.version, 1);
    assert!(t1.twin.version > t0.twin.version);
    assert_eq!(
        conn.recv().await,
        Some(ConnectionEvent::DesiredPatch(
            json!({"rate": 5, "$version": 1})
        ))
    );
    assert_eq!(observer.recv().await.unwrap().client, id);
    // Stale etag: 412, nothing changes.
    let e = c
        .update_twin(&id, json!({"tags": {"x": 1}}), Some(t0.twin.etag()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 412);
    // Tags merge; $metadata/$version echoed back from a GET are ignored.
    let t2 = c
        .update_twin(
            &id,
            json!({"tags": {"o": {"y": 2}}, "properties": {"desired": {"$version": 9, "$metadata": {}, "mode": "eco"}}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(t2.twin.tags["o"], json!({"x": 1, "y": 2}));
    assert_eq!(t2.twin.desired.version, 2);
    // Bad desired keys are refused whole.
    assert_eq!(
        c.update_twin(&id, json!({"properties": {"desired": {"a b": 1}}}), None)
            .await
            .unwrap_err()
            .status(),
        400
    );
    // Replace: tags and desired replaced, version continues.
    let t3 = c
        .replace_twin(
            &id,
            json!({"tags": {"k": "v"}, "properties": {"desired": {"only": true}}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(t3.twin.tags, json!({"k": "v"}).as_object().unwrap().clone());
    assert_eq!(t3.twin.desired.version, 3);
    assert_eq!(
        t3.twin.to_client_json()["desired"],
        json!({"only": true, "$version": 3})
    );
    // The device merges what it gets: the replacement reaches it as a diff
    // whose removed keys are nulls.
    assert_eq!(
        conn.recv().await,
        Some(ConnectionEvent::DesiredPatch(
            json!({"mode": "eco", "$version": 2})
        ))
    );
    assert_eq!(
        conn.recv().await,
        Some(ConnectionEvent::DesiredPatch(
            json!({"rate": null, "mode": null, "only": true, "$version": 3})
        ))
    );
    // Reported from the device side; versions persist across restart.
    assert_eq!(
        c.patch_reported(&id, json!({"fw": "1.0"})).await.unwrap(),
        1
    );
    let json = t3.to_json();
    assert_eq!(json["deviceId"], "d");
    assert_eq!(json["connectionState"], "Connected");
    let dev_json = c.get_device("d").unwrap().to_json();
    assert_eq!(dev_json["connectionProtocol"], "MQTT");
    drop(conn);
    assert!(!c.is_connected(&id));
    c.close();
    drop(c);
    let c = open(dir.path());
    let t = c.get_twin(&id).unwrap();
    assert_eq!(t.twin.desired.version, 3);
    assert_eq!(t.twin.reported.version, 1);
    assert_eq!(t.twin.etag(), c.get_twin(&id).unwrap().twin.etag());
}

#[tokio::test]
async fn device_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let keys = SymmetricKeys::generate();
    let spec = DeviceSpec {
        keys: Some(keys.clone()),
        ..DeviceSpec::default()
    };
    c.put_device("d", spec, None).await.unwrap();
    let (m, _) = c
        .put_module("d", "m", ModuleSpec::default(), None)
        .await
        .unwrap();
    let exp = 4_000_000_000;
    let sign = |res: &str, key: &str| {
        SasToken::sign(res, &SharedAccessKey::from_base64(key).unwrap(), exp, None).to_string()
    };
    let primary = sign("cloud.test/devices/d", &keys.primary);
    assert_eq!(c.verify_device_token("d", &primary).unwrap(), dev("d"));
    let secondary = sign("cloud.test:8883/devices/d", &keys.secondary);
    assert_eq!(c.verify_device_token("d", &secondary).unwrap(), dev("d"));
    let mt = sign("cloud.test/devices/d/modules/m", &m.record.keys.primary);
    assert_eq!(c.verify_device_token("d/m", &mt).unwrap(), module("d", "m"));
    // The module's token is not the device's, and vice versa.
    assert_eq!(c.verify_device_token("d", &mt).unwrap_err().status(), 401);
    assert_eq!(
        c.verify_device_token("d/m", &primary).unwrap_err().status(),
        401
    );
    let wrong_key = sign("cloud.test/devices/d", &m.record.keys.primary);
    assert_eq!(
        c.verify_device_token("d", &wrong_key).unwrap_err().status(),
        401
    );
    let wrong_host = sign("other.hub/devices/d", &keys.primary);
    assert_eq!(
        c.verify_device_token("d", &wrong_host)
            .unwrap_err()
            .status(),
        401
    );
    let expired = SasToken::sign(
        "cloud.test/devices/d",
        &SharedAccessKey::from_base64(&keys.primary).unwrap(),
        5,
        None,
    )
    .to_string();
    assert_eq!(
        c.verify_device_token("d", &expired).unwrap_err().status(),
        401
    );
    assert_eq!(
        c.verify_device_token("ghost", &primary)
            .unwrap_err()
            .status(),
        401
    );
    // Disabled devices cannot authenticate, and get disconnected.
    let conn = c.connect(&dev("d"), Transport::Mqtt).unwrap();
    let spec = DeviceSpec {
        status: Some(crate::DeviceStatus::Disabled),
        ..DeviceSpec::default()
    };
    c.put_device("d", spec, Some("*".into())).await.unwrap();
    assert_eq!(
        c.verify_device_token("d", &primary).unwrap_err().status(),
        401
    );
    assert!(!c.is_connected(&dev("d")));
    drop(conn);
}

#[tokio::test]
async fn deployments_set_module_twins() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.put_device("edge", edge(), None).await.unwrap();
    c.put_device("leaf", DeviceSpec::default(), None)
        .await
        .unwrap();
    let agent = json!({
        "schemaVersion": "1.1",
        "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
        "systemModules": {
            "edgeAgent": {"type": "docker", "settings": {"image": "mcr.microsoft.com/azureiotedge-agent:1.5", "createOptions": "{}"}},
            "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                "settings": {"image": "mcr.microsoft.com/azureiotedge-hub:1.5", "createOptions": "{}"}}
        },
        "modules": {}
    });
    let hub = json!({"schemaVersion": "1.1", "routes": {"r": "FROM /messages/* INTO $upstream"},
        "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}});
    let manifest = json!({"modulesContent": {
        "$edgeAgent": {"properties.desired": agent},
        "$edgeHub": {"properties.desired": hub},
        "filter": {"properties.desired": {"threshold": 80}}
    }});
    let mut conn = c.connect(&module("edge", "filter"), Transport::Mqtt).err();
    assert!(conn.is_some(), "filter has no identity yet");
    c.apply_configuration("edge", manifest.clone())
        .await
        .unwrap();
    let a = c.get_twin(&module("edge", "$edgeAgent")).unwrap();
    assert_eq!(a.twin.desired.properties["schemaVersion"], "1.1");
    assert_eq!(a.twin.desired.version, 1);
    let f = c.get_module("edge", "filter").unwrap();
    assert_eq!(f.record.managed_by.as_deref(), Some("IotEdge"));
    let mut fconn = c
        .connect(&module("edge", "filter"), Transport::Mqtt)
        .unwrap();
    // Re-applying replaces (keys not listed disappear): the device gets the
    // difference, removed keys as nulls (it merges what it gets).
    let mut m2 = manifest.clone();
    m2["modulesContent"]["filter"]["properties.desired"] = json!({"window": 5});
    c.apply_configuration("edge", m2).await.unwrap();
    assert_eq!(
        fconn.recv().await,
        Some(ConnectionEvent::DesiredPatch(
            json!({"threshold": null, "window": 5, "$version": 2})
        ))
    );
    // Invalid $edgeAgent: 400 naming the field; nothing changes.
    let mut bad = manifest.clone();
    bad["modulesContent"]["$edgeAgent"]["properties.desired"]["schemaVersion"] = json!("7.0");
    let e = c.apply_configuration("edge", bad).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.to_string().contains("schemaVersion"), "{e}");
    let mut bad = manifest.clone();
    bad["modulesContent"]["$edgeAgent"]["properties.desired"]["systemModules"]["edgeHub"]
        .as_object_mut()
        .unwrap()
        .remove("status");
    let e = c.apply_configuration("edge", bad).await.unwrap_err();
    assert!(e.to_string().contains("edgeHub.status"), "{e}");
    assert_eq!(
        c.get_twin(&module("edge", "$edgeAgent"))
            .unwrap()
            .twin
            .desired
            .version,
        2
    );
    assert_eq!(
        c.apply_configuration("leaf", manifest.clone())
            .await
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        c.apply_configuration("ghost", manifest)
            .await
            .unwrap_err()
            .status(),
        404
    );
    conn.take();
}

#[tokio::test]
async fn d2c_log_is_durable_and_followable() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let from = module("edge", "sensor");
    // Concurrent producers share syncs; every one gets a distinct offset.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        let from = from.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = Message::new(format!("m{i}"));
            m.properties.insert("i", i.to_string());
            c.ingest(&from, m).await.unwrap()
        }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.unwrap());
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
    let follower = {
        let c = c.clone();
        tokio::spawn(async move {
            c.wait_d2c(20).await.unwrap();
            c.read_d2c(20, 10).unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!follower.is_finished(), "nothing at offset 20 yet");
    assert_eq!(
        c.ingest(&dev("leaf"), Message::new("late")).await.unwrap(),
        20
    );
    let got = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.body.as_ref(), b"late");
    assert_eq!(
        got[0].message.system.connection_device_id.as_deref(),
        Some("leaf")
    );
    c.close();
    assert!(matches!(
        c.ingest(&dev("leaf"), Message::new("x")).await,
        Err(CloudError::Closed)
    ));
    drop(c);
    // After a restart: everything is there, stamped, and offsets continue.
    let c = open(dir.path());
    assert_eq!(c.d2c_tail(), 21);
    let all = c.read_d2c(0, 100).unwrap();
    assert_eq!(all.len(), 21);
    let e5 = all.iter().find(|e| e.offset == 5).unwrap();
    assert_eq!(
        e5.message.system.connection_module_id.as_deref(),
        Some("sensor")
    );
    assert!(e5.message.system.enqueued_time.is_some());
    assert!(e5.message.system.message_id.is_some());
    assert_eq!(c.read_d2c(19, 100).unwrap().len(), 2);
    assert_eq!(
        c.ingest(&dev("leaf"), Message::new("next")).await.unwrap(),
        21
    );
    let big = Message::new(vec![0u8; 300 * 1024]);
    assert_eq!(c.ingest(&dev("leaf"), big).await.unwrap_err().status(), 400);
}

#[tokio::test]
async fn methods_route_time_out_and_need_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.put_device("d", DeviceSpec::default(), None)
        .await
        .unwrap();
    let id = dev("d");
    let ms = Duration::from_millis;
    // Unknown device and offline device: 404.
    let e = c
        .invoke_method(&dev("ghost"), "m", json!(1), ms(100), ms(0))
        .await
        .unwrap_err();
    assert!(matches!(e, CloudError::NotFound(_)));
    let e = c
        .invoke_method(&id, "m", json!(1), ms(100), ms(0))
        .await
        .unwrap_err();
    assert!(matches!(e, CloudError::NotOnline(_)));
    assert_eq!(e.status(), 404);
    // Connected but silent: 504.
    let mut conn = c.connect(&id, Transport::Mqtt).unwrap();
    let e = c
        .invoke_method(&id, "slow", json!(null), ms(100), ms(0))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 504);
    let Some(ConnectionEvent::Method(late)) = conn.recv().await else {
        panic!("no method event")
    };
    // A late answer goes nowhere.
    assert!(!c.method_response(
        &id,
        late.rid,
        MethodResponse {
            status: 200,
            payload: json!(null)
        }
    ));
    // Answered: the caller gets the device's status and payload; only the
    // target may answer.
    let responder = {
        let c = c.clone();
        tokio::spawn(async move {
            let Some(ConnectionEvent::Method(req)) = conn.recv().await else {
                panic!("no method event")
            };
            assert_eq!(req.name, "reboot");
            assert!(!c.method_response(
                &dev("other"),
                req.rid,
                MethodResponse {
                    status: 1,
                    payload: json!(0)
                }
            ));
            assert!(c.method_response(
                &dev("d"),
                req.rid,
                MethodResponse {
                    status: 201,
                    payload: json!({"ok": req.payload})
                }
            ));
            conn
        })
    };
    let r = c
        .invoke_method(&id, "reboot", json!("now"), Duration::from_secs(5), ms(0))
        .await
        .unwrap();
    assert_eq!(
        r,
        MethodResponse {
            status: 201,
            payload: json!({"ok": "now"})
        }
    );
    drop(responder.await.unwrap());
    // connectTimeout: waits for the device to connect.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.invoke_method(
                &dev("d"),
                "hi",
                json!(null),
                Duration::from_secs(5),
                Duration::from_secs(5),
            )
            .await
        })
    };
    tokio::time::sleep(ms(50)).await;
    let mut conn = c.connect(&id, Transport::Mqtt).unwrap();
    let Some(ConnectionEvent::Method(req)) = conn.recv().await else {
        panic!("no method event")
    };
    assert!(c.method_response(
        &id,
        req.rid,
        MethodResponse {
            status: 200,
            payload: json!(null)
        }
    ));
    assert_eq!(waiter.await.unwrap().unwrap().status, 200);
    // A second connection replaces the first.
    let _newer = c.connect(&id, Transport::Mqtt).unwrap();
    assert_eq!(conn.recv().await, None);
    drop(conn);
    assert!(
        c.is_connected(&id),
        "dropping the replaced connection keeps the newer"
    );
}

#[tokio::test]
async fn methods_with_bad_names_or_big_payloads_are_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.put_device("d", DeviceSpec::default(), None)
        .await
        .unwrap();
    let id = dev("d");
    let mut conn = c.connect(&id, Transport::Mqtt).unwrap();
    let ms = Duration::from_millis;
    // MQTT wildcards, topic separators and spaces cannot be a topic level.
    for name in ["a#b", "a+b", "a/b", "a b", "", &"x".repeat(129)] {
        let e = c
            .invoke_method(&id, name, json!(1), ms(100), ms(0))
            .await
            .unwrap_err();
        assert!(matches!(e, CloudError::BadRequest(_)), "{name:?}: {e:?}");
        assert_eq!(e.status(), 400);
    }
    // 128 KB of serialized JSON is the limit.
    let at_limit = json!("x".repeat(verge_core::method::MAX_METHOD_PAYLOAD - 2));
    let over = json!("x".repeat(verge_core::method::MAX_METHOD_PAYLOAD - 1));
    let e = c
        .invoke_method(&id, "big", over, ms(100), ms(0))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 413, "{e:?}");
    // Nothing reached the connection.
    assert!(conn.rx.try_recv().is_err());
    // A good name with a payload at the limit is delivered.
    let e = c
        .invoke_method(&id, "ok", at_limit, ms(50), ms(0))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 504);
    match conn.rx.try_recv() {
        Ok(ConnectionEvent::Method(m)) => assert_eq!(m.name, "ok"),
        other => panic!("expected the method request, got {other:?}"),
    }
}

/// A registry write holds its commit (fsync) for 2 s: meanwhile devices
/// still authenticate, connect and get their telemetry on disk, because the
/// registry lock is not held across the commit. Connections made during the
/// write stay recorded after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_registry_commits_do_not_stall_connects_or_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    let keys = SymmetricKeys::generate();
    let spec = DeviceSpec {
        keys: Some(keys.clone()),
        ..DeviceSpec::default()
    };
    c.put_device("d", spec, None).await.unwrap();
    c.put_device("edge", edge(), None).await.unwrap();
    let token = SasToken::sign(
        "cloud.test/devices/d",
        &SharedAccessKey::from_base64(&keys.primary).unwrap(),
        4_000_000_000,
        None,
    )
    .to_string();
    let hold = Duration::from_secs(2);
    c.set_commit_delay(hold);
    let write = tokio::spawn({
        let c = c.clone();
        async move {
            let agent = json!({
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": "a:1", "createOptions": "{}"}},
                    "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always",
                        "settings": {"image": "h:1", "createOptions": "{}"}}
                },
                "modules": {}
            });
            let hub = json!({"schemaVersion": "1.1", "routes": {},
                "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}});
            let content = json!({"modulesContent": {
                "$edgeAgent": {"properties.desired": agent},
                "$edgeHub": {"properties.desired": hub}
            }});
            c.apply_configuration("edge", content).await
        }
    });
    // Wait (bounded) until the write is inside its commit.
    let t0 = std::time::Instant::now();
    while !c.commit_held() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the write never committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t1 = std::time::Instant::now();
    let (id, _conn, _agent) = tokio::time::timeout(hold / 2, async {
        let id = c.verify_device_token("d", &token).unwrap();
        let conn = c.connect(&id, Transport::Mqtt).unwrap();
        let agent = c
            .connect(&module("edge", "$edgeAgent"), Transport::Mqtt)
            .unwrap();
        // What the endpoint waits for before its PUBACK.
        c.ingest(&id, Message::new(b"t".to_vec())).await.unwrap();
        (id, conn, agent)
    })
    .await
    .unwrap_or_else(|_| panic!("CONNECT/PUBACK stalled behind a registry commit"));
    assert!(t1.elapsed() < hold / 2);
    assert!(!write.is_finished(), "the commit was still held");
    write.await.unwrap().unwrap();
    c.set_commit_delay(Duration::ZERO);
    assert!(c.get_device("d").unwrap().conn.connected);
    let agent = c.get_module("edge", "$edgeAgent").unwrap();
    assert!(
        agent.conn.connected,
        "the write kept a stale connection state"
    );
    assert_eq!(
        c.get_twin(&module("edge", "$edgeHub"))
            .unwrap()
            .twin
            .desired
            .version,
        1
    );
    assert!(c.is_connected(&id));
}

#[tokio::test]
async fn c2d_delivery_settlement_feedback_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path());
    c.put_device("d", DeviceSpec::default(), None)
        .await
        .unwrap();
    let mut conn = c.connect(&dev("d"), Transport::Mqtt).unwrap();
    let mut m = Message::new("hello");
    m.system.message_id = Some("m1".into());
    assert_eq!(c.c2d_send("d", m, 0).await.unwrap(), "m1");
    assert_eq!(conn.recv().await, Some(ConnectionEvent::C2dAvailable));
    let id2 = c.c2d_send("d", Message::new("two"), 0).await.unwrap();
    assert_eq!(c.get_device("d").unwrap().conn.c2d_count, 2);
    // Pull locks; abandon redelivers with a higher count.
    let d1 = c.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(d1.message.system.message_id.as_deref(), Some("m1"));
    assert_eq!(
        d1.message.system.to.as_deref(),
        Some("/devices/d/messages/devicebound")
    );
    let d2 = c.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(d2.message.system.message_id.as_deref(), Some(id2.as_str()));
    assert_eq!(c.c2d_next("d").await.unwrap(), None, "both locked");
    c.c2d_settle("d", &d1.lock_token, Settlement::Abandon)
        .await
        .unwrap();
    let again = c.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(again.delivery_count, 2);
    assert_eq!(
        c.c2d_settle("d", &d1.lock_token, Settlement::Complete)
            .await
            .unwrap_err()
            .status(),
        412,
        "old lock token"
    );
    c.c2d_settle("d", &again.lock_token, Settlement::Complete)
        .await
        .unwrap();
    c.c2d_settle("d", &d2.lock_token, Settlement::Reject)
        .await
        .unwrap();
    let fb = c.c2d_feedback(0, 10).unwrap();
    let codes: Vec<_> = fb
        .iter()
        .map(|f| (f.original_message_id.as_str(), f.status_code))
        .collect();
    assert_eq!(codes, vec![("m1", "Success"), (id2.as_str(), "Rejected")]);
    // Locks are released when the connection goes away; queue survives restart.
    c.c2d_send("d", Message::new("three"), 0).await.unwrap();
    let d3 = c.c2d_next("d").await.unwrap().unwrap();
    drop(conn);
    let d3b = c.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(d3b.message.body, d3.message.body);
    c.c2d_send("d", Message::new("short"), 1).await.unwrap();
    c.close();
    drop(c);
    let c = open(dir.path());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.sweep().await.unwrap();
    let fb = c.c2d_feedback(2, 10).unwrap();
    assert_eq!(fb.len(), 1);
    assert_eq!(fb[0].status_code, "Expired");
    assert_eq!(fb[0].seq, 2);
    let d = c.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(d.message.body.as_ref(), b"three");
    // Limits: TTL and queue depth.
    assert_eq!(
        c.c2d_send("d", Message::new("x"), 49 * 3600)
            .await
            .unwrap_err()
            .status(),
        400
    );
    for _ in 0..(crate::c2d::MAX_QUEUE_DEPTH - 1) {
        c.c2d_send("d", Message::new("fill"), 0).await.unwrap();
    }
    assert_eq!(
        c.c2d_send("d", Message::new("x"), 0)
            .await
            .unwrap_err()
            .status(),
        429
    );
    assert_eq!(
        c.c2d_send("ghost", Message::new("x"), 0)
            .await
            .unwrap_err()
            .status(),
        404
    );
}

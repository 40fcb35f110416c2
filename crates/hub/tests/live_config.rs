//! Live configuration: the `$edgeHub` desired properties (routes) change
//! without a restart — from the routes file, the twins file, or
//! `PUT /edgehub/desired` — and a bad document is refused whole while the
//! previous routes stay active.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use serde_json::{Value, json};
use verge_core::{SasToken, SharedAccessKey};
use verge_hub::Hub;

const QUIET: Duration = Duration::from_millis(700);

fn routes_doc(routes: Value) -> String {
    json!({"schemaVersion": "1.1", "routes": routes}).to_string()
}

fn out(output: &str) -> String {
    format!("devices/{DEVICE}/modules/modA/messages/events/%24.on={output}")
}

fn edgehub_twin(hub: &Hub) -> Value {
    hub.state.twins.client_json(&format!("{DEVICE}/$edgeHub"))
}

/// Waits until `cond` holds on the hub (polling), or fails naming `what`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn dropped(hub: &Hub) -> u64 {
    hub.state.stats.dropped_no_route.load(Ordering::Relaxed)
}

async fn two_modules(hub: &Hub, pki: &Pki) -> (Raw, Raw) {
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert_eq!(
        subscribe1(&mut b, &format!("devices/{DEVICE}/modules/modB/inputs/#")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let (a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", false).await;
    (a, b)
}

fn input_of(p: &rumqttc::mqttbytes::v4::Publish) -> String {
    let t = std::str::from_utf8(&p.topic).unwrap();
    t.split('/').nth(5).unwrap().to_owned()
}

#[tokio::test]
async fn routes_file_changes_apply_live_and_bad_ones_are_refused() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    let routes_path = cfg.routes_file.clone().unwrap();
    let hub = Hub::start(cfg).await.unwrap();
    let (mut a, mut b) = two_modules(&hub, &pki).await;

    // Before: out1 → modB/in1; out2 has no route.
    publish_qos1(&mut a, &out("out1"), b"one", 1).await;
    assert_eq!(input_of(&next_pub(&mut b).await), "in1");
    let d = dropped(&hub);
    publish_qos1(&mut a, &out("out2"), b"two", 2).await;
    assert_eq!(dropped(&hub), d + 1);
    assert!(maybe_pub(&mut b, QUIET).await.is_none());

    // New file: out1's route removed, out2 routed to a new input (a new pump).
    std::fs::write(
        &routes_path,
        routes_doc(json!({
            "A2": "FROM /messages/modules/modA/outputs/out2 INTO BrokeredEndpoint(\"/modules/modB/inputs/in2\")"
        })),
    )
    .unwrap();
    // The routes are installed after the desired twin is written and before
    // the status is reported: wait for the report of this version.
    eventually("the new routes file is applied", || {
        let t = edgehub_twin(&hub);
        t["desired"]["routes"].get("A2").is_some()
            && t["reported"]["lastDesiredVersion"] == t["desired"]["$version"]
    })
    .await;
    assert_eq!(
        edgehub_twin(&hub)["reported"]["lastDesiredStatus"]["code"],
        200
    );
    publish_qos1(&mut a, &out("out2"), b"two", 3).await;
    let p = next_pub(&mut b).await;
    assert_eq!(input_of(&p), "in2");
    assert_eq!(p.payload, Bytes::from_static(b"two"));
    let d = dropped(&hub);
    publish_qos1(&mut a, &out("out1"), b"one", 4).await;
    assert_eq!(
        dropped(&hub),
        d + 1,
        "the removed route must not route any more"
    );
    assert!(maybe_pub(&mut b, QUIET).await.is_none());

    // A file with one bad route is refused whole; then one that is not JSON.
    let desired_version = edgehub_twin(&hub)["desired"]["$version"].clone();
    std::fs::write(
        &routes_path,
        routes_doc(json!({
            "good": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")",
            "bad": "FROM /messages/* INTO BrokeredEndpoint(\"/nowhere\")"
        })),
    )
    .unwrap();
    eventually("the bad routes file is reported as refused", || {
        edgehub_twin(&hub)["reported"]["lastDesiredStatus"]["code"] == 400
    })
    .await;
    let why = edgehub_twin(&hub)["reported"]["lastDesiredStatus"]["description"].clone();
    assert!(why.as_str().unwrap().contains("bad"), "{why}");
    assert_eq!(edgehub_twin(&hub)["desired"]["$version"], desired_version);
    std::fs::write(&routes_path, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The previous routes are still the ones in force.
    publish_qos1(&mut a, &out("out2"), b"still", 5).await;
    let p = next_pub(&mut b).await;
    assert_eq!(
        (input_of(&p).as_str(), p.payload.as_ref()),
        ("in2", &b"still"[..])
    );
    let d = dropped(&hub);
    publish_qos1(&mut a, &out("out1"), b"one", 6).await;
    assert_eq!(dropped(&hub), d + 1);
    hub.shutdown().await;
}

fn device_token(host: &str, key: &str, expiry: u64) -> String {
    SasToken::sign(
        &format!("{host}/devices/{DEVICE}"),
        &SharedAccessKey::from_base64(key).unwrap(),
        expiry,
        None,
    )
    .to_string()
}

#[tokio::test]
async fn http_desired_update_needs_the_device_token_and_survives_restart() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    // No routes file: the $edgeHub twin is the only configuration, and must
    // carry the last accepted document across the restart below.
    cfg.routes_file = None;
    let hub = Hub::start(cfg.clone()).await.unwrap();
    let (mut a, mut b) = two_modules(&hub, &pki).await;
    let d = dropped(&hub);
    publish_qos1(&mut a, &out("out1"), b"x", 1).await;
    assert_eq!(dropped(&hub), d + 1, "no routes yet");

    let client = common::https_client()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", hub.https_addr)
        .timeout(T)
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/edgehub/desired",
        hub.https_addr.port()
    );
    let put = |token: Option<String>, body: String| {
        let mut r = client.put(&url).body(body);
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        r.send()
    };
    let doc = routes_doc(json!({
        "A3": {"route": "FROM /messages/modules/modA/outputs/out3 INTO BrokeredEndpoint(\"/modules/modB/inputs/in3\")", "priority": 1}
    }));
    let leaf_token = SasToken::sign(
        &format!("{HUB}/devices/leaf1"),
        &SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
        now() + 600,
        None,
    )
    .to_string();
    let refused = [
        ("no token", None),
        ("module token", Some(module_token("modA"))),
        ("leaf device token", Some(leaf_token)),
        (
            "device token of another hub",
            Some(device_token(
                "otherhub.azure-devices.net",
                DEVICE_KEY,
                now() + 600,
            )),
        ),
        (
            "expired device token",
            Some(device_token(HUB, DEVICE_KEY, now() - 5)),
        ),
        (
            "device token with the wrong key",
            Some(device_token(HUB, LEAF_KEY, now() + 600)),
        ),
    ];
    for (what, token) in refused {
        let r = put(token, doc.clone()).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
    }
    publish_qos1(&mut a, &out("out3"), b"y", 2).await;
    assert!(
        maybe_pub(&mut b, QUIET).await.is_none(),
        "refused updates changed nothing"
    );

    let token = || Some(device_token(HUB, DEVICE_KEY, now() + 600));
    let r = put(token(), doc.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"routes": 1}));
    // In force as soon as the PUT is answered.
    publish_qos1(&mut a, &out("out3"), b"z", 3).await;
    let p = next_pub(&mut b).await;
    assert_eq!(
        (input_of(&p).as_str(), p.payload.as_ref()),
        ("in3", &b"z"[..])
    );

    // Invalid documents: 400 naming the problem; the routes stay.
    for (bad, needle) in [
        (
            routes_doc(json!({"r": "FROM /messages/* INTO $nowhere"})),
            "routes",
        ),
        (
            routes_doc(json!({"r": {"route": "FROM /messages/* INTO $upstream", "priority": 12}})),
            "priority",
        ),
        (r#"{"routes": {}}"#.to_owned(), "schemaVersion"),
        ("[1,2".to_owned(), "JSON"),
    ] {
        let r = put(token(), bad.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let msg = r.json::<Value>().await.unwrap()["message"].to_string();
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    assert_eq!(
        edgehub_twin(&hub)["reported"]["lastDesiredStatus"]["code"],
        400
    );
    publish_qos1(&mut a, &out("out3"), b"w", 4).await;
    assert_eq!(next_pub(&mut b).await.payload, Bytes::from_static(b"w"));

    // Restart: the accepted document comes back from the $edgeHub twin.
    // (First let the hub checkpoint B's PUBACKs, else it redelivers: at-least-once.)
    eventually("both deliveries are checkpointed", || {
        hub.state.stats.delivered.load(Ordering::Relaxed) == 2
    })
    .await;
    drop((a, b));
    hub.shutdown().await;
    let hub = Hub::start(cfg).await.unwrap();
    let (mut a, mut b) = two_modules(&hub, &pki).await;
    publish_qos1(&mut a, &out("out3"), b"after restart", 5).await;
    let p = next_pub(&mut b).await;
    assert_eq!(input_of(&p), "in3");
    assert_eq!(p.payload, Bytes::from_static(b"after restart"));
    hub.shutdown().await;
}

#[tokio::test]
async fn edgehub_twin_desired_from_the_twins_file_is_the_configuration() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let (mut a, mut b) = two_modules(&hub, &pki).await;
    let twins_file = pki.dir.path().join("twins.json");
    let doc: Value = serde_json::from_str(&routes_doc(json!({
        "A4": "FROM /messages/modules/modA/outputs/out4 INTO BrokeredEndpoint(\"/modules/modB/inputs/in4\")"
    })))
    .unwrap();
    std::fs::write(
        &twins_file,
        json!({ format!("{DEVICE}/$edgeHub"): doc }).to_string(),
    )
    .unwrap();
    eventually("the $edgeHub twin from the twins file is applied", || {
        edgehub_twin(&hub)["desired"]["routes"].get("A4").is_some()
    })
    .await;
    publish_qos1(&mut a, &out("out4"), b"4", 1).await;
    assert_eq!(input_of(&next_pub(&mut b).await), "in4");
    let d = dropped(&hub);
    publish_qos1(&mut a, &out("out1"), b"1", 2).await;
    assert_eq!(dropped(&hub), d + 1, "the routes file's route was replaced");

    // A bad $edgeHub entry is refused; the routes stay.
    let bad = json!({"schemaVersion": "1.1", "routes": {"x": "FROM nowhere"}});
    std::fs::write(
        &twins_file,
        json!({ format!("{DEVICE}/$edgeHub"): bad }).to_string(),
    )
    .unwrap();
    eventually("the bad $edgeHub entry is reported as refused", || {
        edgehub_twin(&hub)["reported"]["lastDesiredStatus"]["code"] == 400
    })
    .await;
    assert!(edgehub_twin(&hub)["desired"]["routes"].get("A4").is_some());
    publish_qos1(&mut a, &out("out4"), b"44", 3).await;
    assert_eq!(next_pub(&mut b).await.payload, Bytes::from_static(b"44"));
    hub.shutdown().await;
}

async fn put_desired(hub: &Hub, pki: &Pki, doc: &Value) -> u16 {
    common::https_client()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", hub.https_addr)
        .timeout(T)
        .build()
        .unwrap()
        .put(format!(
            "https://localhost:{}/edgehub/desired",
            hub.https_addr.port()
        ))
        .header("Authorization", device_token(HUB, DEVICE_KEY, now() + 600))
        .body(doc.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn global_ttl_of_the_configuration_applies_live() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let route = json!({"A5": "FROM /messages/modules/modA/outputs/out5 INTO BrokeredEndpoint(\"/modules/modB/inputs/in5\")"});
    let doc = |ttl: i64| json!({"schemaVersion": "1.1", "routes": route, "storeAndForwardConfiguration": {"timeToLiveSecs": ttl}});
    let (mut a, b) = two_modules(&hub, &pki).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // TTL 1 s: a message that waits longer than that for offline B is dropped.
    assert_eq!(put_desired(&hub, &pki, &doc(1)).await, 200);
    publish_qos1(&mut a, &out("out5"), b"stale", 1).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // Negative TTL = never expire (the store has no default of its own).
    assert_eq!(put_desired(&hub, &pki, &doc(-1)).await, 200);
    publish_qos1(&mut a, &out("out5"), b"kept", 2).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (mut b, present) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert!(present);
    let p = next_pub(&mut b).await;
    assert_eq!(
        p.payload,
        Bytes::from_static(b"kept"),
        "the expired message must be skipped"
    );
    assert!(maybe_pub(&mut b, QUIET).await.is_none());
    hub.shutdown().await;
}

/// `storeLimits.maxSizeBytes` of the `$edgeHub` desired properties is the
/// store's size limit, applied (and lifted) live.
#[tokio::test]
async fn store_size_limit_of_the_configuration_applies_live() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let route = json!({"A6": "FROM /messages/* INTO $upstream"});
    let doc = |limit: Value| json!({"schemaVersion": "1.1", "routes": route, "storeAndForwardConfiguration": {"timeToLiveSecs": 60, "storeLimits": {"maxSizeBytes": limit}}});
    assert_eq!(hub.state.store.max_bytes(), None);
    assert_eq!(put_desired(&hub, &pki, &doc(json!(4096))).await, 200);
    assert_eq!(hub.state.store.max_bytes(), Some(4096));
    assert_eq!(put_desired(&hub, &pki, &doc(Value::Null)).await, 200);
    assert_eq!(hub.state.store.max_bytes(), None);
    hub.shutdown().await;
}

/// The process's resident set (`VmRSS`), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Memory stays bounded across many deployments (issue #20.11): 200
/// `$edgeHub` documents (every route renamed, TTLs changed, every tenth one
/// refused) leave as many live tasks as after the first few, the same set of
/// delivery pumps, and a `$edgeHub` twin no bigger than a single document's —
/// nothing is kept per deployment. Messages still flow on the last routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_deployments_keep_nothing_per_deployment() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let (mut a, mut b) = two_modules(&hub, &pki).await;
    let doc = |i: u32| {
        let mut routes = serde_json::Map::new();
        // Same endpoints, new names and conditions every time.
        routes.insert(
            format!("toB{i}"),
            json!(format!(
                "FROM /messages/modules/modA/outputs/out1 WHERE NOT IS_DEFINED($body.skip{i}) INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")"
            )),
        );
        routes.insert(format!("up{i}"), json!("FROM /messages/* INTO $upstream"));
        if i % 10 == 9 {
            routes.insert("bad".into(), json!("FROM /messages/* INTO"));
        }
        json!({"schemaVersion": "1.1", "routes": routes,
               "storeAndForwardConfiguration": {"timeToLiveSecs": 7200 + i}})
    };
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    // Without `clients` (who is connected, reported once by a timer).
    let twin_len = |hub: &Hub| {
        let mut t = edgehub_twin(hub);
        t["reported"].as_object_mut().unwrap().remove("clients");
        t.to_string().len()
    };
    let deploy = async |i: u32| {
        let r = hub.state.set_edgehub_desired(&doc(i)).await;
        assert_eq!(r.is_ok(), i % 10 != 9, "deployment {i}: {r:?}");
    };
    let rss_start = rss_kib();
    for i in 0..20 {
        deploy(i).await;
        if i == 4 {
            eprintln!(
                "RSS {rss_start} KiB before, {} KiB after 5 deployments",
                rss_kib()
            );
        }
    }
    // Let the first pumps start and settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tasks0, twin0, rss0) = (tasks(), twin_len(&hub), rss_kib());
    let first = edgehub_twin(&hub);
    for i in 20..220 {
        deploy(i).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tasks1, twin1, rss1) = (tasks(), twin_len(&hub), rss_kib());
    eprintln!(
        "after 20 deployments: {tasks0} tasks, $edgeHub twin {twin0} B, RSS {rss0} KiB; \
         after 220: {tasks1} tasks, twin {twin1} B, RSS {rss1} KiB"
    );
    assert_eq!(tasks1, tasks0, "live tasks grew with deployments");
    // Names grow by a digit (toB18 → toB218); anything kept per deployment
    // would be kilobytes.
    assert!(
        twin1 <= twin0 + 64,
        "the $edgeHub twin grew: {twin0} → {twin1} bytes\n{first}\n{}",
        edgehub_twin(&hub)
    );
    let t = edgehub_twin(&hub);
    assert_eq!(
        t["desired"]["routes"].as_object().unwrap().len(),
        2,
        "only the last accepted document's routes: {t}"
    );
    // The last accepted routes are in force.
    publish_qos1(&mut a, &out("out1"), b"{}", 1).await;
    assert_eq!(input_of(&next_pub(&mut b).await), "in1");
    hub.shutdown().await;
}

/// With an upstream the `$edgeHub` twin mirrors the cloud's desired
/// properties, even a document the hub refused. A hub restarted on such a
/// twin keeps the last accepted routes in force instead of starting with
/// none.
#[tokio::test]
async fn a_restart_on_a_refused_twin_keeps_the_last_accepted_routes() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    // The configuration comes from the twin only, as with an upstream.
    cfg.routes_file = None;
    let hub = Hub::start(cfg.clone()).await.unwrap();
    let id = format!("{DEVICE}/$edgeHub");
    let good = json!({"schemaVersion": "1.1", "routes": {
        "r": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")"}});
    assert_eq!(hub.state.set_edgehub_desired(&good).await.unwrap(), 1);
    // What the upstream link does with a cloud patch: into the twin, then
    // applied as the configuration (refused here).
    let v = hub.state.twins.desired_version(&id);
    hub.state
        .twins
        .cloud_desired_patch(
            &id,
            &json!({"routes": {"r": null, "bad": "FROM /messages/* INTO"}, "$version": v + 1}),
        )
        .await;
    let twin = hub.state.twins.desired(&id).unwrap();
    assert!(twin["routes"].get("bad").is_some(), "{twin:?}");
    assert!(
        hub.state
            .set_edgehub_desired(&Value::Object(twin))
            .await
            .is_err()
    );
    hub.shutdown().await;

    let hub = Hub::start(cfg).await.unwrap();
    assert_eq!(
        hub.state.routes().set.len(),
        1,
        "no routes after the restart"
    );
    let (mut a, mut b) = two_modules(&hub, &pki).await;
    publish_qos1(&mut a, &out("out1"), b"one", 1).await;
    assert_eq!(input_of(&next_pub(&mut b).await), "in1");
    hub.shutdown().await;
}

/// A message store whose engine files are damaged does not stop the hub
/// (under verged that would be a crash loop): it is moved aside, kept, and
/// the hub starts with an empty store.
#[tokio::test]
async fn a_damaged_store_is_moved_aside_and_the_hub_starts() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    hub.shutdown().await;
    // Garble the engine's manifests ("current" of every keyspace).
    let mut todo = vec![storage.path().join("store")];
    let mut garbled = 0;
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.file_name().is_some_and(|n| n == "current") {
                std::fs::write(&p, b"\xde\xad\xbe\xef garbage").unwrap();
                garbled += 1;
            }
        }
    }
    assert!(garbled > 0, "no manifest found to damage");
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let moved: Vec<String> = std::fs::read_dir(storage.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("store.damaged-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(hub.state.store.queues().await.unwrap().is_empty());
    hub.shutdown().await;
}

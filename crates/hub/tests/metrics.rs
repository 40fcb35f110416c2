//! The hub's Prometheus endpoint: its text (names, types, labels as
//! edgeHub's) read directly, and the series a real Prometheus server
//! (Debian's `prometheus`) scrapes and stores, queried through its HTTP API
//! after messages were routed, delivered, queued and dropped.
//!
//! `VERGE_SKIP_PROMETHEUS_TESTS=1` skips the Prometheus test (see
//! `verge_testkit::prometheus`; `scripts/test.sh` installs the package).
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use verge_testkit::prometheus::Prometheus;

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use verge_hub::Hub;

/// Routed to modB's input (route AtoB).
const ROUTED: usize = 5;
/// From modA on an output no route takes: dropped.
const UNROUTED: usize = 2;
/// From leaf1: routed to `$upstream`, which has no link here, so they wait in its queue.
const UPSTREAM: usize = 3;

async fn scrape(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    r.text().await.unwrap()
}

/// Starts a hub, connects modB (subscribed), modA and leaf1, and sends the
/// test's messages; returns once modB got the routed ones.
async fn traffic(pki: &Pki, storage: &std::path::Path) -> (Hub, Vec<Raw>) {
    let hub = Hub::start(config(pki, storage, "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", true).await;
    assert_eq!(
        subscribe1(&mut b, &format!("devices/{DEVICE}/modules/modB/inputs/#")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", true).await;
    let mut pkid = 1;
    for i in 0..ROUTED {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out1");
        publish_qos1(&mut a, &topic, i.to_string().as_bytes(), pkid).await;
        pkid += 1;
    }
    // One twin read and one reported patch.
    assert_eq!(
        subscribe1(&mut a, "$iothub/twin/res/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    publish_qos1(&mut a, "$iothub/twin/GET/?$rid=1", b"", pkid).await;
    pkid += 1;
    publish_qos1(
        &mut a,
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        br#"{"a":1}"#,
        pkid,
    )
    .await;
    pkid += 1;
    for _ in 0..UNROUTED {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=nowhere");
        publish_qos1(&mut a, &topic, b"x", pkid).await;
        pkid += 1;
    }
    let mut leaf = connect_leaf(hub.mqtt_addr, &pki.ca_pem, true).await;
    for _ in 0..UPSTREAM {
        publish_qos1(&mut leaf, "devices/leaf1/messages/events/", b"up", pkid).await;
        pkid += 1;
    }
    for _ in 0..ROUTED {
        tokio::time::timeout(T, next_pub(&mut b)).await.unwrap();
    }
    (hub, vec![a, b, leaf])
}

/// The value of the one series `text` has for `name` with all of `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_has_edgehubs_names_types_and_labels() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let (hub, _clients) = traffic(&pki, storage.path()).await;
    // A refused connection: counted with the id it claimed and why.
    let (_refused, ack) = Raw::connect(
        hub.mqtt_addr,
        &pki.ca_pem,
        "edge1/modA",
        &username("edge1/modA"),
        "SharedAccessSignature sr=x&sig=y&se=1",
        true,
    )
    .await;
    assert_ne!(
        code(ack).0,
        rumqttc::mqttbytes::v4::ConnectReturnCode::Success
    );
    let addr = hub.metrics_addr.expect("metrics enabled by default");
    // modB's PUBACKs are settled by the pump in the background.
    let deadline = Instant::now() + T;
    let text = loop {
        let text = scrape(addr).await;
        let sent = value(
            &text,
            "edgehub_messages_sent_total",
            &[r#"to="edge1/modB""#],
        );
        if sent == Some(ROUTED as f64) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (name, kind) in [
        ("edgehub_messages_received_total", "counter"),
        ("edgehub_messages_sent_total", "counter"),
        ("edgehub_messages_dropped_total", "counter"),
        ("edgehub_gettwin_total", "counter"),
        ("edgehub_reported_properties_total", "counter"),
        ("edgehub_client_connect_success_total", "counter"),
        ("edgehub_queue_length", "gauge"),
        ("edgehub_connected_clients", "gauge"),
        ("verge_store_bytes", "gauge"),
        ("verge_messages_stored_total", "counter"),
        ("verge_messages_dead_lettered_total", "counter"),
        ("verge_messages_refused_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} missing:\n{text}"
        );
    }
    // Every series carries the three common labels.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            l.contains(r#"iothub="testhub.azure-devices.net""#)
                && l.contains(r#"edge_device="edge1""#)
                && l.contains("instance_number=\""),
            "series without the common labels: {l}"
        );
    }
    let n = |v: usize| Some(v as f64);
    assert_eq!(
        value(
            &text,
            "edgehub_messages_received_total",
            &[r#"route_output="out1""#, r#"id="edge1/modA""#]
        ),
        n(ROUTED)
    );
    assert_eq!(
        value(
            &text,
            "edgehub_messages_received_total",
            &[r#"route_output="""#, r#"id="leaf1""#]
        ),
        n(UPSTREAM)
    );
    assert_eq!(
        value(
            &text,
            "edgehub_messages_sent_total",
            &[
                r#"from="edge1/modA""#,
                r#"to="edge1/modB""#,
                r#"from_route_output="out1""#,
                r#"to_route_input="in1""#,
                r#"priority=""#,
            ]
        ),
        n(ROUTED),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            "edgehub_messages_dropped_total",
            &[
                r#"reason="no_route""#,
                r#"from="edge1/modA""#,
                r#"from_route_output="nowhere""#
            ]
        ),
        n(UNROUTED)
    );
    assert_eq!(
        value(
            &text,
            "edgehub_queue_length",
            &[r#"endpoint="$upstream""#, r#"priority=""#]
        ),
        n(UPSTREAM),
        "{text}"
    );
    assert_eq!(value(&text, "edgehub_connected_clients", &[]), n(3));
    assert_eq!(
        value(&text, "verge_messages_stored_total", &["iothub="]),
        n(ROUTED + UPSTREAM)
    );
    assert!(value(&text, "verge_store_bytes", &[]).unwrap() > 0.0);
    let failed = text
        .lines()
        .find(|l| l.starts_with("edgehub_client_connect_failed_total{"))
        .unwrap_or_else(|| panic!("no refused connection counted:\n{text}"));
    assert!(
        failed.contains(r#"id="edge1/modA""#) && failed.ends_with(" 1"),
        "{failed}"
    );
    assert_eq!(
        value(
            &text,
            "edgehub_gettwin_total",
            &[r#"source="edge_hub""#, r#"id="edge1/modA""#]
        ),
        n(1)
    );
    assert_eq!(
        value(
            &text,
            "edgehub_reported_properties_total",
            &[r#"target="edge_hub""#, r#"id="edge1/modA""#]
        ),
        n(1)
    );
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_stores_the_hubs_series() {
    if Prometheus::skip() {
        return;
    }
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let (hub, mut clients) = traffic(&pki, storage.path()).await;
    let addr = hub.metrics_addr.expect("metrics enabled by default");
    // The harness blocks (bounded waits): off the runtime's workers.
    let prom = tokio::task::spawn_blocking(move || Prometheus::start("edgehub", &[addr]))
        .await
        .unwrap();
    let wait =
        |q: &str, want: usize| tokio::task::block_in_place(|| prom.wait_value(q, want as f64));
    // The scrape itself succeeded (Prometheus parsed the exposition).
    wait(r#"up{job="edgehub"}"#, 1);
    let labels = wait(
        r#"edgehub_messages_received_total{id="edge1/modA",route_output="out1"}"#,
        ROUTED,
    );
    assert_eq!(labels["iothub"], "testhub.azure-devices.net");
    assert_eq!(labels["edge_device"], "edge1");
    assert_eq!(
        labels["instance_number"].as_str().unwrap().len(),
        36,
        "a GUID: {labels:?}"
    );
    wait(
        r#"edgehub_messages_sent_total{from="edge1/modA",to="edge1/modB",to_route_input="in1"}"#,
        ROUTED,
    );
    wait(
        r#"edgehub_messages_dropped_total{reason="no_route",from="edge1/modA"}"#,
        UNROUTED,
    );
    wait(r#"edgehub_queue_length{endpoint="$upstream"}"#, UPSTREAM);
    wait("edgehub_connected_clients", 3);
    wait(
        r#"sum(edgehub_client_connect_success_total{edge_device="edge1"})"#,
        3,
    );
    wait(r#"edgehub_gettwin_total{id="edge1/modA"}"#, 1);
    // Counters grow as Prometheus watches: two more routed messages.
    let mut a = clients.remove(0);
    for i in 0..2u16 {
        let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out1");
        publish_qos1(&mut a, &topic, b"more", 100 + i).await;
    }
    wait(
        r#"edgehub_messages_received_total{id="edge1/modA",route_output="out1"}"#,
        ROUTED + 2,
    );
    // A client leaving shows in the gauge and the disconnect counter.
    drop(a);
    wait("edgehub_connected_clients", 2);
    wait(r#"edgehub_client_disconnect_total{id="edge1/modA"}"#, 1);
    hub.shutdown().await;
}

//! Pipelined ingest and windowed delivery, end to end on 127.0.0.1: a
//! publisher keeps many QoS 1 messages in flight and gets its PUBACKs in
//! order; the receiver gets every message in order, and after dropping its
//! connection with deliveries unacknowledged it gets them again (at least
//! once), still in order.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::collections::BTreeSet;

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, SubscribeReasonCode};
use verge_hub::Hub;

const N: u32 = 600;
const WINDOW: u32 = 48;

fn seq(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_and_windowed_delivery() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let hub = Hub::start(config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0"))
        .await
        .unwrap();
    let (mut b, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert_eq!(
        subscribe1(&mut b, &format!("devices/{DEVICE}/modules/modB/inputs/#")).await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", true).await;
    let topic = format!("devices/{DEVICE}/modules/modA/messages/events/%24.on=out1");

    // Up to WINDOW unacknowledged publishes; PUBACKs must come in order.
    let mut sent = 0u32;
    let mut acked = 0u32;
    while acked < N {
        while sent < N && sent - acked < WINDOW {
            let mut p = Publish::new(&topic, QoS::AtLeastOnce, sent.to_string().into_bytes());
            p.pkid = u16::try_from(sent % 60_000 + 1).unwrap();
            a.send(Packet::Publish(p)).await;
            sent += 1;
        }
        match a.recv().await {
            Some(Packet::PubAck(ack)) => {
                assert_eq!(
                    u32::from(ack.pkid),
                    acked % 60_000 + 1,
                    "PUBACK out of order"
                );
                acked += 1;
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    // B acknowledges the first 200 and leaves with more delivered, unacknowledged.
    for i in 0..200 {
        assert_eq!(seq(&next_pub(&mut b).await), i);
    }
    let mut unacked = 0;
    while unacked < 10 {
        match b.recv().await {
            Some(Packet::Publish(_)) => unacked += 1,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    // Give the hub time to checkpoint what B acknowledged.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(b);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // Back: redelivery starts at or before the first unacknowledged message
    // and runs in order to the end.
    let (mut b, present) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modB", false).await;
    assert!(present);
    let first = seq(&next_pub(&mut b).await);
    assert!(
        first <= 200,
        "message 200 was never acknowledged, resumed at {first}"
    );
    let mut seen: BTreeSet<u32> = (0..=first).collect();
    let mut last = first;
    while last < N - 1 {
        let p = next_pub(&mut b).await;
        let s = seq(&p);
        assert_eq!(s, last + 1, "out of order after {last}");
        seen.insert(s);
        last = s;
    }
    assert_eq!(seen.len() as u32, N);
    assert!(
        maybe_pub(&mut b, std::time::Duration::from_millis(300))
            .await
            .is_none()
    );
    hub.shutdown().await;
}

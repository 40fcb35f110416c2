//! The service API in-process over real TLS (generated CA): the D2C NDJSON
//! follow stream and C2D send/feedback paths, which the Python SDK does not
//! cover.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::ApiServer;
use verge_cloud::{DeviceSpec, Settlement};
use verge_core::{ClientId, DeviceId, Message};

#[tokio::test]
async fn d2c_follow_and_c2d_over_https() {
    let api = ApiServer::start().await;
    let cloud = &api.cloud;
    let http = api.client();
    let token = api.policy_token();
    let base = format!("https://{}", api.host);

    // No token: 401 in IoT Hub's error shape.
    let r = http.get(format!("{base}/devices")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["iothub-errorcode"], "IotHubUnauthorizedAccess");

    cloud
        .put_device("d", DeviceSpec::default(), None)
        .await
        .unwrap();
    let d = ClientId::device(DeviceId::new("d").unwrap());
    for i in 0..2 {
        let mut m = Message::new(format!("t{i}"));
        m.properties.insert("n", i.to_string());
        cloud.ingest(&d, m).await.unwrap();
    }
    let mut resp = http
        .get(format!("{base}/verge/messages?from=0&follow=true"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    let mut produced = false;
    while lines.len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("follow stream stalled")
            .unwrap()
            .expect("follow stream ended");
        buf.extend_from_slice(&chunk);
        while let Some(p) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=p).collect();
            lines.push(serde_json::from_slice::<serde_json::Value>(&line).unwrap());
        }
        if lines.len() == 2 && !produced {
            // Only now does the third message exist: it must arrive by following.
            produced = true;
            cloud.ingest(&d, Message::new("t2")).await.unwrap();
        }
    }
    assert_eq!(lines[0]["offset"], 0);
    assert_eq!(lines[0]["deviceId"], "d");
    assert_eq!(lines[0]["properties"]["n"], "0");
    assert_eq!(lines[0]["body"], "dDA=");
    assert_eq!(lines[2]["offset"], 2);
    drop(resp);
    // Without follow the stream ends at the tail; `max` bounds it.
    let text = http
        .get(format!("{base}/verge/messages?from=1&max=1"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.contains("\"offset\":1"));

    // C2D over the Verge path, then the endpoint side, then feedback.
    let r = http
        .post(format!(
            "{base}/verge/devices/d/messages/deviceBound?ttlSecs=60"
        ))
        .header("Authorization", &token)
        .header("iothub-messageid", "c1")
        .header("iothub-app-color", "red")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let delivery = cloud.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(delivery.message.properties.get("color"), Some("red"));
    assert_eq!(delivery.message.body.as_ref(), b"payload");
    cloud
        .c2d_settle("d", &delivery.lock_token, Settlement::Complete)
        .await
        .unwrap();
    let fb: serde_json::Value = http
        .get(format!("{base}/verge/feedback?from=0"))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fb[0]["originalMessageId"], "c1");
    assert_eq!(fb[0]["statusCode"], "Success");
    assert_eq!(fb[0]["seq"], 0);
    let r = http
        .post(format!("{base}/verge/devices/ghost/messages/deviceBound"))
        .header("Authorization", &token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Names with capitals keep them (HTTP lowercases header names): IoT Hub
    // delivers `kitToken`, not `kittoken`.
    let r = http
        .post(format!(
            "{base}/verge/devices/d/messages/deviceBound?ttlSecs=60"
        ))
        .header("Authorization", &token)
        .header("iothub-messageid", "c2")
        .header("verge-app-properties", "kitToken=A%26b%3Dc&Color=Red")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let delivery = cloud.c2d_next("d").await.unwrap().unwrap();
    assert_eq!(delivery.message.properties.get("kitToken"), Some("A&b=c"));
    assert_eq!(delivery.message.properties.get("Color"), Some("Red"));
    assert_eq!(delivery.message.properties.get("kittoken"), None);
    let r = http
        .post(format!("{base}/verge/devices/d/messages/deviceBound"))
        .header("Authorization", &token)
        .header("verge-app-properties", "bad=%ff")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    tokio::time::timeout(Duration::from_secs(10), api.stop())
        .await
        .unwrap();
}

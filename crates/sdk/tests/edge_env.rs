//! `ModuleClient::from_edge`: trust bundle and SAS signing through a workload
//! API (a minimal fake of verged's, on a Unix socket), against a real hub.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_sdk::{EdgeEnvironment, Message, ModuleClient};

/// Serves `GET /trust-bundle` and `POST /modules/{m}/genid/{g}/sign`; counts signs.
fn fake_workload(
    socket: std::path::PathBuf,
    ca_pem: String,
    module: &'static str,
) -> Arc<AtomicUsize> {
    let signs = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let counter = signs.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (ca_pem, counter) = (ca_pem.clone(), counter.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_len, content_len) = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_len + content_len {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let body = &buf[head_len..head_len + content_len];
                let reply = if line.starts_with("GET /trust-bundle?api-version=") {
                    serde_json::json!({ "certificate": ca_pem })
                } else if line.starts_with(&format!("POST /modules/{module}/genid/")) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let req: serde_json::Value = serde_json::from_slice(body).unwrap();
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(req["data"].as_str().unwrap())
                        .unwrap();
                    serde_json::json!({ "digest": module_key(module).sign(&data) })
                } else {
                    serde_json::json!({ "message": format!("unexpected {line}") })
                };
                let text = reply.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    signs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_from_edge_environment_uses_the_workload_api() {
    init_tracing();
    let env = env();
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let socket = env.dir.path().join("workload.sock");
    let signs = fake_workload(socket.clone(), env.ca_pem.clone(), "modA");
    let edge = EdgeEnvironment {
        iothub_hostname: HUB.into(),
        device_id: DEVICE.into(),
        module_id: "modA".into(),
        gateway_hostname: "localhost".into(),
        generation_id: "gen-a".into(),
        workload_uri: format!("unix://{}", socket.display()),
        api_version: "2019-01-30".into(),
    };
    let opts = verge_sdk::ClientOptions {
        sas_ttl: Duration::from_secs(4),
        ..options(&hub)
    };
    let a = ModuleClient::from_edge(&edge, opts).await.unwrap();
    a.wait_connected(T).await.unwrap();
    let b = module(&hub, &env, "modB").await;
    let mut inputs = b.inputs().await.unwrap();
    b.on_method(|req| async move { (201, req.payload) })
        .await
        .unwrap();

    a.send_output("out1", Message::new("via workload"))
        .await
        .unwrap();
    let got = tokio::time::timeout(T, inputs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.body, bytes::Bytes::from("via workload"));

    // invoke_method signs its Authorization token through the workload API too.
    let r = a
        .invoke_method(
            DEVICE,
            Some("modB"),
            "m",
            serde_json::json!([1]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.payload), (201, serde_json::json!([1])));

    // Renewal signs again and reconnects.
    tokio::time::sleep(Duration::from_secs(4)).await;
    a.send_output("out1", Message::new("after renewal"))
        .await
        .unwrap();
    let got = tokio::time::timeout(T, inputs.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.message.body, bytes::Bytes::from("after renewal"));
    assert!(
        signs.load(Ordering::SeqCst) >= 3,
        "{}",
        signs.load(Ordering::SeqCst)
    );
    assert!(a.connections() >= 2);

    // A bad workload URI is reported.
    let bad = EdgeEnvironment {
        workload_uri: "http://localhost:1".into(),
        ..edge
    };
    assert!(ModuleClient::from_edge(&bad, options(&hub)).await.is_err());
    hub.shutdown().await;
}

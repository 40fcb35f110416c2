//! The hub's listeners against connections that hold resources without
//! making progress: HTTPS closes silent, slowloris and stalled-body
//! connections within its timeout, and holds new connections at its cap
//! while the MQTT port keeps accepting.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use verge_hub::Hub;

async fn tls_open(addr: SocketAddr, ca_pem: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(T, tls_connector(ca_pem).connect(name, tcp))
        .await
        .unwrap()
        .unwrap()
}

/// Whether the server closes `s` within `limit` (a response before the
/// close is read and ignored).
async fn closed_within(s: &mut (impl AsyncRead + Unpin), limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn https_closes_silent_slowloris_and_stalled_body_connections() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    cfg.limits.http_timeout_secs = 1;
    let hub = Hub::start(cfg).await.unwrap();
    let limit = Duration::from_secs(4);

    // Silent after the TLS handshake.
    let mut silent = tls_open(hub.https_addr, &pki.ca_pem).await;

    // Slowloris: a header line every 200 ms, the head never finished.
    let slow = tls_open(hub.https_addr, &pki.ca_pem).await;
    let (mut slow_r, mut slow_w) = tokio::io::split(slow);
    let drip = tokio::spawn(async move {
        let _ = slow_w
            .write_all(b"PUT /edgehub/desired HTTP/1.1\r\nHost: localhost\r\n")
            .await;
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow_w
                .write_all(format!("X-Drip-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    });

    // A body announced as 100 bytes, one sent.
    let mut stalled = tls_open(hub.https_addr, &pki.ca_pem).await;
    stalled
        .write_all(
            b"PUT /edgehub/desired HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();

    let start = Instant::now();
    let (a, b, c) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut slow_r, limit),
        closed_within(&mut stalled, limit),
    );
    assert!(a, "silent connection still open");
    assert!(b, "slowloris connection still open");
    assert!(c, "stalled-body connection still open");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "closed too early"
    );
    drip.abort();
    assert!(hub.listener_stats().1.timed_out() >= 3);

    // A complete request is still served (refused: no credentials).
    let mut ok = tls_open(hub.https_addr, &pki.ca_pem).await;
    ok.write_all(b"PUT /edgehub/desired HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(T, ok.read_to_end(&mut resp))
        .await
        .unwrap()
        .ok();
    assert!(
        resp.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn https_at_its_cap_holds_new_connections_while_mqtt_accepts() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let mut cfg = config(&pki, storage.path(), "127.0.0.1:0", "127.0.0.1:0");
    cfg.limits.max_https_connections = Some(20);
    cfg.limits.max_connections_per_ip = Some(20);
    let hub = Hub::start(cfg).await.unwrap();

    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(tls_open(hub.https_addr, &pki.ca_pem).await);
    }
    // The 21st is left in the backlog: no TLS handshake.
    let tcp = TcpStream::connect(hub.https_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut pending = Box::pin(tls_connector(&pki.ca_pem).connect(name, tcp));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pending)
            .await
            .is_err(),
        "HTTPS served a connection over its cap"
    );
    // MQTT is not affected.
    let (mut a, _) = connect_module(hub.mqtt_addr, &pki.ca_pem, "modA", true).await;
    subscribe1(&mut a, "$iothub/twin/res/#").await;
    // A freed slot lets the waiting connection in.
    drop(flood.pop());
    tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert_eq!(hub.listener_stats().1.open(), 20);
    hub.shutdown().await;
}

//! verge-hub as a process with a low descriptor limit (`ulimit -n 128`):
//! a flood of connections on the HTTPS port that never finish their TLS
//! handshake must not take the descriptors the MQTT port needs.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::net::TcpStream;
use verge_testkit::net::free_addr;

#[tokio::test]
async fn https_flood_does_not_starve_mqtt_under_a_low_fd_limit() {
    let pki = pki();
    let storage = tempfile::tempdir().unwrap();
    let (mqtt, https) = (free_addr(), free_addr());
    config(&pki, storage.path(), &mqtt.to_string(), &https.to_string());
    // Handshakes may take long: the flood holds whatever it is given.
    let path = pki.dir.path().join("hub.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "connect_timeout_secs = 3",
        "connect_timeout_secs = 60\nmax_https_connections = 20",
    );
    std::fs::write(&path, text).unwrap();
    let mut hub = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_verge-hub"))
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up = tokio::time::Instant::now() + T;
    while TcpStream::connect(https).await.is_err() {
        assert!(tokio::time::Instant::now() < up, "verge-hub did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // More connections than the hub has descriptors, none sending a byte.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(https).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut a, _) = tokio::time::timeout(T, connect_module(mqtt, &pki.ca_pem, "modA", true))
        .await
        .expect("MQTT connection starved by the HTTPS flood");
    subscribe1(&mut a, "$iothub/twin/res/#").await;
    drop(flood);
    hub.kill().await.unwrap();
}

//! Bad input on the AMQP endpoint, in-process against a real `HubState`:
//! a wrong protocol header, an oversize frame, a malformed frame and a
//! connection that never presents a token each close that connection (and
//! only it) within its deadline; a session storm before any token is cut
//! short.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use verge_hub::HubState;

const SASL: &[u8; 8] = b"AMQP\x03\x01\x00\x00";
const AMQP: &[u8; 8] = b"AMQP\x00\x01\x00\x00";

fn cfg() -> verge_amqp::Config {
    verge_amqp::Config {
        open_timeout: Duration::from_secs(2),
        auth_timeout: Duration::from_secs(2),
        ..verge_amqp::Config::default()
    }
}

async fn state(dir: &std::path::Path) -> Arc<HubState> {
    let toml = format!(
        r#"
iothub_hostname = "testhub.azure-devices.net"
device_id = "edge1"
device_key = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ="
storage_dir = "{}"
[tls]
cert = "unused.pem"
key = "unused.key"
[modules]
modA = "gen-a"
"#,
        dir.join("storage").display()
    );
    let cfg = verge_hub::config::Config::from_toml(&toml).unwrap();
    HubState::open(cfg).await.unwrap()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    frame_on(0, kind, body)
}

fn frame_on(channel: u16, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(8 + body.len())
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&[2, kind]);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// BEGIN: remote-channel null, next-outgoing-id 0, both windows 100.
const BEGIN: &[u8] = &[
    0x00, 0x53, 0x11, 0xc0, 0x08, 0x04, 0x40, 0x52, 0x00, 0x52, 0x64, 0x52, 0x64,
];

/// A described list (descriptor `code`) holding one short field.
fn performative(code: u8, field_type: u8, field: &[u8]) -> Vec<u8> {
    let len = u8::try_from(2 + 1 + field.len()).unwrap();
    let mut body = vec![0x00, 0x53, code, 0xc0, len, 0x01, field_type];
    body.push(u8::try_from(field.len()).unwrap());
    body.extend_from_slice(field);
    body
}

/// Deadlines longer than any test here.
fn patient() -> verge_amqp::Config {
    verge_amqp::Config {
        open_timeout: Duration::from_secs(120),
        auth_timeout: Duration::from_secs(120),
        ..verge_amqp::Config::default()
    }
}

/// Starts serving one connection; returns the client end and the task.
fn connect(state: &Arc<HubState>) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    connect_with(state, cfg())
}

fn connect_with(
    state: &Arc<HubState>,
    cfg: verge_amqp::Config,
) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let task = tokio::spawn(verge_amqp::serve(
        state.clone(),
        server,
        "test".into(),
        cfg,
        verge_shutdown::CancellationToken::new(),
    ));
    (client, task)
}

/// Reads until EOF (the server closed), within `limit`; returns what came.
async fn until_closed(client: &mut DuplexStream, limit: Duration, step: &str) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(limit, client.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{step}: the server did not close the connection in time"))
        .unwrap();
    got
}

async fn finished(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve did not return")
        .unwrap();
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path()).await;

    // A healthy connection, kept open throughout: SASL header answered.
    let (mut good, good_task) = connect_with(&state, patient());
    good.write_all(SASL).await.unwrap();
    let mut header = [0u8; 8];
    good.read_exact(&mut header).await.unwrap();
    assert_eq!(&header, SASL);

    // 1. Not AMQP: answered with our header, then closed.
    let (mut c, task) = connect(&state);
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let got = until_closed(&mut c, Duration::from_secs(5), "wrong header").await;
    assert_eq!(&got, AMQP);
    finished(task).await;

    // 2. An oversize frame after OPEN (far above the 64 KiB max-frame-size).
    let (mut c, task) = connect(&state);
    c.write_all(AMQP).await.unwrap();
    c.write_all(&frame(0, &performative(0x10, 0xa1, b"client")))
        .await
        .unwrap();
    let mut huge = (16u32 * 1024 * 1024).to_be_bytes().to_vec();
    huge.extend_from_slice(&[2, 0, 0, 0]);
    huge.extend(std::iter::repeat_n(0u8, 128 * 1024));
    let _ = c.write_all(&huge).await;
    until_closed(&mut c, Duration::from_secs(5), "oversize frame").await;
    finished(task).await;

    // 3. A malformed frame body (a described list of garbage).
    let (mut c, task) = connect(&state);
    c.write_all(AMQP).await.unwrap();
    c.write_all(&frame(0, &[0x00, 0x53, 0x10, 0xc0, 0xff, 0xff, 0xff]))
        .await
        .unwrap();
    until_closed(&mut c, Duration::from_secs(5), "malformed frame").await;
    finished(task).await;

    // 4. OPEN, then nothing: no valid token within the auth timeout.
    let (mut c, task) = connect(&state);
    c.write_all(AMQP).await.unwrap();
    c.write_all(&frame(0, &performative(0x10, 0xa1, b"idle")))
        .await
        .unwrap();
    let t0 = Instant::now();
    until_closed(&mut c, Duration::from_secs(10), "no token").await;
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "closed before the auth timeout"
    );
    finished(task).await;

    // 5. Header, then silence: closed at the open deadline.
    let (mut c, task) = connect(&state);
    c.write_all(SASL).await.unwrap();
    until_closed(&mut c, Duration::from_secs(10), "silent after header").await;
    finished(task).await;

    // The healthy connection still answers: SASL-INIT ANONYMOUS → outcome ok.
    good.write_all(&frame(1, &performative(0x41, 0xa3, b"ANONYMOUS")))
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    // sasl-mechanisms (0x40) then sasl-outcome (0x44) with code 0.
    while !got.windows(3).any(|w| w == [0x00, 0x53, 0x44]) {
        assert!(Instant::now() < deadline, "no SASL outcome: {got:?}");
        let n = tokio::time::timeout(Duration::from_secs(5), good.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the healthy connection was closed");
        got.extend_from_slice(&buf[..n]);
    }
    drop(good);
    finished(good_task).await;
}

/// Sessions cost a task each: a connection without a valid token gets 32,
/// not the 1,024 channels OPEN offers (each identity with a token makes
/// room for one more).
#[tokio::test]
async fn a_session_storm_before_any_token_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path()).await;
    let (mut c, task) = connect_with(&state, patient());
    c.write_all(AMQP).await.unwrap();
    c.write_all(&frame(0, &performative(0x10, 0xa1, b"storm")))
        .await
        .unwrap();
    let mut storm = Vec::new();
    for channel in 0..1024u16 {
        storm.extend_from_slice(&frame_on(channel, 0, BEGIN));
    }
    // The server may close before taking it all.
    let _ = c.write_all(&storm).await;
    let got = until_closed(&mut c, Duration::from_secs(10), "session storm").await;
    let begins = got.windows(3).filter(|w| *w == [0x00, 0x53, 0x11]).count();
    assert!(
        begins <= 32,
        "{begins} sessions begun on a connection without a token"
    );
    assert!(
        got.windows(b"amqp:resource-limit-exceeded".len())
            .any(|w| w == b"amqp:resource-limit-exceeded"),
        "no resource-limit-exceeded in the CLOSE"
    );
    finished(task).await;
}

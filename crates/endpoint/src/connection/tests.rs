//! One connection against an in-memory backend: a client that stops
//! reading is closed, a take-over ends a connection blocked in a write,
//! PUBACKs go out only after the backend made each message durable, in order.

#![allow(clippy::unwrap_used)]
use std::sync::Mutex;

use rumqttc::mqttbytes::v4::Connect;
use serde_json::Value;
use tokio::io::DuplexStream;

use super::*;
use crate::auth::AuthError;
use crate::session::Sessions;
use crate::{Limits, Rejection};

/// Telemetry is durable when the test says so.
struct Mock {
    sessions: Arc<Sessions>,
    durable: Mutex<Vec<oneshot::Sender<()>>>,
    handles: Mutex<Vec<ConnHandle>>,
}

impl Backend for Mock {
    type Link = ();
    type Pending = oneshot::Receiver<()>;

    fn limits(&self) -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(5),
            max_inflight: 8,
            max_packet_bytes: 1 << 16,
        }
    }
    fn sessions(&self) -> &Sessions {
        &self.sessions
    }
    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError> {
        ClientId::parse(creds.client_id).map_err(|e| AuthError::Refused(e.to_string()))
    }
    async fn connected(&self, _: &ClientId, h: &ConnHandle) -> Result<(), Rejection> {
        self.handles.lock().unwrap().push(h.clone());
        Ok(())
    }
    async fn telemetry_submit(
        &self,
        _: &ClientId,
        _: &str,
        _: Bytes,
    ) -> Result<oneshot::Receiver<()>, Rejection> {
        let (tx, rx) = oneshot::channel();
        self.durable.lock().unwrap().push(tx);
        Ok(rx)
    }
    async fn telemetry_wait(&self, p: &mut oneshot::Receiver<()>) -> Result<(), Rejection> {
        p.await.map_err(|_| Rejection::new(500, "store failed"))
    }
    async fn twin_get(&self, _: &ClientId) -> Result<Value, Rejection> {
        Ok(serde_json::json!({"desired": {}, "reported": {}}))
    }
    async fn twin_patch_reported(&self, _: &ClientId, _: Value) -> Result<u64, Rejection> {
        Ok(1)
    }
    async fn method_response(&self, _: &ClientId, _: &str, _: i64, _: Bytes) {}
}

async fn mock(dir: &std::path::Path) -> Arc<Mock> {
    Arc::new(Mock {
        sessions: Sessions::open(dir.join("s"), &verge_shutdown::Shutdown::new())
            .await
            .unwrap(),
        durable: Mutex::new(Vec::new()),
        handles: Mutex::new(Vec::new()),
    })
}

/// Connects `client` as dev1/mod1 with `keep_alive` seconds; returns the
/// connection's handle (its outbound queue).
async fn connect_mod1(backend: &Mock, client: &mut DuplexStream, keep_alive: u16) -> ConnHandle {
    let mut c = Connect::new("dev1/mod1");
    c.keep_alive = keep_alive;
    write(client, Packet::Connect(c)).await;
    let mut buf = BytesMut::new();
    match next(client, &mut buf).await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    backend.handles.lock().unwrap().pop().unwrap()
}

/// Queues 8 KiB deliveries to `h` until the connection goes away.
fn flood(h: ConnHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..256 {
            let out = Outbound {
                topic: "devices/dev1/modules/mod1/inputs/in1/".into(),
                payload: Bytes::from(vec![0u8; 8192]),
                ack: None,
            };
            if h.tx.send(out).await.is_err() {
                return;
            }
        }
    })
}

/// A client that never reads what is routed to it is closed within its
/// keep-alive period × 1.5, though the writer is blocked.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let backend = mock(dir.path()).await;
    let (mut client, server) = tokio::io::duplex(4096);
    let task = tokio::spawn(serve(backend.clone(), server, "test".into()));
    let h = connect_mod1(&backend, &mut client, 1).await;
    let start = Instant::now();
    let pusher = flood(h);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("a client that does not read is still connected")
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(1400));
    pusher.abort();
}

/// A new connection takes the session over promptly while the old one
/// is blocked writing to a client that does not read.
#[tokio::test]
async fn take_over_ends_a_connection_blocked_in_write() {
    let dir = tempfile::tempdir().unwrap();
    let backend = mock(dir.path()).await;
    let (mut old, server) = tokio::io::duplex(4096);
    let old_task = tokio::spawn(serve(backend.clone(), server, "old".into()));
    // No keep-alive: only the connect timeout (5 s) would bound the write.
    let h = connect_mod1(&backend, &mut old, 0).await;
    let pusher = flood(h);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!old_task.is_finished());

    let (mut new, server) = tokio::io::duplex(1 << 16);
    let _new_task = tokio::spawn(serve(backend.clone(), server, "new".into()));
    let start = Instant::now();
    connect_mod1(&backend, &mut new, 0).await;
    tokio::time::timeout(Duration::from_secs(1), old_task)
        .await
        .expect("the old connection outlived its take-over")
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    pusher.abort();
}

async fn write(io: &mut DuplexStream, p: Packet) {
    let mut out = BytesMut::new();
    p.write(&mut out, 1 << 16).unwrap();
    io.write_all(&out).await.unwrap();
}

/// The next packet, or `None` if nothing comes within 200 ms.
async fn next(io: &mut DuplexStream, buf: &mut BytesMut) -> Option<Packet> {
    tokio::time::timeout(Duration::from_millis(200), read_packet(io, buf, 1 << 16))
        .await
        .ok()
        .map(|r| r.unwrap())
}

fn publish(topic: &str, pkid: u16) -> Packet {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, b"x".to_vec());
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Many telemetry publishes are in flight at once; each PUBACK waits for
/// its message to be durable, and PUBACKs (a twin request's too) go out
/// in packet order even when durability completes out of order.
#[tokio::test]
async fn pubacks_after_durable_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let backend = mock(dir.path()).await;
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(serve(backend.clone(), server, "test".into()));
    write(&mut client, Packet::Connect(Connect::new("dev1/mod1"))).await;
    let mut buf = BytesMut::new();
    assert!(matches!(
        next(&mut client, &mut buf).await,
        Some(Packet::ConnAck(_))
    ));

    let events = "devices/dev1/modules/mod1/messages/events/";
    for pkid in 1..=5 {
        write(&mut client, publish(events, pkid)).await;
    }
    write(&mut client, publish("$iothub/twin/GET/?$rid=7", 6)).await;
    // All five submitted before any is durable; nothing acknowledged.
    for _ in 0..50 {
        if backend.durable.lock().unwrap().len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut durable: Vec<_> = std::mem::take(&mut *backend.durable.lock().unwrap());
    assert_eq!(durable.len(), 5);
    assert!(next(&mut client, &mut buf).await.is_none());

    // #3 durable first: still nothing (#1 is not).
    let _ = durable.remove(2).send(());
    assert!(next(&mut client, &mut buf).await.is_none());
    let _ = durable.remove(0).send(());
    let acked = |p: Option<Packet>| match p {
        Some(Packet::PubAck(a)) => a.pkid,
        other => panic!("expected PUBACK, got {other:?}"),
    };
    assert_eq!(acked(next(&mut client, &mut buf).await), 1);
    assert!(next(&mut client, &mut buf).await.is_none());
    let _ = durable.remove(0).send(()); // #2 → 2 and 3
    assert_eq!(acked(next(&mut client, &mut buf).await), 2);
    assert_eq!(acked(next(&mut client, &mut buf).await), 3);
    for d in durable.drain(..) {
        let _ = d.send(());
    }
    assert_eq!(acked(next(&mut client, &mut buf).await), 4);
    assert_eq!(acked(next(&mut client, &mut buf).await), 5);
    assert_eq!(acked(next(&mut client, &mut buf).await), 6);
    match next(&mut client, &mut buf).await {
        Some(Packet::Publish(p)) => assert!(p.topic.starts_with(b"$iothub/twin/res/200/")),
        other => panic!("expected the twin response, got {other:?}"),
    }

    // A failed append closes the connection without its PUBACK.
    write(&mut client, publish(events, 8)).await;
    for _ in 0..50 {
        if !backend.durable.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    backend.durable.lock().unwrap().clear();
    let closed = tokio::time::timeout(
        Duration::from_secs(2),
        read_packet(&mut client, &mut buf, 1 << 16),
    )
    .await
    .unwrap();
    assert!(matches!(closed, Err(Close::Eof)), "{closed:?}");
    task.await.unwrap();
}

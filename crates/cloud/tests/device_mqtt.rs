//! The device endpoint in-process over real TLS (generated CA), driven by a
//! bare MQTT 3.1.1 client: SAS auth against the registry, telemetry into the
//! D2C log, twin GET/reported/desired, direct methods, C2D with completion
//! feedback (live and queued while offline), module identities.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use verge_cloud::device::{self, CloudBackend};
use verge_cloud::registry::SymmetricKeys;
use verge_cloud::{CloudOptions, CloudState, DeviceSpec, ModuleSpec, tls};
use verge_core::{ClientId, DeviceId, Message, ModuleId, SasToken, SharedAccessKey};

const T: Duration = Duration::from_secs(10);
const HOST: &str = "cloud.test";

struct Raw {
    s: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    async fn connect(
        addr: SocketAddr,
        ca_pem: &[u8],
        client_id: &str,
        password: &str,
        clean: bool,
    ) -> (Raw, ConnectReturnCode, bool) {
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut raw = Raw {
            s,
            buf: BytesMut::new(),
        };
        let mut c = Connect::new(client_id);
        c.clean_session = clean;
        c.keep_alive = 60;
        c.set_credentials(
            format!("{HOST}/{client_id}/?api-version=2021-04-12"),
            password.to_owned(),
        );
        raw.send(Packet::Connect(c)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(ConnAck {
                code,
                session_present,
            })) => (raw, code, session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 22).unwrap();
        self.s.write_all(&out).await.unwrap();
        self.s.flush().await.unwrap();
    }

    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(T, async {
            loop {
                if !self.buf.is_empty() {
                    match Packet::read(&mut self.buf, 1 << 22) {
                        Ok(p) => return Some(p),
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                        Err(e) => panic!("bad packet from server: {e}"),
                    }
                }
                match self.s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("timed out waiting for a packet")
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
        s.pkid = 1;
        self.send(Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => a.return_codes[0],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, payload: &[u8], pkid: u16) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return,
                Some(_) => {}
                None => panic!("closed before PUBACK"),
            }
        }
    }

    /// The next PUBLISH (PUBACKed when QoS 1 and `ack`).
    async fn next_pub(&mut self, ack: bool) -> Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => {
                    if ack && p.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(p.pkid))).await;
                    }
                    return p;
                }
                Some(_) => {}
                None => panic!("closed while waiting for a publish"),
            }
        }
    }
}

fn topic(p: &Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

fn token(resource: &str, key: &SharedAccessKey, expiry: u64) -> String {
    SasToken::sign(resource, key, expiry, None).to_string()
}

fn keys(k: &SharedAccessKey) -> SymmetricKeys {
    SymmetricKeys {
        primary: k.to_base64(),
        secondary: SharedAccessKey::from_bytes(vec![7u8; 32]).to_base64(),
    }
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + T;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_modules_over_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let files = tls::ensure_files(dir.path(), HOST, None, None).unwrap();
    let api_tls = tls::server_config(&files).unwrap();
    let ca = std::fs::read(files.ca.unwrap()).unwrap();
    let cloud = CloudState::open(CloudOptions {
        data_dir: dir.path().to_owned(),
        hostname: HOST.to_owned(),
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = CloudBackend::open(cloud.clone(), dir.path().join("mqtt-sessions.json"))
        .await
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(device::serve(
        listener,
        device::mqtt_tls(&api_tls),
        backend,
        async {
            let _ = stop_rx.await;
        },
    ));

    let dkey = SharedAccessKey::from_bytes(vec![1u8; 32]);
    let mkey = SharedAccessKey::from_bytes(vec![2u8; 32]);
    let spec = DeviceSpec {
        keys: Some(keys(&dkey)),
        ..DeviceSpec::default()
    };
    cloud.put_device("dev1", spec, None).await.unwrap();
    let mspec = ModuleSpec {
        keys: Some(keys(&mkey)),
        ..ModuleSpec::default()
    };
    cloud.put_module("dev1", "modX", mspec, None).await.unwrap();
    let dev = ClientId::device(DeviceId::new("dev1").unwrap());
    let module = ClientId::module(
        DeviceId::new("dev1").unwrap(),
        ModuleId::new("modX").unwrap(),
    );
    let far = 4_000_000_000;
    let dev_token = token(&format!("{HOST}/devices/dev1"), &dkey, far);

    // Refusals: CONNACK 5 for a wrong key, an expired token, an unknown
    // device, and a token for another identity.
    let wrong = SharedAccessKey::from_bytes(vec![9u8; 32]);
    for (id, pw) in [
        ("dev1", token(&format!("{HOST}/devices/dev1"), &wrong, far)),
        ("dev1", token(&format!("{HOST}/devices/dev1"), &dkey, 1_000)),
        ("ghost", token(&format!("{HOST}/devices/ghost"), &dkey, far)),
        ("dev1/modX", dev_token.clone()),
    ] {
        let (_, code, _) = Raw::connect(addr, &ca, id, &pw, true).await;
        assert_eq!(code, ConnectReturnCode::NotAuthorized, "{id}");
    }
    assert!(!cloud.is_connected(&dev));

    // The device connects with a persistent session.
    let (mut d, code, present) = Raw::connect(addr, &ca, "dev1", &dev_token, false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, false));
    wait_for("registered as connected", || cloud.is_connected(&dev)).await;
    for f in [
        "devices/dev1/messages/devicebound/#",
        "$iothub/methods/POST/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/twin/res/#",
    ] {
        assert_eq!(
            d.subscribe(f).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }
    assert_eq!(
        d.subscribe("devices/other/messages/devicebound/#").await,
        SubscribeReasonCode::Failure
    );

    // Telemetry: PUBACK means it is in the D2C log, stamped, with its properties.
    let tail = cloud.d2c_tail();
    d.publish(
        "devices/dev1/messages/events/%24.mid=m1&color=blue",
        b"{\"t\":21}",
        10,
    )
    .await;
    let logged = cloud.read_d2c(tail, 10).unwrap();
    assert_eq!(logged.len(), 1);
    let m = &logged[0].message;
    assert_eq!(m.body.as_ref(), b"{\"t\":21}");
    assert_eq!(m.system.message_id.as_deref(), Some("m1"));
    assert_eq!(m.system.connection_device_id.as_deref(), Some("dev1"));
    assert_eq!(m.system.connection_module_id, None);
    assert_eq!(m.properties.get("color"), Some("blue"));

    // Twin GET and reported PATCH.
    let mut p = Publish::new("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, Vec::new());
    p.pkid = 0;
    d.send(Packet::Publish(p)).await;
    let r = d.next_pub(true).await;
    assert_eq!(topic(&r), "$iothub/twin/res/200/?$rid=1");
    let twin: Value = serde_json::from_slice(&r.payload).unwrap();
    assert!(twin["desired"]["$version"].is_u64(), "{twin}");
    let p = Publish::new(
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        QoS::AtMostOnce,
        br#"{"fw":"1.2"}"#.to_vec(),
    );
    d.send(Packet::Publish(p)).await;
    let r = d.next_pub(true).await;
    assert!(
        topic(&r).starts_with("$iothub/twin/res/204/?$rid=2&$version="),
        "{}",
        topic(&r)
    );
    let t = cloud.get_twin(&dev).unwrap();
    assert_eq!(t.twin.reported.properties["fw"], "1.2");
    let p = Publish::new(
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        QoS::AtMostOnce,
        b"not json".to_vec(),
    );
    d.send(Packet::Publish(p)).await;
    assert_eq!(
        topic(&d.next_pub(true).await),
        "$iothub/twin/res/400/?$rid=3"
    );

    // Desired patch from the service side.
    cloud
        .update_twin(&dev, json!({"properties": {"desired": {"rate": 5}}}), None)
        .await
        .unwrap();
    let r = d.next_pub(true).await;
    assert!(
        topic(&r).starts_with("$iothub/twin/PATCH/properties/desired/?$version="),
        "{}",
        topic(&r)
    );
    let patch: Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(patch["rate"], 5);
    assert!(patch["$version"].is_u64());

    // Names no MQTT topic can carry are refused (400) before anything is
    // sent, and the device's connection stays up: the next call reaches it.
    for name in ["re#boot", "re+boot"] {
        let e = cloud
            .invoke_method(&dev, name, json!(1), T, T)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 400, "{name}: {e}");
    }

    // Direct method, answered by the device.
    let call = {
        let cloud = cloud.clone();
        let dev = dev.clone();
        tokio::spawn(async move {
            cloud
                .invoke_method(&dev, "reboot", json!({"delay": 1}), T, T)
                .await
        })
    };
    let r = d.next_pub(true).await;
    let t = topic(&r);
    let rid = t
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .unwrap_or_else(|| panic!("{t}"))
        .to_owned();
    assert_eq!(
        serde_json::from_slice::<Value>(&r.payload).unwrap(),
        json!({"delay": 1})
    );
    let p = Publish::new(
        format!("$iothub/methods/res/201/?$rid={rid}"),
        QoS::AtMostOnce,
        br#"{"done":true}"#.to_vec(),
    );
    d.send(Packet::Publish(p)).await;
    let answer = call.await.unwrap().unwrap();
    assert_eq!(answer.status, 201);
    assert_eq!(answer.payload, json!({"done": true}));

    // C2D: delivered with its properties; completed on PUBACK (feedback).
    let mut c2d = Message::new("hello");
    c2d.system.message_id = Some("c2d-1".into());
    c2d.properties.insert("kind", "greeting");
    cloud.c2d_send("dev1", c2d, 60).await.unwrap();
    let r = d.next_pub(false).await;
    let t = topic(&r);
    assert!(t.starts_with("devices/dev1/messages/devicebound/"), "{t}");
    assert!(t.contains("kind=greeting"), "{t}");
    assert!(t.contains("c2d-1"), "{t}");
    assert_eq!(r.payload.as_ref(), b"hello");
    // Not acknowledged yet: no feedback.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(cloud.c2d_feedback(0, 10).unwrap().is_empty());
    d.send(Packet::PubAck(PubAck::new(r.pkid))).await;
    wait_for("C2D completion feedback", || {
        !cloud.c2d_feedback(0, 10).unwrap().is_empty()
    })
    .await;
    let fb = cloud.c2d_feedback(0, 10).unwrap();
    assert_eq!(fb[0].original_message_id, "c2d-1");
    assert_eq!(fb[0].status_code, "Success");

    // A module identity: own telemetry, twin; no C2D subscription.
    let mod_token = token(&format!("{HOST}/devices/dev1/modules/modX"), &mkey, far);
    let (mut m, code, _) = Raw::connect(addr, &ca, "dev1/modX", &mod_token, true).await;
    assert_eq!(code, ConnectReturnCode::Success);
    wait_for("module connected", || cloud.is_connected(&module)).await;
    assert_eq!(
        m.subscribe("devices/dev1/messages/devicebound/#").await,
        SubscribeReasonCode::Failure
    );
    let tail = cloud.d2c_tail();
    m.publish(
        "devices/dev1/modules/modX/messages/events/%24.on=out1&n=1",
        b"from module",
        3,
    )
    .await;
    let logged = cloud.read_d2c(tail, 10).unwrap();
    let mm = &logged[0].message;
    assert_eq!(mm.system.connection_module_id.as_deref(), Some("modX"));
    assert_eq!(mm.system.output_name.as_deref(), Some("out1"));
    assert_eq!(mm.properties.get("n"), Some("1"));
    m.subscribe("$iothub/twin/res/#").await;
    let p = Publish::new(
        "$iothub/twin/PATCH/properties/reported/?$rid=9",
        QoS::AtMostOnce,
        br#"{"ready":true}"#.to_vec(),
    );
    m.send(Packet::Publish(p)).await;
    assert!(topic(&m.next_pub(true).await).starts_with("$iothub/twin/res/204/?$rid=9"));
    assert_eq!(
        cloud.get_twin(&module).unwrap().twin.reported.properties["ready"],
        true
    );
    // A module cannot publish as its device.
    let mut p = Publish::new(
        "devices/dev1/messages/events/",
        QoS::AtLeastOnce,
        b"x".to_vec(),
    );
    p.pkid = 4;
    m.send(Packet::Publish(p)).await;
    assert!(
        m.recv().await.is_none(),
        "foreign topic must close the connection"
    );
    wait_for("module disconnected", || !cloud.is_connected(&module)).await;

    // Device goes away: disconnected. A C2D message sent meanwhile is
    // delivered when it comes back on its persistent session.
    d.send(Packet::Disconnect).await;
    drop(d);
    wait_for("device disconnected", || !cloud.is_connected(&dev)).await;
    let mut c2d = Message::new("while away");
    c2d.system.message_id = Some("c2d-2".into());
    cloud.c2d_send("dev1", c2d, 60).await.unwrap();
    let (mut d, code, present) = Raw::connect(addr, &ca, "dev1", &dev_token, false).await;
    assert_eq!((code, present), (ConnectReturnCode::Success, true));
    let r = d.next_pub(true).await;
    assert!(topic(&r).contains("c2d-2"), "{}", topic(&r));
    wait_for("second completion", || {
        cloud.c2d_feedback(0, 10).unwrap().len() == 2
    })
    .await;

    // Takeover: a second connection of the same identity closes the first.
    let (mut d2, code, _) = Raw::connect(addr, &ca, "dev1", &dev_token, false).await;
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(d.recv().await.is_none(), "old connection must be closed");
    assert!(cloud.is_connected(&dev));
    d2.send(Packet::Disconnect).await;

    let _ = stop_tx.send(());
    tokio::time::timeout(T, server).await.unwrap().unwrap();
}

#![no_main]
//! The hub's MQTT connection handler (`verge_hub::connection::serve`) fed
//! arbitrary bytes as the client's side of the stream, against a real
//! `HubState` (store, sessions, twins in a temp dir, a route set).
//!
//! The first input byte picks the mode: odd → a valid, authenticated CONNECT
//! (module `edge1/modA`, clean session) is sent first, so the rest of the
//! input reaches the packet loop (publish → topic classification → property
//! bag → routing → store; twin GET/reported; method responses; SUBSCRIBE
//! authorization; PUBACK bookkeeping); even → the input is the whole stream
//! (packet decoding, CONNECT parsing, username and SAS-token checks).
//! Bad input must close the connection, never panic or hang. Every message
//! the hub accepted must be deliverable: its delivery topic fits MQTT's
//! 65,535 bytes (checked on what each run stored, which is then
//! checkpointed away).
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_hub::HubState;

const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";

struct Env {
    rt: tokio::runtime::Runtime,
    state: Arc<HubState>,
    connect: Vec<u8>,
    _dir: tempfile::TempDir,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes = dir.path().join("routes.json");
        std::fs::write(
            &routes,
            r#"{"schemaVersion": "1.1", "routes": {
                "toB": "FROM /messages/modules/modA/outputs/out1 WHERE k = 'v' OR $body.t > 20 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")",
                "up": {"route": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream", "priority": 1}
            }}"#,
        )
        .expect("routes file");
        let toml = format!(
            r#"
iothub_hostname = "fuzzhub.azure-devices.net"
device_id = "edge1"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
[tls]
cert = "unused.pem"
key = "unused.key"
[modules]
modA = "gen-a"
modB = "gen-b"
[limits]
connect_timeout_secs = 2
max_inflight = 4
"#,
            storage = dir.path().join("storage").display(),
            routes = routes.display(),
        );
        let cfg = verge_hub::config::Config::from_toml(&toml).expect("config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let state = rt.block_on(HubState::open(cfg)).expect("hub state");
        let key = verge_core::SharedAccessKey::from_base64(DEVICE_KEY)
            .expect("key")
            .derive_module_key(&verge_core::ModuleId::new("modA").expect("id"), "gen-a");
        let expiry = verge_hub::auth::unix_now() + 10 * 365 * 24 * 3600;
        let token = verge_core::SasToken::sign(
            "fuzzhub.azure-devices.net/devices/edge1/modules/modA",
            &key,
            expiry,
            None,
        )
        .to_string();
        let connect = connect_packet(
            "edge1/modA",
            "fuzzhub.azure-devices.net/edge1/modA/?api-version=2019-10-01",
            &token,
        );
        Env {
            rt,
            state,
            connect,
            _dir: dir,
        }
    })
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 60) with credentials.
fn connect_packet(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 60]);
    string(&mut body, client_id);
    string(&mut body, username);
    string(&mut body, password);
    let mut out = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let env = env();
    let mut input = Vec::with_capacity(env.connect.len() + rest.len());
    if mode & 1 == 1 {
        input.extend_from_slice(&env.connect);
    }
    input.extend_from_slice(rest);
    env.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serve = verge_hub::connection::serve(env.state.clone(), server, "fuzz".into());
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async {
            let _ = wr.write_all(&input).await;
            // End of input = the client closes its side.
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
            sink
        };
        // The handler must finish by itself once the client has closed.
        let ((), (), replies) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(serve, write, read)
        })
        .await
        .expect("the connection handler did not finish after the client closed");
        if mode & 1 == 1 {
            // The valid CONNECT is accepted whatever follows it (CONNACK 0, no session).
            assert_eq!(replies.get(..4), Some(&[0x20, 0x02, 0x00, 0x00][..]));
        }
        let endpoint = "modules/modB/inputs/in1";
        let stored = env
            .state
            .store
            .read(endpoint, 1024)
            .await
            .expect("store read");
        for m in &stored {
            let topic = verge_hub::delivery::input_topic("edge1", "modB", "in1", m);
            assert!(
                topic.len() <= verge_core::message::MAX_TOPIC_LEN,
                "accepted a message whose delivery topic is {} bytes",
                topic.len()
            );
        }
        for m in &stored {
            let _ = env
                .state
                .store
                .checkpoint(endpoint, m.priority, m.offset)
                .await;
        }
    });
});

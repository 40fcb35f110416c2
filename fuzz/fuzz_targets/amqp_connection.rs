#![no_main]
//! The hub's AMQP endpoint (`verge_amqp::serve`: protocol header, SASL, the
//! fe2o3 frame decoder and connection/session/link state machine, `$cbs`,
//! link address parsing, message conversion) fed arbitrary bytes as the
//! client's side of the stream, against a real `HubState`.
//!
//! The first input byte picks a prefix so the rest reaches deeper states:
//! 0 → nothing (headers and SASL themselves are fuzzed); 1 → SASL header,
//! SASL-INIT ANONYMOUS, AMQP header and OPEN; 2 → bare AMQP header and OPEN
//! (the C# SDK's opening). Bad input must close the connection, never panic
//! or hang.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_hub::HubState;

const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";

struct Env {
    rt: tokio::runtime::Runtime,
    state: Arc<HubState>,
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
                "toB": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")"
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
        Env {
            rt,
            state,
            _dir: dir,
        }
    })
}

/// One AMQP frame (type 0 = AMQP, 1 = SASL) on channel 0.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&[2, kind, 0, 0]);
    out.extend_from_slice(body);
    out
}

/// A described list (descriptor `code`) of one string-ish field.
fn performative(code: u8, field_type: u8, field: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x53, code, 0xc0, (2 + 1 + field.len()) as u8, 0x01];
    body.extend_from_slice(&[field_type, field.len() as u8]);
    body.extend_from_slice(field);
    body
}

fn open() -> Vec<u8> {
    let mut out = b"AMQP\x00\x01\x00\x00".to_vec();
    out.extend(frame(0, &performative(0x10, 0xa1, b"fuzz")));
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let env = env();
    let mut input = Vec::new();
    match mode % 3 {
        1 => {
            input.extend_from_slice(b"AMQP\x03\x01\x00\x00");
            input.extend(frame(1, &performative(0x41, 0xa3, b"ANONYMOUS")));
            input.extend(open());
        }
        2 => input.extend(open()),
        _ => {}
    }
    input.extend_from_slice(rest);
    let cfg = verge_amqp::Config {
        open_timeout: Duration::from_secs(2),
        auth_timeout: Duration::from_secs(2),
        ..verge_amqp::Config::default()
    };
    env.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serve = verge_amqp::serve(
            env.state.clone(),
            server,
            "fuzz".into(),
            cfg,
            tokio_util::sync::CancellationToken::new(),
        );
        let (mut rd, mut wr) = tokio::io::split(client);
        let write = async {
            let _ = wr.write_all(&input).await;
            // End of input = the client closes its side.
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        // The handler must finish by itself once the client has closed.
        tokio::time::timeout(Duration::from_secs(15), async {
            tokio::join!(serve, write, read)
        })
        .await
        .expect("the AMQP connection handler did not finish after the client closed");
    });
});

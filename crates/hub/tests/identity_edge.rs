//! Edge-environment mode end to end: a real verged (in-process, process
//! backend) and the verge-hub binary started with the environment verged
//! gives its edgeHub module, and a config with no `[tls]` and no keys.
//!
//! Checked: a module created through verged's management API connects with
//! a token signed through its own workload socket (the hub learns the new
//! identity on the miss); the served certificate is the one verged issued
//! for the gateway hostname (the SAN is checked by the TLS client) and is
//! renewed without a restart (short lifetime through verged's test knob);
//! after verged stops, the restarted hub still serves TLS and accepts the
//! module (both from its caches).
//!
//! The hub first runs as verged's process module `edgeHub` (verged serves a
//! module's workload socket to the module's own processes only); once verged
//! is stopped it is restarted directly. modA's tokens are signed by this test
//! process, which is verged itself here (verged serves its own process).
#![allow(clippy::unwrap_used, clippy::disallowed_methods, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Raw, code};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::{Value, json};
use verge_core::SasToken;
use verge_daemon::client::{WorkloadClient, request, socket_path_from_uri};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const IOTHUB: &str = "hub.example.net";
const GATEWAY: &str = "edge1.local";
const MV: &str = "api-version=2022-08-03";

/// The hub process; killed on drop (also on panic).
struct HubProc(Child);

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn mgmt(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let r = request(
        sock,
        method,
        &format!("{path}?{MV}"),
        body.map(|b| b.to_string().into_bytes()),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

/// A module's process group (the process backend makes each module a group
/// leader); killed on drop, also on panic.
struct ModuleGroup(i32);

impl ModuleGroup {
    fn alive(&self) -> bool {
        // A zombie (exited, not yet reaped) is not alive.
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    }
}

impl Drop for ModuleGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
        let start = Instant::now();
        while self.alive() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a created module through the management API; returns its process group.
async fn start_module(sock: &Path, name: &str) -> ModuleGroup {
    let (status, v) = mgmt(sock, "POST", &format!("/modules/{name}/start"), None).await;
    assert_eq!(status, 204, "{v}");
    let (status, v) = mgmt(sock, "GET", &format!("/modules/{name}"), None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"]["runtimeStatus"]["status"], "running", "{v}");
    ModuleGroup(v["id"].as_str().unwrap().parse().unwrap())
}

/// Creates a module through the management API; returns the environment verged gives it.
async fn create_module(sock: &Path, name: &str) -> BTreeMap<String, String> {
    create_module_running(sock, name, "/bin/true").await
}

/// [`create_module`] with `image` (the process backend's command line).
async fn create_module_running(sock: &Path, name: &str, image: &str) -> BTreeMap<String, String> {
    let spec = json!({"name": name, "type": "process", "imagePullPolicy": "never",
        "config": {"settings": {"image": image}, "env": []}});
    let (status, v) = mgmt(sock, "POST", "/modules", Some(spec)).await;
    assert_eq!(status, 201, "{v}");
    v["config"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn workload_of(env: &BTreeMap<String, String>) -> WorkloadClient {
    WorkloadClient::new(
        socket_path_from_uri(&env["IOTEDGE_WORKLOADURI"]).unwrap(),
        &env["IOTEDGE_MODULEID"],
        &env["IOTEDGE_MODULEGENERATIONID"],
    )
}

fn start_hub(config: &Path, env: &BTreeMap<String, String>) -> HubProc {
    let child = Command::new(env!("CARGO_BIN_EXE_verge-hub"))
        .arg("--config")
        .arg(config)
        .envs(env)
        .env("RUST_LOG", "info")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    HubProc(child)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_to(addr: SocketAddr, ca_pem: &str, name: &str) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
    common::tls_connector(ca_pem).connect(name, tcp).await
}

/// Waits until the hub completes TLS handshakes for the gateway name.
async fn wait_tls(addr: SocketAddr, ca_pem: &str, mut alive: impl FnMut() -> bool) -> Tls {
    let start = Instant::now();
    loop {
        if let Ok(s) = tls_to(addr, ca_pem, GATEWAY).await {
            return s;
        }
        assert!(alive(), "the hub exited");
        assert!(start.elapsed() < Duration::from_secs(30), "hub not up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn leaf_der(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn connack(
    addr: SocketAddr,
    ca_pem: &str,
    client_id: &str,
    token: &str,
) -> ConnectReturnCode {
    let s = tls_to(addr, ca_pem, GATEWAY).await.unwrap();
    let user = format!("{IOTHUB}/{client_id}/?api-version=2019-10-01");
    let (_raw, ack) = Raw::over(s).handshake(client_id, &user, token, true).await;
    code(ack).0
}

async fn module_token(w: &WorkloadClient, device: &str, module: &str) -> String {
    let resource = format!("{IOTHUB}/devices/{device}/modules/{module}");
    let expiry = verge_hub::auth::unix_now() + 3600;
    let sig = w
        .sign(SasToken::string_to_sign(&resource, expiry).as_bytes())
        .await
        .unwrap();
    SasToken::from_signature(&resource, sig, expiry, None).to_string()
}

struct Verged {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    mgmt: PathBuf,
}

async fn start_verged(dir: &Path) -> Verged {
    let home = dir.join("home");
    let cfg = dir.join("verged.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"hostname = "{GATEWAY}"
homedir = "{home}"
server_cert_lifetime_secs = 30

[provisioning]
source = "manual"
connection_string = "HostName={IOTHUB};DeviceId=dev1;SharedAccessKey={KEY}"

[agent]
name = "edgeAgent"
type = "process"
[agent.config]
image = "/bin/sleep 600"

[edge_ca]
auto_generated_edge_ca_expiry_days = 30
"#,
            home = home.display()
        ),
    )
    .unwrap();
    let config = verge_daemon::config::Config::load(&cfg).unwrap();
    let runtime = verge_runtime::process::ProcessRuntime::open(
        verge_runtime::process::ProcessConfig::new(home.join("modules")),
    )
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(verge_daemon::daemon::run(
        config,
        Arc::new(runtime),
        async {
            let _ = rx.await;
        },
    ));
    let mgmt = home.join("mgmt.sock");
    let start = Instant::now();
    while !mgmt.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "verged not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Verged {
        stop: Some(tx),
        task,
        mgmt,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_runs_on_identities_and_certificates_from_verged() {
    let dir = tempfile::tempdir().unwrap();
    let mut verged = start_verged(dir.path()).await;

    let (mqtt, https) = (
        verge_testkit::net::free_port(),
        verge_testkit::net::free_port(),
    );
    let hub_cfg = dir.path().join("hub.toml");
    std::fs::write(
        &hub_cfg,
        format!(
            r#"storage_dir = "{storage}"
[listen]
mqtt = "127.0.0.1:{mqtt}"
https = "127.0.0.1:{https}"
[workload]
cert_retry_max_secs = 2
"#,
            storage = dir.path().join("hub").display()
        ),
    )
    .unwrap();
    let hub_image = format!(
        "{} --config {}",
        env!("CARGO_BIN_EXE_verge-hub"),
        hub_cfg.display()
    );
    let hub_env = create_module_running(&verged.mgmt, "edgeHub", &hub_image).await;
    assert_eq!(hub_env["IOTEDGE_MODULEID"], "$edgeHub");
    assert_eq!(hub_env["EdgeDeviceHostName"], GATEWAY);
    // The trust bundle is public: this test (verged's own process) reads it.
    let ca_pem = workload_of(&hub_env).trust_bundle().await.unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{mqtt}").parse().unwrap();
    let hub_module = start_module(&verged.mgmt, "edgeHub").await;
    let first = wait_tls(addr, &ca_pem, || hub_module.alive()).await;
    let first_der = leaf_der(&first);
    drop(first);
    // The certificate names the gateway host (rustls checks the SAN), nothing else.
    assert!(tls_to(addr, &ca_pem, "other.example").await.is_err());

    // A module created after the hub started, signing through its own socket.
    let a_env = create_module(&verged.mgmt, "modA").await;
    let a = workload_of(&a_env);
    let token = module_token(&a, "dev1", "modA").await;
    let start = Instant::now();
    loop {
        // The first try is a miss that makes the hub fetch the identities.
        match connack(addr, &ca_pem, "dev1/modA", &token).await {
            ConnectReturnCode::Success => break,
            other => {
                // The first miss refreshes at once, even with the default
                // identities_miss_secs (10 s) since the start-up fetch.
                assert!(
                    start.elapsed() < Duration::from_secs(3),
                    "modA still refused: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    // A token signed with another key is refused.
    let forged = SasToken::sign(
        &format!("{IOTHUB}/devices/dev1/modules/modA"),
        &verge_core::SharedAccessKey::from_bytes(vec![9u8; 32]),
        verge_hub::auth::unix_now() + 600,
        None,
    )
    .to_string();
    assert_ne!(
        connack(addr, &ca_pem, "dev1/modA", &forged).await,
        ConnectReturnCode::Success
    );
    // The identities are cached privately.
    let cache = dir.path().join("hub/module-identities.json");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&cache).unwrap().contains("modA"));

    // Renewal: the 30 s certificate is replaced at ~24 s, hub still running.
    let start = Instant::now();
    loop {
        let s = tls_to(addr, &ca_pem, GATEWAY).await.unwrap();
        if leaf_der(&s) != first_der {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "the server certificate was not renewed"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(hub_module.alive(), "the hub restarted");

    // verged stops; the hub restarts from its caches.
    let _ = verged.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(60), &mut verged.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        workload_of(&hub_env).trust_bundle().await.is_err(),
        "verged still answers"
    );
    drop(hub_module);
    let mut hub = start_hub(&hub_cfg, &hub_env);
    let s = wait_tls(addr, &ca_pem, || hub.0.try_wait().unwrap().is_none()).await;
    drop(s);
    assert_eq!(
        connack(addr, &ca_pem, "dev1/modA", &token).await,
        ConnectReturnCode::Success
    );
    assert_ne!(
        connack(addr, &ca_pem, "dev1/modB", &token).await,
        ConnectReturnCode::Success
    );
    drop(hub);
}

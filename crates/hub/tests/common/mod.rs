//! Shared helpers for the hub's integration tests: a test PKI, configs, SAS
//! tokens and a raw MQTT-over-TLS client.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use verge_core::{ModuleId, SasToken, SharedAccessKey};
use verge_hub::config::Config;

pub const HUB: &str = "testhub.azure-devices.net";
pub const DEVICE: &str = "edge1";
pub const DEVICE_KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLXRlc3RzLTEyMzQ=";
pub const LEAF_KEY: &str = "bGVhZi1kZXZpY2Uta2V5LWZvci10ZXN0cy0xMjM0NTY=";
pub const T: Duration = Duration::from_secs(10);

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "verge test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let cert = dir.path().join("hub.pem");
    let key = dir.path().join("hub.key");
    std::fs::write(&cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        dir,
        cert,
        key,
    }
}

pub const ROUTES: &str = r#"{
  "schemaVersion": "1.1",
  "routes": {
    "AtoB": "FROM /messages/modules/modA/outputs/out1 INTO BrokeredEndpoint(\"/modules/modB/inputs/in1\")",
    "leafUp": "FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream"
  },
  "storeAndForwardConfiguration": {"timeToLiveSecs": 7200}
}"#;

/// Writes routes and a config into `pki.dir` (storage under `storage`).
pub fn config(pki: &Pki, storage: &Path, mqtt: &str, https: &str) -> Config {
    let routes = pki.dir.path().join("routes.json");
    std::fs::write(&routes, ROUTES).unwrap();
    let twins = pki.dir.path().join("twins.json");
    let text = format!(
        r#"
iothub_hostname = "{HUB}"
hostname = "localhost"
device_id = "{DEVICE}"
device_key = "{DEVICE_KEY}"
storage_dir = "{storage}"
routes_file = "{routes}"
twins_file = "{twins}"
[listen]
mqtt = "{mqtt}"
https = "{https}"
[tls]
cert = "{cert}"
key = "{key}"
[modules]
modA = "gen-a"
modB = "gen-b"
[devices]
leaf1 = "{LEAF_KEY}"
[limits]
connect_timeout_secs = 3
twins_poll_ms = 100
routes_poll_ms = 100
[metrics]
listen = "127.0.0.1:0"
"#,
        storage = storage.display(),
        routes = routes.display(),
        twins = twins.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
    );
    std::fs::write(pki.dir.path().join("hub.toml"), &text).unwrap();
    Config::from_toml(&text).unwrap()
}

pub fn module_key(module: &str) -> SharedAccessKey {
    let gen_id = match module {
        "modA" => "gen-a",
        "modB" => "gen-b",
        _ => "gen-x",
    };
    SharedAccessKey::from_base64(DEVICE_KEY)
        .unwrap()
        .derive_module_key(&ModuleId::new(module).unwrap(), gen_id)
}

pub fn now() -> u64 {
    verge_hub::auth::unix_now()
}

pub fn module_token(module: &str) -> String {
    SasToken::sign(
        &format!("{HUB}/devices/{DEVICE}/modules/{module}"),
        &module_key(module),
        now() + 3600,
        None,
    )
    .to_string()
}

pub fn username(client_id: &str) -> String {
    format!("{HUB}/{client_id}/?api-version=2019-10-01&DeviceClientType=test")
}

pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    verge_hub::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A bare MQTT 3.1.1 client, packet by packet (over TLS by default).
pub struct Raw<S = TlsStream<TcpStream>> {
    pub s: S,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn open(addr: SocketAddr, ca_pem: &str) -> Raw {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let s = tokio::time::timeout(T, tls_connector(ca_pem).connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Connects as `client_id` with `password`; returns the CONNACK (or None if closed).
    pub async fn connect(
        addr: SocketAddr,
        ca_pem: &str,
        client_id: &str,
        user: &str,
        password: &str,
        clean: bool,
    ) -> (Raw, Option<Packet>) {
        let raw = Raw::open(addr, ca_pem).await;
        raw.handshake(client_id, user, password, clean).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    /// Wraps an open stream.
    pub fn over(s: S) -> Raw<S> {
        Raw {
            s,
            buf: BytesMut::new(),
        }
    }

    /// Sends CONNECT; returns the CONNACK (or None if closed).
    pub async fn handshake(
        mut self,
        client_id: &str,
        user: &str,
        password: &str,
        clean: bool,
    ) -> (Raw<S>, Option<Packet>) {
        let mut c = Connect::new(client_id);
        c.clean_session = clean;
        c.keep_alive = 60;
        c.set_credentials(user, password.to_owned());
        self.send(Packet::Connect(c)).await;
        let ack = self.recv().await;
        (self, ack)
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        p.write(&mut out, 1 << 22).unwrap();
        self.s.write_all(&out).await.unwrap();
        self.s.flush().await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// The next packet; `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
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
}

/// The CONNACK return code and session-present flag.
pub fn code(p: Option<Packet>) -> (ConnectReturnCode, bool) {
    match p {
        Some(Packet::ConnAck(ConnAck {
            code,
            session_present,
        })) => (code, session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects module `m` over TLS to the MQTT port; panics unless accepted.
pub async fn connect_module(addr: SocketAddr, ca_pem: &str, m: &str, clean: bool) -> (Raw, bool) {
    let id = format!("{DEVICE}/{m}");
    let (raw, ack) = Raw::connect(addr, ca_pem, &id, &username(&id), &module_token(m), clean).await;
    let (c, present) = code(ack);
    assert_eq!(c, ConnectReturnCode::Success);
    (raw, present)
}

/// Connects downstream device `leaf1` (SAS) over TLS; panics unless accepted.
pub async fn connect_leaf(addr: SocketAddr, ca_pem: &str, clean: bool) -> Raw {
    let tok = SasToken::sign(
        &format!("{HUB}/devices/leaf1"),
        &SharedAccessKey::from_base64(LEAF_KEY).unwrap(),
        now() + 600,
        None,
    );
    let (raw, ack) = Raw::connect(
        addr,
        ca_pem,
        "leaf1",
        &username("leaf1"),
        &tok.to_string(),
        clean,
    )
    .await;
    assert_eq!(code(ack).0, ConnectReturnCode::Success);
    raw
}

/// Publishes QoS 1 and waits for the PUBACK.
pub async fn publish_qos1<S: AsyncRead + AsyncWrite + Unpin>(
    raw: &mut Raw<S>,
    topic: &str,
    payload: &[u8],
    pkid: u16,
) {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = pkid;
    raw.send(Packet::Publish(p)).await;
    loop {
        match raw.recv().await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => return,
            Some(_) => {}
            None => panic!("closed before PUBACK"),
        }
    }
}

/// Subscribes to one filter at QoS 1; returns the SUBACK code.
pub async fn subscribe1<S: AsyncRead + AsyncWrite + Unpin>(
    raw: &mut Raw<S>,
    filter: &str,
) -> SubscribeReasonCode {
    let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
    s.pkid = 1;
    raw.send(Packet::Subscribe(s)).await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => a.return_codes[0],
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// The next PUBLISH from the hub (PUBACKed if QoS 1).
pub async fn next_pub<S: AsyncRead + AsyncWrite + Unpin>(raw: &mut Raw<S>) -> Publish {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    raw.send(Packet::PubAck(PubAck::new(p.pkid))).await;
                }
                return p;
            }
            Some(_) => {}
            None => panic!("closed while waiting for a publish"),
        }
    }
}

/// Like [`next_pub`], but `None` if nothing arrives within `wait`.
pub async fn maybe_pub<S: AsyncRead + AsyncWrite + Unpin>(
    raw: &mut Raw<S>,
    wait: Duration,
) -> Option<Publish> {
    tokio::time::timeout(wait, next_pub(raw)).await.ok()
}

/// Opens `wss://localhost:{port}{path}` (TLS to `addr`) offering `protocol`.
/// Returns the HTTP status of a refused upgrade as the error.
pub async fn ws_open(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    protocol: Option<&str>,
) -> Result<Raw<tokio::io::DuplexStream>, u16> {
    ws_open_with(addr, tls_connector(ca_pem), path, protocol).await
}

/// [`ws_open`] over TLS made by `connector` (e.g. with a client certificate).
pub async fn ws_open_with(
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    path: &str,
    protocol: Option<&str>,
) -> Result<Raw<tokio::io::DuplexStream>, u16> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut req = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, resp) = match tokio::time::timeout(T, tokio_tungstenite::client_async(req, tls))
        .await
        .unwrap()
    {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => return Err(r.status().as_u16()),
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    };
    if let Some(p) = protocol {
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok()),
            Some(p),
            "the server must select the subprotocol"
        );
    }
    // Bridge the frames to a byte pipe so the test speaks MQTT on a plain stream.
    let (mine, theirs) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let (mut sink, mut stream) = ws.split();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => match n {
                    Ok(0) | Err(_) => { let _ = sink.close().await; return; }
                    Ok(n) => {
                        if sink.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                            return;
                        }
                    }
                },
                m = stream.next() => match m {
                    Some(Ok(Message::Binary(b))) => {
                        if wr.write_all(&b).await.is_err() { return; }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => { let _ = wr.shutdown().await; return; }
                },
            }
        }
    });
    Ok(Raw::over(mine))
}

/// An HTTPS client builder; reqwest is built without a crypto provider of
/// its own, so the test installs ring (the hub's) as the process default.
pub fn https_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// Registers in verge-cloud the identities the test hub holds keys for:
/// edge1 (an IoT Edge device), its modules modA and modB, and leaf1.
pub async fn register_test_identities(cloud: &verge_cloud::CloudState) {
    use verge_cloud::registry::SymmetricKeys;
    use verge_cloud::{DeviceSpec, ModuleSpec};
    let keys = |k: &SharedAccessKey| SymmetricKeys {
        primary: k.to_base64(),
        secondary: SharedAccessKey::from_bytes(vec![9u8; 32]).to_base64(),
    };
    let spec = |k: &SharedAccessKey, edge: bool| DeviceSpec {
        keys: Some(keys(k)),
        iot_edge: edge,
        ..DeviceSpec::default()
    };
    let edge_key = SharedAccessKey::from_base64(DEVICE_KEY).unwrap();
    let leaf_key = SharedAccessKey::from_base64(LEAF_KEY).unwrap();
    cloud
        .put_device(DEVICE, spec(&edge_key, true), None)
        .await
        .unwrap();
    cloud
        .put_device("leaf1", spec(&leaf_key, false), None)
        .await
        .unwrap();
    for m in ["modA", "modB"] {
        let mspec = ModuleSpec {
            keys: Some(keys(&module_key(m))),
            ..ModuleSpec::default()
        };
        cloud.put_module(DEVICE, m, mspec, None).await.unwrap();
    }
}

/// The `verge-hub` binary as a child process, its output appended to a
/// log file (killed when dropped).
pub struct HubProc {
    child: Child,
    log: PathBuf,
}

impl HubProc {
    /// `verge-hub --config {toml}`, waited for until `mqtt` accepts.
    pub async fn start(toml: &Path, mqtt: SocketAddr, log: &Path) -> HubProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_verge-hub"));
        cmd.arg("--config").arg(toml);
        Self::spawn(&mut cmd, mqtt, log).await
    }

    /// Starts `cmd` (the hub, or what execs it) with upstream debug logs,
    /// its output appended to `log`; waits until `mqtt` accepts.
    pub async fn spawn(cmd: &mut Command, mqtt: SocketAddr, log: &Path) -> HubProc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .env("RUST_LOG", "info,verge_hub::upstream=debug")
            // The hub logs on stdout, as a module does.
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(mqtt).await.is_err() {
            assert!(Instant::now() < deadline, "verge-hub did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        HubProc {
            child,
            log: log.to_owned(),
        }
    }

    /// The hub's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has ended (crashed, or aborted by the kernel).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// What the hub logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT, as an operator's stop would (graceful shutdown).
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "verge-hub did not stop on SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of `s`, so a failing test's message shows where a long log ends.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs tests/python/`script` on `params` (saved as `dir`/params.json), killed after 180 s, so the SDK interop tests share one way to run a script.
pub fn run_interop_script(
    python: &Path,
    script: &str,
    params: &serde_json::Value,
    dir: &Path,
) -> (Option<ExitStatus>, String, String) {
    let params_path = dir.join("params.json");
    std::fs::write(&params_path, params.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    verge_testkit::run_bounded(
        Command::new(python).arg(script).arg(&params_path),
        Duration::from_secs(180),
    )
}

/// One start for every in-process verge-cloud the upstream tests run: state, device backend, TLS files and the test identities in a fresh directory.
pub struct LocalCloud {
    pub dir: tempfile::TempDir,
    pub files: verge_cloud::tls::TlsFiles,
    pub state: verge_cloud::CloudState,
    pub backend: Arc<verge_cloud::device::CloudBackend>,
}

/// Opens a [`LocalCloud`] (TLS files generated for `HUB`), shared so each upstream test file need not repeat the setup.
pub async fn local_cloud() -> LocalCloud {
    use verge_cloud::{CloudOptions, CloudState, device::CloudBackend, tls};
    let dir = tempfile::tempdir().unwrap();
    let files = tls::ensure_files(dir.path(), HUB, None, None).unwrap();
    let state = CloudState::open(CloudOptions {
        data_dir: dir.path().to_owned(),
        hostname: HUB.to_owned(),
    })
    .unwrap();
    let backend = CloudBackend::open(state.clone(), dir.path().join("mqtt-sessions.json"))
        .await
        .unwrap();
    register_test_identities(&state).await;
    LocalCloud {
        dir,
        files,
        state,
        backend,
    }
}

/// Polls `f` every `every` until it holds, failing after `limit`: the upstream tests' wait, with each file's own polling interval.
pub async fn wait_until(what: &str, limit: Duration, every: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// verge-cloud under `cloud_dir` (TLS files for `hostname`) holding edge1 as an IoT Edge device keyed with DEVICE_KEY, with edge1's device scope: the device-scope tests' common start.
pub async fn cloud_with_edge(
    cloud_dir: &Path,
    hostname: &str,
) -> (verge_cloud::tls::TlsFiles, verge_cloud::CloudState, String) {
    use verge_cloud::registry::SymmetricKeys;
    use verge_cloud::{CloudOptions, CloudState, DeviceSpec};
    let files = verge_cloud::tls::ensure_files(cloud_dir, hostname, None, None).unwrap();
    let cloud = CloudState::open(CloudOptions {
        data_dir: cloud_dir.to_owned(),
        hostname: hostname.into(),
    })
    .unwrap();
    let (edge, _) = cloud
        .put_device(
            DEVICE,
            DeviceSpec {
                keys: Some(SymmetricKeys {
                    primary: DEVICE_KEY.into(),
                    secondary: DEVICE_KEY.into(),
                }),
                iot_edge: true,
                ..DeviceSpec::default()
            },
            None,
        )
        .await
        .unwrap();
    let scope = edge.record.device_scope.clone().unwrap();
    (files, cloud, scope)
}

/// A TCP forwarder standing in for the network between the hub and its
/// cloud: counts the connections it bridged and can cut them all at once
/// (a real link cut: both ends see their socket close).
pub struct Forwarder {
    pub addr: SocketAddr,
    /// Connections bridged to the target so far.
    pub bridged: Arc<std::sync::atomic::AtomicUsize>,
    /// Bridged connections open right now.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Listens on `addr`, bridging each connection to `target`.
    pub async fn start(addr: SocketAddr, target: SocketAddr) -> Forwarder {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let bridged = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (b, o, c) = (bridged.clone(), open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                // As the hub and the cloud set on theirs: no Nagle delays.
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                b.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (o, mut cut) = (o.clone(), c.subscribe());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Forwarder {
            addr,
            bridged,
            open,
            cut,
            task,
        }
    }

    /// Closes every bridged connection (new ones are still accepted).
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn bridged(&self) -> usize {
        self.bridged.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// The `seq` application property of every D2C message verge-cloud logged,
/// by sender (`d` or `d/m`, as the cloud stamped it), in arrival order.
pub fn d2c_seqs(state: &verge_cloud::CloudState) -> std::collections::HashMap<String, Vec<u64>> {
    let mut out: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for e in state.read_d2c(0, 1_000_000).unwrap() {
        let s = &e.message.system;
        let id = match &s.connection_module_id {
            Some(m) => format!("{}/{m}", s.connection_device_id.as_deref().unwrap()),
            None => s.connection_device_id.clone().unwrap(),
        };
        let seq = e.message.properties.get("seq").unwrap().parse().unwrap();
        out.entry(id).or_default().push(seq);
    }
    out
}

/// verge-cloud's device endpoint on `listener`: AMQPS with `amqp`, else
/// MQTT/TLS; aborting the task closes it and every connection. One start for
/// the upstream tests' in-process clouds, whichever protocol the hub uses.
pub fn serve_devices(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<verge_cloud::device::CloudBackend>,
    amqp: bool,
) -> tokio::task::JoinHandle<()> {
    let never = std::future::pending::<()>();
    if amqp {
        tokio::spawn(verge_cloud::device::serve_amqps(
            listener, tls, backend, never,
        ))
    } else {
        tokio::spawn(verge_cloud::device::serve(listener, tls, backend, never))
    }
}

//! End to end with the real `verge-cloud` and `verged` binaries: verged
//! registers its module identities in the cloud as the device, with the
//! keys it derives, so a token signed through a module's workload socket
//! is accepted at the cloud's MQTT device endpoint (CONNACK 0). With the
//! cloud stopped, identities created and deleted meanwhile (and a verged
//! restart in between) reach the cloud once it is back; deleting an
//! identity deletes it in the cloud.
//!
//! The tokens are signed by the modules themselves: with the process backend
//! verged serves a module's workload socket to the module's own processes
//! only, so modA and the agent run [`SIGNER`], which signs what the test
//! asks through files.
//!
//! Everything binds 127.0.0.1 and temp-dir sockets; both processes are
//! stopped on drop (also on failure) and every wait is bounded.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use verge_core::id::ModuleId;
use verge_core::sas::{SasToken, SharedAccessKey, url_encode};
use verge_daemon::client::request;
use verge_testkit::cloud::{self, CloudProc};
use verge_testkit::verged::Config;

/// The edge device's key (verged's provisioning and the cloud registry).
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// The cloud's service policy key.
const POLICY_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
const DEVICE: &str = "edge1";
const MV: &str = "api-version=2022-08-03";

/// Builds `bin` of `package` into this test's target directory and profile.
fn build(package: &str, bin: &str) -> PathBuf {
    let path = verge_testkit::build(&[package]).join(bin);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

async fn wait_until<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// SIGTERM, then wait (bounded) for the exit.
fn terminate(mut child: Child) -> std::process::ExitStatus {
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Harness {
    dir: tempfile::TempDir,
    cloud_bin: PathBuf,
    verged_bin: PathBuf,
    cloud: Option<CloudProc>,
    verged: Option<Child>,
    https_port: u16,
    mqtt_port: u16,
    http: Option<reqwest::Client>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["cloud.log", "verged.log"] {
                eprintln!("--- {log} (tail)\n{}", tail(&self.dir.path().join(log), 60));
            }
        }
        let cloud = self.cloud.take().map(CloudProc::into_child);
        for c in [self.verged.take(), cloud].into_iter().flatten() {
            let _ = terminate(c);
        }
    }
}

impl Harness {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn mgmt(&self) -> PathBuf {
        self.home().join("mgmt.sock")
    }
    fn cloud_ca(&self) -> PathBuf {
        self.dir.path().join("cloud/tls/ca.pem")
    }
    fn verged_log(&self) -> PathBuf {
        self.dir.path().join("verged.log")
    }
    /// The signing script (written on first use).
    fn signer(&self) -> PathBuf {
        let p = self.dir.path().join("signer.sh");
        if !p.exists() {
            std::fs::write(&p, SIGNER).unwrap();
        }
        p
    }
    /// Where `module`'s signer takes requests.
    fn sign_dir(&self, module: &str) -> PathBuf {
        let d = self
            .dir
            .path()
            .join(format!("sign-{}", module.trim_start_matches('$')));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Starts verge-cloud on the harness's fixed ports (same data dir each time).
    fn start_cloud(&mut self) {
        let cfg = cloud::Config::new(&self.dir.path().join("cloud"))
            .listen(&format!("127.0.0.1:{}", self.https_port))
            .mqtt_listen(&format!("127.0.0.1:{}", self.mqtt_port))
            .policy_key(POLICY_KEY);
        self.cloud = Some(CloudProc::start(
            &self.cloud_bin,
            &cfg.render(),
            self.dir.path(),
            "info",
        ));
        if self.http.is_none() {
            let ca = std::fs::read(self.cloud_ca()).unwrap();
            // reqwest is built without a default crypto provider here.
            let _ = rustls::crypto::ring::default_provider().install_default();
            self.http = Some(
                reqwest::Client::builder()
                    .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
                    .build()
                    .unwrap(),
            );
        }
    }

    fn stop_cloud(&mut self) {
        self.cloud
            .take()
            .unwrap()
            .stop_term(Duration::from_secs(30));
    }

    /// A service API call with the policy token; status and JSON body.
    async fn service(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.service_if_match(method, path, body, None).await
    }

    /// [`Self::service`] with an `If-Match` header (an update).
    async fn service_if_match(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Value) {
        let host = format!("127.0.0.1:{}", self.https_port);
        let token = SasToken::sign(
            &host,
            &SharedAccessKey::from_base64(POLICY_KEY).unwrap(),
            4_000_000_000,
            Some("iothubowner"),
        )
        .to_string();
        let mut r = self
            .http
            .as_ref()
            .unwrap()
            .request(
                method,
                format!("https://{host}{path}?api-version=2021-04-12"),
            )
            .header("Authorization", token);
        if let Some(m) = if_match {
            r = r.header("If-Match", m);
        }
        if let Some(b) = body {
            r = r
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The cloud's primary and secondary key of a module, if registered.
    async fn cloud_keys(&self, module: &str) -> Option<(String, String)> {
        let (s, v) = self
            .service(
                reqwest::Method::GET,
                &format!("/devices/{DEVICE}/modules/{}", url_encode(module)),
                None,
            )
            .await;
        if s != 200 {
            return None;
        }
        let k = &v["authentication"]["symmetricKey"];
        Some((
            k["primaryKey"].as_str()?.to_owned(),
            k["secondaryKey"].as_str()?.to_owned(),
        ))
    }

    fn start_verged(&mut self) {
        self.start_verged_with(&format!(
            "connection_string = \"HostName=127.0.0.1;DeviceId={DEVICE};SharedAccessKey={KEY}\""
        ));
    }

    /// verged with `provisioning` (the device's hub, id and credential) in
    /// its `[provisioning]` section.
    fn start_verged_with(&mut self, provisioning: &str) {
        let cfg = Config::new(&self.home())
            .trust_bundle_cert(&self.cloud_ca())
            .provisioning(
                "manual",
                &format!("https_port = {}\n{provisioning}", self.https_port),
            )
            .agent_image(&format!(
                "/bin/sh {} {}",
                self.signer().display(),
                self.sign_dir("$edgeAgent").display()
            ))
            .extra("[edge_ca]\nauto_generated_edge_ca_expiry_days = 30\n")
            .write(self.dir.path().join("config.toml"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.verged_log())
            .unwrap();
        self.verged = Some(
            Command::new(&self.verged_bin)
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    async fn mgmt_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = request(
            &self.mgmt(),
            method,
            &format!("{path}?{MV}"),
            body.map(|b| b.to_string().into_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    /// verged's generation id of a module identity.
    async fn generation(&self, module: &str) -> Option<String> {
        let r = request(
            &self.mgmt(),
            "GET",
            &format!("/identities?{MV}"),
            None,
            Duration::from_secs(10),
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_slice(&r.body).ok()?;
        v["identities"]
            .as_array()?
            .iter()
            .find(|i| i["moduleId"] == module)?["generationId"]
            .as_str()
            .map(str::to_owned)
    }

    /// Waits until the cloud holds `module` with the key verged derives for it.
    async fn await_registered(&self, module: &str) -> String {
        self.await_registered_from(module, KEY).await
    }

    /// [`Self::await_registered`] with module keys derived from `device_key`.
    async fn await_registered_from(&self, module: &str, device_key: &str) -> String {
        wait_until(
            &format!("{module} registered in the cloud with the derived key"),
            Duration::from_secs(90),
            async || {
                let generation = self.generation(module).await?;
                let derived = SharedAccessKey::from_base64(device_key)
                    .unwrap()
                    .derive_module_key(&ModuleId::new(module).unwrap(), &generation)
                    .to_base64();
                let (p, s) = self.cloud_keys(module).await?;
                (p == derived && s == derived).then_some(generation)
            },
        )
        .await
    }
}

/// A minimal MQTT 3.1.1 CONNECT over TLS; the CONNACK return code.
async fn mqtt_connect(port: u16, ca: &Path, client_id: &str, password: &str) -> u8 {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let username = format!("127.0.0.1/{client_id}/?api-version=2021-04-12");
    let field = |out: &mut Vec<u8>, v: &[u8]| {
        out.extend_from_slice(&u16::try_from(v.len()).unwrap().to_be_bytes());
        out.extend_from_slice(v);
    };
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    body.push(4); // 3.1.1
    body.push(0b1100_0010); // username, password, clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    field(&mut body, client_id.as_bytes());
    field(&mut body, username.as_bytes());
    field(&mut body, password.as_bytes());
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len % 128).unwrap();
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        packet.push(b);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    s.write_all(&packet).await.unwrap();
    s.flush().await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .expect("no CONNACK")
        .unwrap();
    assert_eq!(&ack[..2], &[0x20, 0x02], "not a CONNACK: {ack:?}");
    ack[3]
}

/// Run as a module (`/bin/sh signer.sh <dir>`): signs `<dir>/req` (a sign
/// request body) through the module's own workload socket, as itself,
/// answering in `<dir>/resp`.
const SIGNER: &str = r#"dir="$1"
while true; do
  if [ -f "$dir/req" ]; then
    curl -s --unix-socket "${IOTEDGE_WORKLOADURI#unix://}" -X POST --data-binary @"$dir/req" \
      "http://localhost/modules/$IOTEDGE_MODULEID/genid/$IOTEDGE_MODULEGENERATIONID/sign?api-version=2019-01-30" \
      > "$dir/resp.tmp"
    rm -f "$dir/req"
    mv "$dir/resp.tmp" "$dir/resp"
  fi
  sleep 0.1
done
"#;

/// A module token signed by the module (its [`SIGNER`] in `dir`) through its
/// own workload socket.
async fn module_token(dir: &Path, module: &str) -> String {
    let resource = format!("127.0.0.1/devices/{DEVICE}/modules/{module}");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let data = SasToken::string_to_sign(&resource, expiry);
    let req = json!({"keyId": "primary", "algo": "HMACSHA256",
        "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, data.as_bytes())});
    let resp = dir.join("resp");
    let _ = std::fs::remove_file(&resp);
    std::fs::write(dir.join("req.tmp"), req.to_string()).unwrap();
    std::fs::rename(dir.join("req.tmp"), dir.join("req")).unwrap();
    let body = wait_until(
        &format!("{module} to sign"),
        Duration::from_secs(30),
        async || std::fs::read_to_string(&resp).ok(),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let digest = v["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{module} could not sign: {v}"))
        .to_owned();
    SasToken::from_signature(&resource, digest, expiry, None).to_string()
}

/// A harness with the cloud's binary built and free ports.
async fn harness() -> Harness {
    let cloud_bin = tokio::task::spawn_blocking(|| build("verge-cloud", "verge-cloud"))
        .await
        .unwrap();
    Harness {
        dir: tempfile::tempdir().unwrap(),
        cloud_bin,
        verged_bin: PathBuf::from(env!("CARGO_BIN_EXE_verged")),
        cloud: None,
        verged: None,
        https_port: verge_testkit::net::free_port(),
        mqtt_port: verge_testkit::net::free_port(),
        http: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_identities_reach_the_cloud_with_derived_keys_also_after_an_outage() {
    let mut h = harness().await;

    // ---- the cloud knows the edge device (with random system-module keys)
    h.start_cloud();
    let (s, v) = h
        .service(
            reqwest::Method::PUT,
            &format!("/devices/{DEVICE}"),
            Some(
                json!({"deviceId": DEVICE, "capabilities": {"iotEdge": true},
                "authentication": {"type": "sas",
                    "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let random_agent_key = h.cloud_keys("$edgeAgent").await.unwrap();

    // ---- verged: $edgeAgent at startup, $edgeHub and modA through the management API
    h.start_verged();
    h.await_registered("$edgeAgent").await;
    assert_ne!(h.cloud_keys("$edgeAgent").await.unwrap(), random_agent_key);
    let (s, v) = h
        .mgmt_call(
            "POST",
            "/identities",
            Some(json!({"moduleId": "$edgeHub", "managedBy": "iotedge"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let image = format!(
        "/bin/sh {} {}",
        h.signer().display(),
        h.sign_dir("modA").display()
    );
    let spec = json!({"name": "modA", "type": "docker", "imagePullPolicy": "never",
        "config": {"settings": {"image": image}, "env": []}});
    let (s, v) = h.mgmt_call("POST", "/modules", Some(spec)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = h.mgmt_call("POST", "/modules/modA/start", None).await;
    assert_eq!(s, 204, "{v}");
    h.await_registered("$edgeHub").await;
    h.await_registered("modA").await;
    let (_, v) = h
        .service(
            reqwest::Method::GET,
            &format!("/devices/{DEVICE}/modules/modA"),
            None,
        )
        .await;
    assert_eq!(v["managedBy"], "iotedge", "{v}");

    // ---- modA's token, signed by verged's workload API, opens the cloud's MQTT endpoint
    let token = module_token(&h.sign_dir("modA"), "modA").await;
    let ca = h.cloud_ca();
    let rc = mqtt_connect(h.mqtt_port, &ca, &format!("{DEVICE}/modA"), &token).await;
    assert_eq!(rc, 0, "CONNACK for modA's workload-signed token");
    // and a token with the wrong key does not (the check can fail)
    let wrong = SasToken::sign(
        &format!("127.0.0.1/devices/{DEVICE}/modules/modA"),
        &SharedAccessKey::from_bytes(vec![5u8; 32]),
        4_000_000_000,
        None,
    )
    .to_string();
    let rc = mqtt_connect(h.mqtt_port, &ca, &format!("{DEVICE}/modA"), &wrong).await;
    assert_ne!(rc, 0, "a forged token was accepted");
    let agent_token = module_token(&h.sign_dir("$edgeAgent"), "$edgeAgent").await;
    let rc = mqtt_connect(
        h.mqtt_port,
        &ca,
        &format!("{DEVICE}/$edgeAgent"),
        &agent_token,
    )
    .await;
    assert_eq!(rc, 0, "CONNACK for $edgeAgent's token");
    assert_eq!(count(&h.verged_log(), "(offline)"), 0);

    // ---- cloud down: the management API does not wait; changes are kept
    h.stop_cloud();
    let started = Instant::now();
    let (s, _) = h
        .mgmt_call(
            "POST",
            "/identities",
            Some(json!({"moduleId": "modB", "managedBy": "iotedge"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = h.mgmt_call("DELETE", "/identities/modA", None).await;
    assert_eq!(s, 204);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the management API waited for the cloud: {:?}",
        started.elapsed()
    );
    let log = h.verged_log();
    wait_until(
        "verged to notice the outage",
        Duration::from_secs(30),
        async || (count(&log, "(offline)") == 1).then_some(()),
    )
    .await;
    // Some retries happen meanwhile; the outage is logged once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(count(&log, "(offline)"), 1, "offline logged per attempt");
    // A verged restart meanwhile forgets nothing (the deletion is persisted).
    let status = terminate(h.verged.take().unwrap());
    assert!(status.success(), "verged exited with {status}");
    h.start_verged();
    wait_until(
        "the restarted verged to notice the outage",
        Duration::from_secs(30),
        async || (count(&log, "(offline)") == 2).then_some(()),
    )
    .await;

    // ---- cloud back: modB registered, modA deleted there
    h.start_cloud();
    h.await_registered("modB").await;
    wait_until(
        "modA deleted in the cloud",
        Duration::from_secs(90),
        async || h.cloud_keys("modA").await.is_none().then_some(()),
    )
    .await;
    // The pass logs "(online)" after its deletions (and their bookkeeping):
    // the cloud can show the deletion a moment before the line is written.
    wait_until(
        "verged to log the return online",
        Duration::from_secs(10),
        async || (count(&log, "(online)") >= 2).then_some(()),
    )
    .await;
    assert_eq!(count(&log, "(offline)"), 2);
    assert_eq!(count(&log, "(online)"), 2, "one online per transition");
    let gone = mqtt_connect(h.mqtt_port, &ca, &format!("{DEVICE}/modA"), &token).await;
    assert_ne!(gone, 0, "a deleted module still connects");

    // ---- online delete
    let (s, _) = h.mgmt_call("DELETE", "/identities/modB", None).await;
    assert_eq!(s, 204);
    wait_until(
        "modB deleted in the cloud",
        Duration::from_secs(30),
        async || h.cloud_keys("modB").await.is_none().then_some(()),
    )
    .await;
    // System and other identities stay.
    assert!(h.cloud_keys("$edgeAgent").await.is_some());
    assert!(h.cloud_keys("$edgeHub").await.is_some());

    let status = terminate(h.verged.take().unwrap());
    assert!(status.success(), "verged exited with {status}");
}

/// An X.509 edge device (#23 item 4, aziot's manual X.509 shape): verged
/// registers its module identities presenting the device's certificate (no
/// SAS token: the device has no key), with module keys derived from a key
/// of its own, so a module's workload-signed token opens the cloud. A
/// certificate the cloud does not know is refused (401) and nothing is
/// registered; once the device's thumbprint is this certificate's, the
/// registration goes through on verged's next retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_edge_device_registers_its_modules_with_its_certificate() {
    let mut h = harness().await;
    // A self-signed device certificate (CN = the device id), and another.
    let device_cert = || verge_testkit::x509::leaf(DEVICE, None, false, (-1, 30));
    let (mine, other) = (device_cert(), device_cert());
    let thumbprint = |c: &verge_testkit::x509::Leaf| verge_x509::thumbprints(&c.der).1;
    let (cert, key) = (&mine.pem, &mine.key_pem);
    let (thumbprint, other_thumbprint) = (thumbprint(&mine), thumbprint(&other));
    let secrets = h.dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("edge1.pem"), cert).unwrap();
    std::fs::write(secrets.join("edge1.key.pem"), key).unwrap();
    let device = |thumb: &str| {
        json!({"deviceId": DEVICE, "capabilities": {"iotEdge": true},
            "authentication": {"type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": thumb, "secondaryThumbprint": thumb}}})
    };

    // ---- the cloud knows the device by another certificate's thumbprint
    h.start_cloud();
    let (s, v) = h
        .service(
            reqwest::Method::PUT,
            &format!("/devices/{DEVICE}"),
            Some(device(&other_thumbprint)),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let random_agent_key = h.cloud_keys("$edgeAgent").await.unwrap();
    let x509 = format!(
        "iothub_hostname = \"127.0.0.1\"\ndevice_id = \"{DEVICE}\"\n\
         [provisioning.authentication]\nmethod = \"x509\"\n\
         identity_cert = \"file://{}\"\nidentity_pk = \"file://{}\"",
        secrets.join("edge1.pem").display(),
        secrets.join("edge1.key.pem").display()
    );
    h.start_verged_with(&x509);
    let log = h.verged_log();
    wait_until(
        "verged to be refused by the cloud",
        Duration::from_secs(30),
        async || (count(&log, "answered 401") >= 1).then_some(()),
    )
    .await;
    assert_eq!(h.cloud_keys("$edgeAgent").await.unwrap(), random_agent_key);

    // ---- the device's thumbprint is now this certificate's
    let (s, v) = h
        .service_if_match(
            reqwest::Method::PUT,
            &format!("/devices/{DEVICE}"),
            Some(device(&thumbprint)),
            Some("\"*\""),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    // Module keys derive from the key verged made for this device.
    let device_key = std::fs::read_to_string(h.home().join("keys/device.key")).unwrap();
    h.await_registered_from("$edgeAgent", device_key.trim())
        .await;
    let agent_token = module_token(&h.sign_dir("$edgeAgent"), "$edgeAgent").await;
    let rc = mqtt_connect(
        h.mqtt_port,
        &h.cloud_ca(),
        &format!("{DEVICE}/$edgeAgent"),
        &agent_token,
    )
    .await;
    assert_eq!(rc, 0, "CONNACK for $edgeAgent's workload-signed token");

    // ---- a restart keeps the module keys (the generated key is kept)
    let status = terminate(h.verged.take().unwrap());
    assert!(status.success(), "verged exited with {status}");
    h.start_verged_with(&x509);
    wait_until(
        "the restarted verged to serve",
        Duration::from_secs(30),
        async || h.generation("$edgeAgent").await,
    )
    .await;
    let (s, v) = h
        .mgmt_call(
            "POST",
            "/identities",
            Some(json!({"moduleId": "modX", "managedBy": "iotedge"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    h.await_registered_from("modX", device_key.trim()).await;
}

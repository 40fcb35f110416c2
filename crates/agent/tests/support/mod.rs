//! The end-to-end harness the agent's cloud tests share: verge-cloud and
//! verged (with its agent, process backend) started for real on loopback,
//! the official Azure IoT Hub service SDK for Python driving the cloud
//! (`python/cloud_ops.py`), helpers to find and clean up every process
//! started. Everything started is killed on drop, also on failure.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};
use serde_json::{Value, json};
use verge_daemon::client::request;
use verge_testkit::cloud::{self, CloudProc};
use verge_testkit::verged::Config;

/// The edge device's key (verged's provisioning and the cloud registry).
pub const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const MV: &str = "api-version=2022-08-03";
pub const DEVICE: &str = "edge1";

/// The Python with the official service SDK (azure-iot-hub).
pub fn python() -> PathBuf {
    verge_testkit::azure_python("azure.iot.hub")
}

/// Builds `bin` of `package` into this test's target directory and profile.
pub fn build(package: &str, bin: &str) -> PathBuf {
    let path = verge_testkit::build(&[package]).join(bin);
    assert!(path.exists(), "{} missing after the build", path.display());
    path
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Pids whose parent is `ppid` and whose `comm` is `name`.
pub fn children_named(ppid: i32, name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map_or("", |(_, c)| c);
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let parent = fields.next().and_then(|p| p.parse::<i32>().ok());
        if parent == Some(ppid) && comm == name && state != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Pid and start time of the modules verged's process backend ran.
pub fn module_pids_from_state(home: &Path) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(home.join("modules/modules")) {
        for e in entries.flatten() {
            let state = std::fs::read(e.path().join("state.json")).unwrap_or_default();
            if let Ok(v) = serde_json::from_slice::<Value>(&state)
                && let Some(pid) = v["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
                && let Some(started) = v["proc_start"].as_u64()
            {
                out.push((pid, started));
            }
        }
    }
    out
}

/// Kills the processes (and their groups) that are still the ones recorded.
pub fn kill_recorded(pids: &[(i32, u64)]) {
    for &(pid, started) in pids {
        if alive(pid) && start_time(pid) == Some(started) {
            if getpgid(Some(Pid::from_raw(pid))) == Ok(Pid::from_raw(pid)) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A module running `/bin/sh -c <script>` that records its pid, then sleeps.
pub fn sh(out: &Path, name: &str) -> Value {
    let d = out.display();
    let script = format!(
        "echo run >> {d}/{name}.runs; echo $$ > {d}/{name}.pid.tmp && mv {d}/{name}.pid.tmp {d}/{name}.pid; exec sleep 600"
    );
    json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
        "settings": {
            "image": "/bin/sh",
            "createOptions": json!({ "Cmd": ["-c", script] }).to_string()
        }
    })
}

/// `modulesContent` of a deployment with these user modules (edgeHub is a
/// script too: the process backend runs commands, not images).
pub fn modules_content(out: &Path, modules: Value) -> Value {
    json!({
        "$edgeAgent": { "properties.desired": {
            "schemaVersion": "1.1",
            "runtime": { "type": "docker", "settings": { "minDockerVersion": "v1.25" } },
            "systemModules": {
                "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent", "createOptions": "{}" } },
                "edgeHub": sh(out, "edgeHub")
            },
            "modules": modules
        }},
        "$edgeHub": { "properties.desired": { "schemaVersion": "1.1", "routes": {} } }
    })
}

pub fn read_pid(out: &Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(out.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn runs(out: &Path, name: &str) -> usize {
    std::fs::read_to_string(out.join(format!("{name}.runs")))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

pub async fn get_json(sock: &Path, pq: &str) -> Option<(u16, Value)> {
    let r = request(sock, "GET", pq, None, Duration::from_secs(10))
        .await
        .ok()?;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    Some((r.status, v))
}

/// Names and runtime states of the modules verged knows.
pub async fn verged_modules(mgmt: &Path) -> Option<Vec<(String, String)>> {
    let (status, list) = get_json(mgmt, &format!("/modules?{MV}")).await?;
    if status != 200 {
        return None;
    }
    Some(
        list["modules"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_owned(),
                    m["status"]["runtimeStatus"]["status"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect(),
    )
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Everything the test started; all of it is killed on drop (also on panic).
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub out: PathBuf,
    pub mgmt: PathBuf,
    pub cfg: PathBuf,
    pub python: PathBuf,
    pub cloud: Option<Child>,
    pub verged: Option<Child>,
    pub verged_bin: PathBuf,
    pub service_cs: String,
    pub cloud_ca: PathBuf,
    /// Processes this test started (pid, start time), for the cleanup.
    pub seen: Vec<(i32, u64)>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in ["cloud.log", "verged.log"] {
                eprintln!("--- {log} (tail)\n{}", tail(&self.dir.path().join(log), 80));
            }
        }
        self.stop_everything();
        let _ = &self.dir;
    }
}

impl Harness {
    /// Builds verged and verge-cloud, starts the cloud, registers the edge
    /// device with the service SDK, and starts verged (with its agent) for it.
    pub async fn start() -> Self {
        let python = python();
        let (verged_bin, cloud_bin) = tokio::task::spawn_blocking(|| {
            (
                build("verge-daemon", "verged"),
                build("verge-cloud", "verge-cloud"),
            )
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut h = Harness {
            mgmt: home.join("mgmt.sock"),
            cfg: dir.path().join("config.toml"),
            home,
            out,
            dir,
            python,
            cloud: None,
            verged: None,
            verged_bin,
            service_cs: String::new(),
            cloud_ca: PathBuf::new(),
            seen: Vec::new(),
        };
        let mqtt_port = h.start_cloud(&cloud_bin);
        let second = "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=";
        h.sdk(json!({"op": "register_edge", "device": DEVICE, "pk": KEY, "sk": second}))
            .await;
        h.write_verged_config(mqtt_port);
        h.start_verged();
        h
    }

    /// Kills verged, its agent, the modules and the cloud.
    pub fn stop_everything(&mut self) {
        if let Some(pid) = self
            .verged
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
        {
            for a in children_named(pid, "verge-agent") {
                if let Some(t) = start_time(a) {
                    self.seen.push((a, t));
                }
            }
        }
        for c in [self.verged.take(), self.cloud.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut pids = self.seen.clone();
        pids.extend(module_pids_from_state(&self.home));
        kill_recorded(&pids);
    }

    pub fn remember(&mut self, pid: i32) {
        if let Some(t) = start_time(pid) {
            self.seen.push((pid, t));
        }
    }

    /// Starts verge-cloud on loopback; returns its MQTT port.
    pub fn start_cloud(&mut self, cloud_bin: &Path) -> u16 {
        let data = self.dir.path().join("cloud");
        let key = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
        let cloud = CloudProc::start(
            cloud_bin,
            &cloud::Config::new(&data).policy_key(key).render(),
            self.dir.path(),
            "info",
        );
        let https = cloud.https().to_owned();
        let mqtt_port = cloud.mqtts_port();
        // cloud_deployment.rs stops it its own way (SIGTERM, async wait).
        self.cloud = Some(cloud.into_child());
        self.service_cs =
            format!("HostName={https};SharedAccessKeyName=iothubowner;SharedAccessKey={key}");
        self.cloud_ca = data.join("tls/ca.pem");
        mqtt_port
    }

    /// One service-SDK operation (tests/python/cloud_ops.py); its JSON output.
    pub async fn sdk(&self, mut params: Value) -> Value {
        params["cs"] = json!(self.service_cs);
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/cloud_ops.py");
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.arg(&script)
            .arg(params.to_string())
            .env("REQUESTS_CA_BUNDLE", &self.cloud_ca)
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("service SDK call timed out")
            .unwrap();
        assert!(
            out.status.success(),
            "service SDK {params}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub async fn agent_twin(&self) -> Value {
        self.sdk(json!({"op": "module_twin", "device": DEVICE, "module": "$edgeAgent"}))
            .await
    }

    pub fn write_verged_config(&self, mqtt_port: u16) {
        let storage = self.dir.path().join("agent");
        // verged registers module identities on the cloud's HTTPS port.
        let https_port: u16 = self
            .service_cs
            .split(';')
            .find_map(|f| f.strip_prefix("HostName="))
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap();
        Config::new(&self.home)
            .trust_bundle_cert(&self.cloud_ca)
            .provisioning(
                "manual",
                &format!(
                    "connection_string = \"HostName=127.0.0.1;DeviceId={DEVICE};SharedAccessKey={KEY}\"\n\
                     https_port = {https_port}"
                ),
            )
            .agent_image(&format!(
                "{} --runtime verged --storage {} --interval-ms 200 --report-interval-ms 300",
                env!("CARGO_BIN_EXE_verge-agent"),
                storage.display()
            ))
            .agent_env("RUST_LOG", "info")
            .agent_env("VERGE_AGENT_UPSTREAM_PORT", &mqtt_port.to_string())
            .agent_env("VERGE_AGENT_METRICS_LISTEN", "127.0.0.1:0")
            .extra("[edge_ca]\nauto_generated_edge_ca_expiry_days = 30\n")
            .write(&self.cfg);
    }

    pub fn start_verged(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("verged.log"))
            .unwrap();
        let child = Command::new(&self.verged_bin)
            .arg("--config")
            .arg(&self.cfg)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.verged = Some(child);
    }

    pub fn verged_pid(&self) -> i32 {
        i32::try_from(self.verged.as_ref().unwrap().id()).unwrap()
    }

    /// SIGTERM to verged; waits for its exit (it stops its agent first).
    pub async fn stop_verged(&mut self) {
        let pid = self.verged_pid();
        for a in children_named(pid, "verge-agent") {
            self.remember(a);
        }
        kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
        let mut verged = self.verged.take().unwrap();
        let status = wait_until("verged to exit", Duration::from_secs(60), async || {
            verged.try_wait().unwrap()
        })
        .await;
        assert!(status.success(), "verged exited with {status}");
    }

    /// Waits until `name` runs a process different from `not`; returns its pid.
    pub async fn running_pid(&mut self, name: &str, not: Option<i32>) -> i32 {
        let out = self.out.clone();
        let pid = wait_until(
            &format!("{name} to run (not as {not:?})"),
            Duration::from_secs(60),
            async || read_pid(&out, name).filter(|p| Some(*p) != not && alive(*p)),
        )
        .await;
        self.remember(pid);
        pid
    }
}

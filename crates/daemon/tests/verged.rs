//! End-to-end: the real `verged` binary, its management socket, the agent
//! watchdog, and the official Azure IoT Python SDK against the workload API.
//!
//! Needs a Python with `azure-iot-device==2.14.0`: `$VERGE_PYTHON`, or
//! `<repo>/.venv/bin/python` (create it with
//! `python3 -m venv .venv && .venv/bin/pip install azure-iot-device==2.14.0`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use verge_core::id::{ClientId, DeviceId, ModuleId};
use verge_core::sas::{SasToken, SharedAccessKey};
use verge_daemon::client::request;
use verge_daemon::env::{EnvContext, WorkloadUriStyle, module_env};
use verge_daemon::keys::ModuleIdentity;
use verge_testkit::verged::{self, Config};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const V: &str = "api-version=2022-08-03";
const VERGED: &str = env!("CARGO_BIN_EXE_verged");

struct Verged(Child);

impl Drop for Verged {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("VERGE_PYTHON") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = repo.join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python for the SDK interop test: set VERGE_PYTHON, or create the venv with \
         `python3 -m venv {0}/.venv && {0}/.venv/bin/pip install azure-iot-device==2.14.0`",
        repo.display()
    );
    p
}

fn write_config(dir: &Path, agent_script: &Path) -> PathBuf {
    Config::new(&dir.join("home"))
        .manual(&format!(
            "HostName=hub.example.net;DeviceId=dev1;SharedAccessKey={KEY}"
        ))
        .agent_image(&format!("/bin/sh {}", agent_script.display()))
        .agent_env("RuntimeLogLevel", "debug")
        .extra("[edge_ca]\nauto_generated_edge_ca_expiry_days = 30\n")
        .write(dir.join("config.toml"))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn call(sock: &Path, method: &str, pq: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let r = request(
        sock,
        method,
        pq,
        body.map(|b| b.as_bytes().to_vec()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let v = if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap()
    };
    (r.status, v)
}

fn run_python(py: &Path, env: &BTreeMap<String, String>) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_workload.py");
    let mut child = Command::new(py)
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("python SDK script timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{e}: {stdout}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_signs_through_verged() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    // The agent: records its environment, fails on its first run (to exercise
    // the watchdog), then stays up.
    let runs = dir.path().join("runs.log");
    let agent_env = dir.path().join("agent.env");
    let script = dir.path().join("agent.sh");
    std::fs::write(
        &script,
        format!(
            // The environment is complete (renamed into place) before the run is counted.
            "env > {env}.tmp && mv {env}.tmp {env}\necho run >> {runs}\nif [ $(wc -l < {runs}) -lt 2 ]; then exit 1; fi\nexec sleep 600\n",
            runs = runs.display(),
            env = agent_env.display()
        ),
    )
    .unwrap();
    let cfg = write_config(dir.path(), &script);
    let home = dir.path().join("home");
    let mgmt = home.join("mgmt.sock");

    let verged = Verged(verged::start(Path::new(VERGED), &cfg, "info", &mgmt));

    // key file and agent socket
    let key_file = home.join("keys/device.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(home.join("mnt/edgeAgent.sock").exists());

    // watchdog restarted the failing agent, which got the agent environment
    wait_for("agent restart", Duration::from_secs(15), || {
        std::fs::read_to_string(&runs).is_ok_and(|s| s.lines().count() >= 2)
    });
    let aenv = std::fs::read_to_string(&agent_env).unwrap();
    assert!(
        aenv.contains(&format!("IOTEDGE_MANAGEMENTURI=unix://{}", mgmt.display())),
        "{aenv}"
    );
    assert!(aenv.contains("IOTEDGE_MODULEID=$edgeAgent"), "{aenv}");
    assert!(aenv.contains("IOTEDGE_APIVERSION=2022-08-03"), "{aenv}");
    assert!(aenv.contains("RuntimeLogLevel=debug"), "{aenv}");
    assert!(aenv.contains("EdgeDeviceHostName=edge1.local"), "{aenv}");

    // identities through the management API
    let (s, a) = call(
        &mgmt,
        "POST",
        &format!("/identities/?{V}"),
        Some(r#"{"moduleId":"modA","managedBy":"iotedge"}"#),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    let (s, _) = call(
        &mgmt,
        "POST",
        &format!("/identities/?{V}"),
        Some(r#"{"moduleId":"modB"}"#),
    )
    .await;
    assert_eq!(s, 200);
    let ident: ModuleIdentity = serde_json::from_value(a).unwrap();
    let sock_a = home.join("mnt/modA.sock");
    let sock_b = home.join("mnt/modB.sock");
    assert!(sock_a.exists() && sock_b.exists());

    // the environment verged gives a process module
    let ctx = EnvContext {
        iothub_hostname: "hub.example.net".into(),
        device_id: "dev1".into(),
        hostname: "edge1.local".into(),
        parent_hostname: None,
        workload_uri: WorkloadUriStyle::HostSocket,
    };
    let env = module_env(&ctx, &ident, &sock_a, &BTreeMap::new());
    // The SDK runs as modA itself: a process module started by verged (the
    // workload socket serves only the module's own processes).
    let out_file = dir.path().join("modA.json");
    let wrapper = dir.path().join("modA.sh");
    std::fs::write(
        &wrapper,
        "\"$PY\" \"$SCRIPT\" > \"$OUT.tmp\" 2> \"$OUT.err\"; mv \"$OUT.tmp\" \"$OUT\"; exec sleep 600\n",
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_workload.py");
    let spec = serde_json::json!({"name": "modA", "type": "docker",
    "config": {"settings": {"image": format!("/bin/sh {}", wrapper.display())},
        "env": [
            {"key": "PY", "value": py.display().to_string()},
            {"key": "SCRIPT", "value": script.display().to_string()},
            {"key": "OUT", "value": out_file.display().to_string()},
        ]}});
    let (s, m) = call(
        &mgmt,
        "POST",
        &format!("/modules?{V}"),
        Some(&spec.to_string()),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    let (s, m) = call(&mgmt, "POST", &format!("/modules/modA/start?{V}"), None).await;
    assert_eq!(s, 204, "{m}");
    let out_file2 = out_file.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("the SDK in module modA", Duration::from_secs(60), || {
            out_file2.exists()
        });
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out_file).unwrap();
    let out: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| {
            let err = std::fs::read_to_string(dir.path().join("modA.json.err")).unwrap_or_default();
            panic!("{e}: {text}; stderr: {err}")
        });
    assert_eq!(out["ok"], true, "{out}");
    let token = SasToken::parse(out["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        token.resource(),
        "hub.example.net/devices/dev1/modules/modA"
    );
    let key = SharedAccessKey::from_base64(KEY)
        .unwrap()
        .derive_module_key(&ModuleId::new("modA").unwrap(), &ident.generation_id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let client = ClientId::module(
        DeviceId::new("dev1").unwrap(),
        ModuleId::new("modA").unwrap(),
    );
    token
        .verify(&key, &["hub.example.net"], &client, now)
        .unwrap();
    let (_, tb) = call(&sock_a, "GET", "/trust-bundle?api-version=2019-01-30", None).await;
    assert_eq!(out["trust_bundle"], tb["certificate"]);
    assert_eq!(out["gateway_hostname"], "edge1.local");

    // the same SDK outside modA's processes (this test) is refused on modA's socket
    let py2 = py.clone();
    let env2 = env.clone();
    let outside = tokio::task::spawn_blocking(move || run_python(&py2, &env2))
        .await
        .unwrap();
    assert_eq!(outside["ok"], false, "{outside}");
    let (s, body) = call(
        &sock_a,
        "POST",
        &format!(
            "/modules/modA/genid/{}/sign?api-version=2019-01-30",
            ident.generation_id
        ),
        Some(r#"{"keyId":"primary","algo":"HMACSHA256","data":"YQ=="}"#),
    )
    .await;
    assert_eq!(s, 403, "{body}");

    // module B's socket cannot sign as module A (refused twice over here:
    // the socket is not modA's, and this test is not modB's process; the
    // socket-name check alone is covered in tests/api.rs)
    let mut env_b = env.clone();
    env_b.insert(
        "IOTEDGE_WORKLOADURI".into(),
        format!("unix://{}", sock_b.display()),
    );
    let out = tokio::task::spawn_blocking(move || run_python(&py, &env_b))
        .await
        .unwrap();
    assert_eq!(out["ok"], false, "{out}");
    let (s, body) = call(
        &sock_b,
        "POST",
        &format!(
            "/modules/modA/genid/{}/sign?api-version=2019-01-30",
            ident.generation_id
        ),
        Some(r#"{"keyId":"primary","algo":"HMACSHA256","data":"YQ=="}"#),
    )
    .await;
    assert_eq!(s, 403, "{body}");

    // clean shutdown on SIGTERM
    let mut verged = verged;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(verged.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = verged.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "verged did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!mgmt.exists());
    assert!(!sock_a.exists());
}

#[test]
fn bad_config_exits_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agent.sh");
    let cfg = write_config(dir.path(), &script);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let cases = [
        (
            text.replace("homedir", "surprise = 1\nhomedir"),
            "surprise",
            ":2:",
        ),
        (
            text.replace("type = \"process\"", "type = \"lxc\""),
            "agent.type",
            ":10:",
        ),
        (
            text.replace("source = \"manual\"", "source = \"dps\""),
            "`provisioning.connection_string`: not used with source = \"dps\"",
            ":6:",
        ),
    ];
    for (body, needle, line) in cases {
        std::fs::write(&cfg, &body).unwrap();
        let out = Command::new(VERGED)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(needle) && err.contains(line),
            "{needle} {line}: {err}"
        );
        assert!(
            !dir.path().join("home").exists(),
            "nothing may start on a bad config"
        );
    }
}

/// The process agent's state through `GET /systeminfo/agent`: an agent that
/// exits with 7 twice is restarted, counted, and its exit code kept; the
/// running agent shows up in `/systeminfo/resources`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_state_and_resources() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs.log");
    let script = dir.path().join("agent.sh");
    std::fs::write(
        &script,
        format!(
            "echo run >> {runs}\nif [ $(wc -l < {runs}) -lt 3 ]; then sleep 0.3; exit 7; fi\nexec sleep 600\n",
            runs = runs.display(),
        ),
    )
    .unwrap();
    let cfg = write_config(dir.path(), &script);
    let mgmt = dir.path().join("home/mgmt.sock");
    let mut verged = Verged(verged::start(Path::new(VERGED), &cfg, "warn", &mgmt));
    let agent = || async {
        let (s, v) = call(&mgmt, "GET", &format!("/systeminfo/agent?{V}"), None).await;
        assert_eq!(s, 200, "{v}");
        v
    };
    let first = agent().await;
    assert_eq!(first["name"], "edgeAgent", "{first}");
    assert_eq!(first["kind"], "process", "{first}");
    assert!(first["image"].as_str().unwrap().ends_with("agent.sh"));
    // Restarts grow one by one until the third run stays up (back-off 1 s, 2 s).
    let mut seen = vec![first["restartCount"].as_u64().unwrap()];
    let start = Instant::now();
    let last = loop {
        let v = agent().await;
        let n = v["restartCount"].as_u64().unwrap();
        if seen.last() != Some(&n) {
            seen.push(n);
        }
        if n == 2 && v["status"] == "running" {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{v} {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    assert!(seen.contains(&1), "{seen:?}");
    assert_eq!(last["lastExit"]["code"], 7, "{last}");
    assert!(last["lastExit"]["time"].as_str().unwrap().ends_with('Z'));
    assert!(last["startTime"].as_str().unwrap() > last["lastExit"]["time"].as_str().unwrap());
    let pid = last["pid"].as_u64().unwrap();
    // The script runs as `sh` until it reaches `exec sleep`: same pid, so
    // wait for the exec rather than race it.
    let exec_deadline = Instant::now() + Duration::from_secs(5);
    let comm = loop {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        if comm.trim() == "sleep" || Instant::now() > exec_deadline {
            break comm;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(comm.trim(), "sleep", "pid {pid} is not the agent");

    // The running agent's resources.
    let (s, r) = call(&mgmt, "GET", &format!("/systeminfo/resources?{V}"), None).await;
    assert_eq!(s, 200, "{r}");
    assert!(r["total_ram"].as_u64().unwrap() > 0, "{r}");
    assert!(r["process_uptime"].as_u64().unwrap() <= r["host_uptime"].as_u64().unwrap());
    let row = r["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "edgeAgent")
        .unwrap_or_else(|| panic!("no agent row: {r}"))
        .clone();
    assert_eq!(row["pid"], pid, "{r}");
    assert!(row["memory_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(row["processes"], 1, "{r}");

    // SIGTERM stops verged and its agent.
    let vpid = nix::unistd::Pid::from_raw(i32::try_from(verged.0.id()).unwrap());
    nix::sys::signal::kill(vpid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("verged to stop", Duration::from_secs(30), || {
        verged.0.try_wait().unwrap().is_some()
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the agent outlived verged"
    );
}

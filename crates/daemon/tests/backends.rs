//! The management API of the real `verged` binary driving the real runtime
//! backends: the process backend (always) and the Docker Engine on this
//! machine.
//!
//! The Docker tests need a running Docker daemon and `/bin/busybox` (package
//! `busybox-static`): the image `verge-test/busybox:1` is built locally from
//! it (`FROM scratch`, no registry access). Without Docker they fail with a
//! clear message unless `VERGE_SKIP_DOCKER_TESTS=1` is set. The containers
//! borrow the host's `/usr` (read-only bind mount from createOptions) to run
//! `curl --unix-socket` against their own workload socket.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use verge_daemon::client::request;
use verge_testkit::verged::{self, Config};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const MV: &str = "api-version=2022-08-03";
const WV: &str = "api-version=2019-01-30";
const IMAGE: &str = "verge-test/busybox:1";

// ---- verged ----------------------------------------------------------------

/// The running daemon; killed (with its modules' process groups) on drop.
struct Verged {
    child: Child,
    dir: tempfile::TempDir,
    home: PathBuf,
    mgmt: PathBuf,
}

impl Drop for Verged {
    fn drop(&mut self) {
        // Kill any process module still running (their pids are in state.json).
        if let Ok(entries) = std::fs::read_dir(self.home.join("modules/modules")) {
            for e in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path().join("state.json"))
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                    && let Some(pid) = v["pid"].as_i64()
                    && pid > 1
                {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // SIGTERM first so verged stops its agent; SIGKILL only as a fallback.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Verged {
    /// Starts verged with a process agent; `extra` is appended to the config.
    fn start(extra: &str) -> Self {
        Self::start_with_agent(extra, "exec sleep 600\n")
    }

    /// [`Verged::start`] with `agent_script` (run by `/bin/sh`) as the agent.
    fn start_with_agent(extra: &str, agent_script: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let agent = dir.path().join("agent.sh");
        std::fs::write(&agent, agent_script).unwrap();
        let cfg = Config::new(&home)
            .manual(&format!(
                "HostName=hub.example.net;DeviceId=dev1;SharedAccessKey={KEY}"
            ))
            .agent_image(&format!("/bin/sh {}", agent.display()))
            .extra(extra)
            .write(dir.path().join("config.toml"));
        let mgmt = home.join("mgmt.sock");
        let child = verged::start(Path::new(env!("CARGO_BIN_EXE_verged")), &cfg, "warn", &mgmt);
        Verged {
            child,
            dir,
            home,
            mgmt,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> (u16, serde_json::Value) {
        call(&self.mgmt, method, path, body).await
    }

    /// `POST /modules` with `spec`; asserts 201 and returns the module.
    async fn create(&self, spec: String) -> serde_json::Value {
        let (s, m) = self
            .call("POST", &format!("/modules?{MV}"), Some(spec))
            .await;
        assert_eq!(s, 201, "{m}");
        m
    }

    /// `PUT /modules/{name}?start=true` with `spec`; asserts 200.
    async fn update_and_start(&self, name: &str, spec: String) {
        let (s, m) = self
            .call(
                "PUT",
                &format!("/modules/{name}?start=true&{MV}"),
                Some(spec),
            )
            .await;
        assert_eq!(s, 200, "{m}");
    }

    /// `POST /modules/{name}/{action}` (`start`, `stop`, `restart`); asserts 204.
    async fn action(&self, name: &str, action: &str) {
        let (s, b) = self
            .call("POST", &format!("/modules/{name}/{action}?{MV}"), None)
            .await;
        assert_eq!(s, 204, "{b}");
    }

    /// `DELETE /modules/{name}`; asserts 204.
    async fn delete(&self, name: &str) {
        let (s, b) = self
            .call("DELETE", &format!("/modules/{name}?{MV}"), None)
            .await;
        assert_eq!(s, 204, "{b}");
    }

    async fn module(&self, name: &str) -> serde_json::Value {
        let (s, m) = self
            .call("GET", &format!("/modules/{name}?{MV}"), None)
            .await;
        assert_eq!(s, 200, "{m}");
        m
    }

    async fn wait_status(&self, name: &str, want: &str) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let m = self.module(name).await;
            if m["status"]["runtimeStatus"]["status"] == want {
                return m;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} did not become {want}: {m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn logs(&self, name: &str, query: &str) -> String {
        let r = request(
            &self.mgmt,
            "GET",
            &format!("/modules/{name}/logs?{query}&{MV}"),
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        String::from_utf8_lossy(&r.body).into_owned()
    }
}

async fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (u16, serde_json::Value) {
    let r = request(
        sock,
        method,
        path,
        body.map(String::into_bytes),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let v = if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&r.body).into()))
    };
    (r.status, v)
}

async fn wait_for_async(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn env_of(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Reads a followed log stream until `done` holds for what arrived (or 15 s).
async fn follow_logs(mgmt: &Path, name: &str, done: impl Fn(&str) -> bool) -> String {
    let mut s = tokio::net::UnixStream::connect(mgmt).await.unwrap();
    s.write_all(
        format!(
            "GET /modules/{name}/logs?follow=true&tail=1&{MV} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
        if done(&String::from_utf8_lossy(&got)) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn spec(
    name: &str,
    image: &str,
    env: &[(&str, &str)],
    create_options: serde_json::Value,
) -> String {
    let env: Vec<serde_json::Value> = env
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
        .collect();
    serde_json::json!({
        "name": name,
        "type": "docker",
        "imagePullPolicy": if image.starts_with('/') { "on-create" } else { "never" },
        "config": {
            "settings": {"image": image, "createOptions": create_options},
            "env": env,
        },
    })
    .to_string()
}

// ---- process backend ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_module_lifecycle() {
    let v = Verged::start("");
    let out = v.path("out");
    std::fs::create_dir_all(&out).unwrap();
    let script = v.path("mod.sh");
    std::fs::write(
        &script,
        format!(
            r#"out={out}
env > "$out/env.$FOO"
sock="${{IOTEDGE_WORKLOADURI#unix://}}"
curl -s -o "$out/tb.$FOO" -w '%{{http_code}}' --unix-socket "$sock" "http://localhost/trust-bundle?{WV}" > "$out/tb.code.$FOO"
echo "started FOO=$FOO"
i=0
while true; do i=$((i+1)); echo "tick $i"; sleep 0.1; done
"#,
            out = out.display()
        ),
    )
    .unwrap();
    let image = format!("/bin/sh {}", script.display());

    // create
    let m = v
        .create(spec(
            "procmod",
            &image,
            &[("FOO", "one")],
            serde_json::json!({}),
        ))
        .await;
    assert_eq!(m["name"], "procmod");
    assert_eq!(m["type"], "process");
    assert_ne!(m["status"]["runtimeStatus"]["status"], "running");
    let envs = m["config"]["env"].as_array().unwrap();
    assert!(
        envs.iter()
            .any(|e| e["key"] == "IOTEDGE_MODULEID" && e["value"] == "procmod"),
        "{m}"
    );
    let sock = v.home.join("mnt/procmod.sock");
    assert!(sock.exists());

    // start → running, environment and workload socket as seen by the module
    v.action("procmod", "start").await;
    let m = v.wait_status("procmod", "running").await;
    let pid1 = m["id"].as_str().unwrap().to_owned();
    let (_, list) = v.call("GET", &format!("/modules?{MV}"), None).await;
    let listed = list["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "procmod")
        .unwrap();
    assert_eq!(listed["status"]["runtimeStatus"]["status"], "running");

    let code_file = out.join("tb.code.one");
    wait_for_async(
        "the module's trust-bundle call",
        Duration::from_secs(15),
        || !read(&code_file).is_empty(),
    )
    .await;
    assert_eq!(read(&code_file), "200");
    let env = env_of(&read(&out.join("env.one")));
    assert_eq!(env["FOO"], "one");
    assert_eq!(env["IOTEDGE_MODULEID"], "procmod");
    assert_eq!(env["IOTEDGE_DEVICEID"], "dev1");
    assert_eq!(env["IOTEDGE_IOTHUBHOSTNAME"], "hub.example.net");
    assert_eq!(env["IOTEDGE_GATEWAYHOSTNAME"], "edge1.local");
    assert_eq!(env["IOTEDGE_APIVERSION"], "2019-01-30");
    assert_eq!(env["IOTEDGE_AUTHSCHEME"], "sasToken");
    assert_eq!(
        env["IOTEDGE_WORKLOADURI"],
        format!("unix://{}", sock.display())
    );
    let (_, ids) = v.call("GET", &format!("/identities/?{MV}"), None).await;
    let ident = ids["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["moduleId"] == "procmod")
        .unwrap();
    assert_eq!(env["IOTEDGE_MODULEGENERATIONID"], ident["generationId"]);
    let (_, tb) = call(&sock, "GET", &format!("/trust-bundle?{WV}"), None).await;
    let seen: serde_json::Value = serde_json::from_str(&read(&out.join("tb.one"))).unwrap();
    assert_eq!(seen["certificate"], tb["certificate"]);

    // logs: tail and follow
    let start = Instant::now();
    let tail = loop {
        let t = v.logs("procmod", "tail=2").await;
        // Early on the tail still holds the start line; wait for two ticks.
        let ticks = t.lines().count() == 2 && t.lines().all(|l| l.contains("tick"));
        if ticks || start.elapsed() > Duration::from_secs(10) {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.contains("tick")), "{tail}");
    let all = v.logs("procmod", "tail=all").await;
    assert!(all.contains("started FOO=one"), "{all}");
    let followed = follow_logs(&v.mgmt, "procmod", |t| t.matches("tick").count() >= 4).await;
    assert!(followed.matches("tick").count() >= 4, "{followed}");

    // stop
    v.action("procmod", "stop").await;
    let m = v.module("procmod").await;
    assert_ne!(m["status"]["runtimeStatus"]["status"], "running", "{m}");
    assert!(m["status"]["exitStatus"]["statusCode"].is_string(), "{m}");

    // restart → a new process
    v.action("procmod", "restart").await;
    let m = v.wait_status("procmod", "running").await;
    assert_ne!(m["id"].as_str().unwrap(), pid1);

    // update with a new env, started
    v.update_and_start(
        "procmod",
        spec("procmod", &image, &[("FOO", "two")], serde_json::json!({})),
    )
    .await;
    v.wait_status("procmod", "running").await;
    let env2 = out.join("env.two");
    wait_for_async("the updated module", Duration::from_secs(15), || {
        read(&env2).contains("FOO=two")
    })
    .await;
    assert!(read(&env2).contains("IOTEDGE_MODULEID=procmod"));

    // delete
    v.delete("procmod").await;
    let (s, _) = v.call("GET", &format!("/modules/procmod?{MV}"), None).await;
    assert_eq!(s, 404);
    let (_, list) = v.call("GET", &format!("/modules?{MV}"), None).await;
    assert!(
        !list["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "procmod")
    );
}

// ---- docker backend ------------------------------------------------------------

/// Docker is reachable (else panics with a clear message), or the tests are
/// to be skipped (returns false).
/// Signs "a" as `${TARGET_NAME:-self}` on `${TARGET_SOCK:-own socket}` from a
/// child of the script (curl), writes the HTTP code to `$OUT/<module>.code`
/// and the body to `$OUT/<module>.body`, then sleeps.
const SIGN_SCRIPT: &str = r#"sock="${TARGET_SOCK:-${IOTEDGE_WORKLOADURI#unix://}}"
name="${TARGET_NAME:-$IOTEDGE_MODULEID}"
genid="${TARGET_GENID:-$IOTEDGE_MODULEGENERATIONID}"
me="$(echo "$IOTEDGE_MODULEID" | tr -d '$')"
code=$(curl -s -o "$OUT/$me.body" -w '%{http_code}' --unix-socket "$sock" -X POST \
  -d '{"keyId":"primary","algo":"HMACSHA256","data":"YQ=="}' \
  "http://localhost/modules/$name/genid/$genid/sign?api-version=2019-01-30")
echo "$code" > "$OUT/$me.code.tmp" && mv "$OUT/$me.code.tmp" "$OUT/$me.code"
exec sleep 600
"#;

/// Waits for `module`'s sign call (what [`SIGN_SCRIPT`] writes under `out`)
/// and asserts its HTTP code is `want`.
async fn assert_sign_code(out: &Path, module: &str, what: &str, want: &str) {
    let code = || read(&out.join(format!("{module}.code"))).trim().to_owned();
    wait_for_async(what, Duration::from_secs(20), || !code().is_empty()).await;
    assert_eq!(
        code(),
        want,
        "{}",
        read(&out.join(format!("{module}.body")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_modules_act_only_for_themselves() {
    let out = tempfile::tempdir().unwrap();
    let outp = out.path().to_owned();
    // The agent (verged's watchdog child, not a runtime module) signs too.
    let v = Verged::start_with_agent("", &format!("OUT={}\n{SIGN_SCRIPT}", outp.display()));
    let script = v.path("sign.sh");
    std::fs::write(&script, SIGN_SCRIPT).unwrap();
    let image = format!("/bin/sh {}", script.display());

    // the agent's own process is served on the agent's socket
    assert_sign_code(&outp, "edgeAgent", "the agent's sign call", "200").await;

    // a real process module signs as itself through its own socket
    let out_env = ("OUT", outp.to_str().unwrap());
    v.create(spec("signer", &image, &[out_env], serde_json::json!({})))
        .await;
    v.action("signer", "start").await;
    v.wait_status("signer", "running").await;
    assert_sign_code(&outp, "signer", "signer's sign call", "200").await;
    let body: serde_json::Value = serde_json::from_str(&read(&outp.join("signer.body"))).unwrap();
    assert!(
        body["digest"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );

    // a process outside signer's tree (this test) cannot sign as signer
    let (_, ids) = v.call("GET", &format!("/identities/?{MV}"), None).await;
    let genid = ids["identities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["moduleId"] == "signer")
        .unwrap()["generationId"]
        .as_str()
        .unwrap()
        .to_owned();
    let sock = v.home.join("mnt/signer.sock");
    let sign_path = format!("/modules/signer/genid/{genid}/sign?{WV}");
    let sign_body = r#"{"keyId":"primary","algo":"HMACSHA256","data":"YQ=="}"#;
    let (s, b) = call(&sock, "POST", &sign_path, Some(sign_body.into())).await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("own processes"),
        "{b}"
    );
    for path in [
        format!("/modules/signer/genid/{genid}/encrypt?{WV}"),
        format!("/modules/signer/certificate/identity?{WV}"),
        format!("/modules/signer/genid/{genid}/certificate/server?{WV}"),
    ] {
        let (s, b) = call(&sock, "POST", &path, Some("{}".into())).await;
        assert_eq!(s, 403, "{path}: {b}");
    }
    // the trust bundle is public
    let (s, b) = call(&sock, "GET", &format!("/trust-bundle?{WV}"), None).await;
    assert_eq!(s, 200, "{b}");

    // nor can another process module, using signer's socket and generation
    let thief_env = [
        out_env,
        ("TARGET_SOCK", sock.to_str().unwrap()),
        ("TARGET_NAME", "signer"),
        ("TARGET_GENID", genid.as_str()),
    ];
    v.create(spec("thief", &image, &thief_env, serde_json::json!({})))
        .await;
    v.action("thief", "start").await;
    assert_sign_code(&outp, "thief", "thief's sign call", "403").await;

    // a restarted module (new pid) is recognised at once
    std::fs::remove_file(outp.join("signer.code")).unwrap();
    v.action("signer", "restart").await;
    assert_sign_code(&outp, "signer", "signer's sign call after restart", "200").await;
}

fn docker_ready() -> bool {
    if std::env::var("VERGE_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        eprintln!("VERGE_SKIP_DOCKER_TESTS=1: skipping Docker test");
        return false;
    }
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "Docker is not reachable (`docker info` failed: {}). Start Docker or set VERGE_SKIP_DOCKER_TESTS=1.",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "the docker CLI cannot be run ({e}). Install Docker or set VERGE_SKIP_DOCKER_TESTS=1."
        ),
    }
    assert!(
        Path::new("/var/run/docker.sock").exists(),
        "verged talks to unix:///var/run/docker.sock, which is missing"
    );
    ensure_image();
    true
}

/// Builds `verge-test/busybox:1` from the host's static busybox, once.
fn ensure_image() {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *built {
        return;
    }
    let exists = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: install the busybox-static package"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENV PATH=/bin\nCMD [\"sh\"]\n",
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building {IMAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *built = true;
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}{}x{nanos:x}", std::process::id())
}

/// Removes the test's containers and network on drop.
struct DockerCleanup {
    containers: Vec<String>,
    network: String,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

/// A container script: makes the host's `/usr` usable, shows its socket,
/// env, and what `curl` gets from `path` over `socket`, then ticks.
fn container_script(socket: &str, calls: &[(&str, &str, &str)]) -> String {
    let mut s = String::from(
        "trap 'exit 0' TERM\nln -s usr/lib /lib; ln -s usr/lib64 /lib64\nls -l /var/run/iotedge/\nenv | sort\n",
    );
    for (label, method, path) in calls {
        s.push_str(&format!(
            "echo \"{label}=$(/usr/bin/curl -s -o /dev/null -w '%{{http_code}}' -X {method} --data '{{\"keyId\":\"primary\",\"algo\":\"HMACSHA256\",\"data\":\"YQ==\"}}' --unix-socket {socket} \"http://localhost{path}\")\"\n"
        ));
    }
    s.push_str("echo done-calls\nwhile true; do echo tick; sleep 0.3; done\n");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_module_lifecycle() {
    if !docker_ready() {
        return;
    }
    let network = unique("verge-net-");
    let name = unique("vd");
    let mut cleanup = DockerCleanup {
        containers: vec![name.clone()],
        network: network.clone(),
    };
    let v = Verged::start(&format!(
        "[moby_runtime]\nuri = \"unix:///var/run/docker.sock\"\nnetwork = \"{network}\"\n"
    ));
    let data = v.path("data");
    std::fs::create_dir_all(&data).unwrap();
    let sock = v.home.join(format!("mnt/{name}.sock"));
    let script = container_script(
        "/var/run/iotedge/workload.sock",
        &[("trust_bundle", "GET", &format!("/trust-bundle?{WV}"))],
    );
    let opts = |marker: &str| {
        serde_json::json!({
            "Cmd": ["sh", "-c", format!("echo {marker} > /data/marker; {script}")],
            "Env": ["FROM_OPTIONS=yes"],
            "HostConfig": {"Binds": ["/usr:/usr:ro", format!("{}:/data", data.display())]},
        })
    };
    let m = v
        .create(spec(&name, IMAGE, &[("FOO", "bar")], opts("first")))
        .await;
    assert_eq!(m["type"], "docker");
    assert!(sock.exists());
    v.action(&name, "start").await;
    let m = v.wait_status(&name, "running").await;
    let id1 = m["id"].as_str().unwrap().to_owned();
    let (_, list) = v.call("GET", &format!("/modules?{MV}"), None).await;
    assert!(
        list["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == name.as_str()
                && m["status"]["runtimeStatus"]["status"] == "running")
    );

    // what the container saw
    let start = Instant::now();
    let logs = loop {
        let l = v.logs(&name, "tail=all").await;
        if l.contains("done-calls") || start.elapsed() > Duration::from_secs(20) {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        logs.lines()
            .any(|l| l.starts_with('s') && l.contains("workload.sock")),
        "the workload socket is bind-mounted as a socket: {logs}"
    );
    assert!(logs.contains("FOO=bar\n"), "{logs}");
    assert!(logs.contains("FROM_OPTIONS=yes\n"), "{logs}");
    assert!(
        logs.contains(&format!("IOTEDGE_MODULEID={name}\n")),
        "{logs}"
    );
    assert!(
        logs.contains("IOTEDGE_WORKLOADURI=unix:///var/run/iotedge/workload.sock\n"),
        "{logs}"
    );
    assert!(
        logs.contains("IOTEDGE_GATEWAYHOSTNAME=edge1.local\n"),
        "{logs}"
    );
    assert!(logs.contains("trust_bundle=200\n"), "{logs}");
    assert_eq!(read(&data.join("marker")).trim(), "first");

    // tail and follow
    let tail = v.logs(&name, "tail=2").await;
    assert_eq!(tail.lines().count(), 2, "{tail}");
    let followed = follow_logs(&v.mgmt, &name, |t| t.matches("tick").count() >= 3).await;
    assert!(followed.matches("tick").count() >= 3, "{followed}");

    // stop, restart
    v.action(&name, "stop").await;
    let m = v.module(&name).await;
    assert_ne!(m["status"]["runtimeStatus"]["status"], "running", "{m}");
    v.action(&name, "restart").await;
    v.wait_status(&name, "running").await;

    // update: new container with new createOptions
    v.update_and_start(&name, spec(&name, IMAGE, &[("FOO", "baz")], opts("second")))
        .await;
    let m = v.wait_status(&name, "running").await;
    assert_ne!(m["id"].as_str().unwrap(), id1);
    wait_for_async("the updated container", Duration::from_secs(20), || {
        read(&data.join("marker")).trim() == "second"
    })
    .await;

    // delete
    v.delete(&name).await;
    let (s, _) = v.call("GET", &format!("/modules/{name}?{MV}"), None).await;
    assert_eq!(s, 404);
    let gone = Command::new("docker")
        .args(["container", "inspect", &name])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the container is gone");
    cleanup.containers.clear();
    drop(v);
}

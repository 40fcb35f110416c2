//! The operational commands (`list`, `logs`, `restart`, `check`,
//! `support-bundle`, `system status`) run as the real `verge` binary against
//! the real `verged` (process backend, a `/bin/sh` agent), with `/bin/sh`
//! modules created through the management API.
//!
//! `verged` is built with the same cargo, target directory and profile. Each
//! test has its own verged in a temp dir; everything started is stopped on
//! drop (also when a test fails), and every wait is bounded.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use verge_testkit::verged::{self, Config};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const MV: &str = "api-version=2022-08-03";

// ---- building and running verged ---------------------------------------------

/// Path of `verged`, built once per test binary.
fn verged_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = verge_testkit::build(&["verge-daemon"]).join("verged");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// Start time of a process (field 22 of /proc/<pid>/stat), to never signal
/// a recycled pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Direct children of `parent` with their start times.
fn children(parent: i32) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent)
            && let Some(t) = start_time(pid)
        {
            out.push((pid, t));
        }
    }
    out
}

struct Verged {
    child: Option<Child>,
    dir: tempfile::TempDir,
    home: PathBuf,
    cfg: PathBuf,
    mgmt: PathBuf,
}

impl Drop for Verged {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = i32::try_from(child.id()).unwrap();
        let mut leftovers = children(pid);
        leftovers.extend(module_pids(&self.home));
        // A clean stop takes the agent and the modules with it.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        for (p, t) in leftovers {
            if start_time(p) == Some(t) {
                let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
}

/// (pid, start time) of the modules the process backend started.
fn module_pids(home: &Path) -> Vec<(i32, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(home.join("modules/modules"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read(e.path().join("state.json")).unwrap_or_default();
        if let Ok(v) = serde_json::from_slice::<Value>(&text)
            && let Some(pid) = v["pid"].as_i64().and_then(|p| i32::try_from(p).ok())
            && let Some(t) = v["proc_start"].as_u64()
        {
            out.push((pid, t));
        }
    }
    out
}

impl Verged {
    /// A config and home in a temp dir; verged not started.
    fn prepare() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let agent = dir.path().join("agent.sh");
        std::fs::write(&agent, "exec sleep 600\n").unwrap();
        let cfg = Config::new(&home)
            .manual(&format!(
                "HostName=hub.invalid;DeviceId=dev1;SharedAccessKey={KEY}"
            ))
            .agent_image(&format!("/bin/sh {}", agent.display()))
            .write(dir.path().join("config.toml"));
        let mgmt = home.join("mgmt.sock");
        Verged {
            child: None,
            dir,
            home,
            cfg,
            mgmt,
        }
    }

    fn start() -> Self {
        Self::prepare().launch("error")
    }

    /// Starts verged (outside systemd: no `JOURNAL_STREAM`) with `RUST_LOG`.
    fn launch(self, rust_log: &str) -> Self {
        let mut v = self;
        v.child = Some(verged::start(verged_bin(), &v.cfg, rust_log, &v.mgmt));
        v
    }

    fn host(&self) -> String {
        format!("unix://{}", self.mgmt.display())
    }

    /// One management API call (for the setup, not under test).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt
            .block_on(verge_daemon::client::request(
                &self.mgmt,
                method,
                &format!("{path}?{MV}"),
                body.map(|b| b.to_string().into_bytes()),
                Duration::from_secs(60),
            ))
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// Creates and starts a `/bin/sh` module running `script`.
    fn module(&self, name: &str, script: &str, env: &[(&str, &str)]) {
        let path = self.dir.path().join(format!("{name}.sh"));
        std::fs::write(&path, script).unwrap();
        let env: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let spec = json!({
            "name": name,
            "type": "docker",
            "imagePullPolicy": "on-create",
            "config": {
                "settings": {"image": format!("/bin/sh {}", path.display()), "createOptions": {}},
                "env": env,
            },
        });
        let (s, b) = self.call("POST", "/modules", Some(spec));
        assert_eq!(s, 201, "{b}");
        let (s, b) = self.call("POST", &format!("/modules/{name}/start"), None);
        assert_eq!(s, 204, "{b}");
    }

    fn status(&self, name: &str) -> Value {
        let (s, m) = self.call("GET", &format!("/modules/{name}"), None);
        assert_eq!(s, 200, "{m}");
        m
    }

    fn wait_status(&self, name: &str, want: &str) -> Value {
        wait("module status", || {
            let m = self.status(name);
            (m["status"]["runtimeStatus"]["status"] == want).then_some(m)
        })
    }
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- running verge ------------------------------------------------------------

fn verge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(args)
        .env_remove("VERGE_HOST")
        .env_remove("VERGE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const TICKER: &str = "i=0\nwhile true; do i=$((i+1)); echo \"tick $i\"; sleep 0.2; done\n";

// ---- tests ----------------------------------------------------------------------

#[test]
fn list_shows_an_aligned_table_and_json() {
    let v = Verged::start();
    v.module("alpha", TICKER, &[]);
    v.module("brokenmodule", "echo bye\nexit 3\n", &[]);
    v.wait_status("alpha", "running");
    v.wait_status("brokenmodule", "failed");

    // Through -H, and through the config file.
    let host = v.host();
    let cfg = v.cfg.to_str().unwrap();
    for args in [
        vec!["-H", host.as_str(), "list"],
        vec!["--config", cfg, "list"],
    ] {
        let o = verge(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        // Not a terminal: no escape codes.
        assert!(!text.contains('\x1b'), "{text:?}");
        let lines: Vec<&str> = text.lines().collect();
        // The two modules and the process agent verged supervises, by name.
        assert_eq!(lines.len(), 4, "{text}");
        let header = lines[0];
        assert!(header.starts_with("NAME"), "{text}");
        let cols: Vec<usize> = ["STATUS", "DESCRIPTION", "CONFIG"]
            .iter()
            .map(|c| header.find(c).unwrap())
            .collect();
        let alpha = lines[1];
        let broken = lines[2];
        let agent = lines[3];
        assert!(alpha.starts_with("alpha "), "{text}");
        assert!(broken.starts_with("brokenmodule "), "{text}");
        assert!(agent.starts_with("edgeAgent "), "{text}");
        assert_eq!(&agent[cols[0]..cols[0] + 7], "running", "{text}");
        assert!(agent[cols[1]..].starts_with("Up "), "{text}");
        assert!(agent[cols[2]..].starts_with("/bin/sh "), "{text}");
        for row in [alpha, broken, agent] {
            // Every column starts where its header does.
            for &c in &cols {
                assert_ne!(&row[c..c + 1], " ", "column at {c} misaligned:\n{text}");
                assert_eq!(&row[c - 1..c], " ", "column at {c} misaligned:\n{text}");
            }
        }
        assert_eq!(&alpha[cols[0]..cols[0] + 7], "running", "{text}");
        assert!(alpha[cols[1]..].starts_with("Up "), "{text}");
        assert_eq!(&broken[cols[0]..cols[0] + 6], "failed", "{text}");
        assert!(
            broken[cols[1]..].starts_with("Failed (exit 3) ") && broken.contains(" ago"),
            "{text}"
        );
        assert!(alpha[cols[2]..].starts_with("/bin/sh "), "{text}");
    }

    let o = verge(&["-H", &host, "list", "--output", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["name"], "edgeAgent");
    assert_eq!(rows[2]["status"], "running");
    let agent_pid: i32 = rows[2]["runtimeId"].as_str().unwrap().parse().unwrap();
    assert!(
        start_time(agent_pid).is_some(),
        "agent pid {agent_pid} is not alive"
    );
    assert_eq!(rows[0]["name"], "alpha");
    assert_eq!(rows[0]["status"], "running");
    assert!(rows[0]["description"].as_str().unwrap().starts_with("Up "));
    assert_eq!(rows[1]["name"], "brokenmodule");
    assert_eq!(rows[1]["status"], "failed");
    assert_eq!(rows[1]["exitCode"], "3");
}

#[test]
fn unreachable_verged_says_what_to_do() {
    let v = Verged::prepare();
    let o = verge(&["--config", v.cfg.to_str().unwrap(), "list"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "cannot reach verged at unix://{}",
            v.mgmt.display()
        )),
        "{err}"
    );
    assert!(err.contains("systemctl status verged"), "{err}");

    let o = verge(&["-H", "tcp://1.2.3.4:80", "list"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unix:///"), "{}", stderr(&o));

    // A module that does not exist.
    let v = Verged::start();
    let o = verge(&["-H", &v.host(), "restart", "nosuchmodule"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("verge list"), "{}", stderr(&o));
}

#[test]
fn logs_tail_since_until_and_follow() {
    let v = Verged::start();
    v.module("ticker", TICKER, &[]);
    v.wait_status("ticker", "running");
    let host = v.host();
    // Wait until a few lines exist.
    wait("five log lines", || {
        let o = verge(&["-H", &host, "logs", "ticker"]);
        (stdout(&o).lines().count() >= 5).then_some(())
    });

    let o = verge(&["-H", &host, "logs", "ticker", "--tail", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines.iter().all(|l| l.starts_with("tick ")), "{text}");

    // Everything is newer than an hour ago, nothing is older.
    let o = verge(&["-H", &host, "logs", "ticker", "--since", "1h"]);
    assert!(stdout(&o).lines().count() >= 5, "{}", stdout(&o));
    let o = verge(&["-H", &host, "logs", "ticker", "--until", "1h"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    // RFC 3339: since a time in the future gives nothing.
    let o = verge(&[
        "-H",
        &host,
        "logs",
        "ticker",
        "--since",
        "2999-01-01T00:00:00Z",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    // A bad time is refused before asking verged.
    let o = verge(&["-H", &host, "logs", "ticker", "--since", "yesterday"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("RFC 3339"), "{}", stderr(&o));

    // Follow: new lines arrive while the command runs.
    let mut child = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["-H", &host, "logs", "ticker", "-f", "--tail", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 4 && start.elapsed() < Duration::from_secs(15) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            got.push(l);
        }
    }
    // Still running: the lines were streamed, not delivered at exit.
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let _ = reader.join();
    assert!(still_running, "verge logs -f exited: {err}");
    assert!(got.len() >= 4, "followed lines: {got:?} {err}");
    let n: Vec<u64> = got
        .iter()
        .map(|l| l.trim_start_matches("tick ").parse().unwrap())
        .collect();
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
}

#[test]
fn restart_gives_the_module_a_new_process() {
    let v = Verged::start();
    v.module("alpha", TICKER, &[]);
    let before = v.wait_status("alpha", "running")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = verge(&["-H", &v.host(), "restart", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "alpha");
    let after = wait("a new pid", || {
        let o = verge(&["-H", &v.host(), "list", "--output", "json"]);
        let rows: Value = serde_json::from_str(&stdout(&o)).ok()?;
        let row = rows
            .as_array()?
            .iter()
            .find(|r| r["name"] == "alpha")?
            .clone();
        (row["status"] == "running" && row["runtimeId"] != before.as_str()).then_some(row)
    });
    let pid: i32 = after["runtimeId"].as_str().unwrap().parse().unwrap();
    assert!(start_time(pid).is_some(), "pid {pid} is not alive");
}

#[test]
fn check_reports_ok_and_warns_about_the_unreachable_hub() {
    let v = Verged::start();
    let cfg = v.cfg.to_str().unwrap();
    let o = verge(&["--config", cfg, "check", "--output", "json"]);
    let report: Value = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)));
    let result = |id: &str| -> String {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no check {id}: {report}"))["result"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(result("config-well-formed"), "ok", "{report}");
    assert_eq!(result("connect-management-uri"), "ok", "{report}");
    assert_eq!(result("clock-sanity"), "ok", "{report}");
    // The auto-generated CA verged just wrote is valid for 90 days.
    assert_eq!(result("edge-ca-cert-expiry"), "ok", "{report}");
    assert_eq!(result("verged-version"), "ok", "{report}");
    // hub.invalid never resolves: offline is legal, so a warning.
    assert_eq!(result("upstream-connectivity"), "warning", "{report}");
    assert_eq!(result("clock-skew"), "skipped", "{report}");
    assert_eq!(result("parent-connectivity"), "skipped", "{report}");
    assert_eq!(result("container-engine"), "skipped", "{report}");
    assert_eq!(result("issued-certs-expiry"), "ok", "{report}");
    assert_eq!(report["summary"]["errors"], 0, "{report}");
    assert!(o.status.success(), "no error, yet exit {:?}", o.status);

    // Text: marks, details and the summary.
    let o = verge(&["--config", cfg, "check"]);
    let text = stdout(&o);
    assert!(
        text.contains("\u{2713} config file is valid - OK"),
        "{text}"
    );
    assert!(
        text.contains("\u{203c} IoT hub reachable, its TLS certificate verified - Warning"),
        "{text}"
    );
    assert!(
        // edgeHub's default protocol, as the hub dials it.
        text.contains("    cannot connect to the IoT hub (Amqp) at tls://hub.invalid:5671"),
        "{text}"
    );
    // A nearly full disk on the test machine is a second, legitimate warning.
    let warnings = 1 + usize::from(result("storage-disk-space") == "warning");
    assert!(
        text.contains(&format!(
            "check(s) succeeded, {warnings} raised warnings, 0 raised errors"
        )),
        "{text}"
    );

    // An expired edge CA file is an error, and so is a verged that is not running.
    drop(v);
    let v = Verged::prepare();
    let certs = v.home.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("edge-ca.pem"), EXPIRED_CERT).unwrap();
    let o = verge(&[
        "--config",
        v.cfg.to_str().unwrap(),
        "check",
        "--output",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let find = |id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(find("edge-ca-cert-expiry")["result"], "error", "{report}");
    assert!(
        find("edge-ca-cert-expiry")["details"]
            .to_string()
            .contains("expired"),
        "{report}"
    );
    assert_eq!(
        find("connect-management-uri")["result"],
        "error",
        "{report}"
    );
}

/// A self-signed CA certificate valid only on 2001-01-01 (generated once for
/// this test with Python's `cryptography`; no private key is kept).
const EXPIRED_CERT: &str = include_str!("expired-cert.pem");

#[test]
fn support_bundle_has_everything_but_secrets() {
    let v = Verged::start();
    let cs = format!("HostName=hub.invalid;DeviceId=dev1;SharedAccessKey={KEY}");
    v.module(
        "alpha",
        "echo hello from alpha\nexec sleep 600\n",
        &[("MY_CONNECTION_STRING", &cs), ("PLAIN", "visible")],
    );
    v.wait_status("alpha", "running");
    let out = v.dir.path().join("bundle.tar.gz");
    let o = verge(&[
        "--config",
        v.cfg.to_str().unwrap(),
        "support-bundle",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the bundle must be private");

    let file = std::fs::File::open(&out).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        files.insert(name, text);
    }
    for want in [
        "version.txt",
        "systeminfo.json",
        "resources.json",
        "agent.json",
        "certificates.json",
        "modules.json",
        "logs/alpha_log.txt",
        "logs/verged.txt",
        "check.json",
        "config.toml",
    ] {
        assert!(
            files.contains_key(want),
            "{want} missing: {:?}",
            files.keys()
        );
    }
    assert!(files["logs/alpha_log.txt"].contains("hello from alpha"));
    let modules: Value = serde_json::from_str(&files["modules.json"]).unwrap();
    assert_eq!(modules["modules"][0]["name"], "alpha");
    assert!(files["modules.json"].contains("visible"));
    let check: Value = serde_json::from_str(&files["check.json"]).unwrap();
    assert!(check["checks"].as_array().unwrap().len() >= 5, "{check}");
    assert!(
        files["config.toml"].contains("hub.invalid"),
        "{}",
        files["config.toml"]
    );
    let res: Value = serde_json::from_str(&files["resources.json"]).unwrap();
    assert!(res["total_ram"].as_u64().unwrap() > 0, "{res}");
    assert!(
        res["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "alpha" && m["memory_bytes"].as_u64().unwrap() > 0),
        "{res}"
    );
    let agent: Value = serde_json::from_str(&files["agent.json"]).unwrap();
    assert_eq!(agent["name"], "edgeAgent", "{agent}");
    assert!(!files.contains_key("errors.txt"), "{}", files["errors.txt"]);
    let info: Value = serde_json::from_str(&files["systeminfo.json"]).unwrap();
    assert!(info["version"].is_string(), "{info}");
    for (name, text) in &files {
        assert!(
            !text.contains("SharedAccessKey"),
            "{name} has a SharedAccessKey:\n{text}"
        );
        assert!(!text.contains(KEY), "{name} has the device key:\n{text}");
    }
}

#[test]
fn system_status_reports_verged() {
    let v = Verged::start();
    // verged answers before its agent process is up ("starting"): ask again
    // for a while.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let o = verge(&["--config", v.cfg.to_str().unwrap(), "system", "status"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        if text.contains("): Up ") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(text.contains("running"), "{text}");
    assert!(text.contains(&v.host()), "{text}");
    assert!(text.contains("dev1 on hub.invalid"), "{text}");
    assert!(text.contains("edgeAgent (process, pid "), "{text}");
    assert!(text.contains("): Up "), "{text}");
    assert!(text.contains("agent restarts"), "{text}");

    let o = verge(&["version"]);
    assert_eq!(
        stdout(&o).trim(),
        format!("verge {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A server certificate through a workload socket, asked by a process module
/// `name` of its own (verged serves a module's socket to its own processes
/// only), as the hub would ask for one.
fn issue_server_cert(v: &Verged, name: &str, expiration: Option<&str>) -> Value {
    let mut body = json!({"commonName": "edge1.local"});
    if let Some(e) = expiration {
        body["expiration"] = json!(e);
    }
    let out = v.dir.path().join(format!("{name}.cert"));
    let script = r#"sock="${IOTEDGE_WORKLOADURI#unix://}"
code=$(curl -s -o "$OUT.body" -w '%{http_code}' --unix-socket "$sock" -X POST -d "$BODY" \
  "http://localhost/modules/$IOTEDGE_MODULEID/genid/$IOTEDGE_MODULEGENERATIONID/certificate/server?api-version=2019-01-30")
echo "$code" > "$OUT.code.tmp" && mv "$OUT.code.tmp" "$OUT.code"
exec sleep 600
"#;
    let body = body.to_string();
    v.module(
        name,
        script,
        &[("OUT", out.to_str().unwrap()), ("BODY", body.as_str())],
    );
    let code_file = out.with_extension("cert.code");
    let code = wait("the module's certificate request", || {
        std::fs::read_to_string(&code_file).ok()
    });
    let got = std::fs::read_to_string(out.with_extension("cert.body")).unwrap_or_default();
    assert_eq!(code.trim(), "201", "{got}");
    serde_json::from_str(&got).unwrap()
}

fn check_json(v: &Verged) -> Value {
    let o = verge(&[
        "--config",
        v.cfg.to_str().unwrap(),
        "check",
        "--output",
        "json",
    ]);
    serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)))
}

fn find_check(report: &Value, id: &str) -> Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {report}"))
        .clone()
}

#[test]
fn check_reports_issued_certificates_by_lifetime() {
    let v = Verged::start();
    let c = find_check(&check_json(&v), "issued-certs-expiry");
    assert_eq!(c["result"], "ok", "{c}");
    assert!(c["details"].to_string().contains("none issued yet"), "{c}");

    // A fresh 30-day server certificate: fewer than 30 days left, yet fine.
    issue_server_cert(&v, "certa", None);
    let c = find_check(&check_json(&v), "issued-certs-expiry");
    assert_eq!(c["result"], "ok", "{c}");
    assert!(
        c["details"]
            .to_string()
            .contains("certa server certificate (CN edge1.local)"),
        "{c}"
    );

    // One valid for another 60 s: issued certificates start 5 minutes in the
    // past, so over 80 % of its lifetime is gone.
    let soon = verge_core::time::Timestamp::now()
        .plus_secs(60)
        .to_iso8601();
    issue_server_cert(&v, "certb", Some(&soon));
    let c = find_check(&check_json(&v), "issued-certs-expiry");
    assert_eq!(c["result"], "warning", "{c}");
    assert!(
        c["details"].to_string().contains("of its lifetime used"),
        "{c}"
    );

    // An expired one (a record of a module that has not renewed) is an error.
    std::fs::write(
        v.home.join("certs/issued/modX-identity.json"),
        json!({
            "module": "modX", "kind": "identity", "commonName": "modX",
            "notBefore": "2020-01-01T00:00:00Z", "notAfter": "2020-01-31T00:00:00Z",
            "issuedAt": "2020-01-01T00:05:00Z",
        })
        .to_string(),
    )
    .unwrap();
    let report = check_json(&v);
    let c = find_check(&report, "issued-certs-expiry");
    assert_eq!(c["result"], "error", "{c}");
    assert!(
        c["details"]
            .to_string()
            .contains("modX identity certificate"),
        "{c}"
    );
    assert!(
        c["details"].to_string().contains("expired at 2020-01-31"),
        "{c}"
    );
    assert!(report["summary"]["errors"].as_u64().unwrap() >= 1);
    let o = verge(&["--config", v.cfg.to_str().unwrap(), "check"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("\u{d7} certificates issued by the edge CA - Error"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn list_and_status_follow_a_restarting_agent() {
    let mut v = Verged::prepare();
    let runs = v.dir.path().join("runs.log");
    std::fs::write(
        v.dir.path().join("agent.sh"),
        format!("echo run >> {r}\nsleep 0.2\nexit 5\n", r = runs.display()),
    )
    .unwrap();
    let child = Command::new(verged_bin())
        .arg("--config")
        .arg(&v.cfg)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    v.child = Some(child);
    let host = v.host();
    let row = wait("the agent to have exited twice", || {
        let o = verge(&["-H", &host, "list", "--output", "json"]);
        let rows: Value = serde_json::from_str(&stdout(&o)).ok()?;
        let row = rows
            .as_array()?
            .iter()
            .find(|r| r["name"] == "edgeAgent")?
            .clone();
        let n = std::fs::read_to_string(&runs).ok()?.lines().count();
        (n >= 2 && row["status"] == "failed").then_some(row)
    });
    assert_eq!(row["exitCode"], "5", "{row}");
    let o = verge(&["--config", v.cfg.to_str().unwrap(), "system", "status"]);
    let text = stdout(&o);
    assert!(
        text.contains("restart pending") || text.contains("): Up "),
        "{text}"
    );
    assert!(text.contains("(last exit: code 5 at "), "{text}");
}

/// The process agent is inspectable and restartable like a module, and
/// verged's own log is kept where `verge system logs` and the bundle find it
/// when it does not run under systemd.
#[test]
fn agent_and_verged_logs_and_agent_restart() {
    let v = Verged::prepare();
    std::fs::write(
        v.dir.path().join("agent.sh"),
        "echo \"agent hello $$\"\necho \"agent warning\" >&2\nexec sleep 600\n",
    )
    .unwrap();
    let v = v.launch("info");
    let host = v.host();
    let hello = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("agent hello "))
            .map(str::to_owned)
            .collect()
    };
    let first = wait("the agent's first output", || {
        let o = verge(&["-H", &host, "logs", "edgeAgent"]);
        let text = stdout(&o);
        (o.status.success() && text.contains("agent warning"))
            .then(|| hello(&text))
            .filter(|h| h.len() == 1)
    });

    let o = verge(&["-H", &host, "restart", "edgeAgent"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "edgeAgent");
    let both = wait("the restarted agent's output", || {
        let o = verge(&["-H", &host, "logs", "edgeAgent", "--tail", "all"]);
        let h = hello(&stdout(&o));
        (h.len() == 2).then_some(h)
    });
    assert_eq!(both[0], first[0]);
    assert_ne!(both[1], first[0], "a new process: {both:?}");
    let (_, agent) = v.call("GET", "/systeminfo/agent", None);
    assert_eq!(agent["restartCount"], 1, "{agent}");
    assert_eq!(agent["status"], "running", "{agent}");
    let o = verge(&["-H", &host, "logs", "edgeAgent", "--tail", "1", "-t"]);
    assert!(
        stdout(&o).trim_end().ends_with("agent warning") || stdout(&o).contains("agent hello"),
        "{}",
        stdout(&o)
    );
    // An unknown module is still an error.
    let o = verge(&["-H", &host, "restart", "nosuchmodule"]);
    assert!(!o.status.success());

    let cfg = v.cfg.to_str().unwrap();
    let o = verge(&["--config", cfg, "system", "logs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("management API up"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("restarting the agent"),
        "{}",
        stdout(&o)
    );
    let o = verge(&["--config", cfg, "system", "logs", "--", "-n", "5"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("journalctl arguments"),
        "{}",
        stderr(&o)
    );

    let out = v.dir.path().join("bundle.tar.gz");
    let o = verge(&[
        "--config",
        cfg,
        "support-bundle",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = std::fs::File::open(&out).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        files.insert(name, text);
    }
    assert_eq!(
        hello(
            &files["logs/edgeAgent_log.txt"]
                .lines()
                .map(|l| l.split_once(' ').map_or(l, |(_, r)| r))
                .collect::<Vec<_>>()
                .join("\n")
        )
        .len(),
        2,
        "{}",
        files["logs/edgeAgent_log.txt"]
    );
    assert!(
        files["logs/verged.txt"].contains("management API up"),
        "{}",
        files["logs/verged.txt"]
    );
}

/// `verge system set-log-level`, `reprovision` and `stop` act on the
/// running verged through its management API (it does not run under
/// systemd here), and the level is kept in the config file.
#[test]
fn system_set_log_level_reprovision_and_stop() {
    let v = Verged::prepare();
    std::fs::write(
        v.dir.path().join("agent.sh"),
        "echo \"agent level=$RuntimeLogLevel device=$IOTEDGE_DEVICEID\"\nexec sleep 600\n",
    )
    .unwrap();
    let mut v = v.launch("info");
    let cfg = v.cfg.to_str().unwrap().to_owned();
    let host = v.host();
    let agent_lines = |want: &str| {
        wait(want, || {
            let o = verge(&["-H", &host, "logs", "edgeAgent"]);
            let text = stdout(&o);
            text.contains(want).then_some(text)
        })
    };
    agent_lines("device=dev1");

    // Log level: now, for verged and the agent, and in the file.
    let o = verge(&["--config", &cfg, "system", "set-log-level", "loud"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"loud\""), "{}", stderr(&o));
    let o = verge(&["--config", &cfg, "system", "set-log-level", "error"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("verged logs at error"),
        "{}",
        stdout(&o)
    );
    agent_lines("agent level=error");
    let text = std::fs::read_to_string(&v.cfg).unwrap();
    assert!(text.contains("log_level = \"error\""), "{text}");
    assert!(text.contains("RuntimeLogLevel = \"error\""), "{text}");
    // verged's own info lines stop: the agent's restarts (seen above in
    // its output, and one more now) leave no line.
    let o = verge(&["-H", &host, "restart", "edgeAgent"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(v.home.join("logs/verged.log")).unwrap();
    assert!(log.contains("management API up"), "{log}");
    assert!(!log.contains("restarting the agent"), "{log}");

    // Reprovision: the identity from the file as it is now.
    std::fs::write(&v.cfg, text.replace("DeviceId=dev1", "DeviceId=dev2")).unwrap();
    let o = verge(&["--config", &cfg, "system", "reprovision"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("dev2"), "{}", stdout(&o));
    agent_lines("device=dev2");
    // An incomplete DPS section is refused, naming the key, and verged keeps running.
    let now = std::fs::read_to_string(&v.cfg).unwrap();
    std::fs::write(
        &v.cfg,
        now.replace(
            "source = \"manual\"",
            "source = \"dps\"\nglobal_endpoint = \"https://x\"\nid_scope = \"0ne\"",
        )
        .replace("connection_string", "#connection_string"),
    )
    .unwrap();
    let o = verge(&["--config", &cfg, "system", "reprovision"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("`provisioning.attestation`: missing"),
        "{}",
        stderr(&o)
    );
    let o = verge(&["-H", &host, "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(&v.cfg, &now).unwrap();

    // Stop: verged exits by itself.
    let o = verge(&["--config", &cfg, "system", "stop"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let child = v.child.as_mut().unwrap();
    let status = wait("verged to exit", || child.try_wait().unwrap());
    assert!(status.success(), "{status}");
}

#[test]
fn check_list_names_every_check() {
    let o = verge(&["check-list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for id in [
        "config-well-formed",
        "upstream-connectivity",
        "connect-management-uri",
    ] {
        assert!(text.contains(id), "{text}");
    }
    let o = verge(&["--help"]);
    for cmd in ["check-list", "support-bundle", "system"] {
        assert!(stdout(&o).contains(cmd), "{}", stdout(&o));
    }
    let o = verge(&["system", "--help"]);
    for cmd in ["stop", "reprovision", "set-log-level"] {
        assert!(stdout(&o).contains(cmd), "{}", stdout(&o));
    }
}

/// Process mode: createOptions the backend does not apply are named in
/// `verge list` (and verged's log); a container image gets a hint that the
/// process backend runs executables.
#[test]
fn process_mode_names_ignored_create_options_and_container_images() {
    let v = Verged::start();
    let spec = json!({
        "name": "beta",
        "type": "docker",
        "imagePullPolicy": "on-create",
        "config": {
            "settings": {
                "image": "/bin/sleep 600",
                "createOptions": {"Cmd": [], "HostConfig": {"PortBindings": {"80/tcp": [{"HostPort": "8080"}]}}},
            },
            "env": [],
        },
    });
    let (s, b) = v.call("POST", "/modules", Some(spec));
    assert_eq!(s, 201, "{b}");
    let o = verge(&["-H", &v.host(), "list"]);
    assert!(
        stdout(&o).contains("hint: beta: createOptions not applied by the process backend (it applies only Cmd and WorkingDir): HostConfig.PortBindings"),
        "{}",
        stdout(&o)
    );
    let spec = json!({
        "name": "sensor",
        "type": "docker",
        "imagePullPolicy": "on-create",
        "config": {
            "settings": {"image": "mcr.microsoft.com/azureiotedge-simulated-temperature-sensor:1.5", "createOptions": {}},
            "env": [],
        },
    });
    let (s, b) = v.call("POST", "/modules", Some(spec));
    assert_eq!(s, 502, "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("the process backend runs executables"),
        "{b}"
    );
}

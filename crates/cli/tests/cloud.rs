//! `verge cloud …` against the real verge-cloud binary on 127.0.0.1, with
//! verge-sdk clients playing the devices (telemetry, reported properties,
//! methods, C2D).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use verge_sdk::{ClientOptions, DeviceClient, Message, ModuleClient};
use verge_testkit::cloud::{CloudProc, Config};

/// verge-cloud as a child process (killed when dropped).
struct Cloud {
    _proc: CloudProc,
    dir: tempfile::TempDir,
    https: u16,
    mqtt: u16,
    key: String,
}

impl Cloud {
    fn start() -> Cloud {
        Self::start_as("localhost")
    }

    /// A verge-cloud whose certificate names `hostname`.
    fn start_as(hostname: &str) -> Cloud {
        let bin = common::build(&["verge-cloud"]).join("verge-cloud");
        let dir = tempfile::tempdir().unwrap();
        let proc = CloudProc::start(
            &bin,
            &Config::new(&dir.path().join("data"))
                .hostname(hostname)
                .render(),
            dir.path(),
            "info",
        );
        let key = std::fs::read_to_string(dir.path().join("data/service-policy.key"))
            .unwrap()
            .trim()
            .to_owned();
        Cloud {
            https: proc.https_port(),
            mqtt: proc.mqtts_port(),
            _proc: proc,
            dir,
            key,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("data/tls/ca.pem")
    }

    fn connection_string(&self) -> String {
        format!(
            "HostName=localhost:{};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            self.https, self.key
        )
    }

    /// `verge cloud <args>` with the connection string and CA from the environment.
    fn verge(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_verge"))
            .arg("cloud")
            .args(args)
            .env("VERGE_CLOUD_CONNECTION_STRING", self.connection_string())
            .env("VERGE_CLOUD_CA", self.ca())
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.verge(args);
        assert!(
            out.status.success(),
            "verge cloud {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.verge(args);
        assert!(!out.status.success(), "verge cloud {args:?} succeeded");
        String::from_utf8(out.stderr).unwrap()
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca()).unwrap()
    }

    fn opts(&self) -> ClientOptions {
        ClientOptions {
            port: self.mqtt,
            reconnect_min: Duration::from_millis(100),
            ..ClientOptions::default()
        }
    }
}

/// The column where `header` starts in the first line of a table.
fn column(table: &str, header: &str) -> usize {
    table.lines().next().unwrap().find(header).unwrap()
}

fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

/// The value of `Key=` in a connection string printed on a `connection string` line.
fn device_cs(show: &str) -> String {
    line_with(show, "HostName=")
        .split_whitespace()
        .find(|w| w.starts_with("HostName="))
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_modules_twins_deployments_messages_methods_c2d() {
    let cloud = Cloud::start();

    // ---- errors that say what to do ---------------------------------------
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["cloud", "devices", "list"])
        .env_remove("VERGE_CLOUD_CONNECTION_STRING")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--connection-string") && e.contains("VERGE_CLOUD_CONNECTION_STRING"),
        "{e}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["cloud", "devices", "list"])
        .env("VERGE_CLOUD_CONNECTION_STRING", cloud.connection_string())
        .env_remove("VERGE_CLOUD_CA")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--ca"), "{e}");
    let wrong_key = cloud
        .connection_string()
        .replace(&cloud.key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args([
            "cloud",
            "--connection-string",
            &wrong_key,
            "devices",
            "list",
        ])
        .env("VERGE_CLOUD_CA", cloud.ca())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("refused the credentials"),
        "{e}"
    );

    // ---- devices ------------------------------------------------------------
    let edge = cloud.ok(&["devices", "create", "edge1", "--edge"]);
    assert!(line_with(&edge, "edge ").ends_with("yes"), "{edge}");
    let edge_cs = device_cs(&edge);
    assert!(
        edge_cs.starts_with("HostName=localhost;DeviceId=edge1;SharedAccessKey="),
        "{edge_cs}"
    );
    let leaf = cloud.ok(&["devices", "create", "leaf1", "--parent", "edge1"]);
    assert!(line_with(&leaf, "parent").ends_with("edge1"), "{leaf}");
    let e = cloud.fails(&["devices", "create", "edge1", "--edge"]);
    assert!(e.contains("exists already"), "{e}");
    let e = cloud.fails(&["devices", "create", "leaf2", "--parent", "leaf1"]);
    assert!(e.contains("not an edge device"), "{e}");
    let e = cloud.fails(&["devices", "show", "nope"]);
    assert!(e.contains("not found"), "{e}");

    let table = cloud.ok(&["devices", "list"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    for h in ["EDGE", "STATUS", "CONNECTION", "PARENT"] {
        let col = column(&table, h);
        for l in table.lines().skip(1) {
            assert!(
                l[..col].ends_with("   ") && !l[col..].starts_with(' '),
                "column {h} misaligned:\n{table}"
            );
        }
    }
    assert!(line_with(&table, "leaf1").contains("edge1"), "{table}");
    let list: Value = serde_json::from_str(&cloud.ok(&["devices", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let shown: Value =
        serde_json::from_str(&cloud.ok(&["devices", "show", "edge1", "-o", "json"])).unwrap();
    assert_eq!(shown["connectionString"], json!(edge_cs));

    // ---- modules --------------------------------------------------------------
    let modules = cloud.ok(&["modules", "list", "--device", "edge1"]);
    assert!(
        modules.contains("$edgeAgent") && modules.contains("$edgeHub"),
        "{modules}"
    );

    // ---- twins ----------------------------------------------------------------
    let twin: Value = serde_json::from_str(&cloud.ok(&[
        "twin",
        "update",
        "--device",
        "leaf1",
        "--patch",
        r#"{"properties":{"desired":{"interval":7}}}"#,
    ]))
    .unwrap();
    assert_eq!(twin["properties"]["desired"]["interval"], json!(7));
    let twin: Value =
        serde_json::from_str(&cloud.ok(&["twin", "show", "--device", "leaf1"])).unwrap();
    assert_eq!(twin["properties"]["desired"]["interval"], json!(7));
    let e = cloud.fails(&["twin", "update", "--device", "leaf1", "--patch", "{nope"]);
    assert!(e.contains("--patch is not valid JSON"), "{e}");

    // ---- deployment: apply, then the agent reports ----------------------------
    let manifest = cloud.dir.path().join("deployment.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": "verge-agent"}},
                    "edgeHub": {"type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "verge-hub"}}
                },
                "modules": {
                    "sensor": {"version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always", "settings": {"image": "sensor"}}
                }
            }},
            "$edgeHub": {"properties.desired": {"schemaVersion": "1.1", "routes": {}}}
        }}))
        .unwrap(),
    )
    .unwrap();
    let out = cloud.ok(&[
        "deployment",
        "apply",
        "--device",
        "edge1",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert!(out.contains("Applied"), "{out}");
    let st = cloud.ok(&["deployment", "status", "--device", "edge1"]);
    assert!(st.contains("reported nothing yet"), "{st}");
    let agent_twin: Value = serde_json::from_str(&cloud.ok(&[
        "twin",
        "show",
        "--device",
        "edge1",
        "--module",
        "$edgeAgent",
    ]))
    .unwrap();
    assert_eq!(
        agent_twin["properties"]["desired"]["modules"]["sensor"]["settings"]["image"],
        json!("sensor")
    );
    let bad = cloud.dir.path().join("bad.json");
    std::fs::write(&bad, "{\"x\": 1}").unwrap();
    let e = cloud.fails(&[
        "deployment",
        "apply",
        "--device",
        "edge1",
        "--manifest",
        bad.to_str().unwrap(),
    ]);
    assert!(e.contains("not a deployment manifest"), "{e}");

    // The agent's reported properties, sent by a module client as $edgeAgent.
    let agent_key: Value =
        serde_json::from_str(&cloud.ok(&["modules", "list", "--device", "edge1", "-o", "json"]))
            .unwrap();
    let key = agent_key
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["moduleId"] == "$edgeAgent")
        .unwrap()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent = ModuleClient::from_connection_string_with(
        &format!("HostName=localhost;DeviceId=edge1;ModuleId=$edgeAgent;SharedAccessKey={key}"),
        Some(&cloud.ca_pem()),
        cloud.opts(),
    )
    .await
    .unwrap();
    agent
        .patch_reported(&json!({
            "lastDesiredVersion": 1,
            "lastDesiredStatus": {"code": 200, "description": ""},
            "systemModules": {
                "edgeAgent": {"runtimeStatus": "running"},
                "edgeHub": {"runtimeStatus": "running", "restartCount": 0}
            },
            "modules": {"sensor": {"runtimeStatus": "backoff", "exitCode": 1, "restartCount": 2, "statusDescription": "exited"}}
        }))
        .await
        .unwrap();
    let st = cloud.ok(&["deployment", "status", "--device", "edge1"]);
    assert!(st.lines().next().unwrap().contains(": 200"), "{st}");
    let sensor = line_with(&st, "sensor");
    assert!(
        sensor.contains("backoff") && sensor.contains("exited"),
        "{st}"
    );
    assert_eq!(
        column(&st[st.find("MODULE").unwrap()..], "STATUS"),
        line_with(&st, "edgeHub").find("running").unwrap()
    );
    let js: Value = serde_json::from_str(&cloud.ok(&[
        "deployment",
        "status",
        "--device",
        "edge1",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(js["lastDesiredStatus"]["code"], json!(200));
    assert_eq!(js["modules"].as_array().unwrap().len(), 3);
    assert!(
        st.contains("Routes: desired version 1; the hub has reported nothing yet"),
        "{st}"
    );

    // The hub refuses the deployment's routes (as verge-hub reports it on
    // its own twin): the status shows the refusal, not only the agent's 200.
    let hub_key = agent_key
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["moduleId"] == "$edgeHub")
        .unwrap()["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let hub = ModuleClient::from_connection_string_with(
        &format!("HostName=localhost;DeviceId=edge1;ModuleId=$edgeHub;SharedAccessKey={hub_key}"),
        Some(&cloud.ca_pem()),
        cloud.opts(),
    )
    .await
    .unwrap();
    let why = "invalid routes: route \"bad\": expected FROM at 1:1";
    hub.patch_reported(&json!({
        "schemaVersion": "1.0",
        "lastDesiredStatus": {"code": 400, "description": why}
    }))
    .await
    .unwrap();
    let st = cloud.ok(&["deployment", "status", "--device", "edge1"]);
    assert!(
        line_with(&st, "Routes:").contains(&format!(": 400 {why}")),
        "{st}"
    );
    let js: Value = serde_json::from_str(&cloud.ok(&[
        "deployment",
        "status",
        "--device",
        "edge1",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        js["edgeHub"]["lastDesiredStatus"],
        json!({"code": 400, "description": why})
    );
    assert_eq!(js["edgeHub"]["desiredVersion"], json!(1));
    hub.close();

    // ---- messages -------------------------------------------------------------
    let leaf_show = cloud.ok(&["devices", "show", "leaf1"]);
    let leaf_cs = device_cs(&leaf_show);
    let dev =
        DeviceClient::from_connection_string_with(&leaf_cs, Some(&cloud.ca_pem()), cloud.opts())
            .await
            .unwrap();
    let mut m = Message::new(r#"{"t":21.5}"#);
    m.properties.insert("kind", "reading");
    dev.send_event(m).await.unwrap();
    dev.send_event(Message::new(vec![0xffu8, 0x00]))
        .await
        .unwrap();
    let tail = cloud.ok(&["messages", "tail"]);
    let first = line_with(&tail, "leaf1");
    assert!(
        first.contains("[kind=reading]") && first.ends_with(r#"{"t":21.5}"#),
        "{tail}"
    );
    assert!(tail.contains("<2 bytes, not UTF-8"), "{tail}");
    let json_lines = cloud.ok(&["messages", "tail", "--from", "1", "-o", "json"]);
    assert_eq!(json_lines.lines().count(), 1, "{json_lines}");
    let v: Value = serde_json::from_str(json_lines.trim()).unwrap();
    assert_eq!(v["offset"], json!(1));

    // -f keeps the stream open: a message sent afterwards shows up.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["cloud", "messages", "tail", "-f", "--from", "2"])
        .env("VERGE_CLOUD_CONNECTION_STRING", cloud.connection_string())
        .env("VERGE_CLOUD_CA", cloud.ca())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.send_event(Message::new("later")).await.unwrap();
    let stdout = follow.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().unwrap().unwrap()
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .unwrap()
        .unwrap();
    assert!(line.ends_with("leaf1  later"), "{line}");
    follow.kill().unwrap();
    follow.wait().unwrap();

    // ---- methods ----------------------------------------------------------------
    dev.on_method(|req| async move { (201, json!({"echo": req.payload, "name": req.name})) })
        .await
        .unwrap();
    let r: Value = serde_json::from_str(&cloud.ok(&[
        "method",
        "invoke",
        "--device",
        "leaf1",
        "ping",
        "--payload",
        r#"{"n":1}"#,
    ]))
    .unwrap();
    assert_eq!(
        r,
        json!({"status": 201, "payload": {"echo": {"n": 1}, "name": "ping"}})
    );
    let e = cloud.fails(&[
        "method",
        "invoke",
        "--device",
        "edge1",
        "--module",
        "nope",
        "ping",
        "--timeout",
        "5",
    ]);
    assert!(e.contains("method ping on edge1/nope"), "{e}");

    // ---- C2D ------------------------------------------------------------------------
    let mut c2d = dev.c2d_messages().await.unwrap();
    let id = cloud.ok(&[
        "c2d",
        "send",
        "--device",
        "leaf1",
        "hello",
        "-p",
        "color=blue",
        "-p",
        "kitToken=K1&2",
        "--ack",
        "full",
    ]);
    assert!(!id.trim().is_empty());
    let got = tokio::time::timeout(Duration::from_secs(20), c2d.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.body[..], b"hello");
    assert_eq!(got.properties.get("color"), Some("blue"));
    // Names keep their case (they are not HTTP header names on the way).
    assert_eq!(got.properties.get("kitToken"), Some("K1&2"));
    let e = cloud.fails(&["c2d", "send", "--device", "leaf1", "x", "-p", "novalue"]);
    assert!(e.contains("key=value"), "{e}");

    // ---- delete ---------------------------------------------------------------------
    dev.close();
    agent.close();
    let out = cloud.ok(&["devices", "delete", "leaf1"]);
    assert!(out.contains("Deleted leaf1"), "{out}");
    let e = cloud.fails(&["devices", "show", "leaf1"]);
    assert!(e.contains("not found"), "{e}");
}

/// A verged config whose upstream is `cloud` (as quickstart writes it:
/// hub `localhost`, the cloud's MQTT port and CA for the agent).
fn edge_config(dir: &std::path::Path, cloud: &Cloud, ca: &std::path::Path) -> PathBuf {
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "hostname = \"edge1\"\nhomedir = '{home}'\ntrust_bundle_cert = '{ca}'\n\n\
             [provisioning]\nsource = \"manual\"\n\
             connection_string = \"HostName=localhost;DeviceId=edge1;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==\"\n\
             https_port = {https}\n\n\
             [agent]\nname = \"edgeAgent\"\ntype = \"process\"\n[agent.config]\nimage = \"/bin/true\"\n\
             [agent.env]\nVERGE_AGENT_UPSTREAM_PORT = \"{mqtt}\"\n",
            home = dir.join("home").display(),
            ca = ca.display(),
            https = cloud.https,
            mqtt = cloud.mqtt,
        ),
    )
    .unwrap();
    cfg
}

/// `verge check` verifies the real upstream: TLS to the cloud's MQTT port
/// with the configured trust, and the clock against its `Date`; something
/// else answering there (another server, not the hub) is an error.
#[test]
fn check_verifies_the_upstream_over_tls() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().unwrap();
    let check = |cfg: &std::path::Path| -> Value {
        let o = Command::new(env!("CARGO_BIN_EXE_verge"))
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "check",
                "--output",
                "json",
            ])
            .env_remove("VERGE_HOST")
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)))
    };
    let find = |r: &Value, id: &str| -> Value {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id}: {r}"))
            .clone()
    };
    let cfg = edge_config(dir.path(), &cloud, &cloud.ca());
    let r = check(&cfg);
    let up = find(&r, "upstream-connectivity");
    assert_eq!(up["result"], "ok", "{up}");
    assert!(
        up["details"][0]
            .as_str()
            .unwrap()
            .contains(&format!("localhost:{}", cloud.mqtt)),
        "{up}"
    );
    let skew = find(&r, "clock-skew");
    assert_eq!(skew["result"], "ok", "{skew}");
    assert_eq!(find(&r, "parent-connectivity")["result"], "skipped");

    // Another server on that port (its certificate chains to a CA that is
    // not the configured trust): an error, not "reachable".
    let other = Cloud::start_as("other.example");
    let other_dir = tempfile::tempdir().unwrap();
    let mut wrong = edge_config(other_dir.path(), &other, &cloud.ca());
    let up = find(&check(&wrong), "upstream-connectivity");
    assert_eq!(up["result"], "error", "{up}");
    assert!(
        up["details"][0]
            .as_str()
            .unwrap()
            .contains("not as the IoT hub"),
        "{up}"
    );
    // Without a trust for the cloud's CA it is an error too.
    std::fs::write(other_dir.path().join("empty.pem"), "").unwrap();
    wrong = edge_config(
        other_dir.path(),
        &cloud,
        &other_dir.path().join("empty.pem"),
    );
    let up = find(&check(&wrong), "upstream-connectivity");
    assert_eq!(up["result"], "error", "{up}");

    // AMQP over WebSocket: the check goes the hub's way (TLS, then the
    // WebSocket upgrade, subprotocol AMQPWSB10, on verge-cloud's HTTPS port).
    let ws_dir = tempfile::tempdir().unwrap();
    let ws = edge_config(ws_dir.path(), &cloud, &cloud.ca());
    let text = std::fs::read_to_string(&ws).unwrap().replace(
        &format!("VERGE_AGENT_UPSTREAM_PORT = \"{}\"", cloud.mqtt),
        &format!(
            "VERGE_AGENT_UPSTREAM_PORT = \"{}\"\nUpstreamProtocol = \"AmqpWs\"",
            cloud.https
        ),
    );
    std::fs::write(&ws, text).unwrap();
    let up = find(&check(&ws), "upstream-connectivity");
    assert_eq!(up["result"], "ok", "{up}");
    let detail = up["details"][0].as_str().unwrap();
    assert!(
        detail.contains("AmqpWs")
            && detail.contains(&format!(
                "wss://localhost:{}/$iothub/websocket",
                cloud.https
            )),
        "{up}"
    );

    // A nested edge checks its parent too.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "hostname = \"edge1\"",
        "hostname = \"edge1\"\nparent_hostname = \"localhost\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let parent = find(&check(&cfg), "parent-connectivity");
    assert_eq!(parent["result"], "ok", "{parent}");
}

/// `verge cloud dps …` against verge-cloud's DPS service API: enrollments
/// and groups created, listed, shown and deleted; derived keys; errors.
#[test]
fn dps_enrollments_through_the_cli() {
    let cloud = Cloud::start();
    let key = "AAECAwQFBgcICQoLDA0ODw==";
    let out = cloud.ok(&[
        "dps",
        "enrollment",
        "create",
        "dev-1",
        "--primary-key",
        key,
        "--reset-on-reprovision",
        "--initial-twin",
        r#"{"tags":{"site":"lab"}}"#,
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["registrationId"], "dev-1", "{v}");
    assert_eq!(v["attestation"]["symmetricKey"]["primaryKey"], key, "{v}");
    assert_eq!(v["reprovisionPolicy"]["migrateDeviceData"], false, "{v}");
    assert_eq!(v["initialTwin"]["tags"]["site"], "lab", "{v}");
    // The secondary key was generated.
    assert!(
        v["attestation"]["symmetricKey"]["secondaryKey"]
            .as_str()
            .is_some_and(|k| k.len() >= 40),
        "{v}"
    );
    cloud.ok(&[
        "dps",
        "group",
        "create",
        "line-1",
        "--edge",
        "--primary-key",
        key,
    ]);
    let list = cloud.ok(&["dps", "group", "list"]);
    let row = line_with(&list, "line-1");
    assert!(
        row.contains("enabled") && row.contains("true") && row.contains("keep"),
        "{list}"
    );
    let list = cloud.ok(&["dps", "enrollment", "list"]);
    assert!(line_with(&list, "dev-1").contains("reset"), "{list}");
    let shown: Value =
        serde_json::from_str(&cloud.ok(&["dps", "group", "show", "line-1"])).unwrap();
    assert_eq!(shown["capabilities"]["iotEdge"], true, "{shown}");
    // The device key of a group member (python's hmac gives the same).
    let derived = cloud.ok(&["dps", "derive-key", key, "dev-1"]);
    assert_eq!(
        derived.trim(),
        "I6wj/zJDkG6Ta/Wc6A5aw/nV0gAkdMKN32/YWUcI028="
    );
    // Errors come back with the service's reason.
    let e = cloud.fails(&["dps", "enrollment", "create", "Bad_Upper"]);
    assert!(e.contains("registration id"), "{e}");
    let e = cloud.fails(&["dps", "registration", "dev-1"]);
    assert!(
        e.contains("404")
            || e.to_lowercase().contains("not found")
            || e.contains("no registration"),
        "{e}"
    );
    // X.509 attestation: a device's certificate, a group's CA certificate.
    let dir = tempfile::tempdir().unwrap();
    let ca = verge_testkit::x509::root("Line CA");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let device = verge_testkit::x509::leaf("dev-x", Some(&ca), false, (-1, 30));
    let [device_pem, _] = device.write(dir.path(), "dev-x");
    let out = cloud.ok(&[
        "dps",
        "enrollment",
        "create",
        "dev-x",
        "--certificate",
        device_pem.to_str().unwrap(),
    ]);
    assert!(
        out.contains("primary certificate: CN=dev-x (SHA-256 ")
            && out.contains(&verge_x509::thumbprints(&device.der).1),
        "{out}"
    );
    let ca_pem = dir.path().join("ca.pem");
    let shown = cloud.ok(&[
        "dps",
        "group",
        "create",
        "line-x",
        "--certificate",
        ca_pem.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        v["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["subjectName"],
        "CN=Line CA",
        "{v}"
    );
    // A device's certificate cannot sign a group's devices.
    let e = cloud.fails(&[
        "dps",
        "group",
        "create",
        "line-y",
        "--certificate",
        device_pem.to_str().unwrap(),
    ]);
    assert!(e.contains("not a CA certificate"), "{e}");
    let e = cloud.fails(&[
        "dps",
        "enrollment",
        "create",
        "dev-y",
        "--certificate",
        device_pem.to_str().unwrap(),
        "--primary-key",
        key,
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    cloud.ok(&["dps", "enrollment", "delete", "dev-1"]);
    let e = cloud.fails(&["dps", "enrollment", "show", "dev-1"]);
    assert!(e.contains("dev-1"), "{e}");
    cloud.ok(&["dps", "group", "delete", "line-1"]);
    assert!(!cloud.ok(&["dps", "group", "list"]).contains("line-1"));
}

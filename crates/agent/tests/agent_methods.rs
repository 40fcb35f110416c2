//! edgeAgent's built-in direct methods end to end: the official Azure IoT
//! Hub service SDK for Python (`invoke_device_module_method`, unmodified)
//! invokes them on `$edgeAgent` through verge-cloud; the real agent (run by
//! the real verged, process backend) answers through the management API.
//!
//! Checked: `ping` (any case); an unknown method is 400 naming all six;
//! `GetModuleLogs` with `tail` (also of the agent itself), with `regex` + `loglevel` as gzipped JSON
//! (decoded here), and 400 over the 127,000-byte cap; malformed payloads
//! 400, a foreign `schemaVersion` 500; `RestartModule` restarts the module
//! (a new process) and 500 for an unknown one; `UploadModuleLogs` and
//! `UploadSupportBundle` to a SAS URL of verge-cloud's blob endpoint run as
//! tasks whose `GetTaskStatus` reaches `Completed`, and the blobs arrive
//! (text logs, gzipped JSON logs, a `.tar.gz` bundle with the module's log);
//! an unknown correlation id is `Unknown`.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use support::*;

/// A module printing log lines in the recommended `<N> text` format, then sleeping.
fn talker(out: &Path) -> Value {
    let d = out.display();
    let script = format!(
        "echo $$ > {d}/talker.pid.tmp && mv {d}/talker.pid.tmp {d}/talker.pid; \
         i=1; while [ $i -le 20 ]; do echo \"<6> info line $i\"; i=$((i+1)); done; \
         echo '<3> error: disk full'; echo '<4> warning: cpu hot'; exec sleep 600"
    );
    json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
        "settings": { "image": "/bin/sh", "createOptions": json!({ "Cmd": ["-c", script] }).to_string() }
    })
}

/// A module printing about 200 KB of log, then sleeping.
fn chatty(out: &Path) -> Value {
    let d = out.display();
    let script = format!(
        "echo $$ > {d}/chatty.pid.tmp && mv {d}/chatty.pid.tmp {d}/chatty.pid; \
         i=0; while [ $i -lt 2000 ]; do echo \"<6> chatty line $i ..........................................................................................\"; i=$((i+1)); done; \
         exec sleep 600"
    );
    json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
        "settings": { "image": "/bin/sh", "createOptions": json!({ "Cmd": ["-c", script] }).to_string() }
    })
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// verge-cloud's blob endpoint over HTTPS with the service policy.
struct Blobs {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Blobs {
    fn new(service_cs: &str, ca: &Path) -> Self {
        let field = |k: &str| {
            service_cs
                .split(';')
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        let host = field("HostName=");
        let key = verge_core::SharedAccessKey::from_base64(&field("SharedAccessKey=")).unwrap();
        let token =
            verge_core::SasToken::sign(&host, &key, 4_000_000_000, Some("iothubowner")).to_string();
        let ca = std::fs::read_to_string(ca).unwrap();
        let tls = verge_sdk::upstream_tls_config(&[ca.as_str()]).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            http,
            base: format!("https://{host}"),
            token,
        }
    }

    async fn sas_url(&self, container: &str) -> String {
        let v: Value = self
            .http
            .post(format!("{}/verge/sas/{container}", self.base))
            .header("Authorization", &self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["sasUrl"].as_str().unwrap().to_owned()
    }

    async fn list(&self, container: &str) -> Vec<Value> {
        let v: Value = self
            .http
            .get(format!("{}/verge/blobs/{container}", self.base))
            .header("Authorization", &self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["blobs"].as_array().cloned().unwrap_or_default()
    }

    async fn get(&self, container: &str, name: &str) -> Vec<u8> {
        let r = self
            .http
            .get(format!("{}/verge/blobs/{container}/{name}", self.base))
            .header("Authorization", &self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        r.bytes().await.unwrap().to_vec()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_agent_methods_through_the_service_sdk() {
    let mut h = Harness::start().await;
    let out = h.out.clone();
    h.sdk(
        json!({"op": "apply", "device": DEVICE, "modules_content": modules_content(
        &out, json!({ "talker": talker(&out), "chatty": chatty(&out) }))}),
    )
    .await;
    let talker_pid = h.running_pid("talker", None).await;
    h.running_pid("chatty", None).await;
    h.running_pid("edgeHub", None).await;
    wait_until(
        "the deployment reported 200",
        Duration::from_secs(90),
        async || {
            let t = h.agent_twin().await;
            (t["reported"]["lastDesiredStatus"]["code"] == 200).then_some(())
        },
    )
    .await;

    let call = async |name: &str, payload: Value| -> (i64, Value) {
        let r = h
            .sdk(
                json!({"op": "invoke", "device": DEVICE, "module": "$edgeAgent",
                        "method": name, "payload": payload, "timeout": 60}),
            )
            .await;
        (r["status"].as_i64().unwrap(), r["payload"].clone())
    };

    // ---- ping and the names ---------------------------------------------------
    assert_eq!(call("ping", Value::Null).await, (200, Value::Null));
    assert_eq!(call("PING", json!({})).await, (200, Value::Null));
    let (s, p) = call("Reboot", json!({})).await;
    assert_eq!(s, 400);
    assert_eq!(
        p["message"],
        "Command 'Reboot' not found. The supported commands are - ping, RestartModule, \
         GetModuleLogs, UploadModuleLogs, UploadSupportBundle, GetTaskStatus"
    );

    // ---- GetModuleLogs ----------------------------------------------------------
    // The module may still be printing: wait for its last line.
    let tail = wait_until("talker's last line", Duration::from_secs(30), async || {
        let (s, p) = call(
            "getmodulelogs",
            json!({"schemaVersion": "1.0", "items": [{"id": "^talker$", "filter": {"tail": 5}}],
                   "encoding": "none", "contentType": "text"}),
        )
        .await;
        assert_eq!(s, 200, "{p}");
        let text = p[0]["payload"].as_str().unwrap_or_default().to_owned();
        text.ends_with("<4> warning: cpu hot\n").then_some(p)
    })
    .await;
    assert_eq!(tail.as_array().unwrap().len(), 1, "{tail}");
    assert_eq!(tail[0]["id"], "talker");
    assert_eq!(tail[0]["payloadBytes"], Value::Null);
    assert_eq!(
        tail[0]["payload"],
        "<6> info line 18\n<6> info line 19\n<6> info line 20\n<3> error: disk full\n<4> warning: cpu hot\n"
    );

    // The agent's own log (verged's process agent is no module, as edgeAgent is).
    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0", "items": [{"id": "^edgeagent$", "filter": {"tail": 3}}]}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p[0]["id"], "edgeAgent", "{p}");
    assert_eq!(p[0]["payload"].as_str().unwrap().lines().count(), 3, "{p}");

    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0",
               "items": {"id": "TALK", "filter": {"regex": "disk|cpu", "loglevel": 3}},
               "encoding": "gzip", "contentType": "json"}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p[0]["payload"], Value::Null);
    let z = base64::engine::general_purpose::STANDARD
        .decode(p[0]["payloadBytes"].as_str().unwrap())
        .unwrap();
    let lines: Value = serde_json::from_slice(&gunzip(&z)).unwrap();
    assert_eq!(lines.as_array().unwrap().len(), 1, "{lines}");
    assert_eq!(lines[0]["text"], "error: disk full");
    assert_eq!(lines[0]["loglevel"], 3);
    assert_eq!(lines[0]["id"], "talker");
    assert_eq!(lines[0]["device"], DEVICE);
    assert!(lines[0]["timestamp"].is_string(), "{lines}");

    // Over the cap: 400; with a tail the same module fits.
    wait_until(
        "chatty's log to be long",
        Duration::from_secs(30),
        async || {
            let (s, p) = call(
                "GetModuleLogs",
                json!({"schemaVersion": "1.0", "items": [{"id": "chatty"}], "contentType": "text"}),
            )
            .await;
            (s == 400).then_some(p)
        },
    )
    .await;
    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0", "items": [{"id": "chatty"}], "contentType": "text"}),
    )
    .await;
    assert_eq!(s, 400);
    assert!(p["message"].as_str().unwrap().contains("127000"), "{p}");
    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0", "items": [{"id": "chatty", "filter": {"tail": 10}}]}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p[0]["payload"].as_str().unwrap().lines().count(), 10);

    // ---- wrong payloads -----------------------------------------------------------
    let (s, p) = call("RestartModule", Value::Null).await;
    assert_eq!(
        (s, &p["message"]),
        (400, &json!("Request payload not found"))
    );
    let (s, p) = call("GetModuleLogs", json!({"schemaVersion": "1.0", "items": 5})).await;
    assert_eq!(s, 400, "{p}");
    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0", "items": [{"id": "("}]}),
    )
    .await;
    assert_eq!(s, 400, "{p}");
    let (s, p) = call(
        "GetModuleLogs",
        json!({"schemaVersion": "1.0", "items": [{"id": "all"}], "encoding": "brotli"}),
    )
    .await;
    assert_eq!(s, 400, "{p}");
    let (s, p) = call(
        "RestartModule",
        json!({"schemaVersion": "2.0", "id": "talker"}),
    )
    .await;
    assert_eq!(s, 500, "{p}");

    // ---- RestartModule ---------------------------------------------------------------
    let (s, p) = call(
        "RestartModule",
        json!({"schemaVersion": "1.0", "id": "nosuch"}),
    )
    .await;
    assert_eq!(s, 500, "{p}");
    assert!(p["message"].as_str().unwrap().contains("nosuch"), "{p}");
    let (s, p) = call(
        "RestartModule",
        json!({"schemaVersion": "1.0", "id": "talker"}),
    )
    .await;
    assert_eq!((s, &p), (200, &Value::Null));
    // A new process (the harness's cleanup finds it in verged's state).
    wait_until("talker to run again", Duration::from_secs(60), async || {
        read_pid(&out, "talker").filter(|p| *p != talker_pid && alive(*p))
    })
    .await;

    // ---- UploadModuleLogs --------------------------------------------------------------
    let blobs = Blobs::new(&h.service_cs, &h.cloud_ca);
    let sas = blobs.sas_url("edgelogs").await;
    let status = async |id: &str| -> Value {
        let (s, p) = call(
            "GetTaskStatus",
            json!({"schemaVersion": "1.0", "correlationId": id}),
        )
        .await;
        assert_eq!(s, 200, "{p}");
        p
    };
    let complete = async |p: Value| {
        assert_eq!(p["message"], "", "{p}");
        let id = p["correlationId"].as_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{p}");
        wait_until(
            "the task to complete",
            Duration::from_secs(60),
            async || {
                let st = status(&id).await;
                assert_ne!(st["status"], "Failed", "{st}");
                (st["status"] == "Completed").then_some(())
            },
        )
        .await;
    };
    let (s, p) = call(
        "UploadModuleLogs",
        json!({"schemaVersion": "1.0", "sasUrl": sas,
               "items": [{"id": "^talker$", "filter": {"tail": 3}}], "contentType": "text"}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    complete(p).await;
    let (s, p) = call(
        "uploadmodulelogs",
        json!({"schemaVersion": "1.0", "sasUrl": sas, "encoding": "gzip", "contentType": "json",
               "items": [{"id": "^talker$", "filter": {"regex": "cpu"}}]}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    complete(p).await;
    let list = blobs.list("edgelogs").await;
    let prefix = "127.0.0.1/edge1/talker-";
    let text = list
        .iter()
        .find(|b| {
            let n = b["name"].as_str().unwrap();
            n.starts_with(prefix) && n.ends_with(".log")
        })
        .unwrap_or_else(|| panic!("no text log blob: {list:?}"));
    assert_eq!(text["contentType"], "text/plain");
    let body = blobs.get("edgelogs", text["name"].as_str().unwrap()).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(body.lines().count(), 3, "{body}");
    assert!(body.ends_with("<4> warning: cpu hot\n"), "{body}");
    let json_blob = list
        .iter()
        .find(|b| b["name"].as_str().unwrap().ends_with(".json.gz"))
        .unwrap_or_else(|| panic!("no JSON log blob: {list:?}"));
    assert_eq!(json_blob["contentEncoding"], "gzip");
    assert_eq!(json_blob["contentType"], "application/json");
    let body = blobs
        .get("edgelogs", json_blob["name"].as_str().unwrap())
        .await;
    let lines: Value = serde_json::from_slice(&gunzip(&body)).unwrap();
    assert_eq!(lines[0]["text"], "warning: cpu hot", "{lines}");

    // ---- UploadSupportBundle -------------------------------------------------------------
    let (s, p) = call(
        "UploadSupportBundle",
        json!({"sasUrl": sas, "since": "1h", "edgeRuntimeOnly": false}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    complete(p).await;
    let list = blobs.list("edgelogs").await;
    let bundle = list
        .iter()
        .find(|b| {
            let n = b["name"].as_str().unwrap();
            n.starts_with("127.0.0.1/edge1/support-bundle-") && n.ends_with(".tar.gz")
        })
        .unwrap_or_else(|| panic!("no bundle blob: {list:?}"));
    let body = blobs
        .get("edgelogs", bundle["name"].as_str().unwrap())
        .await;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(body.as_slice()));
    let mut names = Vec::new();
    let mut talker_log = String::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name == "logs/talker_log.txt" {
            e.read_to_string(&mut talker_log).unwrap();
        }
        names.push(name);
    }
    assert!(names.contains(&"modules.json".to_owned()), "{names:?}");
    assert!(talker_log.contains("<3> error: disk full"), "{talker_log}");
    assert!(!talker_log.contains(KEY));

    // A bad sasUrl is refused at once; an unknown task is Unknown.
    let (s, p) = call("UploadSupportBundle", json!({"sasUrl": "ftp://x/y"})).await;
    assert_eq!(s, 400, "{p}");
    let st = status("00000000-0000-0000-0000-000000000000").await;
    assert_eq!(st["status"], "Unknown", "{st}");
}

//! End to end with the cloud: a deployment applied in verge-cloud with the
//! official Azure IoT Hub service SDK for Python reaches verge-agent (run by
//! the real `verged`, process backend) through its `$edgeAgent` module twin,
//! and the agent's status comes back as that twin's reported properties.
//!
//! Identity: verged derives each module's key from the device key
//! (`derive_module_key(moduleId, generationId)`) and signs the agent's tokens
//! through the workload API; verge-cloud checks module tokens against the
//! keys registered for the module. verged registers its module identities
//! in the cloud itself, as the device, on the cloud's HTTPS port
//! (`[provisioning] https_port`) — what Azure's identity service does.
//! verged trusts verge-cloud's CA through `trust_bundle_cert`, so the agent
//! gets it from the workload API's trust bundle; the cloud's MQTT port goes to
//! the agent through verged's `[agent.env]` (`VERGE_AGENT_UPSTREAM_PORT`).
//!
//! Checked: both script modules start (verged's management API); the twin's
//! reported properties show `lastDesiredStatus.code` 200, the desired
//! `$version` and both modules running; an update removing one module removes
//! it and the reported properties drop it; direct methods to `$edgeAgent` are
//! answered at once (`ping` 200, an unknown one 400 naming the supported
//! methods) through the service SDK; a stopped agent reports 406; with
//! verge-cloud stopped, verged and the agent started again restore the
//! remaining modules from the persisted manifest.
//!
//! Everything binds 127.0.0.1; every process started is killed on drop (also
//! on failure) and every wait is bounded.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_from_verge_cloud_reaches_the_agent_and_status_comes_back() {
    // ---- the cloud, the device, verged and its agent --------------------------
    let mut h = Harness::start().await;
    let out = h.out.clone();
    let mgmt = h.mgmt.clone();

    // Before any deployment, the agent reports "no deployment" (417) upstream:
    // the link works both ways before anything is deployed.
    wait_until(
        "417 reported to the cloud",
        Duration::from_secs(60),
        async || {
            let t = h.agent_twin().await;
            (t["reported"]["lastDesiredStatus"]["code"] == 417).then_some(())
        },
    )
    .await;

    // ---- a deployment with two script modules ----------------------------------
    h.sdk(
        json!({"op": "apply", "device": DEVICE, "modules_content": modules_content(
        &out, json!({ "modA": sh(&out, "modA"), "modB": sh(&out, "modB") }))}),
    )
    .await;
    let a1 = h.running_pid("modA", None).await;
    let b1 = h.running_pid("modB", None).await;
    let hub = h.running_pid("edgeHub", None).await;
    wait_until(
        "verged to run edgeHub, modA and modB",
        Duration::from_secs(30),
        async || {
            let m = verged_modules(&mgmt).await?;
            let want: Vec<(String, String)> = ["edgeHub", "modA", "modB"]
                .iter()
                .map(|n| ((*n).to_owned(), "running".to_owned()))
                .collect();
            (m == want).then_some(())
        },
    )
    .await;
    let twin = wait_until(
        "200 and both modules running in the reported properties",
        Duration::from_secs(60),
        async || {
            let t = h.agent_twin().await;
            let r = &t["reported"];
            (r["lastDesiredStatus"]["code"] == 200
                && r["modules"]["modA"]["runtimeStatus"] == "running"
                && r["modules"]["modB"]["runtimeStatus"] == "running")
                .then_some(t)
        },
    )
    .await;
    let r = &twin["reported"];
    assert_eq!(
        r["lastDesiredVersion"], twin["desired"]["$version"],
        "{twin}"
    );
    assert_eq!(r["schemaVersion"], "1.0", "{r}");
    assert_eq!(
        r["systemModules"]["edgeHub"]["runtimeStatus"], "running",
        "{r}"
    );
    assert_eq!(
        r["systemModules"]["edgeAgent"]["runtimeStatus"], "running",
        "{r}"
    );
    assert_eq!(r["runtime"]["settings"]["minDockerVersion"], "v1.25", "{r}");
    assert_eq!(r["modules"]["modA"]["settings"]["image"], "/bin/sh", "{r}");
    assert_eq!(twin["connection_state"], "Connected", "{twin}");
    // ---- direct methods to $edgeAgent: answered at once, never a timeout ------
    let method = async |name: &str| {
        let start = Instant::now();
        let r = h
            .sdk(
                json!({"op": "invoke", "device": DEVICE, "module": "$edgeAgent",
                        "method": name, "timeout": 20}),
            )
            .await;
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "{name} took {took:?}: {r}");
        r
    };
    assert_eq!(
        method("ping").await,
        json!({"status": 200, "payload": null})
    );
    let m = method("NoSuchMethod").await;
    assert_eq!(m["status"], 400, "{m}");
    assert_eq!(
        m["payload"]["message"],
        "Command 'NoSuchMethod' not found. The supported commands are - ping, RestartModule, \
         GetModuleLogs, UploadModuleLogs, UploadSupportBundle, GetTaskStatus",
        "{m}"
    );

    // the same document as reported.json (once the file has caught up)
    let reported_file = h.dir.path().join("agent/reported.json");
    let file: Value = serde_json::from_slice(&std::fs::read(&reported_file).unwrap()).unwrap();
    assert_eq!(file["lastDesiredVersion"], r["lastDesiredVersion"]);

    // ---- an update without modB: removed, and dropped from the twin ------------
    h.sdk(
        json!({"op": "apply", "device": DEVICE, "modules_content": modules_content(
        &out, json!({ "modA": sh(&out, "modA") }))}),
    )
    .await;
    wait_until(
        "modB removed from verged",
        Duration::from_secs(60),
        async || {
            let (s, _) = get_json(&mgmt, &format!("/modules/modB?{MV}")).await?;
            (s == 404).then_some(())
        },
    )
    .await;
    wait_until(
        "modB's process to end",
        Duration::from_secs(30),
        async || (!alive(b1)).then_some(()),
    )
    .await;
    let twin = wait_until(
        "the update reported (modB gone, 200)",
        Duration::from_secs(60),
        async || {
            let t = h.agent_twin().await;
            let r = &t["reported"];
            (r["lastDesiredStatus"]["code"] == 200
                && r["lastDesiredVersion"] == t["desired"]["$version"]
                && r["modules"].get("modB").is_none()
                && r["modules"]["modA"]["runtimeStatus"] == "running")
                .then_some(t)
        },
    )
    .await;
    assert!(twin["desired"]["modules"].get("modB").is_none(), "{twin}");
    assert!(alive(a1) && alive(hub), "modA and edgeHub were left alone");
    assert_eq!((runs(&out, "modA"), runs(&out, "edgeHub")), (1, 1));

    // ---- a refused deployment changes nothing but the status -------------------
    // (verge-cloud refuses such a deployment itself, so the twin is patched)
    h.sdk(
        json!({"op": "patch_desired", "device": DEVICE, "module": "$edgeAgent",
                 "desired": {"schemaVersion": "2.0"}}),
    )
    .await;
    wait_until("412 reported", Duration::from_secs(60), async || {
        let t = h.agent_twin().await;
        (t["reported"]["lastDesiredStatus"]["code"] == 412).then_some(())
    })
    .await;
    assert!(
        alive(a1) && alive(hub),
        "a refused deployment stopped modules"
    );
    // and the good one back (what the device runs after the reboot below)
    h.sdk(
        json!({"op": "apply", "device": DEVICE, "modules_content": modules_content(
        &out, json!({ "modA": sh(&out, "modA") }))}),
    )
    .await;
    wait_until("200 again", Duration::from_secs(60), async || {
        let t = h.agent_twin().await;
        (t["reported"]["lastDesiredStatus"]["code"] == 200).then_some(())
    })
    .await;

    // ---- a stopped agent says so upstream --------------------------------------
    h.stop_verged().await;
    let t = h.agent_twin().await;
    assert_eq!(
        t["reported"]["lastDesiredStatus"],
        json!({"code": 406, "description": "Agent is not running"}),
        "{t}"
    );

    // ---- offline reboot: no cloud, the modules come back from the persisted manifest
    if let Some(mut c) = h.cloud.take() {
        kill(
            Pid::from_raw(i32::try_from(c.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_until("verge-cloud to exit", Duration::from_secs(30), async || {
            c.try_wait().unwrap()
        })
        .await;
        assert!(status.success(), "verge-cloud exited with {status}");
    }
    // A reboot ends every module process (verged may leave them running).
    let mut pids = h.seen.clone();
    pids.extend(module_pids_from_state(&h.home));
    kill_recorded(&pids);
    wait_until(
        "the modules to be gone",
        Duration::from_secs(10),
        async || (!alive(a1) && !alive(hub)).then_some(()),
    )
    .await;
    h.start_verged();
    let a2 = h.running_pid("modA", Some(a1)).await;
    let hub2 = h.running_pid("edgeHub", Some(hub)).await;
    wait_until(
        "verged to run edgeHub and modA again",
        Duration::from_secs(30),
        async || {
            let m = verged_modules(&mgmt).await?;
            (m.iter().any(|(n, s)| n == "modA" && s == "running")
                && m.iter().any(|(n, s)| n == "edgeHub" && s == "running"))
            .then_some(m)
        },
    )
    .await;
    let reported_ok = wait_until(
        "reported.json 200 offline",
        Duration::from_secs(30),
        async || {
            let v: Value = serde_json::from_slice(&std::fs::read(&reported_file).ok()?).ok()?;
            (v["lastDesiredStatus"]["code"] == 200).then_some(v)
        },
    )
    .await;
    assert!(
        reported_ok["modules"].get("modB").is_none(),
        "{reported_ok}"
    );
    assert!(
        read_pid(&out, "modB") == Some(b1) && !alive(b1),
        "modB came back"
    );
    assert!(alive(a2) && alive(hub2));

    // ---- clean stop: verged takes its agent down ---------------------------------
    let agents = children_named(h.verged_pid(), "verge-agent");
    h.stop_verged().await;
    for a in agents {
        wait_until(
            "the agent to be gone",
            Duration::from_secs(10),
            async || (!alive(a)).then_some(()),
        )
        .await;
    }
}

//! The agent against Docker with the locally built `verge-test/busybox:1`
//! image (see crates/runtime/tests/docker.rs). Skipped when Docker or the
//! image is missing, or with VERGE_SKIP_DOCKER_TESTS=1.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verge_agent::{Agent, AgentConfig, ReconcileOutcome};
use verge_runtime::{DockerConfig, DockerRuntime, ModuleRuntime, ModuleStatus};

const IMAGE: &str = verge_testkit::docker::TEST_IMAGE;

/// Every manifest has an `edgeHub`, and Docker container names are global:
/// the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn module(script: &str, extra: Value) -> Value {
    let opts = json!({ "Cmd": ["sh", "-c", script] });
    let mut m = json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "on-unhealthy",
        "imagePullPolicy": "never",
        "settings": { "image": IMAGE, "createOptions": opts.to_string() }
    });
    for (k, v) in extra.as_object().unwrap() {
        m.as_object_mut().unwrap().insert(k.clone(), v.clone());
    }
    m
}

#[tokio::test]
async fn unhealthy_module_is_restarted_and_updates_work() {
    let _serial = SERIAL.lock().await;
    if !verge_testkit::docker::ready() {
        return;
    }
    let suffix = format!(
        "{}{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() % 1000
    );
    let network = format!("verge-agent-test-{suffix}");
    let rt = Arc::new(DockerRuntime::new(DockerConfig {
        network: network.clone(),
        owner: format!("verge-agent-test-{suffix}"),
        stop_timeout: Duration::from_secs(1),
        ..DockerConfig::default()
    }));
    let sick = format!("sick{suffix}");
    let fine = format!("fine{suffix}");
    let sick_opts = json!({
        "Cmd": ["sh", "-c", "sleep 300"],
        "Healthcheck": { "Test": ["CMD", "false"], "Interval": 200_000_000,
                         "Timeout": 1_000_000_000, "Retries": 1 }
    });
    let mut modules = serde_json::Map::new();
    modules.insert(
        sick.clone(),
        module(
            "sleep 300",
            json!({"settings": {"image": IMAGE, "createOptions": sick_opts.to_string()}}),
        ),
    );
    modules.insert(fine.clone(), module("sleep 300", json!({})));
    let desired = json!({
        "schemaVersion": "1.1",
        "runtime": { "type": "docker" },
        "systemModules": {
            "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent" } },
            "edgeHub": { "type": "docker", "status": "stopped", "imagePullPolicy": "never",
                         "settings": { "image": IMAGE } }
        },
        "modules": modules
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(1),
        max_restarts: 5,
        report_interval: Duration::ZERO,
        tier_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(1),
        extra_env: BTreeMap::new(),
        ..AgentConfig::default()
    };
    let mut agent = Agent::open(rt.clone(), cfg, dir.path()).await.unwrap();
    agent.set_desired(&desired).await.unwrap();
    let end = Instant::now() + Duration::from_secs(40);
    let mut restarted = false;
    while Instant::now() < end {
        agent.reconcile().await;
        if agent.restart_record(&sick).is_some_and(|r| r.count >= 1) {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fine_state = rt.get(&fine).await.unwrap();
    let first_fine = fine_state.runtime_id.clone();
    assert!(restarted, "unhealthy module restarted by on-unhealthy");
    assert_eq!(fine_state.status, ModuleStatus::Running);
    assert_eq!(
        agent.reported()["modules"][&fine]["runtimeStatus"],
        "running"
    );
    assert!(agent.reported()["modules"][&fine]["settings"]["imageHash"].is_string());

    // Version change → container recreated.
    let mut d2 = desired.clone();
    d2["modules"][&fine]["version"] = json!("2.0");
    agent.set_desired(&d2).await.unwrap();
    agent.reconcile().await;
    let after = rt.get(&fine).await.unwrap();
    assert_ne!(after.runtime_id, first_fine);
    assert_eq!(after.status, ModuleStatus::Running);

    for s in rt.list().await.unwrap() {
        let _ = rt.remove(&s.spec.name).await;
    }
    let _ = Command::new("docker")
        .args(["network", "rm", &network])
        .output();
}

fn run(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A device reboot while offline: the agent is killed, every container
/// exits, one is even lost together with its image. A new agent, given no
/// manifest, restores the persisted one and brings the modules back tier by
/// tier: the tier-2 module is not started while the tier-1 module cannot run.
#[tokio::test]
async fn restarted_agent_brings_docker_modules_back_in_startup_order() {
    let _serial = SERIAL.lock().await;
    if !verge_testkit::docker::ready() {
        return;
    }
    let suffix = format!(
        "{}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let network = format!("verge-agent-order-{suffix}");
    let owner = format!("verge-agent-order-{suffix}");
    let rt = Arc::new(DockerRuntime::new(DockerConfig {
        network: network.clone(),
        owner: owner.clone(),
        stop_timeout: Duration::from_secs(1),
        ..DockerConfig::default()
    }));
    // The tier-1 module's own tag, so it can be lost without touching IMAGE.
    let first_image = format!("verge-test/order-{suffix}:1");
    let _cleanup = verge_testkit::docker::Leftovers {
        owner: owner.clone(),
        network: network.clone(),
        images: vec![first_image.clone()],
    };
    run(&["tag", IMAGE, &first_image]);
    let first = format!("first{suffix}");
    let second = format!("second{suffix}");
    let quick = json!({ "Cmd": ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"] }).to_string();
    let m = |image: &str, order: u32| {
        json!({
            "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
            "imagePullPolicy": "never", "startupOrder": order,
            "settings": { "image": image, "createOptions": quick }
        })
    };
    let mut modules = serde_json::Map::new();
    modules.insert(first.clone(), m(&first_image, 1));
    modules.insert(second.clone(), m(IMAGE, 2));
    let desired = json!({
        "schemaVersion": "1.1",
        "runtime": { "type": "docker" },
        "systemModules": {
            "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent" } },
            "edgeHub": m(IMAGE, 0)
        },
        "modules": modules
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(1),
        report_interval: Duration::ZERO,
        tier_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(1),
        ..AgentConfig::default()
    };
    let code = |a: &Agent| a.status().0.as_u16();
    {
        let mut agent = Agent::open(rt.clone(), cfg.clone(), dir.path())
            .await
            .unwrap();
        agent.set_desired(&desired).await.unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while code(&agent) != 200 {
            assert!(Instant::now() < end, "not deployed: {:?}", agent.status());
            agent.reconcile().await;
        }
        // Killed: no shutdown, nothing written.
    }
    for name in ["edgeHub", &first, &second] {
        rt.stop(name, Duration::from_secs(1)).await.unwrap();
    }
    rt.remove(&first).await.unwrap();
    run(&["rmi", &first_image]);
    let second_before = rt.get(&second).await.unwrap();
    assert_ne!(second_before.status, ModuleStatus::Running);

    let mut agent = Agent::open(rt.clone(), cfg, dir.path()).await.unwrap();
    assert!(agent.desired().is_some(), "manifest restored from storage");
    let end = Instant::now() + Duration::from_secs(2);
    let mut last = ReconcileOutcome::default();
    while Instant::now() < end {
        last = agent.reconcile().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rt.get("edgeHub").await.unwrap().status,
        ModuleStatus::Running
    );
    assert!(rt.get(&first).await.is_err(), "tier 1 cannot be created");
    let desc = agent.reported()["modules"][&first]["statusDescription"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(desc.contains("is not present locally"), "{desc}");
    let held = rt.get(&second).await.unwrap();
    assert_eq!(
        held.started_at, second_before.started_at,
        "tier 2 must not start before tier 1 runs"
    );
    assert!(
        last.waiting
            .iter()
            .any(|w| w.contains(&second) && w.contains("startupOrder 1")),
        "{last:?}"
    );

    // The image is back: tier 1 is created, then tier 2 starts.
    run(&["tag", IMAGE, &first_image]);
    let end = Instant::now() + Duration::from_secs(30);
    while code(&agent) != 200 {
        assert!(Instant::now() < end, "not restored: {:?}", agent.status());
        agent.reconcile().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hub = rt.get("edgeHub").await.unwrap();
    let one = rt.get(&first).await.unwrap();
    let two = rt.get(&second).await.unwrap();
    for s in [&hub, &one, &two] {
        assert_eq!(s.status, ModuleStatus::Running, "{}", s.spec.name);
    }
    assert!(hub.started_at <= one.started_at && one.started_at <= two.started_at);
    assert_eq!(
        two.runtime_id, second_before.runtime_id,
        "restarted, not recreated"
    );
}

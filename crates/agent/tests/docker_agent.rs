//! The agent against Docker with the locally built `verge-test/busybox:1`
//! image (see crates/runtime/tests/docker.rs). Skipped when Docker or the
//! image is missing, or with VERGE_SKIP_DOCKER_TESTS=1.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verge_agent::{Agent, AgentConfig};
use verge_runtime::{DockerConfig, DockerRuntime, ModuleRuntime, ModuleStatus};

const IMAGE: &str = "verge-test/busybox:1";

fn docker_ready() -> bool {
    if std::env::var("VERGE_SKIP_DOCKER_TESTS").as_deref() == Ok("1") {
        return false;
    }
    let ok = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Missing Docker is a failure, not a skip: a silently skipped test proves nothing.
    assert!(
        ok(&["info"]),
        "Docker is not reachable (set VERGE_SKIP_DOCKER_TESTS=1 to skip Docker tests)"
    );
    assert!(
        ok(&["image", "inspect", IMAGE]),
        "{IMAGE} is missing: ./scripts/test.sh builds it (scripts/test-images.sh)"
    );
    true
}

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
    if !docker_ready() {
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

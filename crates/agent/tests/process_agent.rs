//! The agent against the real process backend: modules are `/bin/sh` scripts.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verge_agent::{Agent, AgentConfig, REPORTED_FILE, cool_off};
use verge_core::manifest::DeploymentStatusCode;
use verge_runtime::{ModuleRuntime, ModuleState, ModuleStatus, ProcessConfig, ProcessRuntime};

fn cfg() -> AgentConfig {
    AgentConfig {
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_millis(800),
        max_restarts: 3,
        healthy_reset: Duration::from_secs(60),
        reconcile_interval: Duration::from_millis(50),
        report_interval: Duration::ZERO,
        tier_timeout: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(2),
        normalize_image: false,
        extra_env: BTreeMap::new(),
    }
}

/// A module running `sh -c <script>`.
fn sh(script: &str, extra: Value) -> Value {
    let opts = json!({ "Cmd": ["-c", script] }).to_string();
    let mut m = json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
        "settings": { "image": "/bin/sh", "createOptions": opts }
    });
    for (k, v) in extra.as_object().unwrap() {
        m.as_object_mut().unwrap().insert(k.clone(), v.clone());
    }
    m
}

fn manifest(modules: Value) -> Value {
    json!({ "modulesContent": {
        "$edgeAgent": { "properties.desired": {
            "schemaVersion": "1.1",
            "runtime": { "type": "docker", "settings": {} },
            "systemModules": {
                "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent" } },
                "edgeHub": sh("exec sleep 30", json!({"startupOrder": 0}))
            },
            "modules": modules
        }},
        "$edgeHub": { "properties.desired": { "schemaVersion": "1.1", "routes": {} } }
    }})
}

struct Env {
    _dir: tempfile::TempDir,
    storage: std::path::PathBuf,
    state: std::path::PathBuf,
    rt: Arc<ProcessRuntime>,
}

impl Env {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("agent");
        let state = dir.path().join("rt");
        let rt = Arc::new(
            ProcessRuntime::open(ProcessConfig::new(&state))
                .await
                .unwrap(),
        );
        Self {
            _dir: dir,
            storage,
            state,
            rt,
        }
    }

    async fn agent(&self) -> Agent {
        Agent::open(self.rt.clone(), cfg(), &self.storage)
            .await
            .unwrap()
    }

    async fn states(&self) -> BTreeMap<String, ModuleState> {
        self.rt
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.spec.name.clone(), s))
            .collect()
    }

    async fn cleanup(&self) {
        cleanup(self.rt.as_ref()).await;
    }
}

async fn cleanup(rt: &ProcessRuntime) {
    for s in rt.list().await.unwrap() {
        let _ = rt.remove(&s.spec.name).await;
    }
}

fn code(agent: &Agent) -> u16 {
    agent.status().0.as_u16()
}

/// Reconciles until `done` or the time limit.
async fn reconcile_until(agent: &mut Agent, limit: Duration, mut done: impl FnMut(&Agent) -> bool) {
    let end = Instant::now() + limit;
    loop {
        agent.reconcile().await;
        if done(agent) {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out; status {:?}",
            agent.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deploy_update_stop_and_remove() {
    let env = Env::new().await;
    let mut agent = env.agent().await;
    agent.reconcile().await;
    assert_eq!(agent.status().0, DeploymentStatusCode::ConfigEmpty);

    let m1 = manifest(json!({
        "a": sh("exec sleep 30", json!({})),
        "b": sh("exec sleep 30", json!({"env": {"X": {"value": "1"}}}))
    }));
    assert!(agent.set_desired(&m1).await.unwrap());
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let s1 = env.states().await;
    assert_eq!(s1.keys().collect::<Vec<_>>(), ["a", "b", "edgeHub"]);
    assert!(s1.values().all(|s| s.status == ModuleStatus::Running));
    assert_eq!(s1["b"].spec.env["X"], "1");
    assert_eq!(s1["a"].spec.labels["net.verge.version"], "1.0");

    let reported: Value =
        serde_json::from_slice(&std::fs::read(env.storage.join(REPORTED_FILE)).unwrap()).unwrap();
    assert_eq!(reported["lastDesiredStatus"]["code"], 200);
    assert_eq!(reported["schemaVersion"], "1.0");
    assert_eq!(reported["modules"]["a"]["runtimeStatus"], "running");
    assert_eq!(reported["modules"]["a"]["restartCount"], 0);
    assert_eq!(reported["modules"]["b"]["env"]["X"]["value"], "1");
    assert_eq!(
        reported["systemModules"]["edgeHub"]["runtimeStatus"],
        "running"
    );
    assert_eq!(
        reported["systemModules"]["edgeAgent"]["runtimeStatus"],
        "running"
    );
    assert!(reported["modules"]["a"]["lastStartTimeUtc"].is_string());
    assert_eq!(reported["runtime"]["platform"]["os"], "linux");

    // Version change of a → a recreated, b untouched.
    let m2 = manifest(json!({
        "a": sh("exec sleep 30", json!({"version": "1.1"})),
        "b": sh("exec sleep 30", json!({"env": {"X": {"value": "1"}}}))
    }));
    assert!(agent.set_desired(&m2).await.unwrap());
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let s2 = env.states().await;
    assert_eq!(s2["a"].spec.labels["net.verge.version"], "1.1");
    assert_ne!(s2["a"].runtime_id, s1["a"].runtime_id, "a recreated");
    assert_eq!(s2["b"].runtime_id, s1["b"].runtime_id, "b untouched");
    assert_eq!(s2["b"].started_at, s1["b"].started_at);

    // b leaves the manifest → removed; a stopped by status only → not recreated.
    let m3 = manifest(json!({
        "a": sh("exec sleep 30", json!({"version": "1.1", "status": "stopped"}))
    }));
    agent.set_desired(&m3).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let s3 = env.states().await;
    assert!(!s3.contains_key("b"));
    assert_ne!(s3["a"].status, ModuleStatus::Running);
    assert_eq!(s3["a"].spec, s2["a"].spec);
    assert_eq!(agent.reported()["modules"]["a"]["runtimeStatus"], "stopped");
    // It stays stopped whatever the restart policy (always).
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.reconcile().await;
    assert_ne!(env.states().await["a"].status, ModuleStatus::Running);

    // Back to running: started at once, no back-off, no restart counted.
    let m4 = manifest(json!({ "a": sh("exec sleep 30", json!({"version": "1.1"})) }));
    agent.set_desired(&m4).await.unwrap();
    agent.reconcile().await;
    let s4 = env.states().await;
    assert_eq!(s4["a"].status, ModuleStatus::Running);
    assert_eq!(agent.reported()["modules"]["a"]["restartCount"], 0);
    assert_eq!(code(&agent), 200);
    env.cleanup().await;
}

#[tokio::test]
async fn crashing_module_backs_off_then_gives_up() {
    let env = Env::new().await;
    let mut agent = env.agent().await;
    agent
        .set_desired(&manifest(json!({
            "crash": sh("exit 3", json!({"restartPolicy": "on-failure"})),
            "fine": sh("exit 0", json!({"restartPolicy": "on-failure"}))
        })))
        .await
        .unwrap();
    let c = cfg();
    // The agent's own restart times: a clock read after `reconcile` returns
    // would add that pass's varying tail to each gap.
    let mut restarts: Vec<(u32, i64)> = Vec::new();
    let end = Instant::now() + Duration::from_secs(8);
    let mut seen_backoff = false;
    while Instant::now() < end {
        agent.reconcile().await;
        let rec = agent.restart_record("crash");
        let count = rec.map_or(0, |r| r.count);
        if count > restarts.last().map_or(0, |r| r.0) {
            let at = rec.and_then(|r| r.last_restart).unwrap().as_millis();
            restarts.push((count, at));
        }
        let rs = agent.reported()["modules"]["crash"]["runtimeStatus"].clone();
        seen_backoff |= rs == "backoff";
        if rs == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_backoff);
    assert_eq!(
        restarts.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "restarted max_restarts times"
    );
    // Gap between restart k and k+1 ≥ cool_off(k) (the exit follows the start).
    for w in restarts.windows(2) {
        let gap = Duration::from_millis(u64::try_from(w[1].1 - w[0].1).unwrap());
        let want = cool_off(w[0].0, c.backoff_base, c.backoff_cap);
        assert!(
            gap >= want,
            "restart {} after {gap:?}, want ≥ {want:?}",
            w[1].0
        );
        assert!(
            gap < want + Duration::from_millis(600),
            "restart {} late: {gap:?}",
            w[1].0
        );
    }
    let r = agent.reported()["modules"]["crash"].clone();
    assert_eq!(r["runtimeStatus"], "failed");
    assert_eq!(r["restartCount"], 3);
    assert_eq!(r["exitCode"], 3);
    assert!(r["lastRestartTimeUtc"].is_string());
    assert_eq!(code(&agent), 500);
    assert!(agent.status().1.contains("crash"), "{}", agent.status().1);
    // Given up: no further restarts.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    agent.reconcile().await;
    assert_eq!(agent.restart_record("crash").map(|r| r.count), Some(3));
    // on-failure and exit 0: stopped, never restarted.
    assert_eq!(
        agent.reported()["modules"]["fine"]["runtimeStatus"],
        "stopped"
    );
    assert_eq!(agent.reported()["modules"]["fine"]["restartCount"], 0);

    // A deployment touching the module clears its state.
    agent
        .set_desired(&manifest(json!({
            "crash": sh("exec sleep 30", json!({"restartPolicy": "on-failure", "version": "2"})),
            "fine": sh("exit 0", json!({"restartPolicy": "on-failure"}))
        })))
        .await
        .unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    assert_eq!(agent.reported()["modules"]["crash"]["restartCount"], 0);
    env.cleanup().await;
}

#[tokio::test]
async fn startup_order_tiers_wait_for_each_other() {
    let env = Env::new().await;
    let mut agent = env.agent().await;
    // Tier 1 cannot be pulled: tier 2 must not start.
    agent
        .set_desired(&manifest(json!({
            "one": sh("exec sleep 30", json!({"startupOrder": 1, "settings": {"image": "/nonexistent/prog"}})),
            "two": sh("exec sleep 30", json!({"startupOrder": 2})),
        })))
        .await
        .unwrap();
    let out = agent.reconcile().await;
    let s = env.states().await;
    assert_eq!(s["edgeHub"].status, ModuleStatus::Running);
    assert!(!s.contains_key("one"));
    assert!(!s.contains_key("two"), "tier 2 held back");
    assert!(out.waiting.iter().any(|w| w.contains("two")), "{out:?}");
    assert_eq!(code(&agent), 500);
    assert!(agent.status().1.contains("image pull failed"));
    assert_eq!(
        agent.reported()["modules"]["one"]["runtimeStatus"],
        "backoff"
    );

    agent
        .set_desired(&manifest(json!({
            "one": sh("exec sleep 30", json!({"startupOrder": 1})),
            "two": sh("exec sleep 30", json!({"startupOrder": 2})),
            "last": sh("exec sleep 30", json!({})),
        })))
        .await
        .unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let s = env.states().await;
    let t = |n: &str| s[n].started_at.unwrap();
    assert!(t("edgeHub") <= t("one"));
    assert!(t("one") <= t("two"));
    assert!(t("two") <= t("last"));
    env.cleanup().await;
}

#[tokio::test]
async fn refused_manifests_leave_modules_untouched() {
    let env = Env::new().await;
    let mut agent = env.agent().await;
    let good = manifest(json!({ "a": sh("exec sleep 30", json!({})) }));
    agent.set_desired(&good).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let before = env.states().await;

    let bad_policy =
        manifest(json!({ "a": sh("exec sleep 30", json!({"restartPolicy": "sometimes"})) }));
    let mut bad_schema = manifest(json!({}));
    bad_schema["modulesContent"]["$edgeAgent"]["properties.desired"]["schemaVersion"] =
        json!("2.0");
    let cases: Vec<(Value, u16)> = vec![
        (bad_policy, 400),
        (
            json!({"modulesContent": {"$edgeAgent": {"properties.desired": {"schemaVersion": "1.1"}}}}),
            400,
        ),
        (bad_schema, 412),
        (json!({"$version": 7}), 417),
    ];
    for (m, want) in cases {
        let e = agent.set_desired(&m).await.unwrap_err();
        assert_eq!(e.code.as_u16(), want, "{e}");
        agent.reconcile().await;
        assert_eq!(code(&agent), want);
        assert_eq!(agent.reported()["lastDesiredStatus"]["code"], want);
        assert_eq!(env.states().await, before, "code {want} changed modules");
    }
    let e = agent.set_desired_text("{ not json").await.unwrap_err();
    assert_eq!(e.code.as_u16(), 400);
    agent.reconcile().await;
    assert_eq!(env.states().await, before);
    assert_eq!(code(&agent), 400);
    // The previous manifest is still in force: a crash is restarted.
    env.rt.stop("a", Duration::from_secs(2)).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |_| true).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    agent.reconcile().await;
    assert_eq!(env.states().await["a"].status, ModuleStatus::Running);
    // A good manifest again clears the refusal.
    agent.set_desired(&good).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    env.cleanup().await;
}

#[tokio::test]
async fn restarted_agent_restores_the_persisted_manifest() {
    let env = Env::new().await;
    let m = manifest(json!({
        "a": sh("exec sleep 30", json!({"startupOrder": 1})),
        "b": sh("exec sleep 30", json!({}))
    }));
    {
        let mut agent = env.agent().await;
        agent.set_desired(&m).await.unwrap();
        reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
        agent.shutdown().await;
        let reported: Value =
            serde_json::from_slice(&std::fs::read(env.storage.join(REPORTED_FILE)).unwrap())
                .unwrap();
        assert_eq!(reported["lastDesiredStatus"]["code"], 406);
    }
    let before = env.states().await;
    // Same runtime (verged kept running): nothing is recreated.
    let mut agent = env.agent().await;
    assert!(agent.desired().is_some());
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    assert_eq!(env.states().await, before);
    // Same manifest again: no change.
    assert!(!agent.set_desired(&m).await.unwrap());
    drop(agent);

    // Device rebooted with empty runtime state, still offline: the same modules come back.
    env.cleanup().await;
    let dir2 = tempfile::tempdir().unwrap();
    let rt2 = Arc::new(
        ProcessRuntime::open(ProcessConfig::new(dir2.path()))
            .await
            .unwrap(),
    );
    let mut agent = Agent::open(rt2.clone(), cfg(), &env.storage).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(5), |a| code(a) == 200).await;
    let mut names: Vec<String> = rt2
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "edgeHub"]);
    cleanup(&rt2).await;
    let _ = &env.state;
}

/// The process's resident set (`VmRSS`), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Files under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        files_under(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Memory stays bounded across many deployments (issue #20.11): 200
/// deployments, each recreating one module (new env) and replacing another
/// by one with a new name, leave the agent with as many live tasks, a
/// reported document of the same size, no record of removed modules and no
/// files of theirs in the runtime's state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_deployments_keep_nothing_per_deployment() {
    let env = Env::new().await;
    let mut agent = env.agent().await;
    let deployment = |i: u32| {
        let mut modules = serde_json::Map::new();
        modules.insert(
            "keep".into(),
            sh(
                "exec sleep 30",
                json!({"env": {"N": {"value": i.to_string()}}}),
            ),
        );
        modules.insert(format!("m{i}"), sh("exec sleep 30", json!({})));
        manifest(Value::Object(modules))
    };
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let measure = |agent: &Agent| {
        let mut r = agent.reported().clone();
        // Times and pids differ from one deployment to the next.
        for section in ["modules", "systemModules"] {
            for m in r[section].as_object_mut().unwrap().values_mut() {
                let m = m.as_object_mut().unwrap();
                m.retain(|k, _| !k.ends_with("TimeUtc"));
            }
        }
        (
            tasks(),
            r.to_string().len(),
            files_under(&env.state),
            rss_kib(),
        )
    };
    let mut first = None;
    let rss_start = rss_kib();
    for i in 0..220 {
        if i == 5 {
            eprintln!(
                "RSS {rss_start} KiB before, {} KiB after 5 deployments",
                rss_kib()
            );
        }
        assert!(agent.set_desired(&deployment(i)).await.unwrap());
        reconcile_until(&mut agent, Duration::from_secs(10), |a| code(a) == 200).await;
        if i > 0 {
            assert!(agent.restart_record(&format!("m{}", i - 1)).is_none());
        }
        if i == 19 {
            first = Some(measure(&agent));
        }
    }
    let (tasks0, reported0, files0, rss0) = first.unwrap();
    let (tasks1, reported1, files1, rss1) = measure(&agent);
    eprintln!(
        "after 20 deployments: {tasks0} tasks, reported {reported0} B, {files0} runtime files, RSS {rss0} KiB; \
         after 220: {tasks1} tasks, reported {reported1} B, {files1} runtime files, RSS {rss1} KiB"
    );
    assert_eq!(tasks1, tasks0, "live tasks grew with deployments");
    assert!(
        reported1 <= reported0 + 64,
        "reported grew: {reported0} → {reported1}"
    );
    assert_eq!(files1, files0, "runtime files of removed modules are left");
    let names: Vec<String> = env.states().await.into_keys().collect();
    assert_eq!(names, ["edgeHub", "keep", "m219"]);
    env.cleanup().await;
}

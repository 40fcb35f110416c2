//! The agent pulling from a real private registry: Debian's `docker-registry`
//! (installed by scripts/test-images.sh) on a free 127.0.0.1 port with
//! htpasswd (bcrypt) auth. Docker allows plain HTTP to 127.0.0.0/8 registries,
//! so no daemon configuration is needed. `verge-test/busybox:1` is pushed
//! there and its local tag removed, so the agent has to pull it.
//!
//! Covers imagePullPolicy (on-create / never), registryCredentials, pull
//! progress in the logs, failed pulls retried with back-off, given up after
//! `max_restarts` and reported, while other modules keep running, and digest
//! pinning. Fails without Docker unless VERGE_SKIP_DOCKER_TESTS=1.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verge_agent::{Agent, AgentConfig};
use verge_runtime::{
    DockerConfig, DockerRuntime, LogOptions, LogStream, ModuleRuntime, ModuleSpec, ModuleState,
    ModuleStatus, RegistryAuth, RuntimeError, RuntimeInfo,
};
use verge_testkit::registry::{PASSWORD, Registry, USER};

const IMAGE: &str = verge_testkit::docker::TEST_IMAGE;

/// Every manifest has an `edgeHub`, and Docker container names are global:
/// the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn docker_ready() -> bool {
    if !verge_testkit::docker::ready() {
        return false;
    }
    let tools = Command::new("sh")
        .args(["-c", "command -v docker-registry && command -v htpasswd"])
        .output()
        .is_ok_and(|o| o.status.success());
    // Missing tools are a failure, not a skip: a silently skipped test proves nothing.
    assert!(
        tools,
        "docker-registry or htpasswd missing: scripts/test-images.sh installs them"
    );
    true
}

fn suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}{nanos:x}", std::process::id())
}

/// One pull the agent asked for.
#[derive(Debug, Clone)]
struct Pull {
    image: String,
    at: Instant,
    user: Option<String>,
    ok: bool,
}

/// The Docker backend, recording every pull.
struct Recording {
    inner: DockerRuntime,
    pulls: Mutex<Vec<Pull>>,
}

impl Recording {
    fn pulls_of(&self, image: &str) -> Vec<Pull> {
        self.pulls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.image == image)
            .cloned()
            .collect()
    }
}

#[async_trait::async_trait]
impl ModuleRuntime for Recording {
    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<(), RuntimeError> {
        let at = Instant::now();
        let r = self.inner.pull(image, auth).await;
        self.pulls.lock().unwrap().push(Pull {
            image: image.to_owned(),
            at,
            user: auth.map(|a| a.username.clone()),
            ok: r.is_ok(),
        });
        r
    }
    async fn create(&self, spec: &ModuleSpec) -> Result<(), RuntimeError> {
        self.inner.create(spec).await
    }
    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.start(name).await
    }
    async fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.inner.stop(name, timeout).await
    }
    async fn restart(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.restart(name).await
    }
    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        self.inner.remove(name).await
    }
    async fn get(&self, name: &str) -> Result<ModuleState, RuntimeError> {
        self.inner.get(name).await
    }
    async fn list(&self) -> Result<Vec<ModuleState>, RuntimeError> {
        self.inner.list().await
    }
    async fn logs(&self, name: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        self.inner.logs(name, options).await
    }
    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        self.inner.info().await
    }
    async fn image_digests(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        self.inner.image_digests(image).await
    }
}

/// A Docker runtime with names of its own; its containers and network are
/// removed on drop.
struct Fixture {
    id: String,
    network: String,
    rt: Arc<Recording>,
    storage: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let id = suffix();
        let network = format!("verge-reg-test-{id}");
        let inner = DockerRuntime::new(DockerConfig {
            network: network.clone(),
            owner: format!("verge-reg-test-{id}"),
            stop_timeout: Duration::from_secs(1),
            pull_timeout: Duration::from_secs(60),
            ..DockerConfig::default()
        });
        Self {
            id,
            network,
            rt: Arc::new(Recording {
                inner,
                pulls: Mutex::new(Vec::new()),
            }),
            storage: tempfile::tempdir().unwrap(),
        }
    }

    fn name(&self, module: &str) -> String {
        format!("{module}{}", self.id)
    }

    async fn agent(&self, cfg: AgentConfig) -> Agent {
        Agent::open(self.rt.clone(), cfg, self.storage.path())
            .await
            .unwrap()
    }

    async fn state(&self, name: &str) -> Option<ModuleState> {
        self.rt.get(name).await.ok()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let owner = format!("label=net.verge.owner=verge-reg-test-{}", self.id);
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &owner])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", "-v", id]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

fn cfg() -> AgentConfig {
    AgentConfig {
        backoff_base: Duration::from_millis(300),
        backoff_cap: Duration::from_millis(1200),
        max_restarts: 4,
        report_interval: Duration::ZERO,
        tier_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(1),
        extra_env: BTreeMap::new(),
        ..AgentConfig::default()
    }
}

/// A module that sleeps until stopped (and stops at once on SIGTERM).
fn module(image: &str, pull: &str, extra_settings: Value) -> Value {
    let opts = json!({ "Cmd": ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"] });
    let mut settings = json!({ "image": image, "createOptions": opts.to_string() });
    for (k, v) in extra_settings.as_object().unwrap() {
        settings[k] = v.clone();
    }
    json!({
        "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
        "imagePullPolicy": pull, "settings": settings
    })
}

fn manifest(credentials: Value, modules: Value) -> Value {
    json!({
        "schemaVersion": "1.1",
        "runtime": { "type": "docker", "settings": { "registryCredentials": credentials } },
        "systemModules": {
            "edgeAgent": { "type": "docker", "settings": { "image": "verge-agent" } },
            "edgeHub": { "type": "docker", "status": "stopped", "imagePullPolicy": "never",
                         "settings": { "image": IMAGE } }
        },
        "modules": modules
    })
}

fn reported<'a>(agent: &'a Agent, name: &str) -> (&'a str, &'a str) {
    let m = &agent.reported()["modules"][name];
    (
        m["runtimeStatus"].as_str().unwrap_or(""),
        m["statusDescription"].as_str().unwrap_or(""),
    )
}

/// Reconciles (every 50 ms) until `done` or the limit.
async fn reconcile_until(agent: &mut Agent, limit: Duration, mut done: impl FnMut(&Agent) -> bool) {
    let end = Instant::now() + limit;
    loop {
        agent.reconcile().await;
        if done(agent) {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out; status {:?}; reported {:#}",
            agent.status(),
            agent.reported()["modules"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log output captured from `tracing`, for the pull progress lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn private_registry_credentials_backoff_and_pull_policies() {
    let _serial = SERIAL.lock().await;
    if !docker_ready() {
        return;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let reg = Registry::start();
    let (reference, digest) = reg.push(IMAGE, "verge/busy:1");
    assert!(
        !Command::new("docker")
            .args(["image", "inspect", &reference])
            .output()
            .unwrap()
            .status
            .success(),
        "the pushed image must not be present locally"
    );
    let fx = Fixture::new();
    let steady = fx.name("steady");
    let private = fx.name("private");
    let absent = fx.name("absent");
    let missing_image = format!("verge-test/absent-{}:1", fx.id);
    let mut modules = serde_json::Map::new();
    modules.insert(steady.clone(), module(IMAGE, "never", json!({})));
    modules.insert(private.clone(), module(&reference, "on-create", json!({})));
    modules.insert(absent.clone(), module(&missing_image, "never", json!({})));
    let wrong = manifest(
        reg.credentials("wrong-password"),
        Value::Object(modules.clone()),
    );

    // Wrong credentials: the pull fails, is retried with back-off and given
    // up after max_restarts (4) attempts; the other module runs throughout.
    let cfg = cfg();
    let mut agent = fx.agent(cfg.clone()).await;
    agent.set_desired(&wrong).await.unwrap();
    let mut saw_backoff = false;
    reconcile_until(&mut agent, Duration::from_secs(30), |a| {
        let (status, desc) = reported(a, &private);
        if status == "backoff" {
            assert!(desc.contains("image pull failed"), "{desc}");
            assert!(desc.contains("retrying in"), "{desc}");
            saw_backoff = true;
        }
        status == "failed"
    })
    .await;
    assert!(saw_backoff, "a failed pull is reported as backoff first");
    let s = fx.state(&steady).await.unwrap();
    assert_eq!(s.status, ModuleStatus::Running);
    let steady_id = s.runtime_id.clone();
    assert_eq!(reported(&agent, &steady).0, "running");
    let (_, desc) = reported(&agent, &private);
    assert!(desc.contains("failed 4 times; giving up"), "{desc}");
    assert!(fx.state(&private).await.is_none(), "nothing created");

    let pulls = fx.rt.pulls_of(&reference);
    assert_eq!(pulls.len(), 4, "one attempt per back-off step: {pulls:?}");
    assert!(
        pulls
            .iter()
            .all(|p| !p.ok && p.user.as_deref() == Some(USER))
    );
    for (i, w) in pulls.windows(2).enumerate() {
        // Waits after failures 1, 2, 3: 300, 600, 1200 ms.
        let want = cfg.backoff_base * 2u32.pow(u32::try_from(i).unwrap());
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= want,
            "attempt {} came after {gap:?} < {want:?}",
            i + 2
        );
    }
    // Given up: no further attempt while the deployment is unchanged.
    let before = fx.rt.pulls_of(&reference).len();
    let end = Instant::now() + cfg.backoff_cap * 2;
    while Instant::now() < end {
        agent.reconcile().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fx.rt.pulls_of(&reference).len(), before);

    // imagePullPolicy never: no pull, a clear status.
    assert!(fx.rt.pulls_of(&missing_image).is_empty());
    assert!(fx.rt.pulls_of(IMAGE).is_empty());
    let (_, desc) = reported(&agent, &absent);
    assert!(
        desc.contains(&format!(
            "image {missing_image} is not present locally and imagePullPolicy is never"
        )),
        "{desc}"
    );
    let (code, desc) = agent.status();
    assert_eq!(code.as_u16(), 500);
    assert!(desc.contains(&private) && desc.contains(&absent), "{desc}");
    assert_eq!(
        agent.reported()["lastDesiredStatus"]["code"],
        500,
        "reported too"
    );

    // Right credentials in a new deployment: pulled (with them) and run.
    modules.remove(&absent);
    let right = manifest(reg.credentials(PASSWORD), Value::Object(modules));
    agent.set_desired(&right).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(30), |a| {
        a.status().0.as_u16() == 200
    })
    .await;
    let pulls = fx.rt.pulls_of(&reference);
    let last = pulls.last().unwrap();
    assert!(last.ok && last.user.as_deref() == Some(USER), "{pulls:?}");
    let p = fx.state(&private).await.unwrap();
    assert_eq!(p.status, ModuleStatus::Running);
    assert_eq!(p.spec.image, reference);
    assert_eq!(reported(&agent, &private), ("running", "running"));
    let s = fx.state(&steady).await.unwrap();
    assert_eq!(s.runtime_id, steady_id, "steady kept running throughout");
    // on-create: pulled at creation only, not on every reconcile.
    let n = pulls.len();
    for _ in 0..5 {
        agent.reconcile().await;
    }
    assert_eq!(fx.rt.pulls_of(&reference).len(), n);
    // Pull progress is logged at info.
    let text = logs.text();
    assert!(
        text.contains("pull: "),
        "no pull progress in the logs:\n{text}"
    );
    assert!(
        text.contains(&format!("Digest: {digest}")),
        "no digest line in the logs:\n{text}"
    );
    drop(agent);
    drop(fx);
    drop(reg);
}

#[tokio::test]
async fn pinned_digests_are_enforced() {
    let _serial = SERIAL.lock().await;
    if !docker_ready() {
        return;
    }
    let reg = Registry::start();
    let (reference, digest) = reg.push(IMAGE, "verge/busy:1");
    let repo = reference.trim_end_matches(":1").to_owned();
    let wrong_digest = format!("sha256:{}", "0".repeat(64));
    let fx = Fixture::new();
    let pinned = fx.name("pinned");
    let tagged = fx.name("tagged");
    let creds = reg.credentials(PASSWORD);
    let mut agent = fx.agent(cfg()).await;

    // The right digest in settings.image: pulled by digest, accepted.
    let by_digest = format!("{repo}@{digest}");
    let m1 = manifest(
        creds.clone(),
        json!({ (pinned.clone()): module(&by_digest, "on-create", json!({})) }),
    );
    agent.set_desired(&m1).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(30), |a| {
        a.status().0.as_u16() == 200
    })
    .await;
    let first = fx.state(&pinned).await.unwrap();
    assert_eq!(first.status, ModuleStatus::Running);
    assert_eq!(first.spec.image, by_digest);

    // A wrong digest in settings.image: the registry has no such manifest,
    // the pull fails, and the module already running keeps running. A wrong
    // settings.digest for a tag: the image is pulled, but its digest differs
    // from the pin, so it is refused before anything is created.
    let m2 = manifest(
        creds.clone(),
        json!({
            (pinned.clone()): module(&format!("{repo}@{wrong_digest}"), "on-create", json!({})),
            (tagged.clone()): module(&reference, "on-create", json!({"digest": wrong_digest}))
        }),
    );
    agent.set_desired(&m2).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(30), |a| {
        reported(a, &pinned).1.contains("image pull failed")
            && reported(a, &tagged).1.contains("refused")
    })
    .await;
    let (_, desc) = reported(&agent, &pinned);
    assert!(desc.contains(&wrong_digest), "{desc}");
    let (status, desc) = reported(&agent, &tagged);
    assert_eq!(status, "backoff");
    assert!(
        desc.contains(&format!("not the pinned digest {wrong_digest}")) && desc.contains(&digest),
        "{desc}"
    );
    assert!(fx.state(&tagged).await.is_none(), "refused: not created");
    let still = fx.state(&pinned).await.unwrap();
    assert_eq!(still.runtime_id, first.runtime_id, "old module untouched");
    assert_eq!(still.status, ModuleStatus::Running);
    assert_eq!(agent.status().0.as_u16(), 500);

    // The wrong digest with imagePullPolicy never: a clear status, no pull.
    // The right digest in settings.digest: accepted.
    let m3 = manifest(
        creds,
        json!({
            (pinned.clone()): module(&format!("{repo}@{wrong_digest}"), "never", json!({})),
            (tagged.clone()): module(&reference, "on-create", json!({"digest": digest}))
        }),
    );
    agent.set_desired(&m3).await.unwrap();
    reconcile_until(&mut agent, Duration::from_secs(30), |a| {
        reported(a, &tagged).0 == "running"
            && reported(a, &pinned).1.contains("not present locally")
    })
    .await;
    let (_, desc) = reported(&agent, &pinned);
    assert!(
        desc.contains(&format!(
            "with the pinned digest {wrong_digest} is not present locally and imagePullPolicy is never"
        )),
        "{desc}"
    );
    assert_eq!(
        fx.state(&pinned).await.unwrap().runtime_id,
        first.runtime_id,
        "old module still untouched"
    );
    drop(agent);
    drop(fx);
    drop(reg);
}

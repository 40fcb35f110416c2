//! The agent: accepts manifests, runs the reconcile loop body, executes plans,
//! keeps restart state, and produces reported properties.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_core::manifest::{
    Deployment, DeploymentStatusCode, DesiredStatus, EdgeAgentDesired, ManifestError,
};
use verge_core::time::Timestamp;
use verge_runtime::{ModuleRuntime, ModuleStatus, RuntimeError, RuntimeInfo};

use crate::config::AgentConfig;
use crate::plan::{Blocked, DesiredModule, PlanInput, Step, desired_modules, plan};
use crate::report::Reporter;
use crate::restart::RestartRecord;

mod download;
mod status;
use download::{Downloads, PullState};

/// File (under the storage dir) holding the last accepted `$edgeAgent` desired properties.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File holding the restart records.
pub const RESTARTS_FILE: &str = "restarts.json";
/// File the reported properties are written to.
pub const REPORTED_FILE: &str = "reported.json";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Storage directory problem.
    #[error("storage {path}: {source}")]
    Storage {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
struct Accepted {
    value: Value,
    desired: EdgeAgentDesired,
}

#[derive(Serialize, Deserialize)]
struct PersistedManifest {
    version: Option<i64>,
    desired: Value,
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconcileOutcome {
    /// Steps executed (described), in order.
    pub steps: Vec<String>,
    /// Step failures.
    pub errors: Vec<String>,
    /// Steps held back by startupOrder or by their image's download.
    pub waiting: Vec<String>,
}

/// What one step did.
enum Ran {
    /// Started the module at this time.
    Started(Timestamp),
    /// Done, nothing started.
    Done,
    /// Waiting for the module's image to download.
    Downloading,
}

/// The edge agent. One instance owns the lifecycle of the modules it labels.
pub struct Agent {
    runtime: Arc<dyn ModuleRuntime>,
    cfg: AgentConfig,
    storage: PathBuf,
    accepted: Option<Accepted>,
    refused: Option<(DeploymentStatusCode, String)>,
    last_desired_version: Option<i64>,
    local_versions: i64,
    status: (DeploymentStatusCode, String),
    reached_ok: bool,
    restarts: BTreeMap<String, RestartRecord>,
    persisted_restarts: BTreeMap<String, RestartRecord>,
    blocked: BTreeMap<String, Blocked>,
    reporter: Reporter,
    started_at: Timestamp,
    info: Option<RuntimeInfo>,
    reported: Value,
    report_sink: Option<tokio::sync::watch::Sender<Option<Value>>>,
    metrics: crate::metrics::AgentMetrics,
    downloads: Downloads,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("storage", &self.storage)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Writes an agent state file atomically and durably (0600).
async fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    verge_files::write_atomic_async(path.to_owned(), bytes.to_vec()).await
}

/// The status text of a module whose image is not on the device.
fn missing_image(m: &DesiredModule) -> String {
    let image = &m.spec.image;
    match (&m.pinned_digest, m.pull) {
        (Some(pin), true) => {
            format!("image {image} with the pinned digest {pin} is not present after the pull")
        }
        (Some(pin), false) => format!(
            "image {image} with the pinned digest {pin} is not present locally and imagePullPolicy is never"
        ),
        (None, true) => format!("image {image} is not present after the pull"),
        (None, false) => {
            format!("image {image} is not present locally and imagePullPolicy is never")
        }
    }
}

fn desired_part(v: &Value) -> Result<&Value, ManifestError> {
    if let Some(content) = v.get("modulesContent") {
        Deployment::from_value(v)?;
        content
            .get("$edgeAgent")
            .and_then(|a| a.get("properties.desired"))
            .ok_or_else(|| ManifestError {
                code: DeploymentStatusCode::ConfigFormatError,
                path: "modulesContent.$edgeAgent".into(),
                message: "missing".into(),
            })
    } else {
        Ok(v)
    }
}

impl Agent {
    /// Opens the agent's storage (creating it) and restores the last accepted
    /// manifest and the restart records, so an agent restarted while offline
    /// keeps running the same modules.
    pub async fn open(
        runtime: Arc<dyn ModuleRuntime>,
        cfg: AgentConfig,
        storage: impl Into<PathBuf>,
    ) -> Result<Self, AgentError> {
        let storage = storage.into();
        tokio::fs::create_dir_all(&storage)
            .await
            .map_err(|source| AgentError::Storage {
                path: storage.clone(),
                source,
            })?;
        let mut agent = Self {
            runtime,
            reporter: Reporter::new(cfg.report_interval),
            cfg,
            storage,
            accepted: None,
            refused: None,
            last_desired_version: None,
            local_versions: 0,
            status: (DeploymentStatusCode::Unknown, String::new()),
            reached_ok: false,
            restarts: BTreeMap::new(),
            persisted_restarts: BTreeMap::new(),
            blocked: BTreeMap::new(),
            started_at: Timestamp::now(),
            info: None,
            reported: Value::Null,
            report_sink: None,
            metrics: crate::metrics::AgentMetrics::default(),
            downloads: Downloads::default(),
        };
        if let Ok(text) = tokio::fs::read(agent.storage.join(MANIFEST_FILE)).await {
            match serde_json::from_slice::<PersistedManifest>(&text) {
                Ok(p) => match EdgeAgentDesired::from_value(&p.desired) {
                    Ok(desired) => {
                        agent.last_desired_version = p.version;
                        agent.local_versions = p.version.unwrap_or(0);
                        agent.accepted = Some(Accepted {
                            value: p.desired,
                            desired,
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "persisted manifest is invalid; ignored"),
                },
                Err(e) => tracing::warn!(error = %e, "persisted manifest unreadable; ignored"),
            }
        }
        if let Ok(text) = tokio::fs::read(agent.storage.join(RESTARTS_FILE)).await {
            match serde_json::from_slice(&text) {
                Ok(r) => {
                    agent.restarts = r;
                    agent.persisted_restarts = agent.restarts.clone();
                }
                Err(e) => tracing::warn!(error = %e, "restart records unreadable; ignored"),
            }
        }
        Ok(agent)
    }

    /// Resolves when an image pull has ended since it last resolved: the
    /// loop reconciles then, so the module is created without waiting for
    /// the next tick.
    pub fn pull_ended(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.downloads.ended()
    }

    /// The agent's Prometheus series (served by the executable).
    pub fn metrics(&self) -> crate::metrics::AgentMetrics {
        self.metrics.clone()
    }

    /// The settings.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// `lastDesiredStatus`: code and description.
    pub fn status(&self) -> (DeploymentStatusCode, &str) {
        (self.status.0, &self.status.1)
    }

    /// The accepted desired properties, if any.
    pub fn desired(&self) -> Option<&EdgeAgentDesired> {
        self.accepted.as_ref().map(|a| &a.desired)
    }

    /// The restart record of a module.
    pub fn restart_record(&self, name: &str) -> Option<&RestartRecord> {
        self.restarts.get(name)
    }

    /// The reported properties computed by the last reconcile.
    pub fn reported(&self) -> &Value {
        &self.reported
    }

    /// Also hands every reported document written to `reported.json` to
    /// `sink` (the twin link sends it to the cloud).
    pub fn report_to(&mut self, sink: tokio::sync::watch::Sender<Option<Value>>) {
        self.report_sink = Some(sink);
    }

    /// Offers a manifest as JSON text: a whole deployment
    /// (`{"modulesContent": …}`) or `$edgeAgent` desired properties.
    pub async fn set_desired_text(&mut self, text: &str) -> Result<bool, ManifestError> {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => self.set_desired(&v).await,
            Err(e) => {
                let err = ManifestError {
                    code: DeploymentStatusCode::ConfigFormatError,
                    path: String::new(),
                    message: format!("not valid JSON: {e}"),
                };
                self.refuse(&err, None);
                Err(err)
            }
        }
    }

    fn refuse(&mut self, e: &ManifestError, version: Option<i64>) {
        tracing::warn!(error = %e, "deployment refused; running modules are left as they are");
        self.local_versions += 1;
        self.last_desired_version = Some(version.unwrap_or(self.local_versions));
        let desc = e.to_string();
        self.refused = Some((e.code, desc.clone()));
        self.status = (e.code, desc);
    }

    /// Offers a manifest. A refused one (400/412/417) changes nothing but the
    /// reported status; an accepted one is persisted and applied by the next
    /// [`Agent::reconcile`]. Returns whether the manifest changed.
    pub async fn set_desired(&mut self, v: &Value) -> Result<bool, ManifestError> {
        let version = v
            .get("modulesContent")
            .and_then(|c| c.get("$edgeAgent"))
            .and_then(|a| a.get("properties.desired"))
            .unwrap_or(v)
            .get("$version")
            .and_then(Value::as_i64);
        let parsed = desired_part(v).and_then(|d| Ok((d, EdgeAgentDesired::from_value(d)?)));
        let (value, desired) = match parsed {
            Ok(x) => x,
            Err(e) => {
                self.refuse(&e, version);
                return Err(e);
            }
        };
        let was_refused = self.refused.take().is_some();
        if self.accepted.as_ref().is_some_and(|a| &a.value == value) && !was_refused {
            return Ok(false);
        }
        self.local_versions += 1;
        self.last_desired_version = Some(version.unwrap_or(self.local_versions));
        self.accepted = Some(Accepted {
            value: value.clone(),
            desired,
        });
        self.reached_ok = false;
        // Failed pulls/creates are retried afresh for a new deployment (it
        // may fix credentials or the image), as Azure's plan runner does.
        self.blocked.clear();
        self.status = (
            DeploymentStatusCode::Unknown,
            "deployment in progress".into(),
        );
        let persisted = PersistedManifest {
            version: self.last_desired_version,
            desired: value.clone(),
        };
        match serde_json::to_vec_pretty(&persisted) {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&self.storage.join(MANIFEST_FILE), &bytes).await {
                    tracing::error!(error = %e, "cannot persist the manifest");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot serialise the manifest"),
        }
        Ok(true)
    }

    /// One pass of the reconcile loop: list, plan, execute, update restart
    /// state, compute the deployment status and the reported properties.
    pub async fn reconcile(&mut self) -> ReconcileOutcome {
        let mut outcome = ReconcileOutcome::default();
        if self.info.is_none() {
            self.info = self.runtime.info().await.ok();
        }
        let Some(accepted) = self.accepted.clone() else {
            if self.refused.is_none() {
                self.status = (
                    DeploymentStatusCode::ConfigEmpty,
                    "no deployment received yet".into(),
                );
            }
            self.publish(None, &[], &BTreeMap::new()).await;
            return outcome;
        };
        let current = match self.runtime.list().await {
            Ok(c) => c,
            Err(e) => {
                self.status = (
                    DeploymentStatusCode::Failed,
                    format!("listing modules failed: {e}"),
                );
                self.publish(Some(&accepted.desired), &[], &BTreeMap::new())
                    .await;
                return outcome;
            }
        };
        let now = Timestamp::now();
        let p = plan(PlanInput {
            desired: &accepted.desired,
            current: &current,
            restarts: &self.restarts,
            blocked: &self.blocked,
            now,
            cfg: &self.cfg,
        });
        let wanted = desired_modules(&accepted.desired, &self.cfg);
        self.downloads.retain(&wanted);
        self.execute(p.steps, &wanted, &mut outcome).await;
        let downloading = self.downloads.describe(&*self.runtime).await;

        let after = match self.runtime.list().await {
            Ok(c) => c,
            Err(e) => {
                outcome.errors.push(format!("listing modules failed: {e}"));
                Vec::new()
            }
        };
        self.metrics.observe(
            &wanted
                .iter()
                .filter(|m| m.status == DesiredStatus::Running)
                .map(|m| m.name.clone())
                .collect(),
            &after
                .iter()
                .filter(|m| m.status == verge_runtime::ModuleStatus::Running)
                .map(|m| m.spec.name.clone())
                .collect(),
        );
        let statuses = self.module_statuses(&wanted, &after, &downloading, Timestamp::now());
        self.update_status(&wanted, &statuses, &outcome);
        self.persist_restarts().await;
        self.publish(Some(&accepted.desired), &after, &statuses)
            .await;
        outcome
    }

    /// Reports 406 "Agent is not running" and writes the reported properties
    /// at once (bypassing the rate limit); for a clean exit.
    pub async fn shutdown(&mut self) {
        self.status = (DeploymentStatusCode::Unknown, "Agent is not running".into());
        if let Some(obj) = self.reported.as_object_mut() {
            obj.insert(
                "lastDesiredStatus".into(),
                json!({"code": 406, "description": "Agent is not running"}),
            );
        }
        self.write_reported().await;
    }

    async fn execute(
        &mut self,
        steps: Vec<Step>,
        wanted: &[DesiredModule],
        outcome: &mut ReconcileOutcome,
    ) {
        let tier_of: BTreeMap<&str, u32> =
            wanted.iter().map(|m| (m.name.as_str(), m.tier)).collect();
        let mut removals = Vec::new();
        let mut tiers: BTreeMap<u32, Vec<Step>> = BTreeMap::new();
        for m in wanted.iter().filter(|m| m.status == DesiredStatus::Running) {
            tiers.entry(m.tier).or_default();
        }
        for s in steps {
            match s {
                Step::Remove { .. } => removals.push(s),
                _ => {
                    let t = tier_of.get(s.name()).copied().unwrap_or(u32::MAX);
                    tiers.entry(t).or_default().push(s);
                }
            }
        }
        for s in removals {
            outcome.steps.push(s.describe());
            if let Err(e) = self.run_step(&s).await {
                outcome.errors.push(e);
            }
        }
        let mut gate: Option<String> = None;
        for (tier, steps) in tiers {
            let mut started = Vec::new();
            for s in steps {
                let held =
                    gate.is_some() && !matches!(s, Step::Stop { .. } | Step::ResetRestarts { .. });
                if let (true, Some(g)) = (held, &gate) {
                    outcome.waiting.push(format!("{}: {g}", s.describe()));
                    continue;
                }
                match self.run_step(&s).await {
                    Ok(Ran::Started(since)) => {
                        outcome.steps.push(s.describe());
                        started.push((s.name().to_owned(), since));
                    }
                    Ok(Ran::Done) => outcome.steps.push(s.describe()),
                    Ok(Ran::Downloading) => outcome
                        .waiting
                        .push(format!("{}: downloading its image", s.describe())),
                    Err(e) => {
                        outcome.steps.push(s.describe());
                        outcome.errors.push(e);
                    }
                }
            }
            self.wait_started(&started).await;
            if gate.is_some() {
                continue;
            }
            let mut not_running = Vec::new();
            for m in wanted
                .iter()
                .filter(|m| m.tier == tier && m.status == DesiredStatus::Running)
            {
                match self.runtime.get(&m.name).await {
                    Ok(s) if s.status == ModuleStatus::Running => {}
                    _ => not_running.push(m.name.clone()),
                }
            }
            if !not_running.is_empty() {
                gate = Some(format!(
                    "waiting for startupOrder {tier} ({}) to run",
                    not_running.join(", ")
                ));
            }
        }
    }

    /// Waits until each started module runs (or has already exited again),
    /// at most `tier_timeout`.
    async fn wait_started(&self, started: &[(String, Timestamp)]) {
        let deadline = Instant::now() + self.cfg.tier_timeout;
        let mut pending: Vec<&(String, Timestamp)> = started.iter().collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for item in pending {
                let (name, since) = item;
                match self.runtime.get(name).await {
                    Ok(s) if s.status == ModuleStatus::Running => {}
                    Ok(s) if s.exited_at.is_some_and(|e| e >= *since) => {}
                    Ok(_) => still.push(item),
                    Err(_) => {}
                }
            }
            pending = still;
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records a failed create/update: it is retried after
    /// `min(base × 2^(failures-1), cap)`, and given up (reported `failed`)
    /// after `max_restarts` failures until a new deployment arrives.
    fn block(&mut self, m: &DesiredModule, error: String) -> String {
        let failures = self
            .blocked
            .get(&m.name)
            .filter(|b| b.hash == m.hash)
            .map_or(1, |b| b.failures.saturating_add(1));
        let blocked = Blocked {
            hash: m.hash.clone(),
            failures,
            last_attempt: Timestamp::now(),
            error: error.clone(),
        };
        let what = if blocked.given_up(&self.cfg) {
            format!("{error} (failed {failures} times; giving up until the deployment changes)")
        } else {
            let wait = blocked.retry_in(&self.cfg);
            format!("{error} (attempt {failures}; retrying in {wait:?})")
        };
        tracing::warn!(module = %m.name, "{what}");
        self.blocked.insert(
            m.name.clone(),
            Blocked {
                error: what.clone(),
                ..blocked
            },
        );
        format!("{}: {what}", m.name)
    }

    /// The manifest `version` of module `name` (empty when unknown).
    fn version_of(&self, name: &str) -> String {
        let Some(a) = &self.accepted else {
            return String::new();
        };
        let d = &a.desired;
        let spec = match name {
            "edgeHub" => Some(&d.system_modules.edge_hub),
            "edgeAgent" => Some(&d.system_modules.edge_agent),
            _ => d.modules.get(name),
        };
        spec.map(|m| m.version.clone()).unwrap_or_default()
    }

    /// `runtime.start`, counted and timed for the metrics.
    async fn rt_start(&self, name: &str) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        let r = self.runtime.start(name).await;
        self.metrics.command("start", t.elapsed());
        self.metrics.started(name, &self.version_of(name));
        r
    }

    /// `runtime.stop`, counted and timed for the metrics.
    async fn rt_stop(&self, name: &str, timeout: std::time::Duration) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        let r = self.runtime.stop(name, timeout).await;
        self.metrics.command("stop", t.elapsed());
        self.metrics.stopped(name, &self.version_of(name));
        r
    }

    /// `runtime.remove`, timed for the metrics.
    async fn rt_remove(&self, name: &str) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        let r = self.runtime.remove(name).await;
        self.metrics.command("remove", t.elapsed());
        r
    }

    /// `runtime.create`, timed for the metrics.
    async fn rt_create(&self, spec: &verge_runtime::ModuleSpec) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        let r = self.runtime.create(spec).await;
        self.metrics.command("create", t.elapsed());
        r
    }

    /// Runs one step; a failure is described for the deployment status.
    async fn run_step(&mut self, step: &Step) -> Result<Ran, String> {
        let rt = self.runtime.clone();
        let stop_timeout = self.cfg.stop_timeout;
        let ignore_missing = |r: Result<(), RuntimeError>| match r {
            Err(RuntimeError::NotFound(_)) => Ok(()),
            other => other,
        };
        match step {
            Step::Remove { name } => {
                tracing::info!(module = %name, "removing (no longer in the deployment)");
                self.restarts.remove(name);
                self.blocked.remove(name);
                ignore_missing(self.rt_stop(name, stop_timeout).await)
                    .and(ignore_missing(self.rt_remove(name).await))
                    .map_err(|e| format!("{name}: removing failed: {e}"))?;
                Ok(Ran::Done)
            }
            Step::Create { module } | Step::Update { module } => {
                let update = matches!(step, Step::Update { .. });
                let name = &module.name;
                let image = &module.spec.image;
                if module.pull {
                    match self.downloads.poll(&rt, module).await {
                        PullState::Pulled => {}
                        PullState::Downloading => return Ok(Ran::Downloading),
                        PullState::Failed(e) => {
                            return Err(self.block(module, format!("image pull failed: {e}")));
                        }
                    }
                }
                tracing::info!(module = %name, update, image = %image, "creating");
                // Checked before the old module is touched, so a missing or
                // wrong image leaves it running.
                if !module.pull || module.pinned_digest.is_some() {
                    match rt.image_digests(image).await {
                        Ok(Some(digests)) => {
                            if let Some(pin) = module
                                .pinned_digest
                                .as_ref()
                                .filter(|pin| !digests.contains(pin))
                            {
                                return Err(self.block(
                                    module,
                                    format!(
                                        "refused: image {image} has digest {}, not the pinned digest {pin}",
                                        digests.join(", ")
                                    ),
                                ));
                            }
                        }
                        Ok(None) => {}
                        Err(RuntimeError::ImageNotFound(_)) => {
                            return Err(self.block(module, missing_image(module)));
                        }
                        Err(e) => {
                            return Err(
                                self.block(module, format!("inspecting image {image} failed: {e}"))
                            );
                        }
                    }
                }
                if update {
                    ignore_missing(self.rt_stop(name, stop_timeout).await)
                        .and(ignore_missing(self.rt_remove(name).await))
                        .map_err(|e| format!("{name}: removing the old module failed: {e}"))?;
                }
                match self.rt_create(&module.spec).await {
                    Ok(()) => {}
                    Err(RuntimeError::ImageNotFound(_)) => {
                        return Err(self.block(module, missing_image(module)));
                    }
                    Err(e) => return Err(self.block(module, format!("create failed: {e}"))),
                }
                self.blocked.remove(name);
                self.restarts.remove(name);
                if module.status == DesiredStatus::Running {
                    let t = Timestamp::now();
                    self.rt_start(name)
                        .await
                        .map_err(|e| format!("{name}: start failed: {e}"))?;
                    Ok(Ran::Started(t))
                } else {
                    Ok(Ran::Done)
                }
            }
            Step::Start { name, .. } => {
                tracing::info!(module = %name, "starting");
                self.restarts.remove(name);
                let t = Timestamp::now();
                self.rt_start(name)
                    .await
                    .map_err(|e| format!("{name}: start failed: {e}"))?;
                Ok(Ran::Started(t))
            }
            Step::Restart {
                name, was_running, ..
            } => {
                let t = Timestamp::now();
                let rec = self.restarts.entry(name.clone()).or_default();
                rec.count = rec.count.saturating_add(1);
                rec.last_restart = Some(t);
                rec.stopped_by_agent = false;
                tracing::info!(module = %name, count = rec.count, "restarting per restart policy");
                if *was_running {
                    ignore_missing(self.rt_stop(name, stop_timeout).await)
                        .map_err(|e| format!("{name}: stop failed: {e}"))?;
                }
                self.rt_start(name)
                    .await
                    .map_err(|e| format!("{name}: restart failed: {e}"))?;
                Ok(Ran::Started(t))
            }
            Step::Stop { name } => {
                tracing::info!(module = %name, "stopping (desired status stopped)");
                self.restarts.insert(
                    name.clone(),
                    RestartRecord {
                        stopped_by_agent: true,
                        ..RestartRecord::default()
                    },
                );
                ignore_missing(self.rt_stop(name, stop_timeout).await)
                    .map_err(|e| format!("{name}: stop failed: {e}"))?;
                Ok(Ran::Done)
            }
            Step::ResetRestarts { name } => {
                self.restarts.remove(name);
                Ok(Ran::Done)
            }
        }
    }

    async fn persist_restarts(&mut self) {
        if self.restarts == self.persisted_restarts {
            return;
        }
        match serde_json::to_vec(&self.restarts) {
            Ok(bytes) => match write_atomic(&self.storage.join(RESTARTS_FILE), &bytes).await {
                Ok(()) => self.persisted_restarts = self.restarts.clone(),
                Err(e) => tracing::error!(error = %e, "cannot persist restart records"),
            },
            Err(e) => tracing::error!(error = %e, "cannot serialise restart records"),
        }
    }
}

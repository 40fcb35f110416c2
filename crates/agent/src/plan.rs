//! The reconcile planner: desired modules + what the runtime reports → an
//! ordered list of steps. Pure: no I/O, the time is a parameter.
//!
//! Order: removals of modules that left the manifest first, then per
//! `startupOrder` tier (ascending): creates, updates, starts, policy restarts,
//! stops, restart-count resets. The executor waits for each tier to run
//! before it starts the next one.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use verge_core::manifest::{
    DesiredStatus, EdgeAgentDesired, ImagePullPolicy, ModuleSpec as DesiredSpec, RestartPolicy,
};
use verge_core::time::Timestamp;
use verge_runtime::{ModuleSpec as RuntimeSpec, ModuleState, ModuleStatus, RegistryAuth};

use crate::config::AgentConfig;
use crate::restart::{Decision, Observed, RestartRecord, cool_off, decide, should_reset};

/// Label marking modules this agent manages.
pub const LABEL_OWNER: &str = "net.verge.owner";
/// Value of [`LABEL_OWNER`].
pub const OWNER: &str = "verge-agent";
/// Label holding the manifest `version`.
pub const LABEL_VERSION: &str = "net.verge.version";
/// Label holding the hash of the desired spec the module was created from.
pub const LABEL_SPEC_HASH: &str = "net.verge.spec-hash";
/// Label holding the manifest `type`.
pub const LABEL_TYPE: &str = "net.verge.type";
/// The agent's own module name: never planned.
pub const EDGE_AGENT: &str = "edgeAgent";

/// One module the manifest wants, ready for the runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredModule {
    /// Name.
    pub name: String,
    /// startupOrder.
    pub tier: u32,
    /// Desired status.
    pub status: DesiredStatus,
    /// Restart policy.
    pub policy: RestartPolicy,
    /// Pull before create (`imagePullPolicy: on-create`).
    pub pull: bool,
    /// Registry credentials matching the image.
    pub auth: Option<RegistryAuth>,
    /// Digest pinned in `settings.image` (`name@sha256:…`).
    pub pinned_digest: Option<String>,
    /// The runtime spec (labels include version and hash).
    pub spec: RuntimeSpec,
    /// Hash of the fields whose change means an update.
    pub hash: String,
}

/// A previously failed create/update (pull failure, digest mismatch): retried
/// with back-off while the desired spec is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Spec hash the failure is about.
    pub hash: String,
    /// Consecutive failures.
    pub failures: u32,
    /// Last attempt.
    pub last_attempt: Timestamp,
    /// Why.
    pub error: String,
}

impl Blocked {
    /// The wait after the latest failure: `min(base × 2^(failures-1), cap)`.
    pub fn retry_in(&self, cfg: &AgentConfig) -> std::time::Duration {
        cool_off(
            self.failures.saturating_sub(1),
            cfg.backoff_base,
            cfg.backoff_cap,
        )
    }

    /// `max_restarts` attempts failed: no more until a new deployment.
    pub fn given_up(&self, cfg: &AgentConfig) -> bool {
        self.failures >= cfg.max_restarts
    }

    /// Whether the module must still wait before the next attempt.
    pub fn waiting(&self, hash: &str, now: Timestamp, cfg: &AgentConfig) -> bool {
        if self.hash != hash {
            return false;
        }
        if self.given_up(cfg) {
            return true;
        }
        let wait = self.retry_in(cfg);
        let elapsed = now
            .as_millis()
            .saturating_sub(self.last_attempt.as_millis());
        elapsed >= 0 && u128::from(elapsed.unsigned_abs()) < wait.as_millis()
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Stop and remove a module that left the manifest.
    Remove {
        /// Module.
        name: String,
    },
    /// Pull (per policy), create, start (if desired running).
    Create {
        /// What to create.
        module: Box<DesiredModule>,
    },
    /// Pull (per policy), stop, remove, create, start (if desired running).
    Update {
        /// What to create instead.
        module: Box<DesiredModule>,
    },
    /// Start (first start or desired status changed to running).
    Start {
        /// Module.
        name: String,
        /// Its tier.
        tier: u32,
    },
    /// Restart by the restart policy (counts towards the maximum).
    Restart {
        /// Module.
        name: String,
        /// Its tier.
        tier: u32,
        /// Stop it first (unhealthy but running).
        was_running: bool,
    },
    /// Stop (desired status stopped).
    Stop {
        /// Module.
        name: String,
    },
    /// Forget the restart count of a module that ran long enough.
    ResetRestarts {
        /// Module.
        name: String,
    },
}

impl Step {
    /// The module the step is about.
    pub fn name(&self) -> &str {
        match self {
            Self::Remove { name }
            | Self::Start { name, .. }
            | Self::Restart { name, .. }
            | Self::Stop { name }
            | Self::ResetRestarts { name } => name,
            Self::Create { module } | Self::Update { module } => &module.name,
        }
    }

    /// Sort key: removals first, then by tier, then by kind.
    fn key(&self, tiers: &BTreeMap<String, u32>) -> (u8, u32, u8) {
        let tier = tiers.get(self.name()).copied().unwrap_or(u32::MAX);
        match self {
            Self::Remove { .. } => (0, 0, 0),
            Self::Create { .. } => (1, tier, 0),
            Self::Update { .. } => (1, tier, 1),
            Self::Start { .. } => (1, tier, 2),
            Self::Restart { .. } => (1, tier, 3),
            Self::Stop { .. } => (1, tier, 4),
            Self::ResetRestarts { .. } => (1, tier, 5),
        }
    }

    /// A short description (`create filter`).
    pub fn describe(&self) -> String {
        let verb = match self {
            Self::Remove { .. } => "remove",
            Self::Create { .. } => "create",
            Self::Update { .. } => "update",
            Self::Start { .. } => "start",
            Self::Restart { .. } => "restart",
            Self::Stop { .. } => "stop",
            Self::ResetRestarts { .. } => "reset restart count of",
        };
        format!("{verb} {}", self.name())
    }
}

/// An ordered plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Steps in execution order.
    pub steps: Vec<Step>,
}

/// Everything the planner looks at.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The accepted desired properties.
    pub desired: &'a EdgeAgentDesired,
    /// `ModuleRuntime::list()`.
    pub current: &'a [ModuleState],
    /// Restart records by module.
    pub restarts: &'a BTreeMap<String, RestartRecord>,
    /// Failed creates/updates by module.
    pub blocked: &'a BTreeMap<String, Blocked>,
    /// Now.
    pub now: Timestamp,
    /// Settings.
    pub cfg: &'a AgentConfig,
}

/// JSON with object keys sorted, so equal documents serialise equally.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let mut out = Map::new();
            for (k, v) in sorted {
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// FNV-1a, 64 bit: stable across builds and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hash of the fields whose change makes an update: version, type, image,
/// createOptions (normalised JSON), env, digest.
pub fn spec_hash(m: &DesiredSpec) -> String {
    let doc = json!({
        "version": m.version,
        "type": m.module_type,
        "image": m.image,
        "createOptions": m.create_options.as_ref().map(canonical),
        "env": m.env,
        "digest": m.digest,
    });
    format!("{:016x}", fnv1a(doc.to_string().as_bytes()))
}

/// The registry part of an image reference, Docker's way: the first path
/// component when it contains `.` or `:` or is `localhost`.
fn registry_of(image: &str) -> Option<&str> {
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then_some(first)
}

/// The credentials for an image: the entry whose address is the image's
/// registry (or a prefix of the image at a `/` boundary).
pub fn credentials_for(desired: &EdgeAgentDesired, image: &str) -> Option<RegistryAuth> {
    let registry = registry_of(image);
    desired
        .runtime
        .registry_credentials
        .values()
        .find(|c| {
            let addr = c.address.trim_end_matches('/');
            !addr.is_empty()
                && (registry == Some(addr)
                    || image
                        .strip_prefix(addr)
                        .is_some_and(|rest| rest.starts_with('/')))
        })
        .map(|c| RegistryAuth {
            address: c.address.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
        })
}

/// Turns one manifest module into a [`DesiredModule`].
pub fn desired_module(
    desired: &EdgeAgentDesired,
    m: &DesiredSpec,
    cfg: &AgentConfig,
) -> DesiredModule {
    let image = if cfg.normalize_image {
        m.image_reference()
    } else {
        m.image.clone()
    };
    let hash = spec_hash(m);
    let mut env = m.env.clone();
    for (k, v) in &cfg.extra_env {
        env.entry(k.clone()).or_insert_with(|| v.clone());
    }
    env.insert("IOTEDGE_MODULEID".into(), m.name.clone());
    let labels = BTreeMap::from([
        (LABEL_OWNER.to_owned(), OWNER.to_owned()),
        (LABEL_VERSION.to_owned(), m.version.clone()),
        (LABEL_TYPE.to_owned(), m.module_type.clone()),
        (LABEL_SPEC_HASH.to_owned(), hash.clone()),
    ]);
    DesiredModule {
        name: m.name.clone(),
        tier: m.startup_order,
        status: m.status,
        policy: m.restart_policy,
        pull: m.image_pull_policy == ImagePullPolicy::OnCreate,
        auth: credentials_for(desired, &image),
        pinned_digest: m.pinned_digest().or(m.digest.as_deref()).map(str::to_owned),
        spec: RuntimeSpec {
            name: m.name.clone(),
            image,
            create_options: m.create_options.clone().unwrap_or_else(|| json!({})),
            env,
            labels,
            workload_socket: None,
            management_socket: None,
        },
        hash,
    }
}

/// The manifest modules the agent manages: edgeHub and `modules` (not edgeAgent).
pub fn desired_modules(desired: &EdgeAgentDesired, cfg: &AgentConfig) -> Vec<DesiredModule> {
    std::iter::once(&desired.system_modules.edge_hub)
        .chain(desired.modules.values())
        .map(|m| desired_module(desired, m, cfg))
        .collect()
}

/// Whether this agent created the module.
pub fn is_owned(s: &ModuleState) -> bool {
    s.spec.labels.get(LABEL_OWNER).map(String::as_str) == Some(OWNER)
}

/// Whether the running module must be recreated to match `m`.
pub fn needs_update(current: &ModuleState, m: &DesiredModule) -> bool {
    current.status == ModuleStatus::Dead
        || !is_owned(current)
        || current.spec.labels.get(LABEL_SPEC_HASH) != Some(&m.hash)
}

/// Computes the plan. See the module docs for the order.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let PlanInput {
        desired,
        current,
        restarts,
        blocked,
        now,
        cfg,
    } = input;
    let wanted = desired_modules(desired, cfg);
    let tiers: BTreeMap<String, u32> = wanted.iter().map(|m| (m.name.clone(), m.tier)).collect();
    let by_name: BTreeMap<&str, &ModuleState> =
        current.iter().map(|s| (s.spec.name.as_str(), s)).collect();
    let mut steps = Vec::new();

    for s in current {
        let name = s.spec.name.as_str();
        if name != EDGE_AGENT && is_owned(s) && !tiers.contains_key(name) {
            steps.push(Step::Remove {
                name: name.to_owned(),
            });
        }
    }
    let default_rec = RestartRecord::default();
    for m in wanted {
        let is_blocked = blocked
            .get(&m.name)
            .is_some_and(|b| b.waiting(&m.hash, now, cfg));
        match by_name.get(m.name.as_str()) {
            None => {
                if !is_blocked {
                    steps.push(Step::Create {
                        module: Box::new(m),
                    });
                }
            }
            Some(cur) if needs_update(cur, &m) => {
                if !is_blocked {
                    steps.push(Step::Update {
                        module: Box::new(m),
                    });
                }
            }
            Some(cur) => {
                let obs = Observed::from(*cur);
                let rec = restarts.get(&m.name).unwrap_or(&default_rec);
                let name = m.name.clone();
                match decide(m.status, m.policy, &obs, rec, now, cfg) {
                    Decision::Start => steps.push(Step::Start { name, tier: m.tier }),
                    Decision::Stop => steps.push(Step::Stop { name }),
                    Decision::Restart { was_running } => steps.push(Step::Restart {
                        name,
                        tier: m.tier,
                        was_running,
                    }),
                    Decision::Keep(_) | Decision::Backoff { .. } | Decision::GiveUp => {
                        if should_reset(&obs, rec, now, cfg) {
                            steps.push(Step::ResetRestarts { name });
                        }
                    }
                }
            }
        }
    }
    steps.sort_by_key(|s| s.key(&tiers));
    Plan { steps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_runtime::Health;

    const T0: i64 = 1_800_000_000_000;

    fn at(offset_s: i64) -> Timestamp {
        Timestamp::from_millis(T0 + offset_s * 1000)
    }

    fn module(image: &str, extra: Value) -> Value {
        let mut m = json!({
            "version": "1.0", "type": "docker", "status": "running", "restartPolicy": "always",
            "settings": { "image": image, "createOptions": "" }
        });
        if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }

    fn manifest(modules: Value) -> EdgeAgentDesired {
        let v = json!({
            "schemaVersion": "1.1",
            "runtime": { "type": "docker", "settings": { "registryCredentials": {
                "acr": { "address": "plantacr.azurecr.io", "username": "u", "password": "p" } } } },
            "systemModules": {
                "edgeAgent": { "type": "docker", "settings": { "image": "agent:1" } },
                "edgeHub": { "type": "docker", "status": "running", "startupOrder": 0,
                             "settings": { "image": "hub:1", "createOptions": "" } }
            },
            "modules": modules
        });
        match EdgeAgentDesired::from_value(&v) {
            Ok(d) => d,
            Err(e) => panic!("test manifest invalid: {e}"),
        }
    }

    /// The runtime state of a module created from the manifest's current spec.
    fn running(d: &EdgeAgentDesired, name: &str) -> ModuleState {
        let cfg = AgentConfig::default();
        let m = desired_modules(d, &cfg)
            .into_iter()
            .find(|m| m.name == name)
            .unwrap();
        ModuleState {
            spec: m.spec,
            status: ModuleStatus::Running,
            exit_code: None,
            started_at: Some(at(-100)),
            exited_at: None,
            health: None,
            runtime_id: None,
            image_id: None,
        }
    }

    fn with(mut s: ModuleState, f: impl FnOnce(&mut ModuleState)) -> ModuleState {
        f(&mut s);
        s
    }

    fn run_plan(
        d: &EdgeAgentDesired,
        current: &[ModuleState],
        restarts: &BTreeMap<String, RestartRecord>,
    ) -> Vec<String> {
        let cfg = AgentConfig::default();
        plan(PlanInput {
            desired: d,
            current,
            restarts,
            blocked: &BTreeMap::new(),
            now: at(0),
            cfg: &cfg,
        })
        .steps
        .iter()
        .map(Step::describe)
        .collect()
    }

    #[test]
    fn planner_table() {
        let none = BTreeMap::new();
        let base = manifest(json!({
            "a": module("a:1", json!({"startupOrder": 2})),
            "b": module("b:1", json!({"startupOrder": 1}))
        }));
        let hub = running(&base, "edgeHub");
        let a = running(&base, "a");
        let b = running(&base, "b");
        let stranger = with(running(&base, "b"), |s| {
            s.spec.name = "manual".into();
            s.spec.labels.clear();
        });
        let old = with(running(&base, "b"), |s| s.spec.name = "old".into());
        let agent = with(running(&base, "b"), |s| s.spec.name = EDGE_AGENT.into());

        let cases: Vec<(&str, EdgeAgentDesired, Vec<ModuleState>, Vec<&str>)> = vec![
            (
                "empty device: create by startupOrder",
                base.clone(),
                vec![],
                vec!["create edgeHub", "create b", "create a"],
            ),
            (
                "converged",
                base.clone(),
                vec![hub.clone(), a.clone(), b.clone()],
                vec![],
            ),
            (
                "removed module goes first; unowned modules and edgeAgent untouched",
                base.clone(),
                vec![a.clone(), b.clone(), hub.clone(), old, stranger, agent],
                vec!["remove old"],
            ),
            (
                "version change → update",
                manifest(json!({
                    "a": module("a:1", json!({"startupOrder": 2, "version": "1.1"})),
                    "b": module("b:1", json!({"startupOrder": 1}))
                })),
                vec![hub.clone(), a.clone(), b.clone()],
                vec!["update a"],
            ),
            (
                "image, env, createOptions changes → update",
                manifest(json!({
                    "a": module("a:2", json!({"startupOrder": 2})),
                    "b": module("b:1", json!({"startupOrder": 1, "env": {"X": {"value": "1"}}})),
                    "c": module("c:1", json!({}))
                })),
                vec![
                    hub.clone(),
                    a.clone(),
                    b.clone(),
                    with(running(&base, "b"), |s| s.spec.name = "c".into()),
                ],
                vec!["update b", "update a", "update c"],
            ),
            (
                "status change only → stop, no recreate",
                manifest(json!({
                    "a": module("a:1", json!({"startupOrder": 2, "status": "stopped"})),
                    "b": module("b:1", json!({"startupOrder": 1}))
                })),
                vec![hub.clone(), a.clone(), b.clone()],
                vec!["stop a"],
            ),
            (
                "dead module → recreated",
                base.clone(),
                vec![
                    hub.clone(),
                    a.clone(),
                    with(b.clone(), |s| s.status = ModuleStatus::Dead),
                ],
                vec!["update b"],
            ),
            (
                "created, never started → start",
                base.clone(),
                vec![
                    hub.clone(),
                    a.clone(),
                    with(b.clone(), |s| {
                        s.status = ModuleStatus::Stopped;
                        s.started_at = None;
                    }),
                ],
                vec!["start b"],
            ),
            (
                "crashed → policy restart; unhealthy → restart",
                base.clone(),
                vec![
                    with(hub.clone(), |s| s.health = Some(Health::Unhealthy)),
                    a.clone(),
                    with(b.clone(), |s| {
                        s.status = ModuleStatus::Failed;
                        s.exited_at = Some(at(-60));
                    }),
                ],
                vec!["restart edgeHub", "restart b"],
            ),
        ];
        for (what, d, current, expected) in cases {
            assert_eq!(run_plan(&d, &current, &none), expected, "{what}");
        }
    }

    #[test]
    fn createoptions_key_order_is_not_a_change() {
        let d1 = manifest(
            json!({"a": module("a:1", json!({"settings": {"image": "a:1",
            "createOptions": "{\"Env\":[\"A=1\"],\"Cmd\":[\"x\"]}"}}))}),
        );
        let d2 = manifest(
            json!({"a": module("a:1", json!({"settings": {"image": "a:1",
            "createOptions": "{\"Cmd\":[\"x\"],\"Env\":[\"A=1\"]}"}}))}),
        );
        let cur = vec![running(&d1, "edgeHub"), running(&d1, "a")];
        assert!(run_plan(&d2, &cur, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn backoff_and_reset_in_plan() {
        let d = manifest(json!({"a": module("a:1", json!({}))}));
        let hub = running(&d, "edgeHub");
        let failed = with(running(&d, "a"), |s| {
            s.status = ModuleStatus::Failed;
            s.exited_at = Some(at(-15));
        });
        let mut restarts = BTreeMap::new();
        restarts.insert(
            "a".to_owned(),
            RestartRecord {
                count: 1,
                last_restart: Some(at(-20)),
                stopped_by_agent: false,
            },
        );
        // count 1 → 20 s after the exit; 15 s have passed.
        assert!(run_plan(&d, &[hub.clone(), failed.clone()], &restarts).is_empty());
        let later = with(failed, |s| s.exited_at = Some(at(-20)));
        assert_eq!(
            run_plan(&d, &[hub.clone(), later], &restarts),
            ["restart a"]
        );
        let long_running = with(running(&d, "a"), |s| s.started_at = Some(at(-601)));
        assert_eq!(
            run_plan(&d, &[hub, long_running], &restarts),
            ["reset restart count of a"]
        );
    }

    #[test]
    fn blocked_modules_wait_for_their_backoff() {
        let d = manifest(json!({"a": module("a:1", json!({}))}));
        let cfg = AgentConfig::default();
        let m = desired_modules(&d, &cfg)
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        let b = Blocked {
            hash: m.hash.clone(),
            failures: 2,
            last_attempt: at(-15),
            error: "pull failed".into(),
        };
        assert!(b.waiting(&m.hash, at(0), &cfg)); // 20 s after the 2nd failure
        assert!(!b.waiting(&m.hash, at(5), &cfg));
        assert!(!b.waiting("other", at(0), &cfg));
        let blocked = BTreeMap::from([("a".to_owned(), b)]);
        let hub = running(&d, "edgeHub");
        let steps = plan(PlanInput {
            desired: &d,
            current: std::slice::from_ref(&hub),
            restarts: &BTreeMap::new(),
            blocked: &blocked,
            now: at(0),
            cfg: &cfg,
        });
        assert!(steps.steps.is_empty());
    }

    #[test]
    fn failed_pulls_back_off_then_give_up() {
        let cfg = AgentConfig::default(); // 10 s × 2^n, cap 300 s, max 20
        let b = |failures: u32| Blocked {
            hash: "h".into(),
            failures,
            last_attempt: at(0),
            error: "pull failed".into(),
        };
        let waits: Vec<u64> = (1..=8).map(|n| b(n).retry_in(&cfg).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300, 300]);
        // After the 3rd failure: 40 s.
        assert!(b(3).waiting("h", at(39), &cfg));
        assert!(!b(3).waiting("h", at(40), &cfg));
        // Clock went backwards: retry at once.
        assert!(!b(3).waiting("h", at(-5), &cfg));
        // The 19th failure still retries (after the cap), the 20th gives up for good.
        assert!(!b(19).given_up(&cfg));
        assert!(!b(19).waiting("h", at(300), &cfg));
        assert!(b(20).given_up(&cfg));
        assert!(b(20).waiting("h", at(1_000_000), &cfg));
        // A changed spec is not held back by the old failures.
        assert!(!b(20).waiting("other", at(1), &cfg));
    }

    #[test]
    fn images_and_credentials() {
        let d = manifest(json!({
            "a": module("plantacr.azurecr.io/pump:2", json!({"imagePullPolicy": "never"})),
            "b": module("busybox", json!({})),
            "c": module("plantacr.azurecr.io.evil.com/x:1", json!({})),
            "d": module("reg.io/x@sha256:abc", json!({})),
            "e": module("reg.io/x:1", json!({"settings": {"image": "reg.io/x:1", "digest": "sha256:def"}}))
        }));
        let cfg = AgentConfig::default();
        let ms: BTreeMap<String, DesiredModule> = desired_modules(&d, &cfg)
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        assert_eq!(
            ms["a"].auth.as_ref().map(|a| a.username.as_str()),
            Some("u")
        );
        assert!(!ms["a"].pull);
        assert_eq!(ms["b"].spec.image, "busybox:latest");
        assert!(ms["b"].pull && ms["b"].auth.is_none());
        assert!(ms["c"].auth.is_none());
        assert_eq!(ms["d"].pinned_digest.as_deref(), Some("sha256:abc"));
        assert_eq!(ms["e"].pinned_digest.as_deref(), Some("sha256:def"));
        assert!(ms["b"].pinned_digest.is_none());
        assert_eq!(ms["a"].spec.labels[LABEL_VERSION], "1.0");
        assert_eq!(ms["a"].spec.env["IOTEDGE_MODULEID"], "a");
        let raw = AgentConfig {
            normalize_image: false,
            ..AgentConfig::default()
        };
        let b = desired_module(&d, &d.modules["b"], &raw);
        assert_eq!(b.spec.image, "busybox");
    }
}

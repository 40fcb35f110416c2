//! The Verge edge agent: turns the deployment manifest into running modules,
//! keeps them running, and reports their status in Azure IoT Edge's shape.
//!
//! # The reconcile loop
//!
//! [`Agent::reconcile`] runs every `reconcile_interval` (default 5 s):
//! 1. `ModuleRuntime::list()` — what runs now;
//! 2. [`plan::plan`] — a pure function of the accepted desired properties,
//!    that list, the restart records, the failed-create records and the time;
//! 3. the plan is executed tier by tier (startupOrder);
//! 4. the modules are listed again, each gets a `runtimeStatus`, the
//!    deployment gets `lastDesiredStatus`, and the reported properties are
//!    written to `<storage>/reported.json` (and handed to the twin link) when
//!    they changed (rate-limited by [`report::Reporter`]).
//!
//! # The plan
//!
//! Removals of modules that left the manifest come first (only modules carrying
//! the label `net.verge.owner=verge-agent`, never `edgeAgent`). Then, per
//! `startupOrder` tier in ascending order: creates, updates, starts, policy
//! restarts, stops, restart-count resets. A module is *updated* (pull, stop,
//! remove, create, start) when the hash of its version, type, image,
//! createOptions (normalised JSON), env and digest differs from the
//! `net.verge.spec-hash` label it was created with; a change of the desired
//! `status` alone is a start or stop. The image is pulled (`imagePullPolicy:
//! on-create`, with the `registryCredentials` entry whose address is the
//! image's registry) before the old module is stopped, and then checked: with
//! `never` it must be present, and a digest pinned in `settings.image`
//! (`name@sha256:…`) or `settings.digest` must be among the local image's
//! digests ([`verge_runtime::ModuleRuntime::image_digests`]). A failed pull or
//! check leaves the old module running. A pull that does not end within a
//! second goes on in the background (`agent/download.rs`): the module is
//! reported `downloading` with its progress, the pass goes on with the
//! other modules, and the loop is woken when the pull ends. `edgeHub` is planned like a
//! module; `edgeAgent` is never (re)created by the agent itself. After a tier,
//! the executor waits (up to `tier_timeout`) for the modules it started and
//! starts nothing of a later tier until every module of the tier desired
//! `running` actually runs.
//!
//! # The restart state machine
//!
//! See [`restart`]: a module desired running that is not running (policy
//! `always`, or `on-failure`/`on-unhealthy` after a non-zero exit), or that runs
//! unhealthy (`on-unhealthy`, `always`), is in `backoff` and restarted once
//! `min(base × 2^count, cap)` has passed since its exit; after `max_restarts`
//! it is `failed` until a deployment touches it; `healthy_reset` of running
//! clears the count. Failed pulls/creates/digest checks back off on the same
//! schedule (`runtimeStatus` `backoff`, the error and the next retry in
//! `statusDescription`, 500 in `lastDesiredStatus`) and are given up
//! (`failed`) after `max_restarts` attempts; a new deployment retries them at
//! once, as Azure's plan runner retries failed commands per deployment.
//!
//! # Under verged
//!
//! verged starts the agent (its `[agent]` config) with `IOTEDGE_MANAGEMENTURI`
//! set; the binary then defaults to `--runtime verged`: every runtime call is
//! a request to verged's management API ([`mgmt::ManagementRuntime`]), so each
//! module gets its identity, its own workload socket and the `IOTEDGE_*`
//! environment from verged (reference §7.3, §7.4). The manifest comes from
//! the agent's module twin in the cloud (next section) or from `--manifest`
//! (or `VERGE_AGENT_MANIFEST`, which verged's `[agent.env]` can set), the
//! storage directory from `--storage` (or `VERGE_AGENT_STORAGE`).
//! The agent waits for the management API at start, writes images
//! Docker-style unless verged runs the process backend, and passes its own
//! `RuntimeLogLevel`/`UpstreamProtocol` to modules that do not set them.
//!
//! The plan is the same as with a direct backend: a pull (`imagePullPolicy:
//! on-create`) is verged's `prepareupdate` and happens before the old module is
//! stopped; the module is then removed (`DELETE`) and created (`POST /modules`
//! with `imagePullPolicy: never`). The `net.verge.*` labels are stored by
//! verged with the module and come back from `GET /modules`, so ownership and
//! the spec hash work as with a direct backend, and so do `on-unhealthy`
//! restarts and digest pins: verged reports the healthcheck's verdict and
//! answers `GET /images/digests`. A killed agent is restarted by verged's
//! watchdog and, finding the modules up to date, leaves them running.
//!
//! # The twin in the cloud
//!
//! With the edge environment verged gives it (`IOTEDGE_IOTHUBHOSTNAME`,
//! `IOTEDGE_DEVICEID`, `IOTEDGE_MODULEID=$edgeAgent`,
//! `IOTEDGE_MODULEGENERATIONID`, `IOTEDGE_WORKLOADURI`, …), the binary opens a
//! [`twin::TwinLink`]: an MQTT connection as `{device}/$edgeAgent` straight to
//! the hub (or to the parent when nested), as Azure's edgeAgent does — the
//! edge hub is one of the modules the agent starts, so it cannot depend on
//! it. Tokens are signed by the workload API; the server is trusted through
//! the workload API's trust bundle (verged's `trust_bundle_cert` adds a
//! private hub's CA), `--upstream-ca` and the system roots; the port is
//! `--upstream-port` (8883; 443 with `UpstreamProtocol=MqttWs`, which
//! also honours `https_proxy`: MQTT over WebSocket through verge-dial). The twin's desired properties are offered to
//! [`Agent::set_desired`] exactly like a file (same validation and codes; a
//! refused one leaves the modules alone) as soon as they change; the reported
//! document written to `reported.json` is sent as a reported-properties
//! merge patch, on change and at most once per `--report-interval-ms`
//! (default 2 s), coalesced, held while offline and sent after the
//! reconnection. On shutdown the "406 Agent is not running" status is sent
//! if the link is up. `--manifest`, when also given, wins (see `main.rs`):
//! the twin then only receives the status. `--no-twin` turns the link off.
//! The link speaks MQTT whatever `UpstreamProtocol` says.
//!
//! # Direct methods
//!
//! The twin link answers edgeAgent's built-in methods on `$edgeAgent`
//! ([`methods`]): `ping`, `RestartModule`, `GetModuleLogs`,
//! `UploadModuleLogs`, `UploadSupportBundle`, `GetTaskStatus`, with
//! edgeAgent's names (any case), payloads, answers and status codes. They act
//! through the same [`verge_runtime::ModuleRuntime`] as the reconcile loop
//! (verged's management API under verged); uploads go to a blob container's
//! SAS URL (Azure Storage, or verge-cloud's blob endpoint) as background
//! tasks.
//!
//! # Invariants
//!
//! - A refused manifest (400/412/417) changes nothing: the previous accepted
//!   manifest stays in force, only `lastDesiredStatus` reports the refusal.
//! - One agent owns the lifecycle of the modules it labels; others are left
//!   alone. The accepted manifest and the restart records are persisted in the
//!   storage directory, so a restarted agent restores the same modules.
//! - Status codes: 200 once every module reached its desired state (kept while
//!   the restart policy handles later drift), 406 while in progress, 500 with
//!   a description for runtime failures (failed pull, create, start, a module
//!   given up).

pub mod agent;
pub mod cli;
pub mod config;
pub mod methods;
pub mod metrics;
pub mod mgmt;
pub mod plan;
pub mod report;
pub mod restart;
pub mod twin;

pub use agent::{Agent, AgentError, MANIFEST_FILE, REPORTED_FILE, RESTARTS_FILE, ReconcileOutcome};
pub use config::AgentConfig;
pub use mgmt::ManagementRuntime;
pub use plan::{Plan, PlanInput, Step, plan};
pub use report::Reporter;
pub use restart::{Decision, RestartRecord, RuntimeStatus, cool_off, decide};
pub use twin::{TwinLink, TwinOptions};

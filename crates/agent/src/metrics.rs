//! The agent's Prometheus metrics, named, typed and labelled as edgeAgent's
//! (reference §9), served by `verge-metrics` on `:9600/metrics`.
//!
//! * Lifecycle, counted by the reconcile loop: `edgeAgent_module_start_total`
//!   and `edgeAgent_module_stop_total` (each start/stop the agent asks the
//!   runtime for, as edgeAgent counts its Docker calls),
//!   `edgeAgent_command_latency_seconds{command}` (the last call of each kind),
//!   `edgeAgent_total_time_expected_running_seconds` (time a module was in the
//!   deployment with desired status `running`) and
//!   `edgeAgent_total_time_running_correctly_seconds` (…and was running),
//!   accumulated between reconcile passes since the agent started.
//! * Host and modules, from verged's `GET /systeminfo/resources` (sampled
//!   every [`RESOURCES_EVERY`] as edgeAgent's `PerformanceMetricsUpdateFrequency`;
//!   only under verged): `edgeAgent_host_uptime_seconds`,
//!   `edgeAgent_iotedged_uptime_seconds`, `edgeAgent_available_disk_space_bytes`
//!   and `edgeAgent_total_disk_space_bytes` (`disk_name` = device,
//!   `disk_filesystem` = file system type, `disk_filetype` = mount point:
//!   verged reports no separate file type), `edgeAgent_used_memory_bytes`,
//!   `edgeAgent_total_memory_bytes` (`module_name="host"` for the host, as
//!   edgeAgent does), `edgeAgent_created_pids_total` (processes of a module).
//!   CPU is `verge_used_cpu_percent` (a gauge per sample; edgeAgent's
//!   histogram over samples is not reproduced).
//! * Not exposed: network and block I/O per module (verged does not measure
//!   them), `edgeAgent_module_prepare_update_total`, IoT hub sync counters,
//!   `edgeAgent_metadata`, `edgeagent_direct_method_invocations_count`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use verge_workload::api::SystemResources;

/// How often the resource gauges are refreshed (edgeAgent's
/// `PerformanceMetricsUpdateFrequency` default).
pub const RESOURCES_EVERY: Duration = Duration::from_secs(300);

type FGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Labels `module_name, module_version`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleVersion {
    /// The module.
    pub module_name: String,
    /// Its manifest `version`.
    pub module_version: String,
}

/// Label `module_name`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleName {
    /// The module (`host` for the host's own series).
    pub module_name: String,
}

/// Label `command`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Command {
    /// `create`, `update`, `remove`, `start`, `stop`, `restart`.
    pub command: String,
}

/// Labels of the disk series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Disk {
    /// The device.
    pub disk_name: String,
    /// The file system type.
    pub disk_filesystem: String,
    /// The mount point (see the module docs).
    pub disk_filetype: String,
}

struct Inner {
    registry: Registry,
    start: Family<ModuleVersion, Counter>,
    stop: Family<ModuleVersion, Counter>,
    latency: Family<Command, FGauge>,
    running_correctly: Family<ModuleName, FGauge>,
    expected_running: Family<ModuleName, FGauge>,
    host_uptime: Gauge,
    iotedged_uptime: Gauge,
    available_disk: Family<Disk, Gauge>,
    total_disk: Family<Disk, Gauge>,
    used_memory: Family<ModuleName, Gauge>,
    total_memory: Family<ModuleName, Gauge>,
    pids: Family<ModuleName, Gauge>,
    cpu: Family<ModuleName, FGauge>,
    /// When the last reconcile pass was observed.
    last_pass: Mutex<Option<Instant>>,
}

/// The agent's series (cheap to clone: one `Arc`).
#[derive(Clone)]
pub struct AgentMetrics(Arc<Inner>);

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl Default for AgentMetrics {
    /// Labelled from the edge environment verged gives the agent
    /// (`IOTEDGE_IOTHUBHOSTNAME`, `IOTEDGE_DEVICEID`; empty without it).
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        Self::new(&env("IOTEDGE_IOTHUBHOSTNAME"), &env("IOTEDGE_DEVICEID"))
    }
}

impl AgentMetrics {
    /// The agent's series labelled with `iothub`, `edge_device` (and a new
    /// `instance_number`).
    pub fn new(iothub: &str, edge_device: &str) -> Self {
        let mut r = verge_metrics::registry(&verge_metrics::CommonLabels::new(iothub, edge_device));
        let i = Inner {
            registry: Registry::default(),
            start: Family::default(),
            stop: Family::default(),
            latency: Family::default(),
            running_correctly: Family::default(),
            expected_running: Family::default(),
            host_uptime: Gauge::default(),
            iotedged_uptime: Gauge::default(),
            available_disk: Family::default(),
            total_disk: Family::default(),
            used_memory: Family::default(),
            total_memory: Family::default(),
            pids: Family::default(),
            cpu: Family::default(),
            last_pass: Mutex::new(None),
        };
        r.register(
            "edgeAgent_module_start",
            "Number of times edgeAgent asked the runtime to start the module",
            i.start.clone(),
        );
        r.register(
            "edgeAgent_module_stop",
            "Number of times edgeAgent asked the runtime to stop the module",
            i.stop.clone(),
        );
        r.register(
            "edgeAgent_command_latency_seconds",
            "How long the runtime took to execute the given command",
            i.latency.clone(),
        );
        r.register(
            "edgeAgent_total_time_running_correctly_seconds",
            "The amount of time the module was specified in the deployment and was in the running state",
            i.running_correctly.clone(),
        );
        r.register(
            "edgeAgent_total_time_expected_running_seconds",
            "The amount of time the module was specified in the deployment",
            i.expected_running.clone(),
        );
        r.register(
            "edgeAgent_host_uptime_seconds",
            "How long the host has been on",
            i.host_uptime.clone(),
        );
        r.register(
            "edgeAgent_iotedged_uptime_seconds",
            "How long the security daemon (verged) has been running",
            i.iotedged_uptime.clone(),
        );
        r.register(
            "edgeAgent_available_disk_space_bytes",
            "Amount of space left on the disk",
            i.available_disk.clone(),
        );
        r.register(
            "edgeAgent_total_disk_space_bytes",
            "Size of the disk",
            i.total_disk.clone(),
        );
        r.register(
            "edgeAgent_used_memory_bytes",
            "Amount of RAM used",
            i.used_memory.clone(),
        );
        r.register(
            "edgeAgent_total_memory_bytes",
            "RAM available",
            i.total_memory.clone(),
        );
        r.register(
            "edgeAgent_created_pids_total",
            "The number of processes the module runs",
            i.pids.clone(),
        );
        r.register(
            "verge_used_cpu_percent",
            "CPU used over the last sample, percent (host: of all CPUs; module: of one CPU)",
            i.cpu.clone(),
        );
        let mut i = i;
        i.registry = r;
        Self(Arc::new(i))
    }

    /// Counts a start of `module` (manifest `version`) asked of the runtime.
    pub fn started(&self, module: &str, version: &str) {
        self.0.start.get_or_create(&mv(module, version)).inc();
    }

    /// Counts a stop of `module` asked of the runtime.
    pub fn stopped(&self, module: &str, version: &str) {
        self.0.stop.get_or_create(&mv(module, version)).inc();
    }

    /// Records how long the runtime took for `command`.
    pub fn command(&self, command: &str, took: Duration) {
        self.0
            .latency
            .get_or_create(&Command {
                command: command.to_owned(),
            })
            .set(took.as_secs_f64());
    }

    /// One reconcile pass saw `expected` (modules desired running) and
    /// `running` (those that run): the time since the previous pass is
    /// added to their totals.
    pub fn observe(&self, expected: &BTreeSet<String>, running: &BTreeSet<String>) {
        let now = Instant::now();
        let dt = {
            let mut last = self
                .0
                .last_pass
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dt = last.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            *last = Some(now);
            dt
        };
        for name in expected {
            let l = ModuleName {
                module_name: name.clone(),
            };
            self.0.expected_running.get_or_create(&l).inc_by(dt);
            let correct = self.0.running_correctly.get_or_create(&l);
            if running.contains(name) {
                correct.inc_by(dt);
            }
        }
    }

    /// Sets the host and module gauges from one `/systeminfo/resources` answer.
    pub fn set_resources(&self, r: &SystemResources) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let i = &self.0;
        i.host_uptime.set(g(r.host_uptime));
        i.iotedged_uptime.set(g(r.process_uptime));
        // Disks and modules come and go: the previous sample's are dropped.
        i.available_disk.clear();
        i.total_disk.clear();
        for d in &r.disks {
            let l = Disk {
                disk_name: d.name.clone(),
                disk_filesystem: d.file_system.clone(),
                disk_filetype: d.mount_point.clone(),
            };
            i.available_disk.get_or_create(&l).set(g(d.available_space));
            i.total_disk.get_or_create(&l).set(g(d.total_space));
        }
        i.used_memory.clear();
        i.total_memory.clear();
        i.pids.clear();
        i.cpu.clear();
        let host = ModuleName {
            module_name: "host".to_owned(),
        };
        i.used_memory.get_or_create(&host).set(g(r.used_ram));
        i.total_memory.get_or_create(&host).set(g(r.total_ram));
        i.cpu.get_or_create(&host).set(r.used_cpu);
        for m in &r.modules {
            let l = ModuleName {
                module_name: m.name.clone(),
            };
            i.used_memory.get_or_create(&l).set(g(m.memory_bytes));
            i.pids.get_or_create(&l).set(i64::from(m.processes));
            i.cpu.get_or_create(&l).set(m.cpu_percent);
        }
    }

    /// The exposition.
    pub fn render(&self) -> String {
        verge_metrics::encode(&self.0.registry)
    }
}

fn mv(module: &str, version: &str) -> ModuleVersion {
    ModuleVersion {
        module_name: module.to_owned(),
        module_version: version.to_owned(),
    }
}

impl verge_metrics::Source for AgentMetrics {
    async fn render(&self) -> String {
        AgentMetrics::render(self)
    }
}

/// Keeps the resource gauges fresh from verged until `shutdown` fires.
pub async fn sample_resources(
    metrics: AgentMetrics,
    mgmt: crate::ManagementRuntime,
    every: Duration,
    shutdown: verge_shutdown::Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match mgmt.system_resources().await {
            Ok(r) => metrics.set_resources(&r),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read verged's /systeminfo/resources")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn names_types_and_labels_are_edgeagents() {
        let m = AgentMetrics::new("hub.example", "edge1");
        m.started("filter", "1.0");
        m.started("filter", "1.0");
        m.stopped("filter", "1.0");
        m.command("start", Duration::from_millis(250));
        let text = m.render();
        let common = "iothub=\"hub.example\",edge_device=\"edge1\",instance_number=\"";
        assert!(
            text.contains("# TYPE edgeAgent_module_start_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE edgeAgent_module_stop_total counter\n"));
        assert!(text.contains("# TYPE edgeAgent_command_latency_seconds gauge\n"));
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.contains(common), "{l}");
        }
        let start = text
            .lines()
            .find(|l| l.starts_with("edgeAgent_module_start_total{"))
            .unwrap();
        assert!(
            start.ends_with(",module_name=\"filter\",module_version=\"1.0\"} 2"),
            "{start}"
        );
        assert_eq!(value(&text, "edgeAgent_module_stop_total{"), Some(1.0));
        assert_eq!(
            value(&text, "edgeAgent_command_latency_seconds{"),
            Some(0.25)
        );
    }

    #[test]
    fn running_time_accumulates_only_while_running() {
        let m = AgentMetrics::new("h", "d");
        let expected: BTreeSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let running: BTreeSet<String> = ["a".to_owned()].into();
        m.observe(&expected, &running);
        std::thread::sleep(Duration::from_millis(120));
        m.observe(&expected, &running);
        let text = m.render();
        let get = |metric: &str, module: &str| {
            text.lines()
                .find(|l| l.starts_with(metric) && l.contains(&format!("module_name=\"{module}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap()
        };
        let exp_a = get("edgeAgent_total_time_expected_running_seconds", "a");
        assert!(exp_a >= 0.1, "{text}");
        assert!((get("edgeAgent_total_time_running_correctly_seconds", "a") - exp_a).abs() < 1e-9);
        assert!(get("edgeAgent_total_time_expected_running_seconds", "b") >= 0.1);
        assert!(get("edgeAgent_total_time_running_correctly_seconds", "b").abs() < 1e-9);
    }

    #[test]
    fn resources_map_to_edgeagents_gauges() {
        // The shape verged's /systeminfo/resources answers (crates/daemon/src/mgmt.rs).
        let r: SystemResources = serde_json::from_value(serde_json::json!({
            "host_uptime": 1000, "process_uptime": 60, "used_cpu": 12.5,
            "used_ram": 400, "total_ram": 1000,
            "disks": [{"name": "/dev/sda1", "mount_point": "/", "available_space": 10,
                       "total_space": 100, "file_system": "ext4"}],
            "docker_stats": null,
            "modules": [{"name": "filter", "pid": 42, "processes": 2, "cpu_percent": 3.5,
                         "memory_bytes": 2048}],
            "notes": []
        }))
        .unwrap();
        let m = AgentMetrics::new("h", "d");
        m.set_resources(&r);
        let text = m.render();
        for (prefix, want) in [
            ("edgeAgent_host_uptime_seconds{", 1000.0),
            ("edgeAgent_iotedged_uptime_seconds{", 60.0),
            ("edgeAgent_available_disk_space_bytes{", 10.0),
            ("edgeAgent_total_disk_space_bytes{", 100.0),
        ] {
            assert_eq!(value(&text, prefix), Some(want), "{prefix}\n{text}");
        }
        assert!(
            text.contains(
                "disk_name=\"/dev/sda1\",disk_filesystem=\"ext4\",disk_filetype=\"/\"} 100"
            )
        );
        assert!(text.contains("module_name=\"host\"} 400"), "{text}");
        assert!(text.contains("module_name=\"filter\"} 2048"));
        assert!(text.contains("# TYPE edgeAgent_created_pids_total gauge"));
        assert!(text.contains("module_name=\"filter\"} 3.5"));
    }
}

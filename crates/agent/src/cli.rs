//! `verge-agent`: runs the reconcile loop against the deployment manifest.
//!
//! Started by verged (`IOTEDGE_MANAGEMENTURI` set), it runs the modules through
//! verged's management API (`--runtime verged`, the default then); otherwise it
//! drives a backend directly (`--runtime process|docker`).
//!
//! Desired state comes from one of two sources:
//! * the agent's module twin in the cloud (`{device}/$edgeAgent`), when the
//!   edge environment names an IoT hub (`IOTEDGE_IOTHUBHOSTNAME`,
//!   `IOTEDGE_WORKLOADURI`, … as verged sets them) and `--no-twin` is not
//!   given: see [`crate::twin`];
//! * a local file, `--manifest`.
//!
//! When both are present the **file wins**: it is an explicit setting of
//! whoever configured this agent (a device taken off cloud management, a
//! test bench), while the twin link follows implicitly from the environment.
//! The twin link then still reports the status, and the twin's desired
//! properties are ignored (logged). Whatever the source, the last accepted
//! manifest is persisted in the storage directory, so an agent restarted
//! offline restores the same modules before (or without) reaching the cloud.
//!
//! [`main`] is the whole program; the `verge-agent` executable and the
//! multi-call `verge-edge` (which shares one copy of the code among
//! verged, the agent and the hub) both call it.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::methods::{Methods, MethodsConfig, Trust};
use crate::{Agent, AgentConfig, ManagementRuntime, TwinLink, TwinOptions};
use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::Value;
use verge_runtime::{DockerConfig, DockerRuntime, ModuleRuntime, ProcessConfig, ProcessRuntime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// verged's management API (`--management-uri` / `IOTEDGE_MANAGEMENTURI`).
    Verged,
    /// Child processes of the agent (no identities, no workload sockets).
    Process,
    /// The Docker Engine directly (no identities, no workload sockets).
    Docker,
}

/// Variables of the agent's own environment passed on to every module unless
/// the manifest sets them (reference §7.4).
const INHERITED_ENV: [&str; 2] = ["RuntimeLogLevel", "UpstreamProtocol"];

/// The Verge edge agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Deployment manifest: `{"modulesContent": …}` or `$edgeAgent` desired
    /// properties. Re-read when it changes. Without it, the last accepted
    /// manifest in the storage directory is used.
    #[arg(long, env = "VERGE_AGENT_MANIFEST")]
    manifest: Option<PathBuf>,
    /// The agent's storage directory (manifest, restart records,
    /// reported.json). Default, as Azure's edgeAgent: `{storageFolder}/edgeAgent`
    /// from the `storageFolder` variable, else in the temp directory.
    #[arg(long, env = "VERGE_AGENT_STORAGE")]
    storage: Option<PathBuf>,
    /// Module runtime backend. Default: `verged` when a management URI is
    /// given (verged sets `IOTEDGE_MANAGEMENTURI`), else `process`.
    #[arg(long, value_enum, env = "VERGE_AGENT_RUNTIME")]
    runtime: Option<Backend>,
    /// verged's management socket, `unix:///…`.
    #[arg(long, env = "IOTEDGE_MANAGEMENTURI")]
    management_uri: Option<String>,
    /// State directory of the process backend (`--runtime process`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Docker Engine URI.
    #[arg(long)]
    docker_uri: Option<String>,
    /// Reconcile interval in milliseconds.
    #[arg(long, default_value_t = 5000)]
    interval_ms: u64,
    /// Minimum interval between two reported-properties updates (to
    /// `reported.json` and to the cloud), in milliseconds; changes in between
    /// are coalesced.
    #[arg(long, env = "VERGE_AGENT_REPORT_INTERVAL_MS", default_value_t = 2000)]
    report_interval_ms: u64,
    /// Do not connect to the cloud even when the edge environment names a hub.
    #[arg(long, env = "VERGE_AGENT_NO_TWIN")]
    no_twin: bool,
    /// Port of the IoT hub (`IOTEDGE_IOTHUBHOSTNAME`); default by the
    /// upstream protocol: 8883 (MQTT), 443 (over WebSocket).
    #[arg(long, env = "VERGE_AGENT_UPSTREAM_PORT")]
    upstream_port: Option<u16>,
    /// Azure IoT Edge's `UpstreamProtocol`: Mqtt (default), MqttWs (443,
    /// through `https_proxy` if set), Amqp/AmqpWs (no AMQP upstream yet:
    /// run as Mqtt/MqttWs, with a warning).
    #[arg(long, env = "UpstreamProtocol")]
    upstream_protocol: Option<String>,
    /// A PEM file of CA certificates to trust for the hub, besides the
    /// workload API's trust bundle and the system roots.
    #[arg(long, env = "VERGE_AGENT_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Where edgeAgent's Prometheus metrics are served (`/metrics`);
    /// `MetricsEnabled` and `Metrics__Listener__Host|Port|Suffix` in the
    /// environment (as a manifest sets them) override it.
    #[arg(
        long,
        env = "VERGE_AGENT_METRICS_LISTEN",
        default_value = "0.0.0.0:9600"
    )]
    metrics_listen: std::net::SocketAddr,
    /// Serve no metrics (as `MetricsEnabled=false`).
    #[arg(long, env = "VERGE_AGENT_NO_METRICS")]
    no_metrics: bool,
    /// Seconds between two reads of verged's `/systeminfo/resources` for the
    /// resource metrics (edgeAgent's `PerformanceMetricsUpdateFrequency`, 5 min).
    #[arg(
        long,
        env = "VERGE_AGENT_RESOURCES_INTERVAL_SECS",
        default_value_t = 300
    )]
    resources_interval_secs: u64,
}

/// Starts the metrics endpoint and, under verged, the resource sampler, as
/// tasks of `sd`. A port already taken is logged and the agent runs without
/// metrics (they are for watching it; modules must run regardless).
async fn start_metrics(
    args: &Args,
    metrics: crate::metrics::AgentMetrics,
    mgmt: Option<ManagementRuntime>,
    sd: &verge_shutdown::Shutdown,
) -> anyhow::Result<()> {
    let settings = verge_metrics::Settings {
        enabled: !args.no_metrics,
        addr: args.metrics_listen,
        suffix: verge_metrics::DEFAULT_SUFFIX.to_owned(),
    }
    .with_env()
    .context("metrics settings")?;
    match verge_metrics::bind(&settings).await {
        Ok(Some(bound)) => {
            tracing::info!(addr = %bound.local_addr()?, path = %settings.suffix, "serving metrics");
            sd.spawn_until_cancelled(
                "metrics listener",
                verge_metrics::serve(bound, Arc::new(metrics.clone()), sd.clone()),
            );
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::error!(addr = %settings.addr, error = %e, "cannot bind the metrics listener; running without metrics");
            return Ok(());
        }
    }
    if let Some(mgmt) = mgmt {
        let every = Duration::from_secs(args.resources_interval_secs.max(1));
        sd.spawn_until_cancelled(
            "resource metrics",
            crate::metrics::sample_resources(metrics, mgmt, every, sd.clone()),
        );
    }
    Ok(())
}

/// The twin link, when the environment names a hub and it is not turned off;
/// its direct methods act on `runtime`.
async fn twin_link(
    args: &Args,
    runtime: Arc<dyn ModuleRuntime>,
    own_name: Option<String>,
) -> anyhow::Result<Option<TwinLink>> {
    if args.no_twin {
        return Ok(None);
    }
    let env = match verge_sdk::EdgeEnvironment::from_env_upstream() {
        Ok(env) => env,
        Err(e) => {
            tracing::info!(reason = %e, "no twin link to the cloud");
            return Ok(None);
        }
    };
    let extra_ca_pem = match &args.upstream_ca {
        Some(p) => Some(
            tokio::fs::read_to_string(p)
                .await
                .with_context(|| format!("reading --upstream-ca {}", p.display()))?,
        ),
        None => None,
    };
    let methods = Methods::new(
        runtime,
        MethodsConfig {
            iothub: env.iothub_hostname.clone(),
            device: env.device_id.clone(),
            trust: Trust {
                env: Some(env.clone()),
                extra_ca_pem: extra_ca_pem.clone(),
            },
            own_name,
        },
    );
    let (websocket, proxy) = upstream_transport(
        args.upstream_protocol.as_deref(),
        &env.gateway_hostname,
        |k| std::env::var(k).ok(),
    )?;
    let port = args.upstream_port.unwrap_or(if websocket {
        verge_dial::protocol::WS_PORT
    } else {
        verge_dial::protocol::MQTT_PORT
    });
    Ok(Some(TwinLink::spawn(TwinOptions {
        env,
        port,
        websocket,
        proxy,
        extra_ca_pem,
        min_gap: Duration::from_millis(args.report_interval_ms),
        methods,
    })))
}

/// The twin link's transport from `UpstreamProtocol` (`protocol`) and
/// `https_proxy`/`no_proxy` (`var`): over WebSocket or not, and the proxy
/// (used only over WebSocket, as IoT Edge does).
fn upstream_transport(
    protocol: Option<&str>,
    host: &str,
    var: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<(bool, Option<verge_dial::Proxy>)> {
    use verge_dial::UpstreamProtocol;
    let requested: UpstreamProtocol = match protocol.filter(|p| !p.trim().is_empty()) {
        Some(p) => p.parse()?,
        None => UpstreamProtocol::default(),
    };
    let route = verge_dial::Route::new(requested, host, var)?;
    let protocol = route.protocol;
    if route.falls_back() {
        tracing::warn!(requested = %requested, using = %protocol,
            "the agent's twin link speaks MQTT only: it uses MQTT over the same transport (the hub's upstream uses AMQP)");
    }
    if let Some(p) = &route.unused_proxy {
        tracing::warn!(proxy = %p, %protocol,
            "https_proxy is set but UpstreamProtocol is not a WebSocket one: the twin link does not use it");
    }
    Ok((protocol.websocket(), route.proxy))
}

/// Waits for a new desired document from the cloud; never, without a link.
async fn twin_changed(link: &mut Option<TwinLink>) {
    match link {
        Some(l) => l.changed().await,
        None => std::future::pending().await,
    }
}

/// Runs verge-agent with command-line `args` (the first is the program
/// name); errors are printed and give a failure exit code.
pub fn main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    verge_log::init(verge_log::Stream::Stdout);
    let mut cfg = AgentConfig {
        reconcile_interval: Duration::from_millis(args.interval_ms.max(1)),
        report_interval: Duration::from_millis(args.report_interval_ms),
        ..AgentConfig::default()
    };
    // SIGTERM (verged, docker stop) and SIGINT alike end the loop below.
    let mut signals = verge_shutdown::Signals::install()?;
    let backend = args.runtime.unwrap_or(if args.management_uri.is_some() {
        Backend::Verged
    } else {
        Backend::Process
    });
    let mut own_name = None;
    let runtime: Arc<dyn ModuleRuntime> = match backend {
        Backend::Verged => {
            let uri = args
                .management_uri
                .clone()
                .context("--runtime verged needs --management-uri or IOTEDGE_MANAGEMENTURI")?;
            let rt = ManagementRuntime::from_uri(&uri)?;
            // Wait for verged (it may still be starting); the backend kind
            // decides how images are written.
            let mut delay = Duration::from_millis(200);
            let info = loop {
                match rt.info().await {
                    Ok(i) => break i,
                    Err(e) => {
                        tracing::warn!(error = %e, "verged's management API not reachable yet");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            _ = signals.recv() => return Ok(()),
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            };
            tracing::info!(socket = %rt.socket().display(), kind = %info.kind, "using verged's management API");
            // verged serves its process agent's logs by name without listing
            // it as a module; the log methods may select it.
            own_name = rt.agent_info().await.ok().map(|a| a.name);
            cfg.normalize_image = info.kind != "process";
            for k in INHERITED_ENV {
                if let Ok(v) = std::env::var(k) {
                    cfg.extra_env.insert(k.to_owned(), v);
                }
            }
            Arc::new(rt)
        }
        Backend::Process => {
            let dir = args.state_dir.clone().context("--runtime process needs --state-dir (under verged, set IOTEDGE_MANAGEMENTURI or --management-uri)")?;
            cfg.normalize_image = false;
            Arc::new(
                ProcessRuntime::open(ProcessConfig::new(dir))
                    .await
                    .context("opening the process runtime")?,
            )
        }
        Backend::Docker => {
            let mut dc = DockerConfig::default();
            if let Some(uri) = args.docker_uri.clone() {
                dc.uri = uri;
            }
            Arc::new(DockerRuntime::new(dc))
        }
    };
    let storage = storage_dir(args.storage.clone());
    let mut agent = Agent::open(runtime.clone(), cfg.clone(), &storage)
        .await
        .context("opening the agent storage")?;
    let sd = verge_shutdown::Shutdown::new();
    let mgmt = match (backend, &args.management_uri) {
        (Backend::Verged, Some(uri)) => Some(ManagementRuntime::from_uri(uri)?),
        _ => None,
    };
    start_metrics(&args, agent.metrics(), mgmt, &sd).await?;
    let mut twin = twin_link(&args, runtime, own_name).await?;
    if let Some(link) = &twin {
        agent.report_to(link.reporter());
    }
    let mut ticker = tokio::time::interval(cfg.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(backend = ?backend, "verge-agent started");
    let mut last_text: Option<String> = None;
    let mut last_twin: Option<Value> = None;
    loop {
        // A new deployment from the cloud, or an image that finished
        // downloading, is acted on at once, not at the next tick.
        tokio::select! {
            _ = ticker.tick() => {}
            () = twin_changed(&mut twin) => {}
            () = agent.pull_ended() => {}
            signal = signals.recv() => {
                tracing::info!(signal = %signal?, "shutting down");
                break;
            }
        }
        if let Some(d) = twin.as_mut().and_then(TwinLink::desired)
            && last_twin.as_ref() != Some(&d)
        {
            if args.manifest.is_some() {
                tracing::info!(
                    version = ?d.get("$version"),
                    "the twin's desired properties are ignored: --manifest takes precedence"
                );
            } else {
                match agent.set_desired(&d).await {
                    Ok(changed) => {
                        tracing::info!(changed, version = ?d.get("$version"), "deployment from the twin")
                    }
                    Err(e) => tracing::warn!(error = %e, "deployment from the twin refused"),
                }
            }
            last_twin = Some(d);
        }
        if let Some(path) = &args.manifest {
            match tokio::fs::read_to_string(path).await {
                Ok(text) if last_text.as_deref() != Some(text.as_str()) => {
                    match agent.set_desired_text(&text).await {
                        Ok(changed) => tracing::info!(changed, "manifest read"),
                        Err(e) => tracing::warn!(error = %e, "manifest refused"),
                    }
                    last_text = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cannot read the manifest")
                }
            }
        }
        let out = tokio::select! {
            out = agent.reconcile() => out,
            signal = signals.recv() => {
                tracing::info!(signal = %signal?, "shutting down");
                break;
            }
        };
        for e in &out.errors {
            tracing::warn!(error = %e, "reconcile");
        }
    }
    agent.shutdown().await;
    if let Some(link) = twin {
        // verged allows 10 s between SIGTERM and SIGKILL.
        link.close(Duration::from_secs(3)).await;
    }
    let left = sd.finish(Duration::from_secs(2)).await;
    if !left.is_empty() {
        tracing::warn!(tasks = ?left, "tasks still running at exit");
    }
    tracing::info!("verge-agent stopped");
    Ok(())
}
/// `--storage`, else Azure's `storageFolder` (any case) + `/edgeAgent`,
/// else the temp directory (lost with a container, as edgeAgent's).
fn storage_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir;
    }
    let folder = std::env::vars()
        .find(|(k, v)| k.eq_ignore_ascii_case("storageFolder") && !v.trim().is_empty())
        .map(|(_, v)| PathBuf::from(v.trim()));
    match folder {
        Some(f) => f.join("edgeAgent"),
        None => {
            let dir = std::env::temp_dir().join("edgeAgent");
            tracing::warn!(dir = %dir.display(),
                "neither --storage nor storageFolder is set: the agent keeps its state in the temp directory");
            dir
        }
    }
}

#[cfg(test)]
mod transport_tests {
    #![allow(clippy::unwrap_used)]
    use super::upstream_transport;

    #[test]
    fn protocol_and_proxy_for_the_twin_link() {
        let proxy = |k: &str| (k == "https_proxy").then(|| "http://u:p@proxy:3128".to_owned());
        let none = |_: &str| None;
        // Default and Mqtt: TLS, and a proxy is not used.
        assert_eq!(
            upstream_transport(None, "hub", proxy).unwrap(),
            (false, None)
        );
        assert_eq!(
            upstream_transport(Some("MQTT"), "hub", proxy).unwrap(),
            (false, None)
        );
        // Amqp falls back to Mqtt.
        assert_eq!(
            upstream_transport(Some("amqp"), "hub", none).unwrap(),
            (false, None)
        );
        // Over WebSocket, through the proxy (AmqpWs falls back to MqttWs).
        for p in ["MqttWs", "amqpws"] {
            let (ws, px) = upstream_transport(Some(p), "hub", proxy).unwrap();
            assert!(ws);
            assert_eq!(px.unwrap().to_string(), "http://proxy:3128");
        }
        assert_eq!(
            upstream_transport(Some("mqttws"), "hub", none).unwrap(),
            (true, None)
        );
        assert!(upstream_transport(Some("http"), "hub", none).is_err());
    }
}

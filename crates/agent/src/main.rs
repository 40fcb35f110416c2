//! `verge-agent`: runs the reconcile loop against a local manifest file.
//!
//! Started by verged (`IOTEDGE_MANAGEMENTURI` set), it runs the modules through
//! verged's management API (`--runtime verged`, the default then); otherwise it
//! drives a backend directly (`--runtime process|docker`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use verge_agent::{Agent, AgentConfig, ManagementRuntime};
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
    /// The agent's storage directory (manifest, restart records, reported.json).
    #[arg(long, env = "VERGE_AGENT_STORAGE")]
    storage: PathBuf,
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut cfg = AgentConfig {
        reconcile_interval: Duration::from_millis(args.interval_ms.max(1)),
        ..AgentConfig::default()
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let backend = args.runtime.unwrap_or(if args.management_uri.is_some() {
        Backend::Verged
    } else {
        Backend::Process
    });
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
                            _ = term.recv() => return Ok(()),
                            _ = int.recv() => return Ok(()),
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            };
            tracing::info!(socket = %rt.socket().display(), kind = %info.kind, "using verged's management API");
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
    let mut agent = Agent::open(runtime, cfg.clone(), &args.storage)
        .await
        .context("opening the agent storage")?;
    let mut ticker = tokio::time::interval(cfg.reconcile_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_text: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
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
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        for e in &out.errors {
            tracing::warn!(error = %e, "reconcile");
        }
    }
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

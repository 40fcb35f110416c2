//! `verge-agent`: runs the reconcile loop against a local manifest file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use verge_agent::{Agent, AgentConfig};
use verge_runtime::{DockerConfig, DockerRuntime, ModuleRuntime, ProcessConfig, ProcessRuntime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Process,
    Docker,
}

/// The Verge edge agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Deployment manifest: `{"modulesContent": …}` or `$edgeAgent` desired
    /// properties. Re-read when it changes. Without it, the last accepted
    /// manifest in the storage directory is used.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The agent's storage directory (manifest, restart records, reported.json).
    #[arg(long)]
    storage: PathBuf,
    /// Module runtime backend.
    #[arg(long, value_enum, default_value = "process")]
    runtime: Backend,
    /// State directory of the process backend.
    #[arg(long, required_if_eq("runtime", "process"))]
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
    let runtime: Arc<dyn ModuleRuntime> = match args.runtime {
        Backend::Process => {
            let dir = args.state_dir.clone().context("--state-dir is required")?;
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
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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

//! The `verge-hub` binary.

use std::path::PathBuf;

use clap::Parser;

/// verge-hub: the edge hub (local IoT Hub proxy).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, env = "VERGE_HUB_CONFIG")]
    config: PathBuf,
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
    let cfg = verge_hub::config::Config::load(&args.config)?;
    // Run by verged as its edgeHub module: identities and certificate from
    // verged for whatever the file leaves out.
    let edge = verge_hub::identity::EdgeEnv::from_env().map_err(|e| anyhow::anyhow!(e))?;
    let cfg = cfg
        .with_edge_env(edge)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let mut hub = verge_hub::Hub::start(cfg).await?;
    tokio::select! {
        _ = hub.wait() => anyhow::bail!("a hub task stopped unexpectedly"),
        r = tokio::signal::ctrl_c() => {
            r?;
            tracing::info!("shutting down");
            hub.shutdown().await;
        }
    }
    Ok(())
}

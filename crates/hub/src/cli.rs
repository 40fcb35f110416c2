//! The `verge-hub` binary.
//!
//! [`main`] is the whole program; the `verge-hub` executable and the
//! multi-call `verge-edge` (which shares one copy of the code among
//! verged, the agent and the hub) both call it.
use std::path::PathBuf;

use clap::Parser;

/// verge-hub: the edge hub (local IoT Hub proxy).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, env = "VERGE_HUB_CONFIG")]
    config: PathBuf,
    /// If the message store cannot be opened, move it aside
    /// (`<dir>.damaged-<time>`, nothing deleted) and start with an empty one.
    /// A store found damaged is moved aside without it.
    #[arg(long, env = "VERGE_HUB_SALVAGE")]
    salvage: bool,
}

/// Runs verge-hub with command-line `args` (the first is the program
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
    let cfg = crate::config::Config::load(&args.config)?;
    // Run by verged as its edgeHub module: identities and certificate from
    // verged for whatever the file leaves out.
    let edge = crate::identity::EdgeEnv::from_env().map_err(|e| anyhow::anyhow!(e))?;
    let cfg = cfg
        .with_edge_env(edge)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let cfg = crate::config::Config {
        salvage_store: args.salvage,
        ..cfg
    };
    let mut hub = crate::Hub::start(cfg).await?;
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

//! `verge-filter-module`: runs the filter inside an edge module.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let client = verge_sdk::ModuleClient::from_edge_environment().await?;
    verge_filter_module::run(client, verge_filter_module::DEFAULT_THRESHOLD).await?;
    Ok(())
}

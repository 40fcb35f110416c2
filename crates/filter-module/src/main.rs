//! `verge-filter-module`: runs the filter inside an edge module.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    verge_log::init(verge_log::Stream::Stdout);
    let work = async {
        let client = verge_sdk::ModuleClient::from_edge_environment().await?;
        verge_filter_module::run(client, verge_filter_module::DEFAULT_THRESHOLD).await?;
        anyhow::Ok(())
    };
    tokio::select! {
        r = work => r,
        r = verge_sdk::stop_signal() => {
            tracing::info!("stopping");
            Ok(r?)
        }
    }
}

//! `verge-simulated-temperature-sensor`: runs the sensor inside an edge module.

use verge_simulated_temperature_sensor::{SensorModule, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    verge_log::init(verge_log::Stream::Stdout);
    let work = async {
        let client = verge_sdk::ModuleClient::from_edge_environment().await?;
        let sensor = SensorModule::start(client, Settings::from_env()).await?;
        let sent = sensor.run().await?;
        tracing::info!(sent, "all messages sent; idling (methods stay available)");
        std::future::pending::<anyhow::Result<()>>().await
    };
    tokio::select! {
        r = work => r,
        r = verge_sdk::stop_signal() => {
            tracing::info!("stopping");
            Ok(r?)
        }
    }
}

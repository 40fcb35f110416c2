//! sensor → filter → observer through an in-process `verge-hub`.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../sdk/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use serde_json::json;
use verge_sdk::{Incoming, InputMessage};
use verge_simulated_temperature_sensor::{MACHINE_START, SensorModule, Settings};

fn temp(body: &[u8]) -> f64 {
    verge_filter_module::machine_temperature(body).unwrap()
}

/// Reads the observer's inputs until `raw_n` raw readings and `alerts_n(raws)` alerts arrived.
async fn collect(
    inputs: &mut Incoming<InputMessage>,
    raw_n: usize,
    alerts_n: impl Fn(&[Bytes]) -> Option<usize>,
) -> (Vec<Bytes>, Vec<InputMessage>) {
    let (mut raws, mut alerts) = (Vec::new(), Vec::new());
    loop {
        if raws.len() == raw_n && alerts_n(&raws) == Some(alerts.len()) {
            return (raws, alerts);
        }
        let m = tokio::time::timeout(T, inputs.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out: {} raws, {} alerts", raws.len(), alerts.len()))
            .unwrap();
        match m.input.as_str() {
            "raw" => raws.push(m.message.body),
            "alerts" => alerts.push(m),
            other => panic!("unexpected input {other}"),
        }
    }
}

async fn wait_reported_threshold(filter: &verge_sdk::ModuleClient, t: f64) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let twin = filter.get_twin().await.unwrap();
        if twin["reported"]["TemperatureThreshold"].as_f64() == Some(t) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{twin}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_filter_observer_pipeline_with_threshold_changes_and_reset() {
    init_tracing();
    let env = env();
    env.set_desired(&json!({"edge1/sensor": {"SendInterval": 0.02, "MessageCount": 12}}));
    let hub = env.start_hub(DEFAULT_ROUTES).await;
    let sensor_client = module(&hub, &env, "sensor").await;
    let filter_client = module(&hub, &env, "filter").await;
    let observer = module(&hub, &env, "observer").await;
    let mut inputs = observer.inputs().await.unwrap();

    let filter_task = tokio::spawn(verge_filter_module::run(filter_client.clone(), 25.0));
    wait_reported_threshold(&filter_client, 25.0).await;

    let sensor = SensorModule::start(sensor_client, Settings::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while sensor.settings().message_count != 12 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sensor.settings().send_interval, Duration::from_millis(20));

    // Phase 1: default threshold 25.
    assert_eq!(sensor.run().await.unwrap(), 12);
    let hot = |raws: &[Bytes]| Some(raws.iter().filter(|b| temp(b) > 25.0).count());
    let (raws, alerts) = collect(&mut inputs, 12, hot).await;
    let reading: serde_json::Value = serde_json::from_slice(&raws[0]).unwrap();
    assert_eq!(reading["machine"]["temperature"], MACHINE_START);
    for k in ["pressure", "temperature"] {
        assert!(reading["machine"][k].is_number());
    }
    for k in ["temperature", "humidity"] {
        assert!(reading["ambient"][k].is_number());
    }
    assert!(reading["timeCreated"].is_string());
    let expected: Vec<&Bytes> = raws.iter().filter(|b| temp(b) > 25.0).collect();
    assert!(!expected.is_empty());
    assert_eq!(
        alerts.iter().map(|a| &a.message.body).collect::<Vec<_>>(),
        expected
    );
    for a in &alerts {
        assert_eq!(a.message.properties.get("MessageType"), Some("Alert"));
        assert_eq!(a.message.properties.get("alert"), Some("true"));
        assert_eq!(
            a.message.system.connection_module_id.as_deref(),
            Some("filter")
        );
    }

    // Phase 2: reset the simulation, raise the threshold out of reach.
    let r = observer
        .invoke_method(
            DEVICE,
            Some("sensor"),
            "reset",
            json!(null),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    env.set_desired(&json!({
        "edge1/sensor": {"SendInterval": 0.02, "MessageCount": 5},
        "edge1/filter": {"TemperatureThreshold": 1000},
    }));
    wait_reported_threshold(&filter_client, 1000.0).await;
    while sensor.settings().message_count != 5 {
        assert!(tokio::time::Instant::now() < deadline + T);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sensor.run().await.unwrap(), 5);
    let (raws2, _) = collect(&mut inputs, 5, |_| Some(0)).await;
    assert_eq!(
        temp(&raws2[0]),
        MACHINE_START,
        "reset restarts the simulation"
    );

    // Phase 3: everything passes; the next alerts are exactly these readings,
    // so phase 2 produced none.
    env.set_desired(&json!({
        "edge1/sensor": {"SendInterval": 0.02, "MessageCount": 5},
        "edge1/filter": {"TemperatureThreshold": -100},
    }));
    wait_reported_threshold(&filter_client, -100.0).await;
    assert_eq!(sensor.run().await.unwrap(), 5);
    let (raws3, alerts3) = collect(&mut inputs, 5, |r| Some(r.len())).await;
    assert_eq!(
        alerts3
            .iter()
            .map(|a| a.message.body.clone())
            .collect::<Vec<_>>(),
        raws3
    );
    assert!(!filter_task.is_finished());
    filter_task.abort();
    hub.shutdown().await;
}

//! Example module: a temperature filter.
//!
//! Reads input `input1`; a message whose `machine.temperature` exceeds
//! `TemperatureThreshold` (desired property, default 25) is forwarded to
//! output `output1` with the same body and properties plus application
//! properties `MessageType: Alert` and `alert: true`. The threshold in use is
//! reported back as the reported property `TemperatureThreshold`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), verge_sdk::Error> {
//! let client = verge_sdk::ModuleClient::from_edge_environment().await?;
//! verge_filter_module::run(client, verge_filter_module::DEFAULT_THRESHOLD).await
//! # }
//! ```

use serde_json::{Value, json};
use verge_sdk::{InputMessage, Message, ModuleClient};

/// The input read.
pub const INPUT: &str = "input1";
/// The output alerts go to.
pub const OUTPUT: &str = "output1";
/// Default `TemperatureThreshold`.
pub const DEFAULT_THRESHOLD: f64 = 25.0;

/// `machine.temperature` of a reading, if the body is such a JSON document.
pub fn machine_temperature(body: &[u8]) -> Option<f64> {
    serde_json::from_slice::<Value>(body)
        .ok()?
        .get("machine")?
        .get("temperature")?
        .as_f64()
}

/// The alert for `msg` if it is above `threshold`.
pub fn filter(msg: &Message, threshold: f64) -> Option<Message> {
    let t = machine_temperature(&msg.body)?;
    if t <= threshold {
        return None;
    }
    let mut out = Message::new(msg.body.clone());
    out.system.content_type = msg.system.content_type.clone();
    out.system.content_encoding = msg.system.content_encoding.clone();
    for (k, v) in msg.properties.iter() {
        out.properties.insert(k, v);
    }
    out.properties.insert("MessageType", "Alert");
    out.properties.insert("alert", "true");
    Some(out)
}

async fn set_threshold(client: &ModuleClient, threshold: &mut f64, desired: &Value) {
    if let Some(t) = desired.get("TemperatureThreshold").and_then(Value::as_f64) {
        *threshold = t;
        tracing::info!(threshold = t, "TemperatureThreshold changed");
    }
    if let Err(e) = client
        .patch_reported(&json!({ "TemperatureThreshold": *threshold }))
        .await
    {
        tracing::warn!(error = %e, "cannot report TemperatureThreshold");
    }
}

/// Runs the filter until the client closes.
pub async fn run(client: ModuleClient, default_threshold: f64) -> Result<(), verge_sdk::Error> {
    let mut threshold = default_threshold;
    let mut patches = client.desired_patches().await?;
    let twin = client.get_twin().await?;
    set_threshold(&client, &mut threshold, &twin["desired"]).await;
    let mut inputs = client.inputs().await?;
    loop {
        tokio::select! {
            patch = patches.recv() => match patch {
                Some(p) => set_threshold(&client, &mut threshold, &p).await,
                None => return Ok(()),
            },
            input = inputs.recv() => match input {
                Some(InputMessage { input, message }) if input == INPUT => {
                    if let Some(alert) = filter(&message, threshold) {
                        client.send_output(OUTPUT, alert).await?;
                    }
                }
                Some(other) => tracing::debug!(input = %other.input, "message on an unknown input ignored"),
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_only_hot_readings_with_alert_properties() {
        let mut m = Message::new(r#"{"machine":{"temperature":30.5,"pressure":2}}"#);
        m.properties.insert("origin", "sensor");
        let a = filter(&m, 25.0).unwrap();
        assert_eq!(a.body, m.body);
        assert_eq!(a.properties.get("MessageType"), Some("Alert"));
        assert_eq!(a.properties.get("alert"), Some("true"));
        assert_eq!(a.properties.get("origin"), Some("sensor"));
        assert!(filter(&m, 30.5).is_none());
        assert!(filter(&Message::new("not json"), 0.0).is_none());
    }
}

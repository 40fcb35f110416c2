//! Example module: a simulated temperature sensor.
//!
//! Sends `{"machine":{"temperature":…,"pressure":…},"ambient":{"temperature":…,"humidity":…},"timeCreated":"…"}`
//! to output `temperatureOutput` every `SendInterval` seconds (desired property,
//! default 5; fractions allowed), and stops after `MessageCount` messages
//! (desired property, default 500; the `MessageCount` environment variable
//! overrides the default). The direct method `reset` restarts the simulation
//! (machine temperature back to its start value).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use verge_simulated_temperature_sensor::{SensorModule, Settings};
//! let client = verge_sdk::ModuleClient::from_edge_environment().await?;
//! let sensor = SensorModule::start(client, Settings::default()).await?;
//! let sent = sensor.run().await?;
//! # let _ = sent; Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use verge_core::time::Timestamp;
use verge_sdk::{Message, ModuleClient};

/// The output the readings go to.
pub const OUTPUT: &str = "temperatureOutput";

/// Machine temperature at start and after `reset`.
pub const MACHINE_START: f64 = 21.0;
const MACHINE_MAX: f64 = 100.0;

/// Run settings (defaults, then desired properties).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Seconds between messages (`SendInterval`).
    pub send_interval: Duration,
    /// Messages to send before stopping (`MessageCount`).
    pub message_count: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            send_interval: Duration::from_secs(5),
            message_count: 500,
        }
    }
}

impl Settings {
    /// Defaults overridden by the `MessageCount` and `SendInterval` environment variables.
    pub fn from_env() -> Self {
        let mut s = Self::default();
        if let Some(n) = std::env::var("MessageCount")
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            s.message_count = n;
        }
        if let Some(d) = std::env::var("SendInterval")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|v| Duration::try_from_secs_f64(v).ok())
        {
            s.send_interval = d;
        }
        s
    }

    /// Applies `SendInterval` / `MessageCount` from a desired section or patch.
    pub fn apply_desired(&mut self, desired: &Value) {
        if let Some(d) = desired
            .get("SendInterval")
            .and_then(Value::as_f64)
            .and_then(|v| Duration::try_from_secs_f64(v).ok())
        {
            self.send_interval = d;
        }
        if let Some(n) = desired.get("MessageCount").and_then(Value::as_u64) {
            self.message_count = n;
        }
    }
}

/// The simulated machine and ambient readings.
#[derive(Debug, Clone)]
pub struct Simulation {
    machine_temperature: f64,
    rng: u64,
}

impl Simulation {
    /// A simulation seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            machine_temperature: MACHINE_START,
            rng: seed | 1,
        }
    }

    /// Back to the start temperature.
    pub fn reset(&mut self) {
        self.machine_temperature = MACHINE_START;
    }

    /// Uniform in [0, 1) (xorshift64*).
    fn unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next reading: the machine heats up by 0.5–1.5 °C per reading up to
    /// 100 °C, pressure follows it (1–10 bar).
    pub fn next_reading(&mut self) -> Value {
        let t = self.machine_temperature;
        if t < MACHINE_MAX {
            self.machine_temperature = (t + 0.5 + self.unit()).min(MACHINE_MAX);
        }
        let pressure = 1.0 + (t - MACHINE_START) / (MACHINE_MAX - MACHINE_START) * 9.0;
        let ambient = 21.0 + self.unit() - 0.5;
        let humidity = 24.0 + self.unit() * 3.0;
        json!({
            "machine": { "temperature": t, "pressure": pressure },
            "ambient": { "temperature": ambient, "humidity": humidity },
            "timeCreated": Timestamp::now().to_iso8601(),
        })
    }
}

/// The running module: method handler and desired-property watcher installed.
#[derive(Debug)]
pub struct SensorModule {
    client: ModuleClient,
    sim: Arc<Mutex<Simulation>>,
    settings: Arc<Mutex<Settings>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SensorModule {
    /// Reads the twin's desired properties, starts following desired patches
    /// and registers the `reset` method.
    pub async fn start(client: ModuleClient, defaults: Settings) -> Result<Self, verge_sdk::Error> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        let sim = Arc::new(Mutex::new(Simulation::new(seed)));
        let settings = Arc::new(Mutex::new(defaults));
        let mut patches = client.desired_patches().await?;
        let twin = client.get_twin().await?;
        lock(&settings).apply_desired(&twin["desired"]);
        let s = settings.clone();
        tokio::spawn(async move {
            while let Some(p) = patches.recv().await {
                tracing::info!(patch = %p, "desired properties changed");
                lock(&s).apply_desired(&p);
            }
        });
        let m = sim.clone();
        client
            .on_method(move |req| {
                let m = m.clone();
                async move {
                    if req.name == "reset" {
                        lock(&m).reset();
                        tracing::info!("simulation reset");
                        (200, json!({ "result": "reset" }))
                    } else {
                        (
                            404,
                            json!({ "message": format!("unknown method {}", req.name) }),
                        )
                    }
                }
            })
            .await?;
        Ok(Self {
            client,
            sim,
            settings,
        })
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        lock(&self.settings).clone()
    }

    /// Sends readings until `MessageCount` have been sent; returns how many.
    pub async fn run(&self) -> Result<u64, verge_sdk::Error> {
        let mut sent = 0u64;
        loop {
            let Settings {
                send_interval,
                message_count,
            } = self.settings();
            if sent >= message_count {
                return Ok(sent);
            }
            let reading = lock(&self.sim).next_reading();
            let mut msg = Message::new(reading.to_string());
            msg.system.content_type = Some("application/json".into());
            msg.system.content_encoding = Some("utf-8".into());
            self.client.send_output(OUTPUT, msg).await?;
            sent += 1;
            tracing::debug!(sent, %reading, "reading sent");
            if sent < message_count {
                tokio::time::sleep(send_interval).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_have_the_azure_shape_and_heat_up() {
        let mut s = Simulation::new(42);
        let first = s.next_reading();
        assert_eq!(first["machine"]["temperature"], MACHINE_START);
        assert!(first["machine"]["pressure"].is_f64());
        assert!(first["ambient"]["temperature"].is_f64());
        assert!(first["ambient"]["humidity"].is_f64());
        assert!(first["timeCreated"].as_str().unwrap().ends_with('Z'));
        let mut last = MACHINE_START;
        for _ in 0..200 {
            let t = s.next_reading()["machine"]["temperature"].as_f64().unwrap();
            assert!(t >= last && t <= MACHINE_MAX);
            last = t;
        }
        assert_eq!(last, MACHINE_MAX);
        s.reset();
        assert_eq!(s.next_reading()["machine"]["temperature"], MACHINE_START);
    }

    #[test]
    fn desired_properties_override_settings() {
        let mut s = Settings::default();
        s.apply_desired(&json!({"SendInterval": 0.25, "MessageCount": 3, "$version": 2}));
        assert_eq!(s.send_interval, Duration::from_millis(250));
        assert_eq!(s.message_count, 3);
        s.apply_desired(&json!({"Other": 1}));
        assert_eq!(s.message_count, 3);
    }
}

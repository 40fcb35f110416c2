//! Reported properties in Azure's shape, and a reporter that sends only on
//! change and at most once per interval.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use verge_core::manifest::ModuleSpec as DesiredSpec;

/// Twin string values are cut into chunks of this size (`createOptions01`, …).
pub const CHUNK: usize = 512;

/// Emits a value only when it differs from the last one emitted, and at most
/// once per `interval`; a change arriving too early is kept and emitted by a
/// later [`Reporter::offer`] or [`Reporter::poll`].
#[derive(Debug, Clone)]
pub struct Reporter {
    interval: Duration,
    last_sent: Option<Value>,
    last_time: Option<Instant>,
    pending: Option<Value>,
}

impl Reporter {
    /// A reporter with this minimum interval.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_sent: None,
            last_time: None,
            pending: None,
        }
    }

    /// Offers the current value; returns what to send now, if anything.
    pub fn offer(&mut self, value: Value, now: Instant) -> Option<Value> {
        if self.last_sent.as_ref() == Some(&value) {
            self.pending = None;
            return None;
        }
        self.pending = Some(value);
        self.poll(now)
    }

    /// Emits a pending value once the interval allows it.
    pub fn poll(&mut self, now: Instant) -> Option<Value> {
        let due = self
            .last_time
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !due {
            return None;
        }
        let value = self.pending.take()?;
        self.last_sent = Some(value.clone());
        self.last_time = Some(now);
        Some(value)
    }

    /// The last value emitted.
    pub fn last_sent(&self) -> Option<&Value> {
        self.last_sent.as_ref()
    }
}

/// Serialised createOptions split into `createOptions`, `createOptions01`, …
pub fn chunked_create_options(settings: &mut Map<String, Value>, options: &str) {
    let chars: Vec<char> = options.chars().collect();
    if chars.is_empty() {
        settings.insert("createOptions".into(), Value::String(String::new()));
        return;
    }
    for (i, chunk) in chars.chunks(CHUNK).enumerate() {
        let key = if i == 0 {
            "createOptions".to_owned()
        } else {
            format!("createOptions{i:02}")
        };
        settings.insert(key, Value::String(chunk.iter().collect()));
    }
}

/// The desired fields copied back into a module's reported entry.
pub fn desired_fields(m: &DesiredSpec, system_agent: bool) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("type".into(), json!(m.module_type));
    let mut settings = Map::new();
    settings.insert("image".into(), json!(m.image));
    let opts = m
        .create_options
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default();
    chunked_create_options(&mut settings, &opts);
    if let Some(d) = &m.digest {
        settings.insert("digest".into(), json!(d));
    }
    out.insert("settings".into(), Value::Object(settings));
    let env: Map<String, Value> = m
        .env
        .iter()
        .map(|(k, v)| (k.clone(), json!({ "value": v })))
        .collect();
    out.insert("env".into(), Value::Object(env));
    if !system_agent {
        out.insert("version".into(), json!(m.version));
        out.insert("status".into(), json!(m.status.as_str()));
        out.insert("restartPolicy".into(), json!(m.restart_policy.as_str()));
        out.insert(
            "imagePullPolicy".into(),
            json!(m.image_pull_policy.as_str()),
        );
        if m.startup_order != u32::MAX {
            out.insert("startupOrder".into(), json!(m.startup_order));
        }
    } else {
        out.insert(
            "imagePullPolicy".into(),
            json!(m.image_pull_policy.as_str()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reporter_sends_on_change_rate_limited() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Reporter::new(ms(100));
        assert_eq!(r.offer(json!({"a": 1}), t0), Some(json!({"a": 1})));
        // unchanged: nothing
        assert_eq!(r.offer(json!({"a": 1}), t0 + ms(500)), None);
        // changed, but inside the interval since the last send… (which was at t0)
        let t1 = t0 + ms(600);
        assert_eq!(r.offer(json!({"a": 2}), t1), Some(json!({"a": 2})));
        assert_eq!(r.offer(json!({"a": 3}), t1 + ms(10)), None);
        assert_eq!(r.offer(json!({"a": 4}), t1 + ms(20)), None);
        assert_eq!(r.poll(t1 + ms(50)), None);
        // …the latest value goes out once the interval has passed
        assert_eq!(r.poll(t1 + ms(100)), Some(json!({"a": 4})));
        assert_eq!(r.poll(t1 + ms(500)), None);
        // going back to the last sent value cancels a pending change
        assert_eq!(r.offer(json!({"a": 5}), t1 + ms(110)), None);
        assert_eq!(r.offer(json!({"a": 4}), t1 + ms(120)), None);
        assert_eq!(r.poll(t1 + ms(400)), None);
        assert_eq!(r.last_sent(), Some(&json!({"a": 4})));
    }

    #[test]
    fn create_options_are_chunked() {
        let mut s = Map::new();
        let long = "x".repeat(CHUNK * 2 + 3);
        chunked_create_options(&mut s, &long);
        assert_eq!(s.len(), 3);
        assert_eq!(s["createOptions"].as_str().map(str::len), Some(CHUNK));
        assert_eq!(s["createOptions01"].as_str().map(str::len), Some(CHUNK));
        assert_eq!(s["createOptions02"].as_str(), Some("xxx"));
        let mut s = Map::new();
        chunked_create_options(&mut s, "{}");
        assert_eq!(s["createOptions"], "{}");
    }
}

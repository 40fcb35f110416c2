//! The hub's own configuration: the desired properties of its `$edgeHub`
//! twin (routes, store-and-forward), as in Azure IoT Edge.
//!
//! Every source of configuration goes through [`HubState::set_edgehub_desired`]:
//! the routes file (read at start and polled), the `$edgeHub` entry of the
//! twins file, and `PUT /edgehub/desired`. A document is checked whole
//! (envelope, every route, twin key rules) before anything changes; a refused
//! one leaves the routes in force untouched ("refuse whole, keep the old").
//! The accepted document is stored as the `$edgeHub` twin's desired
//! properties, so the twin always shows the configuration in force and the
//! last accepted one survives a restart. The outcome is reported on the twin
//! as `lastDesiredVersion` / `lastDesiredStatus {code, description}`.
//!
//! With an upstream the twin mirrors the cloud's desired properties, which
//! may be a document the hub refused; so the last accepted document is also
//! kept in its own file ([`ACCEPTED_FILE`]), and a hub restarting on a
//! refused twin puts those routes back in force rather than none.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use verge_core::manifest::EdgeHubDesired;
use verge_route::RouteSet;

use crate::HubState;

/// The last accepted `$edgeHub` document, in the storage directory.
pub const ACCEPTED_FILE: &str = "edgehub-accepted.json";

/// Why a new `$edgeHub` desired document was refused (the old routes stay).
#[derive(Debug, thiserror::Error)]
pub enum ConfigUpdateError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// Not a valid `$edgeHub` desired-properties document.
    #[error("invalid $edgeHub desired properties: {0}")]
    Document(String),
    /// A route does not compile.
    #[error("invalid routes: {0}")]
    Routes(String),
    /// Valid routes, but not storable as twin desired properties.
    #[error("not valid as twin desired properties: {0}")]
    Twin(String),
}

/// The routing configuration in force.
#[derive(Debug, Default)]
pub struct ActiveRoutes {
    /// The compiled routes.
    pub set: RouteSet,
    /// `storeAndForwardConfiguration.timeToLiveSecs`: the TTL of messages
    /// whose route sets none; `None` = never expire.
    pub default_ttl_secs: Option<u64>,
    /// `storeAndForwardConfiguration.storeLimits.maxSizeBytes`: the store's
    /// size limit; `None` = none.
    pub max_size_bytes: Option<u64>,
}

/// Parses and compiles a `$edgeHub` desired-properties document.
pub fn compile(value: &Value) -> Result<ActiveRoutes, ConfigUpdateError> {
    let desired = EdgeHubDesired::from_value(value)
        .map_err(|e| ConfigUpdateError::Document(e.to_string()))?;
    let set =
        RouteSet::new(&desired.routes).map_err(|e| ConfigUpdateError::Routes(e.to_string()))?;
    Ok(ActiveRoutes {
        set,
        default_ttl_secs: effective_default_ttl(desired.store_and_forward.time_to_live_secs),
        max_size_bytes: desired.store_and_forward.max_size_bytes,
    })
}

/// The global TTL in force for `storeAndForwardConfiguration.timeToLiveSecs`
/// as parsed (`None` = negative = never expire). 0 means "not set", as it
/// does for a route's own `timeToLiveSecs`: the default, 7200 s. Taken
/// literally it would expire every message the moment it is stored, which
/// no deployment means.
pub fn effective_default_ttl(parsed: Option<u64>) -> Option<u64> {
    match parsed {
        Some(0) => Some(verge_core::manifest::DEFAULT_TTL_SECS),
        other => other,
    }
}

/// Logs the TTLs a route set gives messages: the global one, and each
/// route's own where it sets one.
fn log_ttls(desired: &Value, routes: &ActiveRoutes) {
    let global = match routes.default_ttl_secs {
        Some(s) => format!("{s} s"),
        None => "never expire".to_owned(),
    };
    let configured = desired
        .pointer("/storeAndForwardConfiguration/timeToLiveSecs")
        .cloned()
        .unwrap_or(Value::Null);
    tracing::info!(effective = %global, %configured, "message TTL in force (storeAndForwardConfiguration.timeToLiveSecs)");
    if let Some(Value::Object(map)) = desired.get("routes") {
        for (name, spec) in map {
            match spec.get("timeToLiveSecs").and_then(Value::as_u64) {
                Some(ttl) if ttl > 0 => {
                    tracing::info!(route = %name, ttl_secs = ttl, "route TTL overrides the global one");
                }
                _ => {}
            }
        }
    }
}

/// [`compile`] for raw bytes (the routes file, an HTTP body).
pub fn parse(bytes: &[u8]) -> Result<(Value, ActiveRoutes), ConfigUpdateError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ConfigUpdateError::Json(e.to_string()))?;
    let routes = compile(&value)?;
    Ok((value, routes))
}

impl HubState {
    /// The client id of the hub's own twin (`{device}/$edgeHub`).
    pub fn edgehub_twin_id(&self) -> String {
        format!("{}/$edgeHub", self.cfg.device_id)
    }

    /// Validates and applies a new `$edgeHub` desired-properties document
    /// (see the module docs). Returns the number of routes in force.
    pub async fn set_edgehub_desired(&self, value: &Value) -> Result<usize, ConfigUpdateError> {
        // One update at a time, so the twin and the routes in force cannot disagree.
        let _serial = self.config_update.lock().await;
        let id = self.edgehub_twin_id();
        let outcome = self.try_set_edgehub_desired(&id, value).await;
        let status = match &outcome {
            Ok(_) => json!({"code": 200, "description": ""}),
            Err(e) => json!({"code": 400, "description": e.to_string()}),
        };
        let mut report = json!({"schemaVersion": "1.0", "lastDesiredStatus": status});
        if outcome.is_ok() {
            report["lastDesiredVersion"] = json!(self.twins.desired_version(&id));
        }
        if let Err(e) = self.twins.patch_reported(&id, &report).await {
            tracing::warn!(error = %e, "cannot report the $edgeHub configuration status");
        }
        outcome
    }

    async fn try_set_edgehub_desired(
        &self,
        id: &str,
        value: &Value,
    ) -> Result<usize, ConfigUpdateError> {
        let routes = compile(value)?;
        let Value::Object(map) = value else {
            // `compile` already refuses anything but an object.
            return Err(ConfigUpdateError::Document("not an object".into()));
        };
        let desired = strip_metadata(map);
        self.twins
            .set_desired(id, &desired)
            .await
            .map_err(|e| ConfigUpdateError::Twin(e.to_string()))?;
        let n = routes.set.len();
        log_ttls(value, &routes);
        self.install_routes(routes);
        // Serializing a map cannot fail.
        let bytes = serde_json::to_vec(&desired).unwrap_or_default();
        let path = self.cfg.storage_dir.join(ACCEPTED_FILE);
        if let Err(e) = verge_files::write_atomic_async(path.clone(), bytes).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the accepted $edgeHub configuration");
        }
        Ok(n)
    }

    /// At start, when the saved `$edgeHub` twin is refused: puts the last
    /// accepted document's routes in force (the twin, a mirror of the
    /// cloud's, is left as it is). Returns the number of routes, if any.
    pub(crate) async fn restore_last_accepted(&self) -> Option<usize> {
        let path = self.cfg.storage_dir.join(ACCEPTED_FILE);
        let bytes = tokio::fs::read(&path).await.ok()?;
        match parse(&bytes) {
            Ok((_, routes)) => {
                let n = routes.set.len();
                self.install_routes(routes);
                Some(n)
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "the last accepted $edgeHub configuration is refused too");
                None
            }
        }
    }
}

/// The document without twin metadata keys (`$version`, `$metadata`, …) a
/// client may have copied from a twin GET.
fn strip_metadata(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Polls the routes file and applies every change; a refused document is
/// logged and reported, and the previous routes stay active. `last` is the
/// content applied at start, so a change made in between is not missed.
pub(crate) async fn watch_routes_file(
    state: Arc<HubState>,
    path: PathBuf,
    mut last: Option<Vec<u8>>,
) {
    let period = Duration::from_millis(state.cfg.limits.routes_poll_ms.max(50));
    loop {
        tokio::time::sleep(period).await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                if last.is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the routes file; keeping the current routes");
                }
                last = None;
                continue;
            }
        };
        if last.as_ref() == Some(&bytes) {
            continue;
        }
        let applied = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => state.set_edgehub_desired(&v).await,
            Err(e) => Err(ConfigUpdateError::Json(e.to_string())),
        };
        match applied {
            Ok(n) => {
                tracing::info!(path = %path.display(), routes = n, "routes file changed; new routes applied");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "routes file refused; previous routes stay active");
            }
        }
        last = Some(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keys_are_dropped() {
        let Value::Object(m) = json!({"schemaVersion": "1.1", "$version": 4, "routes": {}}) else {
            unreachable!()
        };
        let s = strip_metadata(&m);
        assert!(s.contains_key("schemaVersion") && s.contains_key("routes"));
        assert!(!s.contains_key("$version"));
    }

    #[test]
    fn a_bad_route_refuses_the_whole_document() {
        let bad = br#"{"schemaVersion": "1.1", "routes": {
            "ok": "FROM /messages/* INTO $upstream",
            "bad": "FROM /messages/* INTO nowhere"}}"#;
        assert!(matches!(parse(bad), Err(ConfigUpdateError::Routes(_))));
        assert!(matches!(parse(b"{"), Err(ConfigUpdateError::Json(_))));
        assert!(matches!(
            parse(br#"{"schemaVersion": "9.0", "routes": {}}"#),
            Err(ConfigUpdateError::Document(_))
        ));
        let (_, routes) = parse(
            br#"{"schemaVersion": "1.1", "routes": {
            "ok": "FROM /messages/* INTO $upstream"}}"#,
        )
        .unwrap();
        assert_eq!(routes.set.len(), 1);
        assert_eq!(routes.default_ttl_secs, Some(7200));
    }

    #[test]
    fn a_global_ttl_of_0_means_the_default() {
        let ttl = |t: i64| {
            let doc = json!({"schemaVersion": "1.1", "routes": {},
                "storeAndForwardConfiguration": {"timeToLiveSecs": t}});
            compile(&doc).unwrap().default_ttl_secs
        };
        assert_eq!(ttl(0), Some(7200));
        assert_eq!(ttl(30), Some(30));
        assert_eq!(ttl(-1), None);
    }
}

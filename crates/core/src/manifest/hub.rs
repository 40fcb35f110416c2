//! `$edgeHub` desired properties: routes and store-and-forward settings.
//! Route *text* is checked by `verge-route`; here only its envelope.

use serde_json::Value;

use super::{ManifestError, check_schema, join, obj, type_name};

/// Priority of a route given as a plain string (schema 1.0) or an object
/// without `priority`: below every explicit priority 0–9.
pub const DEFAULT_ROUTE_PRIORITY: u32 = 2_000_000_000;

/// One named route, as the hub receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// The route's name (the key under `routes`).
    pub name: String,
    /// `FROM … [WHERE …] INTO …`.
    pub route: String,
    /// 0 (highest) to 9, or [`DEFAULT_ROUTE_PRIORITY`].
    pub priority: u32,
    /// Per-route TTL in seconds; 0 means "use the global TTL".
    pub time_to_live_secs: u32,
}

/// `storeAndForwardConfiguration`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreAndForward {
    /// Global message TTL in seconds; `None` = never expire (a negative value
    /// in the manifest). Absent in the manifest → 7200.
    pub time_to_live_secs: Option<u64>,
    /// `storeLimits.maxSizeBytes`.
    pub max_size_bytes: Option<u64>,
}

/// The default global TTL.
pub const DEFAULT_TTL_SECS: u64 = 7200;

/// `$edgeHub` desired properties.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeHubDesired {
    /// `schemaVersion` (1, 0..=3).
    pub schema_version: (u64, u64),
    /// Routes, in manifest order.
    pub routes: Vec<RouteSpec>,
    /// Store-and-forward settings.
    pub store_and_forward: StoreAndForward,
    /// `mqttBroker` (schema ≥ 1.2), kept as given for the broker.
    pub mqtt_broker: Option<Value>,
}

impl EdgeHubDesired {
    /// Parses and validates `$edgeHub` desired properties.
    pub fn from_value(v: &Value) -> Result<Self, ManifestError> {
        let m = obj(v, "")?;
        let schema_version = check_schema(m, 3)?;
        let mut routes = Vec::new();
        if let Some(r) = m.get("routes").filter(|r| !r.is_null()) {
            for (name, spec) in obj(r, "routes")? {
                let path = join("routes", name);
                if name.trim().is_empty() {
                    return Err(ManifestError::bad(path, "route names must not be empty"));
                }
                routes.push(parse_route(name, spec, &path, schema_version)?);
            }
        }
        let mut store_and_forward = StoreAndForward {
            time_to_live_secs: Some(DEFAULT_TTL_SECS),
            max_size_bytes: None,
        };
        if let Some(s) = m
            .get("storeAndForwardConfiguration")
            .filter(|s| !s.is_null())
        {
            let p = "storeAndForwardConfiguration";
            let s = obj(s, p)?;
            match s.get("timeToLiveSecs") {
                None | Some(Value::Null) => {}
                Some(t) => {
                    let n = t.as_i64().ok_or_else(|| {
                        ManifestError::bad(
                            join(p, "timeToLiveSecs"),
                            format!("expected an integer, found {t}"),
                        )
                    })?;
                    store_and_forward.time_to_live_secs = u64::try_from(n).ok();
                }
            }
            if let Some(l) = s.get("storeLimits").filter(|l| !l.is_null()) {
                let lp = join(p, "storeLimits");
                let l = obj(l, &lp)?;
                if let Some(b) = l.get("maxSizeBytes").filter(|b| !b.is_null()) {
                    store_and_forward.max_size_bytes = Some(b.as_u64().ok_or_else(|| {
                        ManifestError::bad(
                            join(&lp, "maxSizeBytes"),
                            format!("expected a non-negative integer, found {b}"),
                        )
                    })?);
                }
            }
        }
        let mqtt_broker = m.get("mqttBroker").filter(|b| !b.is_null()).cloned();
        if mqtt_broker.is_some() && schema_version < (1, 2) {
            return Err(ManifestError::bad(
                "mqttBroker",
                "needs schemaVersion 1.2 or later",
            ));
        }
        Ok(Self {
            schema_version,
            routes,
            store_and_forward,
            mqtt_broker,
        })
    }
}

fn parse_route(
    name: &str,
    spec: &Value,
    path: &str,
    schema: (u64, u64),
) -> Result<RouteSpec, ManifestError> {
    match spec {
        Value::String(route) => Ok(RouteSpec {
            name: name.to_owned(),
            route: route.clone(),
            priority: DEFAULT_ROUTE_PRIORITY,
            time_to_live_secs: 0,
        }),
        Value::Object(o) => {
            if schema < (1, 1) {
                return Err(ManifestError::bad(
                    path,
                    "route objects need schemaVersion 1.1 or later",
                ));
            }
            let route = match o.get("route") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(ManifestError::bad(
                        join(path, "route"),
                        format!("expected a string, found {}", type_name(other)),
                    ));
                }
                None => return Err(ManifestError::bad(join(path, "route"), "is required")),
            };
            let priority = match o.get("priority") {
                None | Some(Value::Null) => DEFAULT_ROUTE_PRIORITY,
                Some(p) => p
                    .as_u64()
                    .filter(|p| *p <= 9)
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| {
                        ManifestError::bad(
                            join(path, "priority"),
                            format!("must be an integer 0 to 9, found {p}"),
                        )
                    })?,
            };
            let time_to_live_secs = match o.get("timeToLiveSecs") {
                None | Some(Value::Null) => 0,
                Some(t) => t
                    .as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        ManifestError::bad(
                            join(path, "timeToLiveSecs"),
                            format!("must be an integer 0 to 4294967295, found {t}"),
                        )
                    })?,
            };
            Ok(RouteSpec {
                name: name.to_owned(),
                route,
                priority,
                time_to_live_secs,
            })
        }
        other => Err(ManifestError::bad(
            path,
            format!(
                "a route is a string or an object, found {}",
                type_name(other)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DeploymentStatusCode;
    use serde_json::json;

    #[test]
    fn routes_in_both_shapes() {
        let h = EdgeHubDesired::from_value(&json!({
            "schemaVersion": "1.1",
            "routes": {
                "plain": "FROM /messages/* INTO $upstream",
                "full": {"route": "FROM /* INTO $upstream", "priority": 0, "timeToLiveSecs": 86400},
                "noprio": {"route": "FROM /* INTO $upstream"}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": -1, "storeLimits": {"maxSizeBytes": 1000}}
        }))
        .unwrap();
        assert_eq!(
            h.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["plain", "full", "noprio"]
        );
        assert_eq!(h.routes[0].priority, DEFAULT_ROUTE_PRIORITY);
        assert_eq!(
            (h.routes[1].priority, h.routes[1].time_to_live_secs),
            (0, 86400)
        );
        assert_eq!(h.routes[2].priority, DEFAULT_ROUTE_PRIORITY);
        assert_eq!(
            h.store_and_forward,
            StoreAndForward {
                time_to_live_secs: None,
                max_size_bytes: Some(1000)
            }
        );
        let d = EdgeHubDesired::from_value(&json!({"schemaVersion": "1.3"})).unwrap();
        assert_eq!(
            d.store_and_forward.time_to_live_secs,
            Some(DEFAULT_TTL_SECS)
        );
    }

    #[test]
    fn refusals() {
        let bad = |v: Value| EdgeHubDesired::from_value(&v).unwrap_err();
        assert_eq!(
            bad(json!({"schemaVersion": "1.4"})).code,
            DeploymentStatusCode::InvalidSchemaVersion
        );
        assert_eq!(bad(json!({"schemaVersion": "2.0"})).code.as_u16(), 412);
        let e = bad(
            json!({"schemaVersion": "1.0", "routes": {"r": {"route": "FROM /* INTO $upstream"}}}),
        );
        assert_eq!((e.code.as_u16(), e.path.as_str()), (400, "routes.r"));
        let e =
            bad(json!({"schemaVersion": "1.1", "routes": {"r": {"route": "x", "priority": 10}}}));
        assert_eq!(e.path, "routes.r.priority");
        let e = bad(json!({"schemaVersion": "1.1", "routes": {"r": 5}}));
        assert!(e.message.contains("string or an object"));
        let e = bad(json!({"schemaVersion": "1.1", "routes": {"r": {"priority": 1}}}));
        assert_eq!(e.path, "routes.r.route");
        let e = bad(json!({"schemaVersion": "1.1", "routes": {"": "FROM /* INTO $upstream"}}));
        assert!(e.message.contains("must not be empty"));
        let e = bad(
            json!({"schemaVersion": "1.1", "storeAndForwardConfiguration": {"timeToLiveSecs": "x"}}),
        );
        assert_eq!(e.path, "storeAndForwardConfiguration.timeToLiveSecs");
        let e = bad(json!({"schemaVersion": "1.1", "mqttBroker": {}}));
        assert_eq!(e.path, "mqttBroker");
    }
}

//! Topic parsing, filter matching and per-identity authorization.

use verge_core::ClientId;

/// What a client publish is.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Telemetry or module output, with its (still encoded) property bag.
    Telemetry {
        /// Encoded property bag (may be empty).
        bag: &'a str,
    },
    /// `$iothub/twin/GET/?$rid=`.
    TwinGet {
        /// Request id.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid=`.
    TwinReported {
        /// Request id.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid=`.
    MethodResponse {
        /// The callee's status.
        status: i64,
        /// Request id.
        rid: String,
    },
    /// Anything else in the client's namespace.
    Other,
}

/// The topic prefix of an identity (`devices/{d}/` or `devices/{d}/modules/{m}/`).
pub fn own_prefix(client: &ClientId) -> String {
    match &client.module {
        None => format!("devices/{}/", client.device),
        Some(m) => format!("devices/{}/modules/{}/", client.device, m),
    }
}

/// True when `client` may publish on / subscribe to `topic` (filters included).
pub fn authorized(client: &ClientId, topic: &str) -> bool {
    topic.starts_with("$iothub/") || topic.starts_with(&own_prefix(client))
}

/// Classifies a publish from `client`; `None` when it is outside its namespace.
pub fn classify<'a>(client: &ClientId, topic: &'a str) -> Option<Inbound<'a>> {
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        let (path, query) = rest.split_once("/?").unwrap_or((rest, ""));
        let rid = query_param(query, "$rid").unwrap_or_default();
        let segs: Vec<&str> = path.split('/').collect();
        return Some(match segs.as_slice() {
            ["twin", "GET"] => Inbound::TwinGet { rid },
            ["twin", "PATCH", "properties", "reported"] => Inbound::TwinReported { rid },
            ["methods", "res", status] => match status.parse() {
                Ok(status) => Inbound::MethodResponse { status, rid },
                Err(_) => Inbound::Other,
            },
            _ => Inbound::Other,
        });
    }
    let rest = strip_own_prefix(client, topic)?;
    if let Some(bag) = rest.strip_prefix("messages/events/") {
        return Some(Inbound::Telemetry { bag });
    }
    if rest == "messages/events" {
        return Some(Inbound::Telemetry { bag: "" });
    }
    Some(Inbound::Other)
}

/// `topic` without [`own_prefix`] (compared in place: this runs per message).
fn strip_own_prefix<'a>(client: &ClientId, topic: &'a str) -> Option<&'a str> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(client.device.as_str())?
        .strip_prefix('/')?;
    match &client.module {
        None => Some(rest),
        Some(m) => rest
            .strip_prefix("modules/")?
            .strip_prefix(m.as_str())?
            .strip_prefix('/'),
    }
}

/// A value from a `k=v&k=v` query (`$` may be written `%24`).
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = k.replace("%24", "$");
        (k == key).then(|| v.to_owned())
    })
}

/// Application property IoT Hub adds to a Will it forwards as telemetry.
pub const WILL_PROPERTY: &str = "iothub-MessageType=Will";

/// The (encoded) property bag a client's MQTT Will is ingested with when its
/// connection ends without DISCONNECT, or `None` when its topic is not
/// allowed. As in IoT Hub, a Will is telemetry: its topic must be the
/// identity's own `devices/{d}[/modules/{m}]/messages/events/[{bag}]`, and
/// the message carries the application property `iothub-MessageType=Will`.
/// MQTT forbids wildcards in a Will topic.
pub fn will_bag(client: &ClientId, topic: &str) -> Option<String> {
    if topic.contains(['#', '+', '\0']) {
        return None;
    }
    match classify(client, topic)? {
        Inbound::Telemetry { bag: "" } => Some(WILL_PROPERTY.to_owned()),
        Inbound::Telemetry { bag } => Some(format!("{bag}&{WILL_PROPERTY}")),
        _ => None,
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> ClientId {
        ClientId::parse("edge1/modA").unwrap()
    }

    #[test]
    fn own_prefix_stripped_in_place() {
        let dev = ClientId::parse("edge1").unwrap();
        for (c, t) in [
            (module(), "devices/edge1/modules/modA/messages/events"),
            (module(), "devices/edge1/modules/modAB/messages/events"),
            (module(), "devices/edge1/modules/modA"),
            (module(), "devices/edge12/modules/modA/x"),
            (module(), "devices/edge1/x"),
            (dev.clone(), "devices/edge1/messages/events/a=b"),
            (dev.clone(), "devices/edge1"),
            (dev, "devices/edge2/messages/events"),
        ] {
            assert_eq!(
                strip_own_prefix(&c, t),
                t.strip_prefix(&own_prefix(&c)),
                "{c} {t}"
            );
        }
    }

    #[test]
    fn classify_topics() {
        let c = module();
        assert_eq!(
            classify(&c, "devices/edge1/modules/modA/messages/events/%24.on=o1"),
            Some(Inbound::Telemetry { bag: "%24.on=o1" })
        );
        assert_eq!(
            classify(&c, "devices/edge1/modules/modA/messages/events"),
            Some(Inbound::Telemetry { bag: "" })
        );
        assert_eq!(
            classify(&c, "$iothub/twin/GET/?$rid=7"),
            Some(Inbound::TwinGet { rid: "7".into() })
        );
        assert_eq!(
            classify(&c, "$iothub/methods/res/200/?$rid=42"),
            Some(Inbound::MethodResponse {
                status: 200,
                rid: "42".into()
            })
        );
        assert_eq!(classify(&c, "devices/edge1/messages/events/"), None);
        assert_eq!(
            classify(&c, "devices/edge1/modules/modB/messages/events/"),
            None
        );
    }

    #[test]
    fn authorization() {
        let m = module();
        let d = ClientId::parse("leaf1").unwrap();
        assert!(authorized(&m, "devices/edge1/modules/modA/inputs/#"));
        assert!(!authorized(&m, "devices/edge1/modules/modB/inputs/#"));
        assert!(!authorized(&m, "#"));
        assert!(authorized(&d, "devices/leaf1/messages/devicebound/#"));
        assert!(!authorized(&d, "devices/leaf2/messages/devicebound/#"));
        assert!(authorized(&d, "$iothub/methods/POST/#"));
    }

    #[test]
    fn will_topics() {
        let m = module();
        assert_eq!(
            will_bag(&m, "devices/edge1/modules/modA/messages/events/"),
            Some(WILL_PROPERTY.to_owned())
        );
        assert_eq!(
            will_bag(
                &m,
                "devices/edge1/modules/modA/messages/events/%24.on=o&k=v"
            ),
            Some(format!("%24.on=o&k=v&{WILL_PROPERTY}"))
        );
        for bad in [
            "devices/edge1/modules/modB/messages/events/",
            "devices/edge1/modules/modA/twin",
            "$iothub/twin/GET/?$rid=1",
            "devices/edge1/modules/modA/messages/events/#",
            "devices/edge1/modules/modA/messages/events/a=+",
            "anything",
        ] {
            assert_eq!(will_bag(&m, bad), None, "{bad}");
        }
    }

    #[test]
    fn filters() {
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+/c", "a/b/d"));
        assert!(filter_matches(
            "$iothub/methods/POST/#",
            "$iothub/methods/POST/m/?$rid=1"
        ));
        assert!(!filter_matches("a/b", "a/b/c"));
    }
}

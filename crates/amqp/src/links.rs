//! What the backend's deliveries become on an identity's links, and the
//! twin and direct-method message formats (`amqp-iothub.md` §4.4, §4.5).
//! The backend speaks MQTT topics; this module maps them both ways.

use std::sync::Mutex;

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use tokio::sync::mpsc;
use verge_core::ClientId;
use verge_endpoint::Backend;
use verge_endpoint::session::Outbound;
use verge_endpoint::topic::{own_prefix, query_param};

use crate::connection::{Push, PushKind, Routes, lock_routes};

/// Method requests an identity may have in flight (a bound on the id map;
/// the backend times each one out long before).
const MAX_METHODS_IN_FLIGHT: usize = 1024;
const DESIRED_PREFIX: &str = "$iothub/twin/PATCH/properties/desired/";
const METHOD_PREFIX: &str = "$iothub/methods/POST/";

/// The backend subscription a sender link of `kind` needs (twin desired
/// patches are subscribed by a PUT request, not by the link).
pub(crate) fn filter(client: &ClientId, kind: PushKind) -> Option<String> {
    match kind {
        PushKind::Inputs => Some(format!("{}inputs/#", own_prefix(client))),
        PushKind::Methods => Some(format!("{METHOD_PREFIX}#")),
        PushKind::C2d => Some(format!("{}#", c2d_prefix(client))),
        PushKind::Twin => None,
    }
}

/// The backend's C2D topic prefix for a device (a device client prints as
/// its device id).
fn c2d_prefix(client: &ClientId) -> String {
    format!("devices/{client}/messages/devicebound/")
}

/// The link and message for a backend delivery to `client`; `None` when no
/// link of that kind is open (the delivery is dropped unacknowledged).
pub(crate) fn dispatch(
    client: &ClientId,
    routes: &Mutex<Routes>,
    out: Outbound,
) -> Option<(mpsc::Sender<Push>, Push)> {
    let mut r = lock_routes(routes);
    if let Some(rest) = out.topic.strip_prefix(DESIRED_PREFIX) {
        let route = r.twin.clone()?;
        let mut ma = MessageAnnotations::builder();
        if let Some(v) = query_param(rest.trim_start_matches('?'), "$version")
            .and_then(|v| v.parse::<i64>().ok())
        {
            ma = ma.insert(Symbol::from("version"), Value::Long(v));
        }
        let msg = Message::builder()
            .message_annotations(ma.build())
            .body(crate::convert::data_body(&out.payload))
            .build();
        return Some((route, Push { msg, ack: out.ack }));
    }
    if let Some(rest) = out.topic.strip_prefix(METHOD_PREFIX) {
        let route = r.methods.clone()?;
        let (name, query) = rest.split_once("/?")?;
        let rid = query_param(query, "$rid")?;
        if r.method_rids.len() >= MAX_METHODS_IN_FLIGHT {
            tracing::warn!(%client, "too many AMQP method requests in flight; dropping one");
            return None;
        }
        let id = uuid::Uuid::new_v4();
        r.method_rids.insert(id, rid);
        let props = Properties {
            correlation_id: Some(MessageId::Uuid(id.into_bytes().into())),
            ..Properties::default()
        };
        let app = ApplicationProperties::builder()
            .insert(
                "IoThub-methodname".to_owned(),
                SimpleValue::String(name.to_owned()),
            )
            .build();
        let msg = Message::builder()
            .properties(props)
            .application_properties(app)
            .body(crate::convert::data_body(&out.payload))
            .build();
        return Some((route, Push { msg, ack: out.ack }));
    }
    if !client.is_module()
        && let Some(bag) = out.topic.strip_prefix(&c2d_prefix(client))
    {
        let route = r.c2d.clone()?;
        let msg = crate::convert::from_bag(bag, None, out.payload.clone());
        return Some((route, Push { msg, ack: out.ack }));
    }
    let rest = out.topic.strip_prefix(&own_prefix(client))?;
    let (input, bag) = rest.strip_prefix("inputs/")?.split_once('/')?;
    let route = r.inputs.clone()?;
    let msg = crate::convert::from_bag(bag, Some(input), out.payload.clone());
    Some((route, Push { msg, ack: out.ack }))
}

fn annotation_str<'a>(msg: &'a Message<Body<Value>>, key: &str) -> Option<&'a str> {
    match crate::convert::annotation(msg, key)? {
        Value::String(s) => Some(s),
        Value::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The twin response to `request` with `status` and a JSON `body`.
fn twin_response(
    request: &Message<Body<Value>>,
    status: i32,
    version: Option<i64>,
    body: &[u8],
) -> Message<Body<Value>> {
    let props = Properties {
        correlation_id: request
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone()),
        ..Properties::default()
    };
    let mut ma = MessageAnnotations::builder().insert(Symbol::from("status"), Value::Int(status));
    if let Some(v) = version {
        ma = ma.insert(Symbol::from("version"), Value::Long(v));
    }
    Message::builder()
        .properties(props)
        .message_annotations(ma.build())
        .body(crate::convert::data_body(body))
        .build()
}

fn error_body(message: &str) -> Vec<u8> {
    serde_json::json!({ "message": message })
        .to_string()
        .into_bytes()
}

/// Serves one twin request of `client`; returns the response.
pub(crate) async fn twin_request<B: Backend>(
    backend: &B,
    client: &ClientId,
    request: &Message<Body<Value>>,
) -> Message<Body<Value>> {
    let op = annotation_str(request, "operation").unwrap_or_default();
    let resource = annotation_str(request, "resource").unwrap_or_default();
    let sessions = backend.sessions();
    let desired_filter = [format!("{DESIRED_PREFIX}#")];
    match (op, resource) {
        ("GET", _) => match backend.twin_get(client).await {
            Ok(twin) => twin_response(request, 200, None, twin.to_string().as_bytes()),
            Err(e) => twin_response(request, i32::from(e.status), None, &error_body(&e.message)),
        },
        ("PATCH", "/properties/reported") => {
            let patch = crate::convert::body_bytes(&request.body)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let Some(patch) = patch.filter(serde_json::Value::is_object) else {
                return twin_response(
                    request,
                    400,
                    None,
                    &error_body("patch must be a JSON object"),
                );
            };
            match backend.twin_patch_reported(client, patch).await {
                Ok(v) => twin_response(request, 204, i64::try_from(v).ok(), b""),
                Err(e) => {
                    twin_response(request, i32::from(e.status), None, &error_body(&e.message))
                }
            }
        }
        ("PUT", "/notifications/twin/properties/desired") => {
            let granted = sessions.subscribe(&client.to_string(), &desired_filter);
            if granted.iter().all(|g| *g) {
                twin_response(request, 200, None, b"")
            } else {
                twin_response(request, 429, None, &error_body("too many subscriptions"))
            }
        }
        ("DELETE", "/notifications/twin/properties/desired") => {
            sessions.unsubscribe(&client.to_string(), &desired_filter);
            twin_response(request, 200, None, b"")
        }
        _ => twin_response(
            request,
            400,
            None,
            &error_body(&format!(
                "unsupported twin operation {op:?} on {resource:?}"
            )),
        ),
    }
}

/// A method response: the backend's request id (from the correlation id we
/// sent), the status (`IoThub-status`) and the payload.
pub(crate) fn method_response(
    msg: &Message<Body<Value>>,
    routes: &Mutex<Routes>,
) -> Result<(String, i64, Bytes), &'static str> {
    let id = match msg
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.as_ref())
    {
        Some(MessageId::Uuid(u)) => uuid::Uuid::from_bytes(*u.as_inner()),
        Some(MessageId::String(s)) => {
            uuid::Uuid::parse_str(s).map_err(|_| "correlation id is not a uuid")?
        }
        _ => return Err("no uuid correlation id"),
    };
    let rid = lock_routes(routes)
        .method_rids
        .remove(&id)
        .ok_or("no method request with this correlation id")?;
    let status = msg
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get("IoThub-status"))
        .and_then(|v| match v {
            SimpleValue::Int(n) => Some(i64::from(*n)),
            SimpleValue::Long(n) => Some(*n),
            SimpleValue::Uint(n) => Some(i64::from(*n)),
            SimpleValue::Short(n) => Some(i64::from(*n)),
            SimpleValue::String(s) => s.parse().ok(),
            _ => None,
        })
        // edgeHub: a response without a status is a generic bad request.
        .unwrap_or(400);
    let payload = crate::convert::body_bytes(&msg.body).map_err(|_| "unsupported body")?;
    Ok((rid, status, payload))
}

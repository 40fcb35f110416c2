//! AMQP messages ↔ IoT Hub messages (system properties, application
//! properties, body), mapped as edgeHub and the SDKs do
//! (`amqp-iothub.md` §4.1, §4.2). The hub side is the property bag the MQTT
//! endpoint also uses, so both transports feed the backend the same way.

use bytes::Bytes;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{
    Binary, SimpleValue, Symbol, Timestamp as AmqpTimestamp, Value,
};
use verge_core::message::bag::{decode_bag, encode_bag};
use verge_core::message::{Properties as AppProperties, SystemProperties};
use verge_core::time::Timestamp;

/// Why a message could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// An AMQP-sequence body, which IoT Hub does not carry.
    #[error("unsupported body: {0}")]
    Body(&'static str),
    /// An `iothub-creation-time-utc` that is not a timestamp.
    #[error("bad iothub-creation-time-utc {0:?}")]
    CreationTime(String),
}

/// A message id / correlation id as IoT Hub's string property.
pub fn id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner())
            .hyphenated()
            .to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// An application-property value as the string IoT Hub keeps (scalars
/// only; a list or map is dropped, as the C# SDK drops non-strings).
fn simple_string(v: &SimpleValue) -> Option<String> {
    Some(match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_owned(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => Timestamp::from_millis(t.milliseconds()).to_iso8601(),
        SimpleValue::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner())
            .hyphenated()
            .to_string(),
        _ => return None,
    })
}

fn value_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The payload of an IoT Hub message: its `data` sections, or an
/// amqp-value holding binary or a string (what some clients send).
pub fn body_bytes(body: &Body<Value>) -> Result<Bytes, ConvertError> {
    match body {
        Body::Data(batch) => {
            if batch.len() == 1 {
                return Ok(Bytes::copy_from_slice(&batch[0].0));
            }
            let mut out = Vec::with_capacity(batch.iter().map(|d| d.0.len()).sum());
            for d in batch.iter() {
                out.extend_from_slice(&d.0);
            }
            Ok(out.into())
        }
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => Ok(Bytes::copy_from_slice(b)),
            Value::String(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
            Value::Null => Ok(Bytes::new()),
            _ => Err(ConvertError::Body("amqp-value other than binary or string")),
        },
        Body::Empty => Ok(Bytes::new()),
        Body::Sequence(_) => Err(ConvertError::Body("amqp-sequence")),
    }
}

/// The message format of a batch (`amqp-iothub.md`: the C# SDK's
/// `SendEventBatchAsync`, uamqp's `BatchMessage`): each data section of
/// the body holds one encoded AMQP message.
pub const BATCH_FORMAT: u32 = 0x8001_3700;

/// The messages inside a batch's body.
pub fn batch_messages(body: &Body<Value>) -> Result<Vec<Message<Body<Value>>>, ConvertError> {
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    let Body::Data(sections) = body else {
        return Err(ConvertError::Body(
            "a batch whose body is not data sections",
        ));
    };
    sections
        .iter()
        .map(|d| {
            <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(
                serde_amqp::read::SliceReader::new(&d.0),
            )
            .map_err(|_| ConvertError::Body("a batch section that is not an AMQP message"))
        })
        .collect()
}

/// A body of one `data` section holding `payload`.
pub fn data_body(payload: &[u8]) -> Body<Value> {
    Body::Data(vec![Data(Binary::from(payload.to_vec()))].into())
}

/// The message annotation `key` (a symbol key), if present.
pub fn annotation<'a>(msg: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    msg.message_annotations
        .as_ref()?
        .0
        .iter()
        .find(|(k, _)| matches!(k, OwnedKey::Symbol(s) if s.as_str() == key))
        .map(|(_, v)| v)
}

/// A client's telemetry / module-output message as a property bag and
/// payload. `connection*` stamps are left to the backend (it stamps them
/// from the link's identity, never from the message).
pub fn to_bag(msg: &Message<Body<Value>>) -> Result<(String, Bytes), ConvertError> {
    let mut sys = SystemProperties::default();
    let mut app = AppProperties::new();
    if let Some(p) = &msg.properties {
        sys.message_id = p.message_id.as_ref().map(id_string);
        sys.correlation_id = p.correlation_id.as_ref().map(id_string);
        sys.user_id = p
            .user_id
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        sys.to = p.to.clone();
        sys.content_type = p.content_type.as_ref().map(|s| s.as_str().to_owned());
        sys.content_encoding = p.content_encoding.as_ref().map(|s| s.as_str().to_owned());
        sys.absolute_expiry = p
            .absolute_expiry_time
            .as_ref()
            .map(|t| Timestamp::from_millis(t.milliseconds()));
    }
    if let Some(ApplicationProperties(map)) = &msg.application_properties {
        for (k, v) in map.iter() {
            let Some(v) = simple_string(v) else { continue };
            match k.as_str() {
                "iothub-outputname" => sys.output_name = Some(v),
                "iothub-message-schema" => sys.message_schema = Some(v),
                "iothub-creation-time-utc" => {
                    sys.creation_time = Some(
                        Timestamp::parse(&v).map_err(|_| ConvertError::CreationTime(v.clone()))?,
                    );
                }
                // Stamps only the hub may set; a client's copy is dropped.
                "iothub-connection-device-id" | "iothub-connection-module-id" => {}
                _ => app.insert(k.clone(), v),
            }
        }
    }
    if let Some(MessageAnnotations(map)) = &msg.message_annotations {
        for (k, v) in map.iter() {
            let OwnedKey::Symbol(k) = k else { continue };
            match k.as_str() {
                "iothub-interface-id" => sys.interface_id = value_string(v),
                "dt-subject" => sys.component_name = value_string(v),
                _ => {}
            }
        }
    }
    let payload = body_bytes(&msg.body)?;
    Ok((encode_bag(&sys, &app), payload))
}

/// A message the backend delivers (module input, C2D) from its property
/// `bag` and payload, with `x-opt-input-name` when it is for an input.
pub fn from_bag(bag: &str, input: Option<&str>, payload: Bytes) -> Message<Body<Value>> {
    message_from_bag(bag, input, false, payload)
}

/// A telemetry message sent upstream from its property `bag` and payload:
/// as [`from_bag`], with the module's output name (`iothub-outputname`),
/// which [`to_bag`] reads back on the cloud's side.
pub fn telemetry_from_bag(bag: &str, payload: Bytes) -> Message<Body<Value>> {
    message_from_bag(bag, None, true, payload)
}

fn message_from_bag(
    bag: &str,
    input: Option<&str>,
    output: bool,
    payload: Bytes,
) -> Message<Body<Value>> {
    // The bag was encoded by the backend itself; a part it cannot decode is
    // left out rather than failing the delivery.
    let (sys, app) = decode_bag(bag).unwrap_or_default();
    let props = Properties {
        message_id: sys.message_id.clone().map(MessageId::String),
        correlation_id: sys.correlation_id.clone().map(MessageId::String),
        user_id: sys
            .user_id
            .as_ref()
            .map(|u| Binary::from(u.as_bytes().to_vec())),
        to: sys.to.clone(),
        content_type: sys.content_type.as_deref().map(Symbol::from),
        content_encoding: sys.content_encoding.as_deref().map(Symbol::from),
        absolute_expiry_time: sys
            .absolute_expiry
            .map(|t| AmqpTimestamp::from_milliseconds(t.as_millis())),
        ..Properties::default()
    };
    let mut ap = ApplicationProperties::builder();
    for (k, v) in app.iter() {
        ap = ap.insert(k.to_owned(), SimpleValue::String(v.to_owned()));
    }
    if let Some(s) = &sys.message_schema {
        ap = ap.insert(
            "iothub-message-schema".to_owned(),
            SimpleValue::String(s.clone()),
        );
    }
    if output && let Some(o) = &sys.output_name {
        ap = ap.insert(
            "iothub-outputname".to_owned(),
            SimpleValue::String(o.clone()),
        );
    }
    if let Some(t) = sys.creation_time {
        ap = ap.insert(
            "iothub-creation-time-utc".to_owned(),
            SimpleValue::String(t.to_iso8601()),
        );
    }
    let mut ma = MessageAnnotations::builder();
    if let Some(i) = input {
        ma = ma.insert(
            Symbol::from("x-opt-input-name"),
            Value::String(i.to_owned()),
        );
    }
    if let Some(d) = &sys.connection_device_id {
        ma = ma.insert(
            Symbol::from("iothub-connection-device-id"),
            Value::String(d.clone()),
        );
    }
    if let Some(m) = &sys.connection_module_id {
        ma = ma.insert(
            Symbol::from("iothub-connection-module-id"),
            Value::String(m.clone()),
        );
    }
    if let Some(f) = &sys.interface_id {
        ma = ma.insert(
            Symbol::from("iothub-interface-id"),
            Value::String(f.clone()),
        );
    }
    if let Some(c) = &sys.component_name {
        ma = ma.insert(Symbol::from("dt-subject"), Value::String(c.clone()));
    }
    Message::builder()
        .properties(props)
        .application_properties(ap.build())
        .message_annotations(ma.build())
        .body(data_body(&payload))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_body(sections: &[&[u8]]) -> Body<Value> {
        Body::Data(
            sections
                .iter()
                .map(|s| Data(Binary::from(s.to_vec())))
                .collect::<Vec<_>>()
                .into(),
        )
    }

    #[test]
    fn a_batch_section_that_is_not_a_message_is_an_error() {
        assert!(
            batch_messages(&data_body(&[b"\x00\x53\x75\xa0\x01x"])).is_ok_and(|m| m.len() == 1)
        );
        assert!(batch_messages(&data_body(&[b"\x00\x53\x75\xa0\x01x", b"garbage"])).is_err());
        assert!(batch_messages(&Body::Empty).is_err());
        assert!(batch_messages(&data_body(&[])).is_ok_and(|m| m.is_empty()));
    }

    #[test]
    fn telemetry_keeps_the_output_name_and_inputs_do_not_get_it() {
        let sys = SystemProperties {
            message_id: Some("m1".into()),
            output_name: Some("out1".into()),
            content_type: Some("application/json".into()),
            ..SystemProperties::default()
        };
        let mut app = AppProperties::new();
        app.insert("k".to_owned(), "v w".to_owned());
        let bag = encode_bag(&sys, &app);
        let (back, payload) = to_bag(&telemetry_from_bag(&bag, Bytes::from_static(b"x"))).unwrap();
        let (s2, a2) = decode_bag(&back).unwrap();
        assert_eq!(s2.output_name.as_deref(), Some("out1"));
        assert_eq!(s2.message_id.as_deref(), Some("m1"));
        assert_eq!(s2.content_type.as_deref(), Some("application/json"));
        assert_eq!(a2.get("k"), Some("v w"));
        assert_eq!(&payload[..], b"x");
        let (back, _) = to_bag(&from_bag(&bag, Some("in1"), Bytes::new())).unwrap();
        assert_eq!(decode_bag(&back).unwrap().0.output_name, None);
    }
}

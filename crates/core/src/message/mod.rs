//! Messages: a body, IoT Hub's system properties and application properties.
//!
//! Wire forms: [`bag`] is the MQTT topic property bag the Azure SDKs speak;
//! [`codec`] is Verge's compact, versioned binary form for the store.

pub mod bag;
pub mod codec;

use bytes::Bytes;

use crate::time::Timestamp;

pub use bag::{BagError, decode_bag, encode_bag, encode_bag_into, encoded_bag_len};
pub use codec::{CodecError, decode, encode};

/// Largest message IoT Hub (and so Verge) accepts: body plus properties.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024;

/// Longest MQTT topic name, in bytes: MQTT 3.1.1 (§1.5.3) prefixes strings
/// with a 16-bit length. A topic built from a message (prefix + encoded
/// property bag) must stay within it or it cannot be sent at all.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// What kind of event a message is; routes select on it through their source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MessageKind {
    /// Device or module telemetry (`/messages/…`).
    #[default]
    Telemetry,
    /// A reported-property change (`/twinChangeNotifications`).
    TwinChangeNotification,
}

/// IoT Hub's system properties. The hub stamps the `connection*` ones and
/// `enqueued_time`; clients set the rest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemProperties {
    /// `$.mid`.
    pub message_id: Option<String>,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.uid`.
    pub user_id: Option<String>,
    /// `$.to`.
    pub to: Option<String>,
    /// `$.ct`, e.g. `application/json` (needed for `$body` routing).
    pub content_type: Option<String>,
    /// `$.ce`, e.g. `utf-8`.
    pub content_encoding: Option<String>,
    /// `$.exp`: the message is dropped after this instant.
    pub absolute_expiry: Option<Timestamp>,
    /// `$.ctime`.
    pub creation_time: Option<Timestamp>,
    /// `$.schema`.
    pub message_schema: Option<String>,
    /// `$.on`: the module output the message was sent to.
    pub output_name: Option<String>,
    /// The module input it is delivered on (part of the topic, not the bag).
    pub input_name: Option<String>,
    /// `$.cdid`: the device that sent it (stamped by the hub).
    pub connection_device_id: Option<String>,
    /// `$.cmid`: the module that sent it (stamped by the hub).
    pub connection_module_id: Option<String>,
    /// How the sender authenticated (stamped by the hub; not on the MQTT wire).
    pub connection_auth_method: Option<String>,
    /// When the hub accepted it (stamped by the hub; not on the MQTT wire).
    pub enqueued_time: Option<Timestamp>,
    /// `iothub-ack`: C2D feedback request (`none`, `positive`, `negative`, `full`).
    pub ack: Option<String>,
    /// `$.ifid`: the digital twin interface id.
    pub interface_id: Option<String>,
    /// `$.sub`: the component name.
    pub component_name: Option<String>,
}

/// Names of the system properties a route condition can read (`$name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemProperty {
    /// `messageId`.
    MessageId,
    /// `correlationId`.
    CorrelationId,
    /// `userId`.
    UserId,
    /// `to`.
    To,
    /// `contentType`.
    ContentType,
    /// `contentEncoding`.
    ContentEncoding,
    /// `absoluteExpiryTime`.
    AbsoluteExpiryTime,
    /// `creationTime` (`iothub-creation-time-utc`).
    CreationTime,
    /// `messageSchema`.
    MessageSchema,
    /// `outputName`.
    OutputName,
    /// `inputName`.
    InputName,
    /// `connectionDeviceId`.
    ConnectionDeviceId,
    /// `connectionModuleId`.
    ConnectionModuleId,
    /// `connectionAuthMethod`.
    ConnectionAuthMethod,
    /// `enqueuedTime`.
    EnqueuedTime,
    /// `ack`.
    Ack,
    /// `interfaceId` (`dt-dataschema`).
    InterfaceId,
    /// `componentName` (`dt-subject`).
    ComponentName,
}

/// A system property's value: text, or a time (rendered ISO 8601 when compared as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemValue<'a> {
    /// A text property.
    Str(&'a str),
    /// A time property.
    Time(Timestamp),
}

impl SystemProperty {
    /// Every system property.
    pub const ALL: [SystemProperty; 18] = [
        Self::MessageId,
        Self::CorrelationId,
        Self::UserId,
        Self::To,
        Self::ContentType,
        Self::ContentEncoding,
        Self::AbsoluteExpiryTime,
        Self::CreationTime,
        Self::MessageSchema,
        Self::OutputName,
        Self::InputName,
        Self::ConnectionDeviceId,
        Self::ConnectionModuleId,
        Self::ConnectionAuthMethod,
        Self::EnqueuedTime,
        Self::Ack,
        Self::InterfaceId,
        Self::ComponentName,
    ];

    /// The name routes use, without `$`.
    pub fn route_name(self) -> &'static str {
        match self {
            Self::MessageId => "messageId",
            Self::CorrelationId => "correlationId",
            Self::UserId => "userId",
            Self::To => "to",
            Self::ContentType => "contentType",
            Self::ContentEncoding => "contentEncoding",
            Self::AbsoluteExpiryTime => "absoluteExpiryTime",
            Self::CreationTime => "creationTime",
            Self::MessageSchema => "messageSchema",
            Self::OutputName => "outputName",
            Self::InputName => "inputName",
            Self::ConnectionDeviceId => "connectionDeviceId",
            Self::ConnectionModuleId => "connectionModuleId",
            Self::ConnectionAuthMethod => "connectionAuthMethod",
            Self::EnqueuedTime => "enqueuedTime",
            Self::Ack => "ack",
            Self::InterfaceId => "interfaceId",
            Self::ComponentName => "componentName",
        }
    }

    /// Looks a route name up (without `$`), case-insensitively, also accepting
    /// IoT Hub's long forms (`iothub-connection-device-id`, …).
    pub fn from_route_name(name: &str) -> Option<Self> {
        let long = [
            ("iothub-connection-device-id", Self::ConnectionDeviceId),
            ("iothub-connection-module-id", Self::ConnectionModuleId),
            ("iothub-connection-auth-method", Self::ConnectionAuthMethod),
            ("iothub-enqueuedtime", Self::EnqueuedTime),
            ("iothub-creation-time-utc", Self::CreationTime),
            ("iothub-ack", Self::Ack),
            ("dt-dataschema", Self::InterfaceId),
            ("dt-subject", Self::ComponentName),
        ];
        Self::ALL
            .into_iter()
            .find(|p| p.route_name().eq_ignore_ascii_case(name))
            .or_else(|| {
                long.into_iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, p)| p)
            })
    }
}

impl SystemProperties {
    /// Reads one property; no allocation.
    pub fn get(&self, p: SystemProperty) -> Option<SystemValue<'_>> {
        use SystemProperty as P;
        fn s(v: &Option<String>) -> Option<&str> {
            v.as_deref()
        }
        let text = match p {
            P::MessageId => s(&self.message_id),
            P::CorrelationId => s(&self.correlation_id),
            P::UserId => s(&self.user_id),
            P::To => s(&self.to),
            P::ContentType => s(&self.content_type),
            P::ContentEncoding => s(&self.content_encoding),
            P::MessageSchema => s(&self.message_schema),
            P::OutputName => s(&self.output_name),
            P::InputName => s(&self.input_name),
            P::ConnectionDeviceId => s(&self.connection_device_id),
            P::ConnectionModuleId => s(&self.connection_module_id),
            P::ConnectionAuthMethod => s(&self.connection_auth_method),
            P::Ack => s(&self.ack),
            P::InterfaceId => s(&self.interface_id),
            P::ComponentName => s(&self.component_name),
            P::AbsoluteExpiryTime => return self.absolute_expiry.map(SystemValue::Time),
            P::CreationTime => return self.creation_time.map(SystemValue::Time),
            P::EnqueuedTime => return self.enqueued_time.map(SystemValue::Time),
        };
        text.map(SystemValue::Str)
    }

    fn text_len(&self) -> usize {
        [
            &self.message_id,
            &self.correlation_id,
            &self.user_id,
            &self.to,
            &self.content_type,
            &self.content_encoding,
            &self.message_schema,
            &self.output_name,
            &self.input_name,
            &self.connection_device_id,
            &self.connection_module_id,
            &self.connection_auth_method,
            &self.ack,
            &self.interface_id,
            &self.component_name,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, String::len))
        .sum()
    }
}

/// Application properties, in the order they arrived. Names are case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties(Vec<(String, String)>);

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name`, replacing an earlier value in place.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|(k, _)| k == name)?;
        Some(self.0.remove(i).1)
    }

    /// All pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn byte_len(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Properties {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut p = Properties::new();
        for (k, v) in iter {
            p.insert(k, v);
        }
        p
    }
}

/// A message too large for IoT Hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message is {size} bytes (body and properties); the limit is {limit}")]
pub struct MessageTooLarge {
    /// Its size.
    pub size: usize,
    /// The limit.
    pub limit: usize,
}

/// A device-to-cloud, module-to-module or cloud-to-device message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// Telemetry or a twin change notification.
    pub kind: MessageKind,
    /// The payload, opaque bytes.
    pub body: Bytes,
    /// IoT Hub's system properties.
    pub system: SystemProperties,
    /// Application properties.
    pub properties: Properties,
}

impl Message {
    /// A telemetry message with this body and nothing else.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            ..Self::default()
        }
    }

    /// Body plus every property's text, as counted against [`MAX_MESSAGE_SIZE`].
    pub fn size(&self) -> usize {
        self.body.len() + self.system.text_len() + self.properties.byte_len()
    }

    /// Refuses messages over 256 KB.
    pub fn check_size(&self) -> Result<(), MessageTooLarge> {
        let size = self.size();
        if size > MAX_MESSAGE_SIZE {
            return Err(MessageTooLarge {
                size,
                limit: MAX_MESSAGE_SIZE,
            });
        }
        Ok(())
    }

    /// True when `$.exp` is set and at or before `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.system.absolute_expiry.is_some_and(|e| e <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit() {
        let mut m = Message::new(vec![0u8; MAX_MESSAGE_SIZE]);
        assert_eq!(m.check_size(), Ok(()));
        m.properties.insert("k", "v");
        assert_eq!(
            m.check_size(),
            Err(MessageTooLarge {
                size: MAX_MESSAGE_SIZE + 2,
                limit: MAX_MESSAGE_SIZE
            })
        );
        m.properties.remove("k");
        m.system.message_id = Some("x".into());
        assert!(m.check_size().is_err());
    }

    #[test]
    fn system_lookup_by_route_name() {
        let s = SystemProperties {
            connection_module_id: Some("sensor".into()),
            enqueued_time: Some(Timestamp::from_millis(7)),
            ..Default::default()
        };
        let p = SystemProperty::from_route_name("CONNECTIONMODULEID").unwrap();
        assert_eq!(s.get(p), Some(SystemValue::Str("sensor")));
        assert_eq!(
            s.get(SystemProperty::from_route_name("iothub-enqueuedtime").unwrap()),
            Some(SystemValue::Time(Timestamp::from_millis(7)))
        );
        assert_eq!(s.get(SystemProperty::MessageId), None);
        assert_eq!(SystemProperty::from_route_name("nope"), None);
        for p in SystemProperty::ALL {
            assert_eq!(SystemProperty::from_route_name(p.route_name()), Some(p));
        }
    }

    #[test]
    fn properties_keep_order_and_replace_in_place() {
        let mut p: Properties = [("b", "1"), ("a", "2")].into_iter().collect();
        p.insert("b", "3");
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![("b", "3"), ("a", "2")]);
        assert_eq!(p.get("a"), Some("2"));
        assert_eq!(p.get("A"), None);
    }

    #[test]
    fn expiry() {
        let mut m = Message::new("x");
        assert!(!m.is_expired(Timestamp::from_millis(i64::MAX)));
        m.system.absolute_expiry = Some(Timestamp::from_millis(10));
        assert!(m.is_expired(Timestamp::from_millis(10)));
        assert!(!m.is_expired(Timestamp::from_millis(9)));
    }
}

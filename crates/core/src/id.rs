//! Identities: device ids, module ids, MQTT client ids and the hub hostname.
//!
//! IoT Hub allows up to 128 characters from ASCII letters and digits plus
//! `- . % _ * ? ! ( ) , : = @ $ '`. Its documentation also lists `+` and `#`
//! for module ids; Verge refuses them because they are MQTT wildcards and would
//! make the module's own topic filters (`devices/{d}/modules/{m}/#`) invalid.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device or module id IoT Hub accepts.
pub const MAX_ID_LEN: usize = 128;

const ID_SPECIALS: &str = "-.%_*?!(),:=@$'";

/// Why an id or hostname was refused. Every variant names the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// "device id", "module id", "hub hostname"…
        kind: &'static str,
    },
    /// The id is longer than the limit.
    #[error("{kind} {value:?} is {len} characters long; the limit is {max}")]
    TooLong {
        /// What was being parsed.
        kind: &'static str,
        /// The offending value.
        value: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The id contains a character outside the allowed set.
    #[error("{kind} {value:?} contains {ch:?} at position {pos}; allowed are {allowed}")]
    BadChar {
        /// What was being parsed.
        kind: &'static str,
        /// The offending value.
        value: String,
        /// The first bad character.
        ch: char,
        /// Its character index.
        pos: usize,
        /// A description of the allowed set.
        allowed: &'static str,
    },
    /// A composite form (client id, resource path) did not have the expected shape.
    #[error("{kind} {value:?} is malformed: {reason}")]
    Malformed {
        /// What was being parsed.
        kind: &'static str,
        /// The offending value.
        value: String,
        /// What shape was expected.
        reason: &'static str,
    },
}

fn check_id(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let len = value.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            value: value.to_owned(),
            len,
            max: MAX_ID_LEN,
        });
    }
    for (pos, ch) in value.chars().enumerate() {
        if !(ch.is_ascii_alphanumeric() || ID_SPECIALS.contains(ch)) {
            return Err(IdError::BadChar {
                kind,
                value: value.to_owned(),
                ch,
                pos,
                allowed: "ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '",
            });
        }
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check_id($kind, &value)?;
                Ok(Self(value))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A device id as IoT Hub's registry knows it (case-sensitive).
    DeviceId,
    "device id"
);
id_type!(
    /// A module id, unique within its device (`$edgeAgent`, `$edgeHub`, user modules).
    ModuleId,
    "module id"
);

/// Who is talking: a device, or a module of a device.
///
/// Its MQTT client-id form is `{d}` or `{d}/{m}`; its resource form is
/// `/devices/{d}` or `/devices/{d}/modules/{m}`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId {
    /// The device.
    pub device: DeviceId,
    /// The module, when the client is a module.
    pub module: Option<ModuleId>,
}

impl ClientId {
    /// A device client.
    pub fn device(device: DeviceId) -> Self {
        Self {
            device,
            module: None,
        }
    }

    /// A module client.
    pub fn module(device: DeviceId, module: ModuleId) -> Self {
        Self {
            device,
            module: Some(module),
        }
    }

    /// Parses the MQTT client-id form `{d}` or `{d}/{m}`.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let mut parts = value.split('/');
        let device = DeviceId::new(parts.next().unwrap_or_default())?;
        let module = match parts.next() {
            None => None,
            Some(m) => Some(ModuleId::new(m)?),
        };
        if parts.next().is_some() {
            return Err(IdError::Malformed {
                kind: "client id",
                value: value.to_owned(),
                reason: "expected {deviceId} or {deviceId}/{moduleId}",
            });
        }
        Ok(Self { device, module })
    }

    /// Parses the resource form `devices/{d}[/modules/{m}]`, with or without a
    /// leading `/`. Ids in this form may be percent-encoded.
    pub fn parse_resource(value: &str) -> Result<Self, IdError> {
        let malformed = || IdError::Malformed {
            kind: "resource",
            value: value.to_owned(),
            reason: "expected devices/{deviceId} or devices/{deviceId}/modules/{moduleId}",
        };
        let decode = |s: &str| -> Result<String, IdError> {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| malformed())
        };
        let trimmed = value.strip_prefix('/').unwrap_or(value);
        let segs: Vec<&str> = trimmed.split('/').collect();
        match segs.as_slice() {
            ["devices", d] => Ok(Self::device(DeviceId::new(decode(d)?)?)),
            ["devices", d, "modules", m] => Ok(Self::module(
                DeviceId::new(decode(d)?)?,
                ModuleId::new(decode(m)?)?,
            )),
            _ => Err(malformed()),
        }
    }

    /// The resource form `/devices/{d}[/modules/{m}]`.
    pub fn resource(&self) -> String {
        match &self.module {
            None => format!("/devices/{}", self.device),
            Some(m) => format!("/devices/{}/modules/{}", self.device, m),
        }
    }

    /// The SAS audience for this identity on a hub: `{hub}/devices/{d}[/modules/{m}]`.
    pub fn audience(&self, hub: &HubHostname) -> String {
        format!("{}{}", hub, self.resource())
    }

    /// True for a module client.
    pub fn is_module(&self) -> bool {
        self.module.is_some()
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module {
            None => write!(f, "{}", self.device),
            Some(m) => write!(f, "{}/{}", self.device, m),
        }
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({self})")
    }
}

impl std::str::FromStr for ClientId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl Serialize for ClientId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ClientId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The IoT hub's hostname (`myhub.azure-devices.net`, or a verge-cloud host).
///
/// A DNS name: labels of 1–63 letters, digits and hyphens, not starting or
/// ending with a hyphen, 253 characters at most. Compared case-insensitively.
#[derive(Clone, Eq)]
pub struct HubHostname(String);

impl HubHostname {
    /// Validates a hostname.
    pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
        const KIND: &str = "hub hostname";
        let value = value.into();
        if value.is_empty() {
            return Err(IdError::Empty { kind: KIND });
        }
        if value.len() > 253 {
            return Err(IdError::TooLong {
                kind: KIND,
                len: value.len(),
                value,
                max: 253,
            });
        }
        let mut pos = 0;
        for label in value.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(IdError::Malformed {
                    kind: KIND,
                    value,
                    reason: "every dot-separated label must be 1 to 63 characters",
                });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(IdError::Malformed {
                    kind: KIND,
                    value,
                    reason: "a label must not start or end with '-'",
                });
            }
            for (i, ch) in label.chars().enumerate() {
                if !(ch.is_ascii_alphanumeric() || ch == '-') {
                    return Err(IdError::BadChar {
                        kind: KIND,
                        value,
                        ch,
                        pos: pos + i,
                        allowed: "ASCII letters, digits, '-' and '.' between labels",
                    });
                }
            }
            pos += label.len() + 1;
        }
        Ok(Self(value))
    }

    /// The hostname as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for HubHostname {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl std::hash::Hash for HubHostname {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for b in self.0.bytes() {
            state.write_u8(b.to_ascii_lowercase());
        }
    }
}

impl fmt::Display for HubHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HubHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for HubHostname {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl Serialize for HubHostname {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HubHostname {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// A DPS registration id: 1-128 lowercase letters, digits or `-._:` (what
/// DPS accepts; the device and the service check it alike).
pub fn is_registration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_specials() {
        assert!(DeviceId::new("dev-1.a%b_c*d?e!f(g)h,i:j=k@l$m'n").is_ok());
        assert!(ModuleId::new("$edgeHub").is_ok());
        assert!(DeviceId::new("a".repeat(128)).is_ok());
    }

    #[test]
    fn errors_name_id_and_rule() {
        let e = DeviceId::new("bad/id").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device id \"bad/id\" contains '/' at position 3; allowed are ASCII letters, digits and - . % _ * ? ! ( ) , : = @ $ '"
        );
        let e = ModuleId::new("m".repeat(129)).unwrap_err();
        assert!(matches!(
            e,
            IdError::TooLong {
                len: 129,
                max: 128,
                ..
            }
        ));
        assert!(e.to_string().starts_with("module id \"mmm"));
        assert_eq!(
            DeviceId::new("").unwrap_err(),
            IdError::Empty { kind: "device id" }
        );
        assert!(matches!(
            ModuleId::new("a+b"),
            Err(IdError::BadChar { ch: '+', .. })
        ));
        assert!(matches!(
            ModuleId::new("a#b"),
            Err(IdError::BadChar { ch: '#', .. })
        ));
        assert!(matches!(
            DeviceId::new("caf\u{e9}"),
            Err(IdError::BadChar { pos: 3, .. })
        ));
    }

    #[test]
    fn client_id_forms() {
        let c = ClientId::parse("edge1/filter").unwrap();
        assert_eq!(c.device.as_str(), "edge1");
        assert_eq!(c.module.as_ref().unwrap().as_str(), "filter");
        assert_eq!(c.to_string(), "edge1/filter");
        assert_eq!(c.resource(), "/devices/edge1/modules/filter");
        let hub = HubHostname::new("h.azure-devices.net").unwrap();
        assert_eq!(
            c.audience(&hub),
            "h.azure-devices.net/devices/edge1/modules/filter"
        );
        assert_eq!(ClientId::parse("leaf").unwrap().resource(), "/devices/leaf");
        assert!(ClientId::parse("a/b/c").is_err());
        assert!(ClientId::parse("a/").is_err());
        assert!(ClientId::parse("/b").is_err());
        assert_eq!(
            ClientId::parse_resource("/devices/edge1/modules/%24edgeHub").unwrap(),
            ClientId::module(
                DeviceId::new("edge1").unwrap(),
                ModuleId::new("$edgeHub").unwrap()
            )
        );
        assert_eq!(
            ClientId::parse_resource("devices/leaf").unwrap(),
            ClientId::device(DeviceId::new("leaf").unwrap())
        );
        assert!(ClientId::parse_resource("/devices/a/things/b").is_err());
        assert!(ClientId::parse_resource("/devices/%ff").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(HubHostname::new("localhost").is_ok());
        assert!(HubHostname::new("127.0.0.1").is_ok());
        assert_eq!(
            HubHostname::new("Hub.Azure-Devices.net").unwrap(),
            HubHostname::new("hub.azure-devices.net").unwrap()
        );
        assert!(HubHostname::new("a..b").is_err());
        assert!(HubHostname::new("-a.b").is_err());
        assert!(matches!(
            HubHostname::new("a_b.c"),
            Err(IdError::BadChar {
                ch: '_',
                pos: 1,
                ..
            })
        ));
        assert!(matches!(
            HubHostname::new("ok.a_b"),
            Err(IdError::BadChar {
                ch: '_',
                pos: 4,
                ..
            })
        ));
        assert!(HubHostname::new(format!("{}.x", "a".repeat(64))).is_err());
    }
}

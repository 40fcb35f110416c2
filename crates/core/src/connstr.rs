//! Connection strings: `HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…[;GatewayHostName=…]`.
//!
//! Keys match case-insensitively, as the Azure SDKs do; unknown keys are kept
//! in order so that formatting gives back what was read.

use std::fmt;

use crate::id::{ClientId, DeviceId, HubHostname, IdError, ModuleId};
use crate::sas::{KeyError, SharedAccessKey};

/// A device or module connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName`: the IoT hub.
    pub host_name: HubHostname,
    /// `DeviceId`.
    pub device_id: DeviceId,
    /// `ModuleId`, for modules.
    pub module_id: Option<ModuleId>,
    /// `SharedAccessKey`; absent for X.509 (`x509=true`) identities.
    pub shared_access_key: Option<SharedAccessKey>,
    /// `GatewayHostName`: the edge device to dial instead of the hub.
    pub gateway_host_name: Option<String>,
    /// Every other `key=value` pair, in order.
    pub other: Vec<(String, String)>,
}

/// Why a connection string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    /// A segment without `=`.
    #[error("connection string segment {0:?} is not key=value")]
    NotKeyValue(String),
    /// A key appears twice.
    #[error("connection string has {0} twice")]
    Duplicate(String),
    /// A required key is absent.
    #[error("connection string has no {0}")]
    Missing(&'static str),
    /// A value is empty.
    #[error("connection string has an empty {0}")]
    Empty(String),
    /// An id or hostname is invalid.
    #[error("connection string: {0}")]
    Id(#[from] IdError),
    /// The key is not base64.
    #[error("connection string SharedAccessKey: {0}")]
    Key(#[from] KeyError),
}

impl ConnectionString {
    /// Parses a connection string.
    pub fn parse(s: &str) -> Result<Self, ConnectionStringError> {
        use ConnectionStringError as E;
        let mut seen: Vec<String> = Vec::new();
        let (mut host, mut device, mut module, mut key, mut gateway) =
            (None, None, None, None, None);
        let mut other = Vec::new();
        for seg in s.trim().split(';').filter(|s| !s.trim().is_empty()) {
            // Split on the first '=': base64 keys end in '='.
            let (k, v) = seg
                .split_once('=')
                .ok_or_else(|| E::NotKeyValue(seg.to_owned()))?;
            let k = k.trim();
            let lower = k.to_ascii_lowercase();
            if seen.contains(&lower) {
                return Err(E::Duplicate(k.to_owned()));
            }
            seen.push(lower.clone());
            if v.is_empty() {
                return Err(E::Empty(k.to_owned()));
            }
            match lower.as_str() {
                "hostname" => host = Some(HubHostname::new(v)?),
                "deviceid" => device = Some(DeviceId::new(v)?),
                "moduleid" => module = Some(ModuleId::new(v)?),
                "sharedaccesskey" => key = Some(SharedAccessKey::from_base64(v)?),
                "gatewayhostname" => gateway = Some(v.to_owned()),
                _ => other.push((k.to_owned(), v.to_owned())),
            }
        }
        let x509 = other
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x509") && v.eq_ignore_ascii_case("true"));
        if key.is_none() && !x509 {
            return Err(E::Missing("SharedAccessKey"));
        }
        Ok(Self {
            host_name: host.ok_or(E::Missing("HostName"))?,
            device_id: device.ok_or(E::Missing("DeviceId"))?,
            module_id: module,
            shared_access_key: key,
            gateway_host_name: gateway,
            other,
        })
    }

    /// The identity this string authenticates.
    pub fn client_id(&self) -> ClientId {
        ClientId {
            device: self.device_id.clone(),
            module: self.module_id.clone(),
        }
    }

    /// The host a client dials: the gateway if there is one, else the hub.
    pub fn dial_host(&self) -> &str {
        self.gateway_host_name
            .as_deref()
            .unwrap_or(self.host_name.as_str())
    }
}

impl std::str::FromStr for ConnectionString {
    type Err = ConnectionStringError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={};DeviceId={}", self.host_name, self.device_id)?;
        if let Some(m) = &self.module_id {
            write!(f, ";ModuleId={m}")?;
        }
        if let Some(k) = &self.shared_access_key {
            write!(f, ";SharedAccessKey={}", k.to_base64())?;
        }
        if let Some(g) = &self.gateway_host_name {
            write!(f, ";GatewayHostName={g}")?;
        }
        for (k, v) in &self.other {
            write!(f, ";{k}={v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("gateway_host_name", &self.gateway_host_name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODw==";

    #[test]
    fn parses_module_string_with_gateway_and_unknown_keys() {
        let s = format!(
            "HostName=hub.azure-devices.net;DeviceId=edge1;ModuleId=filter;SharedAccessKey={KEY};GatewayHostName=edge.local;Extra=x=y"
        );
        let c = ConnectionString::parse(&s).unwrap();
        assert_eq!(c.host_name.as_str(), "hub.azure-devices.net");
        assert_eq!(c.client_id().to_string(), "edge1/filter");
        assert_eq!(c.dial_host(), "edge.local");
        assert_eq!(c.other, vec![("Extra".to_owned(), "x=y".to_owned())]);
        assert_eq!(c.to_string(), s);
        assert!(!format!("{c:?}").contains(KEY));
    }

    #[test]
    fn keys_are_case_insensitive_and_order_free() {
        let c = ConnectionString::parse(&format!("sharedaccesskey={KEY}; deviceid=d;hostname=h"))
            .unwrap();
        assert_eq!(c.device_id.as_str(), "d");
        assert_eq!(c.dial_host(), "h");
        assert_eq!(
            c.to_string(),
            format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}")
        );
    }

    #[test]
    fn errors() {
        use ConnectionStringError as E;
        let p = ConnectionString::parse;
        assert_eq!(
            p(&format!("DeviceId=d;SharedAccessKey={KEY}")),
            Err(E::Missing("HostName"))
        );
        assert_eq!(
            p(&format!("HostName=h;SharedAccessKey={KEY}")),
            Err(E::Missing("DeviceId"))
        );
        assert_eq!(
            p("HostName=h;DeviceId=d"),
            Err(E::Missing("SharedAccessKey"))
        );
        assert_eq!(
            p(&format!(
                "HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey={KEY}"
            )),
            Err(E::Duplicate("DeviceId".into()))
        );
        assert_eq!(
            p("HostName=h;DeviceId"),
            Err(E::NotKeyValue("DeviceId".into()))
        );
        assert_eq!(p("HostName=;DeviceId=d"), Err(E::Empty("HostName".into())));
        assert!(matches!(
            p("HostName=h;DeviceId=a/b;SharedAccessKey=AA=="),
            Err(E::Id(_))
        ));
        assert!(matches!(
            p("HostName=h;DeviceId=d;SharedAccessKey=@@"),
            Err(E::Key(_))
        ));
        // X.509 identities carry no key.
        assert!(
            p("HostName=h;DeviceId=d;x509=true")
                .unwrap()
                .shared_access_key
                .is_none()
        );
    }
}

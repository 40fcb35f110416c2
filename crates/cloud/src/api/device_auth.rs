//! Module registration by the edge device itself (what Azure IoT Edge's
//! identity service does in IoT Hub): `PUT`/`GET`/`DELETE
//! /devices/{d}/modules/{m}` and `GET /devices/{d}/modules`, same handlers
//! and JSON shapes as the service API, but authorized by a SAS token of
//! `{host}/devices/{d}` signed with the device's own key instead of the
//! shared access policy.
//!
//! The edge derives each module's key from its device key and signs module
//! tokens offline; registering the modules with those keys is what makes the
//! cloud accept the tokens. A device may manage its own modules only: a valid
//! token of another device (or of a module) is a 403, an invalid token a 401.
//! Only edge devices have modules to register this way: a leaf device's own
//! valid token is a 403 too. An X.509 edge device sends no token: the
//! client certificate of its TLS connection authenticates it, checked as at
//! the device endpoint (thumbprint or CA chain, validity, enabled).

use std::sync::Arc;

use axum::http::Method;
use verge_core::{ClientId, SasToken};

use crate::CloudState;
use crate::error::CloudError;

/// The device whose module registry `path` addresses, when `method` is one
/// the device may use on it: `GET /devices/{d}/modules` and
/// `GET|PUT|DELETE /devices/{d}/modules/{m}`.
pub fn module_registry_target(method: &Method, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let device = match segs.as_slice() {
        ["devices", d, "modules"] if method == Method::GET => *d,
        ["devices", d, "modules", m]
            if !m.is_empty()
                && (method == Method::GET || method == Method::PUT || method == Method::DELETE) =>
        {
            *d
        }
        _ => return None,
    };
    percent_encoding::percent_decode_str(device)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
        .filter(|d| !d.is_empty())
}

/// The certificate chain a client presented in its TLS handshake (leaf
/// first), put in the request's extensions by the listener.
#[derive(Clone, Debug)]
pub struct PeerCertificates(pub Arc<Vec<verge_x509::CertificateDer<'static>>>);

/// An authenticated `device` may manage its modules if it is an edge device.
fn edge_only(cloud: &CloudState, device: &str) -> Result<(), DeviceAuthError> {
    match cloud.get_device(device) {
        Ok(d) if d.record.iot_edge => Ok(()),
        _ => Err(DeviceAuthError::Forbidden(format!(
            "{device:?} is not an edge device; only edge devices register their modules"
        ))),
    }
}

/// Checks that `chain` authenticates edge device `device` (registered for
/// X.509: `selfSigned` thumbprints or `certificateAuthority`).
pub fn verify_device_cert(
    cloud: &CloudState,
    device: &str,
    chain: &PeerCertificates,
) -> Result<(), DeviceAuthError> {
    cloud
        .verify_device_cert(device, &chain.0)
        .map_err(DeviceAuthError::Unauthorized)?;
    edge_only(cloud, device)
}

/// Checks that `token` is edge device `device`'s own valid SAS token.
pub fn verify_device(cloud: &CloudState, device: &str, token: &str) -> Result<(), DeviceAuthError> {
    let own = match cloud.verify_device_token(device, token) {
        Ok(_) => return edge_only(cloud, device),
        Err(e) => e,
    };
    // A good token of someone else is a 403: the caller is known, the
    // target is not theirs.
    let other = SasToken::parse(token.trim()).ok().and_then(|t| {
        let (_, path) = t.resource().split_once('/')?;
        ClientId::parse_resource(path).ok()
    });
    if let Some(c) = other {
        let id = match &c.module {
            None => c.device.to_string(),
            Some(m) => format!("{}/{m}", c.device),
        };
        if id != device && cloud.verify_device_token(&id, token).is_ok() {
            return Err(DeviceAuthError::Forbidden(format!(
                "{id} may not manage the modules of device {device:?}"
            )));
        }
    }
    Err(DeviceAuthError::Unauthorized(own))
}

/// Why a device's registry request was refused.
#[derive(Debug)]
pub enum DeviceAuthError {
    /// No valid token (401).
    Unauthorized(CloudError),
    /// A valid token of another identity (403).
    Forbidden(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets() {
        let t = |m: Method, p: &str| module_registry_target(&m, p);
        assert_eq!(t(Method::GET, "/devices/e1/modules").as_deref(), Some("e1"));
        assert_eq!(
            t(Method::PUT, "/devices/e%231/modules/%24edgeAgent").as_deref(),
            Some("e#1")
        );
        assert_eq!(
            t(Method::DELETE, "/devices/e1/modules/m").as_deref(),
            Some("e1")
        );
        assert_eq!(
            t(Method::GET, "/devices/e1/modules/m").as_deref(),
            Some("e1")
        );
        // Not the module registry, or not a verb the device may use.
        assert_eq!(t(Method::PUT, "/devices/e1/modules"), None);
        assert_eq!(t(Method::POST, "/devices/e1/modules/m"), None);
        assert_eq!(t(Method::PUT, "/devices/e1"), None);
        assert_eq!(t(Method::GET, "/devices"), None);
        assert_eq!(t(Method::PATCH, "/twins/e1/modules/m"), None);
        assert_eq!(
            t(
                Method::POST,
                "/devices/e1/modules/$edgeHub/devicesAndModulesInTargetDeviceScope"
            ),
            None
        );
        assert_eq!(t(Method::GET, "/devices/e1/modules/m/x"), None);
    }
}

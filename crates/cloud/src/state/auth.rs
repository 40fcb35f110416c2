//! Authentication of device endpoint clients: SAS tokens (their own, or an
//! edge device's on behalf of a leaf in its scope) and X.509 chains, checked
//! against the registry.

use verge_core::{ClientId, SasToken};

use super::{CloudState, DeviceEntry, Registry, lock, now};
use crate::error::{CloudError, Result};
use crate::registry::DeviceStatus;

impl CloudState {
    /// Authenticates a device (`{d}`) or module (`{d}/{m}`) client with a SAS
    /// token signed by one of its keys, for the device endpoint. The audience
    /// host must be this hub's host name (a `:port` suffix is ignored).
    pub fn verify_device_token(&self, client_id: &str, sas_token: &str) -> Result<ClientId> {
        let unauthorized = |why: String| CloudError::Unauthorized(why);
        let client = ClientId::parse(client_id).map_err(|e| unauthorized(e.to_string()))?;
        let token = SasToken::parse(sas_token).map_err(|e| unauthorized(e.to_string()))?;
        let keys = {
            let reg = lock(&self.inner.reg);
            let d = enabled_device(&reg, &client)?;
            match &client.module {
                None => d.rec.keys.decoded(),
                Some(m) => d
                    .modules
                    .get(m.as_str())
                    .ok_or_else(|| unauthorized(format!("{client_id} is not registered")))?
                    .rec
                    .keys
                    .decoded(),
            }
        };
        // Clients sign whatever host (with or without a port) they dialled;
        // the host part must be ours, the path must name this client.
        let host = strip_port(&self.inner.hostname);
        let sr_host = token.resource().split('/').next().unwrap_or_default();
        if !strip_port(sr_host).eq_ignore_ascii_case(host) {
            return Err(unauthorized(format!(
                "token audience host {sr_host:?} is not {host:?}"
            )));
        }
        token
            .check_audience(&[sr_host], &client)
            .map_err(|e| unauthorized(e.to_string()))?;
        token
            .check_expiry(unix_now())
            .map_err(|e| unauthorized(e.to_string()))?;
        if keys.iter().any(|k| token.verify_signature(k).is_ok()) {
            Ok(client)
        } else {
            Err(unauthorized("SAS signature does not match".into()))
        }
    }

    /// The CA certificates `certificateAuthority` devices chain to.
    pub fn ca_certificates(&self) -> &crate::certs::CaStore {
        &self.inner.certs
    }

    /// The device endpoint's SAS check: [`Self::verify_device_token`], or a
    /// token of an edge device (or its `$edgeHub`) for a leaf device in its
    /// scope — how an edge hub carries a leaf that has no key the hub holds
    /// (an X.509 leaf) upstream on its behalf. A device registered for X.509
    /// is refused its own SAS tokens.
    pub fn verify_device_client(&self, client_id: &str, sas_token: &str) -> Result<ClientId> {
        let unauthorized = |why: String| CloudError::Unauthorized(why);
        let client = ClientId::parse(client_id).map_err(|e| unauthorized(e.to_string()))?;
        let token = SasToken::parse(sas_token).map_err(|e| unauthorized(e.to_string()))?;
        let signer = token
            .resource()
            .split_once('/')
            .and_then(|(_, path)| ClientId::parse_resource(path).ok());
        match signer {
            Some(signer) if signer != client && client.module.is_none() => {
                self.check_on_behalf_of(&client, &signer)?;
                self.verify_device_token(&signer.to_string(), sas_token)?;
                Ok(client)
            }
            _ => {
                if client.module.is_none() {
                    let reg = lock(&self.inner.reg);
                    if let Some(d) = reg.devices.get(client.device.as_str())
                        && d.rec.x509.is_some()
                    {
                        return Err(unauthorized(format!(
                            "device {} is registered for X.509 authentication; SAS tokens are refused",
                            d.rec.device_id
                        )));
                    }
                }
                self.verify_device_token(client_id, sas_token)
            }
        }
    }

    /// `signer` may act for `leaf`: the signer is an edge device (or its
    /// `$edgeHub` module) and `leaf` an enabled device whose parent it is.
    fn check_on_behalf_of(&self, leaf: &ClientId, signer: &ClientId) -> Result<()> {
        let refuse = |why: String| Err(CloudError::Unauthorized(why));
        if signer
            .module
            .as_ref()
            .is_some_and(|m| m.as_str() != crate::api::scope::HUB_MODULE)
        {
            return refuse(format!("{signer} may not act on behalf of {leaf}"));
        }
        let reg = lock(&self.inner.reg);
        let Some(edge) = reg.devices.get(signer.device.as_str()) else {
            return refuse(format!("{signer} is not registered"));
        };
        let Some(d) = reg.devices.get(leaf.device.as_str()) else {
            return refuse(format!("{leaf} is not registered"));
        };
        if d.rec.status == DeviceStatus::Disabled {
            return refuse(format!("device {leaf} is disabled"));
        }
        let parent = edge.rec.iot_edge
            && edge.rec.device_scope.is_some()
            && d.rec.parent_scopes.first() == edge.rec.device_scope.as_ref();
        if !parent {
            return refuse(format!(
                "{leaf} is not in the device scope of {signer}, which may not act on its behalf"
            ));
        }
        Ok(())
    }

    /// Authenticates a device client by the certificate chain it presented
    /// (leaf first): `selfSigned` thumbprints, or `certificateAuthority`
    /// against the verified CA certificates. Modules are refused (verge-cloud
    /// registers modules with SAS only).
    pub fn verify_device_cert(
        &self,
        client_id: &str,
        chain: &[verge_x509::CertificateDer<'static>],
    ) -> Result<ClientId> {
        let unauthorized = |why: String| CloudError::Unauthorized(why);
        let client = ClientId::parse(client_id).map_err(|e| unauthorized(e.to_string()))?;
        if client.module.is_some() {
            return Err(unauthorized(format!(
                "module {client} presented a client certificate; modules authenticate with SAS here"
            )));
        }
        let auth = {
            let reg = lock(&self.inner.reg);
            let d = enabled_device(&reg, &client)?;
            d.rec.x509.clone().ok_or_else(|| {
                unauthorized(format!(
                    "device {client_id} presented a client certificate but is registered for SAS"
                ))
            })?
        };
        let trusted = self.inner.certs.trusted();
        verge_x509::verify_device(chain, client_id, &auth, &trusted, unix_now())
            .map_err(|e| unauthorized(format!("X.509: {e}")))?;
        Ok(client)
    }
}

/// The registered, enabled device `client` belongs to (401 otherwise).
fn enabled_device<'a>(reg: &'a Registry, client: &ClientId) -> Result<&'a DeviceEntry> {
    let d = reg
        .devices
        .get(client.device.as_str())
        .ok_or_else(|| CloudError::Unauthorized(format!("{client} is not registered")))?;
    if d.rec.status == DeviceStatus::Disabled {
        return Err(CloudError::Unauthorized(format!(
            "device {} is disabled",
            d.rec.device_id
        )));
    }
    Ok(d)
}

fn unix_now() -> u64 {
    u64::try_from(now().as_millis() / 1000).unwrap_or(0)
}

/// `host:port` → `host` (IPv6 literals in brackets keep their colons).
fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h
            .split_once(']')
            .map_or(h, |(a, _)| a.trim_start_matches('['));
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => h,
    }
}

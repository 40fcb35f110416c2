//! What a client presents at CONNECT, why it can be refused, and the checks
//! every IoT Hub-style backend shares (the username form, the clock).
//! Deciding who the client is belongs to the backend
//! ([`crate::Backend::authenticate`]).

use std::time::{SystemTime, UNIX_EPOCH};

pub use verge_x509::CertificateDer;

/// What a client presented. `Debug` leaves the password out (a SAS token
/// is a bearer secret).
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    /// MQTT client id (`{d}` or `{d}/{m}`), or the `x-ms-edge-moduleId` header.
    pub client_id: &'a str,
    /// MQTT username (`{hub}/{d}[/{m}]/?api-version=…`); `None` for HTTP.
    pub username: Option<&'a str>,
    /// The password / Authorization header (a SAS token).
    pub password: Option<&'a [u8]>,
    /// The certificate chain the client presented in the TLS handshake
    /// (leaf first); empty without one.
    pub client_certs: &'a [CertificateDer<'static>],
}

impl Credentials<'_> {
    /// X.509 applies when there is a certificate and no password (a
    /// non-empty password keeps the SAS path, as in edgeHub).
    pub fn wants_x509(&self) -> bool {
        self.password.is_none_or(<[u8]>::is_empty) && !self.client_certs.is_empty()
    }
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| ".."))
            .field("client_certs", &self.client_certs.len())
            .finish()
    }
}

/// Why authentication failed. The client only ever learns "not authorized";
/// the reason is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client id is not `{d}` or `{d}/{m}`.
    #[error("bad client id {0:?}")]
    BadClientId(String),
    /// The username is malformed or names another identity.
    #[error("username {username:?} does not match client id {client_id:?}")]
    UsernameMismatch {
        /// The username.
        username: String,
        /// The client id.
        client_id: String,
    },
    /// No password (and no other credential).
    #[error("no credentials")]
    NoCredentials,
    /// The identity is not known to this hub.
    #[error("unknown identity {0}")]
    UnknownIdentity(String),
    /// The token was refused.
    #[error("SAS token refused: {0}")]
    Token(#[from] verge_core::SasError),
    /// The password is not UTF-8.
    #[error("password is not UTF-8")]
    NotUtf8,
    /// The client certificate was refused.
    #[error("X.509: {0}")]
    X509(#[from] verge_x509::X509Error),
    /// A module presented a certificate: only devices authenticate by X.509
    /// here (edgeHub's `UnsupportedClientIdentityType`).
    #[error(
        "module {0} presented a client certificate; modules cannot authenticate with X.509 (use SAS)"
    )]
    ModuleCertificate(String),
    /// The identity is registered with SAS keys (or has no certificate rule).
    #[error("{0} presented a client certificate but is not registered for X.509 authentication")]
    NotX509(String),
    /// The identity is disabled.
    #[error("{0} is disabled")]
    Disabled(String),
    /// Refused by the backend for another reason (its own message).
    #[error("{0}")]
    Refused(String),
}

/// Checks `{hub}/{clientId}/?api-version=…` (or the variant without `?`):
/// the identity part must equal the client id and `api-version` must be present.
pub fn check_username(username: &str, client_id: &str) -> Result<(), AuthError> {
    let mismatch = || AuthError::UsernameMismatch {
        username: username.to_owned(),
        client_id: client_id.to_owned(),
    };
    let (_host, rest) = username.split_once('/').ok_or_else(mismatch)?;
    let (identity, query) = if let Some((id, q)) = rest.split_once("/?") {
        (id, q)
    } else {
        // `{d}[/{m}]/api-version=…`: the query is the last segment.
        let (id, q) = rest.rsplit_once('/').ok_or_else(mismatch)?;
        (id, q)
    };
    if identity != client_id {
        return Err(mismatch());
    }
    let has_api_version = query
        .split('&')
        .any(|kv| kv.split('=').next() == Some("api-version"));
    if !has_api_version {
        return Err(mismatch());
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let c = Credentials {
            client_id: "d1",
            username: Some("h/d1/?api-version=1"),
            password: Some(b"SharedAccessSignature sr=h&sig=secret"),
            client_certs: &[],
        };
        let text = format!("{c:?}");
        assert!(text.contains("d1") && !text.contains("secret"), "{text}");
    }

    #[test]
    fn username_forms() {
        assert!(
            check_username(
                "h/d1/m1/?api-version=2019-10-01&DeviceClientType=x",
                "d1/m1"
            )
            .is_ok()
        );
        assert!(check_username("h/d1/?api-version=2019-10-01", "d1").is_ok());
        assert!(check_username("h/d1/api-version=2019-10-01&x=y", "d1").is_ok());
        assert!(check_username("h/d1/m1/api-version=1", "d1/m1").is_ok());
        assert!(check_username("h/d2/?api-version=1", "d1").is_err());
        assert!(check_username("h/d1/m2/?api-version=1", "d1/m1").is_err());
        assert!(check_username("h/d1/?foo=1", "d1").is_err());
        assert!(check_username("nothing", "d1").is_err());
    }
}

//! The SASL mechanisms IoT Hub clients use (edgeHub offers the same three):
//! ANONYMOUS (azure-eventhub, Proton; then `$cbs`), MSSBCBS (uamqp and the C
//! SDK, which abort unless it is offered; an anonymous mechanism under that
//! name, then `$cbs`) and PLAIN (`{d}[/modules/{m}]@sas.{hub}` with a SAS
//! token as password).
//!
//! fe2o3's [`SaslAcceptor`] is synchronous, so PLAIN credentials are only
//! recorded here; the connection checks them with the backend right after
//! OPEN and closes with `amqp:unauthorized-access` if they are refused.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

/// What PLAIN carried: the identity part of the user name and the token.
#[derive(Clone)]
pub struct PlainCredentials {
    /// `{d}` or `{d}/modules/{m}` (URL-decoded later).
    pub identity: String,
    /// The password, a SAS token.
    pub token: String,
}

impl std::fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The server side of the SASL exchange; one per connection (clones share
/// what PLAIN recorded).
#[derive(Debug, Clone, Default)]
pub struct Mechanisms {
    plain: Arc<Mutex<Option<PlainCredentials>>>,
}

impl Mechanisms {
    /// What PLAIN recorded, if the client used it.
    pub fn plain(&self) -> Option<PlainCredentials> {
        self.plain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

/// Splits a PLAIN initial response (`authzid NUL authcid NUL password`).
/// The user name is `{identity}@sas.{hub}` or `{identity}@{hub}`; the hub
/// part is not checked here (the token's audience is).
pub fn parse_plain(response: &[u8]) -> Option<PlainCredentials> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let token = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    let (identity, _hub) = user.rsplit_once('@')?;
    if identity.is_empty() || token.is_empty() {
        return None;
    }
    Some(PlainCredentials {
        identity: identity.to_owned(),
        token: token.to_owned(),
    })
}

impl SaslAcceptor for Mechanisms {
    fn mechanisms(&self) -> Array<Symbol> {
        Array(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let parsed = init
                    .initial_response
                    .as_deref()
                    .and_then(|r| parse_plain(r));
                match parsed {
                    Some(creds) => {
                        *self
                            .plain
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(creds);
                        outcome(SaslCode::Ok)
                    }
                    None => outcome(SaslCode::Auth),
                }
            }
            _ => outcome(SaslCode::Auth),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // None of the offered mechanisms sends challenges.
        outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_forms() {
        let p = parse_plain(b"\0d1/modules/m1@sas.hub\0SharedAccessSignature sr=x").expect("ok");
        assert_eq!(p.identity, "d1/modules/m1");
        assert_eq!(p.token, "SharedAccessSignature sr=x");
        assert!(parse_plain(b"\0nohub\0tok").is_none());
        assert!(parse_plain(b"\0d@h\0").is_none());
        assert!(parse_plain(b"only").is_none());
        assert!(
            format!("{:?}", parse_plain(b"\0d@h\0secret").expect("ok"))
                .find("secret")
                .is_none()
        );
    }
}

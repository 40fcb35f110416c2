//! The `$cbs` node (claims-based security): clients put a SAS token per
//! identity on one connection; links for that identity are then allowed
//! until the token expires or is replaced (renewal keeps links open).
//! Replies are typed as the strict clients require (`amqp-iothub.md` §2.2):
//! an AMQP int `status-code`, a `status-description`, and a correlation-id
//! equal to the request's message-id, same AMQP type (uamqp-c wants its ulong
//! back); Proton's request/response helper sets only a correlation-id, which
//! is echoed when there is no message-id.

use std::collections::HashMap;
use std::sync::Mutex;

use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use tokio::sync::watch;
use verge_core::{ClientId, SasToken};

/// The token types edgeHub accepts.
const TOKEN_TYPES: [&str; 2] = [
    "servicebus.windows.net:sastoken",
    "azure-devices.net:sastoken",
];

/// The tokens held on one connection: identity → expiry (Unix seconds).
#[derive(Debug)]
pub struct Tokens {
    map: Mutex<HashMap<ClientId, u64>>,
    changed: watch::Sender<u64>,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Tokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, u64>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records (or renews) `client`'s token, valid until `expiry`.
    pub fn put(&self, client: ClientId, expiry: u64) {
        self.lock().insert(client, expiry);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Number of identities holding a token.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no identity holds a token.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// True when `client` holds a token (valid or not).
    pub fn contains(&self, client: &ClientId) -> bool {
        self.lock().contains_key(client)
    }

    /// True when `client` holds a token valid at `now`.
    pub fn valid(&self, client: &ClientId, now: u64) -> bool {
        self.lock().get(client).is_some_and(|e| *e > now)
    }

    /// True when some identity holds a token valid at `now`.
    pub fn any_valid(&self, now: u64) -> bool {
        self.lock().values().any(|e| *e > now)
    }

    /// Completes once `client` holds no valid token (at once if it holds
    /// none); a renewal before the expiry moves the deadline.
    pub async fn expired(&self, client: &ClientId) {
        let mut rx = self.changed.subscribe();
        loop {
            let expiry = self.lock().get(client).copied();
            let now = verge_endpoint::auth::unix_now();
            let Some(expiry) = expiry.filter(|e| *e > now) else {
                return;
            };
            let left = std::time::Duration::from_secs(expiry - now);
            tokio::select! {
                () = tokio::time::sleep(left) => {}
                r = rx.changed() => if r.is_err() {
                    // The registry is gone with its connection.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// A well-formed put-token request.
#[derive(Debug)]
pub struct PutToken {
    /// The identity the token is put for: the one `name` names, else the
    /// token's `sr`'s. They differ when an edge hub puts its own token for a
    /// leaf it carries on its behalf (an X.509 leaf: the hub holds no key of
    /// it); the backend decides whether the signer may (verge-cloud: a parent
    /// edge for a leaf in its scope; the edge hub: never).
    pub client: ClientId,
    /// The token.
    pub token: String,
    /// Its expiry, Unix seconds.
    pub expiry: u64,
}

/// A refused request: CBS status code and description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {description}")]
pub struct CbsError {
    /// 400, 401, …
    pub status: i32,
    /// Why.
    pub description: String,
}

impl CbsError {
    fn bad(description: impl Into<String>) -> Self {
        Self {
            status: 400,
            description: description.into(),
        }
    }
}

fn app_prop<'a>(msg: &'a Message<Body<Value>>, key: &str) -> Option<&'a SimpleValue> {
    msg.application_properties.as_ref()?.0.get(key)
}

fn app_str<'a>(msg: &'a Message<Body<Value>>, key: &str) -> Option<&'a str> {
    match app_prop(msg, key)? {
        SimpleValue::String(s) => Some(s),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The identity a token's `sr` names: `[amqps://]{host}/devices/{d}[/modules/{m}]`.
pub fn token_identity(resource: &str) -> Option<ClientId> {
    let decoded = percent_encoding::percent_decode_str(resource)
        .decode_utf8()
        .ok()?;
    let at = decoded.find("/devices/")?;
    ClientId::parse_resource(&decoded[at..]).ok()
}

/// Parses a put-token request (the signature is checked by the caller,
/// with the backend).
pub fn parse_request(msg: &Message<Body<Value>>) -> Result<PutToken, CbsError> {
    match app_str(msg, "operation") {
        Some("put-token") => {}
        other => return Err(CbsError::bad(format!("unsupported operation {other:?}"))),
    }
    match app_str(msg, "type") {
        Some(t) if TOKEN_TYPES.contains(&t) => {}
        other => return Err(CbsError::bad(format!("unsupported token type {other:?}"))),
    }
    if app_str(msg, "name").is_none_or(str::is_empty) {
        return Err(CbsError::bad("missing name"));
    }
    let token = match &msg.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone(),
            _ => return Err(CbsError::bad("the token must be an AMQP string")),
        },
        _ => return Err(CbsError::bad("the token must be an amqp-value")),
    };
    let parsed = SasToken::parse(&token).map_err(|e| CbsError::bad(format!("bad token: {e}")))?;
    let named = app_str(msg, "name").and_then(token_identity);
    let client = named
        .or_else(|| token_identity(parsed.resource()))
        .ok_or_else(|| {
            CbsError::bad(format!(
                "token resource {:?} names no device or module",
                parsed.resource()
            ))
        })?;
    Ok(PutToken {
        client,
        expiry: parsed.expiry(),
        token,
    })
}

/// The reply to `request` with `status` and `description`.
pub fn response(
    request: &Message<Body<Value>>,
    status: i32,
    description: &str,
) -> Message<Body<Value>> {
    let req = request.properties.as_ref();
    let props = Properties {
        correlation_id: req
            .and_then(|p| p.message_id.clone())
            .or_else(|| req.and_then(|p| p.correlation_id.clone())),
        to: req.and_then(|p| p.reply_to.clone()),
        ..Properties::default()
    };
    let app = ApplicationProperties::builder()
        .insert("status-code".to_owned(), SimpleValue::Int(status))
        .insert(
            "status-description".to_owned(),
            SimpleValue::String(description.to_owned()),
        )
        .build();
    Message::builder()
        .properties(props)
        .application_properties(app)
        .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
            Value::Null,
        )))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{AmqpValue, MessageId};

    fn request(token: &str) -> Message<Body<Value>> {
        request_named(token, "h/devices/d1/modules/m1")
    }

    fn request_named(token: &str, name: &str) -> Message<Body<Value>> {
        let props = Properties {
            message_id: Some(MessageId::Ulong(7)),
            ..Properties::default()
        };
        Message::builder()
            .properties(props)
            .application_properties(
                ApplicationProperties::builder()
                    .insert(
                        "operation".to_owned(),
                        SimpleValue::String("put-token".into()),
                    )
                    .insert(
                        "type".to_owned(),
                        SimpleValue::String("servicebus.windows.net:sastoken".into()),
                    )
                    .insert("name".to_owned(), SimpleValue::String(name.into()))
                    .build(),
            )
            .body(Body::Value(AmqpValue(Value::String(token.to_owned()))))
            .build()
    }

    #[test]
    fn parses_and_answers() {
        let t = "SharedAccessSignature sr=h.example%2Fdevices%2Fd1%2Fmodules%2Fm1&sig=YWJj&se=100";
        let p = parse_request(&request(t)).expect("parsed");
        assert_eq!(p.client, ClientId::parse("d1/m1").expect("id"));
        assert_eq!(p.expiry, 100);
        let r = response(&request(t), 200, "OK");
        let props = r.properties.expect("props");
        assert_eq!(props.correlation_id, Some(MessageId::Ulong(7)));
        let app = r.application_properties.expect("app").0;
        assert_eq!(app.get("status-code"), Some(&SimpleValue::Int(200)));
        assert!(parse_request(&request("not a token")).is_err());
        let t = "SharedAccessSignature sr=h.example&sig=YWJj&se=100";
        assert_eq!(
            parse_request(&request_named(t, "h.example"))
                .expect_err("no identity")
                .status,
            400
        );
        // A name that is no identity (a hub-wide audience): the token's.
        let t = "SharedAccessSignature sr=h.example%2Fdevices%2Fd1&sig=YWJj&se=100";
        let p = parse_request(&request_named(t, "h.example")).expect("parsed");
        assert_eq!(p.client, ClientId::parse("d1").expect("id"));
        // An edge's token put for a leaf (on its behalf): the leaf, for the
        // backend to allow or refuse.
        let t = "SharedAccessSignature sr=h.example%2Fdevices%2Fedge%2Fmodules%2F%24edgeHub&sig=YWJj&se=100";
        let p = parse_request(&request_named(t, "amqps://h.example/devices/leaf")).expect("parsed");
        assert_eq!(p.client, ClientId::parse("leaf").expect("id"));
    }

    #[tokio::test]
    async fn expiry_and_renewal() {
        let tokens = Tokens::default();
        let c = ClientId::parse("d1").expect("id");
        let now = verge_endpoint::auth::unix_now();
        tokens.put(c.clone(), now + 1);
        assert!(tokens.valid(&c, now));
        let t0 = std::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(5), tokens.expired(&c))
            .await
            .expect("expired in time");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(500));
        tokens.put(c.clone(), now + 3600);
        let renewed =
            tokio::time::timeout(std::time::Duration::from_millis(300), tokens.expired(&c)).await;
        assert!(renewed.is_err(), "a renewed token does not expire");
    }
}

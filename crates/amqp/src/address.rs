//! IoT Hub link addresses. Clients send them absolute
//! (`amqps://{host}[:port]/devices/…`) or as a bare path; like edgeHub we
//! match the path only, its fixed segments case-insensitively (C# writes
//! `deviceBound`, C writes `devicebound`), ids URL-decoded.

use verge_core::{ClientId, DeviceId, ModuleId};

/// What a link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `…/messages/events`: telemetry / module output (client sends) or
    /// module inputs (client receives).
    Events,
    /// `/devices/{d}/messages/devicebound`: cloud-to-device messages.
    DeviceBound,
    /// `…/twin`.
    Twin,
    /// `…/methods/devicebound`.
    Methods,
}

/// A parsed identity link address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAddress {
    /// The identity the link belongs to.
    pub client: ClientId,
    /// What the link is for.
    pub kind: Kind,
}

/// True for the CBS node (`$cbs`, also as a path or a URI), in either direction.
pub fn is_cbs(address: &str) -> bool {
    path_of(address).trim_start_matches('/').starts_with("$cbs")
}

/// The path part of `address`.
fn path_of(address: &str) -> &str {
    for scheme in ["amqps://", "amqp://", "wss://", "ws://"] {
        if address.len() >= scheme.len() && address[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &address[scheme.len()..];
            return rest.find('/').map_or("", |i| &rest[i..]);
        }
    }
    address
}

fn decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Parses an identity link address; `None` when it is not one.
pub fn parse(address: &str) -> Option<LinkAddress> {
    let path = path_of(address);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let is = |s: &str, lit: &str| s.eq_ignore_ascii_case(lit);
    let (device, module, rest) = match segs.as_slice() {
        [dv, d, md, m, rest @ ..] if is(dv, "devices") && is(md, "modules") => (*d, Some(*m), rest),
        [dv, d, rest @ ..] if is(dv, "devices") => (*d, None, rest),
        _ => return None,
    };
    let kind = match rest {
        [a, b] if is(a, "messages") && is(b, "events") => Kind::Events,
        [a, b] if is(a, "messages") && is(b, "devicebound") && module.is_none() => {
            Kind::DeviceBound
        }
        [a] if is(a, "twin") => Kind::Twin,
        [a, b] if is(a, "methods") && is(b, "devicebound") => Kind::Methods,
        _ => return None,
    };
    let device = DeviceId::new(decode(device)?).ok()?;
    let client = match module {
        None => ClientId::device(device),
        Some(m) => ClientId::module(device, ModuleId::new(decode(m)?).ok()?),
    };
    Some(LinkAddress { client, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClientId {
        ClientId::parse(s).expect("id")
    }

    #[test]
    fn forms() {
        let a = parse("amqps://h.example:5671/devices/d1/modules/m1/messages/events").expect("a");
        assert_eq!((a.client, a.kind), (c("d1/m1"), Kind::Events));
        let a = parse("/devices/d%2D1/messages/deviceBound").expect("a");
        assert_eq!((a.client, a.kind), (c("d-1"), Kind::DeviceBound));
        let a = parse("amqps://h/Devices/d1/Twin").expect("a");
        assert_eq!((a.client, a.kind), (c("d1"), Kind::Twin));
        let a = parse("devices/d1/modules/m1/methods/devicebound").expect("a");
        assert_eq!((a.client, a.kind), (c("d1/m1"), Kind::Methods));
        assert!(parse("/devices/d1/modules/m1/messages/devicebound").is_none());
        assert!(parse("/devices/d1/messages/other").is_none());
        assert!(parse("/devices//messages/events").is_none());
        assert!(parse("$cbs").is_none());
        assert!(is_cbs("$cbs") && is_cbs("amqps://h/$cbs") && !is_cbs("/devices/d/twin"));
    }
}

//! Direct-method limits shared by the edge hub and verge-cloud, so both
//! refuse the same names and payloads before anything reaches a client's
//! MQTT connection (a name is a topic level of
//! `$iothub/methods/POST/{name}/?$rid=…`).

/// Longest method name accepted, in bytes. IoT Hub documents no limit of
/// its own; this one is far above any real name and keeps the request topic
/// a small fraction of MQTT's 65,535-byte limit. It matches IoT Hub's
/// longest identifiers (device and module ids, 128 characters).
pub const MAX_METHOD_NAME_LEN: usize = 128;

/// Largest method request payload (serialized JSON), bytes: IoT Hub's limit
/// for direct-method payloads (128 KB).
pub const MAX_METHOD_PAYLOAD: usize = 128 * 1024;

/// Why a method name was refused (the message says which rule it broke).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MethodNameError(String);

/// Checks a direct-method name as IoT Hub does: non-empty, printable US-ASCII
/// without the separators IoT Hub documents as excluded
/// (`$ ( ) < > @ , ; : \ " / [ ] ? = { }`, space and tab), and without
/// MQTT's wildcards `#` and `+`, which no MQTT topic may carry. Control
/// characters, NUL included, are not printable.
pub fn check_method_name(name: &str) -> Result<(), MethodNameError> {
    let bad = |why: String| Err(MethodNameError(why));
    if name.is_empty() {
        return bad("method name is empty".into());
    }
    if name.len() > MAX_METHOD_NAME_LEN {
        return bad(format!(
            "method name is {} bytes long; the limit is {MAX_METHOD_NAME_LEN}",
            name.len()
        ));
    }
    const EXCLUDED: &[u8] = b"$()<>@,;:\\\"/[]?={}#+";
    match name
        .bytes()
        .find(|b| !b.is_ascii_graphic() || EXCLUDED.contains(b))
    {
        Some(b) => bad(format!(
            "method name contains {:?}, which is not allowed (printable US-ASCII only, without $()<>@,;:\\\"/[]?={{}}#+ and spaces)",
            char::from(b)
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "reboot",
            "get_status-2",
            "a.b~c",
            &"x".repeat(MAX_METHOD_NAME_LEN),
        ] {
            assert_eq!(check_method_name(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "",
            "a#b",
            "a+b",
            "a/b",
            "a b",
            "a\tb",
            "a\0b",
            "$x",
            "é",
            &"x".repeat(MAX_METHOD_NAME_LEN + 1),
        ] {
            assert!(check_method_name(bad).is_err(), "{bad:?}");
        }
    }
}

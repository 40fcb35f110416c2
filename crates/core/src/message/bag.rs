//! The MQTT topic property bag: `key=value&key=value` in a topic's last segment.
//!
//! Encoding follows the Azure SDKs (Python's `urlencode(…, quote_via=quote)`):
//! keys and values percent-encoded except letters, digits and `_ . - ~`, so `$`
//! becomes `%24`, `/` `%2F` and space `%20`. System properties come first, in
//! a fixed order (`$.on`, `$.mid`, `$.cid`, …), then application properties in
//! their stored order.
//!
//! Decoding: segments split on `&`, each on its first `=`; a key without `=`
//! gets an empty value; empty segments are skipped; `+` is a literal plus (the
//! SDKs send spaces as `%20`). A repeated key keeps its first value, as
//! edgeHub's parsers do. `$.`-keys Verge does not know stay application
//! properties so nothing a client sent is lost.

use percent_encoding::percent_decode_str;

use super::{Properties, SystemProperties};
use crate::sas::URL_ENCODE_SET;
use crate::time::{Timestamp, TimestampError};
use percent_encoding::utf8_percent_encode;

/// A property bag that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    /// A key or value is not valid percent-encoded UTF-8.
    #[error("property bag segment {segment:?} is not valid percent-encoded UTF-8")]
    BadEncoding {
        /// The raw segment.
        segment: String,
    },
    /// `$.exp` or `$.ctime` is not a timestamp.
    #[error("property {key}: {source}")]
    BadTimestamp {
        /// The key.
        key: &'static str,
        /// The parse error.
        source: TimestampError,
    },
    /// A key is empty (`=value`).
    #[error("property bag segment {segment:?} has an empty key")]
    EmptyKey {
        /// The raw segment.
        segment: String,
    },
}

/// Wire key of each string-valued system property, in encoding order.
/// `$.exp` and `$.ctime` (times) are handled beside them.
macro_rules! string_keys {
    ($m:ident) => {
        $m!("$.on", output_name);
        $m!("$.mid", message_id);
        $m!("$.cid", correlation_id);
        $m!("$.uid", user_id);
        $m!("$.to", to);
        $m!("$.ct", content_type);
        $m!("$.ce", content_encoding);
        $m!("$.ifid", interface_id);
        $m!("$.schema", message_schema);
        $m!("$.sub", component_name);
        $m!("$.cdid", connection_device_id);
        $m!("$.cmid", connection_module_id);
        $m!("iothub-ack", ack);
    };
}

fn decode_part(raw: &str, segment: &str) -> Result<String, BagError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| BagError::BadEncoding {
            segment: segment.to_owned(),
        })
}

/// Decodes a property bag into system and application properties.
pub fn decode_bag(bag: &str) -> Result<(SystemProperties, Properties), BagError> {
    let mut sys = SystemProperties::default();
    let mut app = Properties::new();
    let mut seen: Vec<String> = Vec::new();
    for segment in bag.split('&').filter(|s| !s.is_empty()) {
        let (rk, rv) = segment.split_once('=').unwrap_or((segment, ""));
        let key = decode_part(rk, segment)?;
        let value = decode_part(rv, segment)?;
        if key.is_empty() {
            return Err(BagError::EmptyKey {
                segment: segment.to_owned(),
            });
        }
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        macro_rules! take {
            ($k:literal, $f:ident) => {
                if key == $k {
                    sys.$f = Some(value);
                    continue;
                }
            };
        }
        string_keys!(take);
        match key.as_str() {
            "$.exp" => {
                sys.absolute_expiry =
                    Some(
                        Timestamp::parse(&value).map_err(|source| BagError::BadTimestamp {
                            key: "$.exp",
                            source,
                        })?,
                    )
            }
            "$.ctime" => {
                sys.creation_time =
                    Some(
                        Timestamp::parse(&value).map_err(|source| BagError::BadTimestamp {
                            key: "$.ctime",
                            source,
                        })?,
                    )
            }
            _ => app.insert(key, value),
        }
    }
    Ok((sys, app))
}

/// Encodes system and application properties as a property bag (no leading `/`).
pub fn encode_bag(sys: &SystemProperties, app: &Properties) -> String {
    let mut out = String::new();
    encode_bag_into(&mut out, sys, app);
    out
}

/// [`encode_bag`], appended to `out` (e.g. after a topic prefix): one
/// buffer per bag instead of one string per key and value.
pub fn encode_bag_into(out: &mut String, sys: &SystemProperties, app: &Properties) {
    use std::fmt::Write as _;
    let start = out.len();
    for_each_pair(sys, app, |k, v| {
        if out.len() > start {
            out.push('&');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "{}={}",
            utf8_percent_encode(k, URL_ENCODE_SET),
            utf8_percent_encode(v, URL_ENCODE_SET)
        );
    });
}

/// The length in bytes of [`encode_bag`]'s result, without building it: what
/// a property bag grows to once percent-encoded (a `:` becomes `%3A`, so a
/// bag can triple). Used to refuse, at ingest, a message whose topic would
/// not fit MQTT's [`super::MAX_TOPIC_LEN`].
pub fn encoded_bag_len(sys: &SystemProperties, app: &Properties) -> usize {
    fn enc(s: &str) -> usize {
        utf8_percent_encode(s, URL_ENCODE_SET).map(str::len).sum()
    }
    let mut len = 0;
    let mut first = true;
    for_each_pair(sys, app, |k, v| {
        // `&` between pairs, `=` inside each.
        len += usize::from(!first) + enc(k) + 1 + enc(v);
        first = false;
    });
    len
}

/// Calls `f` with each (key, value) pair of the bag, in wire order. The one
/// place that order lives, so [`encode_bag_into`] and [`encoded_bag_len`]
/// cannot disagree.
fn for_each_pair(sys: &SystemProperties, app: &Properties, mut f: impl FnMut(&str, &str)) {
    macro_rules! put {
        ($k:literal, $f:ident) => {
            if let Some(v) = &sys.$f {
                f($k, v);
            }
        };
    }
    string_keys!(put);
    if let Some(t) = sys.absolute_expiry {
        f("$.exp", &t.to_iso8601());
    }
    if let Some(t) = sys.creation_time {
        f("$.ctime", &t.to_iso8601());
    }
    for (k, v) in app.iter() {
        f(k, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_what_the_python_sdk_sends() {
        // Seen on the wire from azure-iot-device 2.14.0 (azure-sdk-wire-notes.md §4).
        let (sys, app) = decode_bag(
            "%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&a%2Fb=x%26y%3Dz&alert=high%20temp",
        )
        .unwrap();
        assert_eq!(sys.message_id.as_deref(), Some("mid-1"));
        assert_eq!(sys.correlation_id.as_deref(), Some("cid-1"));
        assert_eq!(sys.content_type.as_deref(), Some("application/json"));
        assert_eq!(sys.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(app.get("a/b"), Some("x&y=z"));
        assert_eq!(app.get("alert"), Some("high temp"));

        let (sys, app) = decode_bag("%24.on=output1&k=v").unwrap();
        assert_eq!(sys.output_name.as_deref(), Some("output1"));
        assert_eq!(app.get("k"), Some("v"));
    }

    #[test]
    fn encoded_len_matches_the_encoding() {
        let (mut sys, mut app) =
            decode_bag("%24.on=o&%24.mid=m&a=b&%24.exp=2026-01-01T00%3A00%3A00Z").unwrap();
        sys.connection_device_id = Some("d".into());
        sys.connection_module_id = Some("m:1 ü".into());
        app.insert("k", ":".repeat(1000));
        assert_eq!(encoded_bag_len(&sys, &app), encode_bag(&sys, &app).len());
        assert_eq!(
            encoded_bag_len(&SystemProperties::default(), &Properties::new()),
            0
        );
    }

    #[test]
    fn encodes_like_the_python_sdk() {
        let sys = SystemProperties {
            message_id: Some("mid-1".into()),
            correlation_id: Some("cid-1".into()),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ..Default::default()
        };
        let app: Properties = [("a/b", "x&y=z"), ("alert", "high temp")]
            .into_iter()
            .collect();
        assert_eq!(
            encode_bag(&sys, &app),
            "%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&a%2Fb=x%26y%3Dz&alert=high%20temp"
        );
        let sys = SystemProperties {
            output_name: Some("output1".into()),
            ..Default::default()
        };
        let app: Properties = [("k", "v")].into_iter().collect();
        assert_eq!(encode_bag(&sys, &app), "%24.on=output1&k=v");
        assert_eq!(
            encode_bag(&SystemProperties::default(), &Properties::new()),
            ""
        );
    }

    #[test]
    fn encodes_after_a_prefix() {
        let sys = SystemProperties {
            message_id: Some("m 1".into()),
            ..SystemProperties::default()
        };
        let app: Properties = [("a&b", "c=d")].into_iter().collect();
        let mut topic = String::from("devices/d/modules/m/inputs/in1/");
        encode_bag_into(&mut topic, &sys, &app);
        assert_eq!(
            topic,
            format!("devices/d/modules/m/inputs/in1/{}", encode_bag(&sys, &app))
        );
        assert_eq!(
            topic,
            "devices/d/modules/m/inputs/in1/%24.mid=m%201&a%26b=c%3Dd"
        );
        let mut empty = String::from("x/");
        encode_bag_into(&mut empty, &SystemProperties::default(), &Properties::new());
        assert_eq!(empty, "x/");
    }

    #[test]
    fn hub_stamped_properties_and_times() {
        let sys = SystemProperties {
            connection_device_id: Some("edge1".into()),
            connection_module_id: Some("$edgeHub".into()),
            absolute_expiry: Some(Timestamp::from_millis(1_764_064_800_123)),
            ack: Some("full".into()),
            ..Default::default()
        };
        let bag = encode_bag(&sys, &Properties::new());
        assert_eq!(
            bag,
            "%24.cdid=edge1&%24.cmid=%24edgeHub&iothub-ack=full&%24.exp=2025-11-25T10%3A00%3A00.123Z"
        );
        assert_eq!(decode_bag(&bag).unwrap().0, sys);
    }

    #[test]
    fn tolerant_and_strict_where_it_matters() {
        let (_, app) = decode_bag("a=1&&b&c=x=y&a=2&p=1+2&$.unknown=z").unwrap();
        assert_eq!(
            app.iter().collect::<Vec<_>>(),
            vec![
                ("a", "1"),
                ("b", ""),
                ("c", "x=y"),
                ("p", "1+2"),
                ("$.unknown", "z")
            ]
        );
        assert!(decode_bag("a=%zz").is_ok(), "a stray % is kept literally");
        assert!(matches!(
            decode_bag("a=%ff"),
            Err(BagError::BadEncoding { .. })
        ));
        assert!(matches!(decode_bag("=v"), Err(BagError::EmptyKey { .. })));
        assert!(matches!(
            decode_bag("%24.exp=tomorrow"),
            Err(BagError::BadTimestamp { key: "$.exp", .. })
        ));
        assert_eq!(
            decode_bag("").unwrap(),
            (SystemProperties::default(), Properties::new())
        );
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(".{0,12}")
    }

    prop_compose! {
        fn arb_system()(
            a in opt_text(), b in opt_text(), c in opt_text(), d in opt_text(), e in opt_text(),
            f in opt_text(), g in opt_text(), h in opt_text(), i in opt_text(), j in opt_text(),
            k in opt_text(), l in opt_text(), m in opt_text(),
            exp in proptest::option::of(-62_000_000_000_000i64..250_000_000_000_000),
            ctime in proptest::option::of(0i64..4_000_000_000_000),
        ) -> SystemProperties {
            SystemProperties {
                output_name: a, message_id: b, correlation_id: c, user_id: d, to: e,
                content_type: f, content_encoding: g, interface_id: h, message_schema: i,
                component_name: j, connection_device_id: k, connection_module_id: l, ack: m,
                absolute_expiry: exp.map(Timestamp::from_millis),
                creation_time: ctime.map(Timestamp::from_millis),
                ..Default::default()
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(
            sys in arb_system(),
            app in proptest::collection::vec(("[^$].{0,10}|\\$[^.].{0,5}", ".{0,20}"), 0..6),
        ) {
            let app: Properties = app.into_iter().collect();
            let bag = encode_bag(&sys, &app);
            // Everything is percent-encoded: the bag itself never breaks a topic.
            prop_assert!(!bag.contains('/') && !bag.contains('#') && !bag.contains('+'));
            prop_assert_eq!(encoded_bag_len(&sys, &app), bag.len());
            let (s2, a2) = decode_bag(&bag).unwrap();
            prop_assert_eq!(s2, sys);
            prop_assert_eq!(a2, app);
        }

        #[test]
        fn decode_never_panics(s in ".{0,300}") {
            let _ = decode_bag(&s);
        }
    }
}

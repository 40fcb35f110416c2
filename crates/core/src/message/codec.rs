//! Verge's storage encoding of a [`Message`]: compact, versioned, self-delimiting.
//!
//! ```text
//! u8  version (1)
//! u8  kind (0 telemetry, 1 twin change notification)
//! varint n, then n × (u8 tag, varint len, len bytes)   system properties
//! varint n, then n × (varint len, key, varint len, value) application properties
//! varint len, body
//! ```
//! Times are 8-byte little-endian milliseconds. Unknown system tags are
//! skipped, so a later version can add properties without a migration.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Message, MessageKind, Properties, SystemProperties};
use crate::time::Timestamp;

/// The version this build writes.
pub const VERSION: u8 = 1;

/// A stored message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The buffer ended inside a field.
    #[error("stored message is truncated")]
    Truncated,
    /// Written by a newer Verge.
    #[error("stored message has version {0}; this build reads version {VERSION}")]
    UnsupportedVersion(u8),
    /// A field holds an impossible value.
    #[error("stored message is corrupt: {0}")]
    Corrupt(&'static str),
}

macro_rules! string_tags {
    ($m:ident) => {
        $m!(1, message_id);
        $m!(2, correlation_id);
        $m!(3, user_id);
        $m!(4, to);
        $m!(5, content_type);
        $m!(6, content_encoding);
        $m!(7, message_schema);
        $m!(8, output_name);
        $m!(9, input_name);
        $m!(10, connection_device_id);
        $m!(11, connection_module_id);
        $m!(12, connection_auth_method);
        $m!(13, ack);
        $m!(14, interface_id);
        $m!(15, component_name);
    };
}
const TAG_EXPIRY: u8 = 32;
const TAG_CTIME: u8 = 33;
const TAG_ENQUEUED: u8 = 34;

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut Bytes) -> Result<u64, CodecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return Err(CodecError::Truncated);
        }
        let b = buf.get_u8();
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Corrupt("varint longer than 64 bits"))
}

fn get_len(buf: &mut Bytes) -> Result<usize, CodecError> {
    let n = usize::try_from(get_varint(buf)?).map_err(|_| CodecError::Corrupt("length"))?;
    if n > buf.remaining() {
        return Err(CodecError::Truncated);
    }
    Ok(n)
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, CodecError> {
    let n = get_len(buf)?;
    Ok(buf.split_to(n))
}

fn get_string(buf: &mut Bytes) -> Result<String, CodecError> {
    String::from_utf8(get_bytes(buf)?.to_vec())
        .map_err(|_| CodecError::Corrupt("text is not UTF-8"))
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_varint(buf, b.len() as u64);
    buf.put_slice(b);
}

/// Encodes a message for the store.
pub fn encode(msg: &Message) -> Bytes {
    let mut buf = BytesMut::with_capacity(msg.size() + 64);
    buf.put_u8(VERSION);
    buf.put_u8(match msg.kind {
        MessageKind::Telemetry => 0,
        MessageKind::TwinChangeNotification => 1,
    });
    let sys = &msg.system;
    let mut fields: Vec<(u8, Vec<u8>)> = Vec::new();
    macro_rules! put {
        ($tag:literal, $f:ident) => {
            if let Some(v) = &sys.$f {
                fields.push(($tag, v.as_bytes().to_vec()));
            }
        };
    }
    string_tags!(put);
    for (tag, t) in [
        (TAG_EXPIRY, sys.absolute_expiry),
        (TAG_CTIME, sys.creation_time),
        (TAG_ENQUEUED, sys.enqueued_time),
    ] {
        if let Some(t) = t {
            fields.push((tag, t.as_millis().to_le_bytes().to_vec()));
        }
    }
    put_varint(&mut buf, fields.len() as u64);
    for (tag, v) in &fields {
        buf.put_u8(*tag);
        put_bytes(&mut buf, v);
    }
    put_varint(&mut buf, msg.properties.len() as u64);
    for (k, v) in msg.properties.iter() {
        put_bytes(&mut buf, k.as_bytes());
        put_bytes(&mut buf, v.as_bytes());
    }
    put_bytes(&mut buf, &msg.body);
    buf.freeze()
}

/// Decodes a stored message. The body shares `buf`'s memory.
pub fn decode(mut buf: Bytes) -> Result<Message, CodecError> {
    if buf.remaining() < 2 {
        return Err(CodecError::Truncated);
    }
    let version = buf.get_u8();
    if version != VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let kind = match buf.get_u8() {
        0 => MessageKind::Telemetry,
        1 => MessageKind::TwinChangeNotification,
        _ => return Err(CodecError::Corrupt("message kind")),
    };
    let mut sys = SystemProperties::default();
    let n = get_varint(&mut buf)?;
    for _ in 0..n {
        if !buf.has_remaining() {
            return Err(CodecError::Truncated);
        }
        let tag = buf.get_u8();
        let value = get_bytes(&mut buf)?;
        macro_rules! take {
            ($t:literal, $f:ident) => {
                if tag == $t {
                    sys.$f = Some(
                        String::from_utf8(value.to_vec())
                            .map_err(|_| CodecError::Corrupt("text is not UTF-8"))?,
                    );
                    continue;
                }
            };
        }
        string_tags!(take);
        let time = || -> Result<Timestamp, CodecError> {
            let arr: [u8; 8] = value[..]
                .try_into()
                .map_err(|_| CodecError::Corrupt("time field is not 8 bytes"))?;
            Ok(Timestamp::from_millis(i64::from_le_bytes(arr)))
        };
        match tag {
            TAG_EXPIRY => sys.absolute_expiry = Some(time()?),
            TAG_CTIME => sys.creation_time = Some(time()?),
            TAG_ENQUEUED => sys.enqueued_time = Some(time()?),
            _ => {} // written by a newer minor revision: skip
        }
    }
    let n = get_varint(&mut buf)?;
    let mut properties = Properties::new();
    for _ in 0..n {
        let k = get_string(&mut buf)?;
        let v = get_string(&mut buf)?;
        properties.insert(k, v);
    }
    let body = get_bytes(&mut buf)?;
    if buf.has_remaining() {
        return Err(CodecError::Corrupt("trailing bytes"));
    }
    Ok(Message {
        kind,
        body,
        system: sys,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        let mut m = Message::new(&b"\x00\x01binary\xff"[..]);
        m.system.message_id = Some("m1".into());
        m.system.connection_module_id = Some("sensor".into());
        m.system.enqueued_time = Some(Timestamp::from_millis(1_700_000_000_000));
        m.system.absolute_expiry = Some(Timestamp::from_millis(-5));
        m.properties.insert("temp", "31.5");
        m.properties.insert("", "empty key is fine in storage");
        m
    }

    #[test]
    fn round_trip_and_compactness() {
        let m = sample();
        let enc = encode(&m);
        assert_eq!(decode(enc.clone()).unwrap(), m);
        // Overhead over the raw text: version, kind, tags and lengths only.
        assert!(enc.len() < m.size() + 40, "{} vs {}", enc.len(), m.size());
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        let enc = encode(&sample());
        for cut in 0..enc.len() {
            assert!(decode(enc.slice(..cut)).is_err(), "prefix {cut} decoded");
        }
        let mut v = enc.to_vec();
        v[0] = 9;
        assert_eq!(
            decode(Bytes::from(v)),
            Err(CodecError::UnsupportedVersion(9))
        );
        let mut v = enc.to_vec();
        v.push(0);
        assert_eq!(
            decode(Bytes::from(v)),
            Err(CodecError::Corrupt("trailing bytes"))
        );
        assert_eq!(
            decode(Bytes::from_static(&[
                1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])),
            Err(CodecError::Corrupt("varint longer than 64 bits"))
        );
    }

    #[test]
    fn skips_unknown_tags() {
        // version 1, telemetry, 1 system field: tag 99 with 2 bytes; 0 props; body "x".
        let buf = Bytes::from_static(&[1, 0, 1, 99, 2, b'a', b'b', 0, 1, b'x']);
        assert_eq!(decode(buf).unwrap(), Message::new("x"));
    }

    proptest! {
        #[test]
        fn round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            mid in proptest::option::of(".{0,20}"),
            exp in proptest::option::of(any::<i64>()),
            twin in any::<bool>(),
            props in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..5),
        ) {
            let mut m = Message::new(body);
            m.kind = if twin { MessageKind::TwinChangeNotification } else { MessageKind::Telemetry };
            m.system.message_id = mid;
            m.system.absolute_expiry = exp.map(Timestamp::from_millis);
            m.properties = props.into_iter().collect();
            prop_assert_eq!(decode(encode(&m)).unwrap(), m);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(Bytes::from(data));
        }
    }
}

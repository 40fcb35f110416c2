//! A bounds check of AMQP 1.0's type encoding (spec part 1), run on every
//! inbound frame body before the library decodes it. The library's decoder
//! (serde_amqp) allocates whatever size or count a value declares before it
//! reads the bytes: a 40-byte frame declaring a 3 GB symbol made the hub
//! allocate 3 GB (found by the fuzzer), which aborts the process wherever
//! memory is smaller. Here every declared size must fit inside its
//! container and every count inside its size, nesting is bounded, and
//! unknown constructors are refused; the values themselves are not decoded.
//!
//! Transfer payloads (message sections) may span frames: they are checked
//! once the delivery's last frame is in ([`Transfers`]).

use std::collections::HashMap;

/// Deepest nesting accepted (IoT Hub's messages nest a few levels).
const MAX_DEPTH: u8 = 32;
/// Largest message payload gathered for the check (IoT Hub's 256 KB plus
/// room for the sections around it; the link refuses larger ones anyway).
pub(crate) const MAX_PAYLOAD: usize = 1024 * 1024;
/// Deliveries in progress (split over frames) one connection may hold.
const MAX_PARTIAL: usize = 64;

/// Why an encoding was refused.
pub(crate) type Invalid = &'static str;

/// The encoded length of the value at the start of `b`.
pub(crate) fn value_len(b: &[u8]) -> Result<usize, Invalid> {
    value_len_at(b, 0)
}

fn value_len_at(b: &[u8], depth: u8) -> Result<usize, Invalid> {
    let (&c, rest) = b.split_first().ok_or("value missing")?;
    Ok(1 + body_len(c, rest, depth)?)
}

fn u32_at(b: &[u8], at: usize) -> Result<usize, Invalid> {
    let s = b.get(at..at + 4).ok_or("size missing")?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// The length after constructor `c` of a value whose bytes start `b`.
fn body_len(c: u8, b: &[u8], depth: u8) -> Result<usize, Invalid> {
    if depth > MAX_DEPTH {
        return Err("values nested too deep");
    }
    let fixed = |n: usize| {
        if b.len() >= n {
            Ok(n)
        } else {
            Err("value truncated")
        }
    };
    match c {
        0x00 => {
            let d = value_len_at(b, depth + 1)?;
            let v = value_len_at(b.get(d..).ok_or("described value missing")?, depth + 1)?;
            Ok(d + v)
        }
        0x40..=0x45 => Ok(0),
        0x50..=0x56 => fixed(1),
        0x60 | 0x61 => fixed(2),
        0x70..=0x74 => fixed(4),
        0x80..=0x84 => fixed(8),
        0x94 | 0x98 => fixed(16),
        0xa0 | 0xa1 | 0xa3 => {
            let n = usize::from(*b.first().ok_or("size missing")?);
            fixed(1 + n)
        }
        0xb0 | 0xb1 | 0xb3 => {
            let n = u32_at(b, 0)?;
            fixed(4usize.checked_add(n).ok_or("size overflows")?)
        }
        0xc0 | 0xc1 => {
            let size = usize::from(*b.first().ok_or("size missing")?);
            let count = usize::from(*b.get(1).ok_or("count missing")?);
            items(
                c,
                b.get(2..1 + size).ok_or("compound truncated")?,
                count,
                depth,
            )?;
            Ok(1 + size)
        }
        0xd0 | 0xd1 => {
            let size = u32_at(b, 0)?;
            let count = u32_at(b, 4)?;
            let end = 4usize.checked_add(size).ok_or("size overflows")?;
            items(c, b.get(8..end).ok_or("compound truncated")?, count, depth)?;
            Ok(end)
        }
        0xe0 => {
            let size = usize::from(*b.first().ok_or("size missing")?);
            let count = usize::from(*b.get(1).ok_or("count missing")?);
            array(b.get(2..1 + size).ok_or("array truncated")?, count, depth)?;
            Ok(1 + size)
        }
        0xf0 => {
            let size = u32_at(b, 0)?;
            let count = u32_at(b, 4)?;
            let end = 4usize.checked_add(size).ok_or("size overflows")?;
            array(b.get(8..end).ok_or("array truncated")?, count, depth)?;
            Ok(end)
        }
        _ => Err("unknown constructor"),
    }
}

/// The `count` items of a list or map (`c`), exactly filling `b`.
fn items(c: u8, b: &[u8], count: usize, depth: u8) -> Result<(), Invalid> {
    if count > b.len() {
        return Err("count larger than the compound");
    }
    if matches!(c, 0xc1 | 0xd1) && !count.is_multiple_of(2) {
        return Err("map with an odd count");
    }
    let mut at = 0;
    for _ in 0..count {
        at += value_len_at(&b[at..], depth + 1)?;
    }
    if at == b.len() {
        Ok(())
    } else {
        Err("compound size and items disagree")
    }
}

/// An array body: one element constructor (a described one carries its
/// descriptor), then `count` elements without constructors, filling `b`.
fn array(b: &[u8], count: usize, depth: u8) -> Result<(), Invalid> {
    if count > b.len() {
        return Err("count larger than the array");
    }
    let (&c, mut rest) = b.split_first().ok_or("array constructor missing")?;
    let mut c = c;
    if c == 0x00 {
        let d = value_len_at(rest, depth + 1)?;
        let (&c2, r) = rest
            .get(d..)
            .and_then(<[u8]>::split_first)
            .ok_or("array constructor missing")?;
        c = c2;
        rest = r;
    }
    let mut at = 0;
    for _ in 0..count {
        at += body_len(c, &rest[at..], depth + 1)?;
    }
    if at == rest.len() {
        Ok(())
    } else {
        Err("array size and elements disagree")
    }
}

/// Checks `b` is a sequence of whole values (a message's sections).
fn values(b: &[u8]) -> Result<(), Invalid> {
    let mut at = 0;
    while at < b.len() {
        at += value_len(&b[at..])?;
    }
    Ok(())
}

/// The fields of the described list at the start of `b` (a performative),
/// with its descriptor code and its encoded length.
fn performative(b: &[u8]) -> Result<(u64, Vec<&[u8]>, usize), Invalid> {
    let len = value_len(b)?;
    if b.first() != Some(&0x00) {
        return Err("performative is not a described value");
    }
    let d = value_len(&b[1..])?;
    let code = match &b[1..1 + d] {
        [0x53, c] => u64::from(*c),
        [0x80, rest @ ..] if rest.len() == 8 => {
            u64::from_be_bytes(rest.try_into().map_err(|_| "descriptor truncated")?)
        }
        _ => return Err("performative descriptor is not a code"),
    };
    let list = &b[1 + d..len];
    let (count, mut at) = match list.first() {
        Some(0x45) => (0, 1),
        Some(0xc0) => (usize::from(list[2]), 3),
        Some(0xd0) => (u32_at(list, 5)?, 9),
        _ => return Err("performative fields are not a list"),
    };
    let mut fields = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let n = value_len(&list[at..])?;
        fields.push(&list[at..at + n]);
        at += n;
    }
    Ok((code, fields, len))
}

/// A boolean field (absent or null = false).
fn flag(field: Option<&&[u8]>) -> bool {
    matches!(field.map(|f| &f[..]), Some([0x41]) | Some([0x56, 1]))
}

/// A uint field (a link handle).
fn uint(field: Option<&&[u8]>) -> Option<u32> {
    match field.map(|f| &f[..]) {
        Some([0x43]) => Some(0),
        Some([0x52, v]) => Some(u32::from(*v)),
        Some([0x70, a, b, c, d]) => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The payloads of deliveries split over several transfer frames, per
/// channel and link handle, until their last frame.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    partial: HashMap<(u16, u32), Vec<u8>>,
}

/// The transfer performative's code.
const TRANSFER: u64 = 0x14;

impl Transfers {
    /// Checks one frame's body (after its extended header); `sasl` frames
    /// hold one performative and nothing else.
    pub(crate) fn check(&mut self, channel: u16, body: &[u8], sasl: bool) -> Result<(), Invalid> {
        if body.is_empty() {
            return Ok(());
        }
        let (code, fields, len) = performative(body)?;
        if sasl || code != TRANSFER {
            return if len == body.len() {
                Ok(())
            } else {
                Err("bytes after the performative")
            };
        }
        let payload = &body[len..];
        let handle = uint(fields.first()).ok_or("transfer without a handle")?;
        let (more, aborted) = (flag(fields.get(5)), flag(fields.get(8)));
        let key = (channel, handle);
        let mut whole = match self.partial.remove(&key) {
            Some(mut sofar) => {
                sofar.extend_from_slice(payload);
                sofar
            }
            None if more => payload.to_vec(),
            // A delivery in one frame: checked where it lies.
            None if aborted => return Ok(()),
            None => return values(payload),
        };
        if whole.len() > MAX_PAYLOAD {
            return Err("message larger than the limit");
        }
        if aborted {
            return Ok(());
        }
        if more {
            if self.partial.len() >= MAX_PARTIAL {
                return Err("too many deliveries in progress");
            }
            self.partial.insert(key, std::mem::take(&mut whole));
            return Ok(());
        }
        values(&whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_sizes_must_fit() {
        // sym32 declaring 3 GB in a few bytes: the fuzzer's input.
        assert!(value_len(&[0xb3, 0xb3, 0xb3, 0xb3, 0xb3, 1, 2]).is_err());
        assert_eq!(value_len(&[0xa1, 2, b'h', b'i']), Ok(4));
        assert!(value_len(&[0xa1, 3, b'h', b'i']).is_err());
        // list32 with a count no size could hold.
        assert!(value_len(&[0xd0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).is_err());
        // A list of two: null and ubyte 7.
        assert_eq!(value_len(&[0xc0, 4, 2, 0x40, 0x50, 7]), Ok(6));
        // An array of three uints (small encoding).
        assert_eq!(value_len(&[0xe0, 5, 3, 0x52, 1, 2, 3]), Ok(7));
        assert!(value_len(&[0xe0, 5, 200, 0x52, 1, 2, 3]).is_err());
        assert!(value_len(&[0x13]).is_err(), "unknown constructor");
        // Nesting past the limit.
        let mut deep = Vec::new();
        for _ in 0..40 {
            deep.extend_from_slice(&[0x00, 0x53, 0x70]);
        }
        deep.push(0x40);
        assert!(value_len(&deep).is_err());
    }

    #[test]
    fn transfers_are_checked_whole_across_frames() {
        // transfer(handle 1, delivery-id 0, tag "t", format 0, settled false, more true)
        let transfer = |more: u8| {
            vec![
                0x00, 0x53, 0x14, 0xc0, 10, 6, 0x52, 1, 0x43, 0xa0, 1, b't', 0x43, 0x42, more,
            ]
        };
        // A data section of 6 bytes split over two frames.
        let section = [0x00, 0x53, 0x75, 0xa0, 6, 1, 2, 3, 4, 5, 6];
        let mut t = Transfers::default();
        let mut f1 = transfer(0x41);
        f1.extend_from_slice(&section[..5]);
        assert_eq!(t.check(0, &f1, false), Ok(()));
        let mut f2 = transfer(0x42);
        f2.extend_from_slice(&section[5..]);
        assert_eq!(t.check(0, &f2, false), Ok(()));
        // The same split with a section declaring more than it holds.
        let mut bad = transfer(0x42);
        bad.extend_from_slice(&[0x00, 0x53, 0x75, 0xb0, 0x7f, 0xff, 0xff, 0xff, 1]);
        assert!(t.check(0, &bad, false).is_err());
        // OPEN-like performative followed by junk.
        assert!(t.check(0, &[0x00, 0x53, 0x10, 0x45, 0x01], false).is_err());
        assert_eq!(t.check(0, &[0x00, 0x53, 0x10, 0x45], false), Ok(()));
    }
}

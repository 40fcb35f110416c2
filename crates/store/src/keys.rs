//! Key and value encodings of the three keyspaces. All integers in keys are
//! big-endian so that the engine's byte order is numeric order.

use verge_core::time::Timestamp;

/// `msgs` keyspace: `b` + id → encoded message.
pub(crate) const BODY: u8 = b'b';
/// `msgs` keyspace: `r` + id → refcount (u32) + accounted size (u32); only
/// for bodies referenced by more than one queue (absent = one reference).
pub(crate) const REF: u8 = b'r';
/// `meta` keyspace: `q` + queue id → priority (u32) + endpoint (UTF-8).
pub(crate) const QUEUE: u8 = b'q';
/// `meta` keyspace: `c` + queue id → head offset (u64): the first offset not acknowledged.
pub(crate) const CHECKPOINT: u8 = b'c';
/// `meta` keyspace: next message id (u64).
pub(crate) const NEXT_ID: &[u8] = b"n";
/// `meta` keyspace: accounted stored bytes (u64).
pub(crate) const STORED_BYTES: &[u8] = b"s";
/// `meta` keyspace: sequence number of the sync log lap's first record (u64).
pub(crate) const SYNC_LAP: &[u8] = b"w";

pub(crate) fn msg_key(tag: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn meta_queue_key(tag: u8, qid: u32) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = tag;
    k[1..].copy_from_slice(&qid.to_be_bytes());
    k
}

/// `queues` keyspace: queue id + offset → [`Entry`].
pub(crate) fn entry_key(qid: u32, offset: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&qid.to_be_bytes());
    k[4..].copy_from_slice(&offset.to_be_bytes());
    k
}

pub(crate) fn parse_entry_key(k: &[u8]) -> Option<(u32, u64)> {
    let qid = u32::from_be_bytes(k.get(..4)?.try_into().ok()?);
    let off = u64::from_be_bytes(k.get(4..12)?.try_into().ok()?);
    Some((qid, off))
}

pub(crate) fn u32_at(v: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(v: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?))
}

/// One reference in a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: u64,
    pub enqueued: Timestamp,
    /// `i64::MAX` when the reference never expires.
    pub expiry: i64,
    /// Accounted size of the body (encoded length + overhead).
    pub size: u32,
}

impl Entry {
    pub(crate) fn encode(&self) -> [u8; 28] {
        let mut v = [0u8; 28];
        v[..8].copy_from_slice(&self.id.to_be_bytes());
        v[8..16].copy_from_slice(&self.enqueued.as_millis().to_be_bytes());
        v[16..24].copy_from_slice(&self.expiry.to_be_bytes());
        v[24..].copy_from_slice(&self.size.to_be_bytes());
        v
    }

    pub(crate) fn decode(v: &[u8]) -> Option<Self> {
        Some(Self {
            id: u64_at(v, 0)?,
            enqueued: Timestamp::from_millis(u64_at(v, 8)?.cast_signed()),
            expiry: u64_at(v, 16)?.cast_signed(),
            size: u32_at(v, 24)?,
        })
    }

    pub(crate) fn is_expired(&self, now: Timestamp) -> bool {
        self.expiry <= now.as_millis()
    }
}

pub(crate) fn ref_value(count: u32, size: u32) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&count.to_be_bytes());
    v[4..].copy_from_slice(&size.to_be_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_key_order() {
        let e = Entry {
            id: 7,
            enqueued: Timestamp::from_millis(-5),
            expiry: i64::MAX,
            size: 300,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert!(entry_key(1, 255) < entry_key(1, 256));
        assert!(entry_key(1, u64::MAX) < entry_key(2, 0));
        assert_eq!(parse_entry_key(&entry_key(3, 9)), Some((3, 9)));
        assert_eq!(Entry::decode(&[1, 2]), None);
    }
}

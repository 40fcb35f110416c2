//! Writes that the sync log has made durable but the engine has not seen yet.
//!
//! Why: most messages are delivered and acknowledged within milliseconds.
//! Handing every group to the engine wrote each body and reference into a
//! memtable, then a tombstone for each, and the engine's worker flushed and
//! compacted both — over half of the hub's CPU per message. The writer now
//! keeps a lap's writes here instead. A reference or body inserted and
//! deleted within the same lap never reaches the engine: the pair cancels
//! out, which is sound because those keys are new (ids and offsets only grow),
//! so the engine never had them. What is left goes to the engine in the lap's
//! one synced batch (see `synclog`), and the log still holds every write until
//! then, so a crash loses nothing: opening replays the lap as before.
//!
//! A delete of a key the engine may hold is not staged: it goes to the
//! engine with its group, as before (draining a backlog is all such
//! deletes, and staging them only added work).
//!
//! Readers look here first and then in the engine, in that order: the writer
//! commits a lap to the engine before it clears this, so a reader sees every
//! write in at least one of the two places.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

use crate::synclog::Ks;

/// Longest key kept without an allocation; every key the store writes fits.
const INLINE: usize = 12;

/// An engine key, compared as bytes.
#[derive(Clone, Debug)]
pub(crate) enum Key {
    Inline(u8, [u8; INLINE]),
    Heap(Box<[u8]>),
}

impl Key {
    pub(crate) fn new(k: &[u8]) -> Key {
        if k.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..k.len()].copy_from_slice(k);
            // Fits in a u8: at most INLINE.
            Key::Inline(k.len() as u8, buf)
        } else {
            Key::Heap(k.into())
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline(n, buf) => &buf[..usize::from(*n)],
            Key::Heap(b) => b,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

/// The latest staged value of one key.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub value: Bytes,
    /// The engine is known not to hold this key, so deleting it needs no
    /// tombstone.
    pub fresh: bool,
}

/// One write of a group, applied here once the group is durable.
pub(crate) struct Op {
    pub ks: Ks,
    pub key: Key,
    /// `None` deletes.
    pub value: Option<Bytes>,
    /// For inserts: the key is new (see [`Slot::fresh`]).
    pub fresh: bool,
}

/// A lap's writes not yet in the engine, per keyspace.
#[derive(Default, Debug)]
pub(crate) struct Staged {
    maps: [BTreeMap<Key, Slot>; 3],
    /// Approximate bytes held (keys, values, node overhead).
    bytes: usize,
}

/// Approximate cost of one slot beside its value.
const SLOT: usize = 64;

impl Staged {
    fn map(&mut self, ks: Ks) -> &mut BTreeMap<Key, Slot> {
        let [m, q, x] = &mut self.maps;
        ks.pick([m, q, x])
    }

    /// Stages `op`. Returns `Some(op)` for a delete the engine must apply
    /// now (the key may be there): the caller commits it with its group.
    pub(crate) fn apply(&mut self, op: Op) -> Option<Op> {
        let map = self.map(op.ks);
        let old = map.remove(&op.key);
        let was_fresh = old.as_ref().is_some_and(|s| s.fresh);
        let mut delta: isize = -(old.as_ref().map_or(0, slot_bytes) as isize);
        let rest = match op.value {
            Some(value) => {
                let slot = Slot {
                    value,
                    fresh: op.fresh || was_fresh,
                };
                delta += slot_bytes(&slot) as isize;
                map.insert(op.key, slot);
                None
            }
            // A key the engine never had: nothing to delete there.
            None if was_fresh => None,
            None => Some(op),
        };
        self.bytes = self.bytes.saturating_add_signed(delta);
        rest
    }

    /// The staged value of `key`, if any (else ask the engine).
    pub(crate) fn get(&self, ks: Ks, key: &[u8]) -> Option<Bytes> {
        let [m, q, x] = &self.maps;
        ks.pick([m, q, x])
            .get(&Key::new(key))
            .map(|s| s.value.clone())
    }

    /// Up to `limit` staged writes with keys in `[lo, hi)`, in key order.
    pub(crate) fn range(&self, ks: Ks, lo: &[u8], hi: &[u8], limit: usize) -> Vec<(Key, Slot)> {
        let [m, q, x] = &self.maps;
        ks.pick([m, q, x])
            .range((Bound::Included(Key::new(lo)), Bound::Excluded(Key::new(hi))))
            .take(limit)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Every staged write, per keyspace `[msgs, queues, meta]`.
    pub(crate) fn all(&self) -> impl Iterator<Item = (Ks, &Key, &Slot)> {
        let [m, q, x] = &self.maps;
        [(Ks::Msgs, m), (Ks::Queues, q), (Ks::Meta, x)]
            .into_iter()
            .flat_map(|(ks, map)| map.iter().map(move |(k, s)| (ks, k, s)))
    }

    pub(crate) fn clear(&mut self) {
        for m in &mut self.maps {
            m.clear();
        }
        self.bytes = 0;
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.maps.iter().all(BTreeMap::is_empty)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

fn slot_bytes(s: &Slot) -> usize {
    SLOT + s.value.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut Staged, ks: Ks, k: &[u8], v: &[u8], fresh: bool) {
        let rest = s.apply(Op {
            ks,
            key: Key::new(k),
            value: Some(Bytes::copy_from_slice(v)),
            fresh,
        });
        assert!(rest.is_none());
    }

    /// Whether the engine must delete it too.
    fn del(s: &mut Staged, ks: Ks, k: &[u8]) -> bool {
        s.apply(Op {
            ks,
            key: Key::new(k),
            value: None,
            fresh: false,
        })
        .is_some()
    }

    #[test]
    fn a_fresh_insert_and_its_delete_cancel_out() {
        let mut s = Staged::default();
        put(&mut s, Ks::Msgs, b"b1", b"body", true);
        put(&mut s, Ks::Msgs, b"b1", b"body2", false);
        assert!(!del(&mut s, Ks::Msgs, b"b1"));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.get(Ks::Msgs, b"b1"), None);
    }

    #[test]
    fn deleting_what_the_engine_may_hold_goes_to_the_engine() {
        let mut s = Staged::default();
        put(&mut s, Ks::Meta, b"c1", b"x", false);
        assert!(del(&mut s, Ks::Meta, b"c1"));
        assert_eq!(s.get(Ks::Meta, b"c1"), None);
        assert!(del(&mut s, Ks::Queues, b"q1"));
        assert!(s.is_empty());
        put(&mut s, Ks::Meta, b"c2", b"y", false);
        assert_eq!(s.all().count(), 1);
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn ranges_are_per_keyspace_ordered_and_bounded() {
        let mut s = Staged::default();
        for i in [5u8, 1, 3, 9] {
            put(&mut s, Ks::Queues, &[0, i], &[i], true);
        }
        put(&mut s, Ks::Msgs, &[0, 2], b"other", true);
        let r = s.range(Ks::Queues, &[0, 1], &[0, 9], 10);
        let keys: Vec<_> = r.iter().map(|(k, _)| k.as_slice().to_vec()).collect();
        assert_eq!(keys, vec![vec![0, 1], vec![0, 3], vec![0, 5]]);
        assert_eq!(s.range(Ks::Queues, &[0, 0], &[1], 2).len(), 2);
        let long = [7u8; 20];
        put(&mut s, Ks::Meta, &long, b"v", false);
        assert_eq!(s.get(Ks::Meta, &long), Some(Bytes::from_static(b"v")));
    }
}

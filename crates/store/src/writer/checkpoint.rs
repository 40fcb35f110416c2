//! Checkpoints: acknowledgements and TTL cleanup both drop references
//! (reclaiming bodies nobody references any more) and move a queue's head.

use verge_core::time::Timestamp;

use super::{Group, OP, Writer};
use crate::keys::{self, Entry};
use crate::synclog::Ks;
use crate::{ENTRY_OVERHEAD, Result, StoreError};

impl Writer {
    /// (head, durable tail, counted) of a queue as this group sees it.
    fn bounds(&self, g: &Group, qid: u32) -> Option<(u64, u64)> {
        let st = self.shared.lock();
        let q = st.queues.get(&qid)?;
        let head = g.heads.get(&qid).copied().unwrap_or(q.head).max(q.head);
        Some((head, q.durable))
    }

    fn drop_ref(&self, g: &mut Group, qid: u32, key: &[u8], e: &Entry) -> Result<()> {
        let sh = &self.shared;
        g.batch.remove(Ks::Queues, key);
        g.mem[1] += OP;
        g.stored = g.stored.saturating_sub(ENTRY_OVERHEAD);
        g.dirty = true;
        if let Some((_, off)) = keys::parse_entry_key(key) {
            g.deleted.insert((qid, off));
        }
        let known_single = sh.hot().single(e.id) == Some(true);
        let (count, size, explicit) = match g.refs.get(&e.id) {
            Some(&v) => v,
            // Appended with one reference: it never had an `r` record.
            None if known_single => (1, e.size, false),
            None => match sh.get(Ks::Msgs, &keys::msg_key(keys::REF, e.id)) {
                Ok(Some(v)) => match keys::u32_at(&v, 0).zip(keys::u32_at(&v, 4)) {
                    Some((c, s)) => (c, s, true),
                    // Damaged: drop the body with this reference (other
                    // references then find it missing and are skipped)
                    // rather than refusing every ack of the queue.
                    None => {
                        tracing::error!(
                            id = e.id,
                            "store: damaged refcount record; dropping its body"
                        );
                        (1, e.size, true)
                    }
                },
                // No record: this was the body's only reference.
                Ok(None) => (1, e.size, false),
                Err(err) if crate::is_damage(&err) => {
                    tracing::error!(id = e.id, error = %err, "store: damaged refcount record; dropping its body");
                    (1, e.size, true)
                }
                Err(err) => return Err(err),
            },
        };
        g.refs
            .insert(e.id, (count.saturating_sub(1), size, explicit));
        Ok(())
    }

    pub(super) fn ack(&mut self, g: &mut Group, qid: u32, up_to: u64) -> Result<()> {
        let sh = self.shared.clone();
        let Some((head, durable)) = self.bounds(g, qid) else {
            return Err(StoreError::Corrupt("unknown queue id".into()));
        };
        let end = up_to.saturating_add(1).min(durable);
        if end <= head {
            return Ok(());
        }
        // At most `end - head` keys in range: the staged writes are never cut.
        let limit = usize::try_from(end - head).unwrap_or(usize::MAX);
        for kv in sh.range(
            Ks::Queues,
            &keys::entry_key(qid, head),
            &keys::entry_key(qid, end),
            limit,
        )? {
            let (k, v) = match kv {
                Ok(kv) => kv,
                // Unreadable references: the checkpoint still moves past
                // them (what they pointed to is not reclaimed), or the
                // queue would be stuck redelivering.
                Err(e) if crate::is_damage(&e) => {
                    tracing::error!(queue = qid, error = %e, "store: damaged references acknowledged without reclaiming them");
                    break;
                }
                Err(e) => return Err(e),
            };
            let k = k.as_slice();
            let Some((_, off)) = keys::parse_entry_key(k) else {
                continue;
            };
            if g.deleted.contains(&(qid, off)) {
                continue;
            }
            match Entry::decode(&v) {
                Some(e) => self.drop_ref(g, qid, k, &e)?,
                None => {
                    g.batch.remove(Ks::Queues, k);
                    g.dirty = true;
                }
            }
        }
        g.heads.insert(qid, end);
        g.mem[2] += OP;
        g.batch.insert(
            Ks::Meta,
            &keys::meta_queue_key(keys::CHECKPOINT, qid),
            &end.to_be_bytes(),
        );
        g.dirty = true;
        Ok(())
    }

    pub(super) fn cleanup(&mut self, g: &mut Group, now: Timestamp) -> Result<u64> {
        let sh = self.shared.clone();
        let entire = sh.config.check_entire_queue_on_cleanup;
        let qids: Vec<u32> = sh.lock().queues.keys().copied().collect();
        let mut deleted = 0u64;
        for qid in qids {
            let Some((head, durable)) = self.bounds(g, qid) else {
                continue;
            };
            if head >= durable {
                continue;
            }
            let mut new_head = head;
            let mut contiguous = true;
            for kv in sh.range(
                Ks::Queues,
                &keys::entry_key(qid, head),
                &keys::entry_key(qid, durable),
                usize::MAX,
            )? {
                let (k, v) = match kv {
                    Ok(kv) => kv,
                    // Damaged: left for reads to skip; other queues go on.
                    Err(e) if crate::is_damage(&e) => break,
                    Err(e) => return Err(e),
                };
                let k = k.as_slice();
                let Some((_, off)) = keys::parse_entry_key(k) else {
                    continue;
                };
                if g.deleted.contains(&(qid, off)) {
                    if contiguous {
                        new_head = off + 1;
                    }
                    continue;
                }
                let Some(e) = Entry::decode(&v) else {
                    continue;
                };
                if e.is_expired(now) {
                    self.drop_ref(g, qid, k, &e)?;
                    g.expired.push((qid, off));
                    deleted += 1;
                    if contiguous {
                        new_head = off + 1;
                    }
                } else {
                    contiguous = false;
                    if !entire {
                        break;
                    }
                }
            }
            if new_head > head {
                g.heads.insert(qid, new_head);
                g.mem[2] += OP;
                g.batch.insert(
                    Ks::Meta,
                    &keys::meta_queue_key(keys::CHECKPOINT, qid),
                    &new_head.to_be_bytes(),
                );
                g.dirty = true;
            }
        }
        Ok(deleted)
    }
}

//! Appends: the body written once, one reference per target queue (created
//! on first use), within the byte limit.

use bytes::Bytes;
use verge_core::time::Timestamp;

use super::{Group, OP, Writer};
use crate::keys::{self, Entry};
use crate::synclog::Ks;
use crate::{
    BODY_OVERHEAD, ENTRY_OVERHEAD, FullReason, MessageId, QueueState, Result, StoreError, Target,
};

impl Writer {
    /// Queue id for (endpoint, priority), creating the queue if needed.
    fn queue(&self, g: &mut Group, endpoint: &str, priority: u32) -> u32 {
        let sh = &self.shared;
        let mut st = sh.lock();
        if let Some(&(_, qid)) = st
            .endpoints
            .get(endpoint)
            .and_then(|v| v.iter().find(|(p, _)| *p == priority))
        {
            return qid;
        }
        if let Some((qid, _)) = g
            .new_queues
            .iter()
            .find(|(_, q)| q.endpoint == endpoint && q.priority == priority)
        {
            return *qid;
        }
        let qid = st.next_qid;
        st.next_qid = st.next_qid.saturating_add(1);
        drop(st);
        let mut rec = priority.to_be_bytes().to_vec();
        rec.extend_from_slice(endpoint.as_bytes());
        g.mem[2] += OP + rec.len() as u64;
        g.batch
            .insert(Ks::Meta, &keys::meta_queue_key(keys::QUEUE, qid), &rec);
        g.new_queues.push((
            qid,
            QueueState {
                endpoint: endpoint.to_owned(),
                priority,
                head: 0,
                next: 0,
                durable: 0,
                cursor: 0,
                acked: 0,
                counted: 0,
                expired: 0,
            },
        ));
        qid
    }

    pub(super) fn append(
        &mut self,
        g: &mut Group,
        now: Timestamp,
        body: Bytes,
        exp: Option<Timestamp>,
        targets: &[Target],
    ) -> Result<MessageId> {
        let sh = self.shared.clone();
        let n = u32::try_from(targets.len()).map_err(|_| StoreError::TooLarge)?;
        let body_size =
            u32::try_from(body.len() as u64 + BODY_OVERHEAD).map_err(|_| StoreError::TooLarge)?;
        let size = u64::from(body_size) + ENTRY_OVERHEAD * u64::from(n);
        if let Some(limit) = sh.max_bytes()
            && g.stored.saturating_add(size) > limit
        {
            return Err(StoreError::Full(FullReason::ByteLimit {
                stored: g.stored,
                limit,
            }));
        }
        let id = g.next_id;
        g.next_id += 1;
        g.mem[0] += OP + body.len() as u64;
        g.batch
            .insert_bytes(Ks::Msgs, &keys::msg_key(keys::BODY, id), body.clone(), true);
        if sh.config.hot_bytes > 0 {
            g.appended.push((id, body, n == 1));
        }
        // Single-target bodies (the common case) need no refcount record.
        if n > 1 {
            g.refs.insert(id, (n, body_size, true));
        }
        for t in targets {
            let qid = self.queue(g, &t.endpoint, t.priority);
            let offset = {
                let mut st = sh.lock();
                if let Some(q) = st.queues.get_mut(&qid) {
                    let o = q.next;
                    q.next += 1;
                    o
                } else if let Some((_, q)) = g.new_queues.iter_mut().find(|(id, _)| *id == qid) {
                    let o = q.next;
                    q.next += 1;
                    o
                } else {
                    return Err(StoreError::Corrupt("queue vanished".into()));
                }
            };
            let mut expiry = match t.ttl_secs.or(sh.config.default_ttl_secs) {
                Some(ttl) => now.plus_secs(ttl).as_millis(),
                None => i64::MAX,
            };
            if let Some(e) = exp {
                expiry = expiry.min(e.as_millis());
            }
            let entry = Entry {
                id,
                enqueued: now,
                expiry,
                size: body_size,
            };
            g.batch.insert_bytes(
                Ks::Queues,
                &keys::entry_key(qid, offset),
                // Shared from the start: a reader's clone of it is then a
                // refcount, not a copy into a new allocation.
                Bytes::from_owner(entry.encode()),
                true,
            );
            g.tails.push((qid, offset + 1));
            g.mem[1] += OP + 40;
        }
        g.stored = g.stored.saturating_add(size);
        g.dirty = true;
        self.gauge.appended = self.gauge.appended.saturating_add(size);
        Ok(MessageId(id))
    }
}

//! The writer loop and group commit: drain what is queued, run it as one
//! group, make that durable once, then answer every caller — or fail them
//! all, keeping their checkpoints for a later group.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use verge_core::time::Timestamp;

use super::batch::Batch;
use super::commit::CommitError;
use super::{Cmd, Group, OP, Writer};
use crate::keys;
use crate::synclog::Ks;
use crate::{FullReason, MessageId, Result, StoreError};

enum Done {
    Append(oneshot::Sender<Result<MessageId>>, Result<MessageId>),
    Ack(oneshot::Sender<Result<()>>, Result<()>),
    Cleanup(oneshot::Sender<Result<u64>>, Result<u64>),
}

impl Done {
    fn fail(self, err: impl Fn() -> StoreError) {
        // A caller that went away does not care about the answer.
        match self {
            Done::Append(r, Ok(_)) => drop(r.send(Err(err()))),
            Done::Ack(r, Ok(())) => drop(r.send(Err(err()))),
            Done::Cleanup(r, Ok(_)) => drop(r.send(Err(err()))),
            other => other.send(),
        }
    }

    fn send(self) {
        match self {
            Done::Append(r, v) => drop(r.send(v)),
            Done::Ack(r, v) => drop(r.send(v)),
            Done::Cleanup(r, v) => drop(r.send(v)),
        }
    }
}

impl Writer {
    pub(super) fn run(mut self) {
        let max = self.shared.config.max_group.max(1);
        // Reused: a group is drained from it, keeping its capacity.
        let mut cmds = Vec::new();
        while let Some(first) = self.rx.blocking_recv() {
            cmds.push(first);
            while cmds.len() < max {
                match self.rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            self.group(&mut cmds);
            self.shared.retry.store(
                !self.deferred.is_empty() || self.shared.poisoned.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        // Not needed for safety (opening replays the log), but ending the lap
        // leaves nothing to replay after a clean shutdown.
        if self.log.is_some()
            && !self.shared.poisoned.load(Ordering::Relaxed)
            && let Err(e) = self.end_lap()
        {
            tracing::warn!(error = ?e, "store: final sync failed; the next open replays the sync log");
        }
    }

    fn group(&mut self, cmds: &mut Vec<Cmd>) {
        let sh = self.shared.clone();
        if sh.poisoned.load(Ordering::Relaxed)
            && let Err(e) = self.reopen()
        {
            if !matches!(e, StoreError::Poisoned) {
                tracing::warn!(error = %e, "store: cannot reopen the engine yet; retrying");
            }
            for c in cmds.drain(..) {
                match c {
                    Cmd::Append { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                    Cmd::Ack {
                        qid, up_to, reply, ..
                    } => {
                        let durable = sh.lock().queues.get(&qid).map_or(0, |q| q.durable);
                        self.defer(qid, up_to.saturating_add(1).min(durable));
                        drop(reply.send(Err(StoreError::Poisoned)));
                    }
                    Cmd::Cleanup { reply } => drop(reply.send(Err(StoreError::Poisoned))),
                    Cmd::Tick => {}
                }
            }
            return;
        }
        // Checkpoints that failed before go first (nobody waits for them).
        if !self.deferred.is_empty() {
            let mut again: Vec<Cmd> = self
                .deferred
                .drain()
                .map(|(qid, end)| Cmd::Ack {
                    qid,
                    up_to: end.saturating_sub(1),
                    sync: true,
                    reply: oneshot::channel().0,
                })
                .collect();
            again.append(cmds);
            *cmds = again;
        }
        let now = Timestamp::now();
        let disk_full = if sh.config.min_free_bytes > 0
            && cmds.iter().any(|c| matches!(c, Cmd::Append { .. }))
        {
            match self.gauge.get(&sh) {
                Some((available, floor)) if available < floor => {
                    Some(FullReason::DiskFloor { available, floor })
                }
                _ => None,
            }
        } else {
            None
        };
        let batch = match Batch::new(&sh, self.log.is_some()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "store: no engine");
                for c in cmds.drain(..) {
                    match c {
                        Cmd::Append { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Ack { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Cleanup { reply } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Tick => {}
                    }
                }
                return;
            }
        };
        let mut g = Group {
            batch,
            refs: HashMap::new(),
            tails: Vec::new(),
            heads: HashMap::new(),
            deleted: HashSet::new(),
            expired: Vec::new(),
            stored: sh.stored_bytes.load(Ordering::Relaxed),
            next_id: self.next_id,
            new_queues: Vec::new(),
            dirty: false,
            mem: [0; 3],
            appended: Vec::new(),
        };
        // A group of lazy checkpoints only is logged without a sync: the next
        // synced record (or the lap's end) makes it durable along with it.
        let sync = cmds
            .iter()
            .any(|c| !matches!(c, Cmd::Ack { sync: false, .. }));
        let mut done = Vec::with_capacity(cmds.len());
        for c in cmds.drain(..) {
            match c {
                Cmd::Append {
                    body,
                    exp,
                    targets,
                    reply,
                } => {
                    let r = match disk_full {
                        Some(reason) => Err(StoreError::Full(reason)),
                        None => self.append(&mut g, now, body, exp, &targets),
                    };
                    done.push(Done::Append(reply, r));
                }
                Cmd::Ack {
                    qid, up_to, reply, ..
                } => {
                    let r = self.ack(&mut g, qid, up_to);
                    done.push(Done::Ack(reply, r));
                }
                Cmd::Cleanup { reply } => {
                    let r = self.cleanup(&mut g, now);
                    done.push(Done::Cleanup(reply, r));
                }
                Cmd::Tick => {}
            }
        }
        if !g.dirty {
            done.into_iter().for_each(Done::send);
            return;
        }
        // Bodies nobody references any more go in the same batch.
        let mut refs: Vec<_> = g.refs.iter().map(|(&id, &v)| (id, v)).collect();
        refs.sort_unstable_by_key(|&(id, _)| id);
        for (id, (count, size, explicit)) in refs {
            g.mem[0] += if count == 0 { 2 * OP } else { OP };
            if count == 0 {
                if explicit {
                    g.batch.remove(Ks::Msgs, &keys::msg_key(keys::REF, id));
                }
                g.batch.remove(Ks::Msgs, &keys::msg_key(keys::BODY, id));
                g.stored = g.stored.saturating_sub(u64::from(size));
            } else {
                g.batch.insert(
                    Ks::Msgs,
                    &keys::msg_key(keys::REF, id),
                    &keys::ref_value(count, size),
                );
            }
        }
        g.batch
            .insert(Ks::Meta, keys::STORED_BYTES, &g.stored.to_be_bytes());
        g.batch
            .insert(Ks::Meta, keys::NEXT_ID, &g.next_id.to_be_bytes());
        g.mem[2] += 2 * OP;

        let Group {
            batch,
            refs,
            tails,
            heads,
            expired,
            stored,
            next_id,
            new_queues,
            mem,
            appended,
            ..
        } = g;
        if let Err(e) = self.commit(batch, sync) {
            match &e {
                CommitError::Full(reason) => {
                    if !self.full {
                        tracing::warn!(%reason, "store: the disk is full; appends are refused and checkpoints wait until space returns");
                    }
                    self.full = true;
                }
                CommitError::Io(e) => {
                    tracing::error!(error = %e, "store write failed; reopening the engine");
                    sh.poisoned.store(true, Ordering::Relaxed);
                }
            }
            // Delivered is delivered: the checkpoints are kept in memory and
            // written again, so a drain does not send them once more.
            for (qid, end) in heads {
                self.defer(qid, end);
            }
            for d in done {
                d.fail(|| e.to_store_error());
            }
            return;
        }
        if std::mem::take(&mut self.full) {
            tracing::info!("store: writes succeed again");
        }
        self.next_id = next_id;
        // Durable now: readers may take these bodies from memory.
        let cap = sh.config.hot_bytes;
        if cap > 0 {
            let mut hot = sh.hot();
            for (id, body, single) in appended {
                hot.insert(id, body, single, cap);
            }
            for (id, (count, _, _)) in refs {
                if count == 0 {
                    hot.remove(id);
                }
            }
        }
        {
            let mut st = sh.lock();
            for (qid, q) in new_queues {
                st.add_queue(qid, q);
            }
            for (qid, tail) in tails {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.durable = q.durable.max(tail);
                }
            }
            let mut n_expired = 0;
            for (qid, off) in expired {
                if let Some(q) = st.queues.get_mut(&qid)
                    && off >= q.counted
                {
                    q.expired += 1;
                    n_expired += 1;
                }
            }
            for (qid, head) in heads {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.head = q.head.max(head);
                    q.counted = q.counted.max(head);
                }
            }
            sh.expired_total.fetch_add(n_expired, Ordering::Relaxed);
        }
        sh.stored_bytes.store(stored, Ordering::Relaxed);
        done.into_iter().for_each(Done::send);
        // With the sync log the engine is written once per lap (`end_lap`).
        if self.log.is_none() {
            self.rotate_memtables(mem);
        }
    }
}

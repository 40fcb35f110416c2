//! The read side: staged writes merged over the engine's ([`Merged`]),
//! [`Store::read`]'s queue walk (damaged records skipped and counted) and
//! [`Store::peek`].

use super::*;

/// See [`Shared::range`].
pub(crate) struct Merged {
    staged: std::iter::Peekable<std::vec::IntoIter<(staged::Key, staged::Slot)>>,
    engine: fjall::Iter,
    engine_next: Option<(staged::Key, Bytes)>,
    engine_done: bool,
    stop: Option<staged::Key>,
}

impl Merged {
    pub(crate) fn new(
        staged: Vec<(staged::Key, staged::Slot)>,
        engine: fjall::Iter,
        stop: Option<staged::Key>,
    ) -> Self {
        Merged {
            staged: staged.into_iter().peekable(),
            engine,
            engine_next: None,
            engine_done: false,
            stop,
        }
    }

    /// The last key covered when the staged writes were cut at the limit.
    pub(crate) fn truncated_at(&self) -> Option<&[u8]> {
        self.stop.as_ref().map(staged::Key::as_slice)
    }

    fn fill_engine(&mut self) -> Result<()> {
        if self.engine_next.is_some() || self.engine_done {
            return Ok(());
        }
        match self.engine.next() {
            Some(g) => {
                let (k, v) = g.into_inner()?;
                let k = staged::Key::new(&k);
                if self.stop.as_ref().is_some_and(|s| k > *s) {
                    self.engine_done = true;
                } else {
                    self.engine_next = Some((k, Bytes::copy_from_slice(&v)));
                }
            }
            None => self.engine_done = true,
        }
        Ok(())
    }
}

impl Iterator for Merged {
    type Item = Result<(staged::Key, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        if let Err(e) = self.fill_engine() {
            self.engine_done = true;
            return Some(Err(e));
        }
        let order = match (self.staged.peek(), &self.engine_next) {
            (None, None) => return None,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((sk, _)), Some((ek, _))) => sk.cmp(ek),
        };
        if order == Equal {
            // The staged value is newer than the engine's.
            self.engine_next = None;
        }
        if order == Greater {
            return self.engine_next.take().map(Ok);
        }
        self.staged.next().map(|(k, slot)| Ok((k, slot.value)))
    }
}

impl Store {
    /// Up to `n` unacknowledged messages of one queue from `from_offset`
    /// (or its head, if later), expired ones included, without moving any
    /// cursor.
    pub async fn peek(
        &self,
        endpoint: &str,
        priority: u32,
        from_offset: u64,
        n: usize,
    ) -> Result<Vec<StoredMessage>> {
        let qid = self.queue_id(endpoint, priority)?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let (from, to) = {
                let st = shared.lock();
                let q = st.queues.get(&qid).ok_or(StoreError::Closed)?;
                (from_offset.max(q.head), q.durable)
            };
            let mut out = Vec::new();
            if from >= to {
                return Ok(out);
            }
            for kv in shared.range(
                synclog::Ks::Queues,
                &keys::entry_key(qid, from),
                &keys::entry_key(qid, to),
                usize::MAX,
            )? {
                if out.len() >= n {
                    break;
                }
                let (k, v) = match kv {
                    Err(e) if is_damage(&e) => break,
                    kv => kv?,
                };
                let Some((_, offset)) = keys::parse_entry_key(k.as_slice()) else {
                    break;
                };
                // Damaged ones are skipped (and counted by `read`).
                let Some(e) = Entry::decode(&v) else { continue };
                match shared.load_body(e.id) {
                    Ok(Some(message)) => out.push(stored(priority, offset, e, message)),
                    Ok(None) => {}
                    Err(err) if is_damage(&err) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }
}

pub(crate) fn stored(priority: u32, offset: u64, e: Entry, message: Message) -> StoredMessage {
    StoredMessage {
        id: MessageId(e.id),
        priority,
        offset,
        enqueued: e.enqueued,
        expiry: (e.expiry != i64::MAX).then_some(Timestamp::from_millis(e.expiry)),
        message,
    }
}

pub(crate) fn read_blocking(
    shared: &Shared,
    endpoint: &str,
    max: usize,
) -> Result<Vec<StoredMessage>> {
    let mut out = Vec::with_capacity(max.min(256));
    if max == 0 {
        return Ok(out);
    }
    let list: Vec<(u32, u32)> = shared
        .lock()
        .endpoints
        .get(endpoint)
        .cloned()
        .unwrap_or_default();
    for (priority, qid) in list {
        loop {
            let (from, to) = {
                let st = shared.lock();
                let Some(q) = st.queues.get(&qid) else { break };
                (q.cursor.max(q.head).max(q.acked), q.durable)
            };
            if from >= to {
                break;
            }
            let now = Timestamp::now();
            let mut scanned_to = from;
            let mut expired = Vec::new();
            // Bound the work per pass so a long expired run cannot pin a
            // blocking thread: at most max + 1024 references.
            let budget = max.saturating_add(1024);
            let mut seen = 0usize;
            let mut entries = shared.range(
                synclog::Ks::Queues,
                &keys::entry_key(qid, from),
                &keys::entry_key(qid, to),
                max,
            )?;
            // A damaged stretch the engine cannot iterate past: skip one
            // offset per pass (each pass makes progress; the rest flows).
            let mut unreadable = false;
            for kv in entries.by_ref() {
                if out.len() >= max || seen >= budget {
                    break;
                }
                seen += 1;
                let (k, v) = match kv {
                    Ok(kv) => kv,
                    Err(e) if is_damage(&e) => {
                        shared.damaged("queue block", qid, scanned_to, &e);
                        unreadable = true;
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let Some((_, offset)) = keys::parse_entry_key(k.as_slice()) else {
                    shared.damaged("queue key", qid, scanned_to, &corrupt("entry key"));
                    unreadable = true;
                    break;
                };
                scanned_to = offset + 1;
                let Some(e) = Entry::decode(&v) else {
                    shared.damaged("queue reference", qid, offset, &corrupt("entry"));
                    continue;
                };
                if e.is_expired(now) {
                    expired.push(offset);
                    continue;
                }
                match shared.load_body(e.id) {
                    Ok(Some(message)) => out.push(stored(priority, offset, e, message)),
                    // Deleted under us by a cleanup racing this read:
                    // nothing to deliver.
                    Ok(None) => expired.push(offset),
                    Err(err) if is_damage(&err) => {
                        shared.damaged("message body", qid, offset, &err);
                    }
                    Err(err) => return Err(err),
                }
            }
            if unreadable {
                scanned_to += 1;
            } else if seen == 0 {
                // Everything in range was deleted by a concurrent cleanup
                // (up to where the staged writes were cut, if they were).
                scanned_to = match entries.truncated_at() {
                    Some(k) => keys::parse_entry_key(k).map_or(to, |(_, o)| o + 1),
                    None => to,
                };
            }
            {
                let mut st = shared.lock();
                if let Some(q) = st.queues.get_mut(&qid) {
                    let mut n = 0;
                    for &off in &expired {
                        if off >= q.counted {
                            n += 1;
                        }
                    }
                    q.expired += n;
                    q.counted = q.counted.max(scanned_to);
                    q.cursor = q.cursor.max(scanned_to);
                    shared.expired_total.fetch_add(n, Ordering::Relaxed);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

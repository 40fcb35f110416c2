//! After a failed group: checkpoints already delivered are kept in memory
//! until a later group writes them, and a poisoned engine is reopened in
//! place once the disk has room again.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Writer;
use crate::{FullReason, Result, StoreError};

impl Writer {
    /// Reopens a poisoned engine in place (at most every
    /// [`crate::RETRY_INTERVAL`]): the old database is closed, the new one
    /// recovers its journal and replays the sync log's lap — every group
    /// ever acknowledged — and the queues are rebuilt from it, keeping the
    /// readers' cursors. Fails (to be tried again) while the disk is still
    /// full.
    pub(super) fn reopen(&mut self) -> Result<()> {
        if self
            .last_reopen
            .is_some_and(|t| t.elapsed() < crate::RETRY_INTERVAL)
        {
            return Err(StoreError::Poisoned);
        }
        self.last_reopen = Some(std::time::Instant::now());
        let sh = self.shared.clone();
        if sh.config.min_free_bytes > 0 {
            // Reopening writes (journal recovery, the lap's replay): not
            // before the disk has room again. Until then the old engine
            // still serves reads.
            if let Some((available, floor)) = self.gauge.refresh(&sh)
                && available < floor / 2
            {
                return Err(StoreError::Full(FullReason::DiskFloor { available, floor }));
            }
        }
        // Everything that holds the old database goes first: fjall locks its
        // directory until the last handle is dropped.
        self.deletes = None;
        if let Some(old) = sh.swap_engine(None) {
            // Readers hold it for the length of one read at most.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(old);
        }
        let engine = crate::Engine::open(&sh.dir, &sh.config)?;
        let log = crate::open_sync_log(&engine, &sh.dir, &sh.config)?;
        let (fresh, stored, next_id) = engine.load()?;
        {
            let mut st = sh.lock();
            let old = std::mem::take(&mut *st);
            *st = fresh;
            st.next_qid = st.next_qid.max(old.next_qid);
            for (qid, o) in old.queues {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.acked = o.acked.clamp(q.head, q.durable);
                    q.cursor = o.cursor.clamp(q.acked, q.durable);
                    q.counted = o.counted.clamp(q.head, q.durable);
                    q.expired = o.expired;
                }
            }
        }
        // The engine holds the lap now. Hot bodies are durable ones, but
        // start clean rather than trust memory kept across a failure.
        sh.staged().clear();
        *sh.hot() = crate::Hot::default();
        sh.stored_bytes.store(stored, Ordering::Relaxed);
        self.next_id = next_id;
        self.log = log;
        self.mem = [0; 3];
        self.unsynced = false;
        sh.swap_engine(Some(Arc::new(engine)));
        sh.poisoned.store(false, Ordering::Relaxed);
        tracing::info!(dir = %sh.dir.display(), "store: engine reopened after a write failure; intake resumes");
        Ok(())
    }

    /// Records that queue `qid` is acknowledged below `end` although its
    /// checkpoint could not be written: reads and rewinds skip those
    /// offsets from now on, and the checkpoint goes out with a later group.
    pub(super) fn defer(&mut self, qid: u32, end: u64) {
        let e = self.deferred.entry(qid).or_insert(end);
        *e = (*e).max(end);
        if let Some(q) = self.shared.lock().queues.get_mut(&qid) {
            q.acked = q.acked.max(end);
        }
    }
}

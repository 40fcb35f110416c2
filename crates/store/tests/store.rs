//! Behaviour of the store through its public API.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use verge_core::message::Message;
use verge_core::time::Timestamp;
use verge_store::{
    DEFAULT_PRIORITY, FullReason, Store, StoreConfig, StoreError, StoredMessage, Target,
};

fn cfg() -> StoreConfig {
    StoreConfig {
        // Tests run on whatever disk the machine has.
        min_free_bytes: 0,
        ..StoreConfig::default()
    }
}

fn msg(text: &str) -> Message {
    let mut m = Message::new(text.as_bytes().to_vec());
    m.properties.insert("k", text);
    m
}

fn bodies(v: &[StoredMessage]) -> Vec<String> {
    v.iter()
        .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_batches_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg()).unwrap();
    let up = [Target::new("$upstream")];
    for i in 0..25 {
        store.append(&msg(&format!("m{i}")), &up).await.unwrap();
    }
    let a = store.read("$upstream", 10).await.unwrap();
    assert_eq!(a.len(), 10);
    assert_eq!(bodies(&a)[0], "m0");
    assert_eq!(a[0].message.properties.get("k"), Some("m0"));
    assert_eq!(a[0].priority, DEFAULT_PRIORITY);
    // Pipelined: the next read continues after the cursor, before any ack.
    let b = store.read("$upstream", 10).await.unwrap();
    assert_eq!(bodies(&b)[0], "m10");
    assert!(b.windows(2).all(|w| w[0].offset + 1 == w[1].offset));
    store
        .ack("$upstream", DEFAULT_PRIORITY, a.last().unwrap().offset)
        .await
        .unwrap();
    // Rewind returns to the checkpoint: m10.. again.
    store.rewind("$upstream");
    let c = store.read("$upstream", 100).await.unwrap();
    assert_eq!(c.len(), 15);
    assert_eq!(bodies(&c)[0], "m10");
    assert!(store.read("$upstream", 100).await.unwrap().is_empty());
    let info = store.queues().await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].depth, 15);
    assert_eq!(info[0].unread, 0);
    assert!(info[0].oldest_enqueued.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_drain_highest_first_without_mixing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg()).unwrap();
    let t = |p| [Target::new("ep").priority(p)];
    store.append(&msg("low0"), &t(10)).await.unwrap();
    store.append(&msg("high0"), &t(0)).await.unwrap();
    store.append(&msg("low1"), &t(10)).await.unwrap();
    store.append(&msg("high1"), &t(0)).await.unwrap();
    let a = store.read("ep", 10).await.unwrap();
    assert_eq!(bodies(&a), ["high0", "high1"]);
    assert!(a.iter().all(|m| m.priority == 0));
    // A new high-priority message overtakes the pending low ones.
    store.append(&msg("high2"), &t(0)).await.unwrap();
    assert_eq!(bodies(&store.read("ep", 10).await.unwrap()), ["high2"]);
    assert_eq!(
        bodies(&store.read("ep", 10).await.unwrap()),
        ["low0", "low1"]
    );
    assert!(matches!(
        store.ack("ep", 5, 0).await,
        Err(StoreError::UnknownQueue { .. })
    ));
    assert!(matches!(
        store.append(&msg("x"), &[]).await,
        Err(StoreError::NoTargets)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcount_reclaims_body_after_last_ack_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let targets = [Target::new("a"), Target::new("b").priority(3)];
    {
        let store = Store::open(dir.path(), cfg()).unwrap();
        store.append(&msg("shared"), &targets).await.unwrap();
        let before = store.stored_bytes();
        assert!(before > 0);
        let a = store.read("a", 10).await.unwrap();
        store.ack("a", DEFAULT_PRIORITY, a[0].offset).await.unwrap();
        // Still referenced by b: only the reference's overhead is released.
        assert_eq!(store.stored_bytes(), before - verge_store::ENTRY_OVERHEAD);
        assert_eq!(store.peek("b", 3, 0, 10).await.unwrap().len(), 1);
    }
    let store = Store::open(dir.path(), cfg()).unwrap();
    assert!(store.read("a", 10).await.unwrap().is_empty());
    let b = store.read("b", 10).await.unwrap();
    assert_eq!(bodies(&b), ["shared"]);
    store.ack("b", 3, b[0].offset).await.unwrap();
    assert_eq!(store.stored_bytes(), 0);
    drop(store);
    let store = Store::open(dir.path(), cfg()).unwrap();
    assert_eq!(store.stored_bytes(), 0);
    let q = store.queues().await.unwrap();
    assert!(q.iter().all(|q| q.depth == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_checkpoint_and_keeps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let up = [Target::new("$upstream").priority(1), Target::new("m")];
    {
        let store = Store::open(dir.path(), cfg()).unwrap();
        for i in 0..10 {
            store.append(&msg(&format!("m{i}")), &up).await.unwrap();
        }
        let a = store.read("$upstream", 4).await.unwrap();
        store.ack("$upstream", 1, a[3].offset).await.unwrap();
        // Read but not acked: must come back after the restart.
        store.read("$upstream", 4).await.unwrap();
    }
    let store = Store::open(dir.path(), cfg()).unwrap();
    let a = store.read("$upstream", 100).await.unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(bodies(&a)[0], "m4");
    assert_eq!(a[0].offset, 4);
    assert_eq!(store.read("m", 100).await.unwrap().len(), 10);
    // New appends continue the offsets.
    store.append(&msg("m10"), &up).await.unwrap();
    let b = store.read("$upstream", 100).await.unwrap();
    assert_eq!(b[0].offset, 10);
    let peek = store.peek("$upstream", 1, 0, 100).await.unwrap();
    assert_eq!(peek.len(), 7, "peek starts at the checkpoint");
    assert_eq!(store.peek("$upstream", 1, 8, 2).await.unwrap()[0].offset, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_skips_counts_and_reclaims() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg()).unwrap();
    let short = [Target::new("ep").ttl_secs(0)];
    let long = [Target::new("ep").ttl_secs(3600)];
    store.append(&msg("dead0"), &short).await.unwrap();
    store.append(&msg("live0"), &long).await.unwrap();
    let mut exp = msg("dead1");
    exp.system.absolute_expiry = Some(Timestamp::now().plus_secs(0));
    store.append(&exp, &long).await.unwrap();
    store.append(&msg("live1"), &long).await.unwrap();
    let r = store.read("ep", 10).await.unwrap();
    assert_eq!(bodies(&r), ["live0", "live1"]);
    assert_eq!(store.expired_count(), 2);
    // Skipped again after a rewind, but not counted twice.
    store.rewind("ep");
    assert_eq!(store.read("ep", 10).await.unwrap().len(), 2);
    assert_eq!(store.expired_count(), 2);
    // Cleanup trims the expired head (dead0) only; dead1 sits behind live0.
    let bytes = store.stored_bytes();
    assert_eq!(store.cleanup().await.unwrap(), 1);
    assert!(store.stored_bytes() < bytes);
    assert_eq!(store.expired_count(), 2);
    let q = &store.queues().await.unwrap()[0];
    assert_eq!(q.head, 1);
    assert_eq!(q.expired, 2);
    // Acking past dead1 deletes it too; everything is reclaimed.
    store
        .ack("ep", DEFAULT_PRIORITY, r[1].offset)
        .await
        .unwrap();
    assert_eq!(store.stored_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_cleanup_entire_queue_and_background() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        check_entire_queue_on_cleanup: true,
        cleanup_interval: Duration::from_millis(100),
        ..cfg()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let long = [Target::new("ep").ttl_secs(3600)];
    store.append(&msg("live"), &long).await.unwrap();
    for i in 0..5 {
        let mut m = msg(&format!("dead{i}"));
        m.system.absolute_expiry = Some(Timestamp::now().plus_secs(1));
        store.append(&m, &long).await.unwrap();
    }
    let with_dead = store.stored_bytes();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The background pass deleted the expired middle of the queue.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.expired_count() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.expired_count(), 5);
    assert!(store.stored_bytes() < with_dead);
    assert_eq!(bodies(&store.read("ep", 10).await.unwrap()), ["live"]);
    assert_eq!(
        store
            .peek("ep", DEFAULT_PRIORITY, 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_limit_refuses_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        max_bytes: Some(10_000),
        ..cfg()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let t = [Target::new("ep")];
    let body = "x".repeat(900);
    let mut accepted = 0;
    let err = loop {
        match store.append(&msg(&body), &t).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(
        err,
        StoreError::Full(FullReason::ByteLimit { limit: 10_000, .. })
    ));
    assert!(accepted >= 5);
    assert!(store.stored_bytes() <= 10_000);
    // Nothing stored was harmed.
    let all = store.peek("ep", DEFAULT_PRIORITY, 0, 100).await.unwrap();
    assert_eq!(all.len(), accepted);
    // Acks free space and intake resumes by itself.
    let r = store.read("ep", 2).await.unwrap();
    store
        .ack("ep", DEFAULT_PRIORITY, r[1].offset)
        .await
        .unwrap();
    store.append(&msg(&body), &t).await.unwrap();
    store.append(&msg(&body), &t).await.unwrap();
    assert!(store.append(&msg(&body), &t).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_floor_refuses_appends_but_not_acks() {
    let dir = tempfile::tempdir().unwrap();
    let t = [Target::new("ep")];
    {
        let store = Store::open(dir.path(), cfg()).unwrap();
        store.append(&msg("before"), &t).await.unwrap();
    }
    let tight = StoreConfig {
        min_free_bytes: u64::MAX,
        min_free_percent: 100,
        ..cfg()
    };
    let store = Store::open(dir.path(), tight).unwrap();
    assert!(matches!(
        store.append(&msg("refused"), &t).await,
        Err(StoreError::Full(FullReason::DiskFloor { .. }))
    ));
    let r = store.read("ep", 10).await.unwrap();
    assert_eq!(bodies(&r), ["before"]);
    store
        .ack("ep", DEFAULT_PRIORITY, r[0].offset)
        .await
        .unwrap();
    drop(store);
    // With space available again, intake works and nothing was half-written.
    let store = Store::open(dir.path(), cfg()).unwrap();
    assert_eq!(store.stored_bytes(), 0);
    store.append(&msg("after"), &t).await.unwrap();
    assert_eq!(bodies(&store.read("ep", 10).await.unwrap()), ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_group_commit_keep_per_producer_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg()).unwrap();
    let mut tasks = Vec::new();
    for p in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for s in 0..50 {
                store
                    .append(&msg(&format!("{p}:{s}")), &[Target::new("ep")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.peek("ep", DEFAULT_PRIORITY, 0, 10_000).await.unwrap();
    assert_eq!(all.len(), 32 * 50);
    let mut next = [0u32; 32];
    for b in bodies(&all) {
        let (p, s) = b.split_once(':').unwrap();
        let (p, s): (usize, u32) = (p.parse().unwrap(), s.parse().unwrap());
        assert_eq!(next[p], s, "producer {p} out of order");
        next[p] += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_read_after_many_acks_is_a_seek() {
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000u64;
    {
        let store = Store::open(dir.path(), cfg()).unwrap();
        let mut tasks = Vec::new();
        for p in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for s in 0..n / 64 {
                    let m = msg(&format!("{p}:{s}"));
                    store.append(&m, &[Target::new("ep")]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        loop {
            let r = store.read("ep", 500).await.unwrap();
            let Some(last) = r.last() else { break };
            store
                .ack("ep", DEFAULT_PRIORITY, last.offset)
                .await
                .unwrap();
        }
    }
    let store = Store::open(dir.path(), cfg()).unwrap();
    store
        .append(&msg("new"), &[Target::new("ep")])
        .await
        .unwrap();
    // Warm-up, then time the head read over ~20k tombstones.
    let t0 = Instant::now();
    let r = store.peek("ep", DEFAULT_PRIORITY, 0, 1).await.unwrap();
    let first = t0.elapsed();
    assert_eq!(bodies(&r), ["new"]);
    let t0 = Instant::now();
    let r = store.read("ep", 10).await.unwrap();
    let second = t0.elapsed();
    assert_eq!(bodies(&r), ["new"]);
    assert_eq!(r[0].offset, n / 64 * 64);
    assert!(
        second < Duration::from_millis(20),
        "head read took {second:?} (first {first:?})"
    );
}

/// A sync log far smaller than the data starts many laps (each one syncs
/// the engine); turning the log off, or changing its size, between opens
/// keeps everything. (Replay after a kill is `tests/crash.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_log_laps_and_size_changes_keep_everything() {
    let dir = tempfile::tempdir().unwrap();
    let with_log = |bytes: u64| StoreConfig {
        sync_log_bytes: bytes,
        ..cfg()
    };
    let up = [Target::new("$upstream")];
    let body = |i: usize| format!("{i:06}-{}", "x".repeat(250));
    {
        let store = Store::open(dir.path(), with_log(64 * 1024)).unwrap();
        // 1,500 × ≈ 330 B of records ≈ 8 laps of 64 KiB, in groups.
        for chunk in (0..1500).collect::<Vec<_>>().chunks(50) {
            let mut receipts = Vec::new();
            for &i in chunk {
                receipts.push(
                    store
                        .append_submit(&msg(&body(i)), up.to_vec())
                        .await
                        .unwrap(),
                );
            }
            for r in receipts {
                r.await.unwrap();
            }
        }
        let first = store.read("$upstream", 500).await.unwrap();
        assert_eq!(bodies(&first)[499], body(499));
        store
            .ack("$upstream", DEFAULT_PRIORITY, first[499].offset)
            .await
            .unwrap();
    }
    assert_eq!(
        std::fs::metadata(dir.path().join("sync.log"))
            .unwrap()
            .len(),
        64 * 1024
    );
    {
        let store = Store::open(dir.path(), with_log(0)).unwrap();
        assert!(!dir.path().join("sync.log").exists());
        let rest = store.read("$upstream", 2000).await.unwrap();
        assert_eq!(rest.len(), 1000);
        assert_eq!(bodies(&rest)[0], body(500));
        store.append(&msg(&body(1500)), &up).await.unwrap();
    }
    let store = Store::open(dir.path(), with_log(128 * 1024)).unwrap();
    let rest = store.read("$upstream", 2000).await.unwrap();
    assert_eq!(rest.len(), 1001);
    assert_eq!(bodies(&rest)[1000], body(1500));
    assert!(rest.windows(2).all(|w| w[0].offset + 1 == w[1].offset));
}

/// A limit set while running (`storeLimits.maxSizeBytes`) refuses appends
/// beyond it with a "storage full" error, keeps what is stored, and takes
/// effect both ways at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_set_live() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg()).unwrap();
    let t = [Target::new("ep")];
    let body = "x".repeat(1000);
    store.append(&msg(&body), &t).await.unwrap();
    assert_eq!(store.max_bytes(), None);
    store.set_max_bytes(Some(store.stored_bytes() + 500));
    let e = store.append(&msg(&body), &t).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Full(FullReason::ByteLimit { .. })),
        "{e}"
    );
    assert!(e.to_string().starts_with("storage full"), "{e}");
    assert_eq!(
        bodies(&store.read("ep", 10).await.unwrap()),
        std::slice::from_ref(&body)
    );
    store.set_max_bytes(None);
    store.append(&msg(&body), &t).await.unwrap();
    assert_eq!(store.read("ep", 10).await.unwrap().len(), 1);
}

/// Every file of the engine's tables under `dir`, largest first.
fn table_files(dir: &std::path::Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.components().any(|c| c.as_os_str() == "tables") {
                out.push((std::fs::metadata(&p).unwrap().len(), p));
            }
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    out
}

/// A store whose bodies went to the engine's tables (flushed), closed.
async fn flushed_store(dir: &std::path::Path, n: usize) -> StoreConfig {
    let config = StoreConfig {
        sync_log_bytes: 0,
        memtable_bytes: 1024 * 1024,
        ..cfg()
    };
    let store = Store::open(dir, config.clone()).unwrap();
    let t = [Target::new("ep")];
    for i in 0..n {
        let m = msg(&format!("{i:06}-{}", "z".repeat(1000)));
        store.append(&m, &t).await.unwrap();
    }
    drop(store);
    // Flushes run in the background: wait for the tables to settle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while table_files(dir).iter().map(|(l, _)| l).sum::<u64>() < (n as u64) * 900
        && std::time::Instant::now() < deadline
    {
        let s = Store::open(dir, config.clone()).unwrap();
        drop(s);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    config
}

/// One damaged block in a table of bodies loses the messages in it, not
/// the queue: they are skipped and counted, the rest is delivered in order
/// and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_block_is_skipped_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3000;
    let config = flushed_store(dir.path(), n).await;
    let tables = table_files(dir.path());
    let (len, path) = tables.first().unwrap().clone();
    assert!(len > 1_000_000, "{tables:?}");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xa5; 64], len / 2).unwrap();
    }
    let store = Store::open(dir.path(), config).unwrap();
    let mut got = Vec::new();
    loop {
        let batch = store.read("ep", 100).await.unwrap();
        let Some(last) = batch.last() else { break };
        store
            .ack("ep", DEFAULT_PRIORITY, last.offset)
            .await
            .unwrap();
        got.extend(batch.iter().map(|m| {
            std::str::from_utf8(&m.message.body[..6])
                .unwrap()
                .parse::<usize>()
                .unwrap()
        }));
    }
    let damaged = store.damaged_count();
    assert!(damaged > 0, "the damage was not seen");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, once each");
    assert_eq!(
        got.len() as u64 + damaged,
        n as u64,
        "every message delivered or counted"
    );
    // The queue is not stuck: new messages flow.
    store
        .append(&msg("after"), &[Target::new("ep")])
        .await
        .unwrap();
    assert_eq!(bodies(&store.read("ep", 10).await.unwrap()), ["after"]);
}

/// A table file gone: opening fails with an error that says the store is
/// damaged; moved aside, an empty store opens in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_table_is_reported_as_damage_and_can_be_moved_aside() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let config = flushed_store(&dir, 3000).await;
    let (_, path) = table_files(&dir).first().unwrap().clone();
    std::fs::remove_file(&path).unwrap();
    let e = Store::open(&dir, config.clone()).unwrap_err();
    assert!(e.is_damage(), "{e:?}");
    let moved = verge_store::move_aside(&dir).unwrap();
    assert!(moved.exists() && !dir.exists());
    let store = Store::open(&dir, config).unwrap();
    assert!(store.read("ep", 10).await.unwrap().is_empty());
}

/// A damaged record in the middle of the sync log loses that group only:
/// the later groups are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sync_log_record_loses_only_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let t = [Target::new("ep")];
    let store = Store::open(dir.path(), cfg()).unwrap();
    for i in 0..10 {
        store.append(&msg(&format!("m{i}")), &t).await.unwrap();
    }
    // A crash: a copy of the files now holds the lap in the log only.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    drop(store);
    let log_path = copy.path().join("sync.log");
    let log = std::fs::read(&log_path).unwrap();
    // The 4th group (one per append here): found by its body.
    let at = log.windows(2).position(|w| w == b"m3").unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&log_path)
            .unwrap();
        f.write_all_at(b"XX", at as u64).unwrap();
    }
    let store = Store::open(copy.path(), cfg()).unwrap();
    let got = bodies(&store.read("ep", 100).await.unwrap());
    assert_eq!(got, ["m0", "m1", "m2", "m4", "m5", "m6", "m7", "m8", "m9"]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

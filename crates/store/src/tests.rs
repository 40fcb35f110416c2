//! The store's unit tests (model, restart, order, damage, bounds).

#![allow(clippy::unwrap_used)]
use super::*;

fn cfg(hot_bytes: usize) -> StoreConfig {
    StoreConfig {
        default_ttl_secs: None,
        min_free_bytes: 0,
        hot_bytes,
        ..StoreConfig::default()
    }
}

/// `store.read` as (offset, body text) pairs.
async fn read_bodies(store: &Store, ep: &str, max: usize) -> Vec<(u64, String)> {
    store
        .read(ep, max)
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.offset,
                String::from_utf8(m.message.body.to_vec()).unwrap(),
            )
        })
        .collect()
}

/// Staged writes read over the engine's: a random mix of appends (to one
/// or two endpoints), reads, acks, lazy checkpoints and rewinds gives
/// what a plain model gives — with the sync log off, with laps so short
/// that they end every few groups (so reads and acks straddle staged and
/// engine keys), and with the default — and again after reopening.
#[tokio::test]
async fn staged_reads_match_a_model() {
    use std::collections::BTreeMap;
    for (log, hot) in [
        (0u64, 0usize),
        (4096, 0),
        (4096, 1 << 20),
        (2 << 20, 1 << 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            sync_log_bytes: log,
            ..cfg(hot)
        };
        let store = Store::open(dir.path(), config.clone()).unwrap();
        /// Per endpoint: unacknowledged (offset, body), next offset, cursor.
        type Queue = (Vec<(u64, String)>, u64, u64);
        let mut model: BTreeMap<&str, Queue> = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ log;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let eps = ["a", "b"];
        for step in 0..1500u64 {
            let ep = eps[rnd(2) as usize];
            match rnd(10) {
                0..=3 => {
                    let body = format!("s{step}-{}", "x".repeat(rnd(200) as usize));
                    let targets: Vec<&str> = match rnd(3) {
                        0 => vec!["a"],
                        1 => vec!["b"],
                        _ => vec!["a", "b"],
                    };
                    let t: Vec<Target> = targets.iter().map(|e| Target::new(*e)).collect();
                    store.append(&Message::new(body.clone()), &t).await.unwrap();
                    for e in targets {
                        let q = model.entry(e).or_default();
                        q.0.push((q.1, body.clone()));
                        q.1 += 1;
                    }
                }
                4..=6 => {
                    let max = 1 + rnd(40) as usize;
                    let got = read_bodies(&store, ep, max).await;
                    let q = model.entry(ep).or_default();
                    let want: Vec<(u64, String)> =
                        q.0.iter()
                            .filter(|(o, _)| *o >= q.2)
                            .take(max)
                            .cloned()
                            .collect();
                    assert_eq!(got, want, "log {log} hot {hot} step {step} {ep}");
                    if let Some((o, _)) = want.last() {
                        q.2 = o + 1;
                    }
                }
                7 | 8 => {
                    let q = model.entry(ep).or_default();
                    // Up to somewhere in what has been read.
                    let read: Vec<u64> = q.0.iter().map(|(o, _)| *o).filter(|o| *o < q.2).collect();
                    if read.is_empty() {
                        continue;
                    }
                    let up_to = read[rnd(read.len() as u64) as usize];
                    if rnd(2) == 0 {
                        store.ack(ep, DEFAULT_PRIORITY, up_to).await.unwrap();
                    } else {
                        store.checkpoint(ep, DEFAULT_PRIORITY, up_to).await.unwrap();
                    }
                    q.0.retain(|(o, _)| *o > up_to);
                }
                _ => {
                    store.rewind(ep);
                    let q = model.entry(ep).or_default();
                    q.2 = 0;
                }
            }
        }
        drop(store);
        let store = Store::open(dir.path(), config).unwrap();
        for (ep, (items, _, _)) in &model {
            let got = read_bodies(&store, ep, 100_000).await;
            assert_eq!(&got, items, "log {log} hot {hot} after reopen, {ep}");
            if let Some(m) = store.read(ep, 1).await.unwrap().first() {
                panic!("log {log} hot {hot}: {ep} read past its end: {m:?}");
            }
            if let Some((last, _)) = items.last() {
                store.ack(ep, DEFAULT_PRIORITY, *last).await.unwrap();
            }
        }
        // Everything acknowledged: nothing may be left in the engine
        // (a delete lost between staging and engine would leak).
        drop(store);
        let db = Database::builder(dir.path()).open().unwrap();
        for name in ["msgs", "queues"] {
            let ks = db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
            let left = ks.iter().count();
            assert_eq!(left, 0, "log {log} hot {hot}: {left} keys left in {name}");
        }
    }
}

/// A clean shutdown ends the sync log's lap: the engine holds
/// everything, so the next open has nothing to replay.
#[tokio::test]
async fn clean_shutdown_leaves_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(0)).unwrap();
    for i in 0..20 {
        let m = Message::new(format!("m{i}"));
        store.append(&m, &[Target::new("a")]).await.unwrap();
    }
    drop(store);
    let db = Database::builder(dir.path()).open().unwrap();
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
    let lap = keys::u64_at(&meta.get(keys::SYNC_LAP).unwrap().unwrap(), 0).unwrap();
    let records = synclog::read_lap(&dir.path().join("sync.log"), lap)
        .unwrap()
        .records;
    assert!(
        records.is_empty(),
        "{} records left to replay",
        records.len()
    );
}

/// Submitted appends land in submission order and the receipts complete
/// in that order, whatever order they are awaited in.
#[tokio::test]
async fn submit_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 20)).unwrap();
    let t = [Target::new("ep")];
    let mut receipts = Vec::new();
    for i in 0..200 {
        receipts.push(
            store
                .append_submit(&Message::new(format!("m{i}")), t.to_vec())
                .await
                .unwrap(),
        );
    }
    let mut ids = Vec::new();
    for r in receipts.into_iter().rev() {
        ids.push(r.await.unwrap().0);
    }
    ids.reverse();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let got = store.read("ep", 500).await.unwrap();
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
}

/// A target named twice (same endpoint and priority) gets one reference.
#[tokio::test]
async fn repeated_targets_get_one_reference() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(1 << 20)).unwrap();
    let t = vec![
        Target::new("a"),
        Target::new("b"),
        Target::new("a"),
        Target::new("a").priority(1),
    ];
    store
        .append_submit(&Message::new("x"), t)
        .await
        .unwrap()
        .await
        .unwrap();
    let queues = store.queues().await.unwrap();
    let depth = |ep: &str| -> u64 {
        queues
            .iter()
            .filter(|q| q.endpoint == ep)
            .map(|q| q.depth)
            .sum()
    };
    assert_eq!(depth("a"), 2, "one per priority");
    assert_eq!(depth("b"), 1);
    assert_eq!(read_bodies(&store, "a", 10).await, vec![(0, "x".into())]);
    assert_eq!(read_bodies(&store, "a", 10).await, vec![(0, "x".into())]);
    assert!(read_bodies(&store, "a", 10).await.is_empty());
}

/// Full comes back through the receipt and nothing is written.
#[tokio::test]
async fn submit_full_through_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        max_bytes: Some(10),
        ..cfg(1 << 20)
    };
    let store = Store::open(dir.path(), config).unwrap();
    let r = store
        .append_submit(&Message::new("x"), vec![Target::new("ep")])
        .await
        .unwrap();
    assert!(matches!(r.await, Err(StoreError::Full(_))));
    assert!(store.read("ep", 10).await.unwrap().is_empty());
    assert!(matches!(
        store.append_submit(&Message::new("x"), Vec::new()).await,
        Err(StoreError::NoTargets)
    ));
}

/// Reads and acks give the same results with and without the hot-body
/// cache, including shared bodies (refcounts) and evicted bodies; bodies
/// are reclaimed when their last reference goes.
#[tokio::test]
async fn hot_cache_is_transparent() {
    for hot in [0usize, 600, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(hot)).unwrap();
        let both = [Target::new("a"), Target::new("b")];
        for i in 0..50 {
            let body = format!("{i:0>100}");
            if i % 2 == 0 {
                store.append(&Message::new(body), &both).await.unwrap();
            } else {
                store.append(&Message::new(body), &both[..1]).await.unwrap();
            }
        }
        let a = store.read("a", 100).await.unwrap();
        assert_eq!(a.len(), 50, "hot {hot}");
        for (i, m) in a.iter().enumerate() {
            assert_eq!(
                m.message.body,
                format!("{i:0>100}").into_bytes(),
                "hot {hot}"
            );
        }
        store
            .ack("a", DEFAULT_PRIORITY, a[49].offset)
            .await
            .unwrap();
        // The shared bodies are still there for "b".
        let b = store.read("b", 100).await.unwrap();
        assert_eq!(b.len(), 25, "hot {hot}");
        assert!(store.stored_bytes() > 0);
        store
            .ack("b", DEFAULT_PRIORITY, b[24].offset)
            .await
            .unwrap();
        assert_eq!(store.stored_bytes(), 0, "hot {hot}");
        assert!(store.shared.hot().map.is_empty(), "hot {hot}");
        drop(store);
        // Reopened (cold cache): nothing left.
        let store = Store::open(dir.path(), cfg(hot)).unwrap();
        assert!(store.read("a", 10).await.unwrap().is_empty());
        assert!(store.read("b", 10).await.unwrap().is_empty());
    }
}

/// A reference and a body that do not decode are skipped and counted;
/// the rest of the queue is delivered and acknowledged.
#[tokio::test]
async fn undecodable_records_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), cfg(0)).unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        let m = Message::new(format!("m{i}"));
        ids.push(store.append(&m, &[Target::new("a")]).await.unwrap().0);
    }
    let qid = store.queue_id("a", DEFAULT_PRIORITY).unwrap();
    drop(store);
    {
        let db = Database::builder(dir.path()).open().unwrap();
        let msgs = db.keyspace("msgs", KeyspaceCreateOptions::default).unwrap();
        let queues = db
            .keyspace("queues", KeyspaceCreateOptions::default)
            .unwrap();
        msgs.insert(keys::msg_key(keys::BODY, ids[3]), b"\xff\xff\xff")
            .unwrap();
        queues.insert(keys::entry_key(qid, 6), b"bad").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = Store::open(dir.path(), cfg(0)).unwrap();
    let got = read_bodies(&store, "a", 100).await;
    let texts: Vec<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m4", "m5", "m7", "m8", "m9"]);
    assert_eq!(store.damaged_count(), 2);
    store.ack("a", DEFAULT_PRIORITY, 9).await.unwrap();
    store
        .append(&Message::new("after"), &[Target::new("a")])
        .await
        .unwrap();
    let got = read_bodies(&store, "a", 100).await;
    assert_eq!(got, vec![(10, "after".to_owned())]);
}

/// The floor is min_free_bytes, capped at a share of small volumes.
#[test]
fn floor_scales_with_small_volumes() {
    const MIB: u64 = 1024 * 1024;
    let c = StoreConfig::default();
    assert_eq!(floor_for(&c, 64 * MIB), 64 * MIB / 10);
    assert_eq!(floor_for(&c, 16 * 1024 * MIB), 64 * MIB);
    let c = StoreConfig {
        min_free_percent: 100,
        ..c
    };
    assert_eq!(floor_for(&c, 64 * MIB), 64 * MIB);
    let c = StoreConfig {
        min_free_bytes: 0,
        ..c
    };
    assert_eq!(floor_for(&c, 64 * MIB), 0);
    let c = StoreConfig {
        min_free_bytes: u64::MAX,
        min_free_percent: 200,
        ..c
    };
    assert_eq!(floor_for(&c, u64::MAX), u64::MAX);
}

#[test]
fn hot_stays_bounded() {
    let mut hot = Hot::default();
    for id in 0..10_000u64 {
        hot.insert(id, Bytes::from(vec![0u8; 100]), true, 10_000);
        if id % 3 == 0 {
            hot.remove(id);
        }
    }
    assert!(hot.bytes <= 10_000);
    assert!(hot.map.len() <= 100);
    assert!(hot.order.len() <= 2 * hot.map.len() + 1026);
    assert_eq!(hot.single(9_998), Some(true));
    assert_eq!(hot.single(0), None);
}

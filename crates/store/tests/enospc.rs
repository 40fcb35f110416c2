//! The store on a really full file system: a small tmpfs mounted for the
//! test (root only; skipped with a message otherwise), filled by another
//! file while the store works, then emptied again.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use verge_core::message::Message;
use verge_store::{DEFAULT_PRIORITY, FullReason, Store, StoreConfig, StoreError, Target};

/// A tmpfs of `mib` MiB, unmounted on drop (also when the test fails),
/// then its mount point removed.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: mounting a tmpfs needs root (run the tests as root to cover a full disk)"
            );
            return None;
        }
        Some(Tmpfs(dir.path().to_path_buf(), dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` to the last byte.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = [0x5au8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

fn cfg(min_free_bytes: u64) -> StoreConfig {
    StoreConfig {
        default_ttl_secs: None,
        min_free_bytes,
        // Laps of a few dozen groups: acks and appends must end them (and
        // so write the engine) while the disk is full.
        sync_log_bytes: 64 * 1024,
        memtable_bytes: 1024 * 1024,
        ..StoreConfig::default()
    }
}

fn body(i: usize) -> String {
    format!("{i:06}-{}", "b".repeat(500))
}

fn index(m: &verge_store::StoredMessage) -> usize {
    std::str::from_utf8(&m.message.body[..6])
        .unwrap()
        .parse()
        .unwrap()
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the free-space floor on, a full disk refuses intake with a clear
/// error, acks keep the drain moving (delivered messages are not read
/// again, though their checkpoints wait for space), and once the filler is
/// gone intake resumes by itself: every acknowledged message delivered
/// exactly once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_intake_then_resumes_without_loss_or_duplicates() {
    let Some(fs) = Tmpfs::mount(48) else { return };
    let dir = fs.0.join("store");
    let store = Store::open(&dir, cfg(64 * 1024 * 1024)).unwrap();
    let floor = store.volume().unwrap().floor;
    assert!(floor > 0 && floor < 8 * 1024 * 1024, "floor {floor}");
    let t = [Target::new("up")];
    let n = 1200;
    for i in 0..n {
        store.append(&Message::new(body(i)), &t).await.unwrap();
    }

    fill(&fs.0.join("filler"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = store.append(&Message::new(body(n)), &t).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Full(FullReason::DiskFloor { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("storage full"), "{e}");

    // The drain: one message per batch, acked one by one; a failed ack
    // rewinds (as the upstream drain does) and must not bring it back.
    let mut delivered = Vec::new();
    let mut ack_failures = 0;
    loop {
        let batch = store.read("up", 1).await.unwrap();
        let Some(m) = batch.first() else { break };
        delivered.push(index(m));
        if let Err(e) = store.ack("up", DEFAULT_PRIORITY, m.offset).await {
            assert!(matches!(e, StoreError::Full(_)), "{e}");
            ack_failures += 1;
            store.rewind("up");
        }
    }
    assert!(
        ack_failures > 0,
        "the full disk never stopped a lap from ending"
    );
    assert_eq!(delivered, (0..n).collect::<Vec<_>>(), "each once, in order");

    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let id = eventually("intake resumes", async || {
        store.append(&Message::new(body(n)), &t).await.ok()
    })
    .await;
    let _ = id;
    let got = store.read("up", 10).await.unwrap();
    assert_eq!(got.iter().map(index).collect::<Vec<_>>(), [n]);
    // The deferred checkpoints were written: after a restart only the new
    // message is left.
    eventually("checkpoints written", async || {
        (store.queues().await.unwrap()[0].head >= n as u64).then_some(())
    })
    .await;
    drop(store);
    let store = Store::open(&dir, cfg(64 * 1024 * 1024)).unwrap();
    let left = store.read("up", 10_000).await.unwrap();
    assert_eq!(left.iter().map(index).collect::<Vec<_>>(), [n]);
    drop(store);
}

/// Without the floor, the full disk reaches the engine (ENOSPC, the engine
/// poisoned): the store reopens it in place once space returns, with every
/// acknowledged append and nothing that was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_enospc_is_recovered_without_a_restart() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let dir = fs.0.join("store");
    let store = Store::open(&dir, cfg(0)).unwrap();
    let t = [Target::new("up")];
    let mut ok = BTreeSet::new();
    for i in 0..100 {
        store.append(&Message::new(body(i)), &t).await.unwrap();
        ok.insert(i);
    }
    fill(&fs.0.join("filler"));
    let mut refused = BTreeSet::new();
    let mut i = 100;
    while refused.len() < 5 && i < 20_000 {
        match store.append(&Message::new(body(i)), &t).await {
            Ok(_) => {
                ok.insert(i);
            }
            Err(_) => {
                refused.insert(i);
            }
        }
        i += 1;
    }
    assert!(!refused.is_empty(), "the engine never met the full disk");
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let last = i;
    eventually("intake resumes", async || {
        store.append(&Message::new(body(last)), &t).await.ok()
    })
    .await;
    ok.insert(last);
    let mut got = BTreeSet::new();
    loop {
        let b = store.read("up", 500).await.unwrap();
        if b.is_empty() {
            break;
        }
        for m in &b {
            assert!(got.insert(index(m)), "{} read twice", index(m));
        }
    }
    assert_eq!(got, ok, "acknowledged appends lost, or refused ones kept");
    drop(store);
    let store = Store::open(&dir, cfg(0)).unwrap();
    let b = store.read("up", 100_000).await.unwrap();
    assert_eq!(b.iter().map(index).collect::<BTreeSet<_>>(), ok);
}

//! Memory: 1,000,000 messages of 256 B live on disk, not in RAM; peak RSS
//! (VmHWM) must stay under 64 MiB. Runs alone in its own test binary so that
//! VmHWM is this workload's peak. About 25 s in a debug build on 2 cores;
//! `VERGE_RSS_MESSAGES=N` changes the count.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use verge_core::message::Message;
use verge_store::{Store, StoreConfig, Target};

fn vm_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_messages_stay_under_64_mib_rss() {
    let n: u64 = std::env::var("VERGE_RSS_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    const PRODUCERS: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        min_free_bytes: 0,
        default_ttl_secs: None,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let targets = [Target::new("$upstream")];
            for s in 0..n / PRODUCERS {
                let mut body = vec![0u8; 256];
                body[..8].copy_from_slice(&(p * n + s).to_be_bytes());
                store.append(&Message::new(body), &targets).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t0.elapsed();
    let q = store.queues().await.unwrap();
    assert_eq!(q[0].depth, n / PRODUCERS * PRODUCERS);
    // Reading the head still works.
    assert_eq!(store.read("$upstream", 100).await.unwrap().len(), 100);
    let hwm = vm_kb("VmHWM:");
    let rss = vm_kb("VmRSS:");
    let anon = vm_kb("RssAnon:");
    let file = vm_kb("RssFile:");
    eprintln!("RssAnon {anon} kB, RssFile {file} kB");
    eprintln!(
        "{n} x 256 B appended in {elapsed:?}; VmRSS {rss} kB, VmHWM {hwm} kB, disk {} MB",
        store.disk_bytes().unwrap() / 1_000_000
    );
    assert!(hwm < 64 * 1024, "peak RSS {hwm} kB exceeds 64 MiB");
}

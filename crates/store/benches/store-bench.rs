//! Store benchmark: durable append throughput with 1, 4 and 64 concurrent
//! producers (256-byte messages, each awaiting its own durable ack), read+ack
//! throughput, and the physical baseline on the same disk (a raw append-only
//! file with the same group commit: one `fdatasync` per drained batch).
//! Also runs the 1,000,000-message RSS check in a child process.
//!
//! `cargo bench -p verge-store --bench store-bench [-- DIR [SECS]]`
//! (DIR defaults to `target/store-bench`, on the repository's disk; SECS, the
//! time per measurement, to 2; each is repeated 3 times, interleaved).
//! `cargo test --all-targets` also runs this binary, without `--bench`: it
//! then only says how to run it (a benchmark run takes about a minute).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use verge_core::message::Message;
use verge_store::{DEFAULT_PRIORITY, Store, StoreConfig, Target};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Repetitions per measurement.
const REPS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

fn config() -> StoreConfig {
    StoreConfig {
        default_ttl_secs: None,
        min_free_bytes: 0,
        ..StoreConfig::default()
    }
}

fn fresh(dir: &Path, name: &str) -> Result<PathBuf, BoxError> {
    let p = dir.join(name);
    if p.exists() {
        std::fs::remove_dir_all(&p)?;
    }
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Runs `producers` tasks calling `op` in a loop for `secs`; returns msgs/s.
async fn drive<F, Fut>(producers: usize, secs: f64, op: F) -> Result<f64, BoxError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (stop, done, op) = (stop.clone(), done.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = (p as u64) << 32;
            while !stop.load(Ordering::Relaxed) {
                op(i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), BoxError>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

fn body(i: u64) -> Message {
    let mut b = vec![0x5a; 256];
    b[..8].copy_from_slice(&i.to_be_bytes());
    Message::new(b)
}

/// The physical baseline: an append-only file, one writer thread, the same
/// drain-write-fdatasync-reply group commit as the store.
struct RawLog {
    tx: mpsc::Sender<(Bytes, oneshot::Sender<()>)>,
}

impl RawLog {
    fn open(path: &Path) -> Result<Self, BoxError> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, mut rx) = mpsc::channel::<(Bytes, oneshot::Sender<()>)>(4096);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut waiters = vec![first];
                while waiters.len() < 2048 {
                    match rx.try_recv() {
                        Ok(x) => waiters.push(x),
                        Err(_) => break,
                    }
                }
                buf.clear();
                for (b, _) in &waiters {
                    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
                    buf.extend_from_slice(b);
                }
                if file
                    .write_all(&buf)
                    .and_then(|()| file.sync_data())
                    .is_err()
                {
                    return;
                }
                for (_, w) in waiters {
                    let _ = w.send(());
                }
            }
        });
        Ok(Self { tx })
    }

    async fn append(&self, b: Bytes) -> Result<(), BoxError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((b, tx)).await.map_err(|_| "raw log closed")?;
        rx.await.map_err(|_| "raw log failed")?;
        Ok(())
    }
}

fn vm_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Child mode: append 1,000,000 × 256 B with 256 producers, print RSS.
async fn rss(dir: &Path) -> Result<(), BoxError> {
    const N: u64 = 1_000_000;
    const P: u64 = 256;
    let store = Store::open(dir, config())?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..P {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let t = [Target::new("$upstream")];
            for s in 0..N / P {
                store.append(&body(p * N + s), &t).await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let depth = store.queues().await?.first().map_or(0, |q| q.depth);
    let first = store.read("$upstream", 10).await?.len();
    println!(
        "{depth} {secs:.1} {} {} {} {first}",
        vm_kb("VmHWM:"),
        vm_kb("VmRSS:"),
        store.disk_bytes()? / 1_000_000
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("--rss-child") {
        let dir = all.get(1).ok_or("missing dir")?;
        return rss(Path::new(dir)).await;
    }
    // `cargo bench` appends `--bench`; `cargo test` runs bench targets without it.
    if !all.iter().any(|a| a == "--bench") {
        println!("store-bench: run with `cargo bench -p verge-store --bench store-bench`");
        return Ok(());
    }
    let args: Vec<&String> = all.iter().filter(|a| !a.starts_with("--")).collect();
    let root = args
        .first()
        .map_or_else(|| PathBuf::from("target/store-bench"), PathBuf::from);
    let secs: f64 = args.get(1).map_or(Ok(2.0), |s| s.parse())?;
    std::fs::create_dir_all(&root)?;

    println!(
        "| producers | store append msgs/s, median (min–max) | raw file msgs/s, median (min–max) | store / raw |"
    );
    println!("|---:|---:|---:|---:|");
    let mut read_dir = None;
    for producers in [1usize, 4, 64] {
        // Interleave raw and store runs (REPS each, medians reported) so
        // that load from other processes hits both alike.
        let raw_path = fresh(&root, "raw")?.join("log");
        let raw = Arc::new(RawLog::open(&raw_path)?);
        let dir = fresh(&root, &format!("store{producers}"))?;
        let store = Store::open(&dir, config())?;
        let (mut raw_rates, mut store_rates) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let r = raw.clone();
            raw_rates.push(
                drive(producers, secs, move |_| {
                    let r = r.clone();
                    async move { r.append(Bytes::from(vec![0x5a; 256])).await }
                })
                .await?,
            );
            let s = store.clone();
            store_rates.push(
                drive(producers, secs, move |i| {
                    let s = s.clone();
                    async move {
                        s.append(&body(i), &[Target::new("$upstream")]).await?;
                        Ok(())
                    }
                })
                .await?,
            );
        }
        let (raw_rate, store_rate) = (median(&mut raw_rates), median(&mut store_rates));
        println!(
            "| {producers} | {store_rate:.0} ({}) | {raw_rate:.0} ({}) | {:.2} |",
            range(&store_rates),
            range(&raw_rates),
            store_rate / raw_rate
        );
        if producers == 64 {
            read_dir = Some(store);
        } else {
            drop(store);
        }
    }

    // Read + ack: drain the 64-producer backlog in batches of 100.
    if let Some(store) = read_dir {
        let backlog = store.queues().await?.first().map_or(0, |q| q.depth);
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed().as_secs_f64() < secs * 4.0 {
            let batch = store.read("$upstream", 100).await?;
            let Some(last) = batch.last() else { break };
            n += batch.len() as u64;
            store
                .ack("$upstream", DEFAULT_PRIORITY, last.offset)
                .await?;
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        println!();
        println!(
            "read+ack (batches of 100, one durable ack per batch): {rate:.0} msgs/s over {n} of a {backlog}-message backlog"
        );
        // Head read after the acks: a seek, not a tombstone walk.
        store.append(&body(0), &[Target::new("$upstream")]).await?;
        store.rewind("$upstream");
        let t0 = Instant::now();
        let _ = store.read("$upstream", 1).await?;
        println!("head read after {n} acks: {:?}", t0.elapsed());
    }

    // 1M-message RSS check in a fresh process, so VmHWM is its own.
    let dir = fresh(&root, "rss")?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--rss-child")
        .arg(&dir)
        .output()?;
    for d in ["raw", "store1", "store4", "store64", "rss"] {
        let _ = std::fs::remove_dir_all(root.join(d));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    if let [depth, secs, hwm, rss, disk, _] = f.as_slice() {
        println!();
        println!(
            "1M x 256 B: {depth} stored in {secs} s with 256 producers; peak RSS (VmHWM) {:.1} MiB, RSS {:.1} MiB, disk {disk} MB",
            hwm.parse::<f64>().unwrap_or(0.0) / 1024.0,
            rss.parse::<f64>().unwrap_or(0.0) / 1024.0,
        );
        if hwm.parse::<u64>().unwrap_or(u64::MAX) >= 64 * 1024 {
            return Err("1M-message peak RSS is not under 64 MiB".into());
        }
    } else {
        println!(
            "rss child failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

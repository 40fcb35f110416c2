//! Crash safety for real: a child process appends under load and is SIGKILLed
//! at a random-ish moment, five times over the same store. Every append it
//! reported as acknowledged must survive, in order per producer, intact, and
//! so must every checkpoint it reported.
//!
//! The test has its own `main` (`harness = false`): the same binary, run with
//! `--crash-writer`, is the child ([`writer`]).
#![allow(clippy::unwrap_used)]

#[path = "crash/writer.rs"]
mod writer;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use verge_store::{DEFAULT_PRIORITY, Store, StoreConfig};

const PRODUCERS: u32 = 8;
const KEEP: &str = "modules/keep/inputs/in";

fn expected_body(round: u32, p: u32, s: u64) -> Vec<u8> {
    let mut b = format!("r{round}-p{p}-s{s}-").into_bytes();
    let fill = u8::try_from(b.len()).unwrap();
    b.resize(256, fill);
    b
}

/// A cheap pseudo-random delay in [400, 1400) ms.
fn jitter(round: u32) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let x = (u64::from(nanos) ^ (u64::from(round) * 0x9E37_79B9)).wrapping_mul(6364136223846793005);
    Duration::from_millis(400 + (x >> 33) % 1000)
}

/// First argument that makes this binary the writer child.
const WRITER_ARG: &str = "--crash-writer";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.first().map(String::as_str) == Some(WRITER_ARG) {
        if let Err(e) = rt.block_on(writer::run(&args[1..])) {
            eprintln!("crash writer: {e}");
            std::process::exit(1);
        }
        return;
    }
    rt.block_on(sigkill_loses_no_acknowledged_message_or_checkpoint());
    println!("test sigkill_loses_no_acknowledged_message_or_checkpoint ... ok");
}

async fn sigkill_loses_no_acknowledged_message_or_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut total_acked = 0usize;
    for round in 0..5u32 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg(WRITER_ARG)
            .arg(dir.path())
            .arg(round.to_string())
            .arg(PRODUCERS.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(jitter(round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        // What the child promised: the highest acknowledged seq per producer
        // (each producer is sequential) and the last durable checkpoint.
        let mut acked: HashMap<u32, u64> = HashMap::new();
        let mut last_ack: Option<u64> = None;
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["M", r, p, s] => {
                    assert_eq!(r.parse::<u32>().unwrap(), round);
                    let (p, s) = (p.parse().unwrap(), s.parse().unwrap());
                    let e = acked.entry(p).or_insert(0);
                    *e = (*e).max(s);
                    total_acked += 1;
                }
                ["A", off] => last_ack = Some(off.parse().unwrap()),
                ["E", ..] => panic!("child failed: {l}"),
                _ => {} // a line cut by the kill
            }
        }

        // Reopen: no repair step, just open.
        let store = Store::open(
            dir.path(),
            StoreConfig {
                min_free_bytes: 0,
                ..StoreConfig::default()
            },
        )
        .unwrap();
        let all = match store.peek(KEEP, 1, 0, usize::MAX).await {
            Ok(all) => all,
            // Killed before its first append (a loaded machine): the queue
            // was never created, and nothing was acknowledged.
            Err(verge_store::StoreError::UnknownQueue { .. }) if acked.is_empty() => Vec::new(),
            Err(e) => panic!("round {round}: {e}"),
        };
        let mut next: HashMap<u32, u64> = HashMap::new();
        for m in &all {
            let props = &m.message.properties;
            let r: u32 = props.get("r").unwrap().parse().unwrap();
            if r != round {
                continue;
            }
            let p: u32 = props.get("p").unwrap().parse().unwrap();
            let s: u64 = props.get("s").unwrap().parse().unwrap();
            let n = next.entry(p).or_insert(0);
            assert_eq!(s, *n, "round {round} producer {p}: gap or reorder");
            *n += 1;
            assert_eq!(
                m.message.body.as_ref(),
                expected_body(round, p, s),
                "corrupt body"
            );
        }
        for (p, max) in &acked {
            let have = next.get(p).copied().unwrap_or(0);
            assert!(
                have > *max,
                "round {round} producer {p}: acknowledged seq {max} lost (store has {have})"
            );
        }
        // The checkpoint survived: $upstream resumes after the last reported ack.
        let info = store.queues().await.unwrap();
        if let Some(off) = last_ack {
            let up = info
                .iter()
                .find(|q| q.endpoint == "$upstream" && q.priority == DEFAULT_PRIORITY)
                .unwrap();
            assert!(
                up.head > off,
                "round {round}: checkpoint {off} lost (head {})",
                up.head
            );
            let first = store.read("$upstream", 1).await.unwrap();
            if let Some(m) = first.first() {
                assert!(m.offset > off);
            }
        }
        eprintln!(
            "round {round}: {} acknowledged appends, last ack {last_ack:?}, {} kept",
            acked.values().map(|m| m + 1).sum::<u64>(),
            all.len()
        );
        drop(store);
    }
    assert!(total_acked > 0, "the child never acknowledged anything");
}

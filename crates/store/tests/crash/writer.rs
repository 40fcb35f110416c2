//! The crash test's child (the test binary run with `--crash-writer`): appends from several concurrent producers and
//! prints `M <round> <producer> <seq>` only after each append returned `Ok`
//! (i.e. after its fsync), while a consumer reads and acks `$upstream`,
//! printing `A <offset>` after each ack returned. The test SIGKILLs it.
//!
//! Arguments: `DIR ROUND PRODUCERS`.

use std::io::Write;

use verge_core::message::Message;
use verge_store::{DEFAULT_PRIORITY, Store, StoreConfig, Target};

/// The body the test expects for (round, producer, seq): 256 bytes.
fn body(round: u32, p: u32, s: u64) -> Vec<u8> {
    let mut b = format!("r{round}-p{p}-s{s}-").into_bytes();
    let fill = b.len() as u8;
    b.resize(256, fill);
    b
}

fn line(text: String) {
    let mut out = std::io::stdout().lock();
    // The parent may have stopped reading; nothing to do about it.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Runs the writer until killed (or until an append fails).
pub async fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut args = args.iter();
    let dir = args.next().ok_or("missing DIR")?;
    let round: u32 = args.next().ok_or("missing ROUND")?.parse()?;
    let producers: u32 = args.next().ok_or("missing PRODUCERS")?.parse()?;
    // The sync log changes between rounds: the default size, a small one
    // (a new lap every few dozen groups, so kills land around lap ends),
    // and none (groups synced in the engine). Each open must first replay
    // what the previous round's log held.
    let sync_log_bytes = match round % 4 {
        1 => 64 * 1024,
        3 => 0,
        _ => StoreConfig::default().sync_log_bytes,
    };
    let config = StoreConfig {
        min_free_bytes: 0,
        sync_log_bytes,
        ..StoreConfig::default()
    };
    let store = Store::open(dir, config)?;
    let targets = [
        Target::new("modules/keep/inputs/in").priority(1),
        Target::new("$upstream"),
    ];
    let mut tasks = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            for s in 0u64.. {
                let mut m = Message::new(body(round, p, s));
                m.properties.insert("r", round.to_string());
                m.properties.insert("p", p.to_string());
                m.properties.insert("s", s.to_string());
                match store.append(&m, &targets).await {
                    Ok(_) => line(format!("M {round} {p} {s}")),
                    Err(e) => {
                        line(format!("E {e}"));
                        return;
                    }
                }
            }
        }));
    }
    let consumer = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                match store.read("$upstream", 50).await {
                    Ok(batch) => match batch.last() {
                        Some(last) => {
                            let off = last.offset;
                            if store.ack("$upstream", DEFAULT_PRIORITY, off).await.is_ok() {
                                line(format!("A {off}"));
                            }
                        }
                        None => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
                    },
                    Err(e) => {
                        line(format!("E {e}"));
                        return;
                    }
                }
            }
        })
    };
    for t in tasks {
        t.await?;
    }
    consumer.await?;
    Ok(())
}

//! Evaluates the route benchmark's condition (or its 50-route set) N times, for instruction
//! counting under `valgrind --tool=callgrind`, where criterion's timing loop would only add noise.
//!
//! `cargo build -p verge-route --profile bench --example eval_loop`, then
//! `valgrind --tool=callgrind target/release/examples/eval_loop cond 100000`
//! (modes: `cond`, `props`, `set`; N = 0 measures set-up alone, to subtract).

use std::hint::black_box;

use verge_route::{Condition, RouteSet, Scratch};

#[path = "../benches/fixture/mod.rs"]
mod fixture;

use fixture::{CONDITION, PROPERTIES_CONDITION, message, specs};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "cond".to_owned());
    let n: u64 = match args.next().map(|s| s.parse()) {
        None => 100_000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("usage: eval_loop [cond|props|set] [N]: bad N: {e}");
            std::process::exit(2);
        }
    };
    let msg = message();
    let mut scratch = Scratch::new();
    let mut hits = 0u64;
    match mode.as_str() {
        "cond" | "props" => {
            let text = if mode == "cond" {
                CONDITION
            } else {
                PROPERTIES_CONDITION
            };
            let cond = match Condition::parse(text) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("condition does not parse: {e}");
                    std::process::exit(1);
                }
            };
            for _ in 0..n {
                hits += u64::from(cond.matches(black_box(&msg), &mut scratch));
            }
        }
        "set" => {
            let set = match RouteSet::new(&specs()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("routes do not parse: {e}");
                    std::process::exit(1);
                }
            };
            let mut out = Vec::new();
            for _ in 0..n {
                set.evaluate(black_box(&msg), &mut scratch, &mut out);
                hits += out.len() as u64;
            }
        }
        other => {
            eprintln!("usage: eval_loop [cond|props|set] [N]: unknown mode {other}");
            std::process::exit(2);
        }
    }
    println!("{mode} x {n}: {hits} matches");
}

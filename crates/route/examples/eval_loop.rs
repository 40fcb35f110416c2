//! Evaluates the route benchmark's condition (or its 50-route set) N times, for instruction
//! counting under `valgrind --tool=callgrind`, where criterion's timing loop would only add noise.
//!
//! `cargo build -p verge-route --profile bench --example eval_loop`, then
//! `valgrind --tool=callgrind target/release/examples/eval_loop cond 100000`
//! (modes: `cond`, `props`, `set`; N = 0 measures set-up alone, to subtract).

use std::hint::black_box;

use verge_core::manifest::RouteSpec;
use verge_core::message::Message;
use verge_route::{Condition, RouteSet, Scratch};

/// The benchmark's message (`benches/route.rs`): 243-byte JSON telemetry from module `sensor`.
fn message() -> Message {
    let body = r#"{"deviceId":"press-line-4","timestamp":"2026-11-25T06:00:00.000Z","machine":{"temperature":71.25,"pressure":7.5,"rpm":1480,"state":"running"},"ambient":{"temperature":21.4,"humidity":38},"counters":[12,7,3],"tags":{"site":"plant-a","line":4}}"#;
    let mut m = Message::new(body);
    m.system.content_type = Some("application/json".into());
    m.system.content_encoding = Some("utf-8".into());
    m.system.connection_device_id = Some("edge-1".into());
    m.system.connection_module_id = Some("sensor".into());
    m.system.output_name = Some("telemetry".into());
    m.system.message_id = Some("4f7c".into());
    m.properties.insert("temperature", "31.5");
    m.properties.insert("alert", "none");
    m
}

/// The benchmark's 50 routes.
fn specs() -> Vec<RouteSpec> {
    (0..50)
        .map(|i| {
            let route = match i % 5 {
                0 => format!("FROM /messages/modules/sensor/outputs/telemetry WHERE $body.machine.pressure < {i} INTO BrokeredEndpoint(\"/modules/m{i}/inputs/in\")"),
                1 => format!("FROM /messages/modules/other{i}/* INTO BrokeredEndpoint(\"/modules/m{i}/inputs/in\")"),
                2 => format!("FROM /messages/* WHERE alert = 'none' AND $body.ambient.humidity > {i} INTO BrokeredEndpoint(\"/modules/m{i}/inputs/in\")"),
                3 => format!("FROM /messages/modules/sensor/* WHERE as_number(temperature) > {i} INTO BrokeredEndpoint(\"/modules/m{}/inputs/in\")", i % 10),
                _ => "FROM /messages/* WHERE $body.machine.state = 'running' INTO $upstream".to_string(),
            };
            RouteSpec {
                name: format!("r{i:02}"),
                route,
                priority: (i % 10) as u32,
                time_to_live_secs: 0,
            }
        })
        .collect()
}

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
                "$connectionModuleId = 'sensor' AND as_number(temperature) > 30 AND $body.machine.pressure < 10"
            } else {
                "$connectionModuleId = 'sensor' AND alert = 'none'"
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

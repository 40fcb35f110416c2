//! Route evaluation throughput.
//!
//! `cargo bench -p verge-route`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use verge_core::manifest::RouteSpec;
use verge_core::message::Message;
use verge_route::{Condition, RouteSet, Scratch};

/// A ~256-byte JSON telemetry message from module `sensor`.
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

fn condition(c: &mut Criterion) {
    let msg = message();
    // Application properties are strings, so the number comparison goes through as_number().
    let cond = Condition::parse(
        "$connectionModuleId = 'sensor' AND as_number(temperature) > 30 AND $body.machine.pressure < 10",
    )
    .expect("benchmark condition parses");
    let mut scratch = Scratch::new();
    assert!(cond.matches(&msg, &mut scratch));
    let mut g = c.benchmark_group("condition");
    g.throughput(Throughput::Elements(1));
    g.bench_function("module_prop_body", |b| {
        b.iter(|| cond.matches(black_box(&msg), &mut scratch))
    });
    let props =
        Condition::parse("$connectionModuleId = 'sensor' AND alert = 'none'").expect("parses");
    g.bench_function("properties_only", |b| {
        b.iter(|| props.matches(black_box(&msg), &mut scratch))
    });
    g.finish();
}

fn route_set(c: &mut Criterion) {
    let msg = message();
    let specs: Vec<RouteSpec> = (0..50)
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
        .collect();
    let set = RouteSet::new(&specs).expect("benchmark routes parse");
    let mut scratch = Scratch::new();
    let mut out = Vec::new();
    set.evaluate(&msg, &mut scratch, &mut out);
    assert!(!out.is_empty());
    let mut g = c.benchmark_group("route_set");
    g.throughput(Throughput::Elements(1));
    g.bench_function("50_routes", |b| {
        b.iter(|| {
            set.evaluate(black_box(&msg), &mut scratch, &mut out);
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, condition, route_set);
criterion_main!(benches);

//! What the hub's Prometheus series cost per routed message: the counting
//! done on the message path (`received` at ingest, `sent` at delivery),
//! counted and stopped (`MetricsEnabled=false`), to set beside the hub's
//! CPU per routed message from `hub-bench` (BENCHMARKS.md).
//!
//! `cargo bench -p verge-hub --bench metrics`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use verge_core::ClientId;
use verge_hub::metrics::HubMetrics;

fn per_message(c: &mut Criterion) {
    let client: ClientId = "edge1/pub3".parse().expect("client id");
    let mut g = c.benchmark_group("metrics_per_routed_message");
    g.throughput(Throughput::Elements(1));
    for counting in [true, false] {
        let m = HubMetrics::new("hub.example.net", "edge1");
        if !counting {
            m.stop_per_message();
        }
        let name = if counting { "counted" } else { "stopped" };
        g.bench_function(name, |b| {
            b.iter(|| {
                m.received(black_box(&client), Some("out"));
                m.sent(
                    (Some("edge1"), Some("pub3")),
                    Some("out"),
                    black_box("edge1/sink"),
                    "in",
                    0,
                );
            })
        });
    }
    g.finish();
}

criterion_group!(benches, per_message);
criterion_main!(benches);

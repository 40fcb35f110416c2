//! Route evaluation throughput.
//!
//! `cargo bench -p verge-route`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use verge_route::{Condition, RouteSet, Scratch};

mod fixture;

use fixture::{CONDITION, PROPERTIES_CONDITION, message, specs};

fn condition(c: &mut Criterion) {
    let msg = message();
    let cond = Condition::parse(CONDITION).expect("benchmark condition parses");
    let mut scratch = Scratch::new();
    assert!(cond.matches(&msg, &mut scratch));
    let mut g = c.benchmark_group("condition");
    g.throughput(Throughput::Elements(1));
    g.bench_function("module_prop_body", |b| {
        b.iter(|| cond.matches(black_box(&msg), &mut scratch))
    });
    let props = Condition::parse(PROPERTIES_CONDITION).expect("parses");
    g.bench_function("properties_only", |b| {
        b.iter(|| props.matches(black_box(&msg), &mut scratch))
    });
    g.finish();
}

fn route_set(c: &mut Criterion) {
    let msg = message();
    let specs = specs();
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

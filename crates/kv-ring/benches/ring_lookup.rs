//! Lookup cost of a preference list (N = 3) on rings of 3, 10 and 100 nodes at the default
//! vnode count. Run: `cargo bench -p kv-ring --bench ring_lookup`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kv_ring::{Ring, DEFAULT_VNODES};

fn lookup(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user/{i}/profile")).collect();
    let mut group = c.benchmark_group("preference_list_n3");
    for nodes in [3usize, 10, 100] {
        let urls = (1..=nodes).map(|i| format!("http://10.0.0.{i}:8000"));
        let ring = Ring::new(urls, DEFAULT_VNODES);
        group.bench_with_input(BenchmarkId::from_parameter(nodes), &ring, |b, ring| {
            let mut next = keys.iter().cycle();
            b.iter(|| {
                let key = next.next().map_or("", String::as_str);
                black_box(ring.preference_list(black_box(key), 3))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);

//! Mappings per second for 1,000 OSDs (100 hosts × 10) × 3 replicas.
//! Run: `cargo bench -p basalt-placement` (plain harness, std::time; not part of `cargo test`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use basalt_placement::{map_pg, AllUp, CrushMap, PgId, PoolPlacement, DEFAULT_RULE, WEIGHT_ONE};

/// `mixed`: OSD weights 1.0–2.75 (unequal hosts too), which exercises straw2's general path
/// (table + 128-bit multiply) instead of the equal-weight fast path.
fn build(mixed: bool) -> CrushMap {
    let mut m = CrushMap::new();
    for h in 0..100u32 {
        for d in 0..10u32 {
            let w = if mixed {
                WEIGHT_ONE + WEIGHT_ONE / 4 * ((h * 10 + d) % 8)
            } else {
                WEIGHT_ONE
            };
            m.add_osd(h * 10 + d, &format!("host{h}"), w)
                .expect("add osd");
        }
    }
    m
}

/// Runs `f` over consecutive inputs in batches until `budget` elapses; returns calls/s.
fn rate(budget: Duration, mut f: impl FnMut(u32)) -> f64 {
    // Warm-up: builds the ln table, faults in the bucket arrays.
    for i in 0..10_000 {
        f(i);
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut x: u32 = 0;
    while start.elapsed() < budget {
        for _ in 0..10_000 {
            f(x);
            x = x.wrapping_add(1);
        }
        n += 10_000;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let budget = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let crush = build(false);
    let mixed = build(true);
    let pool = PoolPlacement {
        id: 1,
        pg_num: 1 << 20,
        pgp_num: 1 << 20,
        size: 3,
        rule: DEFAULT_RULE,
    };
    println!(
        "placement bench: 1000 OSDs (100 hosts x 10), size 3, straw2, rule chooseleaf firstn host"
    );
    for round in 1..=3 {
        let mut out = Vec::with_capacity(3);
        let raw = rate(budget, |x| {
            crush
                .do_rule(DEFAULT_RULE, black_box(x), 3, &AllUp, &mut out)
                .expect("map");
            black_box(&out);
        });
        let full = rate(budget, |x| {
            let pg = PgId {
                pool: 1,
                seed: x & (pool.pg_num - 1),
            };
            black_box(map_pg(&crush, &pool, pg, &AllUp, None).expect("map"));
        });
        let mixed_raw = rate(budget, |x| {
            mixed
                .do_rule(DEFAULT_RULE, black_box(x), 3, &AllUp, &mut out)
                .expect("map");
            black_box(&out);
        });
        println!(
            "round {round}: do_rule {raw:>9.0}/s ({:.0} ns) | map_pg {full:>9.0}/s ({:.0} ns) | do_rule mixed weights {mixed_raw:>9.0}/s ({:.0} ns)",
            1e9 / raw,
            1e9 / full,
            1e9 / mixed_raw,
        );
    }
}

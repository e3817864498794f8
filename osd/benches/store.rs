//! Object store benchmark (on-disk store in a temp dir, sync=true, through the async API).
//!
//! - 4 KiB random overwrites into existing 4 MiB objects, each op a realistic PG transaction
//!   (data + onode + a 128-byte PG log entry), at concurrency 1 and 32 (one object set per task,
//!   honouring the per-object ordering contract): ops/s, p50/p99/max latency; for QD32 also the
//!   bytes written to the disk per op (`/sys/block/*/stat`, counted until the store is closed
//!   and the page cache written back, so checkpoints, RocksDB flushes and compactions are
//!   included; anything else writing meanwhile is counted too, so run it on a quiet machine).
//! - 4 KiB random reads of that (cached) data at concurrency 1 and 32.
//! - 1 MiB sequential writes into fresh 4 MiB objects at concurrency 1 and 4: MiB/s (at most
//!   10 s each: every write takes new space).
//!
//! Run: `CARGO_TARGET_DIR=$HOME/.cache/basalt-target cargo test --release --locked --workspace
//! --bench store` (release profile on purpose: `cargo bench` uses the bench profile, which
//! would recompile RocksDB). `BENCH_SECS=N` per measurement, default 5; `BENCH_DIR` for the
//! temp dir's parent; `BENCH_MODES=disk,memory` picks the on-disk store or the in-memory one
//! (the store layer's CPU cost alone); `BENCH_NOSYNC=1` for comparisons. Plain `cargo test`
//! does not run it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_osd::store::*;
use basalt_placement::PgId;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const PG: PgId = PgId { pool: 1, seed: 0 };
const OBJ_SIZE: u64 = 4 << 20;
const NOBJ: u64 = 64;

struct Result {
    ops: u64,
    elapsed: Duration,
    lat: Vec<Duration>,
}

impl Result {
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.lat.clone();
        l.sort();
        l[((l.len() as f64 - 1.0) * p) as usize]
    }
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Runs `tasks` concurrent loops of `op(task, i)` for `secs`.
async fn drive<F, Fut>(tasks: u64, secs: f64, op: F) -> Result
where
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                op(t, i).await;
                lat.push(t0.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    Result {
        ops: lat.len() as u64,
        elapsed: start.elapsed(),
        lat,
    }
}

fn obj(name: String) -> ObjectId {
    ObjectId::new(PG, name)
}

/// Random buffers made up front so the measured loop does not include generating data.
fn buffers(n: usize, len: usize) -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..n)
            .map(|i| {
                let mut v = vec![0u8; len];
                StdRng::seed_from_u64(i as u64).fill_bytes(&mut v);
                Bytes::from(v)
            })
            .collect(),
    )
}

async fn randwrite(store: &Store, qd: u64, secs: f64, version: Arc<AtomicU64>) -> Result {
    let s = store.clone();
    let bufs = buffers(1024, 4096);
    drive(qd, secs, move |task, i| {
        let s = s.clone();
        let version = version.clone();
        let bufs = bufs.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(task << 32 | i);
            // Task t owns objects t, t+qd, t+2qd, ...: no two tasks touch one object at once.
            let n = (NOBJ - task).div_ceil(qd);
            let o = obj(format!("rbd_data.{}", task + qd * rng.random_range(0..n)));
            let off = rng.random_range(0..OBJ_SIZE / 4096) * 4096;
            let data = bufs[rng.random_range(0..bufs.len())].clone();
            let v = version.fetch_add(1, Ordering::Relaxed);
            let mut t = Transaction::new();
            t.write(&o, off, data)
                .set_meta(
                    &o,
                    ObjectMeta {
                        version: v.to_be_bytes().to_vec().into(),
                        user_version: v,
                        mtime_ns: v,
                    },
                )
                .pg_log_append(PG, v, vec![0xAB; 128]);
            s.submit(t).await.unwrap();
        }
    })
    .await
}

async fn randread(store: &Store, qd: u64, secs: f64) -> Result {
    let s = store.clone();
    drive(qd, secs, move |task, i| {
        let s = s.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(task << 32 | i);
            let o = obj(format!("rbd_data.{}", rng.random_range(0..NOBJ)));
            let off = rng.random_range(0..OBJ_SIZE / 4096) * 4096;
            let got = if s.is_in_memory() {
                s.read(&o, off, 4096)
            } else {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.read(&o, off, 4096))
                    .await
                    .unwrap()
            };
            assert_eq!(got.unwrap().len(), 4096);
        }
    })
    .await
}

/// Bytes written to the machine's disks so far (`/sys/block/*/stat`, sectors written), so
/// writeback, RocksDB's flushes and compactions are all counted, whoever issued them.
fn disk_write_bytes() -> u64 {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram")
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| s.split_whitespace().nth(6)?.parse::<u64>().ok())
        .sum::<u64>()
        * 512
}

async fn seqwrite(store: &Store, qd: u64, secs: f64, run: u64) -> Result {
    let s = store.clone();
    let bufs = buffers(16, 1 << 20);
    drive(qd, secs, move |task, i| {
        let s = s.clone();
        let bufs = bufs.clone();
        async move {
            let o = obj(format!("seq.{run}.{task}.{}", i / 4));
            let data = bufs[(i % 16) as usize].clone();
            let mut t = Transaction::new();
            t.write(&o, (i % 4) << 20, data);
            s.submit(t).await.unwrap();
        }
    })
    .await
}

fn row(mode: &str, what: &str, r: &Result, bytes_per_op: f64) {
    println!(
        "| {mode} | {what} | {:.0} | {:.1} | {} | {} | {} |",
        r.ops_per_sec(),
        r.ops_per_sec() * bytes_per_op / (1 << 20) as f64,
        ms(r.pct(0.5)),
        ms(r.pct(0.99)),
        // A checkpoint that stalls the committer shows here, not at p99.
        ms(r.pct(1.0))
    );
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "disk".into());
    let parent =
        std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .unwrap();
    println!("| store | workload | ops/s | MiB/s | p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for mode in modes.split(',') {
        let cfg = StoreConfig {
            sync: std::env::var("BENCH_NOSYNC").is_err(),
            ..StoreConfig::default()
        };
        let dir = tempfile::tempdir_in(&parent).unwrap();
        let open = || match mode {
            "memory" => Store::in_memory(cfg.clone()).unwrap(),
            "disk" => Store::open(dir.path(), cfg.clone()).unwrap(),
            other => panic!("unknown mode {other} (disk, memory)"),
        };
        let mut store = if mode == "memory" {
            open()
        } else {
            Store::mkfs(dir.path(), Superblock::new("bench", "bench"), cfg.clone()).unwrap()
        };
        rt.block_on(async {
            let mut t = Transaction::new();
            t.pg_create(PG);
            store.submit(t).await.unwrap();
            let fill = Instant::now();
            for i in 0..NOBJ {
                let mut data = vec![0u8; OBJ_SIZE as usize];
                StdRng::seed_from_u64(i).fill_bytes(&mut data);
                let mut t = Transaction::new();
                t.write_full(&obj(format!("rbd_data.{i}")), data);
                store.submit(t).await.unwrap();
            }
            eprintln!(
                "[{mode}] prefilled {} MiB in {:.1} s",
                (NOBJ * OBJ_SIZE) >> 20,
                fill.elapsed().as_secs_f64()
            );
        });
        if mode != "memory" {
            // Reopen so the prefill's checkpoint is behind us.
            drop(store);
            store = open();
        }
        let version = Arc::new(AtomicU64::new(1));
        let r = rt.block_on(randwrite(&store, 1, secs, version.clone()));
        row(mode, "4 KiB rand overwrite QD1", &r, 4096.0);
        let before = disk_write_bytes();
        let r = rt.block_on(randwrite(&store, 32, secs, version.clone()));
        row(mode, "4 KiB rand overwrite QD32", &r, 4096.0);
        if mode != "memory" {
            drop(store);
            // SAFETY: sync(2) has no preconditions; it flushes every dirty page to disk.
            unsafe { libc::sync() };
            let written = disk_write_bytes() - before;
            println!(
                "| {mode} | bytes written per 4 KiB overwrite (QD32, incl. checkpoint) | {:.0} | {:.2}× | | | |",
                written as f64 / r.ops as f64,
                written as f64 / r.ops as f64 / 4096.0
            );
            store = open();
        }
        for qd in [1, 32] {
            let r = rt.block_on(randread(&store, qd, secs));
            row(mode, &format!("4 KiB rand read QD{qd}"), &r, 4096.0);
        }
        for (run, qd) in [1u64, 4].into_iter().enumerate() {
            let r = rt.block_on(seqwrite(&store, qd, secs.min(10.0), run as u64));
            row(
                mode,
                &format!("1 MiB seq write QD{qd}"),
                &r,
                (1 << 20) as f64,
            );
        }
        eprintln!("[{mode}] stats: {:?}", store.stats());
    }
}

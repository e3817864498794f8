//! `basalt bench write|read|rand|cleanup`: a `rados bench`-like load generator.
//!
//! `write` writes whole objects `bench_<client>_<n>` of the block size from `--threads`
//! concurrent workers for `--seconds` (or until `--objects` were written), then removes them
//! unless `--no-cleanup`. A kept run is recorded in the object `bench_last_metadata`, which
//! `read` (each object once, in order) and `rand` (random objects until time is up) use to find
//! it; `cleanup` removes every `bench_*` object. A progress line goes to stderr once a second;
//! the summary (ops, IOPS, MiB/s, latency percentiles from the sorted per-op latencies) goes to
//! stdout, as JSON with `--format json`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use basalt_client::{ClientError, IoCtx, Rados};
use basalt_config::ClusterConfig;
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Where a kept `write` run is recorded for `read`/`rand`.
const METADATA: &str = "bench_last_metadata";
const PREFIX: &str = "bench_";
/// Largest block a bench op may carry (well under the OSD message limit).
const MAX_BLOCK: u64 = 64 << 20;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Write whole objects of --block-size for --seconds.
    Write {
        #[command(flatten)]
        opts: BenchOpts,
        /// Keep the objects (for a later `bench read`/`rand`); default is to remove them.
        #[arg(long)]
        no_cleanup: bool,
    },
    /// Read the objects a `write --no-cleanup` left, each once, in order.
    Read {
        #[command(flatten)]
        opts: BenchOpts,
    },
    /// Read random objects of a `write --no-cleanup` run until --seconds are up.
    Rand {
        #[command(flatten)]
        opts: BenchOpts,
    },
    /// Remove every bench object (`bench_*`) from the pool.
    Cleanup {
        #[arg(long, default_value = "rbd")]
        pool: String,
    },
}

#[derive(Args, Debug)]
pub struct BenchOpts {
    #[arg(long, default_value = "rbd")]
    pool: String,
    /// Bytes per op: 4M, 64K, or bytes (write only; reads use the written objects' size).
    #[arg(long, default_value = "4M")]
    block_size: String,
    /// Ops in flight at once.
    #[arg(long, default_value_t = 16)]
    threads: u32,
    /// How long to run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Write at most N objects / read only the first N objects of the kept run.
    #[arg(long)]
    objects: Option<u64>,
}

/// What `write --no-cleanup` leaves for the readers.
#[derive(Serialize, Deserialize, Debug)]
struct RunMetadata {
    prefix: String,
    objects: u64,
    block_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Write,
    Seq,
    Rand,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Seq => "read",
            Mode::Rand => "rand",
        }
    }
}

/// The deterministic contents of every bench object of `len` bytes (not zeros: the store keeps
/// zero chunks as holes, which would flatter the numbers).
fn pattern(len: usize) -> Bytes {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// Shared counters of a run.
struct Stats {
    ops: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
    latencies_us: Mutex<Vec<u64>>,
}

fn check_opts(o: &BenchOpts) -> anyhow::Result<u64> {
    let block = crate::rbd::parse_size("block size", &o.block_size)?;
    if block == 0 || block > MAX_BLOCK {
        bail!(
            "bad block size {block}: it must be between 1 byte and {} MiB",
            MAX_BLOCK >> 20
        );
    }
    if o.threads == 0 || o.threads > 1024 {
        bail!("--threads must be between 1 and 1024");
    }
    if o.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if o.objects == Some(0) {
        bail!("--objects must be at least 1");
    }
    Ok(block)
}

pub async fn run(config: ClusterConfig, json: bool, cmd: BenchCmd) -> anyhow::Result<()> {
    let (mode, opts, cleanup) = match cmd {
        BenchCmd::Cleanup { pool } => {
            let rados = Rados::connect(config).await?;
            let io = rados.ioctx(&pool)?;
            let n = remove_all(&io).await?;
            if json {
                crate::print_json(json!({ "pool": pool, "removed": n }));
            } else {
                eprintln!("removed {n} bench objects from pool {pool}");
            }
            return Ok(());
        }
        BenchCmd::Write { opts, no_cleanup } => (Mode::Write, opts, !no_cleanup),
        BenchCmd::Read { opts } => (Mode::Seq, opts, false),
        BenchCmd::Rand { opts } => (Mode::Rand, opts, false),
    };
    let block = check_opts(&opts)?;
    let rados = Rados::connect(config).await?;
    let io = rados.ioctx(&opts.pool)?;

    let (prefix, count, block) = match mode {
        Mode::Write => {
            // The pid too: runs sharing a `[client] name` must not write each other's objects.
            let client = rados.entity().trim_start_matches("client.").to_string();
            let pid = std::process::id();
            (format!("{PREFIX}{client}_{pid}_"), opts.objects, block)
        }
        Mode::Seq | Mode::Rand => {
            let meta = read_metadata(&io).await?;
            let n = opts.objects.map_or(meta.objects, |n| n.min(meta.objects));
            (meta.prefix, Some(n), meta.block_size)
        }
    };
    let data = pattern(block as usize);
    let stats = Arc::new(Stats {
        ops: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies_us: Mutex::new(Vec::new()),
    });
    let next = Arc::new(AtomicU64::new(0));
    let limit = Duration::from_secs(opts.seconds);
    let start = Instant::now();

    let ticker = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last_ops = 0;
            let mut header = true;
            loop {
                tick.tick().await;
                if std::mem::take(&mut header) {
                    eprintln!(
                        "{:>5} {:>10} {:>10} {:>10} {:>10}",
                        "sec", "ops", "cur ops", "avg MiB/s", "cur MiB/s"
                    );
                }
                let ops = stats.ops.load(Ordering::Relaxed);
                let bytes = stats.bytes.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64();
                let cur = ops - last_ops;
                last_ops = ops;
                eprintln!(
                    "{:>5} {:>10} {:>10} {:>10.2} {:>10.2}",
                    secs.round() as u64,
                    ops,
                    cur,
                    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
                    (cur * block) as f64 / (1 << 20) as f64
                );
            }
        })
    };

    let mut workers = tokio::task::JoinSet::new();
    for w in 0..opts.threads {
        let (io, stats, next, data, prefix) = (
            io.clone(),
            stats.clone(),
            next.clone(),
            data.clone(),
            prefix.clone(),
        );
        workers.spawn(async move {
            let mut rng = rand_state(w);
            let mut lat = Vec::new();
            let r = worker(
                mode, &io, &stats, &next, &data, &prefix, count, limit, start, &mut rng, &mut lat,
            )
            .await;
            stats
                .latencies_us
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(lat);
            if r.is_err() {
                stats.stop.store(true, Ordering::Relaxed);
            }
            r
        });
    }
    let mut first_err = None;
    while let Some(r) = workers.join_next().await {
        let r = r
            .map_err(|e| anyhow::anyhow!("a bench worker failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    let elapsed = start.elapsed();
    ticker.abort();
    // Objects written are 0..n (each worker takes the next number before writing it).
    let written = next.load(Ordering::Relaxed).min(count.unwrap_or(u64::MAX));
    if let Some(e) = first_err {
        if mode == Mode::Write {
            // Do not leave a half run behind.
            let _ = remove_objects(&io, &prefix, written, opts.threads).await;
        }
        return Err(e);
    }

    let ops = stats.ops.load(Ordering::Relaxed);
    let bytes = stats.bytes.load(Ordering::Relaxed);
    let mut lat =
        std::mem::take(&mut *stats.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ms = |us: u64| us as f64 / 1000.0;
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
        ms(lat[rank - 1])
    };
    let avg = if lat.is_empty() {
        0.0
    } else {
        ms(lat.iter().sum::<u64>()) / lat.len() as f64
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    let (min, max) = (
        lat.first().copied().map_or(0.0, ms),
        lat.last().copied().map_or(0.0, ms),
    );
    let iops = ops as f64 / secs;
    let mib_s = bytes as f64 / (1 << 20) as f64 / secs;

    let mut cleaned = false;
    if mode == Mode::Write {
        if cleanup {
            remove_objects(&io, &prefix, written, opts.threads).await?;
            // A run kept earlier is gone now only if it was this one; leave its metadata alone.
            cleaned = true;
        } else {
            let meta = RunMetadata {
                prefix: prefix.clone(),
                objects: written,
                block_size: block,
            };
            let payload = serde_json::to_vec(&meta).context("encoding the run metadata")?;
            io.write_full(METADATA, Bytes::from(payload)).await?;
        }
    }

    if json {
        crate::print_json(json!({
            "mode": mode.name(), "pool": opts.pool, "block_size": block, "threads": opts.threads,
            "seconds": secs, "ops": ops, "bytes": bytes, "iops": iops, "mib_per_sec": mib_s,
            "latency_ms": { "avg": avg, "min": min, "p50": p50, "p99": p99, "max": max },
            "objects": if mode == Mode::Write { written } else { count.unwrap_or(0) },
            "cleaned_up": cleaned,
        }));
    } else {
        let verb = if mode == Mode::Write {
            "writes"
        } else {
            "reads"
        };
        println!("Total time run:         {secs:.3} s");
        println!("Total {verb} made:      {ops}");
        println!("Block size:             {block}");
        println!("Threads:                {}", opts.threads);
        println!("Bandwidth (MiB/sec):    {mib_s:.3}");
        println!("Average IOPS:           {iops:.1}");
        println!("Average latency (ms):   {avg:.3}");
        println!("Latency p50 (ms):       {p50:.3}");
        println!("Latency p99 (ms):       {p99:.3}");
        println!("Max latency (ms):       {max:.3}");
        println!("Min latency (ms):       {min:.3}");
        if mode == Mode::Write {
            if cleaned {
                println!("Cleaned up {written} objects");
            } else {
                println!("Kept {written} objects for bench read/rand (bench cleanup removes them)");
            }
        }
    }
    Ok(())
}

fn rand_state(worker: u32) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ (u64::from(worker) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    mode: Mode,
    io: &IoCtx,
    stats: &Stats,
    next: &AtomicU64,
    data: &Bytes,
    prefix: &str,
    count: Option<u64>,
    limit: Duration,
    start: Instant,
    rng: &mut u64,
    lat: &mut Vec<u64>,
) -> anyhow::Result<()> {
    let block = data.len() as u64;
    loop {
        if stats.stop.load(Ordering::Relaxed) || start.elapsed() >= limit {
            return Ok(());
        }
        let n = match mode {
            Mode::Write | Mode::Seq => {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| n >= c) {
                    return Ok(());
                }
                n
            }
            Mode::Rand => match count {
                Some(c) if c > 0 => next_rand(rng) % c,
                _ => return Ok(()),
            },
        };
        let oid = format!("{prefix}{n}");
        let t0 = Instant::now();
        match mode {
            Mode::Write => io.write_full(&oid, data.clone()).await?,
            Mode::Seq | Mode::Rand => {
                let got = io.read(&oid, 0, block).await.map_err(|e| match e {
                    ClientError::NotFound(_) => anyhow::anyhow!(
                        "bench object {oid} is missing; run `basalt bench write --no-cleanup` again"
                    ),
                    e => e.into(),
                })?;
                if got != *data {
                    bail!("bench object {oid} holds other bytes than the bench wrote ({} bytes read, {block} expected)", got.len());
                }
            }
        }
        lat.push(t0.elapsed().as_micros() as u64);
        stats.ops.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(block, Ordering::Relaxed);
    }
}

async fn read_metadata(io: &IoCtx) -> anyhow::Result<RunMetadata> {
    let pool = io.pool_name().to_string();
    let none = || {
        anyhow::anyhow!(
            "no bench objects in pool {pool}: run `basalt bench write --pool {pool} --no-cleanup` first"
        )
    };
    let raw = match io.read(METADATA, 0, 64 * 1024).await {
        Ok(b) => b,
        Err(ClientError::NotFound(_)) => return Err(none()),
        Err(e) => return Err(e.into()),
    };
    let meta: RunMetadata = serde_json::from_slice(&raw)
        .with_context(|| format!("{pool}/{METADATA} is not bench metadata; `basalt bench cleanup --pool {pool}` removes it"))?;
    if meta.objects == 0 {
        return Err(none());
    }
    Ok(meta)
}

/// Removes objects `prefix0 .. prefix<n-1>`, `threads` at a time; missing ones are fine.
async fn remove_objects(io: &IoCtx, prefix: &str, n: u64, threads: u32) -> anyhow::Result<()> {
    futures::stream::iter((0..n).map(|i| {
        let oid = format!("{prefix}{i}");
        async move {
            match io.remove(&oid).await {
                Ok(()) | Err(ClientError::NotFound(_)) => Ok(()),
                Err(e) => Err(anyhow::Error::new(e).context(format!("removing {oid}"))),
            }
        }
    }))
    .buffer_unordered(threads.max(1) as usize)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

/// Removes every `bench_*` object of the pool; returns how many.
async fn remove_all(io: &IoCtx) -> anyhow::Result<u64> {
    let names: Vec<String> = io
        .list_objects()
        .await?
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    let n = names.len() as u64;
    futures::stream::iter(names.into_iter().map(|oid| async move {
        match io.remove(&oid).await {
            Ok(()) | Err(ClientError::NotFound(_)) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("removing {oid}"))),
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(n)
}

//! One failure never reaches the VM (issue 18): a block client writing through the real NBD
//! gateway sees daemons die, freeze and return as pauses, never as I/O errors.
//!
//! - `faults_never_reach_the_block_client`: fio writes 4 KiB blocks with crc32c verify through
//!   the gateway, pass after pass, while a seeded schedule SIGKILLs and restarts OSDs,
//!   SIGSTOPs and resumes them, and SIGKILLs and restarts the monitor leader, one fault at a
//!   time. It passes only with zero I/O errors, zero verify failures and every PG
//!   active+clean after the faults stop. `FAULT_SEED=N` replays a schedule (the test prints
//!   its seed); `FAULT_COUNT=N` sets how many faults (default 6, every kind twice). The
//!   cluster runs with the default timeouts (no op timeout, 1 s heartbeats, 6 s grace), and
//!   the test prints per fault kind the longest write stall fio saw (p50 and max over the
//!   faults of that kind), which BENCHMARKS.md records.
//! - `qemu_io_rides_out_a_gateway_restart`: qemu-io with `reconnect-delay` keeps its I/O
//!   through a gateway SIGKILL and restart on the same address.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_config::Timeouts;
use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{require_tool, run_bounded, test_timeouts, wait_for, DataCluster};

/// xorshift64*: the whole schedule comes from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration in `[lo, hi]` ms.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    /// SIGKILL an OSD, start it again after the hold.
    OsdKill,
    /// SIGSTOP an OSD, SIGCONT it after the hold.
    OsdStop,
    /// SIGKILL the monitor leader, start it again after the hold.
    MonKill,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::OsdKill => "OSD SIGKILL + restart",
            FaultKind::OsdStop => "OSD SIGSTOP + SIGCONT",
            FaultKind::MonKill => "monitor leader SIGKILL + restart",
        }
    }
}

#[derive(Debug)]
struct Fault {
    kind: FaultKind,
    /// Harness index of the OSD, or the monitor rank.
    target: usize,
    hold: Duration,
    /// Quiet time after the cluster is clean again, before the next fault.
    gap: Duration,
}

/// `count` faults, every kind in turn in a seeded order, with seeded targets and times.
fn schedule(seed: u64, count: usize) -> Vec<Fault> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut kinds = Vec::new();
    while kinds.len() < count {
        let mut round = vec![FaultKind::OsdKill, FaultKind::OsdStop, FaultKind::MonKill];
        for i in (1..round.len()).rev() {
            round.swap(i, rng.below(i as u64 + 1) as usize);
        }
        kinds.extend(round);
    }
    kinds.truncate(count);
    kinds
        .into_iter()
        .map(|kind| Fault {
            kind,
            target: match kind {
                FaultKind::OsdKill | FaultKind::OsdStop => rng.below(6) as usize,
                // Lower ranks lead: rank 0 is the leader whenever it is up.
                FaultKind::MonKill => 0,
            },
            hold: match kind {
                // Shorter and longer than the 6 s heartbeat grace: a pause, or a mark-down.
                FaultKind::OsdStop => rng.ms(3_000, 10_000),
                _ => rng.ms(3_000, 8_000),
            },
            gap: rng.ms(2_000, 5_000),
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One fio pass: random 4 KiB writes over `size` with crc32c verify (every 256 writes are read
/// back and checked, so writes go on throughout), its latency log (unix-ms timestamps) under
/// `log_prefix`. Returns (success, output).
fn fio_pass(url: &str, size: &str, log_prefix: &Path, seed: u64) -> (bool, String) {
    let out = run_bounded(
        basalt_tests::fio_verify_command("faults", url, size, seed)
            .args([
                &format!("--write_lat_log={}", log_prefix.display()),
                "--log_unix_epoch=1",
            ])
            .current_dir(log_prefix.parent().unwrap_or(Path::new("."))),
        Duration::from_secs(600),
    );
    let text = basalt_tests::output_text(&out);
    (out.status.success(), text)
}

/// One completed I/O from a fio `_lat` log.
struct Completion {
    /// Unix ms at completion.
    at: u64,
    latency: Duration,
    write: bool,
}

fn completions(log: &Path) -> Vec<Completion> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(Completion {
                at: f.first()?.parse().ok()?,
                latency: Duration::from_nanos(f.get(1)?.parse().ok()?),
                write: *f.get(2)? == "1",
            })
        })
        .collect()
}

/// A whole number from environment variable `name`, if set; a bad value fails the test.
fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a whole number"),
    }
}

/// Nearest-rank percentile of a sorted list.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[test]
fn faults_never_reach_the_block_client() {
    require_tool("fio", "fio");
    let seed = env_number("FAULT_SEED").unwrap_or_else(|| unix_ms() % 1_000_000);
    let count = env_number("FAULT_COUNT").unwrap_or(6) as usize;
    let plan = schedule(seed, count);
    eprintln!("FAULT_SEED={seed} FAULT_COUNT={count}: {plan:?}");

    // The defaults a deployment gets: no op timeout, fast failure detection.
    let timeouts = Timeouts::default();
    let grace = Duration::from_millis(timeouts.osd_heartbeat_grace_ms);
    let mut d = DataCluster::start(timeouts, "rbd").expect("cluster with pool rbd");
    assert_eq!(
        d.rados.op_timeout(),
        None,
        "block clients wait, never time out"
    );
    let backend = Arc::new(RadosBackend::new(
        d.rados.clone(),
        d.io.clone(),
        Duration::from_secs(30),
    ));
    let rbd = Rbd::new(backend);
    // 1 MiB objects: fio's 16 MiB spread over 16 objects, so most PGs (and every OSD) carry
    // some of the I/O and every fault lands on its path.
    d.rt.block_on(rbd.create("vm", 64 << 20, 20))
        .expect("create image");
    let gw = d.cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", d.cluster.gateway_addr(gw));

    // fio passes until the faults are over (and one more, on a healthy cluster).
    let logs = d.cluster.dir.path().join("fio");
    std::fs::create_dir_all(&logs).expect("fio log dir");
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<Vec<(usize, bool, String)>>();
    let fio = {
        let stop = stop.clone();
        let logs = logs.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let mut pass = 0usize;
            loop {
                let last = stop.load(Ordering::SeqCst);
                let (ok, text) = fio_pass(
                    &url,
                    "16M",
                    &logs.join(format!("pass{pass}")),
                    pass as u64 + 1,
                );
                let failed = !ok;
                results.push((pass, ok, text));
                pass += 1;
                if last || failed {
                    break;
                }
            }
            let _ = done_tx.send(results);
        })
    };

    let settle = |d: &DataCluster| {
        d.wait_active_clean(Duration::from_secs(180))
            .expect("every PG active+clean after the fault");
    };
    // (fault, its start unix ms, window end unix ms)
    let mut windows: Vec<(&Fault, u64, u64)> = Vec::new();
    // A little healthy I/O first, for a baseline.
    std::thread::sleep(Duration::from_secs(3));
    let baseline_end = unix_ms();
    for (i, f) in plan.iter().enumerate() {
        let start = unix_ms();
        eprintln!("fault {i}: {:?} on {} for {:?}", f.kind, f.target, f.hold);
        match f.kind {
            FaultKind::OsdKill => {
                d.cluster.kill_osd(f.target);
                std::thread::sleep(f.hold);
                d.cluster.restart_osd(f.target).expect("restart OSD");
            }
            FaultKind::OsdStop => {
                d.cluster.pause_osd(f.target, true);
                std::thread::sleep(f.hold);
                d.cluster.pause_osd(f.target, false);
            }
            FaultKind::MonKill => {
                d.cluster.kill_mon(f.target as u32);
                std::thread::sleep(f.hold);
                d.cluster
                    .start_mon(f.target as u32)
                    .expect("restart monitor");
            }
        }
        // One fault at a time: the next waits until this one is fully healed.
        wait_for("all 6 OSDs up", Duration::from_secs(120), || {
            let m = d.rt.block_on(d.rados.mon().osdmap()).ok()?;
            m.osds.values().all(|o| o.up).then_some(())
        })
        .expect("OSDs up again");
        settle(&d);
        assert!(
            fio_running(&done_rx),
            "fio stopped early; see its output below"
        );
        std::thread::sleep(f.gap);
        windows.push((f, start, unix_ms()));
    }
    stop.store(true, Ordering::SeqCst);
    let results = match done_rx.recv_timeout(Duration::from_secs(900)) {
        Ok(r) => r,
        Err(e) => panic!("fio did not finish: {e}"),
    };
    let _ = fio.join();
    settle(&d);

    for (pass, ok, text) in &results {
        assert!(
            *ok && !text.contains("verify: bad") && !text.contains("Input/output error"),
            "fio pass {pass} saw an error (FAULT_SEED={seed}):\n{text}\n--- gateway log ---\n{}",
            d.cluster.gateway_log(gw)
        );
    }
    assert!(results.len() >= 2, "fio ran {} passes", results.len());

    // Per fault: the longest write latency completing in its window (from the fault until
    // the next one); per kind: p50 / max of those.
    let mut ios: Vec<Completion> = Vec::new();
    for (pass, _, _) in &results {
        ios.extend(completions(&logs.join(format!("pass{pass}_lat.1.log"))));
    }
    assert!(
        ios.iter().any(|c| c.write),
        "fio wrote no latency log in {}",
        logs.display()
    );
    let mut base: Vec<Duration> = ios
        .iter()
        .filter(|c| c.write && c.at < baseline_end)
        .map(|c| c.latency)
        .collect();
    base.sort();
    eprintln!(
        "write stalls (FAULT_SEED={seed}, {} I/Os in {} fio passes, heartbeat grace {grace:?}):",
        ios.len(),
        results.len()
    );
    eprintln!(
        "  no fault (first 3 s): {} writes, p50 {:?}, max {:?}",
        base.len(),
        percentile(&base, 0.5),
        base.last().copied().unwrap_or_default()
    );
    // kind → (longest write, longest I/O of either kind) per fault: fio keeps 4 I/Os in
    // flight, so a verify read stuck on the failed OSD stalls the writes behind it too.
    let mut by_kind: BTreeMap<FaultKind, Vec<(Duration, Duration)>> = BTreeMap::new();
    for (f, from, to) in &windows {
        let in_window = |write: bool| {
            ios.iter()
                .filter(move |c| c.write == write && c.at >= *from && c.at < *to)
                .map(|c| c.latency)
        };
        let writes = in_window(true).count();
        let worst_write = in_window(true).max().unwrap_or_default();
        let worst_read = in_window(false).max().unwrap_or_default();
        eprintln!(
            "  {:?} on {} for {:?}: {writes} writes, longest write {:.2} s, longest read {:.2} s",
            f.kind,
            f.target,
            f.hold,
            worst_write.as_secs_f64(),
            worst_read.as_secs_f64()
        );
        assert!(
            writes > 0,
            "no write completed in the window of {f:?}: no stall measured"
        );
        by_kind
            .entry(f.kind)
            .or_default()
            .push((worst_write, worst_write.max(worst_read)));
    }
    for (kind, stalls) in by_kind {
        let mut writes: Vec<Duration> = stalls.iter().map(|s| s.0).collect();
        let mut any: Vec<Duration> = stalls.iter().map(|s| s.1).collect();
        writes.sort();
        any.sort();
        eprintln!(
            "  {}: {} faults, longest write stall p50 {:.1} s, max {:.1} s; \
             longest I/O stall (read or write) p50 {:.1} s, max {:.1} s",
            kind.name(),
            stalls.len(),
            percentile(&writes, 0.5).as_secs_f64(),
            writes.last().copied().unwrap_or_default().as_secs_f64(),
            percentile(&any, 0.5).as_secs_f64(),
            any.last().copied().unwrap_or_default().as_secs_f64()
        );
    }
}

/// Whether the fio thread is still at work (it only reports when it ends).
fn fio_running(done: &mpsc::Receiver<Vec<(usize, bool, String)>>) -> bool {
    match done.try_recv() {
        Err(mpsc::TryRecvError::Empty) => true,
        Ok(results) => {
            for (pass, ok, text) in results {
                eprintln!("fio pass {pass} (ok: {ok}):\n{text}");
            }
            false
        }
        Err(mpsc::TryRecvError::Disconnected) => false,
    }
}

/// qemu-io, interactive: commands go in one at a time, its output comes back line by line.
struct QemuIo {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    transcript: String,
}

impl QemuIo {
    fn start(image_opts: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["--image-opts", image_opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        QemuIo {
            child,
            lines,
            transcript: String::new(),
        }
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write to qemu-io");
        stdin.flush().expect("flush qemu-io");
        self.transcript.push_str(&format!("> {cmd}\n"));
    }

    /// Waits (bounded) for a line containing `want`; fails on any error line first.
    fn expect(&mut self, want: &str, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push_str(&line);
                    self.transcript.push('\n');
                    let lower = line.to_lowercase();
                    assert!(
                        !lower.contains("error") && !lower.contains("failed"),
                        "qemu-io reported a failure:\n{}",
                        self.transcript
                    );
                    if line.contains(want) {
                        return;
                    }
                }
                Err(_) => panic!(
                    "qemu-io printed no {want:?} within {limit:?}:\n{}",
                    self.transcript
                ),
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_io_rides_out_a_gateway_restart() {
    require_tool("qemu-io", "qemu-utils");
    let mut timeouts = test_timeouts();
    timeouts.osd_op_timeout_ms = 0;
    let mut d = DataCluster::start(timeouts, "rbd").expect("cluster with pool rbd");
    let backend = Arc::new(RadosBackend::new(
        d.rados.clone(),
        d.io.clone(),
        Duration::from_secs(30),
    ));
    d.rt.block_on(Rbd::new(backend).create("vm", 16 << 20, 22))
        .expect("create image");
    // A short watch timeout: the dead gateway's lock is broken (after blocklisting it) soon
    // after it stops pinging, so the restarted one can write.
    let gw = d
        .cluster
        .start_gateway("gw0", &["--watch-timeout-ms", "3000"])
        .expect("gateway");
    let addr = d.cluster.gateway_addr(gw);
    let opts = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export=rbd/vm,reconnect-delay=60",
        addr.ip(),
        addr.port()
    );
    let mut q = QemuIo::start(&opts);
    q.send("write -P 0x11 0 1M");
    q.expect("wrote 1048576/1048576 bytes", Duration::from_secs(60));

    // The gateway dies with the next write just sent (in flight, or not yet read): QEMU
    // reconnects and resends it.
    q.send("write -P 0x22 1M 1M");
    d.cluster.kill_gateway(gw);
    // Down for a while, as a crashed gateway is until systemd restarts it.
    std::thread::sleep(Duration::from_secs(2));
    q.send("write -P 0x33 2M 1M");
    d.cluster
        .restart_gateway(gw, "gw0-restarted")
        .expect("restart the gateway on the same address");
    q.expect("wrote 1048576/1048576 bytes", Duration::from_secs(120));
    q.expect("wrote 1048576/1048576 bytes", Duration::from_secs(120));
    for (pattern, at) in [("0x11", "0"), ("0x22", "1M"), ("0x33", "2M")] {
        q.send(&format!("read -P {pattern} {at} 1M"));
        q.expect("read 1048576/1048576 bytes", Duration::from_secs(60));
    }
    q.send("quit");
    eprintln!("qemu-io transcript:\n{}", q.transcript);
    let log = d.cluster.gateway_log(gw);
    eprintln!("gateway log:\n{log}");
    assert!(
        log.contains("image opened"),
        "the restarted gateway served the image:\n{log}"
    );
}

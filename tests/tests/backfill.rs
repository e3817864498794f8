//! Backfill while active (issue 15): an OSD marked out hands its PG copies to other OSDs,
//! which are backfilled while the PGs keep serving a VM disk that fio writes and verifies
//! through the NBD gateway. The PGs show `active+backfilling` and take writes meanwhile,
//! end `active+clean`, every block verifies, and a deep scrub finds every copy identical.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use basalt_config::{OsdTuning, Timeouts};
use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{metric_sum, require_tool, run_bounded, wait_for, DataCluster};

const IMAGE: u64 = 64 << 20;
const FIO_SIZE: u64 = 32 << 20;

/// One fio pass of random 4 KiB writes over the first FIO_SIZE bytes, every block written
/// once and verified (during the run, every 256 writes, and all of them at the end).
fn fio_pass(url: &str, seed: u64, verify_only: bool) -> (bool, String) {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=backfill",
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--size={FIO_SIZE}"),
        "--iodepth=4",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_backlog=256",
        "--verify_fatal=1",
        "--verify_state_save=0",
        &format!("--randseed={seed}"),
    ]);
    if verify_only {
        cmd.arg("--verify_only=1");
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(600));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && !text.contains("verify: bad")
        && !text.contains("Input/output error");
    (ok, text)
}

fn backfills(d: &DataCluster) -> f64 {
    (0..6)
        .filter_map(|i| d.cluster.osd_metrics(i).ok())
        .map(|t| metric_sum(&t, "basalt_osd_recoveries_total", "kind=\"backfill\""))
        .sum()
}

#[test]
fn pgs_serve_while_an_out_osds_copies_are_backfilled_and_end_identical() {
    require_tool("fio", "fio");
    let tuning = OsdTuning {
        // Every PG's log is trimmed far past what a new member could replay: it backfills.
        pg_log_entries: 20,
        // Slow enough that the backfills overlap fio's writes for seconds.
        recovery_sleep_ms: 300,
        ..OsdTuning::default()
    };
    let mut d = DataCluster::start_tuned(Timeouts::default(), tuning, "rbd").expect("cluster");
    let pool = d.io.pool_id();
    let backend = Arc::new(RadosBackend::new(
        d.rados.clone(),
        d.io.clone(),
        Duration::from_secs(30),
    ));
    // 1 MiB objects, spread over every PG.
    d.rt.block_on(Rbd::new(backend).create("vm", IMAGE, 20))
        .expect("create image");
    let gw = d.cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", d.cluster.gateway_addr(gw));
    let (ok, text) = fio_pass(&url, 1, false);
    assert!(ok, "first fio pass:\n{text}");

    // fio passes until the backfills are done (and one more).
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<Vec<(bool, String)>>();
    let fio = {
        let stop = stop.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            for seed in 2.. {
                let last = stop.load(Ordering::SeqCst);
                let (ok, text) = fio_pass(&url, seed, false);
                results.push((ok, text));
                if last || !ok {
                    break;
                }
            }
            let _ = done_tx.send(results);
        })
    };
    let writes = |d: &DataCluster| {
        d.cluster
            .gateway_metrics(gw)
            .map(|m| metric_sum(&m, "basalt_nbd_requests_total", "op=\"write\""))
            .unwrap_or(0.0)
    };
    let before = writes(&d);
    wait_for("fio writing", Duration::from_secs(60), || {
        (writes(&d) > before + 200.0).then_some(())
    })
    .expect("fio under way");

    let backfills_before = backfills(&d);
    let out = *d.rados.osdmap().osds.keys().next().expect("an OSD");
    d.cluster
        .cli_ok(&["osd", "out", &out.to_string()])
        .expect("osd out");
    // A PG backfilling its new member serves writes meanwhile: its last version moves on
    // while it still says active+backfilling.
    let (pgid, seq) = wait_for("a PG active+backfilling", Duration::from_secs(60), || {
        let stats = d.rt.block_on(d.rados.pg_stats()).ok()?;
        stats
            .iter()
            .find(|s| s.pool == pool && s.state.starts_with("active+backfilling"))
            .map(|s| (s.pgid.clone(), s.last_seq))
    })
    .expect("a PG backfilling while active");
    wait_for(
        "writes to a PG while it backfills",
        Duration::from_secs(60),
        || {
            let stats = d.rt.block_on(d.rados.pg_stats()).ok()?;
            stats
                .iter()
                .find(|s| {
                    s.pgid == pgid && s.state.starts_with("active+backfilling") && s.last_seq > seq
                })
                .map(|_| ())
        },
    )
    .expect("the backfilling PG took writes");
    d.wait_active_clean(Duration::from_secs(300))
        .expect("active+clean after the backfills");
    assert!(
        backfills(&d) > backfills_before,
        "no PG was backfilled after osd.{out} went out"
    );

    stop.store(true, Ordering::SeqCst);
    let results = done_rx
        .recv_timeout(Duration::from_secs(900))
        .expect("fio finishes");
    let _ = fio.join();
    for (i, (ok, text)) in results.iter().enumerate() {
        assert!(
            ok,
            "fio pass {i} failed:\n{text}\n--- gateway log ---\n{}",
            d.cluster.gateway_log(gw)
        );
    }
    let last_seed = results.len() as u64 + 1;
    let (ok, text) = fio_pass(&url, last_seed, true);
    assert!(ok, "fio verify after the backfills:\n{text}");

    // Every copy of every PG is identical.
    let map = d.rados.osdmap();
    let pg_num = map.pools.get(&pool).expect("pool").pg_num;
    for seed in 0..pg_num {
        let pgid = basalt_placement::PgId { pool, seed }.to_string();
        let r = d
            .cluster
            .cli_json(&["pg", "deep-scrub", &pgid])
            .expect("deep-scrub");
        assert_eq!(
            r["inconsistent"].as_array().map(Vec::len),
            Some(0),
            "pg {pgid}: {r}"
        );
    }
    // The activation records list only complete members: in the end the whole acting set.
    wait_for(
        "every PG's activation record naming its whole acting set",
        Duration::from_secs(30),
        || {
            let map = d.rados.osdmap();
            let p = map.pools.get(&pool)?;
            (0..pg_num)
                .all(|seed| {
                    let id = basalt_placement::PgId { pool, seed };
                    let Ok(mapping) = map.map_pg(p, id) else {
                        return false;
                    };
                    !mapping.acting.contains(&out)
                        && map
                            .pg_activations
                            .get(&id)
                            .is_some_and(|a| a.acting == mapping.acting)
                })
                .then_some(())
        },
    )
    .expect("activation records complete");
}

//! Availability while copies heal (issue 15). Backfill while active: an OSD marked out hands
//! its PG copies to other OSDs, which are backfilled while the PGs keep serving a VM disk
//! that fio writes and verifies through the NBD gateway; the PGs show `active+backfilling`
//! and take writes meanwhile, end `active+clean`, every block verifies, and a deep scrub
//! finds every copy identical. `pg_temp`: an OSD killed and restarted while objects are
//! written is CRUSH primary of PGs it must catch up; a complete copy serves them meanwhile
//! (a `pg_temp` in the map), writes go on, and the entries are gone at the end.

use std::sync::Arc;
use std::time::Duration;

use basalt_config::{OsdTuning, Timeouts};
use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{
    acked_count, continuous_writer, metric_sum, require_tool, wait_for, DataCluster,
};

const IMAGE: u64 = 64 << 20;
const FIO_SIZE: u64 = 16 << 20;

fn fio_pass(url: &str, seed: u64, verify_only: bool) -> (bool, String) {
    basalt_tests::fio_verify_pass("backfill", url, FIO_SIZE, seed, verify_only)
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
        recovery_sleep_ms: 100,
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
    let fio = basalt_tests::FioPasses::start("backfill", &url, FIO_SIZE, 2);
    d.cluster
        .wait_gateway_writes(gw, 200.0 + 1.0)
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
            .find(|s| {
                s.pool == pool
                    && s.state.is_active()
                    && s.state
                        .contains(basalt_client::ops::PgStateFlag::Backfilling)
            })
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
                    s.pgid == pgid
                        && s.state.is_active()
                        && s.state
                            .contains(basalt_client::ops::PgStateFlag::Backfilling)
                        && s.last_seq > seq
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

    let results = fio.finish();
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

/// pg_temp requests the running OSDs have made.
fn pg_temp_requests(d: &DataCluster) -> f64 {
    (0..6)
        .filter_map(|i| d.cluster.osd_metrics(i).ok())
        .map(|t| metric_sum(&t, "basalt_osd_pg_temp_requests_total", ""))
        .sum()
}

#[test]
fn a_returning_primary_hands_its_pgs_to_a_complete_copy_until_it_has_caught_up() {
    let tuning = OsdTuning {
        // Slow recovery, so the pg_temp entries stay long enough to be seen.
        recovery_sleep_ms: 500,
        ..OsdTuning::default()
    };
    let mut d = DataCluster::start_tuned(Timeouts::default(), tuning, "data").expect("cluster");
    let pool = d.io.pool_id();
    let map = d.rados.osdmap();
    let p = map.pools.get(&pool).expect("pool").clone();
    // The OSD that is CRUSH primary of the most PGs.
    let primary_of = |osd: u32| {
        (0..p.pg_num)
            .filter(|&seed| {
                map.map_pg(&p, basalt_placement::PgId { pool, seed })
                    .is_ok_and(|m| m.up_primary == Some(osd))
            })
            .count()
    };
    let victim = *map
        .osds
        .keys()
        .max_by_key(|&&o| primary_of(o))
        .expect("an OSD");
    assert!(primary_of(victim) > 0, "osd.{victim} is primary of no PG");
    let idx = d.harness_index(victim);
    let (writer, acked) = continuous_writer(&d, 0);
    wait_for("writes flowing", Duration::from_secs(60), || {
        (acked_count(&acked) >= 20).then_some(())
    })
    .expect("writes");
    d.cluster.kill_osd(idx);
    d.cluster
        .cli_ok(&["osd", "down", &victim.to_string()])
        .expect("mark down");
    wait_for("the victim down", Duration::from_secs(30), || {
        (!d.rados.osdmap().osds.get(&victim)?.up).then_some(())
    })
    .expect("down");
    // Writes while it is away: every PG it is primary of moves on without it.
    let at_kill = acked_count(&acked);
    wait_for("writes without the victim", Duration::from_secs(60), || {
        (acked_count(&acked) >= at_kill + 100).then_some(())
    })
    .expect("writes while away");
    let temps_before = pg_temp_requests(&d);
    d.cluster.restart_osd(idx).expect("restart");
    // Its PGs are served by a complete copy while it catches up.
    let (pg, temp) = wait_for(
        "a pg_temp for a PG the victim is CRUSH primary of",
        Duration::from_secs(60),
        || {
            let m = d.rados.osdmap();
            let p = m.pools.get(&pool)?;
            m.pg_temp
                .iter()
                .find(|(pg, acting)| {
                    acting.first() != Some(&victim)
                        && acting.contains(&victim)
                        && m.map_pg(p, **pg)
                            .is_ok_and(|mapping| mapping.up_primary == Some(victim))
                })
                .map(|(pg, acting)| (*pg, acting.clone()))
        },
    )
    .expect("pg_temp set");
    eprintln!("pg {pg} served by {temp:?} while osd.{victim} catches up");
    // I/O continues meanwhile.
    let at_temp = acked_count(&acked);
    let seqs = |d: &DataCluster| {
        d.rt.block_on(d.rados.pg_stats()).ok().and_then(|s| {
            s.iter()
                .find(|s| s.pgid == pg.to_string())
                .map(|s| s.last_seq)
        })
    };
    let seq_at_temp = seqs(&d).unwrap_or(0);
    wait_for(
        "writes while the pg_temp serves",
        Duration::from_secs(60),
        || (acked_count(&acked) > at_temp + 20).then_some(()),
    )
    .expect("writes continue");
    // Every PG ends active+clean on its CRUSH acting set, with no pg_temp left.
    d.wait_active_clean(Duration::from_secs(180))
        .expect("active+clean with the victim back");
    wait_for("no pg_temp left", Duration::from_secs(60), || {
        d.rados.osdmap().pg_temp.is_empty().then_some(())
    })
    .expect("pg_temp cleared");
    assert!(
        pg_temp_requests(&d) > temps_before,
        "no OSD asked for a pg_temp"
    );
    assert!(
        seqs(&d).unwrap_or(0) > seq_at_temp || acked_count(&acked) > at_temp,
        "nothing was written after the pg_temp appeared"
    );
    writer.abort();
    let written = acked.lock().expect("lock").clone();
    d.assert_reads_back(&written, "after the pg_temp");
    d.assert_three_copies_after_stop("data", &written);
}

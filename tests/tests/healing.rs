//! Process-level self-healing tests (issue 5): an OSD that dies is marked out and its data
//! re-replicated elsewhere; one that returns catches up by log or by backfill; a stale copy
//! never serves; a whole-cluster power cut loses no acknowledged write; bit rot is repaired.

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_client::ops::{PgStateFlag, PgStateFlags};
use basalt_config::OsdTuning;
use basalt_tests::{
    acked_count, continuous_writer, copies_identical, metric_sum, pattern, stores_after_stop,
    test_timeouts, wait_for, DataCluster,
};

/// SIGKILLs OSD `id` and marks it down at once (rather than waiting out the heartbeat grace).
fn kill_and_mark_down(d: &mut DataCluster, id: u32) {
    d.cluster.kill_osd(d.harness_index(id));
    d.cluster
        .cli_ok(&["osd", "down", &id.to_string()])
        .expect("mark down");
    wait_for("the map showing it down", Duration::from_secs(30), || {
        (!d.rados.osdmap().osds.get(&id)?.up).then_some(())
    })
    .expect("down");
}

/// The sum of metric `name` (series whose labels contain `label`) over the OSDs that answer.
fn osd_total(d: &DataCluster, name: &str, label: &str) -> f64 {
    (0..6)
        .filter_map(|i| d.cluster.osd_metrics(i).ok())
        .map(|t| metric_sum(&t, name, label))
        .sum()
}

/// Recoveries of `kind` (log, backfill) counted by the OSDs that are running.
fn recoveries(d: &DataCluster, kind: &str) -> f64 {
    osd_total(
        d,
        "basalt_osd_recoveries_total",
        &format!("kind=\"{kind}\""),
    )
}

/// Writes `data` to `name`, then flips a byte of it on the replica at `position` in the acting
/// set while that OSD is stopped, and starts it again. Returns the object's PG and that OSD.
fn rot_one_replica(
    d: &mut DataCluster,
    name: &str,
    data: &bytes::Bytes,
    position: usize,
) -> (basalt_placement::PgId, u32) {
    d.rt.block_on(d.io.write_full(name, data.clone()))
        .expect("write");
    let (pg, mapping) = d.rados.osdmap().map_object("data", name).expect("map");
    let replica = mapping.acting[position];
    let idx = d.harness_index(replica);
    d.cluster.stop_osd(idx, Duration::from_secs(10));
    {
        let store = basalt_osd::store::Store::open(
            d.cluster.osd_data(idx),
            basalt_osd::store::StoreConfig::default(),
        )
        .expect("open");
        store
            .inject_bitflip_for_testing(&basalt_osd::store::ObjectId::new(pg, name), 1, 3)
            .expect("flip");
    }
    d.cluster.restart_osd(idx).expect("restart");
    (pg, replica)
}

/// A PG of a size-2, min_size-1 pool whose copy on `b` took a write `a` never saw, with
/// `b` stopped and the stale `a` back alone: the PG is down on `a`.
struct StaleCopyAlone {
    d: DataCluster,
    io: basalt_client::IoCtx,
    name: &'static str,
    pgid: String,
    a: u32,
    b: u32,
    /// What `a` holds, and what `b` acknowledged after.
    one: bytes::Bytes,
    two: bytes::Bytes,
}

fn stale_copy_alone() -> StaleCopyAlone {
    let mut d = DataCluster::start(test_timeouts(), "data").expect("cluster");
    d.cluster
        .cli_ok(&[
            "pool",
            "create",
            "solo",
            "--size",
            "2",
            "--min-size",
            "1",
            "--pg-num",
            "8",
        ])
        .expect("pool");
    let io = wait_for("the pool visible", Duration::from_secs(30), || {
        d.rados.ioctx("solo").ok()
    })
    .expect("ioctx");
    let name = "guarded";
    let (one, two) = (pattern(1, 5000), pattern(2, 6000));
    d.rt.block_on(io.write_full(name, one.clone()))
        .expect("first write on both copies");
    let (pg, mapping) = d.rados.osdmap().map_object("solo", name).expect("map");
    let (a, b) = (mapping.acting[0], mapping.acting[1]);
    // A stops; B serves alone (min_size 1) and acknowledges a write A never sees.
    kill_and_mark_down(&mut d, a);
    d.rt.block_on(io.write_full(name, two.clone()))
        .expect("write with only B up");
    // B stops; the stale A comes back alone.
    kill_and_mark_down(&mut d, b);
    d.cluster
        .restart_osd(d.harness_index(a))
        .expect("restart A");
    let pgid = pg.to_string();
    wait_for("the PG down on A", Duration::from_secs(60), || {
        let stats = d.rt.block_on(d.rados.pg_stats()).ok()?;
        stats
            .iter()
            .find(|s| {
                s.pgid == pgid
                    && s.acting == vec![a]
                    && s.state == PgStateFlags::from([PgStateFlag::Down])
            })
            .map(|_| ())
    })
    .expect("down, not active from the stale copy");
    StaleCopyAlone {
        d,
        io,
        name,
        pgid,
        a,
        b,
        one,
        two,
    }
}

#[test]
fn a_stale_copy_never_serves_and_the_pg_waits_for_the_last_writer() {
    let StaleCopyAlone {
        mut d,
        io,
        name,
        pgid,
        b,
        one,
        two,
        ..
    } = stale_copy_alone();
    let read = d.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), io.read(name, 0, 1 << 20)).await
    });
    if let Ok(Ok(data)) = read {
        panic!(
            "a down PG served {} bytes ({})",
            data.len(),
            if data == one {
                "the stale copy"
            } else {
                "unexpected data"
            }
        );
    }
    let health = d.cluster.cli_ok(&["health", "detail"]).expect("health");
    assert!(
        health.contains(&format!("pg {pgid} is down: waiting for osd.{b}")),
        "health does not name the down PG and what it waits for:\n{health}"
    );
    // Giving up B's writes takes an explicit confirmation.
    let refused = d.cluster.cli(&["osd", "lost", &b.to_string()]);
    assert!(
        !refused.status.success(),
        "osd lost ran without confirmation"
    );
    // B returns: the PG goes active with B's data, copied to A as well.
    d.cluster
        .restart_osd(d.harness_index(b))
        .expect("restart B");
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean with B back");
    let got = d.rt.block_on(io.read(name, 0, 1 << 20)).expect("read");
    assert!(got == two, "the PG serves something other than B's write");
    let map = d.rados.osdmap();
    let stores = stores_after_stop(&mut d.cluster, 6);
    assert_eq!(copies_identical(&map, &stores, "solo", name, &two), 2);
}

#[test]
fn an_operator_can_give_up_a_lost_osds_writes() {
    let StaleCopyAlone {
        d,
        io,
        name,
        pgid,
        a,
        b,
        one,
        ..
    } = stale_copy_alone();
    // Removing B would leave the PG down for good: refused, pointing at `osd lost`.
    let refused = d.cluster.cli(&["osd", "rm", &b.to_string()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains(&format!("basalt osd lost {b}")),
        "osd rm of an OSD the down PG waits for: {err}"
    );
    d.cluster
        .cli_ok(&["osd", "lost", &b.to_string(), "--yes-i-really-mean-it"])
        .expect("osd lost");
    wait_for("the PG active on A", Duration::from_secs(60), || {
        let stats = d.rt.block_on(d.rados.pg_stats()).ok()?;
        stats
            .iter()
            .find(|s| s.pgid == pgid && s.acting == vec![a] && s.state.is_active())
            .map(|_| ())
    })
    .expect("active once B is declared lost");
    // What B alone acknowledged is gone, as the operator accepted; A's copy serves.
    let got = d.rt.block_on(io.read(name, 0, 1 << 20)).expect("read");
    assert!(got == one, "the PG serves something other than A's copy");
    // Declared lost, B is needed nowhere and can be removed.
    d.cluster
        .cli_ok(&["osd", "rm", &b.to_string()])
        .expect("osd rm after osd lost");
    let tree = d.cluster.cli_json(&["osd", "tree"]).expect("osd tree");
    assert!(
        !tree.to_string().contains(&format!("\"osd.{b}\"")),
        "osd.{b} still in the tree: {tree}"
    );
}
#[test]
fn a_returning_osd_catches_up_by_log_and_after_a_long_absence_by_backfill() {
    let tuning = OsdTuning {
        pg_log_entries: 20,
        // Slow recovery down so the writes below find objects not yet recovered.
        recovery_sleep_ms: 1000,
        ..OsdTuning::default()
    };
    let mut d = DataCluster::start_tuned(test_timeouts(), tuning, "data").expect("cluster");
    let victim = *d.rados.osdmap().osds.keys().next().expect("an OSD");
    let mut written = BTreeMap::new();
    let write_round = |d: &DataCluster,
                       written: &mut BTreeMap<String, bytes::Bytes>,
                       names: Vec<String>,
                       seed: u64| {
        let batch: Vec<(String, bytes::Bytes)> = names
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, pattern(seed + i as u64, 2000 + i * 37)))
            .collect();
        d.rt.block_on(async {
            let writes = batch
                .iter()
                .map(|(n, data)| d.io.write_full(n, data.clone()));
            for r in futures::future::join_all(writes).await {
                r.expect("write while the victim is away");
            }
        });
        written.extend(batch);
    };

    // A short absence: every PG stays within its 20-entry log.
    kill_and_mark_down(&mut d, victim);
    let (log_before, backfill_before) = (recoveries(&d, "log"), recoveries(&d, "backfill"));
    write_round(
        &d,
        &mut written,
        (0..24).map(|i| format!("short{i}")).collect(),
        100,
    );
    d.cluster
        .restart_osd(d.harness_index(victim))
        .expect("restart");
    wait_for("the victim up again", Duration::from_secs(60), || {
        d.rados.osdmap().osds.get(&victim)?.up.then_some(())
    })
    .expect("up");
    // Writes right after its return land while its PGs recover: a partial overwrite of an
    // object the victim has not recovered yet must reach it on top of the current bytes.
    d.rt.block_on(async {
        let patches = written.iter().map(|(n, data)| {
            let mut patched = data.to_vec();
            patched[100..108].copy_from_slice(b"patched!");
            (n.clone(), bytes::Bytes::from(patched))
        });
        let patches: Vec<_> = patches.collect();
        let writes = patches
            .iter()
            .map(|(n, _)| d.io.write(n, 100, bytes::Bytes::from_static(b"patched!")));
        for r in futures::future::join_all(writes).await {
            r.expect("write while the victim recovers");
        }
        written.extend(patches);
    });
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean after a short absence");
    let on_write = osd_total(&d, "basalt_osd_recovered_on_write_total", "");
    eprintln!("writes that recovered their object first: {on_write}");
    assert!(
        recoveries(&d, "log") > log_before,
        "no PG recovered by log after a short absence"
    );
    assert_eq!(
        recoveries(&d, "backfill"),
        backfill_before,
        "a short absence needed a backfill"
    );

    // A long absence: dozens of writes per PG, far past the log.
    kill_and_mark_down(&mut d, victim);
    let backfill_before = recoveries(&d, "backfill");
    for round in 0..12u64 {
        let names = (0..64).map(|i| format!("long{i}")).collect();
        write_round(&d, &mut written, names, 1000 * (round + 1));
    }
    // Objects removed meanwhile must be removed from the victim too, not left behind.
    let removed: Vec<String> = (0..8).map(|i| format!("short{i}")).collect();
    d.rt.block_on(async {
        for name in &removed {
            d.io.remove(name)
                .await
                .expect("remove while the victim is away");
        }
    });
    for name in &removed {
        written.remove(name);
    }
    d.cluster
        .restart_osd(d.harness_index(victim))
        .expect("restart");
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean after a long absence");
    assert!(
        recoveries(&d, "backfill") > backfill_before,
        "no PG was backfilled after a long absence"
    );
    d.assert_reads_back(&written, "after the backfill");
    let (map, stores) = d.assert_three_copies_after_stop("data", &written);
    for name in &removed {
        let (pg, _) = map.map_object("data", name).expect("map");
        let obj = basalt_osd::store::ObjectId::new(pg, name.as_str());
        let left = stores
            .iter()
            .filter(|s| s.exists(&obj).unwrap_or(false))
            .count();
        assert_eq!(left, 0, "removed {name} survives on {left} OSDs");
    }
}

#[test]
fn a_dead_osd_is_marked_out_and_every_pg_gets_size_copies_again() {
    let mut timeouts = test_timeouts();
    timeouts.down_out_interval_secs = 2;
    let mut d = DataCluster::start(timeouts, "data").expect("cluster");
    let (writer, acked) = continuous_writer(&d, 0);
    wait_for("writes flowing", Duration::from_secs(60), || {
        (acked_count(&acked) >= 20).then_some(())
    })
    .expect("writes");
    // osd index 0 booted first, but ids are the monitors' choice: find it by its log.
    let dead = *d
        .rados
        .osdmap()
        .osds
        .keys()
        .find(|&&id| d.harness_index(id) == 0)
        .expect("the killed OSD's id");
    d.cluster.kill_osd(0);
    let at_kill = acked_count(&acked);
    wait_for(
        "the dead OSD marked down and out",
        Duration::from_secs(60),
        || {
            let m = d.rados.osdmap();
            m.osds
                .get(&dead)
                .filter(|o| !o.up && !o.is_in())
                .map(|_| ())
        },
    )
    .expect("out");
    // Writes keep flowing while the PGs re-peer onto the replacement OSDs.
    wait_for("writes after the remap", Duration::from_secs(60), || {
        (acked_count(&acked) >= at_kill + 20).then_some(())
    })
    .expect("writes during recovery");
    writer.abort();
    let written = acked.lock().expect("lock").clone();
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean after recovery");
    d.assert_reads_back(&written, "after recovery");
    // The OSD returns (and is marked in again): its PGs map back to it, it catches up, and
    // the OSDs that stood in for it drop their copies once nothing needs them.
    d.cluster.restart_osd(0).expect("restart");
    wait_for("the OSD up and in again", Duration::from_secs(60), || {
        let m = d.rados.osdmap();
        m.osds.get(&dead).filter(|o| o.up && o.is_in()).map(|_| ())
    })
    .expect("in");
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean with the OSD back");
    wait_for("stray copies removed", Duration::from_secs(60), || {
        let strays: f64 = (0..6)
            .map(|i| d.cluster.osd_metrics(i).ok())
            .map(|t| t.map(|t| metric_sum(&t, "basalt_osd_pgs", "state=\"stray\"")))
            .sum::<Option<f64>>()?;
        (strays == 0.0).then_some(())
    })
    .expect("no strays");
    // Stopping OSDs one by one must not mark them out (down_out_interval is 2 s here) and
    // start copying data onto the ones still running.
    d.cluster.cli_ok(&["osd", "set", "noout"]).expect("noout");
    d.assert_three_copies_after_stop("data", &written);
}

#[test]
fn whole_cluster_power_loss_keeps_every_acknowledged_write() {
    let mut d = DataCluster::start(test_timeouts(), "data").expect("cluster");
    let (writer, acked) = continuous_writer(&d, 0);
    wait_for("writes flowing", Duration::from_secs(60), || {
        (acked_count(&acked) >= 25).then_some(())
    })
    .expect("writes");
    // Power cut: every daemon SIGKILLed at once, mid-write.
    for i in 0..6 {
        d.cluster.kill_osd(i);
    }
    for rank in 0..3 {
        d.cluster.kill_mon(rank);
    }
    writer.abort();
    let acked = acked.lock().expect("lock").clone();
    // The same start commands bring everything back.
    for rank in 0..3 {
        d.cluster.start_mon(rank).expect("restart mon");
    }
    for i in 0..6 {
        d.cluster.restart_osd(i).expect("restart osd");
    }
    d.wait_active_clean(Duration::from_secs(120))
        .expect("active+clean after power loss");
    d.assert_reads_back(&acked, "after power loss");
}

#[test]
fn bit_rot_in_one_replica_is_found_by_deep_scrub_and_repaired() {
    let mut d = DataCluster::start(test_timeouts(), "data").expect("cluster");
    // Enough objects that the PG is scrubbed in several chunks.
    let names: Vec<String> = (0..640).map(|i| format!("filler{i}")).collect();
    d.rt.block_on(async {
        let writes = names
            .iter()
            .map(|n| d.io.write_full(n, bytes::Bytes::from_static(b"filler")));
        for r in futures::future::join_all(writes).await {
            r.expect("filler write");
        }
    });
    let data = pattern(42, 300_000);
    let (pg, replica) = rot_one_replica(&mut d, "rotting", &data, 1);
    d.wait_active_clean(Duration::from_secs(60))
        .expect("active+clean again");
    let pgid = pg.to_string();
    let map = d.rados.osdmap();
    let in_pg = names
        .iter()
        .chain(
            (0..64)
                .map(|i| format!("probe{i}"))
                .collect::<Vec<_>>()
                .iter(),
        )
        .filter(|n| map.map_object("data", n).map(|(p, _)| p) == Ok(pg))
        .count()
        + 1;
    // A shallow scrub compares versions and sizes only: it cannot see bit rot.
    let r = d.cluster.cli_json(&["pg", "scrub", &pgid]).expect("scrub");
    assert_eq!(r["inconsistent"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["objects"], in_pg, "every object scrubbed once: {r}");
    let r = d
        .cluster
        .cli_json(&["pg", "deep-scrub", &pgid])
        .expect("deep-scrub");
    let found = r["inconsistent"].as_array().expect("list").clone();
    assert_eq!(found.len(), 1, "{r}");
    assert!(
        found[0]
            .as_str()
            .unwrap_or("")
            .contains(&format!("osd.{replica}")),
        "{r}"
    );
    let health = d.cluster.cli_json(&["health", "detail"]).expect("health");
    assert!(health.to_string().contains("PG_DAMAGED"), "{health}");
    let r = d
        .cluster
        .cli_json(&["pg", "repair", &pgid])
        .expect("repair");
    assert_eq!(r["repaired"], 1, "{r}");
    assert_eq!(r["inconsistent"].as_array().map(Vec::len), Some(0), "{r}");
    let r = d
        .cluster
        .cli_json(&["pg", "deep-scrub", &pgid])
        .expect("deep-scrub again");
    assert_eq!(r["inconsistent"].as_array().map(Vec::len), Some(0), "{r}");
    let health = d.cluster.cli_json(&["health"]).expect("health");
    assert!(!health.to_string().contains("PG_DAMAGED"), "{health}");
    // Every replica now holds the right bytes.
    let map = d.rados.osdmap();
    let stores = stores_after_stop(&mut d.cluster, 6);
    assert_eq!(copies_identical(&map, &stores, "data", "rotting", &data), 3);
}

#[test]
fn scheduled_deep_scrub_finds_bit_rot_and_auto_repair_fixes_it() {
    let tuning = OsdTuning {
        scrub_interval_secs: 0,
        deep_scrub_interval_secs: 2,
        scrub_auto_repair: true,
        ..OsdTuning::default()
    };
    let mut d = DataCluster::start_tuned(test_timeouts(), tuning, "data").expect("cluster");
    let data = pattern(7, 200_000);
    let (pg, _) = rot_one_replica(&mut d, "rotting", &data, 2);
    // No command: the schedule deep-scrubs the PG, finds the bad chunk and repairs it.
    wait_for("a scheduled repair", Duration::from_secs(90), || {
        (osd_total(&d, "basalt_osd_scrub_repairs_total", "") >= 1.0).then_some(())
    })
    .expect("auto repair");
    assert!(osd_total(&d, "basalt_osd_scrub_errors_total", "") >= 1.0);
    let r = d
        .cluster
        .cli_json(&["pg", "deep-scrub", &pg.to_string()])
        .expect("deep-scrub");
    assert_eq!(r["inconsistent"].as_array().map(Vec::len), Some(0), "{r}");
    let map = d.rados.osdmap();
    let stores = stores_after_stop(&mut d.cluster, 6);
    assert_eq!(copies_identical(&map, &stores, "data", "rotting", &data), 3);
}

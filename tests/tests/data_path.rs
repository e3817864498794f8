//! Process-level tests of the OSD data path (issue 4): 3 monitors, 6 OSDs on 3 hosts, the real
//! client library. Replicas are compared by opening every OSD's store after the OSDs stop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use basalt_client::{ClientError, Rados};
use basalt_osd::store::{ObjectId, Store, StoreConfig};
use basalt_placement::object_to_pg_ns;
use basalt_tests::{
    copies_identical, pattern, stores_after_stop, test_timeouts, wait_for, DataCluster,
};
use bytes::Bytes;

fn fixture() -> DataCluster {
    DataCluster::start(test_timeouts(), "data").expect("cluster with pool data")
}

#[test]
fn objects_round_trip_and_replicas_are_identical() {
    let mut f = fixture();
    let io = f.io.clone();
    let mut written = BTreeMap::new();
    f.rt.block_on(async {
        for i in 0..40u64 {
            let data = pattern(i, (i as usize * 7919) % 300_000 + 1);
            io.write_full(&format!("obj{i}"), data.clone())
                .await
                .expect("write");
            written.insert(format!("obj{i}"), data);
        }
        // A 64 MiB object in 8 MiB writes, then read back whole.
        let big = pattern(99, 64 << 20);
        for (k, piece) in big.chunks(8 << 20).enumerate() {
            io.write("big", (k as u64) << 23, Bytes::copy_from_slice(piece))
                .await
                .expect("big write");
        }
        let back = io.read("big", 0, 64 << 20).await.expect("big read");
        assert!(back == big, "64 MiB object did not round-trip");
        written.insert("big".to_string(), big);
        for (name, data) in &written {
            let got = io.read(name, 0, 80 << 20).await.expect("read");
            assert!(got == *data, "{name} did not round-trip");
        }
        // Partial writes, appends, truncate, zero, xattrs, omap, compound ops, remove.
        io.write_full("misc", Bytes::from_static(b"hello world"))
            .await
            .expect("write");
        io.write("misc", 6, Bytes::from_static(b"basal"))
            .await
            .expect("overwrite");
        io.append("misc", Bytes::from_static(b"t!"))
            .await
            .expect("append");
        assert_eq!(
            io.read("misc", 0, 100).await.expect("read"),
            Bytes::from_static(b"hello basalt!")
        );
        io.zero("misc", 0, 5).await.expect("zero");
        io.truncate("misc", 8).await.expect("truncate");
        assert_eq!(
            io.read("misc", 0, 100).await.expect("read"),
            Bytes::from_static(b"\0\0\0\0\0 ba")
        );
        assert_eq!(io.stat("misc").await.expect("stat").size, 8);
        io.setxattr("misc", "color", Bytes::from_static(b"blue"))
            .await
            .expect("setxattr");
        assert_eq!(
            io.getxattr("misc", "color").await.expect("getxattr"),
            Some(Bytes::from_static(b"blue"))
        );
        io.omap_set(
            "misc",
            vec![
                (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
                (Bytes::from_static(b"b"), Bytes::from_static(b"2")),
            ],
        )
        .await
        .expect("omap set");
        let (vals, more) = io
            .omap_get_vals("misc", Some(b"a"), 10)
            .await
            .expect("omap get");
        assert_eq!(
            vals,
            vec![(Bytes::from_static(b"b"), Bytes::from_static(b"2"))]
        );
        assert!(!more);
        io.remove("obj0").await.expect("remove");
        written.remove("obj0");
        assert!(matches!(
            io.stat("obj0").await,
            Err(ClientError::NotFound(_))
        ));
        assert!(matches!(
            io.remove("obj0").await,
            Err(ClientError::NotFound(_))
        ));
        let listed = io.list_objects().await.expect("list");
        for name in written.keys() {
            assert!(listed.contains(name), "{name} missing from the listing");
        }
        assert!(!listed.contains(&"obj0".to_string()));
    });
    let map = f.rados.osdmap();
    let stores = stores_after_stop(&mut f.cluster, 6);
    for (name, data) in &written {
        assert_eq!(
            copies_identical(&map, &stores, "data", name, data),
            3,
            "{name} copies"
        );
    }
}

#[test]
fn concurrent_writers_end_in_a_serial_order() {
    let f = fixture();
    let io = f.io.clone();
    f.rt.block_on(async {
        // Each writer replaces data and an xattr in one compound op: the final state must be
        // one writer's pair, never a mix.
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let io = io.clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..10u64 {
                    let tag = format!("w{w}r{round}");
                    let ops = vec![
                        basalt_client::ops::ObjOp::WriteFull {
                            data: pattern(w * 100 + round, 10_000 + (w as usize) * 1000),
                        },
                        basalt_client::ops::ObjOp::SetXattr {
                            name: "tag".into(),
                            value: Bytes::from(tag),
                        },
                    ];
                    io.operate("shared", ops).await.expect("compound write");
                    // Appends of fixed-size records: every record must land whole, once.
                    let rec = format!("{w:02}:{round:02};");
                    io.append("log", Bytes::from(rec)).await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let tag = io
            .getxattr("shared", "tag")
            .await
            .expect("tag")
            .expect("tag set");
        let tag = String::from_utf8(tag.to_vec()).expect("utf8");
        let (w, r) = tag[1..].split_once('r').expect("tag shape");
        let (w, r): (u64, u64) = (w.parse().expect("w"), r.parse().expect("r"));
        let data = io.read("shared", 0, 1 << 20).await.expect("read");
        assert!(
            data == pattern(w * 100 + r, 10_000 + (w as usize) * 1000),
            "data and xattr from different writers"
        );
        let log = io.read("log", 0, 1 << 20).await.expect("read log");
        let log = String::from_utf8(log.to_vec()).expect("utf8");
        let records: Vec<&str> = log.split_terminator(';').collect();
        assert_eq!(records.len(), 80, "{log}");
        for w in 0..8 {
            let mine: Vec<u64> = records
                .iter()
                .filter(|r| r.starts_with(&format!("{w:02}:")))
                .map(|r| r[3..].parse().expect("round"))
                .collect();
            assert_eq!(
                mine,
                (0..10).collect::<Vec<_>>(),
                "writer {w}'s appends out of order or lost"
            );
        }
    });
}

#[test]
fn killing_a_replica_mid_stream_loses_no_acknowledged_write() {
    let mut f = fixture();
    let io = f.io.clone();
    let acked: Arc<std::sync::Mutex<BTreeMap<String, Bytes>>> = Default::default();
    let writer = {
        let acked = acked.clone();
        let io = io.clone();
        f.rt.spawn(async move {
            for i in 0..150u64 {
                let name = format!("stream{}", i % 50);
                let data = pattern(1000 + i, 4096 + (i as usize % 7) * 1000);
                match io.write_full(&name, data.clone()).await {
                    Ok(()) => {
                        acked.lock().expect("lock").insert(name, data);
                    }
                    Err(e) => panic!("write {i} failed although 2 of 3 replicas stay up: {e}"),
                }
            }
        })
    };
    // Kill an OSD once writes are flowing.
    wait_for("writes flowing", Duration::from_secs(60), || {
        (acked.lock().expect("lock").len() >= 10).then_some(())
    })
    .expect("writes");
    f.cluster.kill_osd(1);
    f.rt.block_on(writer).expect("writer finished");
    let acked = acked.lock().expect("lock").clone();
    f.rt.block_on(async {
        for (name, data) in &acked {
            let got = io.read(name, 0, 1 << 20).await.expect("read after kill");
            assert!(got == *data, "{name} lost its acknowledged content");
        }
    });
    // Bring it back: peering makes it equal to the others again.
    f.cluster.restart_osd(1).expect("restart");
    let mon = f.rados.mon().clone();
    wait_for("osd back up", Duration::from_secs(60), || {
        f.rt.block_on(mon.osdmap())
            .ok()
            .filter(|m| m.osds.values().all(|o| o.up))
    })
    .expect("up");
    f.rt.block_on(async {
        // A write to every PG completes only once that PG peered with the returned OSD.
        for i in 0..64 {
            io.write_full(&format!("probe{i}"), Bytes::from_static(b"q"))
                .await
                .expect("probe");
        }
    });
    let map = f.rados.osdmap();
    let stores = stores_after_stop(&mut f.cluster, 6);
    for (name, data) in &acked {
        assert_eq!(
            copies_identical(&map, &stores, "data", name, data),
            3,
            "{name} copies after recovery"
        );
    }
}

#[test]
fn a_flipped_byte_is_never_returned_and_bad_input_is_refused() {
    let mut f = fixture();
    let io = f.io.clone();
    let data = pattern(7, 200_000);
    f.rt.block_on(io.write_full("victim", data.clone()))
        .expect("write");
    let map = f.rados.osdmap();
    let pool = map.pool_by_name("data").expect("pool");
    let pg = object_to_pg_ns(&pool.placement(), "", "victim");
    let primary = map
        .map_pg(pool, pg)
        .expect("map")
        .acting_primary
        .expect("primary");
    // The harness index of the primary, from the boot line its log prints.
    let idx = (0..6)
        .find(|&i| {
            f.cluster
                .osd_log(i)
                .contains(&format!("know this OSD as osd.{primary} "))
        })
        .expect("primary's harness index");
    f.cluster.stop_osd(idx, Duration::from_secs(10));
    {
        let store = Store::open(f.cluster.osd_data(idx), StoreConfig::default()).expect("open");
        store
            .inject_bitflip_for_testing(&ObjectId::new(pg, "victim"), 1, 100)
            .expect("flip");
    }
    f.cluster.restart_osd(idx).expect("restart");
    let old_addr = map.osds[&primary].addr.clone();
    wait_for(
        "the restarted primary back up",
        Duration::from_secs(60),
        || {
            let m = f.rados.osdmap();
            m.osds
                .get(&primary)
                .filter(|o| o.up && o.addr != old_addr)
                .map(|_| ())
        },
    )
    .expect("primary up");
    f.rt.block_on(async {
        let got = io.read("victim", 0, 1 << 20).await.expect("read repaired");
        assert!(got == data, "corrupt or wrong bytes returned");
        assert!(
            f.cluster
                .osd_log(idx)
                .contains("corrupt local copy; repairing from a replica"),
            "the read did not go through the corrupt copy's repair"
        );
        // Repaired in place: reading again needs no repair and gives the same bytes.
        assert!(io.read("victim", 0, 1 << 20).await.expect("read again") == data);
        // Bad input: the OSDs refuse it with clear errors and keep serving.
        assert!(matches!(
            f.rados.ioctx("no-such-pool"),
            Err(ClientError::NotFound(_))
        ));
        let huge = Bytes::from(vec![0u8; (basalt_client::ops::MAX_OP_DATA + 1) as usize]);
        assert!(matches!(
            io.write_full("huge", huge).await,
            Err(ClientError::InvalidArgument(_))
        ));
        assert!(matches!(
            io.write_full("", Bytes::new()).await,
            Err(ClientError::InvalidArgument(_))
        ));
        assert!(matches!(
            io.truncate("never-written", 0).await,
            Err(ClientError::NotFound(_))
        ));
        assert!(matches!(
            io.create("victim", true).await,
            Err(ClientError::Exists(_))
        ));
        let got = io.read("victim", 0, 1 << 20).await.expect("still serving");
        assert!(got == data);
    });
    // Malformed requests straight at an OSD's gRPC port (the restarted primary has a new one).
    let map = f.rados.osdmap();
    let addr = map.osds[&primary].addr.clone();
    f.rt.block_on(async {
        // Over TLS, as every client of the test cluster.
        let connector = basalt_client::connector_for(&f.cluster.config).expect("TLS");
        let channel = basalt_client::lazy_channel(&addr, &connector, Duration::from_secs(5))
            .expect("channel");
        let mut c = basalt_proto::osd::osd_client::OsdClient::new(basalt_proto::auth::authorized(
            channel,
            f.rados.mon().osd_ticket(),
        ));
        let reply = c
            .op(basalt_proto::osd::OpRequest {
                pool: pool.id,
                pg_seed: pg.seed,
                object: "victim".into(),
                epoch: map.epoch,
                reqid: Some(basalt_proto::osd::ReqId {
                    client: "client.raw".into(),
                    incarnation: 1,
                    tid: 1,
                }),
                ops: Bytes::from_static(&[0xff, 0xff, 0xff, 0x07]),
                timeout_ms: 5000,
                ..Default::default()
            })
            .await
            .expect("reply");
        let r: Result<basalt_client::ops::OpResult, basalt_client::ops::OpError> =
            basalt_client::ops::decode(&reply.get_ref().result, "reply").expect("decodes");
        assert!(
            matches!(r, Err(basalt_client::ops::OpError::InvalidArgument(_))),
            "{r:?}"
        );
        let reply = c
            .op(basalt_proto::osd::OpRequest {
                pool: 999,
                object: "x".into(),
                epoch: map.epoch,
                reqid: Some(basalt_proto::osd::ReqId {
                    client: "client.raw".into(),
                    incarnation: 1,
                    tid: 2,
                }),
                ops: basalt_client::ops::encode(&vec![basalt_client::ops::ObjOp::Stat]),
                timeout_ms: 5000,
                ..Default::default()
            })
            .await
            .expect("reply");
        let r: Result<basalt_client::ops::OpResult, basalt_client::ops::OpError> =
            basalt_client::ops::decode(&reply.get_ref().result, "reply").expect("decodes");
        assert!(
            matches!(r, Err(basalt_client::ops::OpError::NoSuchPool(999))),
            "{r:?}"
        );
    });
    f.rt.block_on(async {
        assert!(
            io.read("victim", 0, 10).await.is_ok(),
            "OSD stopped serving after bad input"
        );
    });
}

#[test]
fn killing_the_primary_mid_stream_applies_no_append_twice() {
    let mut f = fixture();
    let io = f.io.clone();
    let map = f.rados.osdmap();
    let pool = map.pool_by_name("data").expect("pool");
    let pg = object_to_pg_ns(&pool.placement(), "", "ledger");
    let primary = map
        .map_pg(pool, pg)
        .expect("map")
        .acting_primary
        .expect("primary");
    let idx = f.harness_index(primary);
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let appender = {
        let io = io.clone();
        let acked = acked.clone();
        f.rt.spawn(async move {
            for i in 0..120u32 {
                // Appends are not idempotent: a resend applied twice would show.
                io.append("ledger", Bytes::from(format!("{i:04};")))
                    .await
                    .unwrap_or_else(|e| panic!("append {i} failed: {e}"));
                acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    wait_for("appends flowing", Duration::from_secs(60), || {
        (acked.load(std::sync::atomic::Ordering::SeqCst) >= 15).then_some(())
    })
    .expect("appends");
    f.cluster.kill_osd(idx);
    f.rt.block_on(appender).expect("appender finished");
    let log =
        f.rt.block_on(io.read("ledger", 0, 1 << 20))
            .expect("read ledger");
    let log = String::from_utf8(log.to_vec()).expect("utf8");
    let want: String = (0..120).map(|i| format!("{i:04};")).collect();
    assert_eq!(
        log, want,
        "appends lost, reordered or applied twice across the primary's death"
    );
    let after = f.rados.osdmap();
    let p = after.pool_by_name("data").expect("pool");
    let new_primary = after.map_pg(p, pg).expect("map").acting_primary;
    assert_ne!(new_primary, Some(primary), "the dead OSD is still primary");
}

#[test]
fn blocklisted_and_inactive_give_typed_errors() {
    let mut f = fixture();
    // A fenced client: every OSD refuses it from the blocklist's epoch on.
    let victim =
        f.rt.block_on(Rados::connect_as(f.cluster.config.clone(), "client.victim"))
            .expect("connect victim");
    let vio = victim.ioctx("data").expect("ioctx");
    f.rt.block_on(vio.write_full("fenced", Bytes::from_static(b"before")))
        .expect("write before fencing");
    let epoch =
        f.rt.block_on(
            f.rados
                .blocklist_add("client.victim", Duration::from_secs(600)),
        )
        .expect("blocklist");
    // Once the fenced client's ops carry the blocklist's epoch, every OSD has that map
    // before it looks at them (ops from an older map may land just before, as in Ceph; the
    // lock breaker's own ops carry the epoch, which orders them after any such op).
    wait_for(
        "the victim's map to carry the blocklist",
        Duration::from_secs(30),
        || (victim.osdmap().epoch >= epoch).then_some(()),
    )
    .expect("map");
    let r =
        f.rt.block_on(vio.write_full("fenced", Bytes::from_static(b"after")));
    assert!(matches!(r, Err(ClientError::Blocklisted(_))), "{r:?}");
    let r = f.rt.block_on(vio.read("fenced", 0, 10));
    assert!(matches!(r, Err(ClientError::Blocklisted(_))), "{r:?}");
    assert_eq!(
        f.rt.block_on(f.io.read("fenced", 0, 10)).expect("read"),
        Bytes::from_static(b"before")
    );

    // A pool whose PGs need all three copies: with one OSD down, I/O to its PGs waits,
    // then fails with a clear "inactive" error; the other PGs keep serving.
    f.cluster
        .cli_ok(&[
            "pool",
            "create",
            "strict",
            "--size",
            "3",
            "--min-size",
            "3",
            "--pg-num",
            "8",
        ])
        .expect("pool create");
    let mut config = f.cluster.config.clone();
    config.timeouts.osd_op_timeout_ms = 3_000;
    let quick = f.rt.block_on(Rados::connect(config)).expect("connect");
    let sio = wait_for("pool strict", Duration::from_secs(30), || {
        quick.ioctx("strict").ok()
    })
    .expect("ioctx");
    f.rt.block_on(async {
        for i in 0..32 {
            sio.write_full(&format!("s{i}"), Bytes::from_static(b"x"))
                .await
                .expect("write while healthy");
        }
    });
    let map = quick.osdmap();
    let pool = map.pool_by_name("strict").expect("pool");
    let first = map
        .map_pg(pool, object_to_pg_ns(&pool.placement(), "", "s0"))
        .expect("map");
    let down = first.acting[1];
    let idx = f.harness_index(down);
    f.cluster.stop_osd(idx, Duration::from_secs(10));
    wait_for(
        "the stopped OSD marked down",
        Duration::from_secs(30),
        || quick.osdmap().osds.get(&down).filter(|o| !o.up).map(|_| ()),
    )
    .expect("down");
    let r =
        f.rt.block_on(sio.write_full("s0", Bytes::from_static(b"y")));
    match r {
        Err(ClientError::Unavailable(m)) => {
            assert!(m.contains("inactive") || m.contains("min_size"), "{m}")
        }
        other => panic!("expected an inactive-PG error, got {other:?}"),
    }
    // An object whose PG does not include the stopped OSD is still served.
    let map = quick.osdmap();
    let pool = map.pool_by_name("strict").expect("pool");
    let healthy = (0..32).map(|i| format!("s{i}")).find(|n| {
        let m = map
            .map_pg(pool, object_to_pg_ns(&pool.placement(), "", n))
            .expect("map");
        m.acting.len() == 3
    });
    if let Some(n) = healthy {
        f.rt.block_on(sio.write_full(&n, Bytes::from_static(b"z")))
            .expect("healthy PG serves");
    }
}

/// Issue 17 item 2: a replica that runs out of space after the primary committed a write must
/// not leave the write failed-but-visible (nor the PG diverged). The write waits until the
/// replica has room — here until a removal (which a full store always accepts) frees it — and
/// then every member holds it.
#[test]
fn a_full_replica_never_leaves_a_failed_write_visible() {
    let mut f = fixture();
    let map = f.rados.osdmap();
    let pool = map.pool_by_name("data").expect("pool");
    let pg = object_to_pg_ns(&pool.placement(), "", "victim");
    let acting = map.map_pg(pool, pg).expect("map").acting;
    let (primary, replica) = (acting[0], acting[1]);
    // Another object of the same PG, to fill the replica with.
    let filler = (0..10_000)
        .map(|i| format!("filler{i}"))
        .find(|n| object_to_pg_ns(&pool.placement(), "", n) == pg)
        .expect("an object name in the victim's PG");

    // The replica restarts with room for 8 MiB of data; 6 MiB of it is then used.
    let r = f.harness_index(replica);
    f.cluster.stop_osd(r, Duration::from_secs(10));
    f.cluster
        .set_osd_arg(r, "--capacity-bytes", &(8u64 << 20).to_string());
    f.cluster.restart_osd(r).expect("restart the replica");
    f.wait_active_clean(Duration::from_secs(90))
        .expect("the PGs active+clean with the small replica");
    let filler_data = pattern(7, 6 << 20);
    f.rt.block_on(f.io.write_full(&filler, filler_data))
        .expect("the filler fits");

    // A client that waits as long as it takes (a VM's gateway has no op timeout).
    let mut config = f.cluster.config.clone();
    config.timeouts.osd_op_timeout_ms = 0;
    let patient = f.rt.block_on(Rados::connect(config)).expect("connect");
    let pio = wait_for("the pool visible", Duration::from_secs(30), || {
        patient.ioctx("data").ok()
    })
    .expect("ioctx");
    let data = pattern(8, 4 << 20);
    let writer = {
        let data = data.clone();
        f.rt.spawn(async move { pio.write_full("victim", data).await })
    };
    let p = f.harness_index(primary);
    let refused = || {
        f.cluster.osd_metrics(p).ok().map_or(0.0, |t| {
            basalt_tests::metric_sum(&t, "basalt_osd_write_no_space_retries_total", "replica")
        })
    };
    wait_for(
        "the full replica to refuse the write (or the write to end)",
        Duration::from_secs(60),
        || (refused() > 0.0 || writer.is_finished()).then_some(()),
    )
    .expect("refusal");
    if writer.is_finished() {
        let r = f.rt.block_on(writer).expect("writer task");
        let seen = f.rt.block_on(f.io.read("victim", 0, 8 << 20));
        panic!(
            "the write ended ({r:?}) although a replica had no room for it; \
             the object now reads {} bytes",
            seen.map(|b| b.len()).unwrap_or(0)
        );
    }
    // The operator frees space: a removal passes even on the full replica, and the waiting
    // write then completes on every member.
    f.rt.block_on(f.io.remove(&filler))
        .expect("a removal works on a full replica");
    let r = f.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .map(|j| j.expect("writer task"))
    });
    match r {
        Ok(Ok(())) => {}
        other => panic!("the write did not complete once the replica had room: {other:?}"),
    }
    assert!(
        f.rt.block_on(f.io.read("victim", 0, 8 << 20))
            .expect("read victim")
            == data,
        "the completed write reads back"
    );
    f.wait_active_clean(Duration::from_secs(60))
        .expect("the PG clean, with no member left behind");
    let map = f.rados.osdmap();
    let stores = stores_after_stop(&mut f.cluster, 6);
    assert_eq!(
        copies_identical(&map, &stores, "data", "victim", &data),
        3,
        "victim copies"
    );
    assert_eq!(
        copies_identical(&map, &stores, "data", &filler, &Bytes::new()),
        0,
        "the removed filler is gone everywhere"
    );
}

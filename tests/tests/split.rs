//! PG splitting under a running VM disk (issue 17): `basalt pool set rbd pg_num 64` on a pool
//! of 16 PGs holding an image, while fio writes and verifies through the NBD gateway, with one
//! OSD down across the change (it splits when it returns) and another SIGKILLed right after
//! it (while the OSDs split their copies), both restarted.
//! Every fio pass verifies what it wrote, a full read-back of the image matches, every object
//! stays listed and readable, and after `pgp_num` follows (the children move to their own
//! OSDs by backfill) the image reads back the same again.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use basalt_config::Timeouts;
use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{metric_sum, pattern, require_tool, run_bounded, wait_for, DataCluster};

const IMAGE: u64 = 64 << 20;
/// fio writes and verifies the first half; the second half keeps a pattern written before.
const FIO_SIZE: u64 = 32 << 20;

fn fio_pass(url: &str, seed: u64, verify_only: bool) -> (bool, String) {
    basalt_tests::fio_verify_pass("split", url, FIO_SIZE, seed, verify_only)
}

/// The whole image through the gateway, as a new NBD client reads it.
fn read_back(url: &str, dir: &Path, name: &str) -> Vec<u8> {
    let file = dir.join(name);
    let out = run_bounded(
        Command::new("nbdcopy").args([url, &file.display().to_string()]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "nbdcopy {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&file).expect("read-back file")
}

/// Number of distinct PGs of `pool` the primaries report, and whether all are active+clean
/// on the acting set the client's map gives them.
fn pool_pgs_clean(d: &DataCluster, pool: u32) -> Option<usize> {
    let map = d.rados.osdmap();
    let stats = d.rt.block_on(d.rados.pg_stats()).ok()?;
    let mine: Vec<_> = stats.iter().filter(|s| s.pool == pool).collect();
    let clean = mine.iter().all(|s| {
        let pg = basalt_placement::PgId {
            pool: s.pool,
            seed: s.seed,
        };
        let mapped = map.pools.get(&s.pool).and_then(|p| map.map_pg(p, pg).ok());
        s.state.is_active_clean() && mapped.is_some_and(|m| m.acting == s.acting)
    });
    clean.then_some(mine.len())
}

#[test]
fn growing_pg_num_under_fio_with_an_osd_killed_loses_nothing() {
    require_tool("fio", "fio");
    require_tool("nbdcopy", "libnbd-bin");
    // The defaults a deployment gets: the gateway's ops wait through peering, never time out.
    let mut d = DataCluster::start(Timeouts::default(), "rbd").expect("cluster with pool rbd");
    let pool = d.io.pool_id();
    let backend = Arc::new(RadosBackend::new(
        d.rados.clone(),
        d.io.clone(),
        Duration::from_secs(30),
    ));
    let rbd = Rbd::new(backend);
    // 1 MiB objects: 64 of them, spread over every PG.
    d.rt.block_on(rbd.create("vm", IMAGE, 20))
        .expect("create image");
    let gw = d.cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", d.cluster.gateway_addr(gw));
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("pattern.raw");
    let want = pattern(17, IMAGE as usize);
    std::fs::write(&src, &want).expect("pattern file");
    let out = run_bounded(
        Command::new("nbdcopy").args([&src.display().to_string(), url.as_str()]),
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "nbdcopy to the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // fio passes until the split is healed (and one more).
    let fio = basalt_tests::FioPasses::start("split", &url, FIO_SIZE, 1);
    d.cluster
        .wait_gateway_writes(gw, 500.0 + 1.0)
        .expect("fio under way");

    // One OSD is down across the change (it splits its copies when it returns, from their
    // layout records, and catches up by log); another is SIGKILLed right after the change,
    // while the OSDs apply it.
    let (absent, victim) = (3, 1);
    d.cluster.kill_osd(absent);
    wait_for(
        "the absent OSD marked down",
        Duration::from_secs(60),
        || {
            let m = d.rt.block_on(d.rados.mon().osdmap()).ok()?;
            (m.osds.values().filter(|o| !o.up).count() == 1).then_some(())
        },
    )
    .expect("absent OSD down");
    d.cluster
        .cli_ok(&["pool", "set", "rbd", "pg_num", "64"])
        .expect("pool set pg_num 64");
    let split_before_kill = d
        .cluster
        .osd_log(victim)
        .contains("PG copy split into its children");
    d.cluster.kill_osd(victim);
    eprintln!(
        "osd (harness {victim}) SIGKILLed; it had split a PG copy before: {split_before_kill}"
    );
    let map = d.rados.osdmap();
    let pool_now = map.pools.get(&pool).expect("pool");
    assert_eq!((pool_now.pg_num, pool_now.pgp_num), (64, 16));
    wait_for(
        "the killed OSD marked down",
        Duration::from_secs(60),
        || {
            let m = d.rt.block_on(d.rados.mon().osdmap()).ok()?;
            (m.osds.values().filter(|o| !o.up).count() == 2).then_some(())
        },
    )
    .expect("victim down");
    let split_msg = "PG copy split into its children";
    assert!(!d.cluster.osd_log(absent).contains(split_msg));
    d.cluster.restart_osd(victim).expect("restart OSD");
    d.cluster.restart_osd(absent).expect("restart OSD");
    wait_for("all 6 OSDs up", Duration::from_secs(120), || {
        let m = d.rt.block_on(d.rados.mon().osdmap()).ok()?;
        m.osds.values().all(|o| o.up).then_some(())
    })
    .expect("OSDs up again");
    wait_for("64 PGs active+clean", Duration::from_secs(180), || {
        pool_pgs_clean(&d, pool).filter(|&n| n == 64)
    })
    .expect("every PG of the split pool active+clean");
    for i in [victim, absent] {
        let log = d.cluster.osd_log(i);
        assert!(log.contains(split_msg), "OSD {i} split no PG copy:\n{log}");
    }
    let splits: f64 = (0..6)
        .filter_map(|i| d.cluster.osd_metrics(i).ok())
        .map(|m| metric_sum(&m, "basalt_osd_pg_splits_total", ""))
        .sum();
    assert!(splits >= 16.0, "{splits} PG copies split");

    let results = fio.finish();
    for (i, (ok, text)) in results.iter().enumerate() {
        assert!(
            ok,
            "fio pass {i} failed:\n{text}\n--- gateway log ---\n{}",
            d.cluster.gateway_log(gw)
        );
    }
    assert!(results.len() >= 2, "fio ran {} passes", results.len());
    let last_seed = results.len() as u64;

    // Every block reads back: the pattern half as written, the fio half as fio last wrote it
    // (fio checks it), and every object is listed and readable.
    let after_split = read_back(&url, dir.path(), "after_split.raw");
    assert_eq!(after_split.len(), IMAGE as usize);
    assert!(
        after_split[FIO_SIZE as usize..] == want[FIO_SIZE as usize..],
        "the image's untouched half changed across the split"
    );
    let (ok, text) = fio_pass(&url, last_seed, true);
    assert!(ok, "fio verify after the split:\n{text}");
    let names = d.rt.block_on(d.io.list_objects()).expect("list objects");
    for i in 0..64 {
        let name = format!("probe{i}");
        assert!(names.contains(&name), "{name} not listed");
        let data = d.rt.block_on(d.io.read(&name, 0, 16)).expect("read probe");
        assert_eq!(&data[..], b"p", "{name}");
    }
    let data_objects = names.iter().filter(|n| n.starts_with("rbd_data.")).count();
    assert_eq!(data_objects, 64, "one object per MiB of the image");

    // pgp_num follows: the children move to their own OSDs by backfill.
    d.cluster
        .cli_ok(&["pool", "set", "rbd", "pgp_num", "64"])
        .expect("pool set pgp_num 64");
    wait_for(
        "64 PGs active+clean on their own OSDs",
        Duration::from_secs(300),
        || {
            let m = d.rados.osdmap();
            (m.pools.get(&pool)?.pgp_num == 64).then_some(())?;
            pool_pgs_clean(&d, pool).filter(|&n| n == 64)
        },
    )
    .expect("every PG active+clean after pgp_num 64");
    let after_move = read_back(&url, dir.path(), "after_move.raw");
    assert!(
        after_move == after_split,
        "the image changed when its PGs moved"
    );
    let (ok, text) = fio_pass(&url, last_seed, true);
    assert!(ok, "fio verify after the move:\n{text}");
}

//! Full disks (issue 17): nearfull / backfillfull / full ratios on real daemons.
//!
//! - `a_full_pool_answers_enospc_and_rbd_rm_and_shrink_free_it`: OSDs with a small
//!   `--capacity-bytes`, filled through the NBD gateway until a real client (nbdsh, then
//!   qemu-io) gets ENOSPC; health shows OSD_FULL and POOL_FULL; `rbd rm` and `rbd resize
//!   --allow-shrink` work while full; the warnings clear and writes work again.
//! - `backfill_waits_for_a_backfillfull_osd_until_the_ratio_is_raised`: a PG whose new member
//!   is backfillfull shows `backfill_toofull` and completes once the ratio is raised.
//! - `usage_on_a_small_tmpfs_follows_writes_and_removals`: what an OSD without a capacity
//!   reports, measured on a size-limited tmpfs (statvfs), and that removing objects brings it
//!   down again.

use std::process::Command;
use std::time::Duration;

use basalt_config::OsdTuning;
use basalt_tests::{
    qemu_io, qemu_io_ok, run_client, test_timeouts, wait_for, DataCluster, TestCluster,
};
use bytes::Bytes;
use serde_json::Value;

/// The codes of the health checks `basalt health` reports, and its status.
fn health(cluster: &TestCluster) -> (String, Vec<String>, Value) {
    let h = cluster.cli_json(&["health"]).expect("basalt health");
    let codes = h["checks"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (
        h["status"].as_str().unwrap_or_default().to_string(),
        codes,
        h,
    )
}

const MIB: u64 = 1 << 20;

#[test]
fn a_full_pool_answers_enospc_and_rbd_rm_and_shrink_free_it() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    basalt_tests::require_tool("nbdsh", "python3-libnbd (and libnbd-bin)");
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("monitors");
    // Three OSDs of 64 MiB each on three hosts: with size 3 each holds every byte.
    for i in 0..3 {
        let data = cluster.dir.path().join(format!("osd{i}"));
        cluster
            .start_osd_with(vec![
                "--host".into(),
                format!("host{i}"),
                "--data".into(),
                data.display().to_string(),
                "--capacity-bytes".into(),
                (64 * MIB).to_string(),
            ])
            .expect("osd with 64 MiB");
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        full_pool_scenario(&mut cluster)
    }));
    if result.is_err() {
        cluster.dump_logs();
        std::panic::resume_unwind(result.err().expect("panic"));
    }
}

fn full_pool_scenario(cluster: &mut TestCluster) {
    wait_for("3 OSDs up", Duration::from_secs(60), || {
        let map = cluster.cli_json(&["osd", "df"]).ok()?;
        let osds = map["osds"].as_array()?.clone();
        (osds.len() == 3 && osds.iter().all(|o| o["total_bytes"] == 64 * MIB)).then_some(())
    })
    .expect("three OSDs reporting their 64 MiB");
    cluster
        .cli_ok(&[
            "pool",
            "create",
            "rbd",
            "--size",
            "3",
            "--min-size",
            "2",
            "--pg-num",
            "8",
        ])
        .expect("pool");
    // Ratios far enough below the 64 MiB capacity that a write admitted before the map
    // says "full" still fits (it would otherwise wait for room rather than fail).
    for (cmd, ratio) in [
        ("set-nearfull-ratio", "0.3"),
        ("set-backfillfull-ratio", "0.4"),
        ("set-full-ratio", "0.5"),
    ] {
        cluster.cli_ok(&["osd", cmd, ratio]).expect(cmd);
    }
    let out = cluster.cli(&["osd", "set-full-ratio", "0.35"]);
    assert!(!out.status.success(), "full below backfillfull is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nearfull <= backfillfull <= full"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let df = cluster.cli_json(&["osd", "df"]).expect("osd df");
    assert_eq!(
        (
            df["nearfull_ratio"].as_str(),
            df["backfillfull_ratio"].as_str(),
            df["full_ratio"].as_str()
        ),
        (Some("0.3"), Some("0.4"), Some("0.5"))
    );

    // 24 MiB in an image imported with the CLI (no gateway holds it open, so it can be
    // removed later): 37.5 % used, past nearfull.
    let dir = tempfile::tempdir().expect("tempdir");
    let victim_file = dir.path().join("victim.raw");
    std::fs::write(&victim_file, vec![0x11u8; (24 * MIB) as usize]).expect("victim file");
    cluster
        .cli_ok(&[
            "rbd",
            "import",
            victim_file.to_str().expect("path"),
            "rbd/victim",
        ])
        .expect("rbd import");
    wait_for("OSD_NEARFULL", Duration::from_secs(30), || {
        let (_, codes, _) = health(cluster);
        codes.contains(&"OSD_NEARFULL".to_string()).then_some(())
    })
    .expect("nearfull warning at 37.5 %");

    // Fill image vm through the gateway, 1 MiB at a time on one connection, until a write
    // fails: it must fail with ENOSPC (28), not EIO.
    cluster
        .cli_ok(&["rbd", "create", "rbd/vm", "--size", "64M"])
        .expect("rbd create vm");
    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", cluster.gateway_addr(gw));
    let script = dir.path().join("fill.py");
    std::fs::write(
        &script,
        "buf = b'\\xab' * (1 << 20)\n\
         off = 0\n\
         try:\n\
         \x20   while off < h.get_size():\n\
         \x20       h.pwrite(buf, off)\n\
         \x20       off += 1 << 20\n\
         \x20   print('FILLED', off)\n\
         except nbd.Error as e:\n\
         \x20   print('REFUSED', off, e.errno, e.string)\n",
    )
    .expect("script");
    let exec = format!("exec(open({:?}).read())", script.display().to_string());
    let (ok, text) = run_client("nbdsh", &["-u", &url, "-c", &exec]);
    assert!(ok, "nbdsh:\n{text}");
    let refused: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("REFUSED"))
        .unwrap_or_else(|| panic!("the pool never refused a write:\n{text}"))
        .split_whitespace()
        .collect();
    let refused_at: u64 = refused[1].parse().expect("offset");
    // libnbd's Python binding names the errno.
    assert!(
        refused[2] == "ENOSPC" && text.contains("No space left on device"),
        "the refusal is ENOSPC, not EIO: {text}"
    );
    assert!(
        refused_at >= 8 * MIB,
        "refused only at {refused_at}: {text}"
    );
    eprintln!("nbdsh: {}", text.trim());

    // The primary refused on its own use; the map follows with the OSD's next beacon.
    let (status, codes, h) = wait_for("OSD_FULL in health", Duration::from_secs(30), || {
        let h = health(cluster);
        h.1.contains(&"OSD_FULL".to_string()).then_some(h)
    })
    .expect("health shows the full OSD");
    assert_eq!(status, "HEALTH_ERR", "{h}");
    assert!(
        codes.contains(&"OSD_FULL".to_string()) && codes.contains(&"POOL_FULL".to_string()),
        "{h}"
    );
    let detail = h.to_string();
    assert!(detail.contains("is full at"), "the percentage: {h}");
    // One full OSD makes the pool full; the others may not have reported theirs yet.
    let df = cluster.cli_json(&["osd", "df"]).expect("osd df");
    let full: Vec<&Value> = df["osds"]
        .as_array()
        .expect("osds")
        .iter()
        .filter(|o| o["state"] == "full")
        .collect();
    assert!(!full.is_empty(), "{df}");
    for o in full {
        assert!(o["utilization_pct"].as_f64().unwrap_or(0.0) >= 50.0, "{df}");
    }
    // A new connection (its first write must take the image's lock) gets ENOSPC too, and
    // the refused write left nothing behind.
    let (_, text) = qemu_io(&url, &["write -P 0xcd 60M 1M"]);
    assert!(text.contains("No space left on device"), "qemu-io:\n{text}");
    let (ok, text) = qemu_io(
        &url,
        &[&format!("read -P 0 {refused_at} 1M"), "read -P 0 60M 1M"],
    );
    assert!(ok, "refused writes are not visible:\n{text}");

    // Freeing space works while full: rbd rm, then a shrink (both with FULL_TRY).
    assert!(health(cluster).1.contains(&"OSD_FULL".to_string()));
    cluster
        .cli_ok(&["rbd", "rm", "rbd/victim"])
        .expect("rbd rm while full");
    cluster
        .cli_ok(&["rbd", "resize", "rbd/vm", "--size", "4M", "--allow-shrink"])
        .expect("rbd resize --allow-shrink");
    let ls = cluster.cli_json(&["rbd", "ls", "rbd"]).expect("rbd ls");
    assert_eq!(ls, serde_json::json!(["vm"]));
    wait_for(
        "HEALTH_OK once space is free",
        Duration::from_secs(30),
        || {
            let (status, _, _) = health(cluster);
            (status == "HEALTH_OK").then_some(())
        },
    )
    .expect("the warnings clear");
    let text = qemu_io_ok(&url, &["write -P 0x22 0 1M", "read -P 0x22 0 1M"]);
    assert!(text.contains("wrote 1048576"), "{text}");
    let metrics = cluster.mon_metrics(0).expect("monitor metrics");
    assert!(metrics.contains("basalt_mon_pools_full 0"), "{metrics}");
}

#[test]
fn backfill_waits_for_a_backfillfull_osd_until_the_ratio_is_raised() {
    // A short PG log, so a new member is backfilled rather than recovered from the log.
    let tuning = OsdTuning {
        pg_log_entries: 10,
        ..OsdTuning::default()
    };
    let mut f = DataCluster::start_tuned(test_timeouts(), tuning, "data").expect("cluster");
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backfill_scenario(&mut f)));
    if result.is_err() {
        f.cluster.dump_logs();
        std::panic::resume_unwind(result.err().expect("panic"));
    }
}

fn backfill_scenario(f: &mut DataCluster) {
    let io = f.io.clone();
    let data = |i: u64| basalt_tests::pattern(i, 16 << 10);
    f.rt.block_on(async {
        for i in 0..400u64 {
            io.write_full(&format!("obj{i}"), data(i))
                .await
                .expect("write");
        }
    });
    // Two OSDs of one host: `out` moves `leaving`'s PGs to `target`, which must backfill.
    let map = f.rados.osdmap();
    let mut on_host1: Vec<u32> = map
        .osds
        .iter()
        .filter(|(_, o)| o.host == "host1")
        .map(|(id, _)| *id)
        .collect();
    on_host1.sort();
    let (target, leaving) = (on_host1[0], on_host1[1]);
    // The target gets a capacity its data fills a good part of, and the backfillfull ratio
    // goes below its use.
    let ti = f.harness_index(target);
    f.cluster
        .set_osd_arg(ti, "--capacity-bytes", &(16 * MIB).to_string());
    f.cluster.kill_osd(ti);
    f.cluster.restart_osd(ti).expect("restart the target");
    let used = wait_for(
        "the target's use in the map",
        Duration::from_secs(60),
        || {
            let m = f.rados.osdmap();
            let o = m.osds.get(&target)?;
            let u = o.usage?;
            (o.up && u.total_bytes == 16 * MIB && u.used_bytes > 0).then_some(u)
        },
    )
    .expect("usage");
    f.wait_active_clean(Duration::from_secs(120))
        .expect("clean after the restart");
    // Half its use (in units of 1/10000): the target alone is backfillfull (the others hold
    // a few MiB of 8 GiB).
    let ratio = (used.ratio() / 2).max(1);
    let ratio_s = format!("0.{ratio:04}");
    f.cluster
        .cli_ok(&["osd", "set-nearfull-ratio", &ratio_s])
        .expect("nearfull");
    f.cluster
        .cli_ok(&["osd", "set-backfillfull-ratio", &ratio_s])
        .expect("backfillfull");
    wait_for("OSD_BACKFILLFULL", Duration::from_secs(30), || {
        let h = f.cluster.cli_json(&["health"]).ok()?;
        h.to_string()
            .contains(&format!("osd.{target} is backfillfull"))
            .then_some(())
    })
    .expect("the target is backfillfull");

    f.cluster
        .cli_ok(&["osd", "out", &leaving.to_string()])
        .expect("osd out");
    let toofull = wait_for("a PG in backfill_toofull", Duration::from_secs(60), || {
        let stats = f.rt.block_on(f.rados.pg_stats()).ok()?;
        stats.into_iter().find(|s| {
            s.state
                .contains(basalt_client::ops::PgStateFlag::BackfillToofull)
        })
    })
    .expect("backfill waits for the backfillfull OSD");
    assert!(
        toofull.acting.contains(&target),
        "the waiting PG backfills the target: {toofull:?}"
    );
    assert!(
        toofull
            .detail
            .contains(&format!("osd.{target} is backfillfull")),
        "{toofull:?}"
    );
    let pg_ls = f.cluster.cli_ok(&["pg", "ls"]).expect("pg ls");
    assert!(pg_ls.contains("backfill_toofull"), "{pg_ls}");

    // Raised: the backfill runs and every PG ends clean, with its data.
    f.cluster
        .cli_ok(&["osd", "set-backfillfull-ratio", "0.9"])
        .expect("raise backfillfull");
    f.wait_active_clean(Duration::from_secs(120))
        .expect("backfill completes once the ratio is raised");
    f.rt.block_on(async {
        for i in 0..400u64 {
            let got = io.read(&format!("obj{i}"), 0, 1 << 20).await.expect("read");
            assert!(got == data(i), "obj{i} changed");
        }
    });
    wait_for(
        "the target's use grown by the backfill",
        Duration::from_secs(30),
        || {
            let m = f.rados.osdmap();
            m.osds[&target]
                .usage
                .filter(|u| u.used_bytes > used.used_bytes)
        },
    )
    .expect("the target took the backfill");
}

#[test]
fn usage_on_a_small_tmpfs_follows_writes_and_removals() {
    use basalt_osd::store::{ObjectId, Store, StoreConfig, Superblock, Transaction};
    let mnt = tempfile::tempdir().expect("tempdir");
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(mnt.path())
        .output();
    let mounted = matches!(&out, Ok(o) if o.status.success());
    basalt_tests::require(
        mounted,
        "permission to mount a tmpfs",
        &format!("run the test as root (CAP_SYS_ADMIN): mount said {out:?}"),
    );
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).output();
        }
    }
    let _unmount = Unmount(mnt.path());
    let data = mnt.path().join("osd");
    let cfg = StoreConfig {
        journal_bytes: 4 << 20,
        // Bigger than the filesystem: the filesystem is what fills.
        capacity_bytes: Some(1 << 30),
        ..StoreConfig::default()
    };
    let store = Store::mkfs(&data, Superblock::new("fsid", "osd-uuid"), cfg).expect("mkfs");
    let pg = basalt_placement::PgId { pool: 1, seed: 0 };
    let mut t = Transaction::new();
    t.pg_create(pg);
    store.submit_blocking(&t).expect("pg");
    let usage = || basalt_osd::daemon::store_usage(&store, &data).expect("usage");
    let empty = usage();
    assert!(
        empty.total_bytes <= 48 * MIB && empty.total_bytes > 40 * MIB,
        "the filesystem's size, not the capacity: {empty:?}"
    );
    let oid = |i: u64| ObjectId::new(pg, format!("o{i}"));
    for i in 0..16u64 {
        let mut t = Transaction::new();
        t.write_full(&oid(i), Bytes::from(vec![i as u8 + 1; MIB as usize]));
        store.submit_blocking(&t).expect("write");
    }
    let written = usage();
    assert!(
        written.used_bytes >= empty.used_bytes + 16 * MIB,
        "16 MiB written: {empty:?} → {written:?}"
    );
    for i in 0..16u64 {
        let mut t = Transaction::new();
        t.remove(&oid(i));
        store.submit_blocking(&t).expect("remove");
    }
    // Removed data frees its allocation units inside the data file once written home.
    let freed = wait_for(
        "the removed space reported free",
        Duration::from_secs(30),
        || {
            let u = usage();
            (u.used_bytes + 8 * MIB <= written.used_bytes).then_some(u)
        },
    )
    .expect("usage drops after removals");
    eprintln!("tmpfs use: empty {empty:?}, written {written:?}, freed {freed:?}");
}

//! Image snapshots on a real cluster (issue 19): qemu-io patterns through the gateway, a
//! snapshot exported read-only over NBD, protect/rollback/rm through the CLI, trimming after
//! removal, and a snapshot of an image being written that holds exactly a prefix of the
//! acknowledged writes (crash-consistent).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{
    qemu_io, qemu_io_ok, qemu_io_with, run_client, test_timeouts, wait_for, DataCluster, KillOnDrop,
};
use bytes::Bytes;

/// Read-only: a snapshot export has NBD's read-only flag, and qemu refuses to open such an
/// export for writing.
fn qemu_io_ro_ok(url: &str, cmds: &[&str]) {
    let (ok, text) = qemu_io_with(&["-r", "-f", "raw"], url, cmds);
    assert!(ok, "qemu-io -r {cmds:?} on {url} failed:\n{text}");
}

/// The image layer on pool `io` of client `rados`.
fn rbd_of(rados: &basalt_client::Rados, io: basalt_client::IoCtx) -> Rbd {
    Rbd::new(Arc::new(RadosBackend::new(
        rados.clone(),
        io,
        Duration::from_secs(30),
    )))
}

/// Waits (bounded) until none of the first `objects` data objects of the image whose objects
/// are `prefix.<16 hex>` has a clone left.
fn wait_trimmed(
    rt: &tokio::runtime::Runtime,
    io: &basalt_client::IoCtx,
    prefix: &str,
    objects: u64,
    limit: Duration,
) {
    wait_for("every clone trimmed", limit, || {
        (0..objects)
            .map(|n| rt.block_on(io.list_snaps(&format!("{prefix}.{n:016x}"))))
            .all(|l| l.is_ok_and(|l| l.clones.is_empty()))
            .then_some(())
    })
    .expect("trim");
}

#[test]
fn snapshots_through_the_cli_the_gateway_and_a_live_writer() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let raw_io = d.io.clone();
    let rbd = rbd_of(&d.rados, d.io.clone());
    let mut cluster = d.cluster;
    let rt = d.rt;
    rt.block_on(rbd.create("vm1", 64 << 20, 22))
        .expect("create image");
    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let head = format!("nbd://{}/rbd/vm1", cluster.gateway_addr(gw));
    let at_s1 = format!("{head}@s1");

    // Write A, snapshot, write B: the snapshot reads A, the head B.
    qemu_io_ok(&head, &["write -P 0xaa 0 8M"]);
    cluster
        .cli_ok(&["rbd", "snap", "create", "rbd/vm1@s1"])
        .expect("snap create");
    qemu_io_ok(&head, &["write -P 0xbb 0 4M", "write -P 0xcc 6M 64k"]);
    qemu_io_ro_ok(&at_s1, &["read -P 0xaa 0 8M", "read -P 0 8M 1M"]);
    qemu_io_ok(
        &head,
        &[
            "read -P 0xbb 0 4M",
            "read -P 0xaa 4M 2M",
            "read -P 0xcc 6M 64k",
        ],
    );
    // The snapshot export is read-only.
    let (ok, text) = qemu_io(&at_s1, &["write -P 0xdd 0 4k"]);
    assert!(!ok, "a write to a snapshot export succeeded:\n{text}");
    let ls = cluster
        .cli_json(&["rbd", "snap", "ls", "rbd/vm1"])
        .expect("snap ls");
    assert_eq!(ls[0]["name"], "s1", "{ls}");
    assert_eq!(ls[0]["size"], 64 << 20, "{ls}");
    // Only the touched 64 KiB chunks were copied: the first object's clone holds what
    // the 4 MiB write replaced, the second object's clone (0xcc at 6M) one chunk.
    let prefix = rt.block_on(rbd.info("vm1")).expect("info").object_prefix;
    let listing = rt
        .block_on(raw_io.list_snaps(&format!("{prefix}.0000000000000001")))
        .expect("list snaps");
    assert_eq!(listing.clones.len(), 1, "{listing:?}");
    assert_eq!(
        listing.clones[0].differs,
        vec![(2 << 20, 64 << 10)],
        "{listing:?}"
    );

    // Protected snapshots cannot be removed.
    cluster
        .cli_ok(&["rbd", "snap", "protect", "rbd/vm1@s1"])
        .expect("protect");
    let out = cluster.cli(&["rbd", "snap", "rm", "rbd/vm1@s1"]);
    assert!(!out.status.success(), "removed a protected snapshot");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("protected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
        .cli_ok(&["rbd", "snap", "unprotect", "rbd/vm1@s1"])
        .expect("unprotect");

    // Rollback makes the head read A again.
    cluster
        .cli_ok(&["rbd", "snap", "rollback", "rbd/vm1@s1"])
        .expect("rollback");
    qemu_io_ok(&head, &["read -P 0xaa 0 8M", "read -P 0 8M 1M"]);

    // Removing the snapshot trims its clones on the OSDs.
    cluster
        .cli_ok(&["rbd", "snap", "rm", "rbd/vm1@s1"])
        .expect("snap rm");
    let out = cluster.cli(&["rbd", "snap", "rm", "rbd/vm1@s1"]);
    assert!(!out.status.success(), "removed a snapshot twice");
    wait_trimmed(&rt, &raw_io, &prefix, 2, Duration::from_secs(60));

    // A snapshot of an image another client is writing holds exactly the writes
    // acknowledged before it: a prefix of this sequential writer's blocks.
    rt.block_on(rbd.create("vm2", 64 << 20, 22))
        .expect("create vm2");
    let writer = rt.block_on(rbd.open("vm2")).expect("open vm2 for writing");
    let other = rt
        .block_on(basalt_client::Rados::connect(cluster.config.clone()))
        .expect("second client");
    let other_io = other.ioctx("rbd").expect("ioctx");
    let snapper = rbd_of(&other, other_io);
    const BLOCKS: u64 = 240;
    const STRIDE: u64 = 80 << 10; // crosses chunks and objects
    let block = |k: u64| Bytes::from(vec![(k % 250 + 1) as u8; 4096]);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let (acked_before, started_after) = rt.block_on(async {
        let (a, s) = (acked.clone(), started.clone());
        let writing = async move {
            for k in 0..BLOCKS {
                s.store(k + 1, Ordering::SeqCst);
                writer.write(k * STRIDE, block(k)).await.expect("write");
                a.store(k + 1, Ordering::SeqCst);
            }
            writer
        };
        let snapping = async {
            while acked.load(Ordering::SeqCst) < 60 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let before = acked.load(Ordering::SeqCst);
            let img = snapper.open("vm2").await.expect("open vm2 to snapshot");
            img.snap_create("mid")
                .await
                .expect("snapshot while writing");
            let after = started.load(Ordering::SeqCst);
            img.close().await.expect("close");
            (before, after)
        };
        let (writer, cut) = tokio::join!(writing, snapping);
        writer.close().await.expect("close writer");
        cut
    });
    let snap = rt
        .block_on(rbd.open_snapshot("vm2", "mid"))
        .expect("open the snapshot");
    let mut prefix_len = 0;
    for k in 0..BLOCKS {
        let got = rt
            .block_on(snap.read(k * STRIDE, 4096))
            .expect("read snapshot");
        if got == block(k) && prefix_len == k {
            prefix_len = k + 1;
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "block {k} of the snapshot holds data after the cut at {prefix_len}"
            );
        }
    }
    eprintln!(
        "snapshot cut at block {prefix_len} (acknowledged before: {acked_before}, started by \
         its end: {started_after}, of {BLOCKS})"
    );
    assert!(
        (acked_before..=started_after).contains(&prefix_len),
        "the snapshot holds {prefix_len} blocks; acknowledged before it: {acked_before}, \
         started by its end: {started_after}"
    );
    // The head has them all.
    let head_img = rt.block_on(rbd.open("vm2")).expect("open vm2");
    for k in [0, prefix_len, BLOCKS - 1] {
        assert_eq!(
            rt.block_on(head_img.read(k * STRIDE, 4096)).expect("read"),
            block(k)
        );
    }
    // A snapshot cannot be written.
    assert!(matches!(
        rt.block_on(snap.write(0, block(0))),
        Err(basalt_rbd::RbdError::ReadOnly(_))
    ));

    // Incremental backup: a full diff to d1, then d1→d2, applied to another image, give a
    // byte-identical copy at both snapshots; the incremental diff carries what changed.
    rt.block_on(async {
        rbd.create("src", 16 << 20, 22).await?;
        rbd.create("dst", 1 << 20, 22).await?;
        let img = rbd.open("src").await?;
        img.write(0, Bytes::from(vec![0x11; 9 << 20])).await?;
        img.snap_create("d1").await?;
        img.write(5 << 20, Bytes::from(vec![0x22; 4096])).await?;
        img.discard(8 << 20, 1 << 20).await?;
        img.write(12 << 20, Bytes::from(vec![0x33; 100_000]))
            .await?;
        img.snap_create("d2").await?;
        img.write(0, Bytes::from(vec![0x44; 4096])).await?;
        img.close().await
    })
    .expect("source image");
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.diff");
    let inc = dir.path().join("inc.diff");
    let path = |p: &std::path::Path| p.to_str().expect("path").to_string();
    let full_stats = cluster
        .cli_json(&["rbd", "export-diff", "rbd/src@d1", &path(&full)])
        .expect("export-diff d1");
    cluster
        .cli_ok(&["rbd", "import-diff", &path(&full), "rbd/dst"])
        .expect("import-diff d1");
    let inc_stats = cluster
        .cli_json(&[
            "rbd",
            "export-diff",
            "--from-snap",
            "d1",
            "rbd/src@d2",
            &path(&inc),
        ])
        .expect("export-diff d1..d2");
    cluster
        .cli_ok(&["rbd", "import-diff", &path(&inc), "rbd/dst"])
        .expect("import-diff d2");
    assert_eq!(full_stats["data_bytes"], 9 << 20, "{full_stats}");
    // The 64 KiB chunk the 4 KiB write changed (the OSDs track changes per chunk), the
    // new object's 100,000 bytes in 4 KiB blocks, and the discarded MiB.
    assert_eq!(inc_stats["data_bytes"], 65_536 + 102_400, "{inc_stats}");
    assert_eq!(inc_stats["zero_bytes"], 1 << 20, "{inc_stats}");
    let gw_url = |spec: &str| format!("nbd://{}/rbd/{spec}", cluster.gateway_addr(gw));
    for (a, b) in [
        ("src@d2", "dst"),
        ("src@d1", "dst@d1"),
        ("src@d2", "dst@d2"),
    ] {
        let (ok, text) = run_client(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &gw_url(a), &gw_url(b)],
        );
        assert!(ok, "qemu-img compare {a} {b}:\n{text}");
    }
    // A diff whose start snapshot the target lacks is refused.
    rt.block_on(rbd.create("empty", 1 << 20, 22))
        .expect("create");
    let out = cluster.cli(&["rbd", "import-diff", &path(&inc), "rbd/empty"]);
    assert!(
        !out.status.success(),
        "applied a diff without its start snapshot"
    );
}

#[test]
fn a_clone_reads_its_parent_until_it_writes_and_stands_alone_once_flattened() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let rbd = rbd_of(&d.rados, d.io.clone());
    let mut cluster = d.cluster;
    let rt = d.rt;
    rt.block_on(async {
        rbd.create("golden", 32 << 20, 22).await?;
        let img = rbd.open("golden").await?;
        img.write(0, Bytes::from(vec![0xaa; 8 << 20])).await?;
        img.write(12 << 20, Bytes::from(vec![0xbb; 1 << 20]))
            .await?;
        img.close().await
    })
    .expect("golden image");
    cluster
        .cli_ok(&["rbd", "snap", "create", "rbd/golden@base"])
        .expect("snap");
    // Only a protected snapshot can be cloned.
    let out = cluster.cli(&["rbd", "clone", "rbd/golden@base", "rbd/vm-a"]);
    assert!(!out.status.success(), "cloned an unprotected snapshot");
    cluster
        .cli_ok(&["rbd", "snap", "protect", "rbd/golden@base"])
        .expect("protect");
    cluster
        .cli_ok(&["rbd", "clone", "rbd/golden@base", "rbd/vm-a"])
        .expect("clone");
    let children = cluster
        .cli_json(&["rbd", "children", "rbd/golden@base"])
        .expect("children");
    assert_eq!(children[0]["image"], "vm-a", "{children}");
    let info = cluster
        .cli_json(&["rbd", "info", "rbd/vm-a"])
        .expect("info");
    assert_eq!(info["parent"]["snapshot"], "base", "{info}");
    let out = cluster.cli(&["rbd", "rm", "rbd/golden"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("snapshot"),
        "removed an image with snapshots: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let child = format!("nbd://{}/rbd/vm-a", cluster.gateway_addr(gw));
    let parent = format!("nbd://{}/rbd/golden", cluster.gateway_addr(gw));
    let check_child = || {
        qemu_io_ok(
            &child,
            &[
                "read -P 0xaa 0 4M",
                "read -P 0xcc 4M 64k",
                "read -P 0xaa 4160k 4032k",
                "read -P 0 8M 4M",
                "read -P 0 12M 1M",
                "read -P 0 13M 1M",
            ],
        )
    };
    // Reads fall through; a write copies its object up first; a discard hides the parent.
    qemu_io_ok(&child, &["read -P 0xaa 0 8M", "read -P 0xbb 12M 1M"]);
    qemu_io_ok(&child, &["write -P 0xcc 4M 64k", "discard 12M 1M"]);
    check_child();
    // The parent and its snapshot are untouched.
    qemu_io_ok(&parent, &["read -P 0xaa 0 8M", "read -P 0xbb 12M 1M"]);
    qemu_io_ro_ok(
        &format!("{parent}@base"),
        &["read -P 0xaa 0 8M", "read -P 0xbb 12M 1M"],
    );
    // The snapshot cannot be unprotected while it has a clone.
    let out = cluster.cli(&["rbd", "snap", "unprotect", "rbd/golden@base"]);
    assert!(!out.status.success(), "unprotected a snapshot with a clone");

    // Flattened, the clone no longer needs the parent: its snapshot and the parent go.
    cluster
        .cli_ok(&["rbd", "flatten", "rbd/vm-a"])
        .expect("flatten");
    let children = cluster
        .cli_json(&["rbd", "children", "rbd/golden@base"])
        .expect("children");
    assert_eq!(children, serde_json::json!([]));
    for args in [
        ["rbd", "snap", "unprotect", "rbd/golden@base"],
        ["rbd", "snap", "rm", "rbd/golden@base"],
    ] {
        cluster.cli_ok(&args).expect("unprotect, rm");
    }
    check_child();
    let info = cluster
        .cli_json(&["rbd", "info", "rbd/vm-a"])
        .expect("info");
    assert!(info.get("parent").is_none(), "{info}");

    // The trash: a removed disk comes back within its delay.
    rt.block_on(rbd.create("scratch", 4 << 20, 22))
        .expect("create");
    let moved = cluster
        .cli_json(&["rbd", "trash", "mv", "rbd/scratch", "--delay", "3600"])
        .expect("trash mv");
    let id = moved["id"].as_str().expect("id").to_string();
    let listed = cluster.cli_json(&["rbd", "ls", "rbd"]).expect("ls");
    assert!(!listed.to_string().contains("scratch"), "{listed}");
    let trash = cluster
        .cli_json(&["rbd", "trash", "ls", "rbd"])
        .expect("trash ls");
    assert_eq!(trash[0]["name"], "scratch", "{trash}");
    let out = cluster.cli(&["rbd", "trash", "rm", &format!("rbd/{id}")]);
    assert!(
        !out.status.success(),
        "removed a trashed image before its delay"
    );
    cluster
        .cli_ok(&["rbd", "trash", "restore", &format!("rbd/{id}")])
        .expect("trash restore");
    let listed = cluster.cli_json(&["rbd", "ls", "rbd"]).expect("ls");
    assert!(listed.to_string().contains("scratch"), "{listed}");
}

/// Removing a snapshot frees its clones' space on every OSD and leaves no clone in any store,
/// even when an OSD is killed and restarted while its PGs trim. Space is measured with the
/// OSDs' store metrics, which `osd df` reports with a lag.
#[test]
fn removed_snapshots_are_trimmed_and_free_their_space() {
    const MIB: u64 = 1 << 20;
    let tuning = basalt_config::OsdTuning {
        // Slow the trimmer (it sleeps like recovery between objects), so `pg ls` shows it
        // and the kill below lands while PGs trim.
        recovery_sleep_ms: 200,
        ..basalt_config::OsdTuning::default()
    };
    let d = DataCluster::start_tuned(test_timeouts(), tuning, "rbd").expect("cluster");
    let rbd = rbd_of(&d.rados, d.io.clone());
    let mut cluster = d.cluster;
    let rt = d.rt;
    // What the stores hold, live from each OSD's metrics (`osd df` shows what the beacons
    // last put in the map, which records only changes large against the capacity).
    let used = |cluster: &basalt_tests::TestCluster| -> Option<u64> {
        (0..6)
            .map(|i| {
                let text = cluster.osd_metrics(i).ok()?;
                Some(basalt_tests::metric_sum(&text, "basalt_osd_store_used_bytes", "") as u64)
            })
            .sum()
    };
    // 64 objects of 1 MiB, snapshotted, then all overwritten: every object has a full clone.
    rt.block_on(async {
        rbd.create("vm", 64 * MIB, 20).await?;
        let img = rbd.open("vm").await?;
        img.write(0, Bytes::from(vec![1u8; 64 << 20])).await?;
        img.snap_create("s").await?;
        img.write(0, Bytes::from(vec![2u8; 64 << 20])).await?;
        img.close().await
    })
    .expect("image, snapshot, overwrite");
    // Three copies of the head and of the clones.
    wait_for(
        "the clones counted by the stores",
        Duration::from_secs(60),
        || used(&cluster).filter(|u| *u >= 6 * 64 * MIB * 95 / 100),
    )
    .expect("stores holding the clones");

    cluster
        .cli_ok(&["rbd", "snap", "rm", "rbd/vm@s"])
        .expect("snap rm");
    wait_for("a PG trimming", Duration::from_secs(30), || {
        let pgs = cluster.cli_json(&["pg", "ls"]).ok()?;
        pgs.to_string().contains("snaptrim").then_some(())
    })
    .expect("snaptrim in pg ls");
    // Killed and back at once, before the monitors notice: its PGs start a new interval
    // (it booted again) and the trim goes on.
    cluster.kill_osd(0);
    cluster.restart_osd(0).expect("restart osd 0");
    let prefix = rt.block_on(rbd.info("vm")).expect("info").object_prefix;
    let io = d.io.clone();
    wait_trimmed(&rt, &io, &prefix, 64, Duration::from_secs(120));
    wait_for("the clones' space freed", Duration::from_secs(60), || {
        used(&cluster).filter(|u| *u <= 3 * 64 * MIB * 105 / 100)
    })
    .expect("stores after trimming");
    // The head is intact, and no store holds a clone any more.
    let img = rt.block_on(rbd.open("vm")).expect("open");
    assert_eq!(
        rt.block_on(img.read(0, 64 * MIB)).expect("read"),
        Bytes::from(vec![2u8; 64 << 20])
    );
    rt.block_on(img.close()).expect("close");
    let stores = basalt_tests::stores_after_stop(&mut cluster, 6);
    for (i, s) in stores.iter().enumerate() {
        for pg in s.list_pgs().expect("pgs") {
            let page = s.list_objects(pg, None, 100_000).expect("list");
            let clones: Vec<String> = page
                .objects
                .iter()
                .filter(|o| o.snap() != basalt_osd::store::SNAP_HEAD)
                .map(|o| o.to_string())
                .collect();
            assert!(clones.is_empty(), "osd#{i} still holds clones {clones:?}");
        }
    }
}

/// `rbd du` on a real cluster: per snapshot and head, the objects written since the previous
/// point, from the object maps the writer keeps through the gateway; the same after a
/// rebuild, and (with a warning) from the objects when the maps are turned off.
#[test]
fn du_counts_each_snapshot_from_the_object_map() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let mut cluster = d.cluster;
    cluster
        .cli_ok(&["rbd", "create", "rbd/vm", "--size", "256M"])
        .expect("create");
    let info = cluster.cli_json(&["rbd", "info", "rbd/vm"]).expect("info");
    assert_eq!(
        info["features"],
        serde_json::json!(["exclusive-lock", "object-map", "fast-diff"]),
        "{info}"
    );
    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", cluster.gateway_addr(gw));
    const MIB: u64 = 1 << 20;
    let du = |cluster: &basalt_tests::TestCluster| -> Vec<(Option<String>, u64)> {
        let v = cluster.cli_json(&["rbd", "du", "rbd/vm"]).expect("du");
        v["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|r| {
                (
                    r["snapshot"].as_str().map(String::from),
                    r["used_size"].as_u64().expect("used"),
                )
            })
            .collect()
    };
    // Two whole objects and one 4 KiB write in a third.
    qemu_io_ok(&url, &["write -P 1 0 8M", "write -P 2 100M 4k"]);
    assert_eq!(du(&cluster), [(None, 12 * MIB)]);
    cluster
        .cli_ok(&["rbd", "snap", "create", "rbd/vm@s1"])
        .expect("snap create");
    qemu_io_ok(&url, &["write -P 3 0 4k", "write -P 4 200M 4k"]);
    let s1 = Some("s1".to_string());
    assert_eq!(du(&cluster), [(s1.clone(), 12 * MIB), (None, 8 * MIB)]);
    // A discarded whole object is forgotten by the head's map (it was unchanged since s1).
    qemu_io_ok(&url, &["discard 200M 4M"]);
    assert_eq!(du(&cluster), [(s1.clone(), 12 * MIB), (None, 4 * MIB)]);

    // The plain table, and the same numbers after a rebuild.
    let table = cluster.cli_ok(&["rbd", "du", "rbd/vm"]).expect("du table");
    assert!(
        table.contains("vm@s1") && table.contains("<TOTAL>"),
        "{table}"
    );
    cluster
        .cli_ok(&["rbd", "object-map", "rebuild", "rbd/vm"])
        .expect("rebuild");
    assert_eq!(du(&cluster), [(s1.clone(), 12 * MIB), (None, 4 * MIB)]);
    // Without maps, du reads every object and says so.
    cluster
        .cli_ok(&[
            "rbd",
            "feature",
            "disable",
            "rbd/vm",
            "object-map",
            "fast-diff",
        ])
        .expect("feature disable");
    let out = cluster.cli(&["rbd", "du", "rbd/vm"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no valid object map"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(du(&cluster), [(s1.clone(), 12 * MIB), (None, 4 * MIB)]);
    let bad = cluster.cli(&["rbd", "feature", "enable", "rbd/vm", "object-map"]);
    assert!(
        !bad.status.success(),
        "object-map without fast-diff was accepted"
    );
    cluster
        .cli_ok(&[
            "rbd",
            "feature",
            "enable",
            "rbd/vm",
            "object-map",
            "fast-diff",
        ])
        .expect("feature enable");
    qemu_io_ok(&url, &["write -P 5 20M 4k"]);
    assert_eq!(du(&cluster), [(s1, 12 * MIB), (None, 8 * MIB)]);
    // A pool's du lists every image and a total.
    let pool = cluster.cli_json(&["rbd", "du", "rbd"]).expect("pool du");
    assert_eq!(pool["total_used_size"], 20 * MIB, "{pool}");
}

/// A snapshot taken while fio writes through the gateway (sequential 64 KiB writes with
/// crc32c verify headers, one at a time) holds a prefix of fio's writes and zeros after
/// it, and fio's own verify of that prefix passes on the exported snapshot, as does its
/// verify of the head at the end.
#[test]
fn a_snapshot_taken_under_fio_is_crash_consistent() {
    basalt_tests::require_tool("fio", "fio");
    basalt_tests::require_tool("nbdcopy", "libnbd-bin");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let mut cluster = d.cluster;
    cluster
        .cli_ok(&["rbd", "create", "rbd/vm", "--size", "64M"])
        .expect("create");
    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm", cluster.gateway_addr(gw));
    const BS: usize = 64 << 10;
    const SIZE: usize = 48 << 20;
    let job = |extra: &[String]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--name=snapshot",
            "--rw=write",
            "--bs=64k",
            "--iodepth=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=7",
        ]
        .map(String::from)
        .to_vec();
        a.extend_from_slice(extra);
        a
    };
    // Slowed down so the snapshot lands while it writes.
    let mut fio = KillOnDrop(
        std::process::Command::new("fio")
            .args(job(&[
                "--ioengine=nbd".into(),
                format!("--uri={url}"),
                format!("--size={SIZE}"),
                "--rate=6m".into(),
                "--do_verify=1".into(),
            ]))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start fio"),
    );
    // Once fio has written something, snapshot.
    wait_for("fio's first writes", Duration::from_secs(60), || {
        let v = cluster.cli_json(&["rbd", "du", "rbd/vm"]).ok()?;
        (v["total_used_size"].as_u64()? > 0).then_some(())
    })
    .expect("fio wrote nothing");
    cluster
        .cli_ok(&["rbd", "snap", "create", "rbd/vm@mid"])
        .expect("snap create under fio");
    let done = wait_for("fio to finish", Duration::from_secs(300), || {
        fio.0.try_wait().ok().flatten()
    })
    .expect("fio did not finish");
    let mut text = String::new();
    if let Some(mut o) = fio.0.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut text).ok();
    }
    if let Some(mut e) = fio.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut text).ok();
    }
    assert!(
        done.success(),
        "fio (with verify of the head) failed:\n{text}"
    );

    let copy = cluster.dir.path().join("mid.img");
    let (ok, out) = run_client(
        "nbdcopy",
        &[&format!("{url}@mid"), copy.to_str().expect("path")],
    );
    assert!(ok, "nbdcopy of the snapshot failed: {out}");
    let data = std::fs::read(&copy).expect("read the copy");
    let blocks: Vec<&[u8]> = data[..SIZE].chunks(BS).collect();
    let prefix = blocks
        .iter()
        .position(|b| b.iter().all(|x| *x == 0))
        .unwrap_or(blocks.len());
    println!(
        "the snapshot holds fio's first {prefix} of {} blocks",
        blocks.len()
    );
    assert!(prefix > 0, "the snapshot holds none of fio's writes");
    assert!(
        data[prefix * BS..].iter().all(|x| *x == 0),
        "the snapshot holds writes after a gap (block {prefix} is zeros): not a prefix"
    );
    let (ok, out) = run_client(
        "fio",
        &job(&[
            "--ioengine=psync".into(),
            format!("--filename={}", copy.display()),
            format!("--size={}", prefix * BS),
            "--verify_only=1".into(),
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(
        ok,
        "fio's verify of the snapshot's {prefix} blocks failed:\n{out}"
    );
}

/// A golden image holding a small ext4 filesystem: a clone of its protected snapshot gets a
/// new file through NBD while the parent and its snapshot stay as they were (`e2fsck` and
/// `debugfs` on copies read back over NBD); once flattened, the parent's snapshot can go and
/// the clone still holds both files.
#[test]
fn a_filesystem_clone_leaves_its_parent_alone_and_stands_alone_once_flattened() {
    for tool in ["mkfs.ext4", "debugfs", "e2fsck"] {
        basalt_tests::require_tool(tool, "e2fsprogs");
    }
    basalt_tests::require_tool("nbdcopy", "libnbd-bin");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let mut cluster = d.cluster;
    let dir = cluster.dir.path().to_path_buf();
    let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_string();
    let run = |tool: &str, args: &[&str]| -> String {
        let (ok, out) = run_client(tool, args);
        assert!(ok, "{tool} {args:?} failed:\n{out}");
        out
    };
    // The golden filesystem: /hello.txt, built by mkfs from a directory.
    let root = dir.join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("hello.txt"), "hello from the golden image\n").expect("write");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            root.to_str().expect("path"),
            &path("golden.img"),
            "64M",
        ],
    );
    cluster
        .cli_ok(&["rbd", "import", &path("golden.img"), "rbd/golden"])
        .expect("import");
    for args in [
        &["rbd", "snap", "create", "rbd/golden@base"][..],
        &["rbd", "snap", "protect", "rbd/golden@base"],
        &["rbd", "clone", "rbd/golden@base", "rbd/vm"],
    ] {
        cluster.cli_ok(args).expect("snapshot and clone");
    }
    let gw = cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = |spec: &str| format!("nbd://{}/rbd/{spec}", cluster.gateway_addr(gw));
    // Reads an export into a file and checks the filesystem there; returns the files'
    // contents as debugfs prints them.
    let check = |spec: &str| -> String {
        let copy = path(&format!("{}.img", spec.replace('@', "-")));
        let _ = std::fs::remove_file(&copy);
        run("nbdcopy", &[&url(spec), &copy]);
        run("e2fsck", &["-f", "-n", &copy]);
        let mut out = run("debugfs", &["-R", "cat /hello.txt", &copy]);
        out += &run_client("debugfs", &["-R", "cat /vm.txt", &copy]).1;
        out
    };
    // The VM adds a file: edited in a local copy, written back over NBD.
    let vm = check("vm");
    assert!(vm.contains("hello from the golden image"), "{vm}");
    std::fs::write(dir.join("vm.txt"), "written by the clone\n").expect("write");
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} vm.txt", path("vm.txt")),
            &path("vm.img"),
        ],
    );
    run("nbdcopy", &[&path("vm.img"), &url("vm")]);

    let vm = check("vm");
    assert!(
        vm.contains("hello from the golden image") && vm.contains("written by the clone"),
        "{vm}"
    );
    for spec in ["golden", "golden@base"] {
        let parent = check(spec);
        assert!(
            parent.contains("hello from the golden image"),
            "{spec}: {parent}"
        );
        assert!(
            !parent.contains("written by the clone"),
            "{spec} changed: {parent}"
        );
    }
    for args in [
        &["rbd", "flatten", "rbd/vm"][..],
        &["rbd", "snap", "unprotect", "rbd/golden@base"],
        &["rbd", "snap", "rm", "rbd/golden@base"],
    ] {
        cluster
            .cli_ok(args)
            .expect("flatten and remove the parent's snapshot");
    }
    let vm = check("vm");
    assert!(
        vm.contains("hello from the golden image") && vm.contains("written by the clone"),
        "{vm}"
    );
}

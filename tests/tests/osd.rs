//! Process-level tests of the OSD daemon's life cycle: real `basalt-osd` and `basalt-mon`
//! processes, the real CLI.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use basalt_client::MonClient;
use basalt_maps::OsdMap;
use basalt_tests::{bin, run_bounded, test_timeouts, wait_for, TestCluster};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The latest map once `cond` holds for it (bounded).
fn wait_map(
    rt: &tokio::runtime::Runtime,
    mon: &MonClient,
    what: &str,
    cond: impl Fn(&OsdMap) -> bool,
) -> Arc<OsdMap> {
    wait_for(what, Duration::from_secs(30), || {
        rt.block_on(mon.osdmap())
            .ok()
            .filter(|m| cond(m))
            .map(Arc::new)
    })
    .expect(what)
}

fn all_up(m: &OsdMap, n: usize) -> bool {
    m.osds.len() == n && m.osds.values().all(|o| o.up && o.is_in())
}

#[test]
fn six_osds_on_three_hosts_boot_and_place_across_hosts() {
    let rt = runtime();
    let _guard = rt.enter();
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    for i in 0..6 {
        cluster
            .start_osd(&format!("host{}", i / 2))
            .expect("start osd");
    }
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(10)).expect("client");
    wait_map(&rt, &mon, "6 OSDs up and in", |m| all_up(m, 6));

    let tree = cluster.cli_json(&["osd", "tree"]).expect("osd tree");
    let nodes = tree["nodes"].as_array().expect("nodes");
    let of_type = |t: &str| nodes.iter().filter(|n| n["type"] == t).collect::<Vec<_>>();
    let osds = of_type("osd");
    assert_eq!(osds.len(), 6, "{tree}");
    for o in &osds {
        assert_eq!(o["status"], "up", "{tree}");
        assert_eq!(o["reweight"], 1.0, "{tree}");
    }
    let hosts: BTreeSet<_> = of_type("host")
        .iter()
        .map(|h| h["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        hosts,
        ["host0", "host1", "host2"].map(String::from).into(),
        "{tree}"
    );

    cluster
        .cli_ok(&["pool", "create", "rbd"])
        .expect("create rbd");
    let placed = cluster
        .cli_json(&["osd", "map", "rbd", "obj"])
        .expect("osd map");
    let acting: Vec<u32> = placed["acting"]
        .as_array()
        .expect("acting")
        .iter()
        .filter_map(|v| v.as_u64().map(|x| x as u32))
        .collect();
    assert_eq!(acting.len(), 3, "{placed}");
    let map = rt.block_on(mon.osdmap()).expect("map");
    let placed_hosts: BTreeSet<_> = acting.iter().map(|id| map.osds[id].host.clone()).collect();
    assert_eq!(placed_hosts.len(), 3, "not on 3 hosts: {placed} in {tree}");
    for i in 0..6 {
        assert!(cluster.osd_alive(i), "osd#{i} exited");
    }
}

#[test]
fn killed_osd_is_marked_down_and_comes_back_with_its_id() {
    let rt = runtime();
    let _guard = rt.enter();
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    for h in 0..3 {
        cluster.start_osd(&format!("host{h}")).expect("start osd");
    }
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(10)).expect("client");
    let map = wait_map(&rt, &mon, "3 OSDs up", |m| all_up(m, 3));
    let (&victim, _) = map
        .osds
        .iter()
        .find(|(_, o)| o.host == "host0")
        .expect("the OSD on host0");

    // Let the victim see (and so persist) the map before the power cut.
    wait_for("osd#0 to see the map", Duration::from_secs(30), || {
        let text = cluster.osd_metrics(0).ok()?;
        let epoch = text
            .lines()
            .find_map(|l| l.strip_prefix("basalt_osd_map_epoch "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        (epoch >= map.epoch as f64).then_some(())
    })
    .expect("map seen");
    cluster.kill_osd(0);
    let down = wait_map(&rt, &mon, "the killed OSD marked down", |m| {
        m.osds.get(&victim).is_some_and(|o| !o.up)
    });
    for (id, o) in &down.osds {
        if *id != victim {
            assert!(o.up, "osd.{id} went down with osd.{victim}: {down:?}");
        }
    }

    cluster.restart_osd(0).expect("restart");
    let back = wait_map(&rt, &mon, "the restarted OSD up again", |m| all_up(m, 3));
    assert_eq!(back.osds[&victim].host, "host0", "same id, same host");
    // It remembered the newest map epoch it had seen before the kill.
    let log = cluster.osd_log(0);
    let restarted = log
        .lines()
        .filter(|l| l.contains("osd starting"))
        .nth(1)
        .expect("a second start in the log");
    assert!(
        !restarted.contains("last_map_epoch=0"),
        "restart forgot its map epoch: {restarted}"
    );
    assert!(
        log.contains(&format!("osd.{victim}")),
        "the OSD logs its id"
    );
}

#[test]
fn osd_without_monitors_retries_then_stops_cleanly_and_other_cluster_store_is_refused() {
    // Cluster A: its monitors never start.
    let mut a =
        TestCluster::config_only_with_fsid(3, test_timeouts(), "fsid-aaaa").expect("config A");
    let i = a.start_osd("host0").expect("start osd");
    wait_for("boot retries in the log", Duration::from_secs(30), || {
        a.osd_log(i).contains("retrying").then_some(())
    })
    .expect("retrying");
    assert!(a.osd_alive(i), "the OSD must keep retrying, not exit");
    let status = a
        .stop_osd(i, Duration::from_secs(15))
        .expect("exits on SIGTERM");
    assert!(
        status.success(),
        "unclean exit {status:?}: {}",
        a.osd_log(i)
    );

    // The store A formatted, offered to cluster B, is refused with the fsids named.
    let mut b =
        TestCluster::config_only_with_fsid(1, test_timeouts(), "fsid-bbbb").expect("config B");
    let j = b
        .start_osd_with(vec![
            "--host".into(),
            "host0".into(),
            "--data".into(),
            a.osd_data(i).display().to_string(),
        ])
        .expect("start osd");
    let status = b
        .wait_osd_exit(j, Duration::from_secs(30))
        .expect("refusal exits");
    assert!(!status.success());
    let log = b.osd_log(j);
    let err: Vec<_> = log.lines().filter(|l| l.contains("basalt-osd:")).collect();
    assert_eq!(err.len(), 1, "one error line expected: {log}");
    assert!(
        err[0].contains("fsid-aaaa") && err[0].contains("fsid-bbbb"),
        "unclear error: {}",
        err[0]
    );

    // A missing config file: one line, non-zero.
    let out = run_bounded(
        std::process::Command::new(bin("basalt-osd"))
            .args(["--config", "/nonexistent/cluster.toml", "--data"])
            .arg(b.dir.path().join("x")),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/cluster.toml"), "{stderr}");
}

#[test]
fn osd_metrics_pass_promtool() {
    let mut cluster = TestCluster::start_mons(1, test_timeouts()).expect("start monitor");
    let i = cluster.start_osd("host0").expect("start osd");
    let text = wait_for("osd metrics", Duration::from_secs(30), || {
        cluster
            .osd_metrics(i)
            .ok()
            .filter(|t| t.contains("basalt_osd_up 1") && !t.contains("basalt_osd_beacons_total 0"))
    })
    .expect("metrics");
    for needle in [
        "basalt_osd_map_epoch",
        "basalt_osd_beacons_total",
        "basalt_osd_heartbeat_failures_reported_total",
        "basalt_osd_store_used_bytes",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    basalt_tests::promtool_check(&text).expect("the OSD's metrics pass promtool");
}

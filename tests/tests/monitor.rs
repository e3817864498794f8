//! Process-level tests of the monitors: real `basalt-mon` daemons and the real CLI.

use std::collections::BTreeSet;
use std::time::Duration;

use basalt_client::{ClientError, MonClient};
use basalt_tests::{test_timeouts, wait_for, TestCluster};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn leader_of(rt: &tokio::runtime::Runtime, mon: &MonClient) -> Option<u32> {
    rt.block_on(mon.status())
        .ok()
        .map(|s| s.leader)
        .filter(|l| *l != u32::MAX)
}

#[test]
fn leader_kill_loses_no_acknowledged_pool_creation() {
    let rt = runtime();
    // Clients are built outside block_on; they need the runtime entered.
    let _guard = rt.enter();
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(15)).expect("client");
    let leader =
        wait_for("a leader", Duration::from_secs(30), || leader_of(&rt, &mon)).expect("leader");

    // A stream of creations; the leader dies in the middle of it.
    let mut acked = BTreeSet::new();
    let mut failed = 0;
    for i in 0..40 {
        if i == 15 {
            cluster.kill_mon(leader);
        }
        let name = format!("pool-{i}");
        match rt.block_on(mon.pool_create(&name, 3, 2, 8)) {
            Ok(_) => {
                acked.insert(name);
            }
            Err(ClientError::Ambiguous(_)) | Err(ClientError::NoQuorum(_)) => failed += 1,
            Err(e) => panic!("unexpected error creating {name}: {e}"),
        }
    }
    assert!(
        acked.len() >= 30,
        "only {} of 40 creations acknowledged ({failed} failed)",
        acked.len()
    );

    // A new leader serves, and holds every acknowledged creation.
    let new_leader = wait_for("a new leader", Duration::from_secs(30), || {
        leader_of(&rt, &mon).filter(|l| *l != leader)
    })
    .expect("new leader");
    assert_ne!(new_leader, leader);
    let map = rt.block_on(mon.osdmap()).expect("osdmap");
    for name in &acked {
        assert!(
            map.pool_by_name(name).is_some(),
            "acknowledged pool {name} is missing"
        );
    }

    // The killed monitor restarts and catches up.
    cluster.start_mon(leader).expect("restart");
    let direct = MonClient::with_timeout(cluster.config_for_mon(leader), Duration::from_secs(5))
        .expect("client");
    let caught_up = wait_for(
        "the restarted monitor to catch up",
        Duration::from_secs(60),
        || {
            rt.block_on(direct.osdmap())
                .ok()
                .filter(|m| m.epoch >= map.epoch)
        },
    )
    .expect("catch up");
    for name in &acked {
        assert!(
            caught_up.pool_by_name(name).is_some(),
            "restarted monitor lacks {name}"
        );
    }
    // And the cluster still changes.
    rt.block_on(mon.pool_create("after-restart", 3, 2, 8))
        .expect("create after restart");
}

#[test]
fn without_quorum_mutations_fail_clearly() {
    let rt = runtime();
    // Clients are built outside block_on; they need the runtime entered.
    let _guard = rt.enter();
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(15)).expect("client");
    wait_for("a leader", Duration::from_secs(30), || leader_of(&rt, &mon)).expect("leader");
    cluster
        .cli_ok(&["pool", "create", "before"])
        .expect("create with quorum");

    cluster.kill_mon(0);
    cluster.kill_mon(1);
    let out = cluster.cli(&["--timeout", "5", "pool", "create", "during"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a mutation without quorum must fail");
    assert!(stderr.contains("no quorum"), "unclear error: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one-line error expected: {stderr}"
    );
    assert!(cluster.mon_alive(2), "the surviving monitor must not crash");

    // Quorum back → the cluster serves again, and the failed creation did not happen.
    cluster.start_mon(1).expect("restart mon.1");
    let pools = wait_for("quorum again", Duration::from_secs(60), || {
        cluster.cli_json(&["--timeout", "5", "pool", "ls"]).ok()
    })
    .expect("pool ls");
    let names: Vec<&str> = pools
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, vec!["before"]);
}

#[test]
fn bad_input_gets_clear_errors_and_no_crash() {
    let mut cluster = TestCluster::start_mons(1, test_timeouts()).expect("start monitor");
    cluster
        .cli_ok(&["pool", "create", "rbd", "--pg-num", "16"])
        .expect("create");

    let cases: &[(&[&str], &str)] = &[
        (&["pool", "create", "rbd"], "already exists"),
        (
            &["pool", "create", "small", "--size", "2", "--min-size", "3"],
            "min_size 3",
        ),
        (&["pool", "create", "zero", "--pg-num", "0"], "pg_num 0"),
        (&["pool", "rm", "nope"], "does not exist"),
        (
            &["pool", "set", "rbd", "colour", "blue"],
            "unknown pool setting",
        ),
        (&["pool", "set", "rbd", "size", "many"], "whole number"),
        (
            &["pool", "set", "rbd", "pg_num", "8"],
            "pg_num cannot shrink",
        ),
        (&["pool", "get", "nope"], "does not exist"),
        (&["osd", "out", "42"], "osd.42 does not exist"),
        (&["osd", "reweight", "0", "1.5"], "between 0.0 and 1.0"),
        (&["osd", "map", "nope", "obj"], "does not exist"),
        (&["osd", "set", "nosuchflag"], "unknown flag"),
        (
            &["osd", "blocklist", "rm", "client.never"],
            "not blocklisted",
        ),
    ];
    for (args, needle) in cases {
        let out = cluster.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "basalt {args:?} should fail");
        assert!(
            stderr.contains(needle),
            "basalt {args:?}: {stderr:?} should mention {needle:?}"
        );
        assert!(stderr.starts_with("error: "), "basalt {args:?}: {stderr:?}");
    }

    // A malformed config is refused by the daemon and the CLI, naming the file.
    let bad = cluster.dir.path().join("bad.toml");
    std::fs::write(&bad, "[cluster]\nfsid = \n").expect("write");
    let out = basalt_tests::run_bounded(
        std::process::Command::new(basalt_tests::bin("basalt-mon")).args([
            "--config",
            &bad.display().to_string(),
            "--id",
            "0",
        ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
    let out = basalt_tests::run_bounded(
        std::process::Command::new(basalt_tests::bin("basalt")).args([
            "-c",
            &bad.display().to_string(),
            "status",
        ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));

    assert!(cluster.mon_alive(0), "monitor crashed on bad input");
    let pools = cluster.cli_json(&["pool", "ls"]).expect("pool ls");
    assert_eq!(pools.as_array().map(Vec::len), Some(1));
}

#[test]
fn cli_reads_and_writes_the_map() {
    let cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    let stat = wait_for("quorum", Duration::from_secs(30), || {
        cluster.cli_json(&["mon", "stat"]).ok()
    })
    .expect("mon stat");
    let quorum = stat["quorum"].as_array().expect("quorum").len();
    assert!(quorum >= 2, "{stat}");
    assert_eq!(stat["mons"].as_array().map(Vec::len), Some(3));

    cluster
        .cli_ok(&["pool", "create", "rbd", "--size", "3", "--pg-num", "32"])
        .expect("create");
    let pool = cluster.cli_json(&["pool", "get", "rbd"]).expect("get");
    assert_eq!(pool["size"], 3);
    assert_eq!(pool["min_size"], 2);
    assert_eq!(pool["pg_num"], 32);
    cluster
        .cli_ok(&["pool", "set", "rbd", "min_size", "1"])
        .expect("set");
    assert_eq!(
        cluster
            .cli_json(&["pool", "get", "rbd", "min_size"])
            .expect("get"),
        1
    );

    cluster
        .cli_ok(&["osd", "blocklist", "add", "client.gw1", "--expire", "600"])
        .expect("blocklist add");
    let bl = cluster.cli_json(&["osd", "blocklist", "ls"]).expect("ls");
    assert_eq!(bl[0]["entity"], "client.gw1");
    cluster
        .cli_ok(&["osd", "blocklist", "rm", "client.gw1"])
        .expect("rm");
    assert_eq!(
        cluster
            .cli_json(&["osd", "blocklist", "ls"])
            .expect("ls")
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    cluster.cli_ok(&["osd", "set", "noout"]).expect("set noout");
    let health = cluster.cli_json(&["health"]).expect("health");
    assert_ne!(health["status"], "HEALTH_OK");
    assert!(health["checks"].to_string().contains("OSDMAP_FLAGS"));
    cluster.cli_ok(&["osd", "unset", "noout"]).expect("unset");
    let health = cluster.cli_json(&["health"]).expect("health");
    assert!(!health["checks"].to_string().contains("OSDMAP_FLAGS"));
    // No OSDs at all: the pool cannot be served, which health says.
    assert_eq!(health["status"], "HEALTH_ERR");
    assert!(health["checks"].to_string().contains("POOL_UNDERSIZED"));

    let status = cluster.cli_json(&["status"]).expect("status");
    assert_eq!(status["pools"], 1);
    assert!(status["osdmap"]["epoch"].as_u64().unwrap_or(0) >= 5);
    let text = cluster.cli_ok(&["status"]).expect("status");
    assert!(text.contains("mon: 3 daemons"), "{text}");

    cluster.cli_ok(&["pool", "rm", "rbd"]).expect("rm");
    assert_eq!(
        cluster
            .cli_json(&["pool", "ls"])
            .expect("ls")
            .as_array()
            .map(Vec::len),
        Some(0)
    );
}

/// OSD registration and the down/out policy, driven through the real API as an OSD would.
#[test]
fn osds_boot_get_marked_down_then_out() {
    let rt = runtime();
    // Clients are built outside block_on; they need the runtime entered.
    let _guard = rt.enter();
    let mut timeouts = test_timeouts();
    timeouts.down_out_interval_secs = 2;
    let cluster = TestCluster::start_mons(3, timeouts).expect("start monitors");
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(15)).expect("client");
    // Each "OSD" authenticates as itself: boots, beacons and failure reports are only taken
    // from osd.N about N.
    let osd_mons: Vec<MonClient> = (0..6u32)
        .map(|i| {
            let creds = basalt_client::Credentials::load(
                &cluster.osd_keyring_path(i as usize),
                Some(&basalt_auth::EntityName::osd(i)),
            )
            .expect("osd keyring");
            MonClient::with_credentials(cluster.config.clone(), Duration::from_secs(15), creds)
                .expect("client")
        })
        .collect();
    let mut ids = Vec::new();
    for i in 0..6u32 {
        let (id, _) = rt
            .block_on(osd_mons[i as usize].osd_boot(
                i,
                &format!("uuid-{i}"),
                &format!("127.0.0.1:{}", 7000 + i),
                &format!("host{}", i / 2),
                0,
            ))
            .expect("boot");
        ids.push(id);
    }
    assert_eq!(ids, vec![0, 1, 2, 3, 4, 5]);
    // Re-registration with the same uuid keeps the id.
    let (again, _) = rt
        .block_on(osd_mons[3].osd_boot(3, "uuid-3", "127.0.0.1:7103", "host1", 0))
        .expect("reboot");
    assert_eq!(again, 3);

    let tree = cluster.cli_json(&["osd", "tree"]).expect("tree");
    let hosts = tree["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["type"] == "host")
        .count();
    assert_eq!(hosts, 3, "{tree}");
    cluster
        .cli_ok(&["pool", "create", "rbd", "--pg-num", "64"])
        .expect("pool");
    let m = cluster
        .cli_json(&["osd", "map", "rbd", "some-object"])
        .expect("map");
    assert_eq!(m["up"].as_array().map(Vec::len), Some(3), "{m}");
    let df = cluster.cli_json(&["osd", "df"]).expect("df");
    let pgs: u64 = df["osds"]
        .as_array()
        .expect("osds")
        .iter()
        .map(|o| o["pgs"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(pgs, 64 * 3);

    // Beacons keep 0..4 alive; osd.5 goes silent → down, then out.
    let beacons = {
        let osd_mons = osd_mons.clone();
        rt.spawn(async move {
            loop {
                for id in 0..5 {
                    let _ = osd_mons[id as usize].osd_beacon(id, 0, None).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let map = wait_for("osd.5 down and out", Duration::from_secs(60), || {
        rt.block_on(mon.osdmap())
            .ok()
            .filter(|m| !m.osds[&5].up && !m.osds[&5].is_in())
    })
    .expect("down+out");
    assert!(
        (0..5).all(|id| map.osds[&id].up && map.osds[&id].is_in()),
        "live OSDs stayed up: {:?}",
        map.osds
    );

    // With noout, a peer-reported failure marks down but not out.
    cluster.cli_ok(&["osd", "set", "noout"]).expect("noout");
    let epoch = rt.block_on(mon.osdmap()).expect("map").epoch;
    rt.block_on(osd_mons[0].osd_failure(0, 4, 5_000, epoch, true))
        .expect("report");
    rt.block_on(osd_mons[2].osd_failure(2, 4, 5_000, epoch, true))
        .expect("report");
    let map = wait_for("osd.4 reported down", Duration::from_secs(30), || {
        rt.block_on(mon.osdmap()).ok().filter(|m| !m.osds[&4].up)
    })
    .expect("down");
    assert!(map.osds[&4].is_in());
    beacons.abort();
    let health = cluster.cli_json(&["health", "detail"]).expect("health");
    assert!(
        health["checks"].to_string().contains("OSD_DOWN"),
        "{health}"
    );
}

#[test]
fn subscribers_see_every_new_epoch() {
    let rt = runtime();
    // Clients are built outside block_on; they need the runtime entered.
    let _guard = rt.enter();
    let cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(15)).expect("client");
    let mut sub = rt.block_on(mon.subscribe()).expect("subscribe");
    let start = sub.current().epoch;
    for i in 0..5 {
        let reply = rt
            .block_on(mon.pool_create(&format!("p{i}"), 2, 1, 8))
            .expect("create");
        let map = rt
            .block_on(sub.wait_for_epoch(reply.epoch, Duration::from_secs(20)))
            .expect("subscription keeps up");
        assert!(map.pool_by_name(&format!("p{i}")).is_some());
    }
    assert!(sub.current().epoch >= start + 5);
    // An old epoch is served from history.
    let old = rt.block_on(mon.osdmap_at(start + 1)).expect("old epoch");
    assert_eq!(old.epoch, start + 1);
}

#[test]
fn monitor_metrics_pass_promtool() {
    let cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    wait_for("quorum", Duration::from_secs(30), || {
        cluster.cli_json(&["mon", "stat"]).ok()
    })
    .expect("quorum");
    cluster.cli_ok(&["pool", "create", "rbd"]).expect("create");
    let text = wait_for("metrics", Duration::from_secs(30), || {
        cluster
            .mon_metrics(0)
            .ok()
            .filter(|t| t.contains("basalt_mon_paxos_commit_seconds_bucket"))
    })
    .expect("mon.0 metrics");
    for needle in [
        "basalt_mon_in_quorum 1",
        "basalt_mon_quorum_size 3",
        "basalt_mon_osdmap_epoch",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    for rank in 0..3 {
        let text = cluster.mon_metrics(rank).expect("metrics");
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
        use std::io::Write;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool rejects mon.{rank}'s metrics: {}",
            basalt_tests::output_text(&out)
        );
    }
}

#[test]
fn five_monitors_survive_losing_two() {
    let rt = runtime();
    // Clients are built outside block_on; they need the runtime entered.
    let _guard = rt.enter();
    let mut cluster = TestCluster::start_mons(5, test_timeouts()).expect("start monitors");
    let mon =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(20)).expect("client");
    let leader =
        wait_for("a leader", Duration::from_secs(30), || leader_of(&rt, &mon)).expect("leader");
    rt.block_on(mon.pool_create("a", 3, 2, 8))
        .expect("create with 5");

    // Lose the leader and one more: 3 of 5 is still a majority.
    let other = (leader + 1) % 5;
    cluster.kill_mon(leader);
    cluster.kill_mon(other);
    rt.block_on(mon.pool_create("b", 3, 2, 8))
        .expect("create with 3 of 5");
    let st = rt.block_on(mon.status()).expect("status");
    let quorum: Vec<u32> = st
        .mons
        .iter()
        .filter(|m| m.in_quorum)
        .map(|m| m.rank)
        .collect();
    assert_eq!(quorum.len(), 3, "{quorum:?}");
    assert!(!quorum.contains(&leader) && !quorum.contains(&other));

    // A third loss leaves a minority: a clear error, not a hang.
    let third = (leader + 2) % 5;
    cluster.kill_mon(third);
    let short =
        MonClient::with_timeout(cluster.config.clone(), Duration::from_secs(5)).expect("client");
    // If the leader had already proposed it when its quorum broke, the outcome
    // is honestly unknown (and a later leader may finish it); otherwise it
    // must never appear.
    let definitely_not_applied = match rt.block_on(short.pool_create("c", 3, 2, 8)) {
        Err(ClientError::NoQuorum(_)) => true,
        Err(ClientError::Ambiguous(_)) => false,
        other => panic!("expected no quorum, got {other:?}"),
    };
    // Everyone back: all five agree on the map, without "c".
    for r in [leader, other, third] {
        cluster.start_mon(r).expect("restart");
    }
    for rank in 0..5 {
        let direct = MonClient::with_timeout(cluster.config_for_mon(rank), Duration::from_secs(5))
            .expect("client");
        let map = wait_for("every monitor caught up", Duration::from_secs(60), || {
            rt.block_on(direct.osdmap())
                .ok()
                .filter(|m| m.pool_by_name("b").is_some())
        })
        .expect("caught up");
        assert!(map.pool_by_name("a").is_some());
        if definitely_not_applied {
            assert!(
                map.pool_by_name("c").is_none(),
                "a refused creation appeared"
            );
        }
    }
}

//! Process-level tests of the auth database: `basalt auth ...` against three real monitors.
//! The monitors seed client.admin from their bootstrap keyring (as `basalt cluster up` lays
//! it out); keys and caps commit through Paxos, survive a leader's death, and bad input is
//! refused with an error that names the problem, changing nothing. No timing assertions.
//!
//! Not tested here because not built yet: authentication on the wire and caps enforcement
//! (README "Status").

use std::process::Command;
use std::time::Duration;

use basalt_auth::{EntityName, Keyring, Secret};
use basalt_tests::{bin, run_bounded, test_timeouts, wait_for, TestCluster};
use serde_json::Value;

fn entity_names(ls: &Value) -> Vec<String> {
    ls["entities"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["entity"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A failed CLI call: non-zero exit and an `error:` line mentioning `needle`.
fn assert_refused(cluster: &TestCluster, args: &[&str], needle: &str) {
    let out = cluster.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(needle),
        "{args:?}: {stderr:?} should mention {needle:?}"
    );
}

#[test]
fn auth_commands_manage_keys_and_caps_through_the_quorum() {
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    let admin_ring = Keyring::load(&cluster.admin_keyring_path()).expect("admin keyring");
    let admin: EntityName = "client.admin".parse().expect("name");

    // The first leader seeds the database from the bootstrap keyring.
    let seeded = wait_for(
        "client.admin in the auth database",
        Duration::from_secs(60),
        || cluster.cli_json(&["auth", "get", "client.admin"]).ok(),
    )
    .expect("seeded");
    assert_eq!(
        seeded["entities"][0]["key"].as_str(),
        Some(
            admin_ring
                .key(&admin)
                .expect("admin key")
                .to_base64()
                .as_str()
        ),
        "the database holds the admin keyring's key"
    );
    assert_eq!(seeded["entities"][0]["caps"]["mon"], "allow *");
    let ls = cluster.cli_json(&["auth", "ls"]).expect("ls");
    assert_eq!(entity_names(&ls), vec!["client.admin", "mon."]);

    // get-or-create: a fresh key, then the same key again; the plain output is a keyring.
    let text = cluster
        .cli_ok(&[
            "auth",
            "get-or-create",
            "client.ro",
            "mon",
            "allow r",
            "osd",
            "allow r pool=rbd",
        ])
        .expect("get-or-create");
    let ring = Keyring::parse(&text).expect("keyring output");
    let ro: EntityName = "client.ro".parse().expect("name");
    let ro_key = ring.key(&ro).expect("ro key").clone();
    assert_eq!(
        ring.get(&ro).expect("entry").caps.get("osd"),
        Some("allow r pool=rbd")
    );
    let again = cluster
        .cli_json(&[
            "auth",
            "get-or-create",
            "client.ro",
            "mon",
            "allow r",
            "osd",
            "allow r pool=rbd",
        ])
        .expect("get-or-create again");
    assert_eq!(
        again["entities"][0]["key"].as_str(),
        Some(ro_key.to_base64().as_str())
    );

    // Refusals name the problem and change nothing.
    assert_refused(
        &cluster,
        &["auth", "get-or-create", "client.ro", "osd", "allow rw"],
        "already exists",
    );
    assert_refused(
        &cluster,
        &["auth", "add", "client.bad", "osd", "allow rz"],
        "'rz' is not r, w, x",
    );
    assert_refused(&cluster, &["auth", "add", "admin"], "not an entity name");
    assert_refused(
        &cluster,
        &["auth", "add", "client.x", "mds", "allow"],
        "unknown service 'mds'",
    );
    assert_refused(&cluster, &["auth", "rm", "client.nobody"], "does not exist");
    assert_eq!(
        entity_names(&cluster.cli_json(&["auth", "ls"]).expect("ls")),
        vec!["client.admin", "client.ro", "mon."]
    );

    // add -i registers a key made elsewhere; -o writes a keyring file.
    let imported = cluster.dir.path().join("imported.keyring");
    let mut made = Keyring::new();
    let gw: EntityName = "client.gw9".parse().expect("name");
    let gw_key = Secret::generate().expect("random");
    made.insert(gw.clone(), gw_key.clone(), Default::default());
    made.save(&imported).expect("write keyring");
    let out = cluster.dir.path().join("gw9.keyring");
    cluster
        .cli_ok(&[
            "auth",
            "add",
            "client.gw9",
            "mon",
            "allow profile rbd",
            "-i",
            &imported.display().to_string(),
            "-o",
            &out.display().to_string(),
        ])
        .expect("add -i");
    let written = Keyring::load(&out).expect("written keyring");
    assert_eq!(written.key(&gw).expect("key"), &gw_key);

    // caps replaces every service's cap.
    cluster
        .cli_ok(&["auth", "caps", "client.ro", "osd", "allow rw pool=vms"])
        .expect("caps");
    let got = cluster
        .cli_json(&["auth", "get", "client.ro"])
        .expect("get");
    assert_eq!(got["entities"][0]["caps"]["osd"], "allow rw pool=vms");
    assert!(got["entities"][0]["caps"].get("mon").is_none());
    assert_eq!(
        got["entities"][0]["key"].as_str(),
        Some(ro_key.to_base64().as_str()),
        "caps keep the key"
    );

    // Committed on the quorum: the leader's death loses nothing.
    let leader = cluster.cli_json(&["mon", "stat"]).expect("mon stat")["leader"]
        .as_u64()
        .expect("leader") as u32;
    cluster.kill_mon(leader);
    let got = wait_for("the survivors to answer", Duration::from_secs(60), || {
        cluster.cli_json(&["auth", "get", "client.gw9"]).ok()
    })
    .expect("after the leader's death");
    assert_eq!(
        got["entities"][0]["key"].as_str(),
        Some(gw_key.to_base64().as_str())
    );
    cluster.cli_ok(&["auth", "rm", "client.ro"]).expect("rm");
    assert_refused(&cluster, &["auth", "get", "client.ro"], "does not exist");

    // The restarted monitor catches up with what it missed (the removal included).
    cluster.start_mon(leader).expect("restart");
    let survivor = (0..3).find(|r| *r != leader).expect("another rank");
    cluster.kill_mon(survivor);
    // Asked directly: the restarted monitor itself answers (it serves reads only once its
    // lease says it holds the quorum's latest state).
    let own = cluster.dir.path().join(format!("mon{leader}-only.toml"));
    std::fs::write(&own, cluster.config_for_mon(leader).to_toml()).expect("write config");
    let ls = wait_for(
        "a quorum with the restarted monitor",
        Duration::from_secs(60),
        || {
            let out = run_bounded(
                Command::new(bin("basalt"))
                    .arg("-c")
                    .arg(&own)
                    .args(["auth", "ls", "--format", "json"]),
                Duration::from_secs(30),
            );
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).ok())
                .flatten()
        },
    )
    .expect("ls");
    assert_eq!(
        entity_names(&ls),
        vec!["client.admin", "client.gw9", "mon."]
    );
}

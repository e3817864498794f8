//! Process-level tests of the auth database: `basalt auth ...` against three real monitors.
//! The monitors seed client.admin from their bootstrap keyring (as `basalt cluster up` lays
//! it out); keys and caps commit through Paxos, survive a leader's death, and bad input is
//! refused with an error that names the problem, changing nothing. No timing assertions.
//!
//! Authentication on the wire: unauthenticated clients, wrong keys, expired tickets and
//! replayed handshakes are refused with a clear error and change nothing; caps limit what an
//! authenticated client may do on monitors and OSDs; forged sub-ops, peering and Paxos
//! messages from a process without the right key are refused.

use std::process::Command;
use std::time::Duration;

use basalt_auth::{EntityName, Keyring, Secret};
use basalt_tests::{bin, run_bounded, test_timeouts, wait_for, TestCluster};
use serde_json::Value;

/// The entities `auth ls` lists, but the OSD keys every test cluster starts with.
fn entity_names(ls: &Value) -> Vec<String> {
    ls["entities"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["entity"].as_str().map(str::to_string))
                .filter(|n| !n.starts_with("osd."))
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

// ---- authentication on the wire ----

use basalt_auth::handshake::{
    AuthError, Authorizer, Challenge, ClientHandshake, ClientTicket, Granted, Hello, Proof, Service,
};
use basalt_auth::live::now_ms;
use basalt_client::ops::{decode, OpError, PeerMessageError};
use basalt_client::{ClientError, Credentials, MonClient, Rados};
use basalt_osd::peer_msg::PEER_MESSAGE_VERSION;
use basalt_proto::mon::{
    command_request, mon_auth_client::MonAuthClient, mon_peer_client::MonPeerClient,
    monitor_client::MonitorClient, AuthHello, AuthProve, CommandRequest, PeerEnvelope, PoolCreate,
    StatusRequest,
};
use basalt_proto::osd::{
    osd_client::OsdClient, OpRequest, PeerHeader, PgQueryRequest, SubOpRequest,
};
use basalt_tests::DataCluster;
use tonic::transport::Channel;
use tonic::Code;

/// A raw gRPC channel to `addr`, over TLS as every client of the test cluster.
fn channel(config: &basalt_config::ClusterConfig, addr: &str) -> Channel {
    let connector = basalt_client::connector_for(config).expect("TLS");
    basalt_client::lazy_channel(addr, &connector, Duration::from_secs(2)).expect("channel")
}

/// Runs the CLI with `keyring`'s key and asserts it fails saying every one of `needles`.
fn cli_refused(
    cluster: &basalt_tests::TestCluster,
    keyring: &std::path::Path,
    args: &[&str],
    needles: &[&str],
) {
    let mut all = vec!["--keyring", keyring.to_str().expect("path")];
    all.extend(args);
    let out = cluster.cli(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && needles.iter().all(|n| err.contains(n)),
        "basalt {args:?} should fail saying {needles:?}: {err}"
    );
}

fn enc(v: &impl serde::Serialize) -> bytes::Bytes {
    postcard::to_stdvec(v).expect("encode").into()
}

fn pool_create(name: &str) -> CommandRequest {
    CommandRequest {
        command: Some(command_request::Command::PoolCreate(PoolCreate {
            name: name.into(),
            size: 1,
            min_size: 1,
            pg_num: 8,
        })),
    }
}

/// `msg` carrying authorizer `a` as every basalt client sends it.
fn authorized<T>(msg: T, a: &Authorizer) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert_bin(
        basalt_proto::auth::AUTHORIZER_KEY,
        tonic::metadata::MetadataValue::from_bytes(&postcard::to_stdvec(a).expect("encode")),
    );
    r
}

/// Sends `hello`: the monitor's handshake id and its challenge.
async fn send_hello(auth: &mut MonAuthClient<Channel>, hello: &Hello) -> (u64, Challenge) {
    let c = auth
        .hello(AuthHello { hello: enc(hello) })
        .await
        .expect("hello")
        .into_inner();
    let challenge = postcard::from_bytes(&c.challenge).expect("challenge");
    (c.handshake_id, challenge)
}

/// A whole handshake with the monitor at `ch` as `entity` with `key`: its tickets.
async fn handshake(ch: Channel, entity: &EntityName, key: &Secret) -> Vec<ClientTicket> {
    let mut auth = MonAuthClient::new(ch);
    let (mut hs, hello) = ClientHandshake::start(entity.clone(), key.clone(), [3; 16]);
    let (handshake_id, challenge) = send_hello(&mut auth, &hello).await;
    let proof = hs
        .on_challenge(&challenge)
        .expect("the monitor proves the key");
    let g = auth
        .prove(AuthProve {
            handshake_id,
            proof: enc(&proof),
        })
        .await
        .expect("prove")
        .into_inner();
    let granted: Granted = postcard::from_bytes(&g.granted).expect("granted");
    hs.on_granted(granted).expect("tickets")
}

fn ticket_for(tickets: &[ClientTicket], service: Service) -> ClientTicket {
    tickets
        .iter()
        .find(|t| t.service == service)
        .cloned()
        .expect("a ticket for the service")
}

fn pool_names(cluster: &TestCluster) -> Vec<String> {
    cluster
        .cli_json(&["pool", "ls"])
        .expect("pool ls")
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_monitors_refuse_the_unauthenticated_wrong_keys_expired_tickets_and_replays() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = rt.enter();
    // Short tickets, so one expires within the test.
    let cluster = TestCluster::start_mons_with(1, test_timeouts(), |c| {
        c.auth.ticket_ttl_secs = 3;
    })
    .expect("start monitors");
    wait_for("the auth database", Duration::from_secs(60), || {
        cluster.cli_json(&["auth", "get", "client.admin"]).ok()
    })
    .expect("seeded");
    let admin: EntityName = "client.admin".parse().expect("name");
    let admin_key = Keyring::load(&cluster.admin_keyring_path())
        .expect("admin keyring")
        .key(&admin)
        .expect("key")
        .clone();
    let addr = cluster.config.mons[0].addr.to_string();
    let ch = channel(&cluster.config, &addr);

    rt.block_on(async {
        // No authorizer at all: refused before anything runs.
        let e = MonitorClient::new(ch.clone())
            .command(pool_create("sneaky"))
            .await
            .expect_err("an unauthenticated command");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("no authorizer"), "{}", e.message());

        // A wrong key: the client sees the monitor cannot prove the key it holds, and a
        // proof made without the key is refused.
        let mut auth = MonAuthClient::new(ch.clone());
        let (mut hs, hello) =
            ClientHandshake::start(admin.clone(), Secret::from_bytes([7; 32]), [1; 16]);
        let (handshake_id, challenge) = send_hello(&mut auth, &hello).await;
        assert!(matches!(
            hs.on_challenge(&challenge),
            Err(AuthError::ServerNotAuthentic(_))
        ));
        let e = auth
            .prove(AuthProve {
                handshake_id,
                proof: enc(&Proof {
                    client_proof: [0; 32],
                }),
            })
            .await
            .expect_err("a forged proof");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("does not match"), "{}", e.message());

        // A replayed handshake: the recorded Proof is worth nothing a second time, nor
        // against the challenge of a new Hello.
        let (mut hs, hello) = ClientHandshake::start(admin.clone(), admin_key.clone(), [2; 16]);
        let (handshake_id, challenge) = send_hello(&mut auth, &hello).await;
        let proof = hs.on_challenge(&challenge).expect("proof");
        let prove = AuthProve {
            handshake_id,
            proof: enc(&proof),
        };
        auth.prove(prove.clone()).await.expect("the real proof");
        let e = auth.prove(prove).await.expect_err("the same proof again");
        assert_eq!(e.code(), Code::Unauthenticated);
        let (second_id, _) = send_hello(&mut auth, &hello).await;
        let e = auth
            .prove(AuthProve {
                handshake_id: second_id,
                proof: enc(&proof),
            })
            .await
            .expect_err("an old proof against a new challenge");
        assert!(e.message().contains("does not match"), "{}", e.message());

        // A replayed authorizer: accepted once, refused the second time.
        let mon = ticket_for(
            &handshake(ch.clone(), &admin, &admin_key).await,
            Service::Mon,
        );
        let a = Authorizer::new(mon.ticket.clone(), &mon.session_key, now_ms(), 1);
        let mut client = MonitorClient::new(ch.clone());
        client
            .status(authorized(StatusRequest {}, &a))
            .await
            .expect("a fresh authorizer");
        let e = client
            .command(authorized(pool_create("replayed"), &a))
            .await
            .expect_err("the same authorizer again");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("already used"), "{}", e.message());

        // An expired ticket (3 s), even with a fresh authorizer. (Just after expiry the
        // secret that sealed it may also have rotated away: refused either way.)
        let expires = mon.expires_ms;
        wait_for("the ticket's expiry", Duration::from_secs(30), || {
            (now_ms() > expires).then_some(())
        })
        .expect("expiry");
        let a = Authorizer::new(mon.ticket.clone(), &mon.session_key, now_ms(), 2);
        let e = client
            .command(authorized(pool_create("expired"), &a))
            .await
            .expect_err("an expired ticket");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(
            e.message().contains("expired") || e.message().contains("rotated away"),
            "{}",
            e.message()
        );

        // Paxos messages: only from holders of the monitors' key.
        let env = PeerEnvelope {
            from: 1,
            fsid: cluster.config.cluster.fsid.clone(),
            message: bytes::Bytes::new(),
        };
        let e = MonPeerClient::new(ch.clone())
            .deliver(env.clone())
            .await
            .expect_err("no authorizer");
        assert_eq!(e.code(), Code::Unauthenticated);
        let mon = ticket_for(
            &handshake(ch.clone(), &admin, &admin_key).await,
            Service::Mon,
        );
        let a = Authorizer::new(mon.ticket, &mon.session_key, now_ms(), 99);
        let e = MonPeerClient::new(ch.clone())
            .deliver(authorized(env, &a))
            .await
            .expect_err("client.admin is no monitor");
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("mon."), "{}", e.message());
    });
    assert_eq!(
        pool_names(&cluster),
        Vec::<String>::new(),
        "nothing was applied"
    );

    // The CLI: a wrong key, an unknown entity, and caps.
    let bad = cluster.dir.path().join("bad.keyring");
    let mut ring = Keyring::new();
    ring.insert(
        admin.clone(),
        Secret::generate().expect("key"),
        Default::default(),
    );
    ring.save(&bad).expect("write");
    cli_refused(
        &cluster,
        &bad,
        &["pool", "create", "wrongkey"],
        &["did not prove"],
    );
    let ghost = cluster.dir.path().join("ghost.keyring");
    let mut ring = Keyring::new();
    ring.insert(
        "client.ghost".parse().expect("name"),
        Secret::generate().expect("key"),
        Default::default(),
    );
    ring.save(&ghost).expect("write");
    cli_refused(
        &cluster,
        &ghost,
        &["mon", "stat"],
        &["not in the auth database"],
    );

    let ro = cluster.dir.path().join("ro.keyring");
    let ro_arg = ro.to_str().expect("path");
    cluster
        .cli_ok(&[
            "auth",
            "get-or-create",
            "client.ro",
            "mon",
            "allow r",
            "-o",
            ro_arg,
        ])
        .expect("client.ro");
    cluster
        .cli_ok(&["--keyring", ro_arg, "mon", "stat"])
        .expect("reads are allowed");
    for (args, needle) in [
        (&["pool", "create", "ro-made"][..], "mon 'allow rw'"),
        (&["auth", "ls"][..], "mon 'allow *'"),
    ] {
        cli_refused(&cluster, &ro, args, &["permission denied", needle]);
    }
    assert_eq!(
        pool_names(&cluster),
        Vec::<String>::new(),
        "nothing was applied"
    );
}

#[test]
fn the_osds_enforce_caps_and_identities() {
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster");
    let _enter = d.rt.enter();
    let c = &d.cluster;
    c.cli_ok(&[
        "pool",
        "create",
        "vms",
        "--size",
        "3",
        "--min-size",
        "2",
        "--pg-num",
        "8",
    ])
    .expect("pool vms");
    let ro_path = c.dir.path().join("ro.keyring");
    c.cli_ok(&[
        "auth",
        "get-or-create",
        "client.ro",
        "mon",
        "allow r",
        "osd",
        "allow r pool=rbd",
        "-o",
        ro_path.to_str().expect("path"),
    ])
    .expect("client.ro");
    d.rt.block_on(d.io.write_full("hello", bytes::Bytes::from_static(b"hi")))
        .expect("admin writes");

    // client.ro reads pool rbd, cannot write it, and cannot list pool vms.
    let creds = Credentials::load(&ro_path, None).expect("ro keyring");
    assert_eq!(creds.entity.to_string(), "client.ro");
    let ro =
        d.rt.block_on(Rados::connect_with(c.config.clone(), "client.ro", creds))
            .expect("connect as client.ro");
    let io = wait_for("pool rbd visible", Duration::from_secs(30), || {
        ro.ioctx("rbd").ok()
    })
    .expect("ioctx");
    assert_eq!(
        d.rt.block_on(io.read("hello", 0, 2)).expect("read"),
        bytes::Bytes::from_static(b"hi")
    );
    match d
        .rt
        .block_on(io.write_full("hello", bytes::Bytes::from_static(b"no")))
    {
        Err(ClientError::PermissionDenied(m)) => {
            assert!(m.contains("osd 'allow w pool=rbd'"), "{m}")
        }
        other => panic!("a write by client.ro was not refused: {other:?}"),
    }
    let vms = ro.ioctx("vms").expect("ioctx vms");
    match d.rt.block_on(vms.list_objects()) {
        Err(ClientError::PermissionDenied(m)) => assert!(m.contains("pool=vms"), "{m}"),
        other => panic!("listing vms as client.ro was not refused: {other:?}"),
    }
    cli_refused(
        c,
        &ro_path,
        &["obj", "rm", "rbd", "hello"],
        &["osd 'allow w pool=rbd'"],
    );
    assert_eq!(
        d.rt.block_on(d.io.read("hello", 0, 2)).expect("read"),
        bytes::Bytes::from_static(b"hi"),
        "nothing was applied"
    );

    let map = d.rados.osdmap();
    let pool = map.pool_by_name("rbd").expect("rbd").id;
    let addr = map.osds[&0].addr.clone();
    let (ch, admin_ticket) = (
        channel(&d.cluster.config, &addr),
        d.rados.mon().osd_ticket(),
    );
    d.rt.block_on(async {
        // No authorizer, no ticket: refused before anything runs.
        let e = OsdClient::new(ch.clone())
            .op(OpRequest {
                pool,
                ..Default::default()
            })
            .await
            .expect_err("an unauthenticated op");
        assert_eq!(e.code(), Code::Unauthenticated);
        let peer = basalt_messenger::Peer::new(
            &addr,
            d.rados.mon().connector().clone(),
            Duration::from_secs(2),
            1 << 20,
            Default::default(),
        );
        let e = peer
            .call(basalt_proto::data_path::OP, bytes::Bytes::new())
            .await
            .expect_err("no ticket");
        assert!(
            matches!(e, basalt_messenger::CallError::Unauthenticated { .. }),
            "{e:?}"
        );

        // A forged sub-op: client.admin (every cap) is still not an OSD.
        let mut osd = OsdClient::new(basalt_proto::auth::authorized(ch.clone(), admin_ticket));
        let r = osd
            .sub_op(SubOpRequest {
                header: Some(PeerHeader {
                    version: PEER_MESSAGE_VERSION,
                    pool,
                    from: 1,
                    ..Default::default()
                }),
                object: "hello".into(),
                ..Default::default()
            })
            .await
            .expect("answered")
            .into_inner();
        match decode::<Result<(), OpError>>(&r.result, "sub-op").expect("decode") {
            Err(OpError::PermissionDenied(m)) => assert!(m.contains("osd.N"), "{m}"),
            other => panic!("a forged sub-op was not refused: {other:?}"),
        }

        // A process with osd.5's key claiming to be osd.3 in a peering query.
        let creds = Credentials::load(&c.osd_keyring_path(5), None).expect("osd.5 keyring");
        let as5 = MonClient::with_credentials(c.config.clone(), Duration::from_secs(20), creds)
            .expect("osd.5 client");
        as5.osdmap().await.expect("authenticated as osd.5");
        let mut osd = OsdClient::new(basalt_proto::auth::authorized(ch.clone(), as5.osd_ticket()));
        let r = osd
            .pg_query(PgQueryRequest {
                header: Some(PeerHeader {
                    version: PEER_MESSAGE_VERSION,
                    pool,
                    pg_seed: 0,
                    interval_epoch: 1,
                    from: 3,
                }),
            })
            .await
            .expect("answered")
            .into_inner();
        match decode::<Result<basalt_osd::peering::PeerState, OpError>>(&r.result, "query")
            .expect("decode")
        {
            Err(OpError::PermissionDenied(m)) => assert!(m.contains("osd.3"), "{m}"),
            other => panic!("a peering query under another OSD's id was not refused: {other:?}"),
        }

        // osd.5 as itself, but speaking the layout before the envelope (or another version):
        // a typed refusal, not a decode failure or a misread request.
        let r = osd
            .sub_op(SubOpRequest {
                object: "hello".into(),
                ..Default::default()
            })
            .await
            .expect("answered")
            .into_inner();
        match decode::<Result<(), OpError>>(&r.result, "sub-op").expect("decode") {
            Err(OpError::BadPeerMessage(PeerMessageError::NoEnvelope { want })) => {
                assert_eq!(want, PEER_MESSAGE_VERSION)
            }
            other => panic!("a sub-op without an envelope was not refused: {other:?}"),
        }
        let r = osd
            .pg_query(PgQueryRequest {
                header: Some(PeerHeader {
                    version: PEER_MESSAGE_VERSION + 1,
                    pool,
                    from: 5,
                    ..Default::default()
                }),
            })
            .await
            .expect("answered")
            .into_inner();
        match decode::<Result<basalt_osd::peering::PeerState, OpError>>(&r.result, "query")
            .expect("decode")
        {
            Err(OpError::BadPeerMessage(PeerMessageError::Version { have, want })) => {
                assert_eq!(
                    (have, want),
                    (PEER_MESSAGE_VERSION + 1, PEER_MESSAGE_VERSION)
                )
            }
            other => panic!("a query of another message version was not refused: {other:?}"),
        }
    });
    // The cluster serves on.
    d.rt.block_on(d.io.write_full("after", bytes::Bytes::from_static(b"ok")))
        .expect("a write after the refusals");
}

/// The services' secrets rotate every ticket life, drawn by the leader and committed through
/// Paxos: with 3-second tickets, a client keeps reading and writing through several
/// rotations (renewing its tickets, which OSDs open with secrets they fetched ahead), and the
/// tickets the monitors grant are sealed with committed secrets of ever newer periods.
#[test]
fn io_continues_across_service_secret_rotations() {
    let d = DataCluster::start_with(test_timeouts(), |c| c.auth.ticket_ttl_secs = 3, "rbd")
        .expect("cluster");
    let _enter = d.rt.enter();
    let c = &d.cluster;
    let admin: EntityName = "client.admin".parse().expect("name");
    let admin_key = Keyring::load(&c.admin_keyring_path())
        .expect("admin keyring")
        .key(&admin)
        .expect("key")
        .clone();
    let addr = c.config.mons[0].addr.to_string();
    let osd_key_id = || {
        let tickets =
            d.rt.block_on(handshake(channel(&c.config, &addr), &admin, &admin_key));
        let id = ticket_for(&tickets, Service::Osd).ticket.key_id;
        assert!(
            id < basalt_auth::handshake::MONITOR_PEER_KEY_IDS,
            "an osd ticket sealed with a monitor peer secret: {id:#x}"
        );
        id
    };
    let first = osd_key_id();
    // Four ticket lives of back-to-back I/O (a workload's length, not a wait for a state).
    let until = std::time::Instant::now() + Duration::from_secs(12);
    let mut n = 0u64;
    while std::time::Instant::now() < until {
        let name = format!("rot{}", n % 8);
        let body = bytes::Bytes::from(n.to_le_bytes().to_vec());
        d.rt.block_on(d.io.write_full(&name, body.clone()))
            .unwrap_or_else(|e| panic!("write {n} failed across a rotation: {e}"));
        assert_eq!(
            d.rt.block_on(d.io.read(&name, 0, 8))
                .unwrap_or_else(|e| panic!("read {n} failed across a rotation: {e}")),
            body
        );
        n += 1;
    }
    let last = osd_key_id();
    assert!(
        last >= first + 3,
        "the osd service secret did not rotate: period {first} then {last}"
    );
    assert!(n > 0);
}

//! Encryption in transit (issue 20, part B) with real clients: every test cluster runs
//! TLS between its daemons and from its clients (the harness writes `[tls]`); here, NBD over
//! TLS through the gateway (qemu-img with `tls-creds-x509`, nbdinfo with `nbds://`), exports
//! restricted per client certificate, and plain-text or wrongly trusting clients refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{qemu_io_with, run_client, test_timeouts, DataCluster, TLS_DIR};

fn qemu_tls_object(certs: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    )
}

fn qemu_image_opts(addr: std::net::SocketAddr, export: &str) -> String {
    format!(
        "driver=nbd,host={},port={},export={export},tls-creds=tls0",
        addr.ip(),
        addr.port()
    )
}

#[test]
fn nbd_over_tls_needs_certificates_and_shows_each_client_its_own_exports() {
    basalt_tests::require_tool("qemu-img", "qemu-utils");
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    basalt_tests::require_tool("nbdinfo", "libnbd-bin");
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let backend = Arc::new(RadosBackend::new(
        d.rados.clone(),
        d.io.clone(),
        Duration::from_secs(30),
    ));
    let rbd = Rbd::new(backend);
    for name in ["vm1", "vm2"] {
        d.rt.block_on(rbd.create(name, 16 << 20, 22))
            .expect("create image");
    }
    let mut cluster = d.cluster;
    let tls = cluster.dir.path().join(TLS_DIR);
    let rules = cluster.dir.path().join("nbd-access.toml");
    std::fs::write(&rules, "\"client.admin\" = [\"rbd/vm1\"]\n").expect("rules");
    let server_dir = tls.join("nbd-server");
    let gw = cluster
        .start_gateway(
            "gw0",
            &[
                "--nbd-tls-dir",
                &server_dir.display().to_string(),
                "--nbd-tls",
                "required",
                "--nbd-access",
                &rules.display().to_string(),
            ],
        )
        .expect("gateway");
    let addr = cluster.gateway_addr(gw);
    let certs = tls.join("nbd-client-admin");

    // qemu-img and qemu-io with x509 credentials: served, and data round-trips.
    let (ok, text) = run_client(
        "qemu-img",
        &[
            "info",
            "--object",
            &qemu_tls_object(&certs),
            "--image-opts",
            &qemu_image_opts(addr, "rbd/vm1"),
        ],
    );
    assert!(ok && text.contains("16 MiB"), "qemu-img over TLS:\n{text}");
    let object = qemu_tls_object(&certs);
    let (ok, text) = qemu_io_with(
        &["--object", &object, "--image-opts"],
        &qemu_image_opts(addr, "rbd/vm1"),
        &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"],
    );
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "qemu-io over TLS:\n{text}"
    );

    // nbdinfo over nbds:// with the certificate directory.
    let nbds = |export: &str| {
        format!(
            "nbds://{addr}/{export}?tls-certificates={}",
            certs.display()
        )
    };
    let (ok, text) = run_client("nbdinfo", &[&nbds("rbd/vm1")]);
    assert!(ok && text.contains("16777216"), "nbdinfo over TLS:\n{text}");
    // LIST shows client.admin only what its rule allows.
    let (ok, text) = run_client("nbdinfo", &["--list", &nbds("")]);
    assert!(ok, "nbdinfo --list over TLS:\n{text}");
    assert!(
        text.contains("rbd/vm1") && !text.contains("rbd/vm2"),
        "LIST must show rbd/vm1 only:\n{text}"
    );
    let (ok, text) = run_client("nbdinfo", &[&nbds("rbd/vm2")]);
    assert!(!ok, "client.admin may not open rbd/vm2:\n{text}");

    // Plain text to a TLS-only gateway: refused.
    let plain = format!("nbd://{addr}/rbd/vm1");
    let (ok, text) = run_client("nbdinfo", &[&plain]);
    assert!(!ok, "plain nbdinfo must be refused:\n{text}");
    assert!(
        text.to_lowercase().contains("tls"),
        "the refusal says TLS:\n{text}"
    );
    let (ok, text) = run_client("qemu-img", &["info", &plain]);
    assert!(!ok, "plain qemu-img must be refused:\n{text}");

    // TLS without the cluster CA: the gateway's certificate does not verify.
    let (ok, text) = run_client("nbdinfo", &[&format!("nbds://{addr}/rbd/vm1")]);
    assert!(!ok, "nbds:// without certificates must fail:\n{text}");
    let stranger = tempfile::tempdir().expect("tempdir");
    basalt_tls::gen::CertificateAuthority::generate("another CA")
        .expect("CA")
        .write(stranger.path())
        .expect("write");
    let (ok, text) = run_client(
        "qemu-img",
        &[
            "info",
            "--object",
            &qemu_tls_object(stranger.path()),
            "--image-opts",
            &qemu_image_opts(addr, "rbd/vm1"),
        ],
    );
    assert!(!ok, "qemu-img trusting another CA must fail:\n{text}");
}

#[test]
fn daemons_refuse_plain_text_and_clients_verify_the_cluster_ca() {
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let cluster = d.cluster;
    // Sanity: the TLS config works for the CLI.
    cluster.cli_ok(&["status"]).expect("status over TLS");

    let dir = tempfile::tempdir().expect("tempdir");
    let write_config = |name: &str, edit: &dyn Fn(&mut basalt_config::ClusterConfig)| {
        let mut c = cluster.config.clone();
        edit(&mut c);
        let path = dir.path().join(name);
        std::fs::write(&path, c.to_toml()).expect("config");
        path
    };
    let run = |config: &Path| {
        basalt_tests::run_bounded(
            std::process::Command::new(basalt_tests::bin("basalt"))
                .arg("-c")
                .arg(config)
                .args(["--timeout", "5", "status"]),
            Duration::from_secs(60),
        )
    };

    // A plain-text client: refused, and the monitor says why in its log.
    let plain = write_config("plain.toml", &|c| c.tls.enabled = false);
    let out = run(&plain);
    assert!(!out.status.success(), "plain text must not be served");
    basalt_tests::wait_for(
        "the monitor's refusal log line",
        Duration::from_secs(30),
        || {
            (0..3)
                .any(|r| {
                    cluster
                        .mon_log(r)
                        .contains("refused a plain-text connection")
                })
                .then_some(())
        },
    )
    .expect("logged");

    // A client trusting another CA: the monitors' certificates do not verify.
    basalt_tls::gen::CertificateAuthority::generate("another CA")
        .expect("CA")
        .write(dir.path())
        .expect("write");
    let stranger = write_config("stranger.toml", &|c| {
        c.tls.ca_file = Some(dir.path().join(basalt_tls::gen::CA_CERT))
    });
    let out = run(&stranger);
    assert!(
        !out.status.success(),
        "an unverified server must not be used"
    );

    // A missing CA file is a configuration error naming the fix.
    let missing = write_config("missing.toml", &|c| {
        c.tls.ca_file = Some(dir.path().join("nope.pem"))
    });
    let out = run(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nope.pem") && err.contains("ca_file"),
        "{err}"
    );
}

//! `basalt cluster up` as the README's first command runs it: a local cluster whose gateway
//! requires NBD over TLS by default, reached with the `client.admin` certificate it makes,
//! refusing plain text; restarted with `--nbd-tls optional` it serves plain `nbd://` too;
//! `cluster down` stops every daemon by its pid file.
//!
//! `cluster up` listens on its fixed ports (monitors 6789, NBD 10809, metrics 9280 on): a
//! local cluster already running there fails this test, naming the port.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use basalt_tests::{bin, require_tool, run_bounded, run_client};

/// Runs `basalt cluster ARGS... --dir DIR`, bounded; whether it succeeded, and its output.
fn cluster(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = run_bounded(
        Command::new(bin("basalt"))
            .arg("cluster")
            .args(args)
            .arg("--dir")
            .arg(dir),
        Duration::from_secs(300),
    );
    let text = basalt_tests::output_text(&out);
    (out.status.success(), text)
}

/// Stops the cluster under `dir` however the test ends.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = cluster(self.0, &["down"]);
    }
}

#[test]
fn cluster_up_requires_nbd_tls_by_default_and_down_stops_it() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    for port in [6789, 10809, 9280, 9281, 9282, 9283, 9284] {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is in use; `cluster up` needs it (stop a local cluster with \
             `basalt cluster down`)"
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("basalt-up-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path();
    let _down = Down(dir);
    let shape = [
        "--mons",
        "1",
        "--hosts",
        "3",
        "--osds-per-host",
        "1",
        "--pg-num",
        "8",
    ];
    let (ok, out) = cluster(dir, &[&["up"], &shape[..]].concat());
    assert!(ok, "cluster up failed:\n{out}");
    assert!(out.contains("NBD TLS required"), "{out}");

    let certs = dir.join("tls").join("client.admin");
    let tls_url = format!(
        "nbds://127.0.0.1:10809/rbd/demo?tls-certificates={}",
        certs.display()
    );
    let (ok, info) = run_client("nbdinfo", &[&tls_url]);
    assert!(ok && info.contains("rbd/demo"), "nbdinfo over TLS: {info}");
    let (ok, listed) = run_client(
        "nbdinfo",
        &[
            "--list",
            &format!(
                "nbds://127.0.0.1:10809/?tls-certificates={}",
                certs.display()
            ),
        ],
    );
    assert!(
        ok && listed.contains("rbd/demo"),
        "LIST as client.admin: {listed}"
    );
    let (ok, plain) = run_client("nbdinfo", &["nbd://127.0.0.1:10809/rbd/demo"]);
    assert!(!ok, "plain text was served by default: {plain}");
    let (ok, io) = run_client(
        "qemu-io",
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                certs.display()
            ),
            "--image-opts",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "driver=nbd,host=127.0.0.1,port=10809,export=rbd/demo,tls-creds=tls0",
        ],
    );
    assert!(
        ok && !io.contains("Pattern verification failed"),
        "qemu-io over TLS: {io}"
    );

    // Down, then up again with plain text allowed: the data is still there.
    let (ok, out) = cluster(dir, &["down"]);
    assert!(ok, "cluster down failed:\n{out}");
    for port in [6789, 10809] {
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after cluster down"
        );
    }
    let (ok, out) = cluster(dir, &["up", "--nbd-tls", "optional"]);
    assert!(ok, "cluster up --nbd-tls optional failed:\n{out}");
    let (ok, io) = run_client(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            "nbd://127.0.0.1:10809/rbd/demo",
        ],
    );
    assert!(
        ok && !io.contains("Pattern verification failed"),
        "plain qemu-io after the restart: {io}"
    );
}

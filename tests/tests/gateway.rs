//! Process-level tests of the NBD gateway with real clients (qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio, nbdsh) on a real cluster, and the exclusive-lock hand-over between gateways
//! that a live migration relies on (issues 7 and 21).

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use basalt_rbd::{RadosBackend, Rbd};
use basalt_tests::{qemu_io, qemu_io_ok, run_client, test_timeouts, DataCluster, TestCluster};

struct Fixture {
    rt: tokio::runtime::Runtime,
    cluster: TestCluster,
    rbd: Rbd,
}

/// 3 monitors, 6 OSDs on 3 hosts, pool `rbd` serving, and an image layer on it.
fn fixture() -> Fixture {
    let d = DataCluster::start(test_timeouts(), "rbd").expect("cluster with pool rbd");
    let backend = Arc::new(RadosBackend::new(d.rados, d.io, Duration::from_secs(30)));
    Fixture {
        rt: d.rt,
        cluster: d.cluster,
        rbd: Rbd::new(backend),
    }
}

#[test]
fn real_nbd_clients_use_an_image() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    basalt_tests::require_tool("qemu-img", "qemu-utils");
    basalt_tests::require_tool("nbdinfo", "libnbd-bin");
    basalt_tests::require_tool("nbdcopy", "libnbd-bin");
    basalt_tests::require_tool("promtool", "prometheus");
    basalt_tests::require_tool("fio", "fio");
    let mut f = fixture();
    f.rt.block_on(f.rbd.create("vm1", 64 << 20, 22))
        .expect("create image");
    let gw = f.cluster.start_gateway("gw0", &[]).expect("gateway");
    let url = format!("nbd://{}/rbd/vm1", f.cluster.gateway_addr(gw));

    // qemu-img create on an NBD export checks the size fits; info shows it.
    let (ok, text) = run_client("qemu-img", &["create", "-f", "raw", &url, "64M"]);
    assert!(ok, "qemu-img create:\n{text}");
    let (ok, text) = run_client("qemu-img", &["info", &url]);
    assert!(ok && text.contains("64 MiB"), "qemu-img info:\n{text}");
    // qemu-img convert into the image and back out, compared byte for byte.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("conv.raw");
    let out = dir.path().join("conv-back.raw");
    let mut data = vec![0u8; 64 << 20];
    for (i, chunk) in data.chunks_mut(4 << 20).enumerate() {
        if i % 2 == 1 {
            chunk.fill(0x40 + i as u8);
        }
    }
    std::fs::write(&src, &data).expect("write src");
    let (ok, text) = run_client(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().expect("path"),
            &url,
        ],
    );
    assert!(ok, "qemu-img convert in:\n{text}");
    let (ok, text) = run_client(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            out.to_str().expect("path"),
        ],
    );
    assert!(ok, "qemu-img convert out:\n{text}");
    assert!(
        std::fs::read(&out).expect("read back") == data,
        "qemu-img convert round trip differs"
    );

    qemu_io_ok(
        &url,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "write -P 0x5a 4M 8M",
            "discard 4M 4M",
            "read -P 0 4M 4M",
            "read -P 0x5a 8M 4M",
            "write -f -P 0xcd 20M 64k",
            "flush",
            "read -P 0xcd 20M 64k",
            "read -P 0 40M 1M",
        ],
    );
    // The image layer agrees with what the NBD clients wrote.
    let img = f.rt.block_on(f.rbd.open("vm1")).expect("open");
    let head = f.rt.block_on(img.read(0, 4096)).expect("read");
    assert!(head.iter().all(|&b| b == 0xab));

    // Reads past the end and unknown exports are refused; the gateway serves on.
    let (ok, text) = qemu_io(&url, &["read 63M 2M"]);
    assert!(!ok, "read past the end succeeded:\n{text}");
    let bad = format!("nbd://{}/rbd/no-such-image", f.cluster.gateway_addr(gw));
    let (ok, text) = run_client("qemu-img", &["info", &bad]);
    assert!(!ok, "unknown export opened:\n{text}");
    qemu_io_ok(&url, &["read -P 0xab 0 64k"]);

    let (ok, text) = run_client("nbdinfo", &["--map", &url]);
    assert!(ok, "nbdinfo --map:\n{text}");
    assert!(text.contains("hole"), "no holes in a thin image:\n{text}");
    assert!(text.contains("data"), "no data extents:\n{text}");
    let (ok, text) = run_client("nbdinfo", &["--can", "multi-conn", &url]);
    assert!(ok, "CAN_MULTI_CONN not advertised:\n{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = vec![0u8; 64 << 20];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        // Every third MiB is a hole; the rest carries its index.
        if i % 3 != 0 {
            chunk.fill(i as u8 + 1);
        }
    }
    std::fs::write(&src, &data).expect("write src");
    let (ok, text) = run_client("nbdcopy", &[src.to_str().expect("path"), &url]);
    assert!(ok, "nbdcopy in:\n{text}");
    let (ok, text) = run_client("nbdcopy", &[&url, back.to_str().expect("path")]);
    assert!(ok, "nbdcopy out:\n{text}");
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "nbdcopy round trip differs"
    );

    // Every daemon's metrics pass promtool after real I/O (labels, histograms, help text).
    let gw_text = f.cluster.gateway_metrics(gw).expect("gateway metrics");
    assert!(gw_text.contains("basalt_nbd_requests_total"), "{gw_text}");
    basalt_tests::promtool_check(&gw_text).expect("gateway metrics pass promtool");
    for i in 0..6 {
        let osd_text = f.cluster.osd_metrics(i).expect("osd metrics");
        basalt_tests::promtool_check(&osd_text).expect("OSD metrics pass promtool");
    }

    let (ok, text) = run_client(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={url}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            // Otherwise fio leaves a verify-state file in the working directory.
            "--verify_state_save=0",
        ],
    );
    assert!(ok && !text.contains("verify: bad"), "fio verify:\n{text}");
}

#[test]
fn live_migration_moves_the_lock_and_fences_a_frozen_gateway() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    let mut f = fixture();
    f.rt.block_on(f.rbd.create("mig", 16 << 20, 22))
        .expect("create image");
    let opts = ["--watch-timeout-ms", "3000", "--notify-timeout-ms", "1000"];
    let gws: Vec<usize> = ["gw1", "gw2", "gw3"]
        .iter()
        .map(|n| f.cluster.start_gateway(n, &opts).expect("gateway"))
        .collect();
    let url = |i: usize| format!("nbd://{}/rbd/mig", f.cluster.gateway_addr(gws[i]));

    // Hypervisor 1 writes; then the VM moves to hypervisor 2, whose first write takes the lock.
    qemu_io_ok(&url(0), &["write -P 0x11 0 1M"]);
    // Hypervisor 2's VM stays attached (a gateway whose last client left gives the lock
    // back, and this one must still hold it when it hangs).
    let held = HeldClient::start(
        &url(1),
        "h.pwrite(b'\\x22' * (1 << 20), 1 << 20)\n\
         assert h.pread(1 << 20, 0) == b'\\x11' * (1 << 20)",
    );
    // Hypervisor 2 hangs while holding the lock; hypervisor 3 takes over once its watch
    // has timed out, fencing it first.
    f.cluster.pause_gateway(gws[1], true);
    qemu_io_ok(
        &url(2),
        &[
            "write -P 0x33 2M 1M",
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
        ],
    );
    let list = f
        .cluster
        .cli_ok(&["osd", "blocklist", "ls"])
        .expect("blocklist ls");
    assert!(
        list.contains("client.gw2"),
        "gw2 was not blocklisted:\n{list}"
    );
    // Hypervisor 2 wakes up: nothing it sends lands.
    f.cluster.pause_gateway(gws[1], false);
    let (ok, text) = qemu_io(&url(1), &["write -P 0x44 3M 1M"]);
    assert!(!ok, "the fenced gateway's write succeeded:\n{text}");
    let (ok, text) = qemu_io(&url(1), &["write -P 0x44 0 4k"]);
    assert!(!ok, "the fenced gateway's write succeeded:\n{text}");
    // The final image: gw3's write on top of gw1's and gw2's acknowledged writes.
    qemu_io_ok(
        &url(2),
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
            "read -P 0x33 2M 1M",
            "read -P 0 3M 1M",
        ],
    );
    let metrics = f.cluster.gateway_metrics(gws[2]).expect("metrics");
    assert!(
        metrics.contains("basalt_rbd_lock_handovers_total"),
        "{metrics}"
    );
    drop(held);
}

/// Issue 17 item 6, fencing end to end: a gateway frozen mid-write (fio's writes queued in
/// its socket) loses the image to another gateway, which blocklists that gateway's client
/// *instance* before breaking its lock; when the frozen one resumes, every write it still
/// sends is refused and the image holds exactly the new holder's data. The fenced host's
/// gateway, restarted under the same fixed `--name` (as its systemd unit does), is a new
/// instance and serves again at once.
#[test]
fn a_fenced_gateway_lands_nothing_and_its_restart_serves_at_once() {
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    basalt_tests::require_tool("fio", "fio");
    let mut f = fixture();
    f.rt.block_on(f.rbd.create("fenced", 16 << 20, 22))
        .expect("create image");
    let opts = ["--watch-timeout-ms", "3000", "--notify-timeout-ms", "1000"];
    let a = f.cluster.start_gateway("hostA", &opts).expect("gateway A");
    let b = f.cluster.start_gateway("hostB", &opts).expect("gateway B");
    // A restarted gateway keeps its address.
    let (url_a, url_b) = (
        format!("nbd://{}/rbd/fenced", f.cluster.gateway_addr(a)),
        format!("nbd://{}/rbd/fenced", f.cluster.gateway_addr(b)),
    );

    // A VM on host A writes the first 8 MiB over and over, 8 requests in flight.
    let dir = tempfile::tempdir().expect("tempdir");
    let fio_log = dir.path().join("fio.log");
    let mut fio = basalt_tests::client_command("fio")
        .args([
            "--name=vm-on-a",
            "--ioengine=nbd",
            &format!("--uri={url_a}"),
            "--rw=write",
            "--bs=64k",
            "--size=8M",
            "--iodepth=8",
            "--time_based",
            "--runtime=300",
            "--buffer_pattern=0x41",
        ])
        .stdout(std::fs::File::create(&fio_log).expect("fio log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fio");
    basalt_tests::wait_for("fio writing through A", Duration::from_secs(60), || {
        (f.cluster.gateway_writes(a) >= 32.0).then_some(())
    })
    .expect("fio writes");
    // Host A hangs mid-write; host B's writes take the image over once A's watch timed out.
    f.cluster.pause_gateway(a, true);
    qemu_io_ok(&url_b, &["write -P 0x42 0 8M"]);
    // A resumes: its queued and new writes are all refused, so fio fails.
    f.cluster.pause_gateway(a, false);
    let status = basalt_tests::wait_for("fio to stop", Duration::from_secs(60), || {
        fio.try_wait().ok().flatten()
    });
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = fio.kill();
            let _ = fio.wait();
            panic!(
                "{e}: the fenced gateway kept accepting writes:\n{}",
                std::fs::read_to_string(&fio_log).unwrap_or_default()
            );
        }
    };
    assert!(
        !status.success(),
        "fio on the fenced gateway succeeded:\n{}",
        std::fs::read_to_string(&fio_log).unwrap_or_default()
    );
    // Nothing of A's landed after B took over: the disk is B's data.
    qemu_io_ok(&url_b, &["read -P 0x42 0 8M", "read -P 0 8M 8M"]);

    // Host A's gateway restarts under the same name: a new instance, not fenced.
    f.cluster.kill_gateway(a);
    f.cluster.restart_gateway(a, "hostA").expect("restart A");
    qemu_io_ok(
        &url_a,
        &[
            "write -P 0x43 8M 1M",
            "read -P 0x42 0 8M",
            "read -P 0x43 8M 1M",
        ],
    );
    // The blocklist names the frozen instance (name/nonce), not the whole name.
    let list = f
        .cluster
        .cli_ok(&["osd", "blocklist", "ls"])
        .expect("blocklist ls");
    assert!(
        list.lines().any(|l| l.starts_with("client.hostA/")),
        "the fenced instance is not in the blocklist:\n{list}"
    );
    assert!(
        !list.lines().any(|l| l.starts_with("client.hostA ")),
        "the whole name client.hostA is blocklisted:\n{list}"
    );
    // B still serves, and sees A's new write.
    qemu_io_ok(&url_b, &["read -P 0x43 8M 1M"]);
}
/// An nbdsh client that runs `script` on a connection (`h`) and then keeps the connection
/// open until dropped, as a running VM does. Killed by pid on drop.
struct HeldClient {
    child: Child,
}

impl HeldClient {
    /// Starts it and waits (bounded) until `script` has run; fails the test if it failed.
    fn start(url: &str, script: &str) -> HeldClient {
        let code = format!("{script}\nprint('ready', flush=True)\nimport sys\nsys.stdin.read()\n");
        let mut child = basalt_tests::client_command("nbdsh")
            .args(["-u", url, "-c", &code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdsh");
        let stdout = child.stdout.take().expect("nbdsh stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let held = HeldClient { child };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.trim() == "ready" => held,
            Ok(line) => panic!("nbdsh on {url} failed (said {line:?}); its stderr is above"),
            Err(_) => panic!("nbdsh on {url} did not finish its script within 120 s"),
        }
    }
}

impl Drop for HeldClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU's live migration as the storage sees it, twice over, every byte checked (issue 21).
/// The destination connects while the source VM still runs and writes (QEMU opens the
/// destination's drive at the start of the migration). Round 1: the source flushes and
/// disconnects, then the destination writes — its gateway locks on its first try, the
/// source's having relinquished the lock. Round 2, back again: the source flushes and stays
/// connected (a paused QEMU keeps its connection until it quits), so the destination's
/// first write asks the source's gateway for the lock and waits for its release.
#[test]
fn migration_hand_over_with_the_destination_connected_first() {
    basalt_tests::require_tool("nbdsh", "libnbd-bin python3-libnbd");
    let mut f = fixture();
    f.rt.block_on(f.rbd.create("mig2", 16 << 20, 22))
        .expect("create image");
    let gws: Vec<usize> = ["gwa", "gwb"]
        .iter()
        .map(|n| f.cluster.start_gateway(n, &[]).expect("gateway"))
        .collect();
    let url = |i: usize| format!("nbd://{}/rbd/mig2", f.cluster.gateway_addr(gws[i]));
    let script = MIGRATION_SCRIPT
        .replace("@A@", &url(0))
        .replace("@B@", &url(1));
    let (ok, text) = run_client("nbdsh", &["-c", &script]);
    assert!(
        ok && text.contains("migration verified"),
        "the migration script failed:\n{text}"
    );
    // Round 2's destination had to take the lock from a holder (round 1's may have found
    // it already given back).
    let m = f.cluster.gateway_metrics(gws[0]).expect("metrics");
    assert!(
        basalt_tests::metric_sum(&m, "basalt_rbd_lock_handovers_total", "") >= 1.0,
        "gateway A never took the lock over from B:\n{m}"
    );
}

/// The client side of `migration_hand_over_with_the_destination_connected_first` (libnbd's
/// Python bindings, run by nbdsh). `@A@` and `@B@` are the two gateways' URLs.
const MIGRATION_SCRIPT: &str = r#"
import nbd
BLOCK = 64 * 1024
N = 64
expected = bytearray(N * BLOCK)

def block(tag, i):
    return (f"{tag}:{i:04d};".encode() * (BLOCK // 8 + 1))[:BLOCK]

def put(hd, tag, i):
    b = block(tag, i)
    hd.pwrite(b, i * BLOCK)
    expected[i * BLOCK:(i + 1) * BLOCK] = b

def connect(uri):
    hd = nbd.NBD()
    hd.connect_uri(uri)
    return hd

def verify(hd, what):
    got = hd.pread(N * BLOCK, 0)
    if got != bytes(expected):
        bad = next(i for i in range(N) if got[i * BLOCK:(i + 1) * BLOCK] != expected[i * BLOCK:(i + 1) * BLOCK])
        raise SystemExit(f"{what}: block {bad} reads {got[bad * BLOCK:bad * BLOCK + 16]!r}, expected {bytes(expected[bad * BLOCK:bad * BLOCK + 16])!r}")

# Round 1: the VM runs on A; the destination B connects while A still writes.
src = connect("@A@")
for i in range(N):
    put(src, "a1", i)
dst = connect("@B@")
cookies = []
for i in range(0, N, 2):
    b = block("a2", i)
    cookies.append(src.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), i * BLOCK))
    expected[i * BLOCK:(i + 1) * BLOCK] = b
    dst.pread(BLOCK, i * BLOCK)  # reads take no lock: the destination may look meanwhile
for c in cookies:
    while not src.aio_command_completed(c):
        src.poll(-1)
src.flush()
src.shutdown()
del src
for i in range(1, N, 2):
    put(dst, "b1", i)
verify(dst, "round 1, through the destination")

# Round 2, back to A: B flushes but stays connected while A writes.
back = connect("@A@")
for i in range(0, N, 4):
    put(dst, "b2", i)
dst.flush()
for i in range(2, N, 4):
    put(back, "a3", i)
verify(back, "round 2, through the new destination")
dst.shutdown()
del dst
other = connect("@B@")
verify(other, "round 2, through the old source's gateway")
other.shutdown()
back.shutdown()
print("migration verified")
"#;

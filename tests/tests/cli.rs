//! Process-level tests of the `basalt` CLI's data commands: `obj`, `rbd` and `bench`, against
//! 3 monitors and 6 OSDs on 3 hosts. One cluster serves every check (the daemons take most of
//! the time); outputs are checked through `--format json`. No timing assertions.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use basalt_tests::{test_timeouts, wait_for, TestCluster};
use serde_json::Value;

/// Deterministic pseudo-random bytes, different per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    basalt_tests::pattern(seed, len).to_vec()
}

/// A failed command: non-zero exit, nothing on stdout, exactly one line on stderr, which is
/// `error: ...` and mentions `needle`.
fn assert_one_error(out: &Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "{what} should fail; stdout {stdout}, stderr {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("error: "),
        "{what}: stderr line is not an error: line: {stderr:?}"
    );
    assert!(
        lines[0].contains(needle),
        "{what}: error {:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(
        stdout.trim().is_empty(),
        "{what}: stdout not empty: {stdout}"
    );
}

fn cluster() -> TestCluster {
    let mut cluster = TestCluster::start_mons(3, test_timeouts()).expect("start monitors");
    for i in 0..6 {
        cluster
            .start_osd(&format!("host{}", i / 2))
            .expect("start osd");
    }
    wait_for("6 OSDs up", Duration::from_secs(60), || {
        cluster
            .cli_json(&["status"])
            .ok()
            .filter(|s| s["osdmap"]["num_up_osds"] == 6)
    })
    .expect("OSDs up");
    cluster
        .cli_ok(&[
            "pool",
            "create",
            "data",
            "--size",
            "3",
            "--min-size",
            "2",
            "--pg-num",
            "16",
        ])
        .expect("pool create");
    let probe = cluster.dir.path().join("probe");
    std::fs::write(&probe, b"probe").expect("write probe");
    let probe = probe.display().to_string();
    wait_for("the pool to serve writes", Duration::from_secs(60), || {
        cluster
            .cli_ok(&["obj", "put", "data", "probe", &probe])
            .ok()
    })
    .expect("pool serving");
    cluster
        .cli_ok(&["obj", "rm", "data", "probe"])
        .expect("rm probe");
    cluster
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn cli_obj_rbd_bench() {
    let c = cluster();
    let dir = c.dir.path().to_path_buf();
    objects(&c, &dir);
    images(&c, &dir);
    bench(&c);
    client_name(&c, &dir);
    errors(&c, &dir);
}

fn objects(c: &TestCluster, dir: &Path) {
    // put/get round trip of a multi-chunk object.
    let data = pattern(1, 300 * 1024 + 17);
    let src = dir.join("obj.in");
    std::fs::write(&src, &data).expect("write input");
    c.cli_ok(&["obj", "put", "data", "o1", &path_str(&src)])
        .expect("put");
    let dst = dir.join("obj.out");
    c.cli_ok(&["obj", "get", "data", "o1", &path_str(&dst)])
        .expect("get");
    assert_eq!(std::fs::read(&dst).expect("read output"), data);

    let st = c.cli_json(&["obj", "stat", "data", "o1"]).expect("stat");
    assert_eq!(st["size"], data.len() as u64);
    assert_eq!(st["name"], "o1");

    // xattrs
    c.cli_ok(&["obj", "setxattr", "data", "o1", "color", "blue"])
        .expect("setxattr");
    let v = c
        .cli_ok(&["obj", "getxattr", "data", "o1", "color"])
        .expect("getxattr");
    assert_eq!(v.trim_end(), "blue");
    let xs = c
        .cli_json(&["obj", "listxattr", "data", "o1"])
        .expect("listxattr");
    assert_eq!(xs["color"], "blue", "listxattr: {xs}");

    // omap (omap-set creates the object)
    c.cli_ok(&["obj", "omap-set", "data", "o2", "k1", "v1"])
        .expect("omap-set");
    c.cli_ok(&["obj", "omap-set", "data", "o2", "k2", "v2"])
        .expect("omap-set");
    let v = c
        .cli_ok(&["obj", "omap-get", "data", "o2", "k2"])
        .expect("omap-get");
    assert_eq!(v.trim_end(), "v2");
    let om = c
        .cli_json(&["obj", "omap-ls", "data", "o2"])
        .expect("omap-ls");
    assert_eq!(om, serde_json::json!({"k1": "v1", "k2": "v2"}));

    let ls = c.cli_json(&["obj", "ls", "data"]).expect("ls");
    assert_eq!(ls, serde_json::json!(["o1", "o2"]));

    c.cli_ok(&["obj", "rm", "data", "o1"]).expect("rm o1");
    c.cli_ok(&["obj", "rm", "data", "o2"]).expect("rm o2");
    let ls = c.cli_json(&["obj", "ls", "data"]).expect("ls");
    assert_eq!(ls, serde_json::json!([]));
    assert_one_error(
        &c.cli(&["obj", "stat", "data", "o1"]),
        "stat of a removed object",
        "o1",
    );
}

/// Runs an `rbd rm`, retrying (bounded) while the image still shows the watch of a CLI process
/// that just exited (the OSD drops it when it sees the connection close).
fn rbd_rm(c: &TestCluster, spec: &str) {
    wait_for(&format!("rbd rm {spec}"), Duration::from_secs(40), || {
        let out = c.cli(&["rbd", "rm", spec]);
        if out.status.success() {
            return Some(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use"), "rbd rm {spec} failed: {err}");
        None
    })
    .expect("rbd rm");
}

fn images(c: &TestCluster, dir: &Path) {
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!([])
    );
    c.cli_ok(&[
        "rbd",
        "create",
        "data/img1",
        "--size",
        "10M",
        "--object-size",
        "1M",
    ])
    .expect("create");
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!(["img1"])
    );
    let info = c.cli_json(&["rbd", "info", "data/img1"]).expect("info");
    assert_eq!(info["name"], "img1");
    assert_eq!(info["size"], 10u64 << 20);
    assert_eq!(info["object_size"], 1u64 << 20);
    assert_eq!(info["order"], 20);
    assert_eq!(info["objects"], 10);

    // Grow, refuse a shrink without --allow-shrink, shrink.
    c.cli_ok(&["rbd", "resize", "data/img1", "--size", "20M"])
        .expect("grow");
    let info = c.cli_json(&["rbd", "info", "data/img1"]).expect("info");
    assert_eq!(info["size"], 20u64 << 20);
    assert_eq!(info["objects"], 20);
    assert_one_error(
        &c.cli(&["rbd", "resize", "data/img1", "--size", "5M"]),
        "shrink without --allow-shrink",
        "--allow-shrink",
    );
    c.cli_ok(&[
        "rbd",
        "resize",
        "data/img1",
        "--size",
        "5M",
        "--allow-shrink",
    ])
    .expect("shrink");
    let info = c.cli_json(&["rbd", "info", "data/img1"]).expect("info");
    assert_eq!(info["size"], 5u64 << 20);
    assert_eq!(info["objects"], 5);

    // Rename.
    c.cli_ok(&["rbd", "rename", "data/img1", "img2"])
        .expect("rename");
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!(["img2"])
    );
    assert_one_error(
        &c.cli(&["rbd", "info", "data/img1", "--format", "json"]),
        "info of a renamed-away image",
        "does not exist",
    );

    // Import a sparse file: data at the start, in the middle of an object, and at the very
    // end; the rest holes. Not a multiple of the object size.
    let len: u64 = 6 * (1 << 20) + 123;
    let src = dir.join("img.in");
    {
        let mut f = std::fs::File::create(&src).expect("create sparse input");
        f.set_len(len).expect("set_len");
        for (at, seed, n) in [
            (0u64, 11u64, 4096usize),
            ((2 << 20) + 100, 12, 10_000),
            (len - 50, 13, 50),
        ] {
            f.seek(SeekFrom::Start(at)).expect("seek");
            f.write_all(&pattern(seed, n)).expect("write");
        }
    }
    let imp = c
        .cli_json(&[
            "rbd",
            "import",
            &path_str(&src),
            "data/imp",
            "--object-size",
            "1M",
        ])
        .expect("import");
    assert_eq!(imp["bytes"], len);
    let data_bytes = imp["data_bytes"].as_u64().expect("data_bytes");
    assert!(
        data_bytes > 0 && data_bytes < len / 4,
        "import wrote {data_bytes} bytes of data for a mostly-hole file"
    );
    let info = c.cli_json(&["rbd", "info", "data/imp"]).expect("info");
    assert_eq!(info["size"], len);
    assert_eq!(info["objects"], 7);

    let out = dir.join("img.out");
    let exp = c
        .cli_json(&["rbd", "export", "data/imp", &path_str(&out)])
        .expect("export");
    assert_eq!(exp["bytes"], len);
    let want = std::fs::read(&src).expect("read input");
    let got = std::fs::read(&out).expect("read export");
    assert_eq!(got.len(), want.len(), "exported length");
    assert!(got == want, "exported bytes differ from the imported file");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&out).expect("stat export");
        assert!(
            m.blocks() * 512 < len / 2,
            "export is not sparse: {} blocks for {len} bytes",
            m.blocks()
        );
    }
    // An existing output file is not overwritten.
    assert_one_error(
        &c.cli(&["rbd", "export", "data/imp", &path_str(&out)]),
        "export onto an existing file",
        "img.out",
    );

    rbd_rm(c, "data/img2");
    rbd_rm(c, "data/imp");
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!([])
    );
    // No data objects are left behind.
    let objs = c.cli_json(&["obj", "ls", "data"]).expect("obj ls");
    let left: Vec<&Value> = objs
        .as_array()
        .expect("array")
        .iter()
        .filter(|o| o.as_str().is_some_and(|s| s.starts_with("rbd_data.")))
        .collect();
    assert!(left.is_empty(), "data objects left: {left:?}");
}

fn bench(c: &TestCluster) {
    assert_one_error(
        &c.cli(&["bench", "read", "--pool", "data", "--seconds", "1"]),
        "bench read before any write",
        "bench write",
    );
    let w = c
        .cli_json(&[
            "bench",
            "write",
            "--pool",
            "data",
            "--seconds",
            "2",
            "--threads",
            "4",
            "--block-size",
            "64K",
            "--no-cleanup",
        ])
        .expect("bench write");
    assert_eq!(w["mode"], "write");
    assert_eq!(w["block_size"], 65536);
    let ops = w["ops"].as_u64().expect("ops");
    assert!(ops > 0, "bench write made no ops: {w}");
    assert_eq!(w["objects"], ops);
    assert_eq!(w["cleaned_up"], false);
    for k in ["p50", "p99", "max"] {
        assert!(
            w["latency_ms"][k].as_f64().is_some_and(|v| v > 0.0),
            "latency {k}: {w}"
        );
    }
    assert!(w["iops"].as_f64().is_some_and(|v| v > 0.0));
    assert!(w["mib_per_sec"].as_f64().is_some_and(|v| v > 0.0));

    let r = c
        .cli_json(&["bench", "read", "--pool", "data", "--seconds", "2"])
        .expect("bench read");
    assert_eq!(r["mode"], "read");
    assert!(r["ops"].as_u64().is_some_and(|v| v > 0), "bench read: {r}");
    assert_eq!(r["block_size"], 65536);
    let r = c
        .cli_json(&[
            "bench",
            "rand",
            "--pool",
            "data",
            "--seconds",
            "1",
            "--threads",
            "2",
        ])
        .expect("bench rand");
    assert!(r["ops"].as_u64().is_some_and(|v| v > 0), "bench rand: {r}");

    let cl = c
        .cli_json(&["bench", "cleanup", "--pool", "data"])
        .expect("bench cleanup");
    assert_eq!(cl["removed"], ops + 1, "the objects and the metadata");
    assert_one_error(
        &c.cli(&["bench", "rand", "--pool", "data", "--seconds", "1"]),
        "bench rand after cleanup",
        "no bench objects",
    );

    // Without --no-cleanup a write removes what it wrote.
    let w = c
        .cli_json(&[
            "bench",
            "write",
            "--pool",
            "data",
            "--seconds",
            "1",
            "--threads",
            "2",
            "--block-size",
            "4K",
        ])
        .expect("bench write");
    assert!(w["ops"].as_u64().is_some_and(|v| v > 0));
    assert_eq!(w["cleaned_up"], true);
    let objs = c.cli_json(&["obj", "ls", "data"]).expect("obj ls");
    let left: Vec<&Value> = objs
        .as_array()
        .expect("array")
        .iter()
        .filter(|o| o.as_str().is_some_and(|s| s.starts_with("bench_")))
        .collect();
    assert!(left.is_empty(), "bench objects left: {left:?}");
}

/// A config's `[client] name` is the entity the CLI's client connects as: bench names its
/// objects after it.
fn client_name(c: &TestCluster, dir: &Path) {
    let mut config = c.config.clone();
    config.client.name = Some("client.benchtester".into());
    let named = dir.join("named.toml");
    std::fs::write(&named, config.to_toml()).expect("write config");
    let basalt = |args: &[&str]| {
        basalt_tests::run_bounded(
            std::process::Command::new(basalt_tests::bin("basalt"))
                .arg("-c")
                .arg(&named)
                .args(args),
            Duration::from_secs(120),
        )
    };
    let out = basalt(&[
        "bench",
        "write",
        "--pool",
        "data",
        "--seconds",
        "1",
        "--threads",
        "1",
        "--block-size",
        "4K",
        "--no-cleanup",
    ]);
    assert!(
        out.status.success(),
        "bench write as client.benchtester: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objs = c.cli_json(&["obj", "ls", "data"]).expect("obj ls");
    let mine = objs
        .as_array()
        .expect("array")
        .iter()
        .filter(|o| {
            o.as_str()
                .is_some_and(|s| s.starts_with("bench_benchtester_"))
        })
        .count();
    assert!(mine > 0, "no object named after client.benchtester: {objs}");
    c.cli_ok(&["bench", "cleanup", "--pool", "data"])
        .expect("bench cleanup");
}

fn errors(c: &TestCluster, dir: &Path) {
    assert_one_error(
        &c.cli(&["obj", "get", "data", "missing", &path_str(&dir.join("x"))]),
        "obj get of a missing object",
        "missing",
    );
    assert_one_error(
        &c.cli(&["obj", "ls", "nopool"]),
        "obj ls of an unknown pool",
        "pool ls",
    );
    assert_one_error(
        &c.cli(&["rbd", "ls", "nopool", "--format", "json"]),
        "rbd ls of an unknown pool",
        "pool ls",
    );
    assert_one_error(
        &c.cli(&["rbd", "create", "nopool/img", "--size", "1G"]),
        "rbd create in an unknown pool",
        "nopool",
    );
    assert_one_error(
        &c.cli(&["rbd", "info", "data/nope"]),
        "rbd info of an unknown image",
        "rbd ls data",
    );
    assert_one_error(
        &c.cli(&["rbd", "rm", "data/nope"]),
        "rbd rm of an unknown image",
        "does not exist",
    );
    assert_one_error(
        &c.cli(&["rbd", "create", "data/img", "--size", "10Q"]),
        "a bad size string",
        "10Q",
    );
    assert_one_error(
        &c.cli(&[
            "rbd",
            "create",
            "data/img",
            "--size",
            "1G",
            "--object-size",
            "3M",
        ]),
        "a bad object size",
        "power of two",
    );
    assert_one_error(
        &c.cli(&["rbd", "info", "img-without-pool"]),
        "a spec without a pool",
        "POOL/IMAGE",
    );
    assert_one_error(
        &c.cli(&["bench", "write", "--pool", "nopool", "--seconds", "1"]),
        "bench on an unknown pool",
        "pool ls",
    );
    assert_one_error(
        &c.cli(&["bench", "write", "--pool", "data", "--block-size", "lots"]),
        "bench with a bad block size",
        "lots",
    );
    assert_one_error(
        &c.cli(&["rbd", "create", "data/img", "--size", "0"]),
        "an image of size 0",
        "greater than 0",
    );
    assert_one_error(
        &c.cli(&["rbd", "create", "data/img", "--size", "8E"]),
        "an image of 8 EiB",
        "beyond what an image can address",
    );
    // Nothing was created by the failures.
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!([])
    );
    // The largest image (8 EiB less one 4 MiB object, 2^41 objects) is thin: shrinking and
    // removing it cost what it holds (each command is bounded at 120 s; a probe per
    // possible object would take days).
    let max = ((1u64 << 63) - (4 << 20)).to_string();
    c.cli_ok(&["rbd", "create", "data/huge", "--size", &max])
        .expect("create the largest image");
    c.cli_ok(&[
        "rbd",
        "resize",
        "data/huge",
        "--size",
        "1G",
        "--allow-shrink",
    ])
    .expect("shrink the largest image");
    c.cli_ok(&["rbd", "resize", "data/huge", "--size", &max])
        .expect("grow it back");
    c.cli_ok(&["rbd", "rm", "data/huge"])
        .expect("remove the largest image");
    assert_eq!(
        c.cli_json(&["rbd", "ls", "data"]).expect("ls"),
        serde_json::json!([])
    );
}

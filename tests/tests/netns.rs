//! Three hosts in network namespaces (`deploy/netns-cluster.sh`): one monitor, two OSDs and a
//! gateway per host on 10.78.0.1-3, the CLI in the root namespace. A host is cut off (its veth
//! link down, so its peers see silence, not refused connections), the other two keep serving
//! reads and writes, and after the link comes back and every PG is active+clean every object
//! reads back identically. A block image is written and read through the gateways in the
//! namespaces as well.
//!
//! Needs root with CAP_NET_ADMIN and qemu-io: without them the test fails, saying what to
//! install or grant (it never passes by skipping). A
//! Drop guard runs `netns-cluster.sh down` (stops the daemons by pid, removes the
//! namespaces, veths and bridge) even when an assertion fails. Every wait is bounded; nothing
//! asserts on timing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_tests::{bin, bin_dir, run_bounded, wait_for};
use serde_json::Value;

/// Namespace prefix and subnet reserved for this test, apart from the demo's defaults
/// (`basalt`, 10.77.0) so a running demo and the test never meet.
const PREFIX: &str = "bslttest";
const NET: &str = "10.78.0";
const POOL: &str = "rbd";
const PG_NUM: usize = 32;

/// Deterministic pseudo-random bytes, different per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    basalt_tests::pattern(seed, len).to_vec()
}

fn script_path() -> PathBuf {
    // The crate dir at run time (cargo sets it for `cargo test`): one test binary serves
    // every checkout of the same sources sharing a target dir, so the compile-time path may
    // name another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("../deploy/netns-cluster.sh")
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// qemu-io commands on `rbd/disk` through host `h`'s gateway; qemu-io exits 0 even when a
/// command fails, so failures are read from its output.
fn qemu_io(h: u32, cmds: &[&str]) -> anyhow::Result<()> {
    let url = format!("nbd://{NET}.{h}:10809/{POOL}/disk");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(&url);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let text = basalt_tests::output_text(&out);
    if !out.status.success() || text.contains("failed") || text.contains("rror") {
        bail!("qemu-io {cmds:?} on {url}: {text}");
    }
    Ok(())
}

/// Whether this process may create network namespaces (root with CAP_NET_ADMIN).
fn netns_permitted() -> Result<(), String> {
    let probe = format!("{PREFIX}-probe{}", std::process::id());
    let out = Command::new("ip")
        .args(["netns", "add", &probe])
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    Ok(())
}

/// The namespace cluster; dropping it runs `netns-cluster.sh down`.
struct NetnsCluster {
    dir: tempfile::TempDir,
    data: PathBuf,
}

impl NetnsCluster {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("basalt-netns-").tempdir()?;
        let data = dir.path().join("objects");
        std::fs::create_dir_all(&data)?;
        let c = NetnsCluster { dir, data };
        // Namespaces under this test's own prefix can only be left by an earlier run of this
        // test that was killed before its Drop guard ran: clear them (`down` kills whatever
        // still runs inside them) rather than fail on them.
        let list = Command::new("ip").args(["netns", "list"]).output()?;
        let leftover = String::from_utf8_lossy(&list.stdout)
            .split_whitespace()
            .any(|w| w.starts_with(&format!("{PREFIX}-h")));
        if leftover {
            eprintln!("clearing namespaces left by an earlier killed run of this test");
            c.script_ok(&["down", &c.dir.path().join("leftover").display().to_string()])?;
        }
        Ok(c)
    }

    fn script(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(script_path())
            .args(args)
            .env("BASALT_BIN_DIR", bin_dir())
            .env("BASALT_NETNS_PREFIX", PREFIX)
            .env("BASALT_NETNS_NET", NET)
            // The OSDs' use is their own, not that of the disk the tests run on.
            .env(
                "BASALT_NETNS_OSD_CAPACITY",
                basalt_tests::TEST_OSD_CAPACITY.to_string(),
            )
            .env_remove("BASALT_NETNS_TIMEOUTS");
        run_bounded(&mut cmd, limit)
    }

    fn script_ok(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.script(args, Duration::from_secs(240));
        if !out.status.success() {
            bail!("netns-cluster.sh {args:?} failed: {}", show(&out));
        }
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim_end());
        Ok(())
    }

    fn up(&self) -> anyhow::Result<()> {
        self.script_ok(&["up", &self.dir.path().display().to_string()])
    }

    fn cut(&self, host: &str) -> anyhow::Result<()> {
        self.script_ok(&["cut", host])
    }

    fn heal(&self, host: &str) -> anyhow::Result<()> {
        self.script_ok(&["heal", host])
    }

    fn cli(&self, args: &[&str], limit: Duration) -> Output {
        run_bounded(
            Command::new(bin("basalt"))
                .arg("-c")
                .arg(self.dir.path().join("cluster.toml"))
                .args(args),
            limit,
        )
    }

    fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args, Duration::from_secs(120));
        if !out.status.success() {
            bail!("basalt {args:?} failed: {}", show(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A read command's JSON, or `None` (for polling) if it fails within 10 s.
    fn poll_json(&self, args: &[&str]) -> Option<Value> {
        let mut a = vec!["--timeout", "8", "--format", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a, Duration::from_secs(10));
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Stores `data` as object `name` (with a generous client timeout: a write issued just as
    /// a host vanishes waits for the failure to be noticed and the PG to re-peer).
    fn put(&self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        let file = self.data.join(name);
        std::fs::write(&file, data)?;
        self.cli_ok(&[
            "--timeout",
            "90",
            "obj",
            "put",
            POOL,
            name,
            &file.display().to_string(),
        ])
        .with_context(|| format!("put {name}"))?;
        Ok(())
    }

    fn get(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let file = self.data.join(format!("{name}.read"));
        let _ = std::fs::remove_file(&file);
        self.cli_ok(&[
            "--timeout",
            "90",
            "obj",
            "get",
            POOL,
            name,
            &file.display().to_string(),
        ])
        .with_context(|| format!("get {name}"))?;
        Ok(std::fs::read(&file)?)
    }

    /// Every object of `expected` reads back byte-identical, and the pool lists exactly them
    /// (besides the block image's `rbd_*` objects).
    fn check_all(&self, expected: &BTreeMap<String, Vec<u8>>, when: &str) -> anyhow::Result<()> {
        for (name, want) in expected {
            let got = self.get(name)?;
            if &got != want {
                bail!(
                    "{when}: {name} read back {} bytes differing from the {} written",
                    got.len(),
                    want.len()
                );
            }
        }
        let listed: Value = serde_json::from_str(&self.cli_ok(&[
            "--timeout",
            "90",
            "--format",
            "json",
            "obj",
            "ls",
            POOL,
        ])?)?;
        let mut listed: Vec<String> = listed
            .as_array()
            .context("obj ls is not a JSON list")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            // The block image's objects share the pool.
            .filter(|n| !n.starts_with("rbd_"))
            .collect();
        listed.sort();
        let want: Vec<String> = expected.keys().cloned().collect();
        if listed != want {
            bail!("{when}: obj ls shows {listed:?}, expected {want:?}");
        }
        eprintln!(
            "{when}: all {} objects read back identically",
            expected.len()
        );
        Ok(())
    }

    /// Waits until `up` OSDs are up and the monitor quorum has `quorum` members.
    fn wait_membership(&self, up: u64, quorum: usize, limit: Duration) -> anyhow::Result<()> {
        let mut last = String::new();
        wait_for(
            &format!("{up} OSDs up and a quorum of {quorum}"),
            limit,
            || {
                let st = self.poll_json(&["status"])?;
                let n_up = st["osdmap"]["num_up_osds"].as_u64()?;
                let q = st["mon"]["quorum"].as_array()?.len();
                last = format!("{n_up} OSDs up, quorum {}", st["mon"]["quorum"]);
                (n_up == up && q == quorum).then_some(())
            },
        )
        .with_context(|| format!("last seen: {last}"))?;
        eprintln!("{last}");
        Ok(())
    }

    /// Waits until `pg ls` reports all PG_NUM PGs in a state `ok` accepts.
    fn wait_pgs(
        &self,
        what: &str,
        limit: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let mut last = Value::Null;
        wait_for(what, limit, || {
            let v = self.poll_json(&["pg", "ls"])?;
            let summary = v["summary"].as_object()?.clone();
            last = Value::Object(summary.clone());
            let total: u64 = summary.values().filter_map(Value::as_u64).sum();
            (total == PG_NUM as u64 && summary.keys().all(|s| ok(s))).then_some(())
        })
        .with_context(|| format!("last PG states: {last}"))?;
        eprintln!("PGs: {last}");
        Ok(())
    }

    fn wait_all_clean(&self) -> anyhow::Result<()> {
        self.wait_pgs("every PG active+clean", Duration::from_secs(180), |s| {
            s == "active+clean"
        })
    }

    fn wait_all_active(&self) -> anyhow::Result<()> {
        self.wait_pgs("every PG active", Duration::from_secs(120), |s| {
            s == "active" || s.starts_with("active+")
        })
    }

    fn dump_logs(&self) {
        for h in 1..=3 {
            for d in ["mon", "osd0", "osd1", "gw"] {
                let path = self.dir.path().join(format!("h{h}/{d}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // The tail: the whole logs of a long run drown the failure.
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!("===== h{h}/{d} log (last {} lines) =====", tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = self.script(
            &["down", &self.dir.path().display().to_string()],
            Duration::from_secs(120),
        );
        if !out.status.success() {
            eprintln!("netns-cluster.sh down failed: {}", show(&out));
        }
    }
}

#[test]
fn partitioned_host_and_its_return() {
    let permitted = netns_permitted();
    basalt_tests::require(
        permitted.is_ok(),
        "the privilege to create network namespaces",
        &format!(
            "run the test as root with CAP_NET_ADMIN and iproute2 installed ({})",
            permitted.err().unwrap_or_default()
        ),
    );
    basalt_tests::require_tool("qemu-io", "qemu-utils");
    let c = NetnsCluster::new().expect("namespace cluster");
    c.up().expect("netns-cluster.sh up");
    c.wait_membership(6, 3, Duration::from_secs(120))
        .expect("all daemons in");
    c.cli_ok(&[
        "pool",
        "create",
        POOL,
        "--size",
        "3",
        "--min-size",
        "2",
        "--pg-num",
        &PG_NUM.to_string(),
    ])
    .expect("create pool");
    c.wait_all_clean().expect("fresh pool clean");

    // Sizes across chunk boundaries (64 KiB chunks), from one byte to a few chunks.
    let sizes = [1usize, 4096, 65_536, 65_537, 200_000, 300_001];
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..12u64 {
        let name = format!("a{i}");
        let data = pattern(i, sizes[i as usize % sizes.len()]);
        c.put(&name, &data).expect("put before the cut");
        expected.insert(name, data);
    }
    c.check_all(&expected, "before the cut").expect("reads");
    // A block image through the gateways in the namespaces (h1 writes; reads take no lock, so
    // any gateway reads).
    c.cli_ok(&["rbd", "create", &format!("{POOL}/disk"), "--size", "64M"])
        .expect("create image");
    qemu_io(1, &["write -P 0xab 0 1M"]).expect("NBD write through h1");
    qemu_io(3, &["read -P 0xab 0 1M"]).expect("NBD read through h3");

    // h3 vanishes: writes issued right away wait out failure detection, then succeed.
    c.cut("h3").expect("cut h3");
    for i in 0..4u64 {
        let name = format!("b{i}");
        let data = pattern(100 + i, sizes[(i as usize + 3) % sizes.len()]);
        c.put(&name, &data)
            .expect("put while h3 is being marked down");
        expected.insert(name, data);
    }
    c.wait_membership(4, 2, Duration::from_secs(120))
        .expect("h3's OSDs marked down, monitors 0 and 1 in quorum");
    c.wait_all_active().expect("PGs active on two hosts");
    // Overwrite half the first objects (h3 keeps stale copies) and add more.
    for i in (0..12u64).step_by(2) {
        let name = format!("a{i}");
        let data = pattern(1000 + i, sizes[(i as usize + 1) % sizes.len()]);
        c.put(&name, &data).expect("overwrite while h3 is cut");
        expected.insert(name, data);
    }
    for i in 0..4u64 {
        let name = format!("c{i}");
        let data = pattern(200 + i, sizes[i as usize % sizes.len()]);
        c.put(&name, &data).expect("put while h3 is cut");
        expected.insert(name, data);
    }
    c.check_all(&expected, "h3 cut")
        .expect("reads while h3 is cut");
    qemu_io(
        1,
        &[
            "write -P 0xcd 1M 1M",
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 1M",
        ],
    )
    .expect("NBD through h1 while h3 is cut");

    // h3 returns: its OSDs boot again, PGs peer and recover its stale copies.
    c.heal("h3").expect("heal h3");
    c.wait_membership(6, 3, Duration::from_secs(120))
        .expect("h3's OSDs up again, full quorum");
    c.wait_all_clean().expect("clean after h3 returned");
    c.check_all(&expected, "after h3 returned")
        .expect("reads after heal");
    qemu_io(3, &["read -P 0xab 0 1M", "read -P 0xcd 1M 1M"])
        .expect("NBD read through h3's gateway after it returned");
    eprintln!("after h3 returned: the image reads back through h3's gateway");

    // Then another host goes (h1 by default: it holds the leader monitor, mon.0;
    // BASALT_NETNS_SECOND_CUT=h2 picks another, `none` skips it), so objects whose primary
    // was on h3 are served by its recovered copies, and every client has to notice that the
    // monitor it preferred went silent (HTTP/2 keepalive) and move to another.
    let second = std::env::var("BASALT_NETNS_SECOND_CUT").unwrap_or_else(|_| "h1".into());
    if second != "none" && !second.is_empty() {
        c.cut(&second).expect("cut a second host");
        c.wait_membership(4, 2, Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!("{second}'s OSDs marked down, two monitors in quorum: {e:#}")
            });
        c.wait_all_active().expect("PGs active on two hosts");
        c.check_all(&expected, &format!("{second} cut"))
            .expect("reads with h3's recovered copies");
        c.heal(&second).expect("heal the second host");
        c.wait_membership(6, 3, Duration::from_secs(120))
            .expect("second host back");
        c.wait_all_clean().expect("clean at the end");
        c.check_all(&expected, "at the end").expect("final reads");
    }
}

//! Harness for basalt's process-level tests: starts the real daemons on
//! 127.0.0.1 with ephemeral ports in a temporary directory, runs the real CLI,
//! and kills every process it started (by pid) when dropped. Every wait is
//! bounded; nothing here asserts on timing.
//!
//! Binaries are found beside the test executable's target directory
//! (`target/<profile>/`), or in `$BASALT_BIN_DIR`; build them first with
//! `cargo build --release --bins` (`.ci/run` does).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use basalt_config::{
    ClusterConfig, ClusterSection, MonEntry, OsdTuning, PaxosTuning, Timeouts, TlsSection,
};

/// Directory holding the basalt binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BASALT_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --bins` first (or set BASALT_BIN_DIR)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1 for a daemon to bind later, and bind again after a restart.
///
/// Taken below the kernel's ephemeral range (32768-60999 by default): a port the kernel
/// handed out for `bind(:0)` and released could be given again as the source port of any
/// outgoing connection (the daemons make many) before the daemon binds it, and a daemon
/// restarted on its old port would find it taken. Below that range only another test asks
/// for ports, and each process walks its own stretch (picked by pid) checking each port.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Above `basalt cluster up`'s fixed ports (6789.., 9280.., 10809).
    const LOW: u32 = 11_000;
    const SPAN: u32 = 21_000; // up to 31_999
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 64) * (SPAN / 64);
    for _ in 0..SPAN {
        let port = LOW + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    // Every port below the ephemeral range is taken: fall back to the kernel's choice.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// The `--capacity-bytes` every test OSD gets unless a test sets another (8 GiB: more than
/// any test stores, so the fullness it reports is its own, not the build disk's).
pub const TEST_OSD_CAPACITY: u64 = 8 << 30;

/// Timeouts small enough for tests, in the proportions of the defaults.
pub fn test_timeouts() -> Timeouts {
    Timeouts {
        election_timeout_ms: 1_000,
        lease_ms: 1_000,
        propose_interval_ms: 20,
        osd_beacon_interval_ms: 300,
        osd_beacon_grace_ms: 2_000,
        osd_heartbeat_interval_ms: 300,
        osd_heartbeat_grace_ms: 2_000,
        min_down_reporters: 2,
        down_out_interval_secs: 600,
        client_op_timeout_ms: 20_000,
        // Bounded, so a test whose I/O cannot be served fails instead of hanging; the fault
        // test uses the default (none), as a VM's gateway does.
        osd_op_timeout_ms: 20_000,
    }
}

/// OSD keys every test cluster's auth database starts with: `osd.0` .. `osd.{N-1}`.
pub const TEST_OSD_KEYS: u32 = 32;

/// Writes the keyrings `basalt cluster up` writes: DIR/keyring (client.admin), DIR/osd.N.keyring
/// for the first [`TEST_OSD_KEYS`] OSD ids, and DIR/mon.keyring beside the config (the
/// monitors' `mon.` key and bootstrap keyring, which they read by default), so every test
/// cluster authenticates, and its auth database starts with client.admin and the OSD keys.
fn write_keyrings(dir: &Path) -> anyhow::Result<()> {
    use basalt_auth::{Caps, EntityName, Keyring, Secret};
    let admin = EntityName::client("admin")?;
    let caps = Caps::from_pairs(&["mon", "allow *", "osd", "allow *"])?;
    let mut ring = Keyring::new();
    ring.insert(admin, Secret::generate()?, caps.clone());
    ring.save(&dir.join("keyring"))?;
    ring.insert(EntityName::mon(), Secret::generate()?, caps);
    let osd_caps = Caps::from_pairs(&["mon", "allow profile osd", "osd", "allow *"])?;
    for id in 0..TEST_OSD_KEYS {
        let key = Secret::generate()?;
        let mut own = Keyring::new();
        own.insert(EntityName::osd(id), key.clone(), osd_caps.clone());
        own.save(&dir.join(format!("osd.{id}.keyring")))?;
        ring.insert(EntityName::osd(id), key, osd_caps.clone());
    }
    ring.save(&dir.join("mon.keyring"))?;
    Ok(())
}

/// Where the harness keeps its certificates, under a test cluster's directory: the CA
/// (`ca-cert.pem`, `ca-key.pem`), one daemon certificate for 127.0.0.1 that every test
/// daemon serves (`daemon-cert.pem`, `daemon-key.pem`, named by `[tls]`), and QEMU-style
/// NBD directories `nbd-server/` (the gateway's, CN `gw`) and `nbd-client-admin/` (CN
/// `client.admin`).
pub const TLS_DIR: &str = "tls";

/// Makes the certificates `basalt cluster up` makes (in one daemon certificate instead of
/// one per daemon) and returns the `[tls]` section naming them.
fn write_certificates(dir: &Path) -> anyhow::Result<TlsSection> {
    use basalt_tls::gen::{write_nbd_dir, CertificateAuthority, NbdEnd, CA_CERT};
    let tls = dir.join(TLS_DIR);
    let ca = CertificateAuthority::generate("basalt test CA")?;
    ca.write(&tls)?;
    let local = ["127.0.0.1".to_string(), "localhost".to_string()];
    ca.issue("daemon", &local)?
        .write(&tls.join("daemon-cert.pem"), &tls.join("daemon-key.pem"))?;
    write_nbd_dir(
        &tls.join("nbd-server"),
        ca.cert_pem(),
        &ca.issue("gw", &local)?,
        NbdEnd::Server,
    )?;
    write_nbd_dir(
        &tls.join("nbd-client-admin"),
        ca.cert_pem(),
        &ca.issue("client.admin", &[])?,
        NbdEnd::Client,
    )?;
    Ok(TlsSection {
        enabled: true,
        ca_file: Some(tls.join(CA_CERT)),
        cert_file: Some(tls.join("daemon-cert.pem")),
        key_file: Some(tls.join("daemon-key.pem")),
    })
}

/// Polls `cond` every 100 ms until it returns `Some`, or fails after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Daemon {
    name: String,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
    metrics: SocketAddr,
}

impl Daemon {
    /// Starts `program` with the daemon's arguments unless it runs, appending to its log.
    fn start(&mut self, program: &str, rust_log: &str) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin(program))
            .args(&self.args)
            .env("RUST_LOG", rust_log)
            // Plain `key=value` log lines, so tests can look for them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }
}

/// A local cluster of real processes in a temporary directory.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    pub config_path: PathBuf,
    mons: Vec<Daemon>,
    osds: Vec<Daemon>,
    /// NBD gateways and the address each serves.
    gws: Vec<(Daemon, SocketAddr)>,
}

impl TestCluster {
    /// Writes a config for `n` monitors and starts them.
    pub fn start_mons(n: u32, timeouts: Timeouts) -> anyhow::Result<Self> {
        let mut cluster = Self::config_only(n, timeouts)?;
        cluster.spawn_mons(n)?;
        Ok(cluster)
    }

    /// As [`TestCluster::start_mons`], with the config changed by `edit` before any monitor
    /// reads it.
    pub fn start_mons_with(
        n: u32,
        timeouts: Timeouts,
        edit: impl FnOnce(&mut ClusterConfig),
    ) -> anyhow::Result<Self> {
        let mut cluster = Self::config_only(n, timeouts)?;
        edit(&mut cluster.config);
        std::fs::write(&cluster.config_path, cluster.config.to_toml())?;
        cluster.spawn_mons(n)?;
        Ok(cluster)
    }

    /// Writes a config naming `n` monitors on free ports but starts none (a cluster whose
    /// monitors are all unreachable).
    pub fn config_only(n: u32, timeouts: Timeouts) -> anyhow::Result<Self> {
        Self::config_only_with_fsid(n, timeouts, &format!("test-{}", std::process::id()))
    }

    /// As [`TestCluster::config_only`], with a chosen cluster fsid.
    pub fn config_only_with_fsid(n: u32, timeouts: Timeouts, fsid: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("basalt-test-").tempdir()?;
        let mons: Vec<MonEntry> = (0..n)
            .map(|rank| MonEntry {
                rank,
                addr: free_addr(),
                data: Some(dir.path().join(format!("mon{rank}"))),
            })
            .collect();
        let config = ClusterConfig {
            cluster: ClusterSection {
                name: "basalt".into(),
                fsid: fsid.into(),
            },
            mons,
            timeouts,
            paxos: PaxosTuning::default(),
            client: basalt_config::ClientSection {
                keyring: Some(dir.path().join("keyring")),
                ..Default::default()
            },
            osd: Default::default(),
            auth: Default::default(),
            tls: write_certificates(dir.path())?,
        };
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, config.to_toml())?;
        write_keyrings(dir.path())?;
        Ok(TestCluster {
            dir,
            config,
            config_path,
            mons: Vec::new(),
            osds: Vec::new(),
            gws: Vec::new(),
        })
    }

    fn spawn_mons(&mut self, n: u32) -> anyhow::Result<()> {
        let cluster = self;
        for rank in 0..n {
            let metrics = free_addr();
            let args = vec![
                "--config".to_string(),
                cluster.config_path.display().to_string(),
                "--id".to_string(),
                rank.to_string(),
                "--metrics".to_string(),
                metrics.to_string(),
            ];
            let log = cluster.dir.path().join(format!("mon{rank}.log"));
            cluster.mons.push(Daemon {
                name: format!("mon.{rank}"),
                child: None,
                args,
                log,
                metrics,
            });
            cluster.start_mon(rank)?;
        }
        Ok(())
    }

    pub fn start_mon(&mut self, rank: u32) -> anyhow::Result<()> {
        self.mons[rank as usize].start("basalt-mon", "info,basalt_paxos=debug")
    }

    /// SIGKILLs monitor `rank` (power-cut semantics).
    pub fn kill_mon(&mut self, rank: u32) {
        if let Some(mut c) = self.mons[rank as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT a monitor (a hung machine).
    pub fn pause_mon(&self, rank: u32, paused: bool) {
        if let Some(c) = &self.mons[rank as usize].child {
            let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Whether monitor `rank`'s process is still running.
    pub fn mon_alive(&mut self, rank: u32) -> bool {
        match self.mons[rank as usize].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The Prometheus text monitor `rank` serves at /metrics.
    pub fn mon_metrics(&self, rank: u32) -> anyhow::Result<String> {
        http_get(self.mons[rank as usize].metrics, "/metrics")
    }

    pub fn mon_log(&self, rank: u32) -> String {
        std::fs::read_to_string(&self.mons[rank as usize].log).unwrap_or_default()
    }

    /// A client config naming only monitor `rank`, to ask that one directly.
    pub fn config_for_mon(&self, rank: u32) -> ClusterConfig {
        let mut c = self.config.clone();
        c.mons.retain(|m| m.rank == rank);
        // A client-side config: ranks must be 0..n, so renumber.
        c.mons[0].rank = 0;
        c
    }

    /// The keyring of the OSD with harness index `i` (`osd.i`).
    pub fn osd_keyring_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("osd.{i}.keyring"))
    }

    /// The admin keyring (`client.admin`, every cap), as `basalt cluster up` writes it.
    pub fn admin_keyring_path(&self) -> PathBuf {
        self.dir.path().join("keyring")
    }

    /// Runs the CLI against this cluster (bounded at 120 s).
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(bin("basalt"))
                .arg("-c")
                .arg(&self.config_path)
                .args(args),
            Duration::from_secs(120),
        )
    }

    /// Runs the CLI and returns stdout, failing on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args);
        if !out.status.success() {
            bail!(
                "basalt {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a read command with `--format json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.cli_ok(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("basalt {args:?} printed invalid JSON: {out}"))
    }

    /// Starts a new `basalt-osd` in CRUSH host `host` with its own empty data directory;
    /// returns its harness index (not its OSD id: the monitors assign that).
    pub fn start_osd(&mut self, host: &str) -> anyhow::Result<usize> {
        let i = self.osds.len();
        let data = self.dir.path().join(format!("osd{i}"));
        let args = vec![
            "--host".to_string(),
            host.to_string(),
            "--data".to_string(),
            data.display().to_string(),
            // OSDs report their use against this rather than the disk the tests run on: a
            // crowded build disk past the full ratio would otherwise make every pool full.
            "--capacity-bytes".to_string(),
            TEST_OSD_CAPACITY.to_string(),
        ];
        self.start_osd_with(args)
    }

    /// Starts a `basalt-osd` with this cluster's config, a metrics address and `args`. The
    /// OSD with harness index `i` authenticates as `osd.i` (DIR/osd.i.keyring), so it boots
    /// as OSD `i`.
    pub fn start_osd_with(&mut self, args: Vec<String>) -> anyhow::Result<usize> {
        let i = self.osds.len();
        if i as u32 >= TEST_OSD_KEYS {
            bail!("the harness made keys for {TEST_OSD_KEYS} OSDs; raise TEST_OSD_KEYS");
        }
        let metrics = free_addr();
        let mut all = vec![
            "--config".to_string(),
            self.config_path.display().to_string(),
            "--metrics".to_string(),
            metrics.to_string(),
            "--keyring".to_string(),
            self.osd_keyring_path(i).display().to_string(),
        ];
        all.extend(args);
        self.osds.push(Daemon {
            name: format!("osd#{i}"),
            child: None,
            args: all,
            log: self.dir.path().join(format!("osd{i}.log")),
            metrics,
        });
        self.restart_osd(i)?;
        Ok(i)
    }

    /// Starts OSD `i` again with the same arguments (and so the same data directory).
    pub fn restart_osd(&mut self, i: usize) -> anyhow::Result<()> {
        self.osds[i].start("basalt-osd", "info")
    }

    /// Sets OSD `i`'s `flag` to `value` (replacing an earlier value) for its next start.
    pub fn set_osd_arg(&mut self, i: usize, flag: &str, value: &str) {
        let args = &mut self.osds[i].args;
        match args.iter().position(|a| a == flag) {
            Some(at) if at + 1 < args.len() => args[at + 1] = value.to_string(),
            _ => args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// SIGKILLs OSD `i` (power-cut semantics).
    pub fn kill_osd(&mut self, i: usize) {
        if let Some(mut c) = self.osds[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs OSD `i` and waits (bounded by `limit`, then SIGKILL) for it to exit; returns
    /// its exit status, or `None` if it had to be killed.
    pub fn stop_osd(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.osds[i].child.take()?;
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return None;
                }
            }
        }
    }

    /// Waits (bounded) for OSD `i` to exit on its own; returns its status.
    pub fn wait_osd_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let c = self.osds[i].child.as_mut()?;
            match c.try_wait() {
                Ok(Some(status)) => {
                    self.osds[i].child = None;
                    return Some(status);
                }
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => return None,
            }
        }
    }

    /// SIGSTOP / SIGCONT OSD `i` (a frozen process: its connections stay open, silent).
    pub fn pause_osd(&self, i: usize, paused: bool) {
        if let Some(c) = &self.osds[i].child {
            let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Whether OSD `i`'s process is still running.
    pub fn osd_alive(&mut self, i: usize) -> bool {
        match self.osds[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The Prometheus text OSD `i` serves at /metrics.
    pub fn osd_metrics(&self, i: usize) -> anyhow::Result<String> {
        http_get(self.osds[i].metrics, "/metrics")
    }

    pub fn osd_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.osds[i].log).unwrap_or_default()
    }

    /// The data directory `start_osd` gave OSD `i`.
    pub fn osd_data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("osd{i}"))
    }

    /// Starts a `basalt-gw` named `client.<name>` on a free port with `extra` arguments;
    /// returns its harness index.
    pub fn start_gateway(&mut self, name: &str, extra: &[&str]) -> anyhow::Result<usize> {
        let i = self.gws.len();
        let addr = free_addr();
        let metrics = free_addr();
        let mut args = vec![
            "--config".to_string(),
            self.config_path.display().to_string(),
            "--listen".to_string(),
            addr.to_string(),
            "--metrics".to_string(),
            metrics.to_string(),
            "--name".to_string(),
            format!("client.{name}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = self.dir.path().join(format!("gw{i}.log"));
        let mut d = Daemon {
            name: format!("gw.{name}"),
            child: None,
            args,
            log,
            metrics,
        };
        d.start("basalt-gw", "info")?;
        self.gws.push((d, addr));
        wait_for("the gateway to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        })?;
        Ok(i)
    }

    /// SIGKILLs gateway `i` (a crashed gateway process; its watches and lock stay behind).
    pub fn kill_gateway(&mut self, i: usize) {
        if let Some(mut c) = self.gws[i].0.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts gateway `i` again on the same NBD address, as `client.<name>` (a new client
    /// instance, as a restarted gateway is without a fixed `--name`).
    pub fn restart_gateway(&mut self, i: usize, name: &str) -> anyhow::Result<()> {
        let (d, addr) = &mut self.gws[i];
        if d.child.is_some() {
            return Ok(());
        }
        if let Some(at) = d.args.iter().position(|a| a == "--name") {
            d.args[at + 1] = format!("client.{name}");
        }
        d.start("basalt-gw", "info")?;
        let addr = *addr;
        wait_for(
            "the restarted gateway to listen",
            Duration::from_secs(30),
            || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ())
            },
        )?;
        Ok(())
    }

    /// The NBD address of gateway `i`.
    pub fn gateway_addr(&self, i: usize) -> SocketAddr {
        self.gws[i].1
    }

    /// The Prometheus text gateway `i` serves at /metrics.
    pub fn gateway_metrics(&self, i: usize) -> anyhow::Result<String> {
        http_get(self.gws[i].0.metrics, "/metrics")
    }

    /// NBD writes gateway `i` has served (its `basalt_nbd_requests_total{op="write"}`; 0 if
    /// its metrics do not answer).
    pub fn gateway_writes(&self, i: usize) -> f64 {
        self.gateway_metrics(i).map_or(0.0, |m| {
            metric_sum(&m, "basalt_nbd_requests_total", "op=\"write\"")
        })
    }

    /// Waits (60 s at most) until gateway `i` has served `more` NBD writes beyond those it had
    /// served when called: a client is under way.
    pub fn wait_gateway_writes(&self, i: usize, more: f64) -> anyhow::Result<()> {
        let before = self.gateway_writes(i);
        wait_for(
            "NBD writes through the gateway",
            Duration::from_secs(60),
            || (self.gateway_writes(i) >= before + more).then_some(()),
        )
    }

    /// SIGSTOP / SIGCONT a gateway (a hung hypervisor).
    pub fn pause_gateway(&self, i: usize, paused: bool) {
        if let Some(c) = &self.gws[i].0.child {
            let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn gateway_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.gws[i].0.log).unwrap_or_default()
    }

    pub fn dump_logs(&self) {
        for d in self
            .mons
            .iter()
            .chain(&self.osds)
            .chain(self.gws.iter().map(|(d, _)| d))
        {
            eprintln!(
                "===== {} log =====\n{}",
                d.name,
                std::fs::read_to_string(&d.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for d in self.gws.iter().map(|(d, _)| d).chain(&self.osds) {
            if let Some(c) = &d.child {
                // A stopped process only dies of SIGKILL once continued on some kernels.
                // SAFETY: kill(2) on a pid we spawned and have not reaped.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
            }
        }
        for d in self
            .mons
            .iter_mut()
            .chain(self.osds.iter_mut())
            .chain(self.gws.iter_mut().map(|(d, _)| d))
        {
            if let Some(mut c) = d.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A minimal HTTP/1.0 GET (bounded by 10 s), enough to scrape /metrics.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let Some((head, body)) = body.split_once("\r\n\r\n") else {
        bail!("malformed HTTP reply from {addr}");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET {path} from {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}

/// `tool` with Debian's `/usr/bin` first on PATH: nbdsh's and nbdcopy's Python parts need
/// Debian's python (with libnbd's bindings), not one a user's PATH may put first (pyenv).
pub fn client_command(tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.env(
        "PATH",
        format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
    );
    cmd
}

/// Runs a client tool ([`client_command`]) to completion, bounded at 120 s: whether it
/// succeeded, and its stdout then stderr.
pub fn run_client(tool: &str, args: &[&str]) -> (bool, String) {
    let out = run_bounded(client_command(tool).args(args), Duration::from_secs(120));
    let text = output_text(&out);
    (out.status.success(), text)
}

/// A client process killed (and reaped) when this is dropped, so a failed assertion leaves
/// nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A finished command's stdout, then its stderr, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command to completion, killing it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    child.wait_with_output().expect("collect output")
}

/// The fio command line of one write-and-verify pass (`ioengine=nbd`, job `name`): random
/// 4 KiB writes over the first `size` (fio's syntax: bytes, or `16M`) of `url`, every block
/// written once and verified with crc32c (during the run, every 256 writes, so writes go on
/// throughout, and all of them at the end), with `seed` choosing the pattern.
pub fn fio_verify_command(name: &str, url: &str, size: &str, seed: u64) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--size={size}"),
        "--iodepth=4",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_backlog=256",
        "--verify_fatal=1",
        "--verify_state_save=0",
        &format!("--randseed={seed}"),
    ]);
    cmd
}

/// Runs one [`fio_verify_command`] pass over the first `size` bytes (`verify_only` only
/// reads and checks what a pass with the same `seed` wrote): whether it passed, and fio's
/// output.
pub fn fio_verify_pass(
    name: &str,
    url: &str,
    size: u64,
    seed: u64,
    verify_only: bool,
) -> (bool, String) {
    let mut cmd = fio_verify_command(name, url, &size.to_string(), seed);
    if verify_only {
        cmd.arg("--verify_only=1");
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(600));
    let text = output_text(&out);
    let ok = out.status.success()
        && !text.contains("verify: bad")
        && !text.contains("Input/output error");
    (ok, text)
}

/// [`fio_verify_pass`]es one after another in a thread (seeds `first_seed`, `first_seed + 1`,
/// ...) until [`FioPasses::finish`] asks for the last, or one fails: a VM disk written and
/// verified all through a test's faults.
pub struct FioPasses {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::mpsc::Receiver<Vec<(bool, String)>>,
    thread: std::thread::JoinHandle<()>,
}

impl FioPasses {
    pub fn start(name: &str, url: &str, size: u64, first_seed: u64) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, done) = std::sync::mpsc::channel();
        let (name, url, flag) = (name.to_string(), url.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            for seed in first_seed.. {
                let last = flag.load(std::sync::atomic::Ordering::SeqCst);
                let (ok, text) = fio_verify_pass(&name, &url, size, seed, false);
                results.push((ok, text));
                if last || !ok {
                    break;
                }
            }
            let _ = tx.send(results);
        });
        FioPasses { stop, done, thread }
    }

    /// Lets the pass under way finish, runs one more, and returns every pass's result.
    pub fn finish(self) -> Vec<(bool, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let results = self
            .done
            .recv_timeout(Duration::from_secs(900))
            .expect("fio finishes");
        let _ = self.thread.join();
        results
    }
}

/// Runs `promtool check metrics` (Debian package `prometheus`, installed by
/// scripts/setup.sh) on a scraped exposition; `Err` carries promtool's complaint.
pub fn promtool_check(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus; scripts/setup.sh installs it)")?;
    promtool
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    if !out.status.success() {
        bail!("promtool rejects the metrics: {}", output_text(&out));
    }
    Ok(())
}

/// A cluster ready for I/O: 3 monitors, 6 OSDs on 3 hosts, one pool whose every PG has
/// served a write, and a client on it.
pub struct DataCluster {
    pub rt: tokio::runtime::Runtime,
    pub cluster: TestCluster,
    pub rados: basalt_client::Rados,
    pub io: basalt_client::IoCtx,
}

impl DataCluster {
    /// Every object of `written` reads back through the client as written; `when` names the
    /// moment in the failure message.
    pub fn assert_reads_back(
        &self,
        written: &std::collections::BTreeMap<String, bytes::Bytes>,
        when: &str,
    ) {
        for (name, data) in written {
            let got = self
                .rt
                .block_on(self.io.read(name, 0, 1 << 20))
                .expect("read");
            assert!(got == *data, "{name} reads back wrong {when}");
        }
    }

    /// Stops every OSD and asserts that each object of `written` (pool `pool`) has exactly 3
    /// copies, all identical to what was written; returns the map and the stores for more
    /// checks.
    pub fn assert_three_copies_after_stop(
        &mut self,
        pool: &str,
        written: &std::collections::BTreeMap<String, bytes::Bytes>,
    ) -> (
        std::sync::Arc<basalt_maps::OsdMap>,
        Vec<basalt_osd::store::Store>,
    ) {
        let map = self.rados.osdmap();
        let stores = stores_after_stop(&mut self.cluster, 6);
        for (name, data) in written {
            let copies = copies_identical(&map, &stores, pool, name, data);
            assert_eq!(copies, 3, "{name} has {copies} copies, not 3");
        }
        (map, stores)
    }

    /// Starts the cluster with `timeouts` and creates `pool` (size 3, min_size 2, 16 PGs).
    pub fn start(timeouts: Timeouts, pool: &str) -> anyhow::Result<Self> {
        Self::start_tuned(timeouts, OsdTuning::default(), pool)
    }

    /// [`DataCluster::start`] with OSD settings of the test's choosing.
    pub fn start_tuned(timeouts: Timeouts, osd: OsdTuning, pool: &str) -> anyhow::Result<Self> {
        Self::start_with(timeouts, |c| c.osd = osd, pool)
    }

    /// [`DataCluster::start`] with the config changed by `edit` before any daemon reads it.
    pub fn start_with(
        timeouts: Timeouts,
        edit: impl FnOnce(&mut ClusterConfig),
        pool: &str,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut cluster = TestCluster::start_mons_with(3, timeouts, edit)?;
        for i in 0..6 {
            cluster.start_osd(&format!("host{}", i / 2))?;
        }
        // A failed start prints the daemons' logs: the harness is dropped without a panic.
        let ready = (|| {
            // Clients connect lazily, which needs the runtime.
            let mon = rt.block_on(async {
                basalt_client::MonClient::with_timeout(
                    cluster.config.clone(),
                    Duration::from_secs(10),
                )
            })?;
            wait_for("6 OSDs up", Duration::from_secs(60), || {
                rt.block_on(mon.osdmap())
                    .ok()
                    .filter(|m| m.osds.len() == 6 && m.osds.values().all(|o| o.up))
            })?;
            cluster.cli_ok(&[
                "pool",
                "create",
                pool,
                "--size",
                "3",
                "--min-size",
                "2",
                "--pg-num",
                "16",
            ])?;
            let rados = rt.block_on(basalt_client::Rados::connect(cluster.config.clone()))?;
            let io = wait_for(
                "the pool visible to the client",
                Duration::from_secs(30),
                || rados.ioctx(pool).ok(),
            )?;
            // The first op on each PG waits for its peering; one write per PG proves all serve.
            rt.block_on(async {
                for i in 0..64 {
                    io.write_full(&format!("probe{i}"), bytes::Bytes::from_static(b"p"))
                        .await?;
                }
                Ok::<_, basalt_client::ClientError>(())
            })?;
            Ok::<_, anyhow::Error>((rados, io))
        })();
        let (rados, io) = match ready {
            Ok(v) => v,
            Err(e) => {
                cluster.dump_logs();
                return Err(e);
            }
        };
        Ok(DataCluster {
            rt,
            cluster,
            rados,
            io,
        })
    }

    /// Waits (bounded) until every PG of every pool is active+clean on the acting set the
    /// client's newest map gives it (so a change the map already shows has taken effect).
    pub fn wait_active_clean(&self, limit: Duration) -> anyhow::Result<()> {
        wait_for("every PG active+clean", limit, || {
            let map = self.rados.osdmap();
            let stats = self.rt.block_on(self.rados.pg_stats()).ok()?;
            stats
                .iter()
                .all(|s| {
                    let pg = basalt_placement::PgId {
                        pool: s.pool,
                        seed: s.seed,
                    };
                    let mapped = map.pools.get(&s.pool).and_then(|p| map.map_pg(p, pg).ok());
                    s.state.is_active_clean() && mapped.is_some_and(|m| m.acting == s.acting)
                })
                .then_some(())
        })
    }

    /// The harness index of OSD `id`, from the boot line its log prints.
    pub fn harness_index(&self, id: u32) -> usize {
        (0..6)
            .find(|&i| {
                self.cluster
                    .osd_log(i)
                    .contains(&format!("know this OSD as osd.{id} "))
            })
            .expect("harness index of an OSD")
    }
}

/// The sum over all series of metric `name` whose labels contain `label` (e.g.
/// `kind="log"`; empty matches every series) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name && series.contains(label)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// qemu-io with `opts` (e.g. `-f raw`, `-r`) running `cmds` on `url`. qemu-io exits 0 even
/// when a command fails, so failures are read from its output.
pub fn qemu_io_with(opts: &[&str], url: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = opts.to_vec();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(url);
    let (ok, text) = run_client("qemu-io", &args);
    let failed = text.contains("failed") || text.contains("error") || text.contains("Error");
    (ok && !failed, text)
}

/// [`qemu_io_with`] on a raw image, read-write.
pub fn qemu_io(url: &str, cmds: &[&str]) -> (bool, String) {
    qemu_io_with(&["-f", "raw"], url, cmds)
}

/// [`qemu_io`], failing the test if any command fails.
pub fn qemu_io_ok(url: &str, cmds: &[&str]) -> String {
    let (ok, text) = qemu_io(url, cmds);
    assert!(ok, "qemu-io {cmds:?} on {url} failed:\n{text}");
    text
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn pattern(seed: u64, len: usize) -> bytes::Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    bytes::Bytes::from(v)
}

/// Stops every OSD and returns each one's store, opened read-only in effect (nothing writes).
pub fn stores_after_stop(cluster: &mut TestCluster, n: usize) -> Vec<basalt_osd::store::Store> {
    for i in 0..n {
        cluster.stop_osd(i, Duration::from_secs(10));
    }
    (0..n)
        .map(|i| {
            basalt_osd::store::Store::open(
                cluster.osd_data(i),
                basalt_osd::store::StoreConfig::default(),
            )
            .expect("open store")
        })
        .collect()
}

/// What [`continuous_writer`] has had acknowledged: each object's name and bytes.
pub type Acked = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, bytes::Bytes>>>;

/// Writes `p<first>, p<first+1>, ...` (whole objects of varying size) in a loop until the task
/// is aborted, recording each acknowledged write.
pub fn continuous_writer(d: &DataCluster, first: u64) -> (tokio::task::JoinHandle<()>, Acked) {
    let acked: Acked = Default::default();
    let io = d.io.clone();
    let log = acked.clone();
    let task = d.rt.spawn(async move {
        for i in first.. {
            let name = format!("p{i}");
            let data = pattern(10_000 + i, 3000 + (i as usize % 11) * 700);
            if io.write_full(&name, data.clone()).await.is_ok() {
                log.lock().expect("lock").insert(name, data);
            }
        }
    });
    (task, acked)
}

/// How many writes [`continuous_writer`] has had acknowledged so far.
pub fn acked_count(acked: &Acked) -> usize {
    acked.lock().expect("lock").len()
}

/// Every store holding `name` in its PG has the same bytes; returns how many copies exist.
pub fn copies_identical(
    map: &basalt_maps::OsdMap,
    stores: &[basalt_osd::store::Store],
    pool: &str,
    name: &str,
    want: &bytes::Bytes,
) -> usize {
    let p = map.pool_by_name(pool).expect("pool");
    let pg = basalt_placement::object_to_pg_ns(&p.placement(), "", name);
    let obj = basalt_osd::store::ObjectId::new(pg, name);
    let mut copies = 0;
    for s in stores {
        if s.exists(&obj).unwrap_or(false) {
            let data = s.read(&obj, 0, u64::MAX).expect("read replica");
            assert!(
                data == *want,
                "replica of {name} differs ({} vs {} bytes)",
                data.len(),
                want.len()
            );
            copies += 1;
        }
    }
    copies
}

/// Whether `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Fails the test when `what` (a tool or a privilege) is missing, saying `how` to get it:
/// the suite never passes by skipping (scripts/setup.sh installs every tool it uses, and CI
/// runs it as root).
pub fn require(available: bool, what: &str, how: &str) {
    assert!(available, "{what} is missing: {how}");
}

/// [`require`] for a tool on PATH from Debian package `package` (scripts/setup.sh installs it).
pub fn require_tool(tool: &str, package: &str) {
    require(
        have_tool(tool),
        &format!("`{tool}`"),
        &format!("install the Debian package {package} (scripts/setup.sh does)"),
    )
}

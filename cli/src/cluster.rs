//! `basalt cluster up|down|status`: a whole cluster on this machine, in the background.
//!
//! `up` writes `DIR/cluster.toml` and `DIR/local.toml` (the shape: monitors, hosts, OSDs per
//! host, gateways) on first use, and the keys: `DIR/keyring` (client.admin) and
//! `DIR/mon.keyring` (the monitors' `mon.` key plus client.admin, which the first leader
//! commits into the new auth database); it starts every daemon detached from the terminal, with a pid
//! file and a log per daemon; on an existing DIR it starts whatever is not running with the
//! same data (the power-loss path). It then waits for quorum, every OSD up, pool `rbd`, every
//! PG serving, and a demo image, creates the keys of the OSDs (`DIR/osd.N.keyring`) and
//! gateways (`DIR/gwN.keyring`) through the monitors, and prints how to use them. `down` stops only the processes
//! named by DIR's pid files (checking that each pid still runs a basalt daemon of DIR).
//!
//! TLS: `up` also makes DIR/tls (the cluster CA, a certificate per monitor and OSD passed as
//! `--tls-cert/--tls-key`, the gateways' NBD server directories, and `client.admin/` for
//! QEMU and libnbd; `crate::tls::cluster_certificates`); cluster.toml's `[tls]` keeps its
//! defaults (on, CA `tls/ca-cert.pem` beside it). Its gateways require NBD over TLS with
//! export rules by certificate (`DIR/tls/nbd-access.toml`) unless `--nbd-tls optional|off`.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use basalt_auth::{Caps, EntityName, Keyring, Secret};
use basalt_client::{ClientError, MonClient, Rados};
use basalt_config::{ClusterConfig, ClusterSection, MonEntry};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Start (or restart) a local cluster under DIR and wait until it serves.
    Up {
        #[arg(long, default_value = "var/cluster")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        mons: u32,
        #[arg(long, default_value_t = 3)]
        hosts: u32,
        #[arg(long, default_value_t = 2)]
        osds_per_host: u32,
        #[arg(long, default_value_t = 1)]
        gateways: u32,
        /// PGs of pool `rbd` when it is created (the first `up` of DIR).
        #[arg(long, default_value_t = 64)]
        pg_num: u32,
        /// What the gateways ask of NBD clients: `required` (the default: TLS with a
        /// certificate the cluster CA signed, such as DIR/tls/client.admin/), `optional`
        /// (plain `nbd://` served too, for clients that cannot present one) or `off`.
        /// Remembered in DIR/local.toml; given again on a restart, it changes.
        #[arg(long, value_enum)]
        nbd_tls: Option<NbdTls>,
    },
    /// Stop the daemons DIR's pid files name.
    Down {
        #[arg(long, default_value = "var/cluster")]
        dir: PathBuf,
    },
    /// Which of DIR's daemons run, and the cluster's status.
    Status {
        #[arg(long, default_value = "var/cluster")]
        dir: PathBuf,
    },
}

/// The gateways' `--nbd-tls` mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    #[default]
    Required,
    Optional,
    Off,
}

impl NbdTls {
    fn flag(self) -> &'static str {
        match self {
            NbdTls::Required => "required",
            NbdTls::Optional => "optional",
            NbdTls::Off => "off",
        }
    }
}

/// The shape of a local cluster, fixed when DIR is first created (but for `nbd_tls`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Layout {
    mons: u32,
    hosts: u32,
    osds_per_host: u32,
    gateways: u32,
    /// First monitor port; monitors use consecutive ports.
    mon_port: u16,
    /// First NBD port; gateways use consecutive ports.
    nbd_port: u16,
    /// First metrics port: monitors, then OSDs, then gateways.
    metrics_port: u16,
    /// Whether the gateways require TLS of NBD clients (absent in a DIR made before it
    /// existed: required, as now).
    #[serde(default)]
    nbd_tls: NbdTls,
}

struct DaemonSpec {
    name: String,
    bin: &'static str,
    args: Vec<String>,
}

impl Layout {
    fn daemons(&self, dir: &Path, conf: &Path) -> Vec<DaemonSpec> {
        let conf = conf.display().to_string();
        let mut out = Vec::new();
        let mut metrics = self.metrics_port;
        let mut next_metrics = || {
            let m = format!("127.0.0.1:{metrics}");
            metrics += 1;
            m
        };
        for rank in 0..self.mons {
            out.push(DaemonSpec {
                name: format!("mon{rank}"),
                bin: "basalt-mon",
                args: vec![
                    "--config".into(),
                    conf.clone(),
                    "--id".into(),
                    rank.to_string(),
                    "--keyring".into(),
                    dir.join("mon.keyring").display().to_string(),
                    "--metrics".into(),
                    next_metrics(),
                ],
            });
            tls_args(dir, out.last_mut());
        }
        for h in 0..self.hosts {
            for k in 0..self.osds_per_host {
                let i = h * self.osds_per_host + k;
                out.push(DaemonSpec {
                    name: format!("osd{i}"),
                    bin: "basalt-osd",
                    args: vec![
                        "--config".into(),
                        conf.clone(),
                        "--data".into(),
                        dir.join(format!("osd{i}")).display().to_string(),
                        "--host".into(),
                        format!("host{h}"),
                        "--keyring".into(),
                        dir.join(format!("osd.{i}.keyring")).display().to_string(),
                        "--metrics".into(),
                        next_metrics(),
                    ],
                });
                tls_args(dir, out.last_mut());
            }
        }
        for g in 0..self.gateways {
            out.push(DaemonSpec {
                name: format!("gw{g}"),
                bin: "basalt-gw",
                args: vec![
                    "--config".into(),
                    conf.clone(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", self.nbd_port + g as u16),
                    "--name".into(),
                    format!("client.gw{g}"),
                    "--keyring".into(),
                    dir.join(format!("gw{g}.keyring")).display().to_string(),
                    "--metrics".into(),
                    next_metrics(),
                    "--nbd-tls-dir".into(),
                    dir.join("tls").join(format!("gw{g}")).display().to_string(),
                    "--nbd-tls".into(),
                    self.nbd_tls.flag().into(),
                ],
            });
            // Export rules by certificate: LIST and opens show a client only what its rule
            // allows. (Not with `optional`: a plain client has no certificate to match, and
            // would see nothing.)
            if let Some(gw) = out.last_mut().filter(|_| self.nbd_tls == NbdTls::Required) {
                gw.args.push("--nbd-access".into());
                gw.args.push(nbd_access_path(dir).display().to_string());
            }
        }
        out
    }
}

/// A monitor's or OSD's certificate flags (`crate::tls::cluster_certificates` makes them).
fn tls_args(dir: &Path, spec: Option<&mut DaemonSpec>) {
    if let Some(spec) = spec {
        let (cert, key) = crate::tls::daemon_cert_paths(&dir.join("tls"), &spec.name);
        spec.args.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
    }
}

fn pid_of(dir: &Path, name: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Only a live process that is one of ours (its command line names DIR) counts: pids are
    // reused after a reboot.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("basalt-") && cmdline.contains(&*dir.display().to_string())).then_some(pid)
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the basalt executable's directory")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the basalt executable has no parent directory")
}

pub async fn run(cmd: ClusterCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Up {
            dir,
            mons,
            hosts,
            osds_per_host,
            gateways,
            pg_num,
            nbd_tls,
        } => {
            let layout = Layout {
                mons,
                hosts,
                osds_per_host,
                gateways,
                mon_port: 6789,
                nbd_port: 10809,
                metrics_port: 9280,
                nbd_tls: nbd_tls.unwrap_or_default(),
            };
            up(&absolute(&dir)?, layout, pg_num, nbd_tls).await
        }
        ClusterCmd::Down { dir } => down(&absolute(&dir)?),
        ClusterCmd::Status { dir } => status(&absolute(&dir)?, json).await,
    }
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))
}

/// The gateways' export rules (`--nbd-access`), made by `up` unless they exist.
fn nbd_access_path(dir: &Path) -> PathBuf {
    dir.join("tls").join("nbd-access.toml")
}

fn write_nbd_access_unless_present(dir: &Path) -> anyhow::Result<()> {
    let path = nbd_access_path(dir);
    if path.exists() {
        return Ok(());
    }
    let rules = "# Which exports each NBD client certificate (by its CN) may open and list:\n\
                 # \"client.vm1\" = [\"rbd/vm1\"], \"client.backup\" = [\"rbd/*\"].\n\
                 \"client.admin\" = [\"*\"]\n";
    std::fs::write(&path, rules).with_context(|| format!("cannot write {}", path.display()))
}

fn write_layout(dir: &Path, layout: &Layout) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("local.toml"),
        toml::to_string_pretty(layout).context("cannot encode the layout")?,
    )
    .context("cannot write local.toml")
}

fn load_layout(dir: &Path) -> anyhow::Result<Option<Layout>> {
    let path = dir.join("local.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Ok(Some(toml::from_str(&text).with_context(|| {
                format!("{} is malformed", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

async fn up(
    dir: &Path,
    wanted: Layout,
    pg_num: u32,
    nbd_tls: Option<NbdTls>,
) -> anyhow::Result<()> {
    if wanted.mons == 0 || wanted.hosts == 0 || wanted.osds_per_host == 0 {
        bail!("a cluster needs at least one monitor, one host and one OSD per host");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conf = dir.join("cluster.toml");
    let layout = match load_layout(dir)? {
        Some(mut l) => {
            eprintln!("restarting the cluster in {} with its data", dir.display());
            if let Some(mode) = nbd_tls.filter(|m| *m != l.nbd_tls) {
                // Only gateways started now get it: a running one keeps its mode.
                l.nbd_tls = mode;
                write_layout(dir, &l)?;
            }
            l
        }
        None => {
            let fsid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                .map(|s| s.trim().to_string())
                .context("cannot read a random uuid for the fsid")?;
            let config = ClusterConfig {
                cluster: ClusterSection {
                    name: "basalt".into(),
                    fsid,
                },
                mons: (0..wanted.mons)
                    .map(|rank| MonEntry {
                        rank,
                        addr: SocketAddr::from(([127, 0, 0, 1], wanted.mon_port + rank as u16)),
                        data: Some(dir.join(format!("mon{rank}"))),
                    })
                    .collect(),
                timeouts: Default::default(),
                paxos: Default::default(),
                client: Default::default(),
                osd: Default::default(),
                auth: Default::default(),
                // On, with the CA at tls/ca-cert.pem beside cluster.toml.
                tls: Default::default(),
            };
            std::fs::write(&conf, config.to_toml()).context("cannot write cluster.toml")?;
            write_layout(dir, &wanted)?;
            wanted
        }
    };
    bootstrap_keyrings(dir, &layout)?;
    let daemons = layout.daemons(dir, &conf);
    let tls_daemons: Vec<String> = daemons
        .iter()
        .filter(|d| d.bin != "basalt-gw")
        .map(|d| d.name.clone())
        .collect();
    crate::tls::cluster_certificates(&dir.join("tls"), &tls_daemons, layout.gateways)?;
    write_nbd_access_unless_present(dir)?;
    let bins = bin_dir()?;
    for d in daemons {
        if pid_of(dir, &d.name).is_some() {
            continue;
        }
        let exe = bins.join(d.bin);
        if !exe.exists() {
            bail!(
                "{} is missing; build the workspace first (cargo build --release)",
                exe.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", d.name)))
            .with_context(|| format!("cannot open the log of {}", d.name))?;
        let child = Command::new(&exe)
            .args(&d.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log handle")?)
            .stderr(log)
            .env("NO_COLOR", "1")
            // Its own process group: a Ctrl-C in this terminal does not reach the daemons.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", d.name))?;
        std::fs::write(dir.join(format!("{}.pid", d.name)), child.id().to_string())
            .with_context(|| format!("cannot write the pid file of {}", d.name))?;
        eprintln!("started {} (pid {})", d.name, child.id());
    }
    let config = ClusterConfig::load(&conf)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let step = |what: &str| eprintln!("waiting for {what}...");
    let mon = MonClient::with_timeout(config.clone(), Duration::from_secs(10))?;
    step("monitor quorum");
    retry(deadline, "monitor quorum", || async {
        mon.status().await.map(|_| ())
    })
    .await?;
    let n_osds = (layout.hosts * layout.osds_per_host) as usize;
    step(&format!("{n_osds} OSDs up"));
    retry(deadline, "OSDs up", || async {
        let m = mon.osdmap().await?;
        if m.osds.values().filter(|o| o.up).count() >= n_osds {
            Ok(())
        } else {
            Err(ClientError::Unavailable(format!(
                "{} of {n_osds} OSDs up",
                m.num_up()
            )))
        }
    })
    .await?;
    let size = layout.hosts.min(3);
    if mon.osdmap().await?.pool_by_name("rbd").is_none() {
        step("pool rbd");
        mon.pool_create("rbd", size, size - size / 2, pg_num)
            .await?;
    }
    let rados = Rados::connect(config).await?;
    let io = retry(deadline, "pool rbd", || async { rados.ioctx("rbd") }).await?;
    step("every PG active+clean");
    wait_active_clean(&rados, deadline).await?;
    let backend = Arc::new(basalt_rbd::RadosBackend::new(
        rados.clone(),
        io,
        basalt_client::DEFAULT_WATCH_TIMEOUT,
    ));
    let rbd = basalt_rbd::Rbd::new(backend);
    if !rbd.list().await?.iter().any(|n| n == "demo") {
        rbd.create("demo", 1 << 30, basalt_rbd::DEFAULT_ORDER)
            .await?;
        eprintln!("created image rbd/demo (1 GiB, thin)");
    }
    println!("cluster is up in {}", dir.display());
    println!(
        "  client config: {}   (export BASALT_CONFIG={})",
        conf.display(),
        conf.display()
    );
    println!("  logs and pids: {}/*.log, *.pid", dir.display());
    println!(
        "  keyrings:      {}/keyring (client.admin), mon.keyring, osd.N.keyring, gwN.keyring",
        dir.display()
    );
    println!(
        "  TLS:           {}/tls (cluster CA, daemon certificates; client.admin/ for NBD clients)",
        dir.display()
    );
    if layout.gateways > 0 {
        let port = layout.nbd_port;
        let certs = dir.join("tls").join("client.admin");
        let certs = certs.display();
        println!(
            "  demo image:    rbd/demo on 127.0.0.1:{port} (NBD TLS {})",
            layout.nbd_tls.flag()
        );
        if layout.nbd_tls != NbdTls::Off {
            println!("    nbdinfo 'nbds://127.0.0.1:{port}/rbd/demo?tls-certificates={certs}'");
            println!(
                "    qemu-img info --object tls-creds-x509,id=tls0,dir={certs},endpoint=client \\\n      \
                 --image-opts driver=nbd,host=127.0.0.1,port={port},export=rbd/demo,tls-creds=tls0"
            );
        }
        if layout.nbd_tls == NbdTls::Required {
            println!(
                "    plain nbd:// is refused; `basalt cluster up --dir {} --nbd-tls optional` \
                 (after `cluster down`) serves it too",
                dir.display()
            );
        } else {
            let url = format!("nbd://127.0.0.1:{port}/rbd/demo");
            println!("    qemu-img info {url}");
            println!("    qemu-system-x86_64 -drive file={url},format=raw,if=virtio ...");
        }
    }
    println!(
        "  stop it with:  basalt cluster down --dir {}",
        dir.display()
    );
    Ok(())
}

/// Writes DIR's keyrings unless they exist: a fresh `client.admin` key with every cap
/// (`keyring`), each OSD's `osd.N` key (`osd.N.keyring`) and each gateway's `client.gwN` key
/// (`gwN.keyring`), and the monitors' keyring (`mon.keyring`): the monitors' shared `mon.`
/// key plus all of the above, so the first leader commits every key into the new auth
/// database. Every daemon's key thus exists before it first starts (an OSD boots as the id
/// of its key: Ceph's `osd new`).
fn bootstrap_keyrings(dir: &Path, layout: &Layout) -> anyhow::Result<()> {
    let admin_path = dir.join("keyring");
    let mon_path = dir.join("mon.keyring");
    if admin_path.exists() && mon_path.exists() {
        return Ok(());
    }
    let admin = EntityName::client("admin")?;
    let admin_caps = Caps::from_pairs(&["mon", "allow *", "osd", "allow *"])?;
    let admin_key = match Keyring::load(&admin_path) {
        Ok(k) => k.key(&admin)?.clone(),
        Err(_) => Secret::generate()?,
    };
    let mut admin_ring = Keyring::new();
    admin_ring.insert(admin.clone(), admin_key.clone(), admin_caps.clone());
    let mut mon_ring = admin_ring.clone();
    mon_ring.insert(
        EntityName::mon(),
        Secret::generate()?,
        Caps::from_pairs(&["mon", "allow *", "osd", "allow *"])?,
    );
    let osd_caps = Caps::from_pairs(&["mon", "allow profile osd", "osd", "allow *"])?;
    let gw_caps = Caps::from_pairs(&["mon", "allow profile rbd", "osd", "allow profile rbd"])?;
    let daemons = (0..layout.hosts * layout.osds_per_host)
        .map(|i| {
            (
                EntityName::osd(i),
                osd_caps.clone(),
                format!("osd.{i}.keyring"),
            )
        })
        .chain((0..layout.gateways).filter_map(|g| {
            let name = EntityName::client(&format!("gw{g}")).ok()?;
            Some((name, gw_caps.clone(), format!("gw{g}.keyring")))
        }));
    for (entity, caps, file) in daemons {
        let key = Secret::generate()?;
        let mut ring = Keyring::new();
        ring.insert(entity.clone(), key.clone(), caps.clone());
        let path = dir.join(file);
        ring.save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        mon_ring.insert(entity, key, caps);
    }
    admin_ring
        .save(&admin_path)
        .with_context(|| format!("cannot write {}", admin_path.display()))?;
    mon_ring
        .save(&mon_path)
        .with_context(|| format!("cannot write {}", mon_path.display()))?;
    eprintln!(
        "created the admin keyring {} and the monitors' keyring {}",
        admin_path.display(),
        mon_path.display()
    );
    Ok(())
}

/// Waits until the primaries report every PG active+clean.
async fn wait_active_clean(rados: &Rados, deadline: Instant) -> anyhow::Result<()> {
    retry(deadline, "every PG active+clean", || async {
        let stats = rados.pg_stats().await?;
        if stats.iter().all(|s| s.state.is_active_clean()) {
            Ok(())
        } else {
            Err(ClientError::Unavailable(crate::pg::summary(&stats).1))
        }
    })
    .await
}

async fn retry<T, F, Fut>(deadline: Instant, what: &str, f: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "{what}: not yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => bail!("gave up waiting for {what}: {e} (see the logs in the cluster dir)"),
        }
    }
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(layout) = load_layout(dir)? else {
        bail!("{} holds no local cluster (no local.toml)", dir.display());
    };
    let conf = dir.join("cluster.toml");
    // Gateways first, monitors last: clients and OSDs still find a quorum while they stop.
    let mut daemons = layout.daemons(dir, &conf);
    daemons.reverse();
    let mut running = Vec::new();
    for d in &daemons {
        if let Some(pid) = pid_of(dir, &d.name) {
            // SAFETY: kill(2) on a pid verified above to run one of this DIR's daemons.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            running.push((d.name.clone(), pid));
        }
        let _ = std::fs::remove_file(dir.join(format!("{}.pid", d.name)));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (name, pid) in running {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            // SAFETY: as above; it ignored SIGTERM for 15 s.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            eprintln!("{name} (pid {pid}) did not stop in time; killed");
        } else {
            eprintln!("stopped {name}");
        }
    }
    Ok(())
}

async fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    let Some(layout) = load_layout(dir)? else {
        bail!("{} holds no local cluster (no local.toml)", dir.display());
    };
    let conf = dir.join("cluster.toml");
    let daemons: Vec<(String, Option<i32>)> = layout
        .daemons(dir, &conf)
        .iter()
        .map(|d| (d.name.clone(), pid_of(dir, &d.name)))
        .collect();
    if json {
        let list: Vec<_> = daemons
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "running": p.is_some(), "pid": p}))
            .collect();
        crate::print_json(serde_json::json!({"dir": dir, "daemons": list}));
        return Ok(());
    }
    for (name, pid) in &daemons {
        match pid {
            Some(p) => println!("{name:6} running (pid {p})"),
            None => println!("{name:6} stopped"),
        }
    }
    Ok(())
}

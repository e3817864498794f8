//! The `basalt-osd` daemon: one OSD per data directory (see `basalt_osd::daemon`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use basalt_auth::{EntityName, Keyring};
use basalt_config::ClusterConfig;
use basalt_monclient::Credentials;
use basalt_osd::daemon::{open_or_mkfs, Daemon, DaemonConfig};
use clap::Parser;

/// A basalt OSD: stores objects in DIR and reports to the monitors.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Store directory: formatted on first start (must then be empty or missing).
    #[arg(long)]
    data: PathBuf,
    /// CRUSH host bucket of this OSD (default: this machine's hostname).
    #[arg(long)]
    host: Option<String>,
    /// Address to serve peers and clients on; port 0 picks a free port, which is advertised.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// CRUSH weight (conventionally the capacity in TiB; 1.0 by default).
    #[arg(long, default_value_t = 1.0)]
    crush_weight: f64,
    /// Most bytes of object data (and xattrs) this OSD stores; a write that would store more
    /// is refused with ENOSPC, removals always pass. Default: no limit but the disk's. Set it
    /// below the disk's size, leaving room for RocksDB's own files.
    #[arg(long)]
    capacity_bytes: Option<u64>,
    /// Keyring holding this OSD's key (`osd.N`; the OSD boots as OSD N, so the key must
    /// exist before its first start: `basalt auth get-or-create osd.N mon 'allow profile osd'
    /// osd 'allow *' -o FILE`). Default: the config's keyring (`keyring` beside it).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// The entity to authenticate as (`osd.N`). Default: the keyring's only `osd.*` key.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    tls: basalt_tls::DaemonTlsArgs,
    #[command(flatten)]
    telemetry: basalt_telemetry::TelemetryArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt-osd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the operator sees what failed and why, not a backtrace-shaped list.
            eprintln!("basalt-osd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    basalt_telemetry::init(&args.telemetry, "info")?;
    basalt_osd::daemon::describe_metrics();
    let cluster = ClusterConfig::load(&args.config)?;
    let host = match args.host {
        Some(h) => h,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .context("cannot read the hostname from /proc/sys/kernel/hostname; pass --host NAME")?,
    };
    if host.is_empty() {
        bail!("--host must not be empty");
    }
    if !(args.crush_weight.is_finite() && args.crush_weight > 0.0 && args.crush_weight < 65536.0) {
        bail!(
            "--crush-weight {} must be a positive number below 65536",
            args.crush_weight
        );
    }
    let crush_weight = ((args.crush_weight * 65536.0).round() as u32).max(1);
    if args.listen.ip().is_unspecified() {
        // The address goes into the OSDMap for peers to dial: it must name this machine.
        bail!(
            "--listen {} is a wildcard address; pass the address peers should connect to",
            args.listen
        );
    }
    if args.capacity_bytes == Some(0) {
        bail!("--capacity-bytes must be positive (omit it for no limit)");
    }
    let keyring = args
        .keyring
        .clone()
        .or_else(|| cluster.client.keyring.clone())
        .context("no keyring: pass --keyring FILE holding this OSD's osd.N key")?;
    let name = match &args.name {
        Some(n) => n
            .parse::<EntityName>()
            .with_context(|| format!("--name {n}"))?,
        None => {
            let ring = Keyring::load(&keyring)
                .with_context(|| format!("cannot read the keyring {}", keyring.display()))?;
            let osds: Vec<EntityName> = ring
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| n.osd_id().is_some())
                .collect();
            match osds.as_slice() {
                [only] => only.clone(),
                [] => bail!(
                    "the keyring {} holds no osd.N key; create one with `basalt auth get-or-create osd.N mon 'allow profile osd' osd 'allow *' -o FILE`",
                    keyring.display()
                ),
                _ => bail!(
                    "the keyring {} holds several osd keys; say which with --name osd.N",
                    keyring.display()
                ),
            }
        }
    };
    if name.osd_id().is_none() {
        bail!("--name {name}: an OSD authenticates as osd.N");
    }
    let creds = Credentials::load(&keyring, Some(&name))?;
    let capacity = args.capacity_bytes;
    // Before the store: a missing certificate is a configuration error to report at once.
    let acceptor = args.tls.acceptor(&cluster.tls)?;
    let data = args.data.clone();
    let fsid = cluster.cluster.fsid.clone();
    // RocksDB open/mkfs blocks; keep it off the runtime threads.
    let store = tokio::task::spawn_blocking(move || open_or_mkfs(&data, &fsid, capacity))
        .await
        .context("store open task failed")??;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is the address free?", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let daemon = Daemon::new(
        DaemonConfig {
            cluster,
            data: args.data,
            host,
            addr,
            crush_weight,
            creds,
            acceptor,
        },
        store,
    )?;
    daemon
        .run(listener, basalt_telemetry::shutdown_signal())
        .await
}

//! `basalt-gw`: the NBD gateway daemon (see the `basalt_gw` crate docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_config::ClusterConfig;
use basalt_gw::ImageRegistry;
use basalt_nbd::{Limits, NbdServer};
use basalt_rbd::ImageOptions;
use clap::Parser;

/// Serves basalt block images over NBD; export names are POOL/IMAGE.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Address to serve NBD on (10809 is NBD's port).
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// Client entity name; default: the config's `[client] name`, else
    /// client.gw.<host>.<pid>. Locks and the blocklist show this process as NAME/<nonce>, so
    /// a gateway fenced by a lock breaker serves again once restarted under the same name.
    #[arg(long)]
    name: Option<String>,
    /// Keyring with the gateway's key (e.g. `client.gw0` with `mon 'allow profile rbd' osd
    /// 'allow profile rbd'`). It authenticates as NAME if the keyring holds NAME's key, else
    /// as the keyring's client.admin or only key. Default: the config's keyring.
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// A watch with no ping for this long is dropped by the OSD; a gateway frozen that long
    /// loses its image locks to the next writer (Ceph's osd_client_watch_timeout).
    #[arg(long, default_value_t = 30_000)]
    watch_timeout_ms: u64,
    /// How long a lock request waits for the holder to answer before checking its watch.
    #[arg(long, default_value_t = 5_000)]
    notify_timeout_ms: u64,
    #[command(flatten)]
    telemetry: basalt_telemetry::TelemetryArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt-gw: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("basalt-gw: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    basalt_telemetry::init(&args.telemetry, "info")?;
    basalt_nbd::describe_metrics();
    basalt_rbd::describe_metrics();
    basalt_client::describe_metrics();
    if args.watch_timeout_ms < 1_000 || args.notify_timeout_ms < 100 {
        bail!("--watch-timeout-ms must be at least 1000 and --notify-timeout-ms at least 100");
    }
    let mut cluster = ClusterConfig::load(&args.config)?;
    let name = match args.name.or_else(|| cluster.client.name.clone()) {
        Some(n) => n,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into());
            format!("client.gw.{host}.{:08x}", std::process::id())
        }
    };
    if let Some(k) = &args.keyring {
        cluster.client.keyring = Some(k.clone());
    }
    let creds = basalt_client::Credentials::from_config(&cluster, Some(&name))?;
    tracing::info!(entity = %creds.entity, "authenticating");
    let rados = basalt_client::Rados::connect_with(cluster, &name, creds)
        .await
        .context("cannot connect to the cluster's monitors")?;
    let options = ImageOptions {
        notify_timeout: Duration::from_millis(args.notify_timeout_ms),
        ..ImageOptions::default()
    };
    let registry = Arc::new(ImageRegistry::new(
        rados,
        Duration::from_millis(args.watch_timeout_ms),
        options,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is the address free?", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(%addr, client = %name, "gateway serving NBD; exports are POOL/IMAGE");
    let server = NbdServer::new(registry, Limits::default());
    server
        .serve(listener, basalt_telemetry::shutdown_signal())
        .await
        .context("NBD server failed")?;
    tracing::info!("gateway stopped");
    Ok(())
}

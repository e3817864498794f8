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
    /// NBD over TLS (STARTTLS): a directory in QEMU's `tls-creds-x509` layout with
    /// server-cert.pem, server-key.pem and ca-cert.pem (client certificates are verified
    /// against it). `basalt tls issue NAME --nbd-server DIR` makes one.
    #[arg(long)]
    nbd_tls_dir: Option<PathBuf>,
    /// off, optional (plain-text clients still served) or required (every option before
    /// STARTTLS is refused with NBD_REP_ERR_TLS_REQD). Default: required with
    /// --nbd-tls-dir, else off.
    #[arg(long, value_enum)]
    nbd_tls: Option<NbdTlsMode>,
    /// Export rules by client certificate (TOML: `"CN" = ["POOL/IMAGE", "POOL/*", "*"]`):
    /// each client opens, and sees in LIST, only what its rule allows; a client without a
    /// certificate or a rule sees nothing. Default: every client may open every export.
    #[arg(long)]
    nbd_access: Option<PathBuf>,
    #[command(flatten)]
    telemetry: basalt_telemetry::TelemetryArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NbdTlsMode {
    Off,
    Optional,
    Required,
}

/// TLS and export rules as the flags ask.
fn nbd_security(args: &Args) -> anyhow::Result<basalt_nbd::Security> {
    let mode = match (args.nbd_tls, &args.nbd_tls_dir) {
        (Some(m), _) => m,
        (None, Some(_)) => NbdTlsMode::Required,
        (None, None) => NbdTlsMode::Off,
    };
    let tls = match (mode, &args.nbd_tls_dir) {
        (NbdTlsMode::Off, _) => None,
        (_, None) => bail!("--nbd-tls {mode:?} needs --nbd-tls-dir DIR (the server certificate)"),
        (_, Some(dir)) => Some(basalt_nbd::NbdTls {
            config: basalt_tls::nbd_server_config(dir)
                .with_context(|| format!("cannot set up NBD TLS from {}", dir.display()))?,
            required: mode == NbdTlsMode::Required,
            client_name: basalt_tls::common_name,
        }),
    };
    let access = match &args.nbd_access {
        None => None,
        Some(path) => {
            let rules = basalt_gw::load_export_rules(path)?;
            if tls.is_none() {
                bail!(
                    "--nbd-access names clients by their TLS certificates: it needs \
                     --nbd-tls-dir (and --nbd-tls optional or required)"
                );
            }
            Some(Arc::new(rules) as Arc<dyn basalt_nbd::ExportAccess>)
        }
    };
    Ok(basalt_nbd::Security { tls, access })
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
    // Before connecting: a bad certificate or rule file is reported at once.
    let security = nbd_security(&args)?;
    let name = match args.name.clone().or_else(|| cluster.client.name.clone()) {
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
    tracing::info!(%addr, client = %name, nbd_tls = ?security.tls.as_ref().map(|t| if t.required { "required" } else { "optional" }),
        export_rules = security.access.is_some(), "gateway serving NBD; exports are POOL/IMAGE");
    let server = NbdServer::with_security(registry, Limits::default(), security);
    server
        .serve(listener, basalt_telemetry::shutdown_signal())
        .await
        .context("NBD server failed")?;
    tracing::info!("gateway stopped");
    Ok(())
}

//! The `basalt-mon` daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_auth::{EntityName, Keyring};
use basalt_config::ClusterConfig;
use basalt_mon::auth::AuthService;
use basalt_mon::node::Node;
use basalt_mon::server::MonServer;
use basalt_mon::service::{OsdMapService, Policy};
use basalt_mon::store::{MonStore, Retention, RocksStore};
use basalt_paxos::Paxos;
use basalt_proto::mon::{
    mon_auth_server::MonAuthServer, mon_peer_server::MonPeerServer, monitor_server::MonitorServer,
};
use clap::Parser;
use tonic::service::interceptor::InterceptedService;

/// A basalt monitor: keeps the cluster map by Paxos with its peers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// This monitor's rank in the config's [[mon]] list.
    #[arg(long)]
    id: u32,
    /// Store directory (default: the [[mon]] entry's `data`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The monitors' keyring: the `mon.` key every monitor shares (required: the services'
    /// secrets derive from it, and monitors prove it to each other), plus the entities (keys
    /// and caps) a new cluster's auth database starts with, committed by the first leader and
    /// ignored once the database holds anything. Default: `mon.keyring` beside the config.
    #[arg(long)]
    keyring: Option<PathBuf>,
    #[command(flatten)]
    tls: basalt_tls::DaemonTlsArgs,
    #[command(flatten)]
    telemetry: basalt_telemetry::TelemetryArgs,
}

const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    basalt_telemetry::init(&args.telemetry, "info")?;
    basalt_mon::node::describe_metrics();
    let config = Arc::new(ClusterConfig::load(&args.config)?);
    let Some(me) = config.mon(args.id).cloned() else {
        bail!(
            "--id {} is not a rank in {} (ranks 0..{})",
            args.id,
            args.config.display(),
            config.mons.len()
        );
    };
    let data = args.data.or(me.data.clone()).with_context(|| {
        format!(
            "no store directory for mon.{}: pass --data DIR or set `data` in its [[mon]] entry",
            args.id
        )
    })?;
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create store directory {}", data.display()))?;
    let kv = Arc::new(RocksStore::open(&data)?);
    let retention = Retention {
        full_map_interval: config.paxos.full_map_interval,
        keep_epochs: config.paxos.keep_epochs,
    };
    let store = MonStore::load(kv, &config.cluster.fsid, retention)?;
    let t = &config.timeouts;
    let mut pcfg = basalt_paxos::Config::new(me.rank, config.mons.len() as u32);
    pcfg.election_timeout_ms = t.election_timeout_ms;
    pcfg.lease_ms = t.lease_ms;
    pcfg.keep_versions = config.paxos.keep_versions;
    pcfg.trim_min = config.paxos.trim_min;
    pcfg.trim_max = config.paxos.trim_max;
    let paxos = Paxos::new(pcfg, store.paxos_state().clone());
    let policy = Policy {
        beacon_grace_ms: t.osd_beacon_grace_ms,
        heartbeat_grace_ms: t.osd_heartbeat_grace_ms,
        min_down_reporters: t.min_down_reporters,
        down_out_interval_ms: t.down_out_interval_secs.saturating_mul(1000),
    };
    let service = OsdMapService::new(store.osdmap().clone(), policy);
    let keyring_path = args.keyring.clone().or_else(|| {
        let beside = args.config.with_file_name("mon.keyring");
        beside.exists().then_some(beside)
    });
    let Some(keyring_path) = keyring_path else {
        bail!(
            "no monitor keyring: pass --keyring FILE or put mon.keyring beside {} (`basalt cluster up` writes one; `basalt keyring gen mon.keyring mon. mon 'allow *'` makes one by hand, the same file on every monitor)",
            args.config.display()
        );
    };
    let bootstrap = Keyring::load(&keyring_path)
        .with_context(|| format!("cannot read the monitor keyring {}", keyring_path.display()))?;
    let mon_key = bootstrap
        .key(&EntityName::mon())
        .with_context(|| {
            format!(
                "{} holds no `mon.` key, which every monitor needs (the same on each)",
                keyring_path.display()
            )
        })?
        .clone();
    let ttl_ms = config.auth.ticket_ttl_secs.saturating_mul(1000);
    let keys = basalt_mon::gate::MonKeys::new(mon_key, ttl_ms, store.auth().clone());
    if store.auth().version == 0 {
        tracing::info!(keyring = %keyring_path.display(), entities = bootstrap.iter().count(), "new auth database: will be seeded from the bootstrap keyring");
    }
    let auth = AuthService::new(store.auth().clone(), bootstrap, ttl_ms);
    let history = store.reader();
    let acceptor = args.tls.acceptor(&config.tls)?;
    let connector = basalt_tls::Connector::for_cluster(&config.tls)
        .context("cannot set up TLS to the other monitors ([tls] ca_file names the cluster CA)")?;
    let outbox = basalt_mon::peers::spawn_peer_senders(
        &config,
        me.rank,
        &connector,
        keys.own_ticket.clone(),
    );
    let (node, view) = Node::new(
        me.rank,
        paxos,
        store,
        service,
        auth,
        outbox,
        Duration::from_millis(t.propose_interval_ms),
    );
    let _refresher = keys.clone().spawn_refresher(view.clone());
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(4096);
    let server = Arc::new(MonServer::new(
        me.rank,
        config.clone(),
        req_tx,
        view,
        history,
        keys.clone(),
        connector,
    ));
    tracing::info!(rank = me.rank, addr = %me.addr, data = %data.display(), tls = acceptor.is_tls(), "monitor starting");
    let listener = tokio::net::TcpListener::bind(me.addr)
        .await
        .with_context(|| format!("cannot listen on {}; is another monitor using it?", me.addr))?;
    // TCP_NODELAY and the TLS handshake (when on) per accepted connection.
    let incoming = basalt_tls::incoming(listener, acceptor);
    // Every service but the handshake needs an authorizer for the mon service.
    let verify = basalt_proto::auth::Verify(keys.guard.clone());
    let grpc = basalt_proto::transport::server()
        .add_service(MonAuthServer::from_arc(server.clone()))
        .add_service(InterceptedService::new(
            MonitorServer::from_arc(server.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            verify.clone(),
        ))
        .add_service(InterceptedService::new(
            MonPeerServer::from_arc(server)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            verify,
        ))
        .serve_with_incoming_shutdown(incoming, basalt_telemetry::shutdown_signal());
    tokio::select! {
        r = node.run(req_rx) => r.context("monitor state owner stopped")?,
        r = grpc => r.context("gRPC server failed")?,
    }
    tracing::info!("monitor stopped");
    Ok(())
}

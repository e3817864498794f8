//! `basalt`: the admin CLI (Ceph's habits: `basalt status`, `basalt pool ls`, ...).
//!
//! Owns argument parsing and rendering only; every operation goes through
//! `basalt-client`. Read commands take `--format json`; failures print one
//! line naming what failed and what to do, and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_client::{MonClient, Rados};
use basalt_config::ClusterConfig;
use basalt_maps::{parse_ratio, ratio_str, HealthCheck, HealthStatus, OsdMap, RatioKind, Severity};
use basalt_placement::{pg_distribution, NodeKind, WEIGHT_ONE};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

mod auth;
mod bench;
mod cluster;
mod obj;
mod pg;
mod rbd;
mod tls;

#[derive(Parser, Debug)]
#[command(name = "basalt", version, about = "Administer a basalt cluster")]
struct Cli {
    /// Cluster configuration (default: ./var/cluster/cluster.toml if present, else /etc/basalt/cluster.toml).
    #[arg(short = 'c', long, global = true, env = "BASALT_CONFIG")]
    config: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(long, global = true, value_enum, default_value_t = Format::Plain)]
    format: Format,
    /// Give up on an operation after this many seconds (default: the config's
    /// client_op_timeout_ms, for monitor requests and object operations alike).
    #[arg(long, global = true)]
    timeout: Option<u64>,
    /// Keyring holding this client's key (default: the config's `[client] keyring`, else the
    /// file `keyring` beside the config, as `basalt cluster up` writes it).
    #[arg(
        id = "keyring_file",
        long = "keyring",
        global = true,
        env = "BASALT_KEYRING"
    )]
    keyring: Option<PathBuf>,
    /// Entity to authenticate as (default: client.admin, or the keyring's only key).
    #[arg(
        id = "entity_name",
        short = 'n',
        long = "name",
        global = true,
        env = "BASALT_NAME"
    )]
    entity_name: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cluster summary: health, monitors, OSDs, pools.
    Status,
    /// Health status; `detail` lists each problem.
    Health {
        #[arg(value_parser = ["detail"])]
        detail: Option<String>,
    },
    /// Monitor commands.
    #[command(subcommand)]
    Mon(MonCmd),
    /// Keys and caps of the cluster's entities: add, get-or-create, get, ls, rm, caps.
    #[command(subcommand)]
    Auth(auth::AuthCmd),
    /// Keyring files on this host, offline: gen.
    #[command(subcommand)]
    Keyring(auth::KeyringCmd),
    /// OSD commands.
    #[command(subcommand)]
    Osd(OsdCmd),
    /// Pool commands.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Object commands (rados-like).
    #[command(subcommand)]
    Obj(obj::ObjCmd),
    /// Placement groups: ls, query.
    #[command(subcommand)]
    Pg(pg::PgCmd),
    /// A local cluster on this machine: up, down, status.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Block image commands (rbd-like).
    #[command(subcommand)]
    Rbd(rbd::RbdCmd),
    /// Load generator (rados bench-like): write, read, rand, cleanup.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Certificates for encryption in transit, offline: ca, issue.
    #[command(subcommand)]
    Tls(tls::TlsCmd),
}

#[derive(Subcommand, Debug)]
enum MonCmd {
    /// Quorum and leader.
    Stat,
}

#[derive(Subcommand, Debug)]
enum OsdCmd {
    /// The CRUSH hierarchy with up/in state.
    Tree,
    /// Use of each OSD's store (as it last reported it), its fullness, and its placement
    /// groups with their deviation from the OSD's weight share.
    Df,
    /// Where an object lives: its PG, up set and primary.
    Map { pool: String, object: String },
    /// Mark an OSD out (its data moves elsewhere).
    Out { id: u32 },
    /// Mark an OSD in.
    In { id: u32 },
    /// Mark an OSD down (it re-registers if it is alive).
    Down { id: u32 },
    /// Set an OSD's in-weight, 0.0..=1.0.
    Reweight { id: u32, weight: f64 },
    /// Remove a down OSD from the map.
    Rm { id: u32 },
    /// Declare a down OSD's data gone for good: PGs that are down waiting for it go active
    /// from the copies that remain, losing writes only it held.
    Lost {
        id: u32,
        /// Required: acknowledged writes held only by this OSD are lost.
        #[arg(long)]
        yes_i_really_mean_it: bool,
    },
    /// Client blocklist (fencing).
    #[command(subcommand)]
    Blocklist(BlocklistCmd),
    /// Set a cluster flag (noout, nodown, noin).
    Set { flag: String },
    /// Clear a cluster flag.
    Unset { flag: String },
    /// Use at which an OSD is reported nearfull (health warning), e.g. 0.85.
    SetNearfullRatio { ratio: String },
    /// Use at which backfill and recovery stop pushing to an OSD, e.g. 0.90.
    SetBackfillfullRatio { ratio: String },
    /// Use at which an OSD makes its pools full (new writes fail with ENOSPC), e.g. 0.95.
    SetFullRatio { ratio: String },
}

#[derive(Subcommand, Debug)]
enum BlocklistCmd {
    /// Fence a client: NAME fences every process of that name, NAME/NONCE one process
    /// (what an image lock breaker adds; `osd blocklist ls` shows them).
    Add {
        entity: String,
        /// Seconds until the entry lapses (default 3600).
        #[arg(long, default_value_t = 3600)]
        expire: u64,
    },
    Rm {
        entity: String,
    },
    Ls,
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    Create {
        name: String,
        #[arg(long, default_value_t = 3)]
        size: u32,
        /// Default: size - size/2.
        #[arg(long)]
        min_size: Option<u32>,
        #[arg(long, default_value_t = 64)]
        pg_num: u32,
    },
    Ls,
    Rm {
        name: String,
    },
    /// Show a pool's settings (or one of them).
    Get {
        name: String,
        key: Option<String>,
    },
    /// Change a pool setting: size, min_size, pg_num or pgp_num.
    ///
    /// `pg_num` only grows: every OSD splits each PG's objects and log into its new child PGs
    /// when it applies the map (shrinking needs PG merging, which is not built). The children
    /// stay on their parent's OSDs until `pgp_num` is raised to match, which moves them by
    /// backfill; raise it in steps to bound the data in motion.
    Set {
        name: String,
        /// size, min_size, pg_num or pgp_num.
        key: String,
        value: String,
    },
}

fn config_path(cli: &Cli) -> PathBuf {
    if let Some(p) = &cli.config {
        return p.clone();
    }
    let local = PathBuf::from("var/cluster/cluster.toml");
    if local.exists() {
        local
    } else {
        PathBuf::from("/etc/basalt/cluster.toml")
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.format == Format::Json;
    // A local cluster writes its own config, so it is handled before any config is loaded.
    let command = match cli.command {
        Cmd::Cluster(cmd) => return cluster::run(cmd, json).await,
        Cmd::Keyring(cmd) => return auth::run_keyring(cmd),
        Cmd::Tls(cmd) => return tls::run(cmd),
        other => other,
    };
    let cli = Cli { command, ..cli };
    let path = config_path(&cli);
    let config = ClusterConfig::load(&path).with_context(|| {
        "cannot load the cluster config (pass -c FILE or set BASALT_CONFIG)".to_string()
    })?;
    let timeout = cli
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_millis(config.timeouts.client_op_timeout_ms));
    let mut config = config;
    if let Some(k) = &cli.keyring {
        config.client.keyring = Some(k.clone());
    }
    if let Some(n) = &cli.entity_name {
        // Checked here so a name the keyring lacks fails at once, naming both.
        let entity: basalt_auth::EntityName = n.parse()?;
        let keyring = config
            .client
            .keyring
            .clone()
            .context("--name needs a keyring (--keyring FILE)")?;
        basalt_client::Credentials::load(&keyring, Some(&entity))?;
        config.client.name = Some(n.clone());
    }
    config.timeouts.client_op_timeout_ms = timeout.as_millis() as u64;
    // Someone waits at a prompt: object operations give up after the same bound instead of
    // waiting through an outage as block clients do (osd_op_timeout_ms = 0).
    if cli.timeout.is_some() || config.timeouts.osd_op_timeout_ms == 0 {
        config.timeouts.osd_op_timeout_ms = timeout.as_millis() as u64;
    }
    let mon = MonClient::with_timeout(config.clone(), timeout)?;
    match cli.command {
        Cmd::Status => status(&mon, config, json).await,
        Cmd::Health { detail } => health(&mon, config, json, detail.is_some()).await,
        Cmd::Mon(MonCmd::Stat) => mon_stat(&mon, json).await,
        Cmd::Auth(cmd) => auth::run(&mon, json, cmd).await,
        Cmd::Osd(cmd) => osd(&mon, json, cmd).await,
        Cmd::Pool(cmd) => pool(&mon, json, cmd).await,
        Cmd::Obj(cmd) => {
            let rados = Rados::connect(config).await?;
            obj::run(&rados, json, cmd).await
        }
        Cmd::Pg(cmd) => {
            let rados = Rados::connect(config).await?;
            pg::run(&rados, json, cmd).await
        }
        Cmd::Cluster(cmd) => cluster::run(cmd, json).await,
        Cmd::Keyring(cmd) => auth::run_keyring(cmd),
        Cmd::Tls(cmd) => tls::run(cmd),
        Cmd::Rbd(cmd) => rbd::run(config, json, cmd).await,
        Cmd::Bench(cmd) => bench::run(config, json, cmd).await,
    }
}

fn print_json(value: serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(&value).unwrap_or_default()
    );
}

fn done(reply: basalt_proto::mon::CommandReply) {
    println!("{} (osdmap epoch {})", reply.message, reply.epoch);
}

/// Health of the cluster: the map's own checks plus monitors out of quorum.
fn health_checks(map: &OsdMap, status: &basalt_proto::mon::StatusReply) -> Vec<HealthCheck> {
    let mut checks = Vec::new();
    let out: Vec<String> = status
        .mons
        .iter()
        .filter(|m| !m.in_quorum)
        .map(|m| format!("mon.{} ({}) is not in quorum", m.rank, m.addr))
        .collect();
    if !out.is_empty() {
        checks.push(HealthCheck::new(
            "MON_DOWN",
            Severity::Warn,
            format!("{}/{} mons down", out.len(), status.mons.len()),
            out,
        ));
    }
    checks.extend(map.health());
    checks
}

fn quorum_ranks(st: &basalt_proto::mon::StatusReply) -> Vec<u32> {
    st.mons
        .iter()
        .filter(|m| m.in_quorum)
        .map(|m| m.rank)
        .collect()
}

/// PG states from the primaries (best effort: `None` when no OSD can be asked).
async fn pg_stats(config: ClusterConfig) -> Option<Vec<basalt_client::ops::PgStat>> {
    let rados = Rados::connect(config).await.ok()?;
    rados.pg_stats().await.ok()
}

/// Health checks derived from PG states, as Ceph's PG_AVAILABILITY / PG_DEGRADED.
fn pg_checks(stats: &[basalt_client::ops::PgStat]) -> Vec<HealthCheck> {
    use basalt_client::ops::PgStateFlag;
    let mut checks = Vec::new();
    let inactive: Vec<String> = stats
        .iter()
        .filter(|s| !s.state.is_active())
        .map(|s| match s.detail.as_str() {
            "" => format!("pg {} is {}", s.pgid, s.state),
            why => format!("pg {} is {}: {why}", s.pgid, s.state),
        })
        .collect();
    if !inactive.is_empty() {
        checks.push(HealthCheck::new(
            "PG_AVAILABILITY",
            Severity::Warn,
            format!("Reduced data availability: {} pgs inactive", inactive.len()),
            inactive,
        ));
    }
    let damaged: Vec<String> = stats
        .iter()
        .filter(|s| s.state.contains(PgStateFlag::Inconsistent))
        .map(|s| format!("pg {} is {}", s.pgid, s.state))
        .collect();
    if !damaged.is_empty() {
        checks.push(HealthCheck::new(
            "PG_DAMAGED",
            Severity::Err,
            format!("Possible data damage: {} pgs inconsistent", damaged.len()),
            damaged,
        ));
    }
    let degraded: Vec<String> = stats
        .iter()
        .filter(|s| s.state.contains(PgStateFlag::Degraded))
        .map(|s| format!("pg {} is {}", s.pgid, s.state))
        .collect();
    if !degraded.is_empty() {
        checks.push(HealthCheck::new(
            "PG_DEGRADED",
            Severity::Warn,
            format!("Degraded data redundancy: {} pgs degraded", degraded.len()),
            degraded,
        ));
    }
    checks
}

/// What status and health show: monitor status, the map, PG states (if any OSD answers) and
/// the health checks derived from all three.
struct ClusterView {
    st: basalt_proto::mon::StatusReply,
    map: OsdMap,
    pgs: Option<Vec<basalt_client::ops::PgStat>>,
    checks: Vec<HealthCheck>,
}

async fn cluster_view(mon: &MonClient, config: ClusterConfig) -> anyhow::Result<ClusterView> {
    let st = mon.status().await?;
    let map = mon.osdmap().await?;
    let pgs = pg_stats(config).await;
    let mut checks = health_checks(&map, &st);
    if let Some(p) = &pgs {
        checks.extend(pg_checks(p));
    }
    Ok(ClusterView {
        st,
        map,
        pgs,
        checks,
    })
}

async fn status(mon: &MonClient, config: ClusterConfig, json: bool) -> anyhow::Result<()> {
    let ClusterView {
        st,
        map,
        pgs,
        checks,
    } = cluster_view(mon, config).await?;
    let health = HealthStatus::of(&checks);
    let quorum = quorum_ranks(&st);
    if json {
        print_json(json!({
            "fsid": st.fsid,
            "health": { "status": health, "checks": checks },
            "mon": { "num_mons": st.mons.len(), "quorum": quorum, "leader": st.leader, "election_epoch": st.election_epoch },
            "osdmap": { "epoch": map.epoch, "num_osds": map.osds.len(), "num_up_osds": map.num_up(), "num_in_osds": map.num_in() },
            "pools": map.pools.len(),
            "pgmap": pgs.as_ref().map(|p| json!({
                "num_pgs": p.len(),
                "states": pg::summary(p).0,
            })),
        }));
        return Ok(());
    }
    println!("  cluster:");
    println!("    id:     {}", st.fsid);
    println!("    health: {}", health.as_str());
    for c in &checks {
        println!("            {}", c.summary);
    }
    println!();
    println!("  services:");
    println!(
        "    mon: {} daemons, quorum {:?}, leader mon.{} (election epoch {})",
        st.mons.len(),
        quorum,
        st.leader,
        st.election_epoch
    );
    println!(
        "    osd: {} osds: {} up, {} in; osdmap epoch {}",
        map.osds.len(),
        map.num_up(),
        map.num_in(),
        map.epoch
    );
    println!();
    println!("  data:");
    println!("    pools: {}", map.pools.len());
    match &pgs {
        Some(p) => println!("    {}", pg::summary(p).1),
        None => println!("    pgs: unknown (no OSD answered)"),
    }
    Ok(())
}

async fn health(
    mon: &MonClient,
    config: ClusterConfig,
    json: bool,
    detail: bool,
) -> anyhow::Result<()> {
    let checks = cluster_view(mon, config).await?.checks;
    let health = HealthStatus::of(&checks);
    if json {
        print_json(json!({ "status": health, "checks": checks }));
        return Ok(());
    }
    let summaries: Vec<&str> = checks.iter().map(|c| c.summary.as_str()).collect();
    if summaries.is_empty() {
        println!("{}", health.as_str());
    } else {
        println!("{} {}", health.as_str(), summaries.join("; "));
    }
    if detail {
        for c in &checks {
            println!(
                "[{}] {}: {}",
                if c.severity == Severity::Err {
                    "ERR"
                } else {
                    "WRN"
                },
                c.code,
                c.summary
            );
            for d in &c.detail {
                println!("    {d}");
            }
        }
    }
    Ok(())
}

async fn mon_stat(mon: &MonClient, json: bool) -> anyhow::Result<()> {
    let st = mon.status().await?;
    let quorum = quorum_ranks(&st);
    if json {
        let mons: Vec<_> = st
            .mons
            .iter()
            .map(|m| json!({"rank": m.rank, "addr": m.addr, "in_quorum": m.in_quorum}))
            .collect();
        print_json(json!({
            "fsid": st.fsid, "leader": st.leader, "quorum": quorum, "election_epoch": st.election_epoch,
            "first_committed": st.first_committed, "last_committed": st.last_committed, "mons": mons,
        }));
        return Ok(());
    }
    let addrs: Vec<String> = st
        .mons
        .iter()
        .map(|m| format!("{}={}", m.rank, m.addr))
        .collect();
    println!(
        "e1: {} mons at {{{}}}, election epoch {}, leader {}, quorum {:?}, paxos {}..{}",
        st.mons.len(),
        addrs.join(","),
        st.election_epoch,
        st.leader,
        quorum,
        st.first_committed,
        st.last_committed
    );
    Ok(())
}

fn weight_str(w: u32) -> String {
    format!("{:.5}", w as f64 / WEIGHT_ONE as f64)
}

async fn osd(mon: &MonClient, json: bool, cmd: OsdCmd) -> anyhow::Result<()> {
    match cmd {
        OsdCmd::Tree => {
            let map = mon.osdmap().await?;
            let tree = map.crush.tree();
            if json {
                let nodes: Vec<_> = tree
                    .iter()
                    .map(|n| {
                        let mut v = json!({"id": n.id, "name": n.name, "type": format!("{:?}", n.kind).to_lowercase(),
                            "depth": n.depth, "crush_weight": n.weight as f64 / WEIGHT_ONE as f64});
                        if n.kind == NodeKind::Osd {
                            if let Some(o) = map.osds.get(&(n.id as u32)) {
                                v["status"] = json!(if o.up { "up" } else { "down" });
                                v["reweight"] = json!(o.reweight as f64 / WEIGHT_ONE as f64);
                            }
                        }
                        v
                    })
                    .collect();
                print_json(json!({ "epoch": map.epoch, "nodes": nodes }));
                return Ok(());
            }
            println!(
                "{:<5} {:<10} {:<24} {:<8} {:<8}",
                "ID", "WEIGHT", "NAME", "STATUS", "REWEIGHT"
            );
            for n in &tree {
                let indent = "  ".repeat(n.depth);
                let (status, reweight) = match (n.kind, map.osds.get(&(n.id as u32))) {
                    (NodeKind::Osd, Some(o)) => (
                        if o.up { "up" } else { "down" }.to_string(),
                        weight_str(o.reweight),
                    ),
                    _ => (String::new(), String::new()),
                };
                let name = match n.kind {
                    NodeKind::Osd => format!("{indent}osd.{}", n.id),
                    k => format!("{indent}{} {}", format!("{k:?}").to_lowercase(), n.name),
                };
                println!(
                    "{:<5} {:<10} {:<24} {:<8} {:<8}",
                    n.id,
                    weight_str(n.weight),
                    name,
                    status,
                    reweight
                );
            }
        }
        OsdCmd::Df => {
            let map = mon.osdmap().await?;
            let mut pgs: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
            for pool in map.pools.values() {
                for (osd, n) in pg_distribution(&map.crush, &pool.placement(), &map)? {
                    *pgs.entry(osd).or_default() += n as u64;
                }
            }
            let total_pgs: u64 = pgs.values().sum();
            let eligible: Vec<(u32, u64)> = map
                .osds
                .iter()
                .filter(|(_, o)| o.is_in())
                .map(|(id, o)| {
                    let cw = map.crush.osd_weight(*id).unwrap_or(0) as u64;
                    (*id, cw * o.reweight as u64 / WEIGHT_ONE as u64)
                })
                .collect();
            let total_weight: u64 = eligible.iter().map(|(_, w)| w).sum();
            let rows: Vec<_> = map
                .osds
                .keys()
                .map(|id| {
                    let n = pgs.get(id).copied().unwrap_or(0);
                    let w = eligible
                        .iter()
                        .find(|(i, _)| i == id)
                        .map_or(0, |(_, w)| *w);
                    let expected = if total_weight == 0 {
                        0.0
                    } else {
                        total_pgs as f64 * w as f64 / total_weight as f64
                    };
                    let dev = if expected > 0.0 {
                        (n as f64 - expected) / expected * 100.0
                    } else {
                        0.0
                    };
                    (*id, n, expected, dev)
                })
                .collect();
            let r = &map.full_ratios;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, n, e, d)| {
                        let usage = map.osds.get(id).and_then(|o| o.usage);
                        json!({"id": id, "pgs": n, "expected_pgs": e, "deviation_pct": d,
                            "used_bytes": usage.map(|u| u.used_bytes),
                            "total_bytes": usage.map(|u| u.total_bytes),
                            "utilization_pct": usage.map(|u| u.ratio() as f64 / 100.0),
                            "state": map.fullness(*id).name()})
                    })
                    .collect();
                print_json(json!({ "epoch": map.epoch, "osds": v,
                    "nearfull_ratio": ratio_str(r.nearfull),
                    "backfillfull_ratio": ratio_str(r.backfillfull),
                    "full_ratio": ratio_str(r.full) }));
                return Ok(());
            }
            println!(
                "{:<6} {:>10} {:>10} {:>7} {:>8} {:>10} {:>10}  STATUS",
                "ID", "SIZE", "USE", "%USE", "PGS", "EXPECTED", "DEVIATION"
            );
            for (id, n, e, d) in rows {
                let usage = map.osds.get(&id).and_then(|o| o.usage);
                let (size, used, pct) = match usage {
                    Some(u) => (
                        rbd::human(u.total_bytes),
                        rbd::human(u.used_bytes),
                        u.percent_str(),
                    ),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                println!(
                    "{:<6} {:>10} {:>10} {:>7} {:>8} {:>10.1} {:>9.1}%  {}",
                    format!("osd.{id}"),
                    size,
                    used,
                    pct,
                    n,
                    e,
                    d,
                    map.fullness(id).name()
                );
            }
            println!(
                "nearfull_ratio {}  backfillfull_ratio {}  full_ratio {}",
                ratio_str(r.nearfull),
                ratio_str(r.backfillfull),
                ratio_str(r.full)
            );
        }
        OsdCmd::Map { pool, object } => {
            let map = mon.osdmap().await?;
            let (pg, m) = map.map_object(&pool, &object)?;
            if json {
                print_json(
                    json!({"epoch": map.epoch, "pool": pool, "object": object, "pgid": pg.to_string(),
                    "up": m.up, "up_primary": m.up_primary, "acting": m.acting, "acting_primary": m.acting_primary}),
                );
                return Ok(());
            }
            let primary = |p: Option<u32>| p.map_or("none".to_string(), |p| format!("p{p}"));
            println!(
                "osdmap e{} pool '{}' ({}) object '{}' -> pg {} -> up ({:?}, {}) acting ({:?}, {})",
                map.epoch,
                pool,
                pg.pool,
                object,
                pg,
                m.up,
                primary(m.up_primary),
                m.acting,
                primary(m.acting_primary)
            );
            if m.short_by > 0 {
                println!(
                    "warning: {} of the pool's copies could not be placed on distinct hosts",
                    m.short_by
                );
            }
        }
        OsdCmd::Out { id } => done(mon.osd_out(id).await?),
        OsdCmd::In { id } => done(mon.osd_in(id).await?),
        OsdCmd::Down { id } => done(mon.osd_down(id).await?),
        OsdCmd::Rm { id } => done(mon.osd_rm(id).await?),
        OsdCmd::Lost {
            id,
            yes_i_really_mean_it,
        } => {
            if !yes_i_really_mean_it {
                anyhow::bail!(
                    "marking osd.{id} lost gives up every write only it holds; add --yes-i-really-mean-it to do it"
                );
            }
            done(mon.osd_lost(id).await?)
        }
        OsdCmd::Reweight { id, weight } => {
            if !(0.0..=1.0).contains(&weight) {
                bail!("reweight must be between 0.0 and 1.0, got {weight}");
            }
            done(
                mon.osd_reweight(id, (weight * WEIGHT_ONE as f64).round() as u32)
                    .await?,
            )
        }
        OsdCmd::Set { flag } => done(mon.set_flag(&flag).await?),
        OsdCmd::Unset { flag } => done(mon.unset_flag(&flag).await?),
        OsdCmd::SetNearfullRatio { ratio } => done(
            mon.set_full_ratio(RatioKind::Nearfull, parse_ratio(&ratio)?)
                .await?,
        ),
        OsdCmd::SetBackfillfullRatio { ratio } => done(
            mon.set_full_ratio(RatioKind::Backfillfull, parse_ratio(&ratio)?)
                .await?,
        ),
        OsdCmd::SetFullRatio { ratio } => done(
            mon.set_full_ratio(RatioKind::Full, parse_ratio(&ratio)?)
                .await?,
        ),
        OsdCmd::Blocklist(BlocklistCmd::Add { entity, expire }) => {
            if expire == 0 {
                bail!("--expire must be at least 1 second");
            }
            done(mon.blocklist_add(&entity, expire).await?)
        }
        OsdCmd::Blocklist(BlocklistCmd::Rm { entity }) => done(mon.blocklist_rm(&entity).await?),
        OsdCmd::Blocklist(BlocklistCmd::Ls) => {
            let map = mon.osdmap().await?;
            if json {
                let v: Vec<_> = map
                    .blocklist
                    .iter()
                    .map(|(e, until)| json!({"entity": e, "expires_ms": until}))
                    .collect();
                print_json(json!(v));
                return Ok(());
            }
            for (e, until) in &map.blocklist {
                println!("{e} until {until} (unix ms)");
            }
            eprintln!("listed {} entries", map.blocklist.len());
        }
    }
    Ok(())
}

fn pool_json(p: &basalt_maps::Pool) -> serde_json::Value {
    json!({"id": p.id, "name": p.name, "size": p.size, "min_size": p.min_size,
        "pg_num": p.pg_num, "pgp_num": p.pgp_num, "crush_rule": p.rule, "created_epoch": p.created})
}

async fn pool(mon: &MonClient, json: bool, cmd: PoolCmd) -> anyhow::Result<()> {
    match cmd {
        PoolCmd::Create {
            name,
            size,
            min_size,
            pg_num,
        } => {
            let min_size = min_size.unwrap_or(size - size / 2);
            done(mon.pool_create(&name, size, min_size, pg_num).await?)
        }
        PoolCmd::Rm { name } => done(mon.pool_rm(&name).await?),
        PoolCmd::Set { name, key, value } => done(mon.pool_set(&name, &key, &value).await?),
        PoolCmd::Ls => {
            let map = mon.osdmap().await?;
            if json {
                print_json(json!(map.pools.values().map(pool_json).collect::<Vec<_>>()));
                return Ok(());
            }
            for p in map.pools.values() {
                println!("{} {}", p.id, p.name);
            }
        }
        PoolCmd::Get { name, key } => {
            let map = mon.osdmap().await?;
            let p = map.pool_named(&name)?;
            let all = pool_json(p);
            let value = match &key {
                Some(k) => all
                    .get(k)
                    .cloned()
                    .with_context(|| format!("unknown pool setting '{k}'; known: size, min_size, pg_num, pgp_num, crush_rule"))?,
                None => all,
            };
            if json {
                print_json(value);
            } else if let Some(k) = key {
                println!("{k}: {value}");
            } else if let Some(obj) = value.as_object() {
                for (k, v) in obj {
                    println!("{k}: {v}");
                }
            }
        }
    }
    Ok(())
}

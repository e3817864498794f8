//! `basalt pg ...`: placement groups as their primaries report them.

use std::collections::BTreeMap;

use anyhow::bail;
use basalt_client::ops::PgStat;
use basalt_client::Rados;
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum PgCmd {
    /// Every PG with its state, acting set and primary.
    Ls {
        /// Only this pool's PGs.
        #[arg(long)]
        pool: Option<String>,
    },
    /// One PG in detail (PGID as `POOL.SEED`, seed in hex, e.g. `1.1f`).
    Query { pgid: String },
    /// Compare the replicas' object lists, versions and sizes.
    Scrub { pgid: String },
    /// Also read every chunk on every replica, verify its checksum and compare digests.
    DeepScrub { pgid: String },
    /// Deep-scrub, then copy a good copy over every bad one.
    Repair { pgid: String },
}

async fn command(
    rados: &Rados,
    json: bool,
    pgid: &str,
    cmd: basalt_client::ops::PgCommand,
) -> anyhow::Result<()> {
    let Ok(pg) = pgid.parse::<basalt_placement::PgId>() else {
        bail!("{pgid} is not a PG id (POOL.SEED with the seed in hex, e.g. 1.1f)");
    };
    let r = rados.pg_command(pg, cmd).await?;
    if json {
        crate::print_json(json!({
            "pgid": r.pgid, "deep": r.deep, "objects": r.objects,
            "inconsistent": r.inconsistent, "repaired": r.repaired,
        }));
        return Ok(());
    }
    let kind = if r.deep { "deep-scrub" } else { "scrub" };
    if r.inconsistent.is_empty() {
        println!(
            "{} {kind} ok: {} objects, {} repaired",
            r.pgid, r.objects, r.repaired
        );
    } else {
        println!(
            "{} {kind}: {} of {} objects inconsistent ({} repaired)",
            r.pgid,
            r.inconsistent.len(),
            r.objects,
            r.repaired
        );
        for line in &r.inconsistent {
            println!("  {line}");
        }
    }
    Ok(())
}

fn stat_json(s: &PgStat) -> serde_json::Value {
    json!({
        "pgid": s.pgid, "state": s.state.to_string(),
        "state_flags": s.state.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "acting": s.acting,
        "primary": (s.primary != u32::MAX).then_some(s.primary),
        "interval_epoch": s.interval_epoch, "last_seq": s.last_seq,
        "detail": s.detail,
    })
}

/// `N pgs: a active+clean, b peering` — the status line of PG states.
pub fn summary(stats: &[PgStat]) -> (BTreeMap<String, usize>, String) {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for s in stats {
        *by_state.entry(s.state.to_string()).or_default() += 1;
    }
    let parts: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let line = format!("{} pgs: {}", stats.len(), parts.join(", "));
    (by_state, line)
}

pub async fn run(rados: &Rados, json: bool, cmd: PgCmd) -> anyhow::Result<()> {
    use basalt_client::ops::PgCommand;
    match cmd {
        PgCmd::Ls { pool } => ls(rados, json, pool).await,
        PgCmd::Query { pgid } => query(rados, json, &pgid).await,
        PgCmd::Scrub { pgid } => command(rados, json, &pgid, PgCommand::Scrub).await,
        PgCmd::DeepScrub { pgid } => command(rados, json, &pgid, PgCommand::DeepScrub).await,
        PgCmd::Repair { pgid } => command(rados, json, &pgid, PgCommand::Repair).await,
    }
}

async fn ls(rados: &Rados, json: bool, pool: Option<String>) -> anyhow::Result<()> {
    let mut stats = rados.pg_stats().await?;
    if let Some(name) = pool {
        let map = rados.osdmap();
        let Some(p) = map.pool_by_name(&name) else {
            bail!("pool {name} does not exist (basalt pool ls lists the pools)");
        };
        let id = p.id;
        stats.retain(|s| s.pool == id);
    }
    if json {
        crate::print_json(json!({
            "pg_stats": stats.iter().map(stat_json).collect::<Vec<_>>(),
            "summary": summary(&stats).0,
        }));
        return Ok(());
    }
    println!(
        "{:8} {:28} {:12} {:8} {:>8}",
        "PG", "STATE", "ACTING", "PRIMARY", "LAST_SEQ"
    );
    for s in &stats {
        let acting: Vec<String> = s.acting.iter().map(|o| o.to_string()).collect();
        let primary = if s.primary == u32::MAX {
            "-".into()
        } else {
            format!("osd.{}", s.primary)
        };
        println!(
            "{:8} {:28} {:12} {:8} {:>8}",
            s.pgid,
            s.state.to_string(),
            format!("[{}]", acting.join(",")),
            primary,
            s.last_seq
        );
    }
    println!("{}", summary(&stats).1);
    Ok(())
}

async fn query(rados: &Rados, json: bool, pgid: &str) -> anyhow::Result<()> {
    let stats = rados.pg_stats().await?;
    let Some(s) = stats.iter().find(|s| s.pgid == pgid) else {
        bail!("PG {pgid} does not exist (PG ids are POOL.SEED with the seed in hex; basalt pg ls lists them)");
    };
    if json {
        crate::print_json(stat_json(s));
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&stat_json(s)).unwrap_or_default()
        );
    }
    Ok(())
}

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
}

fn stat_json(s: &PgStat) -> serde_json::Value {
    json!({
        "pgid": s.pgid, "state": s.state, "acting": s.acting,
        "primary": (s.primary != u32::MAX).then_some(s.primary),
        "interval_epoch": s.interval_epoch, "last_seq": s.last_seq,
    })
}

/// `N pgs: a active+clean, b peering` — the status line of PG states.
pub fn summary(stats: &[PgStat]) -> (BTreeMap<String, usize>, String) {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for s in stats {
        *by_state.entry(s.state.clone()).or_default() += 1;
    }
    let parts: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let line = format!("{} pgs: {}", stats.len(), parts.join(", "));
    (by_state, line)
}

pub async fn run(rados: &Rados, json: bool, cmd: PgCmd) -> anyhow::Result<()> {
    let mut stats = rados.pg_stats().await?;
    match cmd {
        PgCmd::Ls { pool } => {
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
                    s.state,
                    format!("[{}]", acting.join(",")),
                    primary,
                    s.last_seq
                );
            }
            println!("{}", summary(&stats).1);
        }
        PgCmd::Query { pgid } => {
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
        }
    }
    Ok(())
}

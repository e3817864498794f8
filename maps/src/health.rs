//! Health checks derived from the maps alone (like Ceph's `ceph health detail`).

use serde::{Deserialize, Serialize};

use crate::{ratio_str, Fullness, OsdMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Warn,
    Err,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Stable code, e.g. `OSD_DOWN`, for scripts.
    pub code: String,
    pub severity: Severity,
    pub summary: String,
    pub detail: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    #[serde(rename = "HEALTH_OK")]
    Ok,
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

impl HealthStatus {
    pub fn of(checks: &[HealthCheck]) -> Self {
        match checks.iter().map(|c| c.severity).max() {
            None => HealthStatus::Ok,
            Some(Severity::Warn) => HealthStatus::Warn,
            Some(Severity::Err) => HealthStatus::Err,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "HEALTH_OK",
            HealthStatus::Warn => "HEALTH_WARN",
            HealthStatus::Err => "HEALTH_ERR",
        }
    }
}

impl HealthCheck {
    pub fn new(code: &str, severity: Severity, summary: String, detail: Vec<String>) -> Self {
        HealthCheck {
            code: code.to_string(),
            severity,
            summary,
            detail,
        }
    }
}

impl OsdMap {
    /// Checks that follow from this map: down OSDs, full OSDs and pools, flags set, pools
    /// that cannot place `size` copies on distinct hosts.
    pub fn health(&self) -> Vec<HealthCheck> {
        let mut checks = self.fullness_checks();
        let down: Vec<String> = self
            .osds
            .iter()
            .filter(|(_, o)| !o.up && o.is_in())
            .map(|(id, o)| format!("osd.{id} (host {}) is down", o.host))
            .collect();
        if !down.is_empty() {
            checks.push(HealthCheck::new(
                "OSD_DOWN",
                Severity::Warn,
                format!("{} osds down", down.len()),
                down,
            ));
        }
        if !self.flags.is_empty() {
            let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
            checks.push(HealthCheck::new(
                "OSDMAP_FLAGS",
                Severity::Warn,
                format!("{} flag(s) set", flags.join(",")),
                Vec::new(),
            ));
        }
        let live_hosts: std::collections::BTreeSet<&str> = self
            .osds
            .values()
            .filter(|o| o.up && o.is_in())
            .map(|o| o.host.as_str())
            .collect();
        let short: Vec<String> = self
            .pools
            .values()
            .filter(|p| (live_hosts.len() as u32) < p.size)
            .map(|p| {
                format!(
                    "pool '{}' wants {} copies on distinct hosts but {} host(s) have up+in OSDs",
                    p.name,
                    p.size,
                    live_hosts.len()
                )
            })
            .collect();
        if !short.is_empty() {
            let below_min = self
                .pools
                .values()
                .any(|p| (live_hosts.len() as u32) < p.min_size);
            checks.push(HealthCheck::new(
                "POOL_UNDERSIZED",
                if below_min {
                    Severity::Err
                } else {
                    Severity::Warn
                },
                format!("{} pool(s) cannot place all copies", short.len()),
                short,
            ));
        }
        checks
    }

    /// OSD_FULL, OSD_BACKFILLFULL, OSD_NEARFULL (each OSD once, under its fullest state,
    /// with its use) and POOL_FULL, as Ceph names them.
    fn fullness_checks(&self) -> Vec<HealthCheck> {
        let r = &self.full_ratios;
        let mut checks = Vec::new();
        for (level, code, severity, ratio, what) in [
            (
                Fullness::Full,
                "OSD_FULL",
                Severity::Err,
                r.full,
                "the pools they serve take no new writes; delete data (`basalt rbd rm`, \
                 `basalt rbd resize --allow-shrink`, `basalt obj rm`), add OSDs, or raise \
                 `basalt osd set-full-ratio`",
            ),
            (
                Fullness::Backfillfull,
                "OSD_BACKFILLFULL",
                Severity::Warn,
                r.backfillfull,
                "backfill and recovery will not copy data to them",
            ),
            (
                Fullness::Nearfull,
                "OSD_NEARFULL",
                Severity::Warn,
                r.nearfull,
                "add capacity or delete data before they fill",
            ),
        ] {
            let detail: Vec<String> = self
                .osds_at_least(level)
                .into_iter()
                .filter(|(id, _)| self.fullness(*id) == level)
                .map(|(id, u)| {
                    format!(
                        "osd.{id} is {} at {} ({} of {} bytes; {} ratio {})",
                        level.name(),
                        u.percent_str(),
                        u.used_bytes,
                        u.total_bytes,
                        level.name(),
                        ratio_str(ratio)
                    )
                })
                .collect();
            if !detail.is_empty() {
                checks.push(HealthCheck::new(
                    code,
                    severity,
                    format!("{} {} osd(s): {what}", detail.len(), level.name()),
                    detail,
                ));
            }
        }
        let full_pools: Vec<String> = self
            .pools
            .values()
            .filter(|p| self.is_pool_full(p.id))
            .map(|p| {
                format!(
                    "pool '{}' is full: new writes fail with ENOSPC; deletes, truncates and \
                     shrinks still work",
                    p.name
                )
            })
            .collect();
        if !full_pools.is_empty() {
            checks.push(HealthCheck::new(
                "POOL_FULL",
                Severity::Warn,
                format!("{} pool(s) full", full_pools.len()),
                full_pools,
            ));
        }
        checks
    }
}

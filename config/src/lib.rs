//! `cluster.toml`: the one configuration format shared by every daemon and client.
//!
//! Owns parsing, defaults and validation of the file; nothing here does IO
//! beyond reading it. Durations are plain integers with their unit in the key
//! name (`lease_ms`, `down_out_interval_secs`) so the file needs no duration grammar.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for basalt: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A whole `cluster.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    /// The initial monmap: one entry per monitor, ranks 0..n.
    #[serde(rename = "mon")]
    pub mons: Vec<MonEntry>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub paxos: PaxosTuning,
    #[serde(default)]
    pub client: ClientSection,
    #[serde(default)]
    pub osd: OsdTuning,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub tls: TlsSection,
}

/// Authentication (README "Authentication"). There is no switch to turn it off: every
/// daemon and client authenticates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// How long a ticket the monitors grant is valid (Ceph's `auth_service_ticket_ttl`);
    /// clients renew theirs at two thirds of it. The services' rotating secrets change every
    /// this long too.
    pub ticket_ttl_secs: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            ticket_ttl_secs: 3600,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default = "default_name")]
    pub name: String,
    /// Cluster identity; daemons drop messages carrying another fsid.
    pub fsid: String,
}

fn default_name() -> String {
    "basalt".to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MonEntry {
    /// Rank: lower ranks are preferred as leader.
    pub rank: u32,
    /// Address other monitors, OSDs and clients dial.
    pub addr: SocketAddr,
    /// Monitor store directory; `basalt-mon --data` overrides it.
    #[serde(default)]
    pub data: Option<PathBuf>,
}

/// Failure-detection and consensus timing. Defaults follow Ceph; tests shrink them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// `mon_election_timeout`: how long an election collects acks before a majority wins.
    pub election_timeout_ms: u64,
    /// `mon_lease`: how long a peon may serve reads after a lease.
    pub lease_ms: u64,
    /// How often the leader batches pending map changes into one proposal.
    pub propose_interval_ms: u64,
    /// How often an OSD sends a beacon to the monitors.
    pub osd_beacon_interval_ms: u64,
    /// An OSD whose beacons stop for this long is marked down.
    pub osd_beacon_grace_ms: u64,
    /// How often an OSD pings each heartbeat peer (Ceph's `osd_heartbeat_interval`). A peer
    /// that refuses or resets the connection is reported at once, so this bounds how long a
    /// killed OSD goes unnoticed.
    pub osd_heartbeat_interval_ms: u64,
    /// Peer heartbeat grace between OSDs before they report a silent (frozen, cut off) peer.
    pub osd_heartbeat_grace_ms: u64,
    /// Distinct reporters (on distinct hosts) needed to mark an OSD down.
    pub min_down_reporters: u32,
    /// `mon_osd_down_out_interval`: a down OSD is marked out after this long.
    pub down_out_interval_secs: u64,
    /// How long a monitor request (or a CLI command) may wait, e.g. for quorum, before it fails.
    pub client_op_timeout_ms: u64,
    /// How long an object operation may wait for its PG (Ceph's `rados_osd_op_timeout`):
    /// 0, the default, waits through peering and failures as long as it takes, resending with
    /// the same request id; a block device must never see a transient cluster state as EIO.
    pub osd_op_timeout_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            election_timeout_ms: 5_000,
            lease_ms: 5_000,
            propose_interval_ms: 100,
            osd_beacon_interval_ms: 2_000,
            osd_beacon_grace_ms: 20_000,
            osd_heartbeat_interval_ms: 1_000,
            // Ceph's 20 s is sized for big clusters with busy networks; a frozen OSD stalls
            // its PGs' I/O for this long. See ARCHITECTURE.md (failure path) for the choice.
            osd_heartbeat_grace_ms: 6_000,
            min_down_reporters: 2,
            down_out_interval_secs: 600,
            client_op_timeout_ms: 30_000,
            osd_op_timeout_ms: 0,
        }
    }
}

/// History kept by the monitors (Ceph's paxos_min, paxos_trim_min/max, full map interval).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PaxosTuning {
    pub keep_versions: u64,
    pub trim_min: u64,
    pub trim_max: u64,
    /// A full OSDMap is stored every this many epochs beside the incrementals.
    pub full_map_interval: u64,
    /// OSDMap epochs kept for subscribers before older ones are trimmed.
    pub keep_epochs: u64,
}

impl Default for PaxosTuning {
    fn default() -> Self {
        PaxosTuning {
            keep_versions: 500,
            trim_min: 250,
            trim_max: 500,
            full_map_interval: 25,
            keep_epochs: 500,
        }
    }
}

/// OSD behaviour; each key has the meaning of the Ceph option named beside it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OsdTuning {
    /// `osd_max_pg_log_entries`: log entries kept per PG. A copy that fell further behind
    /// than this is backfilled (object by object) instead of recovered from the log.
    pub pg_log_entries: u64,
    /// `osd_scrub_min_interval`: every PG is scrubbed (metadata) this often; 0 = on demand only.
    pub scrub_interval_secs: u64,
    /// `osd_deep_scrub_interval`: every PG is deep-scrubbed (checksums) this often; 0 = on
    /// demand only.
    pub deep_scrub_interval_secs: u64,
    /// `osd_scrub_auto_repair`: scheduled scrubs repair what they find from a good copy.
    pub scrub_auto_repair: bool,
    /// `osd_recovery_max_active`: PGs this OSD recovers or backfills at once as primary.
    pub recovery_max_active: u32,
    /// `osd_recovery_sleep`: pause between recovery pushes, leaving the disk and network to
    /// client I/O (0 = none).
    pub recovery_sleep_ms: u64,
}

impl Default for OsdTuning {
    fn default() -> Self {
        OsdTuning {
            pg_log_entries: 3000,
            scrub_interval_secs: 24 * 3600,
            deep_scrub_interval_secs: 7 * 24 * 3600,
            scrub_auto_repair: false,
            recovery_max_active: 3,
            recovery_sleep_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// The entity name (`client.<id>`) the clients on this machine connect as. Each client
    /// process is an instance `<name>/<nonce>` (random nonce): image locks name the instance
    /// as their holder, and a lock breaker blocklists only that instance, so a restarted
    /// process under the same name serves at once; `osd blocklist add <name>` fences every
    /// instance. Unset, each client process picks a random `client.<16 hex>`;
    /// `basalt-gw --name` overrides it.
    pub name: Option<String>,
    /// The keyring holding this client's key (`basalt --keyring` overrides it). Unset: the
    /// file `keyring` beside the config file, if there is one. A relative path is taken
    /// relative to the config file's directory.
    pub keyring: Option<PathBuf>,
}

/// Encryption in transit (`[tls]`): every connection to a monitor or an OSD (gRPC and the
/// data-path messenger) is TLS unless `enabled = false`, and servers are verified against
/// the cluster CA. Relative paths are relative to the config file's directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// On by default; every daemon and client of a cluster must agree.
    pub enabled: bool,
    /// The cluster CA certificate (PEM) every server is verified against. Default
    /// `tls/ca-cert.pem` beside the config file.
    pub ca_file: Option<PathBuf>,
    /// This host's daemon certificate and key (PEM), served by its monitors and OSDs;
    /// `--tls-cert` / `--tls-key` override them per daemon.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            enabled: true,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// Where `[tls] ca_file` points when unset, relative to the config file's directory.
pub const DEFAULT_CA_FILE: &str = "tls/ca-cert.pem";

impl TlsSection {
    /// The CA file (the default one when unset).
    pub fn ca_path(&self) -> PathBuf {
        self.ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CA_FILE))
    }

    /// Makes the section's paths absolute against `dir` (the config file's directory) and
    /// fills in the default CA file.
    pub fn resolve(&mut self, dir: &Path) {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        self.ca_file = Some(abs(&self.ca_path()));
        self.cert_file = self.cert_file.as_deref().map(abs);
        self.key_file = self.key_file.as_deref().map(abs);
    }
}

impl ClusterConfig {
    /// Reads and validates a config file; `[tls]` paths come back absolute.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        config.client.keyring = match config.client.keyring.take() {
            Some(k) if k.is_relative() => Some(dir.join(k)),
            Some(k) => Some(k),
            None => Some(dir.join("keyring")).filter(|k| k.exists()),
        };
        config.tls.resolve(&dir);
        Ok(config)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.cluster.fsid.trim().is_empty() {
            return Err("[cluster] fsid must not be empty".into());
        }
        if self.mons.is_empty() {
            return Err("at least one [[mon]] entry is needed".into());
        }
        let ranks: BTreeSet<u32> = self.mons.iter().map(|m| m.rank).collect();
        if ranks.len() != self.mons.len() {
            return Err("two [[mon]] entries share a rank; ranks must be unique".into());
        }
        if ranks.iter().copied().ne(0..self.mons.len() as u32) {
            return Err(format!(
                "[[mon]] ranks must be 0..{} without gaps, found {:?}",
                self.mons.len(),
                ranks
            ));
        }
        let addrs: BTreeSet<SocketAddr> = self.mons.iter().map(|m| m.addr).collect();
        if addrs.len() != self.mons.len() {
            return Err("two [[mon]] entries share an address".into());
        }
        let t = &self.timeouts;
        for (name, v) in [
            ("election_timeout_ms", t.election_timeout_ms),
            ("lease_ms", t.lease_ms),
            ("propose_interval_ms", t.propose_interval_ms),
            ("osd_beacon_interval_ms", t.osd_beacon_interval_ms),
            ("osd_beacon_grace_ms", t.osd_beacon_grace_ms),
            ("osd_heartbeat_interval_ms", t.osd_heartbeat_interval_ms),
            ("osd_heartbeat_grace_ms", t.osd_heartbeat_grace_ms),
            ("client_op_timeout_ms", t.client_op_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("[timeouts] {name} must be greater than 0"));
            }
        }
        if t.osd_beacon_grace_ms <= t.osd_beacon_interval_ms {
            return Err("[timeouts] osd_beacon_grace_ms must exceed osd_beacon_interval_ms".into());
        }
        if t.osd_heartbeat_grace_ms <= t.osd_heartbeat_interval_ms {
            return Err(
                "[timeouts] osd_heartbeat_grace_ms must exceed osd_heartbeat_interval_ms".into(),
            );
        }
        if self.paxos.full_map_interval == 0 || self.paxos.keep_epochs == 0 {
            return Err("[paxos] full_map_interval and keep_epochs must be greater than 0".into());
        }
        if self.osd.pg_log_entries < 10 {
            return Err("[osd] pg_log_entries must be at least 10".into());
        }
        if self.auth.ticket_ttl_secs < 2 {
            return Err("[auth] ticket_ttl_secs must be at least 2".into());
        }
        if self.osd.recovery_max_active == 0 {
            return Err("[osd] recovery_max_active must be at least 1".into());
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err("[tls] cert_file and key_file go together: set both or neither".into());
        }
        if let Some(name) = &self.client.name {
            let id = name.strip_prefix("client.").unwrap_or_default();
            if id.is_empty()
                || name.len() > 256
                || name.chars().any(|c| c.is_whitespace() || c == '/')
            {
                return Err(format!(
                    "[client] name must be client.<id> (at most 256 bytes, no spaces or '/'), got {name:?}"
                ));
            }
        }
        Ok(())
    }

    /// The monitor entry with this rank.
    pub fn mon(&self, rank: u32) -> Option<&MonEntry> {
        self.mons.iter().find(|m| m.rank == rank)
    }

    /// Renders the config back to TOML (used by `basalt cluster up` to write one).
    pub fn to_toml(&self) -> String {
        // Serializing plain data structs into TOML cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
fsid = "6f1c1f2e-0000-4000-8000-000000000001"

[[mon]]
rank = 0
addr = "127.0.0.1:6789"

[[mon]]
rank = 1
addr = "127.0.0.1:6790"

[[mon]]
rank = 2
addr = "127.0.0.1:6791"

[timeouts]
lease_ms = 1000
"#;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn parses_with_defaults() {
        let c = parse(GOOD).expect("valid config");
        assert_eq!(c.mons.len(), 3);
        assert_eq!(c.timeouts.lease_ms, 1000);
        assert_eq!(c.timeouts.down_out_interval_secs, 600);
        assert_eq!(
            c.timeouts.osd_op_timeout_ms, 0,
            "object ops wait as long as it takes"
        );
        assert_eq!(c.cluster.name, "basalt");
        assert_eq!(c.client.name, None);
        assert!(c.tls.enabled, "TLS is on by default");
        assert_eq!(c.tls.ca_path(), PathBuf::from(DEFAULT_CA_FILE));
        let named = parse(&format!("{GOOD}\n[client]\nname = \"client.admin\"\n"))
            .expect("valid [client] name");
        assert_eq!(named.client.name.as_deref(), Some("client.admin"));
        let again = parse(&c.to_toml()).expect("round trip");
        assert_eq!(again, c);
    }

    #[test]
    fn tls_paths_resolve_against_the_config_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.toml");
        let text =
            format!("{GOOD}\n[tls]\ncert_file = \"tls/h1.pem\"\nkey_file = \"/etc/k.pem\"\n");
        std::fs::write(&path, text).expect("write");
        let c = ClusterConfig::load(&path).expect("load");
        assert_eq!(c.tls.ca_file, Some(dir.path().join(DEFAULT_CA_FILE)));
        assert_eq!(c.tls.cert_file, Some(dir.path().join("tls/h1.pem")));
        assert_eq!(c.tls.key_file, Some(PathBuf::from("/etc/k.pem")));
    }

    #[test]
    fn rejects_bad_files_with_clear_messages() {
        let cases = [
            ("[cluster\nfsid=1", "not valid TOML"),
            (&GOOD.replace("rank = 2", "rank = 1"), "share a rank"),
            (&GOOD.replace("rank = 2", "rank = 7"), "without gaps"),
            (&GOOD.replace("6791", "6790"), "share an address"),
            (
                &GOOD.replace("lease_ms = 1000", "lease_ms = 0"),
                "lease_ms must be",
            ),
            (&GOOD.replace("lease_ms", "leese_ms"), "unknown field"),
            (
                &format!("{GOOD}\n[client]\nname = \"gw1\"\n"),
                "[client] name must be client.<id>",
            ),
            (
                &format!("{GOOD}\n[client]\nname = \"client.gw/1\"\n"),
                "no spaces or '/'",
            ),
            (
                &GOOD.replace("lease_ms = 1000", "osd_heartbeat_grace_ms = 500"),
                "osd_heartbeat_grace_ms must exceed",
            ),
            ("[cluster]\nfsid = \"x\"\n", "mon"),
            (
                &format!("{GOOD}\n[tls]\ncert_file = \"a.pem\"\n"),
                "cert_file and key_file go together",
            ),
            (
                &GOOD.replace("127.0.0.1:6789", "not-an-addr"),
                "not valid TOML",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(needle).to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.contains("test.toml"), "{err:?} should name the file");
        }
    }
}

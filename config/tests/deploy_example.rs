//! `deploy/cluster.toml.example` stays a valid config: three monitors, and the `[timeouts]`
//! and `[paxos]` values it documents as the defaults are the defaults.

use std::path::Path;

use basalt_config::{ClusterConfig, PaxosTuning, Timeouts};

#[test]
fn deploy_example_parses_and_shows_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster.toml.example");
    let c = ClusterConfig::load(&path).expect("deploy/cluster.toml.example is a valid config");
    assert_eq!(c.mons.len(), 3);
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.paxos, PaxosTuning::default());
}

//! `deploy/cluster.toml.example` stays a valid config: three monitors, and the `[timeouts]`,
//! `[paxos]` and `[osd]` values it documents as the defaults are the defaults.

use std::path::PathBuf;

use basalt_config::{ClusterConfig, OsdTuning, PaxosTuning, Timeouts};

#[test]
fn deploy_example_parses_and_shows_the_defaults() {
    // The crate dir at run time (cargo sets it for `cargo test`): one test binary serves
    // every checkout of the same sources sharing a target dir, so the compile-time path may
    // name another checkout.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let path = dir.join("../deploy/cluster.toml.example");
    let c = ClusterConfig::load(&path).expect("deploy/cluster.toml.example is a valid config");
    assert_eq!(c.mons.len(), 3);
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.paxos, PaxosTuning::default());
    assert_eq!(c.osd, OsdTuning::default());
}

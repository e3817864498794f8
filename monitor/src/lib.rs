//! `basalt-mon`: a monitor of the cluster map.
//!
//! Owns the cluster map's durability and agreement: 1, 3 or 5 monitors with
//! fixed ranks run the sans-IO Paxos core from `basalt-paxos` (election,
//! leases, one value in flight), persist every step in RocksDB before acting on
//! it, and serve the maps over gRPC. The leader batches map changes from
//! commands, OSD boots, beacons and failure reports into one OSDMap
//! incremental per Paxos version; peons forward mutations to it and answer
//! reads only under a valid lease.
//!
//! Modules: [`node`] is the single state owner (`select` → `apply` loop),
//! [`service`] the pure OSDMap policy, [`auth`] the auth database's commands (keys and
//! caps, committed through Paxos like the map), [`gate`] authentication on the wire (the
//! services' rotating secrets, handshakes, this monitor's own ticket), [`store`] the durable
//! state, [`server`] the gRPC front (every request authenticated, caps checked), [`peers`]
//! the outbound consensus traffic.

pub mod auth;
pub mod gate;
pub mod node;
pub mod peers;
pub mod server;
pub mod service;
pub mod store;

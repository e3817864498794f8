//! `basalt-auth`: who may talk to a basalt cluster, and what they may do.
//!
//! Owns the pieces of cephx-style authentication that are pure data and logic, so every
//! daemon and the CLI share one definition and they are tested without IO:
//!
//! - [`EntityName`]: `client.*`, `osd.N`, `mon.*`, `gw.*`.
//! - [`Secret`]: a 256-bit shared key, base64 in files and on the CLI, zeroed on drop,
//!   compared in constant time.
//! - [`Keyring`]: the INI-like keyring files (`[client.admin]\n key = ...`) kept on hosts.
//! - [`caps`]: capability strings (`mon 'allow r'`, `osd 'allow rw pool=rbd'`), parsed into
//!   grants and checked against what a request needs.
//! - [`AuthDb`]: the monitors' database of entities, keys and caps, changed only by
//!   [`AuthChange`]s committed through Paxos (a total, deterministic `apply`, as the OSDMap's),
//!   including each service's rotating secrets, random and made by the leader.
//!
//! - [`handshake`]: the protocol core, sans-IO: HMAC-SHA256 challenge–response (mutual),
//!   tickets sealed with rotating service secrets (ChaCha20-Poly1305), and authorizers with
//!   a replay window. Randomness and time are inputs; unit tests cover wrong keys, replay,
//!   expiry and forgery.
//!
//! - [`live`]: the thin std-only drivers every daemon and client shares around that core: the
//!   wall clock and randomness, a client's current ticket per service ([`TicketCell`]), a
//!   service's [`Guard`] (secrets + replay memory) and [`Authenticated`] peers with the cap
//!   checks that refuse with a typed [`PermissionDenied`]. The transports carry it:
//!   `basalt-proto::auth` (gRPC metadata) and `basalt-messenger` (an exchange when a
//!   connection opens).

pub mod caps;
mod db;
mod entity;
pub mod handshake;
mod key;
mod keyring;
pub mod live;

pub use caps::{Caps, CapsError, MonAccess, MonCap, OsdCap, Perm};
pub use db::{AuthChange, AuthDb, AuthEntry, ROTATING_SECRETS_KEPT};
pub use entity::{EntityError, EntityName, EntityType};
pub use key::{Secret, SecretError};
pub use keyring::{Keyring, KeyringEntry, KeyringError};
pub use live::{Authenticated, Guard, PermissionDenied, TicketCell};

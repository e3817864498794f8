//! `basalt auth ...`: the monitors' auth database (keys and caps), as Ceph's `ceph auth`.
//!
//! Plain output is keyring text (what a host's keyring file holds), JSON the same entries
//! as objects; `-o FILE` writes the keyring to FILE (mode 0600) instead of printing it.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use basalt_auth::{Caps, EntityName, Keyring, Secret};
use basalt_client::MonClient;
use basalt_proto::mon::{auth_request::Command, AuthAdd, AuthEntityCaps, AuthLs, AuthReply};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum AuthCmd {
    /// Create ENTITY with caps, e.g. `auth add client.ro mon 'allow r' osd 'allow r pool=rbd'`;
    /// a fresh key unless -i names a keyring holding one. Refused if ENTITY exists otherwise.
    Add {
        entity: String,
        /// Caps as SERVICE 'CAP' pairs.
        caps: Vec<String>,
        /// Keyring file holding ENTITY's key, to register that key instead of a new one.
        #[arg(short = 'i', long = "import")]
        import: Option<PathBuf>,
        /// Write the entity's keyring here (mode 0600) instead of printing it.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// ENTITY's key, created with CAPS if it does not exist (refused if it exists with other caps).
    GetOrCreate {
        entity: String,
        caps: Vec<String>,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// ENTITY's key and caps.
    Get {
        entity: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Every entity with its key and caps.
    Ls,
    /// Remove ENTITY.
    Rm { entity: String },
    /// Replace ENTITY's caps with CAPS (every service's: a service left out loses its cap).
    Caps { entity: String, caps: Vec<String> },
}

fn caps_map(words: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let caps = Caps::from_pairs(words)?;
    Ok(caps
        .iter()
        .map(|(s, c)| (s.to_string(), c.to_string()))
        .collect())
}

fn entity(text: &str) -> anyhow::Result<EntityName> {
    Ok(text.parse()?)
}

/// The reply's entities as a keyring.
fn keyring_of(reply: &AuthReply) -> anyhow::Result<Keyring> {
    let mut k = Keyring::new();
    for e in &reply.entities {
        let mut pairs: Vec<(&String, &String)> = e.caps.iter().collect();
        pairs.sort();
        let words: Vec<&str> = pairs
            .into_iter()
            .flat_map(|(s, c)| [s.as_str(), c.as_str()])
            .collect();
        k.insert(
            entity(&e.entity)?,
            Secret::from_base64(&e.key)
                .with_context(|| format!("the monitors sent a bad key for {}", e.entity))?,
            Caps::from_pairs(&words)?,
        );
    }
    Ok(k)
}

fn show(reply: &AuthReply, json: bool, output: Option<PathBuf>) -> anyhow::Result<()> {
    let keyring = keyring_of(reply)?;
    if let Some(path) = output {
        keyring
            .save(&path)
            .with_context(|| format!("cannot write the keyring {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    if json {
        let entries: Vec<_> = reply
            .entities
            .iter()
            .map(|e| {
                let caps: std::collections::BTreeMap<_, _> = e.caps.iter().collect();
                serde_json::json!({"entity": e.entity, "key": e.key, "caps": caps})
            })
            .collect();
        crate::print_json(serde_json::json!({"version": reply.version, "entities": entries}));
    } else {
        print!("{}", keyring.to_text());
    }
    Ok(())
}

pub async fn run(mon: &MonClient, json: bool, cmd: AuthCmd) -> anyhow::Result<()> {
    match cmd {
        AuthCmd::Add {
            entity: name,
            caps,
            import,
            output,
        } => {
            let e = entity(&name)?;
            let key = match import {
                Some(path) => {
                    let k = Keyring::load(&path)
                        .with_context(|| format!("cannot read the keyring {}", path.display()))?;
                    k.key(&e)?.to_base64()
                }
                None => String::new(),
            };
            let reply = mon
                .auth(Command::Add(AuthAdd {
                    entity: e.to_string(),
                    key,
                    caps: caps_map(&caps)?,
                }))
                .await?;
            show(&reply, json, output)
        }
        AuthCmd::GetOrCreate {
            entity: name,
            caps,
            output,
        } => {
            let reply = mon
                .auth(Command::GetOrCreate(AuthEntityCaps {
                    entity: entity(&name)?.to_string(),
                    caps: caps_map(&caps)?,
                }))
                .await?;
            show(&reply, json, output)
        }
        AuthCmd::Get {
            entity: name,
            output,
        } => {
            let reply = mon.auth(Command::Get(entity(&name)?.to_string())).await?;
            show(&reply, json, output)
        }
        AuthCmd::Ls => {
            let reply = mon.auth(Command::Ls(AuthLs {})).await?;
            show(&reply, json, None)
        }
        AuthCmd::Rm { entity: name } => {
            let reply = mon.auth(Command::Rm(entity(&name)?.to_string())).await?;
            if json {
                crate::print_json(
                    serde_json::json!({"removed": reply.entity, "version": reply.version}),
                );
            } else {
                println!("{}", reply.message);
            }
            Ok(())
        }
        AuthCmd::Caps { entity: name, caps } => {
            if caps.is_empty() {
                bail!("give the new caps as SERVICE 'CAP' pairs (e.g. mon 'allow r')");
            }
            let reply = mon
                .auth(Command::Caps(AuthEntityCaps {
                    entity: entity(&name)?.to_string(),
                    caps: caps_map(&caps)?,
                }))
                .await?;
            show(&reply, json, None)
        }
    }
}

/// Keyring files on this host, without the monitors (Ceph's `ceph-authtool`): how the first
/// keys of a cluster are made before any monitor runs.
#[derive(Subcommand, Debug)]
pub enum KeyringCmd {
    /// Add a fresh random key for ENTITY with CAPS to FILE (created, mode 0600, if missing);
    /// refused if FILE already holds ENTITY.
    Gen {
        file: PathBuf,
        entity: String,
        /// Caps as SERVICE 'CAP' pairs.
        caps: Vec<String>,
    },
}

pub fn run_keyring(cmd: KeyringCmd) -> anyhow::Result<()> {
    match cmd {
        KeyringCmd::Gen {
            file,
            entity: name,
            caps,
        } => {
            let e = entity(&name)?;
            let caps = Caps::from_pairs(&caps)?;
            let mut ring = if file.exists() {
                Keyring::load(&file)
                    .with_context(|| format!("cannot read the keyring {}", file.display()))?
            } else {
                Keyring::new()
            };
            if ring.get(&e).is_some() {
                bail!(
                    "{} already holds {e}; remove its section first to make a new key",
                    file.display()
                );
            }
            ring.insert(e.clone(), Secret::generate()?, caps);
            ring.save(&file)
                .with_context(|| format!("cannot write the keyring {}", file.display()))?;
            eprintln!("added a new key for {e} to {}", file.display());
            Ok(())
        }
    }
}

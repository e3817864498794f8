//! `basalt obj ...`: rados-like object commands over `basalt_client::IoCtx`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use basalt_client::{IoCtx, Rados};
use bytes::Bytes;
use clap::Subcommand;
use serde_json::json;

/// Bytes moved per request by put/get: big objects travel in pieces.
const PIECE: u64 = 8 * 1024 * 1024;

#[derive(Subcommand, Debug)]
pub enum ObjCmd {
    /// Store FILE (`-` = stdin) as object NAME.
    Put {
        pool: String,
        name: String,
        file: PathBuf,
    },
    /// Write object NAME to FILE (`-` = stdout).
    Get {
        pool: String,
        name: String,
        file: PathBuf,
    },
    /// Remove an object.
    Rm {
        pool: String,
        name: String,
    },
    /// Size, mtime and version of an object.
    Stat {
        pool: String,
        name: String,
    },
    /// List the pool's objects.
    Ls {
        pool: String,
    },
    Setxattr {
        pool: String,
        name: String,
        key: String,
        value: String,
    },
    Getxattr {
        pool: String,
        name: String,
        key: String,
    },
    Listxattr {
        pool: String,
        name: String,
    },
    /// Set one omap key.
    OmapSet {
        pool: String,
        name: String,
        key: String,
        value: String,
    },
    /// Print one omap value.
    OmapGet {
        pool: String,
        name: String,
        key: String,
    },
    /// List omap keys and values.
    OmapLs {
        pool: String,
        name: String,
    },
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn run(rados: &Rados, json: bool, cmd: ObjCmd) -> anyhow::Result<()> {
    let io = |pool: &str| -> anyhow::Result<IoCtx> { Ok(rados.ioctx(pool)?) };
    match cmd {
        ObjCmd::Put { pool, name, file } => {
            let data = if file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut v)
                    .context("reading stdin")?;
                v
            } else {
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let io = io(&pool)?;
            let data = Bytes::from(data);
            let first = data.len().min(PIECE as usize);
            io.write_full(&name, data.slice(..first)).await?;
            let mut off = first;
            while off < data.len() {
                let end = (off + PIECE as usize).min(data.len());
                io.write(&name, off as u64, data.slice(off..end)).await?;
                off = end;
            }
            eprintln!("wrote {} bytes to {pool}/{name}", data.len());
        }
        ObjCmd::Get { pool, name, file } => {
            let io = io(&pool)?;
            let size = io.stat(&name).await?.size;
            let mut out: Box<dyn Write> = if file.as_os_str() == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(
                    std::fs::File::create(&file)
                        .with_context(|| format!("creating {}", file.display()))?,
                )
            };
            let mut off = 0;
            while off < size {
                let piece = io.read(&name, off, PIECE.min(size - off)).await?;
                if piece.is_empty() {
                    bail!("{pool}/{name} shrank while being read");
                }
                out.write_all(&piece).context("writing output")?;
                off += piece.len() as u64;
            }
            out.flush().context("writing output")?;
        }
        ObjCmd::Rm { pool, name } => io(&pool)?.remove(&name).await?,
        ObjCmd::Stat { pool, name } => {
            let st = io(&pool)?.stat(&name).await?;
            if json {
                crate::print_json(json!({
                    "pool": pool, "name": name, "size": st.size,
                    "mtime_ns": st.mtime_ns, "version": st.version.to_string(),
                }));
            } else {
                println!(
                    "{pool}/{name} size {} mtime_ns {} version {}",
                    st.size, st.mtime_ns, st.version
                );
            }
        }
        ObjCmd::Ls { pool } => {
            let mut names = io(&pool)?.list_objects().await?;
            names.sort();
            if json {
                crate::print_json(json!(names));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        ObjCmd::Setxattr {
            pool,
            name,
            key,
            value,
        } => io(&pool)?.setxattr(&name, &key, Bytes::from(value)).await?,
        ObjCmd::Getxattr { pool, name, key } => match io(&pool)?.getxattr(&name, &key).await? {
            Some(v) => println!("{}", show(&v)),
            None => bail!("{pool}/{name} has no xattr {key}"),
        },
        ObjCmd::Listxattr { pool, name } => {
            let all = io(&pool)?.getxattrs(&name).await?;
            if json {
                let m: serde_json::Map<String, serde_json::Value> = all
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(show(v))))
                    .collect();
                crate::print_json(serde_json::Value::Object(m));
            } else {
                for k in all.keys() {
                    println!("{k}");
                }
            }
        }
        ObjCmd::OmapSet {
            pool,
            name,
            key,
            value,
        } => {
            let io = io(&pool)?;
            // rados setomapval creates the object.
            io.create(&name, false).await?;
            io.omap_set(&name, vec![(Bytes::from(key), Bytes::from(value))])
                .await?
        }
        ObjCmd::OmapGet { pool, name, key } => {
            let v = io(&pool)?
                .omap_get_vals_by_keys(&name, &[key.as_bytes()])
                .await?;
            match v.first() {
                Some((_, v)) => println!("{}", show(v)),
                None => bail!("{pool}/{name} has no omap key {key}"),
            }
        }
        ObjCmd::OmapLs { pool, name } => {
            let io = io(&pool)?;
            let mut all = Vec::new();
            let mut after: Option<Bytes> = None;
            loop {
                let (page, more) = io.omap_get_vals(&name, after.as_deref(), 1000).await?;
                after = page.last().map(|(k, _)| k.clone());
                all.extend(page);
                if !more || after.is_none() {
                    break;
                }
            }
            if json {
                let m: serde_json::Map<String, serde_json::Value> =
                    all.iter().map(|(k, v)| (show(k), json!(show(v)))).collect();
                crate::print_json(serde_json::Value::Object(m));
            } else {
                for (k, v) in all {
                    println!("{}\t{}", show(&k), show(&v));
                }
            }
        }
    }
    Ok(())
}

//! `basalt rbd ...`: rbd-tool-like image commands over `basalt_rbd::Rbd`.
//!
//! Arguments are checked before the cluster is contacted, so a typo fails at once. Sizes take
//! binary suffixes (`512K`, `4M`, `10G`, `1T`; `4MiB` too) or plain bytes — note that, unlike
//! Ceph's `rbd`, a bare number is bytes, not MiB.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use basalt_client::{Rados, DEFAULT_WATCH_TIMEOUT};
use basalt_config::ClusterConfig;
use basalt_rbd::{layout, ImageInfo, RadosBackend, Rbd, RbdError};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// Object sizes an image may have: 2^12 (4 KiB) ..= 2^25 (32 MiB).
const MIN_ORDER: u8 = 12;
const MAX_ORDER: u8 = 25;

#[derive(Subcommand, Debug)]
pub enum RbdCmd {
    /// Create a thin image (no data objects until written).
    Create {
        /// POOL/IMAGE
        spec: String,
        /// Image size: 10G, 512M, 4096K or bytes.
        #[arg(long)]
        size: String,
        /// Object size, a power of two from 4K to 32M (default 4M).
        #[arg(long)]
        object_size: Option<String>,
    },
    /// List a pool's images.
    Ls { pool: String },
    /// Size, object size and layout of an image.
    Info {
        /// POOL/IMAGE
        spec: String,
    },
    /// Grow or shrink an image (shrinking needs --allow-shrink: it discards data).
    Resize {
        /// POOL/IMAGE
        spec: String,
        #[arg(long)]
        size: String,
        /// Permit making the image smaller (the data past the new end is lost).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Remove an image and its data.
    Rm {
        /// POOL/IMAGE
        spec: String,
    },
    /// Rename an image within its pool.
    Rename {
        /// POOL/IMAGE
        spec: String,
        /// The new name (NAME or POOL/NAME with the same pool).
        new_name: String,
    },
    /// Create POOL/IMAGE from FILE (`-` = stdin, read into memory first); zero blocks stay holes.
    Import {
        file: PathBuf,
        /// POOL/IMAGE
        spec: String,
        /// Object size, a power of two from 4K to 32M (default 4M).
        #[arg(long)]
        object_size: Option<String>,
    },
    /// Write an image to FILE (a new file; holes stay sparse).
    Export {
        /// POOL/IMAGE
        spec: String,
        file: PathBuf,
    },
    /// Snapshots of an image: create, ls, rm, rollback, protect, unprotect, purge.
    #[command(subcommand)]
    Snap(SnapCmd),
    /// Create CHILD as a copy-on-write clone of a protected snapshot (instant; the child
    /// reads the snapshot until it writes).
    Clone {
        /// POOL/IMAGE@SNAP (protected)
        parent: String,
        /// POOL/CHILD
        child: String,
    },
    /// Copy every block a clone still reads from its parent into it, and unlink it.
    Flatten {
        /// POOL/IMAGE
        spec: String,
    },
    /// List the clones of a snapshot.
    Children {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    /// Write what changed between two snapshots (or since nothing) to FILE (`-`: stdout),
    /// in Ceph's "rbd diff v1" format.
    ExportDiff {
        /// The older snapshot (default: a full diff of the data).
        #[arg(long)]
        from_snap: Option<String>,
        /// POOL/IMAGE@SNAP, or POOL/IMAGE for the head.
        spec: String,
        file: PathBuf,
    },
    /// Apply a diff from FILE (`-`: stdin) to POOL/IMAGE, which must have the diff's start
    /// snapshot; the diff's end snapshot is created on it.
    ImportDiff {
        file: PathBuf,
        /// POOL/IMAGE
        spec: String,
    },
    /// The trash: mv, ls, restore, rm, purge.
    #[command(subcommand)]
    Trash(TrashCmd),
    /// Space used by an image and each of its snapshots (or by every image of a pool),
    /// from the object maps.
    Du {
        /// POOL or POOL/IMAGE
        spec: String,
    },
    /// The object map: rebuild.
    #[command(subcommand)]
    ObjectMap(ObjectMapCmd),
    /// Turn image features on or off (object-map and fast-diff, together).
    #[command(subcommand)]
    Feature(FeatureCmd),
}

#[derive(Subcommand, Debug)]
pub enum ObjectMapCmd {
    /// Recompute the object maps of an image and its snapshots from the objects, and clear
    /// the invalid flag.
    Rebuild {
        /// POOL/IMAGE
        spec: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum FeatureCmd {
    /// Enable features: object-map fast-diff (builds the maps).
    Enable {
        /// POOL/IMAGE
        spec: String,
        #[arg(required = true)]
        features: Vec<String>,
    },
    /// Disable features: object-map fast-diff (removes the maps).
    Disable {
        /// POOL/IMAGE
        spec: String,
        #[arg(required = true)]
        features: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TrashCmd {
    /// Move an image to the trash (its name is freed; its data stays until removed).
    Mv {
        /// POOL/IMAGE
        spec: String,
        /// Keep it restorable for at least this many seconds (`trash rm` needs --force
        /// before then, and `trash purge` leaves it).
        #[arg(long, default_value_t = 0)]
        delay: u64,
    },
    /// List the trashed images of a pool.
    Ls { pool: String },
    /// Bring a trashed image back.
    Restore {
        /// POOL/ID (the id `trash ls` shows)
        spec: String,
        /// Restore under this name instead of the old one.
        #[arg(long)]
        image: Option<String>,
    },
    /// Delete a trashed image for good.
    Rm {
        /// POOL/ID
        spec: String,
        /// Even before its delay ends.
        #[arg(long)]
        force: bool,
    },
    /// Delete every trashed image of a pool whose delay has ended.
    Purge { pool: String },
}

#[derive(Subcommand, Debug)]
pub enum SnapCmd {
    /// Take a crash-consistent snapshot (a writer elsewhere hands its lock over for it).
    Create {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    /// List an image's snapshots.
    Ls {
        /// POOL/IMAGE
        spec: String,
    },
    /// Remove a snapshot (not a protected one); the OSDs free its data in the background.
    Rm {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    /// Make the image what it was at the snapshot (the image's current data is lost unless
    /// another snapshot holds it).
    Rollback {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    /// Protect a snapshot from removal.
    Protect {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    Unprotect {
        /// POOL/IMAGE@SNAP
        spec: String,
    },
    /// Remove every unprotected snapshot of an image.
    Purge {
        /// POOL/IMAGE
        spec: String,
    },
}

/// What a `snap` command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapOp {
    Create,
    Ls,
    Rm,
    Rollback,
    Protect,
    Unprotect,
    Purge,
}

/// Splits `POOL/IMAGE@SNAP`.
fn parse_snap_spec(spec: &str) -> anyhow::Result<(String, String, String)> {
    match spec.split_once('@') {
        Some((image, snap)) if !snap.is_empty() => {
            let (pool, image) = parse_spec(image)?;
            basalt_rbd::snap::check_name(snap)
                .map_err(|why| anyhow::anyhow!("bad snapshot in '{spec}': {why}"))?;
            Ok((pool, image, snap.to_string()))
        }
        _ => bail!(
            "bad snapshot spec '{spec}': write it as POOL/IMAGE@SNAP, e.g. rbd/vm1@before-upgrade"
        ),
    }
}

/// Parses a size like `10G`, `4M`, `512K`, `4MiB` or `1024` (bytes); binary units.
pub fn parse_size(what: &str, s: &str) -> anyhow::Result<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| {
            anyhow::anyhow!("bad {what} '{s}' ({e}); use a number with an optional K, M, G or T suffix, e.g. 10G")
        })
}

/// The order (log2) of an object size given as a size string.
fn parse_order(s: Option<&str>) -> anyhow::Result<u8> {
    let Some(s) = s else {
        return Ok(basalt_rbd::DEFAULT_ORDER);
    };
    let size = parse_size("object size", s)?;
    if !size.is_power_of_two() || !(1u64 << MIN_ORDER..=1u64 << MAX_ORDER).contains(&size) {
        bail!("bad object size '{s}' ({size} bytes): it must be a power of two from 4K to 32M");
    }
    Ok(size.trailing_zeros() as u8)
}

/// Splits `POOL/IMAGE`.
fn parse_pool(pool: &str) -> anyhow::Result<String> {
    if pool.is_empty() || pool.contains('/') {
        bail!("bad pool name '{pool}': give a pool name");
    }
    Ok(pool.to_string())
}

fn parse_spec(spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once('/') {
        Some((pool, image)) if !pool.is_empty() && !image.is_empty() && !image.contains('/') => {
            Ok((pool.to_string(), image.to_string()))
        }
        _ => bail!("bad image spec '{spec}': write it as POOL/IMAGE, e.g. rbd/vm1"),
    }
}

/// The command with every argument checked, ready to run.
enum Plan {
    Create {
        size: u64,
        order: u8,
    },
    Ls,
    Info,
    Resize {
        size: u64,
        allow_shrink: bool,
    },
    Rm,
    Rename {
        new: String,
    },
    Import {
        file: PathBuf,
        order: u8,
    },
    Export {
        file: PathBuf,
    },
    Snap {
        op: SnapOp,
        snap: String,
    },
    Clone {
        parent_pool: String,
        parent: String,
        snap: String,
    },
    Flatten,
    Children {
        snap: String,
    },
    ExportDiff {
        from: Option<String>,
        snap: Option<String>,
        file: PathBuf,
    },
    ImportDiff {
        file: PathBuf,
    },
    Trash(TrashCmd),
    /// `None`: every image of the pool.
    Du,
    RebuildObjectMap,
    SetObjectMap(bool),
}

/// The features `feature enable|disable` takes: object-map and fast-diff, named together
/// (the map's dirty bits are always kept, so one without the other has no meaning here).
fn object_map_features(features: &[String]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = features
        .iter()
        .flat_map(|f| f.split(','))
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names != ["fast-diff", "object-map"] {
        bail!(
            "unsupported feature list '{}': basalt turns object-map and fast-diff on and off \
             together (`object-map fast-diff`); exclusive-lock is always on and other Ceph \
             features are not implemented",
            features.join(" ")
        );
    }
    Ok(())
}

fn plan(cmd: RbdCmd) -> anyhow::Result<(String, Option<String>, Plan)> {
    let with_image = |spec: &str, p: Plan| -> anyhow::Result<(String, Option<String>, Plan)> {
        let (pool, image) = parse_spec(spec)?;
        Ok((pool, Some(image), p))
    };
    match cmd {
        RbdCmd::Create {
            spec,
            size,
            object_size,
        } => with_image(
            &spec,
            Plan::Create {
                size: parse_size("size", &size)?,
                order: parse_order(object_size.as_deref())?,
            },
        ),
        RbdCmd::Ls { pool } => Ok((parse_pool(&pool)?, None, Plan::Ls)),
        RbdCmd::Info { spec } => with_image(&spec, Plan::Info),
        RbdCmd::Resize {
            spec,
            size,
            allow_shrink,
        } => with_image(
            &spec,
            Plan::Resize {
                size: parse_size("size", &size)?,
                allow_shrink,
            },
        ),
        RbdCmd::Rm { spec } => with_image(&spec, Plan::Rm),
        RbdCmd::Rename { spec, new_name } => {
            let (pool, image) = parse_spec(&spec)?;
            let new = match new_name.split_once('/') {
                Some((p, n)) if p == pool => n.to_string(),
                Some((p, _)) => {
                    bail!("cannot rename {spec} into pool {p}: an image stays in its pool")
                }
                None => new_name,
            };
            if new.is_empty() {
                bail!("the new image name is empty");
            }
            Ok((pool, Some(image), Plan::Rename { new }))
        }
        RbdCmd::Import {
            file,
            spec,
            object_size,
        } => with_image(
            &spec,
            Plan::Import {
                order: parse_order(object_size.as_deref())?,
                file,
            },
        ),
        RbdCmd::Snap(cmd) => {
            let (op, spec, with_snap) = match cmd {
                SnapCmd::Create { spec } => (SnapOp::Create, spec, true),
                SnapCmd::Ls { spec } => (SnapOp::Ls, spec, false),
                SnapCmd::Rm { spec } => (SnapOp::Rm, spec, true),
                SnapCmd::Rollback { spec } => (SnapOp::Rollback, spec, true),
                SnapCmd::Protect { spec } => (SnapOp::Protect, spec, true),
                SnapCmd::Unprotect { spec } => (SnapOp::Unprotect, spec, true),
                SnapCmd::Purge { spec } => (SnapOp::Purge, spec, false),
            };
            if with_snap {
                let (pool, image, snap) = parse_snap_spec(&spec)?;
                Ok((pool, Some(image), Plan::Snap { op, snap }))
            } else {
                with_image(
                    &spec,
                    Plan::Snap {
                        op,
                        snap: String::new(),
                    },
                )
            }
        }
        RbdCmd::Clone { parent, child } => {
            let (parent_pool, parent, snap) = parse_snap_spec(&parent)?;
            let (pool, child) = parse_spec(&child)?;
            Ok((
                pool,
                Some(child),
                Plan::Clone {
                    parent_pool,
                    parent,
                    snap,
                },
            ))
        }
        RbdCmd::Flatten { spec } => with_image(&spec, Plan::Flatten),
        RbdCmd::ExportDiff {
            from_snap,
            spec,
            file,
        } => {
            let (pool, image, snap) = if spec.contains('@') {
                let (p, i, s) = parse_snap_spec(&spec)?;
                (p, i, Some(s))
            } else {
                let (p, i) = parse_spec(&spec)?;
                (p, i, None)
            };
            if let Some(f) = &from_snap {
                basalt_rbd::snap::check_name(f)
                    .map_err(|why| anyhow::anyhow!("bad --from-snap: {why}"))?;
            }
            Ok((
                pool,
                Some(image),
                Plan::ExportDiff {
                    from: from_snap,
                    snap,
                    file,
                },
            ))
        }
        RbdCmd::ImportDiff { file, spec } => with_image(&spec, Plan::ImportDiff { file }),
        RbdCmd::Trash(cmd) => match &cmd {
            TrashCmd::Mv { spec, .. } => {
                let (pool, image) = parse_spec(spec)?;
                Ok((pool, Some(image), Plan::Trash(cmd)))
            }
            TrashCmd::Restore { spec, .. } | TrashCmd::Rm { spec, .. } => {
                let (pool, id) = parse_spec(spec)
                    .map_err(|_| anyhow::anyhow!("bad trash spec '{spec}': write POOL/ID"))?;
                Ok((pool, Some(id), Plan::Trash(cmd)))
            }
            TrashCmd::Ls { pool } | TrashCmd::Purge { pool } => {
                Ok((parse_pool(pool)?, None, Plan::Trash(cmd)))
            }
        },
        RbdCmd::Children { spec } => {
            let (pool, image, snap) = parse_snap_spec(&spec)?;
            Ok((pool, Some(image), Plan::Children { snap }))
        }
        RbdCmd::Du { spec } => match spec.split_once('/') {
            Some(_) => with_image(&spec, Plan::Du),
            None => Ok((parse_pool(&spec)?, None, Plan::Du)),
        },
        RbdCmd::ObjectMap(ObjectMapCmd::Rebuild { spec }) => {
            with_image(&spec, Plan::RebuildObjectMap)
        }
        RbdCmd::Feature(cmd) => {
            let (spec, features, enable) = match cmd {
                FeatureCmd::Enable { spec, features } => (spec, features, true),
                FeatureCmd::Disable { spec, features } => (spec, features, false),
            };
            object_map_features(&features)?;
            with_image(&spec, Plan::SetObjectMap(enable))
        }
        RbdCmd::Export { spec, file } => {
            if file.as_os_str() == "-" {
                bail!("export to stdout is not supported (the output is written sparse): give a file path");
            }
            with_image(&spec, Plan::Export { file })
        }
    }
}

/// Turns the image layer's errors into one line saying what to do.
fn explain(e: RbdError, pool: &str) -> anyhow::Error {
    match e {
        RbdError::NotFound(img) if img.contains('@') => anyhow::anyhow!(
            "snapshot {pool}/{img} does not exist (basalt rbd snap ls {pool}/{} lists them)",
            img.split('@').next().unwrap_or_default()
        ),
        RbdError::NotFound(img) => anyhow::anyhow!(
            "image {pool}/{img} does not exist (basalt rbd ls {pool} lists the images)"
        ),
        RbdError::Exists(img) if img.contains('@') => anyhow::anyhow!(
            "snapshot {pool}/{img} already exists (pick another name)"
        ),
        RbdError::Exists(img) => anyhow::anyhow!(
            "image {pool}/{img} already exists (pick another name, or basalt rbd rm {pool}/{img} first)"
        ),
        RbdError::Busy(img, who) => anyhow::anyhow!(
            "image {pool}/{img} is in use ({who}); close it there first, or wait {}s for a dead client's watch to time out",
            DEFAULT_WATCH_TIMEOUT.as_secs()
        ),
        other => anyhow::Error::new(other),
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
fn progress_bar(what: &str, bytes: bool) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(0), target);
    let template = if bytes {
        "{msg}: [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg}: [{bar:40}] {pos}/{len} objects eta {eta}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// A progress callback `(done, total)` that moves `pb`.
fn follow(pb: &ProgressBar) -> impl Fn(u64, u64) + Send + Sync + '_ {
    move |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    }
}

fn info_json(pool: &str, i: &ImageInfo) -> serde_json::Value {
    let mut v = json!({
        "pool": pool, "name": i.name, "id": i.id, "size": i.size, "objects": i.num_objs,
        "order": i.order, "object_size": i.object_size, "block_name_prefix": i.object_prefix,
        "format": 2, "features": layout::feature_names(i.features),
        "flags": layout::flag_names(i.flags),
    });
    if let Some(p) = &i.parent {
        v["parent"] = json!({
            "pool": p.pool, "image": p.image_name, "id": p.image_id, "snapshot": p.snap_name,
            "overlap": p.overlap,
        });
    }
    v
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub async fn run(config: ClusterConfig, json: bool, cmd: RbdCmd) -> anyhow::Result<()> {
    let (pool, image, plan) = plan(cmd)?;
    let rados = Rados::connect(config).await?;
    let mut io = rados.ioctx(&pool)?;
    // Removing or shrinking an image frees space, so it must work on a full pool (Ceph's
    // FULL_TRY): the OSDs then let its header and lock updates through, but still refuse
    // anything that would create an object or store data.
    if matches!(
        plan,
        Plan::Rm
            | Plan::Resize {
                allow_shrink: true,
                ..
            }
    ) {
        io.set_full_try(true);
    }
    let rbd = Rbd::new(Arc::new(RadosBackend::new(
        rados.clone(),
        io,
        DEFAULT_WATCH_TIMEOUT,
    )));
    let image = image.unwrap_or_default();
    let ex = |e: RbdError| explain(e, &pool);
    match plan {
        Plan::Create { size, order } => {
            let info = rbd.create(&image, size, order).await.map_err(ex)?;
            if json {
                crate::print_json(info_json(&pool, &info));
            } else {
                eprintln!("created image {pool}/{image} ({})", human(size));
            }
        }
        Plan::Ls => {
            let names = rbd.list().await.map_err(ex)?;
            if json {
                crate::print_json(json!(names));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        Plan::Info => {
            let i = rbd.info(&image).await.map_err(ex)?;
            if json {
                crate::print_json(info_json(&pool, &i));
            } else {
                println!("rbd image '{}':", i.name);
                println!("\tsize {} in {} objects", human(i.size), i.num_objs);
                println!("\torder {} ({} objects)", i.order, human(i.object_size));
                println!("\tid: {}", i.id);
                println!("\tblock_name_prefix: {}", i.object_prefix);
                println!("\tformat: 2");
                if let Some(p) = &i.parent {
                    println!(
                        "\tparent: {}/{}@{} (overlap {})",
                        p.pool,
                        p.image_name,
                        p.snap_name,
                        human(p.overlap)
                    );
                }
                println!(
                    "\tfeatures: {}",
                    layout::feature_names(i.features).join(", ")
                );
                println!("\tflags: {}", layout::flag_names(i.flags).join(", "));
            }
        }
        Plan::Resize { size, allow_shrink } => {
            let cur = rbd.info(&image).await.map_err(ex)?;
            if size < cur.size && !allow_shrink {
                bail!(
                    "shrinking {pool}/{image} from {} to {} discards the data past the new end; pass --allow-shrink to do it",
                    human(cur.size),
                    human(size)
                );
            }
            let pb = progress_bar("Resizing image", false);
            let cb = follow(&pb);
            rbd.resize(&image, size, &cb).await.map_err(ex)?;
            pb.finish_and_clear();
            eprintln!(
                "resized {pool}/{image} from {} to {}",
                human(cur.size),
                human(size)
            );
        }
        Plan::Rm => {
            let pb = progress_bar("Removing image", false);
            let cb = follow(&pb);
            rbd.remove(&image, &cb).await.map_err(ex)?;
            pb.finish_and_clear();
            eprintln!("removed image {pool}/{image}");
        }
        Plan::Rename { new } => {
            rbd.rename(&image, &new).await.map_err(ex)?;
            eprintln!("renamed {pool}/{image} to {pool}/{new}");
        }
        Plan::Import { file, order } => {
            let pb = progress_bar("Importing image", true);
            let cb = follow(&pb);
            let stats = if file.as_os_str() == "-" {
                let mut data = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut data)
                    .context("reading stdin")?;
                let size = data.len() as u64;
                rbd.import(&data[..], size, &image, order, &cb)
                    .await
                    .map_err(ex)?
            } else {
                let f = open_input(&file).await?;
                let size = f
                    .metadata()
                    .await
                    .with_context(|| format!("reading {}", file.display()))?
                    .len();
                rbd.import(tokio::io::BufReader::new(f), size, &image, order, &cb)
                    .await
                    .map_err(ex)?
            };
            pb.finish_and_clear();
            if json {
                crate::print_json(json!({
                    "pool": pool, "image": image, "bytes": stats.bytes, "data_bytes": stats.data_bytes,
                }));
            } else {
                eprintln!(
                    "imported {} into {pool}/{image} ({} of data, the rest left as holes)",
                    human(stats.bytes),
                    human(stats.data_bytes)
                );
            }
        }
        Plan::Export { file } => {
            // Fail on a missing image before creating the output file.
            rbd.info(&image).await.map_err(ex)?;
            let f = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
                .await
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        anyhow::anyhow!(
                            "{} already exists: export writes a new file, so remove it or pick another path",
                            file.display()
                        )
                    } else {
                        anyhow::Error::new(e).context(format!("creating {}", file.display()))
                    }
                })?;
            let pb = progress_bar("Exporting image", true);
            let cb = follow(&pb);
            let r = rbd.export(&image, f, &cb).await;
            pb.finish_and_clear();
            let stats = match r {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_file(&file);
                    return Err(ex(e));
                }
            };
            if json {
                crate::print_json(json!({
                    "pool": pool, "image": image, "bytes": stats.bytes, "data_bytes": stats.data_bytes,
                }));
            } else {
                eprintln!(
                    "exported {pool}/{image} to {} ({}, {} of data)",
                    file.display(),
                    human(stats.bytes),
                    human(stats.data_bytes)
                );
            }
        }
        Plan::Clone {
            parent_pool,
            parent,
            snap,
        } => {
            let parent_rbd = if parent_pool == pool {
                rbd.clone()
            } else {
                let io = rados.ioctx(&parent_pool)?;
                Rbd::new(Arc::new(RadosBackend::new(
                    rados.clone(),
                    io,
                    DEFAULT_WATCH_TIMEOUT,
                )))
            };
            let info = rbd
                .clone_image(&parent_rbd, &parent, &snap, &image)
                .await
                .map_err(|e| explain(e, &parent_pool))?;
            if json {
                crate::print_json(info_json(&pool, &info));
            } else {
                eprintln!("cloned {parent_pool}/{parent}@{snap} as {pool}/{image}");
            }
        }
        Plan::Du => run_du(&rbd, &pool, &image, json).await.map_err(ex)?,
        Plan::RebuildObjectMap | Plan::SetObjectMap(_) => {
            let img = rbd.open(&image).await.map_err(ex)?;
            let pb = progress_bar("Object map", false);
            let cb = follow(&pb);
            let r = match plan {
                Plan::SetObjectMap(enable) => img.set_object_map(enable, &cb).await,
                _ => img.rebuild_object_map(&cb).await,
            };
            pb.finish_and_clear();
            let closed = img.close().await;
            r.map_err(ex)?;
            closed.map_err(ex)?;
            if !json {
                eprintln!("object map of {pool}/{image} updated");
            }
        }
        Plan::Flatten => {
            let img = rbd.open(&image).await.map_err(ex)?;
            let pb = progress_bar("Flattening", false);
            let cb = follow(&pb);
            let r = img.flatten(&cb).await;
            pb.finish_and_clear();
            let closed = img.close().await;
            r.map_err(ex)?;
            closed.map_err(ex)?;
            if !json {
                eprintln!("flattened {pool}/{image}");
            }
        }
        Plan::ExportDiff { from, snap, file } => {
            let img = match &snap {
                Some(s) => rbd.open_snapshot(&image, s).await,
                None => rbd.open(&image).await,
            }
            .map_err(ex)?;
            let r = export_diff(&img, from.as_deref(), &file).await;
            let closed = img.close().await;
            let stats = r?;
            closed.map_err(ex)?;
            if json {
                crate::print_json(json!({
                    "pool": pool, "image": image, "from": from, "to": snap,
                    "data_bytes": stats.data_bytes, "zero_bytes": stats.zero_bytes,
                }));
            } else {
                eprintln!(
                    "exported the diff of {pool}/{image} ({} of data, {} zeroed)",
                    human(stats.data_bytes),
                    human(stats.zero_bytes)
                );
            }
        }
        Plan::ImportDiff { file } => {
            let img = rbd.open(&image).await.map_err(ex)?;
            let r = import_diff(&img, &file).await;
            let closed = img.close().await;
            let stats = r?;
            closed.map_err(ex)?;
            if json {
                crate::print_json(json!({
                    "pool": pool, "image": image,
                    "data_bytes": stats.data_bytes, "zero_bytes": stats.zero_bytes,
                }));
            } else {
                eprintln!(
                    "applied the diff to {pool}/{image} ({} of data, {} zeroed)",
                    human(stats.data_bytes),
                    human(stats.zero_bytes)
                );
            }
        }
        Plan::Trash(cmd) => run_trash(&rbd, &pool, &image, cmd, json)
            .await
            .map_err(ex)?,
        Plan::Children { snap } => {
            let children = rbd.children(&image, &snap).await.map_err(ex)?;
            if json {
                crate::print_json(json!(children
                    .iter()
                    .map(|(p, n)| json!({ "pool": p, "image": n }))
                    .collect::<Vec<_>>()));
            } else {
                for (p, n) in children {
                    println!("{p}/{n}");
                }
            }
        }
        Plan::Snap { op, snap } => {
            let img = rbd.open(&image).await.map_err(ex)?;
            let r = run_snap(&img, &pool, &image, op, &snap, json).await;
            let closed = img.close().await;
            r.map_err(ex)?;
            closed.map_err(ex)?;
        }
    }
    Ok(())
}

async fn export_diff(
    img: &basalt_rbd::Image,
    from: Option<&str>,
    file: &Path,
) -> anyhow::Result<basalt_rbd::diff::DiffStats> {
    let from = match from {
        Some(name) => Some(
            img.snapshots()
                .await?
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "image {} has no snapshot {name} (basalt rbd snap ls lists them)",
                        img.name()
                    )
                })?,
        ),
        None => None,
    };
    let pb = progress_bar("Exporting diff", false);
    let cb = follow(&pb);
    let stats = if file.as_os_str() == "-" {
        let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
        basalt_rbd::diff::export_diff(img, from.as_ref(), &mut out, &cb).await
    } else {
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .await
            .with_context(|| format!("creating {} (it must not exist)", file.display()))?;
        let mut out = tokio::io::BufWriter::new(f);
        let r = basalt_rbd::diff::export_diff(img, from.as_ref(), &mut out, &cb).await;
        if r.is_err() {
            let _ = std::fs::remove_file(file);
        }
        r
    };
    pb.finish_and_clear();
    Ok(stats?)
}

async fn import_diff(
    img: &basalt_rbd::Image,
    file: &Path,
) -> anyhow::Result<basalt_rbd::diff::DiffStats> {
    let pb = progress_bar("Importing diff", true);
    let cb = follow(&pb);
    let r = if file.as_os_str() == "-" {
        let mut input = tokio::io::BufReader::new(tokio::io::stdin());
        basalt_rbd::diff::import_diff(img, &mut input, &cb).await
    } else {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let mut input = tokio::io::BufReader::new(f);
        basalt_rbd::diff::import_diff(img, &mut input, &cb).await
    };
    pb.finish_and_clear();
    Ok(r?)
}

/// `rbd du`: rows per snapshot and head, a total per image, and a pool total when listing
/// a pool (Ceph's columns).
async fn run_du(rbd: &Rbd, pool: &str, image: &str, json: bool) -> Result<(), RbdError> {
    let images = if image.is_empty() {
        rbd.list().await?
    } else {
        vec![image.to_string()]
    };
    let pb = progress_bar("Reading objects (no object map)", false);
    let cb = follow(&pb);
    let mut usage = Vec::new();
    for name in &images {
        let du = rbd.du(name, &cb).await;
        match du {
            Ok(du) => usage.push(du),
            // Removed between the listing and now.
            Err(RbdError::NotFound(_)) if image.is_empty() => {}
            Err(e) => {
                pb.finish_and_clear();
                return Err(e);
            }
        }
    }
    pb.finish_and_clear();
    for du in usage.iter().filter(|d| !d.from_object_map) {
        eprintln!(
            "warning: {pool}/{} has no valid object map, so every object was read (slow on \
             a large image): `basalt rbd object-map rebuild {pool}/{}` fixes that",
            du.image, du.image
        );
    }
    let (provisioned, used) = usage
        .iter()
        .map(|d| d.total())
        .fold((0, 0), |a, t| (a.0 + t.0, a.1 + t.1));
    if json {
        let images: Vec<_> = usage
            .iter()
            .flat_map(|d| {
                d.rows.iter().map(move |r| {
                    json!({"name": d.image, "snapshot": r.snap, "provisioned_size": r.provisioned,
                           "used_size": r.used})
                })
            })
            .collect();
        crate::print_json(json!({
            "images": images, "total_provisioned_size": provisioned, "total_used_size": used,
        }));
        return Ok(());
    }
    println!("{:<32} {:>12} {:>12}", "NAME", "PROVISIONED", "USED");
    for d in &usage {
        for r in &d.rows {
            let name = match &r.snap {
                Some(s) => format!("{}@{s}", d.image),
                None => d.image.clone(),
            };
            println!(
                "{name:<32} {:>12} {:>12}",
                human(r.provisioned),
                human(r.used)
            );
        }
        if d.rows.len() > 1 && usage.len() == 1 {
            let (p, u) = d.total();
            println!("{:<32} {:>12} {:>12}", "<TOTAL>", human(p), human(u));
        }
    }
    if usage.len() > 1 {
        println!(
            "{:<32} {:>12} {:>12}",
            "<TOTAL>",
            human(provisioned),
            human(used)
        );
    }
    Ok(())
}

async fn run_trash(
    rbd: &Rbd,
    pool: &str,
    target: &str,
    cmd: TrashCmd,
    json: bool,
) -> basalt_rbd::Result<()> {
    let entry_json = |e: &basalt_rbd::trash::TrashEntry| {
        json!({
            "pool": pool, "id": e.id, "name": e.name, "deleted_ms": e.deleted_ms,
            "deferment_end_ms": e.deferment_end_ms,
        })
    };
    match cmd {
        TrashCmd::Mv { delay, .. } => {
            let e = rbd.trash_move(target, delay.saturating_mul(1000)).await?;
            if json {
                crate::print_json(entry_json(&e));
            } else {
                eprintln!("moved {pool}/{target} to the trash as {pool}/{}", e.id);
            }
        }
        TrashCmd::Ls { .. } => {
            let entries = rbd.trash_list().await?;
            if json {
                crate::print_json(json!(entries.iter().map(entry_json).collect::<Vec<_>>()));
            } else {
                for e in entries {
                    println!("{} {}", e.id, e.name);
                }
            }
        }
        TrashCmd::Restore { image, .. } => {
            let name = rbd.trash_restore(target, image.as_deref()).await?;
            if json {
                crate::print_json(json!({ "pool": pool, "id": target, "name": name }));
            } else {
                eprintln!("restored {pool}/{name}");
            }
        }
        TrashCmd::Rm { force, .. } => {
            let pb = progress_bar("Removing", false);
            let cb = follow(&pb);
            let r = rbd.trash_remove(target, force, &cb).await;
            pb.finish_and_clear();
            r?;
            if !json {
                eprintln!("removed {pool}/{target} from the trash");
            }
        }
        TrashCmd::Purge { .. } => {
            let names = rbd.trash_purge(&|_, _| {}).await?;
            if json {
                crate::print_json(json!({ "pool": pool, "removed": names }));
            } else {
                eprintln!("purged {} trashed images of {pool}", names.len());
            }
        }
    }
    Ok(())
}

fn snap_json(pool: &str, image: &str, s: &basalt_rbd::snap::SnapInfo) -> serde_json::Value {
    json!({
        "pool": pool, "image": image, "id": s.id, "name": s.name, "size": s.size,
        "protected": s.protected, "created_ms": s.created_ms,
    })
}

async fn run_snap(
    img: &basalt_rbd::Image,
    pool: &str,
    image: &str,
    op: SnapOp,
    snap: &str,
    json: bool,
) -> basalt_rbd::Result<()> {
    let said = |what: &str| {
        if json {
            crate::print_json(json!({ "pool": pool, "image": image, "snap": snap, "done": what }));
        } else {
            eprintln!("{what} {pool}/{image}@{snap}");
        }
    };
    match op {
        SnapOp::Create => {
            let s = img.snap_create(snap).await?;
            if json {
                crate::print_json(snap_json(pool, image, &s));
            } else {
                eprintln!("created snapshot {pool}/{image}@{snap} (id {})", s.id);
            }
        }
        SnapOp::Ls => {
            let snaps = img.snapshots().await?;
            if json {
                crate::print_json(json!(snaps
                    .iter()
                    .map(|s| snap_json(pool, image, s))
                    .collect::<Vec<_>>()));
            } else {
                println!("{:>6}  {:<24} {:>12}  PROTECTED", "SNAPID", "NAME", "SIZE");
                for s in snaps {
                    println!(
                        "{:>6}  {:<24} {:>12}  {}",
                        s.id,
                        s.name,
                        human(s.size),
                        if s.protected { "yes" } else { "" }
                    );
                }
            }
        }
        SnapOp::Rm => {
            img.snap_remove(snap).await?;
            said("removed snapshot");
        }
        SnapOp::Rollback => {
            let pb = progress_bar("Rolling back to snapshot", false);
            let cb = follow(&pb);
            let r = img.snap_rollback(snap, &cb).await;
            pb.finish_and_clear();
            r?;
            said("rolled back to snapshot");
        }
        SnapOp::Protect => {
            img.snap_set_protected(snap, true).await?;
            said("protected snapshot");
        }
        SnapOp::Unprotect => {
            img.snap_set_protected(snap, false).await?;
            said("unprotected snapshot");
        }
        SnapOp::Purge => {
            let mut removed = Vec::new();
            for s in img.snapshots().await?.iter().filter(|s| !s.protected) {
                img.snap_remove(&s.name).await?;
                removed.push(s.name.clone());
            }
            if json {
                crate::print_json(json!({ "pool": pool, "image": image, "removed": removed }));
            } else {
                eprintln!("removed {} snapshots of {pool}/{image}", removed.len());
            }
        }
    }
    Ok(())
}

async fn open_input(file: &Path) -> anyhow::Result<tokio::fs::File> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let meta = f
        .metadata()
        .await
        .with_context(|| format!("reading {}", file.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file (use - to read stdin)",
            file.display()
        );
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("size", "10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("size", "4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("size", "512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("size", "4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("size", "1234").unwrap(), 1234);
        assert!(parse_size("size", "ten gigs").is_err());
        assert!(parse_size("size", "").is_err());
        assert!(parse_size("size", "-1G").is_err());
    }

    #[test]
    fn orders() {
        assert_eq!(parse_order(None).unwrap(), 22);
        assert_eq!(parse_order(Some("4K")).unwrap(), 12);
        assert_eq!(parse_order(Some("32M")).unwrap(), 25);
        assert!(parse_order(Some("2K")).is_err());
        assert!(parse_order(Some("64M")).is_err());
        assert!(parse_order(Some("3M")).is_err());
    }

    #[test]
    fn specs() {
        assert_eq!(
            parse_spec("rbd/vm1").unwrap(),
            ("rbd".to_string(), "vm1".to_string())
        );
        assert!(parse_spec("vm1").is_err());
        assert!(parse_spec("/vm1").is_err());
        assert!(parse_spec("rbd/").is_err());
        assert!(parse_spec("a/b/c").is_err());
    }
}

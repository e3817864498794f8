//! Incremental backups: `export-diff` and `import-diff` in Ceph's "rbd diff v1" stream
//! format (`doc/dev/rbd-diff.rst`), so a diff made here is the same bytes Ceph's tools read:
//!
//! ```text
//! "rbd diff v1\n"
//! 'f' le32 len, name      from snapshot (absent: the diff starts from nothing)
//! 't' le32 len, name      to snapshot (absent: the image head)
//! 's' le64 size           the image size at the end
//! 'w' le64 off, le64 len, data    bytes that changed
//! 'z' le64 off, le64 len          a range that became zeros
//! 'e'                     end
//! ```
//!
//! What changed is found per object from the OSDs' snapshot records (`list_snaps`: which
//! version of the object each snapshot reads, and the ranges where each clone may differ
//! from the next), so an incremental diff reads only the changed 64 KiB chunks, not the
//! image; with fast-diff object maps, objects the maps say are unchanged over the range are
//! not asked at all. Ranges that read as zeros become 'z' records (or nothing, where the older
//! version had no data either).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::{BackendError, SnapListing};
use crate::error::{RbdError, Result};
use crate::image::Image;
use crate::layout;
use crate::snap::SnapInfo;

const HEADER: &[u8] = b"rbd diff v1\n";
/// The largest 'w' record import accepts (what one object of the largest order holds).
const MAX_RECORD: u64 = 32 << 20;
/// Zero runs are found in blocks of this size.
const BLOCK: usize = 4096;

/// What a diff carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Bytes in 'w' records.
    pub data_bytes: u64,
    /// Bytes in 'z' records.
    pub zero_bytes: u64,
}

/// Which version of an object snapshot `snap` reads (`None`: the head): an index into the
/// listing's clones, `clones.len()` for the head, `None` if the object did not exist then.
pub(crate) fn version_at(l: &SnapListing, snap: Option<u64>) -> Option<usize> {
    let Some(s) = snap else {
        return l.head_exists.then_some(l.clones.len());
    };
    match l.clones.iter().position(|c| c.id >= s) {
        Some(i) if s >= l.clones[i].covers_from => Some(i),
        Some(_) => None,
        None if l.head_exists && s > l.seq => Some(l.clones.len()),
        None => None,
    }
}

/// How one object changed between two versions, as ranges relative to the object.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Unchanged,
    /// It did not exist at the start: its data is new (zeros need no record).
    Created,
    /// It no longer exists: all of it reads zeros now.
    Removed,
    /// Bytes in `changed` may differ (zeros there need 'z'); bytes from `grown_from` on did
    /// not exist before (zeros need nothing).
    Ranges {
        changed: Vec<(u64, u64)>,
        grown_from: u64,
    },
}

fn change(l: &SnapListing, from: Option<u64>, to: Option<u64>, had_start: bool) -> Change {
    let vf = if had_start { version_at(l, from) } else { None };
    let vt = version_at(l, to);
    match (vf, vt) {
        (a, b) if a == b => Change::Unchanged,
        (_, None) => Change::Removed,
        (None, Some(_)) => Change::Created,
        (Some(i), Some(j)) => {
            let (i, j) = (i.min(j), i.max(j));
            let mut changed: Vec<(u64, u64)> = l.clones[i..j.min(l.clones.len())]
                .iter()
                .flat_map(|c| c.differs.iter().copied())
                .collect();
            changed.sort_unstable();
            Change::Ranges {
                changed,
                grown_from: l.clones[i].size,
            }
        }
    }
}

fn put_name(out: &mut Vec<u8>, tag: u8, name: &str) {
    out.push(tag);
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Writes `data` (at image offset `off`) as 'w' records for its non-zero blocks and, when
/// `zeros_matter`, 'z' records for its zero blocks.
async fn put_data<W: AsyncWrite + Unpin>(
    out: &mut W,
    off: u64,
    data: &[u8],
    zeros_matter: bool,
    stats: &mut DiffStats,
) -> Result<()> {
    let mut i = 0;
    while i < data.len() {
        let zero = |j: usize| data[j..(j + BLOCK).min(data.len())].iter().all(|b| *b == 0);
        let is_zero = zero(i);
        let mut j = i;
        while j < data.len() && zero(j) == is_zero {
            j = (j + BLOCK).min(data.len());
        }
        let mut rec = Vec::with_capacity(17);
        rec.push(if is_zero { b'z' } else { b'w' });
        rec.extend_from_slice(&(off + i as u64).to_le_bytes());
        rec.extend_from_slice(&((j - i) as u64).to_le_bytes());
        if !is_zero {
            out.write_all(&rec).await.map_err(local)?;
            out.write_all(&data[i..j]).await.map_err(local)?;
            stats.data_bytes += (j - i) as u64;
        } else if zeros_matter {
            out.write_all(&rec).await.map_err(local)?;
            stats.zero_bytes += (j - i) as u64;
        }
        i = j;
    }
    Ok(())
}

fn local(e: std::io::Error) -> RbdError {
    RbdError::LocalIo(e.to_string())
}

/// Writes the diff of `image` (opened at the snapshot the diff goes to, or at its head)
/// since snapshot `from` (`None`: since nothing, i.e. all its data).
pub async fn export_diff<W: AsyncWrite + Unpin>(
    image: &Image,
    from: Option<&SnapInfo>,
    out: &mut W,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<DiffStats> {
    if let (Some(f), Some(t)) = (from, image.snapshot()) {
        if f.id >= t.id {
            return Err(RbdError::InvalidArgument(format!(
                "snapshot {} is not older than {}: a diff goes from an older snapshot to a \
                 newer one",
                f.name, t.name
            )));
        }
    }
    let mut head = HEADER.to_vec();
    if let Some(f) = from {
        put_name(&mut head, b'f', &f.name);
    }
    if let Some(t) = image.snapshot() {
        put_name(&mut head, b't', &t.name);
    }
    let size = image.size();
    head.push(b's');
    head.extend_from_slice(&size.to_le_bytes());
    out.write_all(&head).await.map_err(local)?;
    let os = image.object_size();
    let to = image.snapshot().map(|s| s.id);
    let from_size = from.map_or(0, |f| f.size);
    let objects = layout::num_objects(size.max(from_size), image.order());
    let data = image.data_backend();
    let mut stats = DiffStats::default();
    // With fast-diff maps, objects unchanged over the range are not asked at all.
    let changed = image.changed_objects(from).await?;
    for n in 0..objects {
        let unchanged = changed
            .as_ref()
            .is_some_and(|c| !c.get(n as usize).copied().unwrap_or(false));
        // A clone's unwritten object still reads its parent's data in a full diff.
        if unchanged && !(from.is_none() && image.maps_onto_parent(n)) {
            progress(n + 1, objects);
            continue;
        }
        let base = n * os;
        // The part of this object inside the image at each end.
        let end_to = size.saturating_sub(base).min(os);
        let end_from = from_size.saturating_sub(base).min(os);
        let change = match data.list_snaps(&image.object_name(n)).await {
            Ok(l) => change(&l, from.map(|f| f.id), to, from.is_some()),
            // A clone's unwritten object reads its parent: new data for a full diff.
            Err(BackendError::NotFound(_)) if from.is_none() && image.maps_onto_parent(n) => {
                Change::Created
            }
            Err(BackendError::NotFound(_)) => Change::Unchanged,
            Err(e) => return Err(e.into()),
        };
        match change {
            Change::Unchanged => {}
            Change::Removed => {
                if end_to > 0 {
                    put_data(
                        out,
                        base,
                        &vec![0u8; end_to as usize],
                        end_from > 0,
                        &mut stats,
                    )
                    .await?;
                }
            }
            Change::Created => {
                if end_to > 0 {
                    let d = image.read(base, end_to).await?;
                    put_data(out, base, &d, false, &mut stats).await?;
                }
            }
            Change::Ranges {
                changed,
                grown_from,
            } => {
                let mut ranges: Vec<(u64, u64, bool)> = changed
                    .into_iter()
                    .map(|(o, l)| (o, (o + l).min(end_to), true))
                    .collect();
                ranges.push((grown_from.min(end_to), end_to, false));
                for (lo, hi, zeros_matter) in ranges {
                    if lo < hi {
                        let d = image.read(base + lo, hi - lo).await?;
                        put_data(out, base + lo, &d, zeros_matter, &mut stats).await?;
                    }
                }
            }
        }
        progress(n + 1, objects);
    }
    out.write_all(b"e").await.map_err(local)?;
    out.flush().await.map_err(local)?;
    Ok(stats)
}

async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64> {
    r.read_u64_le().await.map_err(truncated)
}

fn truncated(e: std::io::Error) -> RbdError {
    RbdError::InvalidArgument(format!("the diff stream is truncated or unreadable: {e}"))
}

async fn read_name<R: AsyncRead + Unpin>(r: &mut R) -> Result<String> {
    let len = r.read_u32_le().await.map_err(truncated)?;
    if len > 4096 {
        return Err(RbdError::InvalidArgument(format!(
            "a snapshot name of {len} bytes in the diff"
        )));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b).await.map_err(truncated)?;
    String::from_utf8(b)
        .map_err(|_| RbdError::InvalidArgument("a snapshot name in the diff is not UTF-8".into()))
}

/// Applies a diff stream to `image` (open at its head): it must have the diff's start
/// snapshot, if the diff has one; the image takes the diff's end size, then its data; at
/// the end the diff's end snapshot is created on it (as Ceph's `import-diff` does). The
/// stream is checked as it is read: a malformed one stops with an error, after which the
/// image holds part of the diff (apply the same diff again).
pub async fn import_diff<R: AsyncRead + Unpin>(
    image: &Image,
    input: &mut R,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<DiffStats> {
    let mut magic = [0u8; HEADER.len()];
    input.read_exact(&mut magic).await.map_err(truncated)?;
    if magic != HEADER {
        return Err(RbdError::InvalidArgument(
            "not an rbd diff v1 stream (it must start with \"rbd diff v1\\n\")".into(),
        ));
    }
    let mut to_snap: Option<String> = None;
    let mut stats = DiffStats::default();
    let mut resized = false;
    loop {
        let tag = input.read_u8().await.map_err(truncated)?;
        match tag {
            b'f' => {
                let name = read_name(input).await?;
                if !image.snapshots().await?.iter().any(|s| s.name == name) {
                    return Err(RbdError::InvalidArgument(format!(
                        "the diff starts at snapshot {name:?}, which image {} does not have: \\
                         apply the diff that ends there first",
                        image.name()
                    )));
                }
            }
            b't' => to_snap = Some(read_name(input).await?),
            b's' => {
                let size = read_u64(input).await?;
                if size != image.size() {
                    image.resize(size, &|_, _| {}).await?;
                }
                resized = true;
            }
            b'w' | b'z' => {
                if !resized {
                    return Err(RbdError::InvalidArgument(
                        "a data record before the size record in the diff".into(),
                    ));
                }
                let off = read_u64(input).await?;
                let len = read_u64(input).await?;
                if tag == b'z' {
                    image.discard(off, len).await?;
                    stats.zero_bytes += len;
                } else {
                    if len > MAX_RECORD {
                        return Err(RbdError::InvalidArgument(format!(
                            "a data record of {len} bytes in the diff (at most {MAX_RECORD})"
                        )));
                    }
                    let mut b = vec![0u8; len as usize];
                    input.read_exact(&mut b).await.map_err(truncated)?;
                    image.write(off, Bytes::from(b)).await?;
                    stats.data_bytes += len;
                }
                progress(off + len, image.size());
            }
            b'e' => break,
            other => {
                return Err(RbdError::InvalidArgument(format!(
                    "unknown record tag {other:#04x} in the diff"
                )))
            }
        }
    }
    if let Some(name) = to_snap {
        image.snap_create(&name).await?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CloneSummary;

    fn clone(id: u64, from: u64, size: u64, differs: Vec<(u64, u64)>) -> CloneSummary {
        CloneSummary {
            id,
            covers_from: from,
            snaps: vec![id],
            size,
            differs,
        }
    }

    #[test]
    fn versions_and_changes_follow_the_clones() {
        // Snapshot 2 was taken before a write changed chunk 1; 5 before one changed 0.
        let l = SnapListing {
            seq: 5,
            head_exists: true,
            clones: vec![
                clone(2, 1, 1 << 20, vec![(65536, 65536)]),
                clone(5, 3, 1 << 20, vec![(0, 65536)]),
            ],
        };
        assert_eq!(version_at(&l, Some(1)), Some(0));
        assert_eq!(version_at(&l, Some(2)), Some(0));
        assert_eq!(version_at(&l, Some(4)), Some(1));
        assert_eq!(version_at(&l, Some(6)), Some(2));
        assert_eq!(version_at(&l, None), Some(2));
        assert_eq!(change(&l, Some(4), Some(5), true), Change::Unchanged);
        assert_eq!(
            change(&l, Some(2), None, true),
            Change::Ranges {
                changed: vec![(0, 65536), (65536, 65536)],
                grown_from: 1 << 20
            }
        );
        assert_eq!(change(&l, None, Some(2), false), Change::Created);
        let gone = SnapListing {
            head_exists: false,
            ..l
        };
        assert_eq!(change(&gone, Some(2), None, true), Change::Removed);
    }
}

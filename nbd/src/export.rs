//! What the server serves: the [`Export`] and [`ExportRegistry`] traits, and
//! an in-memory sparse export for tests and benchmarks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::NbdError;

/// One run of a block-status answer, consecutive from the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes covered; must be nonzero.
    pub length: u32,
    /// `base:allocation` flags: [`Extent::HOLE`], [`Extent::ZERO`].
    pub flags: u32,
}

impl Extent {
    /// Not allocated in the backing store.
    pub const HOLE: u32 = 1;
    /// Reads as zeroes.
    pub const ZERO: u32 = 2;

    pub fn data(length: u32) -> Self {
        Extent { length, flags: 0 }
    }
    pub fn hole(length: u32) -> Self {
        Extent {
            length,
            flags: Self::HOLE | Self::ZERO,
        }
    }
}

/// A block device the server exposes. All ranges the server passes are
/// already checked to lie inside `[0, size())`; lengths are nonzero and READ
/// and WRITE lengths are at most the server's maximum payload (32 MiB by
/// default). TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload and may
/// be larger (up to 4 GiB − 1).
///
/// Methods may run concurrently, for requests from one or many
/// connections: the server pipelines.
#[async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size in bytes. Read once per connection, at negotiation.
    fn size(&self) -> u64;
    /// Writes, trims and zeroing are refused with `EPERM` when true.
    fn read_only(&self) -> bool;
    /// True only if a FLUSH on one connection covers writes completed on
    /// all connections (no per-connection cache): then the server
    /// advertises `NBD_FLAG_CAN_MULTI_CONN`.
    fn can_multi_conn(&self) -> bool;
    /// Human-readable description for `NBD_INFO_DESCRIPTION`; empty means none.
    fn description(&self) -> String {
        String::new()
    }
    /// Exactly `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError>;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError>;
    /// Makes every write that completed before this call durable.
    async fn flush(&self) -> Result<(), NbdError>;
    /// The range is no longer needed (a hint; may do nothing).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError>;
    /// The range must read back as zeroes. `may_trim`: holes may be punched
    /// (false when the client sent NO_HOLE). `fast_zero`: fail quickly with
    /// [`NbdError::NotSupported`] rather than be as slow as a write.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_zero: bool,
    ) -> Result<(), NbdError>;
    /// Extents covering `[offset, offset+len)`, in order; may stop early but
    /// must return at least one. Lengths should be multiples of 512 (the
    /// advertised minimum block size) except at the end of the export.
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError>;
    /// The connection is ending (NBD_CMD_DISC, EOF, or server shutdown) and every request
    /// it sent has been answered; the socket closes when this returns. Lets an export give
    /// up what the connection held before the client sees the close — basalt's gateway
    /// hands the image's exclusive lock back here, so a client that disconnected from one
    /// gateway finds the lock free at the next. Should be quick; the default does nothing.
    async fn disconnect(&self) {}
}

/// Resolves export names (for basalt: `POOL/IMAGE`) to exports.
#[async_trait]
pub trait ExportRegistry: Send + Sync + 'static {
    /// Opens an export for one connection. [`NbdError::NotFound`] becomes
    /// `NBD_REP_ERR_UNKNOWN`.
    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, NbdError>;
    /// Names for `NBD_OPT_LIST`.
    async fn list(&self) -> Result<Vec<String>, NbdError>;
}

// ---- in-memory implementation -------------------------------------------

/// Allocation granularity of [`MemExport`].
pub const MEM_BLOCK: u64 = 64 * 1024;

/// A sparse in-memory export: 64 KiB blocks allocated on first write,
/// released by TRIM or WRITE_ZEROES of a whole block, so BLOCK_STATUS
/// reports holes. It has no cache, so it supports multi-conn. Useful for
/// tests and for benchmarking the NBD layer alone.
pub struct MemExport {
    size: u64,
    read_only: bool,
    multi_conn: bool,
    blocks: RwLock<HashMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    fua_ops: AtomicU64,
}

impl MemExport {
    /// A writable, all-holes export of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemExport {
            size,
            read_only: false,
            multi_conn: true,
            blocks: RwLock::new(HashMap::new()),
            flushes: AtomicU64::new(0),
            fua_ops: AtomicU64::new(0),
        }
    }
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }
    /// Override what `can_multi_conn` reports (to test the flag).
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }
    /// FLUSH requests seen.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
    /// Writes, trims and zeroings that carried FUA.
    pub fn fua_ops(&self) -> u64 {
        self.fua_ops.load(Ordering::Relaxed)
    }
    /// Allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.read().map(|b| b.len()).unwrap_or(0)
    }
    /// Synchronous read helper for tests.
    pub fn read_sync(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, len as u64, |blk, in_blk, pos, n| {
            if let Some(b) = blocks.get(&blk) {
                out[pos..pos + n].copy_from_slice(&b[in_blk..in_blk + n]);
            }
        });
        out
    }

    /// Synchronous write helper for tests (ignores read-only).
    pub fn write_sync(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.write().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, data.len() as u64, |blk, in_blk, pos, n| {
            let b = blocks
                .entry(blk)
                .or_insert_with(|| vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            b[in_blk..in_blk + n].copy_from_slice(&data[pos..pos + n]);
        });
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::Invalid(format!(
                "range {offset}+{len} outside the {}-byte export",
                self.size
            ))),
        }
    }

    fn note_fua(&self, fua: bool) {
        if fua {
            self.fua_ops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Zeroes `[offset, offset+len)`; whole blocks are dropped if `punch`,
    /// and (if `!punch`) missing blocks are allocated.
    fn zero_range(&self, offset: u64, len: u64, punch: bool) {
        let mut blocks = self.blocks.write().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, len, |blk, in_blk, _pos, n| {
            if punch && n as u64 == MEM_BLOCK {
                blocks.remove(&blk);
            } else if let Some(b) = blocks.get_mut(&blk) {
                b[in_blk..in_blk + n].fill(0);
            } else if !punch {
                blocks.insert(blk, vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            }
        });
    }
}

/// Calls `f(block index, offset in block, offset in range, bytes)` for each
/// block-sized piece of `[offset, offset+len)`.
fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut pos = 0u64;
    while pos < len {
        let abs = offset + pos;
        let blk = abs / MEM_BLOCK;
        let in_blk = abs % MEM_BLOCK;
        let n = (MEM_BLOCK - in_blk).min(len - pos);
        f(blk, in_blk as usize, pos as usize, n as usize);
        pos += n;
    }
}

#[async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
    fn description(&self) -> String {
        "basalt in-memory export".into()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.check(offset, len as u64)?;
        let mut out = BytesMut::zeroed(len as usize);
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, len as u64, |blk, in_blk, pos, n| {
            if let Some(b) = blocks.get(&blk) {
                out[pos..pos + n].copy_from_slice(&b[in_blk..in_blk + n]);
            }
        });
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        if self.read_only {
            return Err(NbdError::PermissionDenied("export is read-only".into()));
        }
        self.check(offset, data.len() as u64)?;
        self.note_fua(fua);
        let mut blocks = self.blocks.write().unwrap_or_else(|p| p.into_inner());
        for_each_piece(offset, data.len() as u64, |blk, in_blk, pos, n| {
            let b = blocks
                .entry(blk)
                .or_insert_with(|| vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            b[in_blk..in_blk + n].copy_from_slice(&data[pos..pos + n]);
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), NbdError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        if self.read_only {
            return Err(NbdError::PermissionDenied("export is read-only".into()));
        }
        self.check(offset, len as u64)?;
        self.note_fua(fua);
        // Drop whole blocks; zero the partial edges so reads stay
        // deterministic (TRIM allows either).
        self.zero_range(offset, len as u64, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        _fast_zero: bool,
    ) -> Result<(), NbdError> {
        if self.read_only {
            return Err(NbdError::PermissionDenied("export is read-only".into()));
        }
        self.check(offset, len as u64)?;
        self.note_fua(fua);
        // Always fast in memory, so FAST_ZERO never fails.
        self.zero_range(offset, len as u64, may_trim);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError> {
        self.check(offset, len as u64)?;
        let blocks = self.blocks.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Extent> = Vec::new();
        for_each_piece(offset, len as u64, |blk, _in_blk, _pos, n| {
            let e = if blocks.contains_key(&blk) {
                Extent::data(n as u32)
            } else {
                Extent::hole(n as u32)
            };
            match out.last_mut() {
                Some(last) if last.flags == e.flags => last.length += e.length,
                _ => out.push(e),
            }
        });
        Ok(out)
    }
}

/// A fixed set of named exports (shared by all connections).
#[derive(Default)]
pub struct MemRegistry {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&self, name: impl Into<String>, export: Arc<dyn Export>) {
        self.exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), export);
    }
}

#[async_trait]
impl ExportRegistry for MemRegistry {
    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, NbdError> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| NbdError::NotFound(format!("no export named {name:?}")))
    }
    async fn list(&self) -> Result<Vec<String>, NbdError> {
        Ok(self
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_export_sparse_round_trip() {
        let e = MemExport::new(1 << 20);
        assert_eq!(
            e.block_status(0, 1 << 20).await.unwrap(),
            vec![Extent::hole(1 << 20)]
        );
        e.write(70_000, Bytes::from_static(b"hello"), false)
            .await
            .unwrap();
        assert_eq!(&e.read(70_000, 5).await.unwrap()[..], b"hello");
        assert_eq!(e.read(0, 16).await.unwrap(), Bytes::from(vec![0u8; 16]));
        assert_eq!(
            e.block_status(0, 1 << 20).await.unwrap(),
            vec![
                Extent::hole(65536),
                Extent::data(65536),
                Extent::hole((1 << 20) - 131072)
            ]
        );
        // Partial zeroing keeps the block, whole-block zeroing punches it.
        e.write_zeroes(65536, 100, false, true, false)
            .await
            .unwrap();
        assert_eq!(e.allocated_blocks(), 1);
        e.trim(65536, 65536, true).await.unwrap();
        assert_eq!(e.allocated_blocks(), 0);
        assert_eq!(e.fua_ops(), 1);
        // NO_HOLE allocates.
        e.write_zeroes(0, 65536, false, false, false).await.unwrap();
        assert_eq!(e.allocated_blocks(), 1);
        assert!(e.read(1 << 20, 1).await.is_err());
        assert!(e
            .write(u64::MAX, Bytes::from_static(b"x"), false)
            .await
            .is_err());
    }
}

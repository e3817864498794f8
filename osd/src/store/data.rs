//! The data area: one file of 64 KiB allocation units (AUs), each the home of one 64 KiB chunk
//! of one object, written in 4 KiB blocks; the allocator; and the blocks journaled but not yet
//! written home.
//!
//! A chunk's [`Extent`] record (in the `data` column family) names its AU and, per 4 KiB block,
//! the crc32c of the block as written, or `None` for a block of zeros that was never written.
//! Blocks are overwritten in place: a block reaches its home only after its journal record is
//! durable, so a torn home write is repaired by replaying the journal.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use super::io::BlockFile;
use super::journal::BlockWrite;
use super::types::CHUNK_SIZE;

/// Checksum and write unit.
pub const BLOCK: u64 = 4096;
/// The data file grows (with space reserved by `fallocate`) in steps of this many AUs.
const GROW_AUS: u64 = 1024;

const EXTENT_V1: u8 = 1;

/// Where a chunk's bytes live and what they must checksum to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Extent {
    pub au: u64,
    /// Per block up to the chunk's stored length: crc32c of the 4 KiB written (zero-padded past
    /// the stored length), or `None` for zeros never written.
    pub blocks: Vec<Option<u32>>,
}

impl Extent {
    pub fn encode(&self) -> Bytes {
        let mut v = vec![EXTENT_V1];
        v.extend_from_slice(&postcard::to_stdvec(self).unwrap_or_default());
        Bytes::from(v)
    }

    pub fn decode(raw: &[u8], what: &dyn std::fmt::Display) -> Result<Extent> {
        match raw.split_first() {
            Some((&EXTENT_V1, rest)) => postcard::from_bytes(rest)
                .map_err(|e| StoreError::corrupt_meta(format!("extent of {what}"), e)),
            _ => Err(StoreError::corrupt_meta(
                format!("extent of {what}"),
                "unknown format",
            )),
        }
    }
}

pub(crate) fn block_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// A growable bitmap of AUs (set = in use).
#[derive(Clone, Debug, Default)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

/// AUs per persisted bitmap page (a 32 KiB value).
pub(crate) const PAGE_AUS: u64 = 32 * 1024 * 8;

impl Bitmap {
    #[cfg(test)]
    fn get(&self, au: u64) -> bool {
        self.words
            .get((au / 64) as usize)
            .is_some_and(|w| w & (1 << (au % 64)) != 0)
    }

    pub fn set(&mut self, au: u64, on: bool) {
        let i = (au / 64) as usize;
        if i >= self.words.len() {
            if !on {
                return;
            }
            self.words.resize(i + 1, 0);
        }
        if on {
            self.words[i] |= 1 << (au % 64);
        } else {
            self.words[i] &= !(1 << (au % 64));
        }
    }

    /// Page `p` as bytes (little-endian words, trailing zero words dropped).
    pub fn page(&self, p: u64) -> Vec<u8> {
        let per = (PAGE_AUS / 64) as usize;
        let from = (p as usize * per).min(self.words.len());
        let to = ((p as usize + 1) * per).min(self.words.len());
        let mut words = &self.words[from..to];
        while let Some((&0, rest)) = words.split_last() {
            words = rest;
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn load_page(&mut self, p: u64, raw: &[u8]) -> Result<()> {
        if raw.len() % 8 != 0 || raw.len() as u64 > PAGE_AUS / 8 {
            return Err(StoreError::corrupt_meta(
                "allocation bitmap page",
                "bad length",
            ));
        }
        let base = (p * PAGE_AUS / 64) as usize;
        let need = base + raw.len() / 8;
        if self.words.len() < need {
            self.words.resize(need, 0);
        }
        for (i, w) in raw.chunks_exact(8).enumerate() {
            let mut b = [0; 8];
            b.copy_from_slice(w);
            self.words[base + i] = u64::from_le_bytes(b);
        }
        Ok(())
    }

    /// How many of AUs `0..limit` are in use.
    fn count_set(&self, limit: u64) -> u64 {
        let full_words = (limit / 64) as usize;
        let mut n: u64 = self
            .words
            .iter()
            .take(full_words)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = limit % 64;
        if rest > 0 {
            if let Some(w) = self.words.get(full_words) {
                n += u64::from((w & ((1u64 << rest) - 1)).count_ones());
            }
        }
        n
    }

    pub fn pages(&self) -> u64 {
        (self.words.len() as u64 * 64).div_ceil(PAGE_AUS)
    }

    fn first_clear_from(&self, from: u64, limit: u64) -> Option<u64> {
        let mut au = from;
        while au < limit {
            match self.words.get((au / 64) as usize) {
                None => return Some(au),
                Some(&w) if w == u64::MAX => au = (au / 64 + 1) * 64,
                Some(&w) => {
                    let bit = (!w & (u64::MAX << (au % 64))).trailing_zeros() as u64;
                    if bit < 64 {
                        let found = au / 64 * 64 + bit;
                        return (found < limit).then_some(found);
                    }
                    au = (au / 64 + 1) * 64;
                }
            }
        }
        None
    }
}

struct Allocator {
    /// AUs a build may not take: in use, or freed by a commit whose blocks may still be on
    /// their way home.
    taken: Bitmap,
    /// AUs the file has room for.
    total: u64,
    hint: u64,
}

/// The data file, its allocator and the pending (journaled, not yet home) blocks.
pub(crate) struct DataArea {
    file: Box<dyn BlockFile>,
    alloc: Mutex<Allocator>,
    /// (AU, block) → (seq of the group that wrote it, bytes), until the flusher wrote it home.
    pending: Mutex<HashMap<(u64, u16), (u64, Bytes)>>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Io("data area lock poisoned by a panicking thread".into())
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::from_io(what, e)
}

impl DataArea {
    /// `in_use` is the committed allocation state (from the last checkpoint plus replay).
    pub fn open(file: Box<dyn BlockFile>, in_use: Bitmap) -> Result<DataArea> {
        let total = file.len().map_err(io_err("data file size"))? / CHUNK_SIZE;
        Ok(DataArea {
            file,
            alloc: Mutex::new(Allocator {
                taken: in_use,
                total,
                hint: 0,
            }),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn offset(au: u64, block: u16) -> u64 {
        au * CHUNK_SIZE + block as u64 * BLOCK
    }

    /// Takes a free AU, growing the file (with its space reserved) when none is left, so the
    /// flusher can never meet ENOSPC for an acknowledged write.
    pub fn allocate(&self) -> Result<u64> {
        let mut a = self.alloc.lock().map_err(poisoned)?;
        let found = match a.taken.first_clear_from(a.hint, a.total) {
            Some(au) => Some(au),
            None => a.taken.first_clear_from(0, a.hint.min(a.total)),
        };
        let au = match found {
            Some(au) => au,
            None => {
                // Grow in big steps; near a full disk, in smaller ones down to a single AU.
                let au = a.total;
                let mut step = GROW_AUS;
                loop {
                    match self.file.allocate((a.total + step) * CHUNK_SIZE) {
                        Ok(()) => break,
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && step > 1 => step /= 2,
                        Err(e) => return Err(io_err("growing the data file")(e)),
                    }
                }
                a.total += step;
                au
            }
        };
        a.taken.set(au, true);
        a.hint = au + 1;
        Ok(au)
    }

    /// Bytes of the data file that are allocated on disk but hold no AU in use: room the
    /// store reuses before the file grows again (a filesystem's free space does not show it).
    pub fn free_bytes(&self) -> u64 {
        match self.alloc.lock() {
            Ok(a) => a.total.saturating_sub(a.taken.count_set(a.total)) * CHUNK_SIZE,
            Err(_) => 0,
        }
    }

    /// Makes AUs available to builds again.
    pub fn release(&self, aus: &[u64]) -> Result<()> {
        if aus.is_empty() {
            return Ok(());
        }
        let mut a = self.alloc.lock().map_err(poisoned)?;
        for &au in aus {
            a.taken.set(au, false);
        }
        Ok(())
    }

    /// Remembers blocks written by group `seq` so reads see them before they are home.
    pub fn stage(&self, seq: u64, blocks: &[BlockWrite]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        let mut p = self.pending.lock().map_err(poisoned)?;
        for b in blocks {
            p.insert((b.au, b.block), (seq, b.data.clone()));
        }
        Ok(())
    }

    /// Writes a whole chunk straight to its (fresh, unreferenced) AU: a large write is
    /// written once, and its record carries only the extent.
    pub fn write_direct(&self, au: u64, content: &[u8]) -> Result<()> {
        self.file
            .write_at(content, au * CHUNK_SIZE)
            .map_err(io_err("data write"))
    }

    /// Writes group `seq`'s blocks home (adjacent blocks in one write) and forgets the pending
    /// copies no later group replaced.
    pub fn write_home(&self, seq: u64, blocks: &[BlockWrite]) -> Result<()> {
        let mut sorted: Vec<&BlockWrite> = blocks.iter().collect();
        // Stable: of two writes to one block in a group, the later one is written last.
        sorted.sort_by_key(|b| Self::offset(b.au, b.block));
        let mut i = 0;
        while i < sorted.len() {
            let start = Self::offset(sorted[i].au, sorted[i].block);
            let mut j = i + 1;
            while j < sorted.len()
                && Self::offset(sorted[j].au, sorted[j].block) == start + (j - i) as u64 * BLOCK
            {
                j += 1;
            }
            if j - i == 1 {
                self.file
                    .write_at(&sorted[i].data, start)
                    .map_err(io_err("data write"))?;
            } else {
                let mut buf = Vec::with_capacity((j - i) * BLOCK as usize);
                for b in &sorted[i..j] {
                    buf.extend_from_slice(&b.data);
                }
                self.file
                    .write_at(&buf, start)
                    .map_err(io_err("data write"))?;
            }
            i = j;
        }
        let mut p = self.pending.lock().map_err(poisoned)?;
        for b in blocks {
            if p.get(&(b.au, b.block)).is_some_and(|(s, _)| *s == seq) {
                p.remove(&(b.au, b.block));
            }
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync().map_err(io_err("data file sync"))
    }

    /// Blocks `first..first + n` of `au` as they are now (staged or home), unverified.
    pub fn read_raw(&self, au: u64, first: usize, n: usize) -> Result<Vec<u8>> {
        let bs = BLOCK as usize;
        let mut out = vec![0u8; n * bs];
        let mut staged = vec![false; n];
        {
            let p = self.pending.lock().map_err(poisoned)?;
            for (i, hit) in staged.iter_mut().enumerate() {
                if let Some((_, data)) = p.get(&(au, (first + i) as u16)) {
                    out[i * bs..(i + 1) * bs].copy_from_slice(data);
                    *hit = true;
                }
            }
        }
        // One read for the run of blocks that must come from the file.
        let lo = staged.iter().position(|h| !h);
        let hi = staged.iter().rposition(|h| !h);
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let mut buf = vec![0u8; (hi - lo + 1) * bs];
            self.file
                .read_at(&mut buf, Self::offset(au, (first + lo) as u16))
                .map_err(io_err("data read"))?;
            for i in lo..=hi {
                if !staged[i] {
                    out[i * bs..(i + 1) * bs]
                        .copy_from_slice(&buf[(i - lo) * bs..(i - lo + 1) * bs]);
                }
            }
        }
        Ok(out)
    }

    /// Blocks `first..first + crcs.len()` of `au`, each verified against its crc; `None`
    /// blocks read as zeros.
    pub fn read_blocks(
        &self,
        au: u64,
        first: usize,
        crcs: &[Option<u32>],
        object: &dyn std::fmt::Display,
        chunk: u64,
    ) -> Result<Vec<u8>> {
        let bs = BLOCK as usize;
        let mut out = self.read_raw(au, first, crcs.len())?;
        for (i, crc) in crcs.iter().enumerate() {
            let blk = &mut out[i * bs..(i + 1) * bs];
            match crc {
                Some(c) if block_crc(blk) != *c => {
                    return Err(StoreError::Corrupt {
                        object: object.to_string(),
                        chunk,
                    })
                }
                Some(_) => {}
                None => blk.fill(0),
            }
        }
        Ok(out)
    }

    /// Test hook: flips bit 0 of byte `byte` of `au` at home (writing pending blocks home first).
    pub fn flip_bit(&self, au: u64, byte: u64) -> Result<()> {
        let pending: Vec<BlockWrite> = {
            let p = self.pending.lock().map_err(poisoned)?;
            p.iter()
                .filter(|((a, _), _)| *a == au)
                .map(|((a, b), (_, d))| BlockWrite {
                    au: *a,
                    block: *b,
                    data: d.clone(),
                })
                .collect()
        };
        self.write_home(u64::MAX, &pending)?;
        self.pending
            .lock()
            .map_err(poisoned)?
            .retain(|(a, _), _| *a != au);
        let at = au * CHUNK_SIZE + byte;
        let mut b = [0u8];
        self.file.read_at(&mut b, at).map_err(io_err("data read"))?;
        b[0] ^= 1;
        self.file.write_at(&b, at).map_err(io_err("data write"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_pages_round_trip_and_first_clear() {
        let mut b = Bitmap::default();
        for au in [0, 1, 2, 63, 64, 200_000, PAGE_AUS + 5] {
            b.set(au, true);
        }
        assert_eq!(b.first_clear_from(0, 10), Some(3));
        assert_eq!(b.first_clear_from(63, 100), Some(65));
        assert_eq!(b.first_clear_from(0, 3), None);
        let mut c = Bitmap::default();
        for p in 0..b.pages() {
            c.load_page(p, &b.page(p)).unwrap();
        }
        for au in 0..PAGE_AUS + 100 {
            assert_eq!(b.get(au), c.get(au), "au {au}");
        }
        b.set(PAGE_AUS + 5, false);
        assert!(b.page(1).is_empty());
    }
}

//! The write-ahead journal: a fixed-size ring file of checksummed records, one per commit group.
//!
//! # Record format
//!
//! ```text
//! 0   magic "BSJ2" (u32 LE)
//! 4   header crc32c (u32 LE) over bytes 8..32
//! 8   generation (u64 LE)
//! 16  seq (u64 LE)
//! 24  payload length (u32 LE)
//! 28  payload crc32c (u32 LE)
//! 32  payload: postcard-encoded [`Record`]
//! ```
//!
//! Records follow each other; one that would run past the end of the file starts at offset 0
//! instead. Replay starts at the last checkpoint's offset expecting `seq = checkpoint + 1` and
//! the checkpoint's generation, and follows the chain while records check out: a record is
//! accepted only with a valid magic, both checksums, the expected generation and exactly the
//! expected seq, at the current offset or (for a wrapped record) at offset 0. So a torn record
//! (bad checksum), a stale one from an earlier lap (older seq) and one written by an earlier
//! incarnation after its last durable record (older generation: every open that replays bumps
//! the generation) all end the chain. Nothing acknowledged can be behind that end: a commit is
//! acknowledged only after the `fdatasync` that covers its record and every record before it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::engine::KvOp;
use super::error::{Result, StoreError};
use super::io::BlockFile;

const MAGIC: u32 = u32::from_le_bytes(*b"BSJ2");
pub(crate) const HEADER_LEN: u64 = 32;

/// One 4 KiB block written to the data area: allocation unit `au`, block `block` within it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct BlockWrite {
    pub au: u64,
    pub block: u16,
    pub data: Bytes,
}

/// The physical redo of one commit group: replaying it onto the state of the previous record
/// gives the state after it. Key-value mutations, data blocks, and the allocation units the
/// group took and gave back.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Record {
    pub kv: Vec<KvOp>,
    pub blocks: Vec<BlockWrite>,
    pub alloc: Vec<u64>,
    pub free: Vec<u64>,
    /// Some chunks were written straight to fresh AUs (not in `blocks`): the data file is
    /// synced before this record is written.
    pub direct: bool,
}

impl Record {
    pub fn extend(&mut self, other: Record) {
        self.kv.extend(other.kv);
        self.blocks.extend(other.blocks);
        self.alloc.extend(other.alloc);
        self.free.extend(other.free);
        self.direct |= other.direct;
    }
}

/// Where the chain of live records starts and how it is identified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Position {
    pub generation: u64,
    /// Seq of the last record already applied to the checkpointed state.
    pub seq: u64,
    /// Offset where the record `seq + 1` goes.
    pub offset: u64,
}

pub(crate) fn encode(generation: u64, seq: u64, rec: &Record) -> Result<Vec<u8>> {
    let payload = postcard::to_stdvec(rec)
        .map_err(|e| StoreError::Io(format!("cannot encode a journal record: {e}")))?;
    let len = u32::try_from(payload.len()).map_err(|_| {
        StoreError::InvalidArgument(format!(
            "a commit group of {} bytes does not fit a journal record",
            payload.len()
        ))
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    let hcrc = crc32c::crc32c(&out[8..32]);
    out[4..8].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Where a record of `len` bytes goes if the head is at `head`: there, or at 0 if it would run
/// past the end of a `size`-byte ring.
pub(crate) fn place(head: u64, len: u64, size: u64) -> u64 {
    if head + len > size {
        0
    } else {
        head
    }
}

/// The record `expected` at `offset`, if it is there intact.
fn read_at(
    file: &dyn BlockFile,
    size: u64,
    offset: u64,
    generation: u64,
    expected: u64,
) -> Result<Option<(Record, u64)>> {
    if offset + HEADER_LEN > size {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_at(&mut h, offset)
        .map_err(|e| StoreError::Io(format!("journal read at {offset}: {e}")))?;
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(0) != MAGIC
        || u32_at(4) != crc32c::crc32c(&h[8..32])
        || u64_at(8) != generation
        || u64_at(16) != expected
    {
        return Ok(None);
    }
    let len = u32_at(24) as u64;
    if offset + HEADER_LEN + len > size {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    file.read_at(&mut payload, offset + HEADER_LEN)
        .map_err(|e| StoreError::Io(format!("journal read at {offset}: {e}")))?;
    if crc32c::crc32c(&payload) != u32_at(28) {
        return Ok(None);
    }
    let rec: Record = postcard::from_bytes(&payload).map_err(|e| {
        StoreError::corrupt_meta(format!("journal record {expected}"), e.to_string())
    })?;
    Ok(Some((rec, offset + HEADER_LEN + len)))
}

/// Reads the chain of records after `from`, calling `apply(seq, record)` for each in order;
/// returns the position after the last one.
pub(crate) fn replay(
    file: &dyn BlockFile,
    size: u64,
    from: Position,
    mut apply: impl FnMut(u64, Record) -> Result<()>,
) -> Result<Position> {
    let mut pos = from;
    loop {
        let next = pos.seq + 1;
        let found = match read_at(file, size, pos.offset, pos.generation, next)? {
            Some(r) => Some(r),
            None if pos.offset != 0 => read_at(file, size, 0, pos.generation, next)?,
            None => None,
        };
        let Some((rec, end)) = found else {
            return Ok(pos);
        };
        apply(next, rec)?;
        pos.seq = next;
        pos.offset = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::engine::Cf;
    use crate::store::io::MemFile;

    fn rec(i: u8) -> Record {
        Record {
            kv: vec![KvOp::Put(Cf::Meta, vec![i], Bytes::from(vec![i; 10]))],
            ..Record::default()
        }
    }

    fn write(f: &MemFile, size: u64, pos: &mut Position, r: &Record) {
        let bytes = encode(pos.generation, pos.seq + 1, r).unwrap();
        let at = place(pos.offset, bytes.len() as u64, size);
        f.write_at(&bytes, at).unwrap();
        pos.seq += 1;
        pos.offset = at + bytes.len() as u64;
    }

    fn seqs(f: &MemFile, size: u64, from: Position) -> Vec<u64> {
        let mut got = Vec::new();
        replay(f, size, from, |s, _| {
            got.push(s);
            Ok(())
        })
        .unwrap();
        got
    }

    #[test]
    fn chain_wraps_and_stops_at_stale_torn_or_foreign_records() {
        let size = 400;
        let f = MemFile::new();
        f.allocate(size).unwrap();
        let start = Position {
            generation: 1,
            seq: 0,
            offset: 0,
        };
        let mut pos = start;
        for i in 0..5 {
            write(&f, size, &mut pos, &rec(i));
        }
        // 5 records of ~60 bytes: the 6th... wrap happens once the ring is full.
        assert_eq!(seqs(&f, size, start), vec![1, 2, 3, 4, 5]);
        let mid = pos;
        for i in 5..9 {
            write(&f, size, &mut pos, &rec(i));
        }
        assert_eq!(seqs(&f, size, mid), vec![6, 7, 8, 9], "wrapped chain");

        // A torn last record ends the chain before it.
        let before = pos;
        write(&f, size, &mut pos, &rec(9));
        f.flip_bit(pos.offset - 3).unwrap();
        assert_eq!(seqs(&f, size, mid), vec![6, 7, 8, 9]);

        // A new generation does not pick up the old generation's records.
        let next_gen = Position {
            generation: 2,
            ..before
        };
        assert!(seqs(&f, size, next_gen).is_empty());
    }
}

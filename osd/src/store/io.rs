//! The few file operations the store's journal and data area use, behind a trait so tests can
//! swap the disk for one that forgets.
//!
//! [`OsFile`] is a real file (`pread`/`pwrite`/`fdatasync`/`fallocate`). [`MemFile`] keeps the
//! bytes in memory; built with [`MemFile::with_power_loss`] it also remembers every write not yet
//! covered by a completed [`BlockFile::sync`], and [`MemFile::power_loss`] returns the file as a
//! disk could hold it after the power went out: the synced bytes, plus a random subset of the
//! unsynced writes (in any order a disk's cache may reorder them), one of them torn inside its
//! last sector. That model is what the store's crash simulation (`tests/store_crash.rs`) checks
//! every acknowledged transaction against.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

use rand::Rng;

/// Sector size assumed atomic by nothing: a power loss may tear a write inside its last sector.
pub const SECTOR: usize = 512;

/// Positional file I/O. Reads beyond the end of the file return zeros.
pub trait BlockFile: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Reserves space so writes below `len` cannot fail for lack of it (grows the file).
    fn allocate(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
}

impl<T: BlockFile + ?Sized> BlockFile for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        (**self).allocate(len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
}

/// A file on a real filesystem.
pub struct OsFile(File);

impl OsFile {
    pub fn open(path: &std::path::Path, create: bool) -> io::Result<OsFile> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(OsFile(f))
    }
}

impl BlockFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.len()? >= len {
            return Ok(());
        }
        let len_i = i64::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        // SAFETY: fallocate on an fd we own, with a mode of 0 (allocate and extend).
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, 0, len_i) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Filesystems without fallocate: extend sparsely; ENOSPC then surfaces on write.
            Some(libc::EOPNOTSUPP) => self.0.set_len(len),
            _ => Err(err),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

/// A file in memory, optionally recording what a power loss could do to it.
pub struct MemFile {
    state: Mutex<MemState>,
}

#[derive(Default)]
struct MemState {
    /// The file as reads see it (bytes past the end read as zeros).
    bytes: Vec<u8>,
    /// Length set by `allocate` (space "reserved" without materialising it).
    len: u64,
    /// With power-loss tracking: every write since the last sync, with what it overwrote
    /// (the bytes, and the file's length before it), so the synced state can be rebuilt.
    tracking: bool,
    unsynced: Vec<Unsynced>,
}

struct Unsynced {
    offset: u64,
    data: Vec<u8>,
    old: Vec<u8>,
    old_len: usize,
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("in-memory file lock poisoned")
}

fn put(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(data);
}

impl MemFile {
    /// A file that never loses anything (the in-memory store).
    pub fn new() -> MemFile {
        MemFile {
            state: Mutex::new(MemState::default()),
        }
    }

    /// A file that remembers unsynced writes for [`MemFile::power_loss`].
    pub fn with_power_loss() -> MemFile {
        MemFile {
            state: Mutex::new(MemState {
                tracking: true,
                ..MemState::default()
            }),
        }
    }

    /// The file after a simulated power loss: synced bytes, then each unsynced write kept or
    /// lost at random (kept ones land in a random order, as a drive cache may reorder them),
    /// and, half the time, one kept write torn: only a prefix of its last sector reaches the
    /// platter. The returned file tracks power loss again.
    pub fn power_loss(&self, rng: &mut impl Rng) -> io::Result<MemFile> {
        let st = self.state.lock().map_err(poisoned)?;
        let mut bytes = st.bytes.clone();
        for u in st.unsynced.iter().rev() {
            let end = (u.offset as usize + u.old.len()).min(bytes.len());
            bytes[u.offset as usize..end].copy_from_slice(&u.old[..end - u.offset as usize]);
            bytes.truncate(u.old_len);
        }
        let mut kept: Vec<&Unsynced> = st
            .unsynced
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .collect();
        // Fisher-Yates: a drive cache writes back in its own order.
        for i in (1..kept.len()).rev() {
            kept.swap(i, rng.random_range(0..=i));
        }
        let torn =
            (!kept.is_empty() && rng.random_bool(0.5)).then(|| rng.random_range(0..kept.len()));
        for (i, u) in kept.iter().enumerate() {
            if Some(i) == torn && !u.data.is_empty() {
                let last_sector = (u.data.len() - 1) / SECTOR * SECTOR;
                let cut = last_sector + rng.random_range(0..u.data.len() - last_sector);
                put(&mut bytes, u.offset, &u.data[..cut]);
            } else {
                put(&mut bytes, u.offset, &u.data);
            }
        }
        Ok(MemFile {
            state: Mutex::new(MemState {
                bytes,
                len: st.len,
                tracking: true,
                unsynced: Vec::new(),
            }),
        })
    }

    /// Test hook: flips bit 0 of the byte at `offset`, bypassing everything.
    pub fn flip_bit(&self, offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().map_err(poisoned)?;
        if let Some(b) = st.bytes.get_mut(offset as usize) {
            *b ^= 1;
        }
        Ok(())
    }
}

impl Default for MemFile {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.state.lock().map_err(poisoned)?;
        let start = (offset as usize).min(st.bytes.len());
        let end = (offset as usize + buf.len()).min(st.bytes.len());
        let n = end - start;
        buf[..n].copy_from_slice(&st.bytes[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().map_err(poisoned)?;
        if st.tracking {
            let old_len = st.bytes.len();
            let start = (offset as usize).min(old_len);
            let end = (offset as usize + buf.len()).min(old_len);
            let old = st.bytes[start..end].to_vec();
            st.unsynced.push(Unsynced {
                offset,
                data: buf.to_vec(),
                old,
                old_len,
            });
        }
        put(&mut st.bytes, offset, buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.state.lock().map_err(poisoned)?.unsynced.clear();
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().map_err(poisoned)?;
        st.len = st.len.max(len);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let st = self.state.lock().map_err(poisoned)?;
        Ok(st.len.max(st.bytes.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn power_loss_keeps_synced_and_may_drop_or_tear_the_rest() {
        let f = MemFile::with_power_loss();
        f.write_at(&[1; 1000], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 1000], 1000).unwrap();
        let mut saw = [false; 3];
        for seed in 0..64 {
            let g = f
                .power_loss(&mut rand::rngs::StdRng::seed_from_u64(seed))
                .unwrap();
            let mut b = vec![0; 2000];
            g.read_at(&mut b, 0).unwrap();
            assert!(b[..1000].iter().all(|&x| x == 1), "synced bytes survive");
            let twos = b[1000..].iter().filter(|&&x| x == 2).count();
            saw[match twos {
                0 => 0,
                1000 => 1,
                _ => 2,
            }] = true;
        }
        assert_eq!(saw, [true, true, true], "lost, kept and torn all happen");
    }
}

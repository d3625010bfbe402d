//! The journal's view of a directory of files, and an in-memory implementation with fault
//! injection for tests.
//!
//! The journal never touches the file system except through [`Storage`]. The engine uses
//! [`super::dma::DmaStorage`] (glommio `DmaFile`: `O_DIRECT` over `io_uring`, explicit fdatasync);
//! tests use [`MemStorage`], whose futures are ready at once (or after a set number of polls),
//! so the whole journal runs under any executor, including `futures_lite::future::block_on`.
//!
//! Contract every implementation keeps: `write_at` offsets and lengths are multiples of
//! [`BLOCK_BYTES`] (`O_DIRECT`); a short write is returned as such, never retried here; nothing
//! written is durable before `fdatasync` returns Ok; after a failed `fdatasync` nothing about
//! the file's unsynced contents may be assumed (the kernel may have dropped the pages).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::format::BLOCK_BYTES;

/// A directory the journal owns. Names are flat (no subdirectories).
// Single-threaded by design (one journal per shard, on the shard's executor): the futures need
// not be Send, so plain `async fn` in the trait is what we want.
#[allow(async_fn_in_trait)]
pub trait Storage {
    /// An open file.
    type File: StorageFile;
    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    /// Creates a new file (it must not exist) and preallocates `len_bytes` (zeros).
    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<Self::File>;
    /// Renames `from` to `to`, replacing `to`. Durable after [`Storage::sync_dir`].
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file. Durable after [`Storage::sync_dir`].
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// The names in the directory.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Makes creates, renames and removes durable (fsync of the directory).
    async fn sync_dir(&self) -> io::Result<()>;
    /// Waits; the only clock the journal waits on (interval durability).
    async fn sleep(&self, d: Duration);
}

/// An open file of a [`Storage`].
#[allow(async_fn_in_trait)]
// `len` is the file's length, as in std; an empty file is never interesting here.
#[allow(clippy::len_without_is_empty)]
pub trait StorageFile {
    /// Reads up to `len` bytes at `pos` (fewer at the end of the file).
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Writes `data` at `pos`; both block-aligned. Returns the bytes written.
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<usize>;
    /// Makes everything written to this file durable.
    async fn fdatasync(&self) -> io::Result<()>;
    /// The file's length.
    async fn len(&self) -> io::Result<u64>;
}

/// True when `e` means the device is full.
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// How [`MemStorage::crash`] decides what survived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The process died; every completed write reached the device (`O_DIRECT`).
    KeepWritten,
    /// Power loss: only what was fdatasync'ed survives.
    DropUnsynced,
    /// Power loss mid-write: unsynced writes survive except the last one, of which only its
    /// first `keep_bytes` reached the device.
    TearLastWrite {
        /// Bytes of the last write that survive.
        keep_bytes: usize,
    },
}

/// Counters a test asserts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// fdatasync calls that succeeded.
    pub fdatasyncs: u64,
    /// `write_at` calls that succeeded.
    pub writes: u64,
    /// Bytes written by them.
    pub bytes_written: u64,
    /// `sync_dir` calls.
    pub dir_syncs: u64,
}

#[derive(Debug, Default, Clone)]
struct MemFileData {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Unsynced writes: (global write number, pos, len).
    unsynced: Vec<(u64, u64, usize)>,
}

#[derive(Debug, Default)]
struct MemInner {
    names: BTreeMap<String, u64>,
    files: HashMap<u64, MemFileData>,
    next_id: u64,
    write_no: u64,
    capacity_bytes: Option<u64>,
    fail_fdatasync_in: Option<u32>,
    fdatasync_polls: u32,
    stats: MemStats,
}

impl MemInner {
    fn allocated(&self) -> u64 {
        self.names.values().map(|id| self.files[id].data.len() as u64).sum()
    }
    fn id(&self, name: &str) -> io::Result<u64> {
        self.names.get(name).copied().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }
}

/// An in-memory directory with fault injection. Clones share the same files.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Rc<RefCell<MemInner>>,
}

impl MemStorage {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, creating or growing files past `bytes` in total fails with ENOSPC.
    pub fn set_capacity_bytes(&self, bytes: Option<u64>) {
        self.inner.borrow_mut().capacity_bytes = bytes;
    }

    /// After `n` more successful fdatasyncs, the next one fails with EIO (and its file's
    /// unsynced writes are dropped, as the kernel may do).
    pub fn fail_fdatasync_after(&self, n: u32) {
        self.inner.borrow_mut().fail_fdatasync_in = Some(n);
    }

    /// Each fdatasync returns Pending this many times before completing, so other tasks run
    /// while it is "in flight" (group commit needs a sync that takes time).
    pub fn set_fdatasync_polls(&self, polls: u32) {
        self.inner.borrow_mut().fdatasync_polls = polls;
    }

    /// Flips one bit of a file, in both its written and durable contents (bit rot).
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) {
        let mut inner = self.inner.borrow_mut();
        let id = inner.id(name).expect("flip_bit: no such file");
        let f = inner.files.get_mut(&id).expect("file");
        for img in [&mut f.data, &mut f.durable] {
            if let Some(b) = img.get_mut(offset as usize) {
                *b ^= 1 << bit;
            }
        }
    }

    /// Overwrites bytes of a file, written and durable (a test's scalpel).
    pub fn poke(&self, name: &str, offset: u64, bytes: &[u8]) {
        let mut inner = self.inner.borrow_mut();
        let id = inner.id(name).expect("poke: no such file");
        let f = inner.files.get_mut(&id).expect("file");
        let at = offset as usize;
        for img in [&mut f.data, &mut f.durable] {
            if img.len() < at + bytes.len() {
                img.resize(at + bytes.len(), 0);
            }
            img[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// A file's current (written) contents.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let inner = self.inner.borrow();
        inner.names.get(name).map(|id| inner.files[id].data.clone())
    }

    /// Names present, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.borrow().names.keys().cloned().collect()
    }

    /// Removes a file outright (a lost snapshot, an operator's mistake).
    pub fn delete(&self, name: &str) {
        self.inner.borrow_mut().names.remove(name);
    }

    /// Counters so far.
    pub fn stats(&self) -> MemStats {
        self.inner.borrow().stats
    }

    /// What a restart would find: a new, independent storage holding what survived `how`.
    /// Faults and counters are not carried over.
    #[must_use]
    pub fn crash(&self, how: Crash) -> MemStorage {
        let inner = self.inner.borrow();
        let last_write = inner
            .names
            .values()
            .flat_map(|id| inner.files[id].unsynced.iter().map(|w| w.0))
            .max();
        let mut out = MemInner::default();
        for (name, id) in &inner.names {
            let f = &inner.files[id];
            let mut img = match how {
                Crash::KeepWritten => f.data.clone(),
                Crash::DropUnsynced | Crash::TearLastWrite { .. } => f.durable.clone(),
            };
            if let Crash::TearLastWrite { keep_bytes } = how {
                img.resize(img.len().max(f.data.len()), 0);
                for &(no, pos, len) in &f.unsynced {
                    let len = if Some(no) == last_write { len.min(keep_bytes) } else { len };
                    let at = pos as usize;
                    img[at..at + len].copy_from_slice(&f.data[at..at + len]);
                }
            }
            out.next_id += 1;
            out.names.insert(name.clone(), out.next_id);
            out.files.insert(out.next_id, MemFileData { data: img.clone(), durable: img, unsynced: Vec::new() });
        }
        MemStorage { inner: Rc::new(RefCell::new(out)) }
    }
}

/// An open file of a [`MemStorage`]; follows renames (it holds the file, not the name).
#[derive(Debug, Clone)]
pub struct MemFile {
    inner: Rc<RefCell<MemInner>>,
    id: u64,
}

impl Storage for MemStorage {
    type File = MemFile;

    async fn open(&self, name: &str) -> io::Result<MemFile> {
        let id = self.inner.borrow().id(name)?;
        Ok(MemFile { inner: self.inner.clone(), id })
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<MemFile> {
        let mut inner = self.inner.borrow_mut();
        if inner.names.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, name.to_string()));
        }
        if inner.capacity_bytes.is_some_and(|cap| inner.allocated() + len_bytes > cap) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let zeros = vec![0u8; len_bytes as usize];
        inner.files.insert(id, MemFileData { data: zeros.clone(), durable: zeros, unsynced: Vec::new() });
        inner.names.insert(name.to_string(), id);
        Ok(MemFile { inner: self.inner.clone(), id })
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        let id = inner.id(from)?;
        inner.names.remove(from);
        inner.names.insert(to.to_string(), id);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        inner.id(name)?;
        inner.names.remove(name);
        Ok(())
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.names())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.inner.borrow_mut().stats.dir_syncs += 1;
        Ok(())
    }

    async fn sleep(&self, _d: Duration) {
        // Virtual time: the interval has passed as soon as the caller looks again.
        YieldOnce(false).await;
    }
}

impl StorageFile for MemFile {
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let inner = self.inner.borrow();
        let data = &inner.files[&self.id].data;
        let start = (pos as usize).min(data.len());
        let end = (start + len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<usize> {
        if pos % BLOCK_BYTES as u64 != 0 || data.len() % BLOCK_BYTES != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut inner = self.inner.borrow_mut();
        let end = pos as usize + data.len();
        let grow = end.saturating_sub(inner.files[&self.id].data.len()) as u64;
        if grow > 0 && inner.capacity_bytes.is_some_and(|cap| inner.allocated() + grow > cap) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        inner.write_no += 1;
        let no = inner.write_no;
        inner.stats.writes += 1;
        inner.stats.bytes_written += data.len() as u64;
        let f = inner.files.get_mut(&self.id).expect("file");
        if f.data.len() < end {
            f.data.resize(end, 0);
        }
        f.data[pos as usize..end].copy_from_slice(data);
        f.unsynced.push((no, pos, data.len()));
        Ok(data.len())
    }

    async fn fdatasync(&self) -> io::Result<()> {
        let polls = self.inner.borrow().fdatasync_polls;
        for _ in 0..polls {
            YieldOnce(false).await;
        }
        let mut inner = self.inner.borrow_mut();
        if let Some(n) = inner.fail_fdatasync_in {
            if n == 0 {
                inner.fail_fdatasync_in = None;
                // As after a real EIO: the dirty data is gone, the file keeps its old contents.
                let f = inner.files.get_mut(&self.id).expect("file");
                f.data = f.durable.clone();
                f.unsynced.clear();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            inner.fail_fdatasync_in = Some(n - 1);
        }
        inner.stats.fdatasyncs += 1;
        let f = inner.files.get_mut(&self.id).expect("file");
        f.durable.clone_from(&f.data);
        f.unsynced.clear();
        Ok(())
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.inner.borrow().files[&self.id].data.len() as u64)
    }
}

/// Returns Pending once (waking itself), then Ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn crash_modes_keep_what_they_promise() {
        let s = MemStorage::new();
        block_on(async {
            let f = s.create("a", 3 * 4096).await.unwrap();
            f.write_at(0, &[1u8; 4096]).await.unwrap();
            f.fdatasync().await.unwrap();
            f.write_at(4096, &[2u8; 4096]).await.unwrap();
            f.write_at(8192, &[3u8; 4096]).await.unwrap();
        });
        let img = |st: MemStorage| st.contents("a").unwrap();
        let dropped = img(s.crash(Crash::DropUnsynced));
        assert_eq!((dropped[0], dropped[4096], dropped[8192]), (1, 0, 0));
        let kept = img(s.crash(Crash::KeepWritten));
        assert_eq!((kept[4096], kept[8192]), (2, 3));
        let torn = img(s.crash(Crash::TearLastWrite { keep_bytes: 100 }));
        assert_eq!((torn[4096], torn[8192], torn[8291], torn[8292]), (2, 3, 3, 0));
    }

    #[test]
    fn faults_enospc_eio_alignment() {
        let s = MemStorage::new();
        s.set_capacity_bytes(Some(8192));
        block_on(async {
            let f = s.create("a", 4096).await.unwrap();
            assert!(is_no_space(&s.create("b", 8192).await.unwrap_err()));
            f.write_at(4096, &[1u8; 4096]).await.unwrap();
            assert!(is_no_space(&f.write_at(8192, &[1u8; 4096]).await.unwrap_err()));
            assert_eq!(f.write_at(10, &[1u8; 4096]).await.unwrap_err().raw_os_error(), Some(libc::EINVAL));
            s.fail_fdatasync_after(0);
            assert_eq!(f.fdatasync().await.unwrap_err().raw_os_error(), Some(libc::EIO));
            f.fdatasync().await.unwrap();
        });
        assert_eq!(s.contents("a").unwrap().len(), 4096, "failed sync dropped the unsynced growth");
    }
}

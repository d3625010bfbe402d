//! [`Storage`] over glommio's direct-I/O files: `O_DIRECT` reads and writes through the shard's
//! `io_uring`, explicit fdatasync, preallocation with fallocate. Must run inside a glommio
//! executor (the shard's).
//!
//! Not mmap, on purpose: page faults would stall the executor, write-back order would not be
//! ours, and I/O errors would arrive as SIGBUS (Crotty, Leis, Pavlo, CIDR 2022).
//!
//! Each write copies the frame bytes into a `DmaBuffer` (aligned memory the kernel may DMA
//! from); that copy is a few KiB per commit, small beside the fdatasync it precedes.
//! Directory listing uses `std::fs` (blocking): it happens at open and in the retention pass only.

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use glommio::io::{DmaFile, OpenOptions};

use super::storage::{Storage, StorageFile};

/// Largest single read issued (recovery reads whole segments in pieces of this size).
const READ_CHUNK_BYTES: usize = 4 << 20;
/// Chunks of one read in flight at once.
const READS_IN_FLIGHT_MAX: usize = 4;

/// Faults injected into every [`DmaStorage`] of the process, for the engine's fault tests
/// (`engine/tests/journal_faults.rs`); nothing else sets them. One relaxed atomic load per
/// write and per fdatasync when unset.
pub mod faults {
    use std::sync::atomic::{AtomicBool, Ordering};

    static NO_SPACE: AtomicBool = AtomicBool::new(false);
    static FAIL_NEXT_FDATASYNC: AtomicBool = AtomicBool::new(false);

    /// While set, every journal write fails with ENOSPC (a full device).
    pub fn set_no_space(full: bool) {
        NO_SPACE.store(full, Ordering::Relaxed);
    }

    /// The next fdatasync fails with EIO.
    pub fn fail_next_fdatasync() {
        FAIL_NEXT_FDATASYNC.store(true, Ordering::Relaxed);
    }

    /// True while a full device is simulated.
    pub fn no_space() -> bool {
        NO_SPACE.load(Ordering::Relaxed)
    }

    pub(super) fn write() -> std::io::Result<()> {
        if no_space() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    pub(super) fn fdatasync() -> std::io::Result<()> {
        if FAIL_NEXT_FDATASYNC.load(Ordering::Relaxed) && FAIL_NEXT_FDATASYNC.swap(false, Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// True when the file system holding `dir` has at least `bytes` available to this process
/// (statvfs), so a journal that found its device full may try writing again.
pub fn has_room(dir: &Path, bytes: u64) -> io::Result<bool> {
    if faults::no_space() {
        return Ok(false);
    }
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &raw mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(stat.f_bavail).saturating_mul(stat.f_frsize) >= bytes)
}

/// Polls every future until all are done; results in order.
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(out.iter_mut().map(|o| o.take().expect("ready")).collect())
        }
    })
    .await
}

/// A journal directory on a real file system.
#[derive(Debug, Clone)]
pub struct DmaStorage {
    dir: PathBuf,
    probed: Rc<Cell<bool>>,
}

/// Name of the file used to settle glommio's poll-ring probe (ends in `.tmp`: recovery removes
/// a leftover).
const PROBE_NAME: &str = "iopoll-probe.tmp";

impl DmaStorage {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        // Absolute: glommio opens a relative directory path with no base descriptor and fails
        // with EBADF (the default data directory, `./switchboard-data`, is relative).
        let dir = std::fs::canonicalize(dir.as_ref())?;
        Ok(Self { dir, probed: Rc::new(Cell::new(false)) })
    }

    /// glommio decides once per device and thread whether reads may use the poll ring
    /// (IOPOLL), by reading the first block of the first direct-I/O file opened there. If that
    /// file is empty (a new segment), the read ends at EOF without reaching the device, the
    /// probe wrongly says yes, and every later read on the device fails with EOPNOTSUPP (seen
    /// here on virtio disks). So before anything else, open a file that has a block in it.
    async fn settle_probe(&self) -> io::Result<()> {
        if self.probed.replace(true) {
            return Ok(());
        }
        let path = self.dir.join(PROBE_NAME);
        std::fs::write(&path, vec![0u8; 4096])?;
        let file = OpenOptions::new().read(true).dma_open(&path).await;
        let _ = std::fs::remove_file(&path);
        file?.close().await?;
        Ok(())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An open direct-I/O file.
#[derive(Debug)]
pub struct DmaStorageFile {
    file: DmaFile,
}

impl Storage for DmaStorage {
    type File = DmaStorageFile;

    async fn open(&self, name: &str) -> io::Result<DmaStorageFile> {
        self.settle_probe().await?;
        let file = OpenOptions::new().read(true).write(true).dma_open(self.dir.join(name)).await?;
        Ok(DmaStorageFile { file })
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<DmaStorageFile> {
        self.settle_probe().await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(self.dir.join(name))
            .await?;
        if len_bytes > 0 {
            // keep_size = false: the file is `len_bytes` long at once, so writes inside it
            // never change its size (fdatasync then has less metadata to flush).
            if let Err(e) = file.pre_allocate(len_bytes, false).await {
                let _ = file.close().await;
                let _ = std::fs::remove_file(self.dir.join(name));
                return Err(e.into());
            }
        }
        Ok(DmaStorageFile { file })
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        glommio::io::rename(self.dir.join(from), self.dir.join(to)).await?;
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        glommio::io::remove(self.dir.join(name)).await?;
        Ok(())
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(n) = entry.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let dir = glommio::io::Directory::open(&self.dir).await?;
        dir.sync().await?;
        dir.close().await?;
        Ok(())
    }

    async fn sleep(&self, d: Duration) {
        glommio::timer::sleep(d).await;
    }
}

impl StorageFile for DmaStorageFile {
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        // Large reads (recovery reads whole segments) go out as chunks, up to
        // READS_IN_FLIGHT_MAX at a time: one 4 MiB request at a time leaves the device idle
        // between requests.
        let mut out = vec![0u8; len];
        let mut filled = 0usize;
        let chunks: Vec<usize> = (0..len).step_by(READ_CHUNK_BYTES).collect();
        for group in chunks.chunks(READS_IN_FLIGHT_MAX) {
            let reads = group.iter().map(|&at| {
                let want = (len - at).min(READ_CHUNK_BYTES);
                async move { self.file.read_at(pos + at as u64, want).await.map(|r| (at, want, r)) }
            });
            let mut short = false;
            for res in join_all(reads.collect()).await {
                let (at, want, r) = res?;
                out[at..at + r.len()].copy_from_slice(&r);
                if at == filled {
                    filled += r.len();
                }
                short |= r.len() < want;
            }
            if short {
                break;
            }
        }
        out.truncate(filled);
        Ok(out)
    }

    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<usize> {
        faults::write()?;
        let mut buf = self.file.alloc_dma_buffer(data.len());
        buf.as_bytes_mut().copy_from_slice(data);
        Ok(self.file.write_at(buf, pos).await?)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        faults::fdatasync()?;
        Ok(self.file.fdatasync().await?)
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.file.file_size().await?)
    }
}

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

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use glommio::io::{DmaFile, OpenOptions};

use super::storage::{Storage, StorageFile};

/// Largest single read issued (recovery reads whole segments in pieces of this size).
const READ_CHUNK_BYTES: usize = 4 << 20;

/// A journal directory on a real file system.
#[derive(Debug, Clone)]
pub struct DmaStorage {
    dir: PathBuf,
}

impl DmaStorage {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(Self { dir: dir.as_ref().to_path_buf() })
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
        let file = OpenOptions::new().read(true).write(true).dma_open(self.dir.join(name)).await?;
        Ok(DmaStorageFile { file })
    }

    async fn create(&self, name: &str, len_bytes: u64) -> io::Result<DmaStorageFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(self.dir.join(name))
            .await?;
        if len_bytes > 0 {
            // keep_size = false: the file is `len_bytes` long at once, so writes inside it
            // never change its size (fdatasync then has less metadata to flush).
            file.pre_allocate(len_bytes, false).await?;
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
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let want = (len - out.len()).min(READ_CHUNK_BYTES);
            let r = self.file.read_at(pos + out.len() as u64, want).await?;
            if r.is_empty() {
                break;
            }
            out.extend_from_slice(&r);
            if r.len() < want {
                break;
            }
        }
        Ok(out)
    }

    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<usize> {
        let mut buf = self.file.alloc_dma_buffer(data.len());
        buf.as_bytes_mut().copy_from_slice(data);
        Ok(self.file.write_at(buf, pos).await?)
    }

    async fn fdatasync(&self) -> io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    async fn len(&self) -> io::Result<u64> {
        Ok(self.file.file_size().await?)
    }
}

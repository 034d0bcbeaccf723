//! Parallel deflate for [`super::EpisodeWriter`]: worker threads compress frames into HDF5
//! deflate-filter chunks, which the writer stores in order with `H5Dwrite_chunk`.

use super::{keys, EpisodeError, Result};
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Worker threads deflating frames into HDF5 deflate-filter chunks (zlib streams, as
/// `H5Z_filter_deflate` writes them).
pub(super) struct Compressor {
    jobs: Option<SyncSender<(usize, Vec<u8>)>>,
    results: Receiver<(usize, Vec<u8>)>,
    workers: Vec<JoinHandle<()>>,
    /// Finished chunks waiting for their predecessors.
    pending: BTreeMap<usize, Vec<u8>>,
}

impl Compressor {
    pub(super) fn start(threads: usize, level: u8) -> Self {
        let (jobs, job_rx) = sync_channel::<(usize, Vec<u8>)>(threads * 2);
        let (done_tx, results) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let (job_rx, done_tx) = (Arc::clone(&job_rx), done_tx.clone());
                std::thread::spawn(move || loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((index, raw)) = job else { return };
                    let level = Compression::new(level.into());
                    let mut enc = ZlibEncoder::new(Vec::with_capacity(raw.len() / 4), level);
                    // Writing into a Vec cannot fail.
                    let chunk = enc
                        .write_all(&raw)
                        .and_then(|_| enc.finish())
                        .unwrap_or_default();
                    if done_tx.send((index, chunk)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Self {
            jobs: Some(jobs),
            results,
            workers,
            pending: BTreeMap::new(),
        }
    }

    /// Queues frame `index`; blocks while every worker is busy (back-pressure on the caller).
    pub(super) fn submit(&self, index: usize, raw: Vec<u8>, path: &Path) -> Result<()> {
        let lost = || EpisodeError::hdf5(path, keys::IMAGES, "compression thread stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(lost)?
            .send((index, raw))
            .map_err(|_| lost())
    }

    /// The consecutive finished chunks from `next` on; blocks until they reach `until`.
    pub(super) fn ready(
        &mut self,
        mut next: usize,
        until: usize,
        path: &Path,
    ) -> Result<Vec<(usize, Vec<u8>)>> {
        let mut out = Vec::new();
        loop {
            while let Ok((i, c)) = self.results.try_recv() {
                self.pending.insert(i, c);
            }
            while let Some(chunk) = self.pending.remove(&next) {
                out.push((next, chunk));
                next += 1;
            }
            if next >= until {
                return Ok(out);
            }
            let (i, c) = self.results.recv().map_err(|_| {
                EpisodeError::hdf5(path, keys::IMAGES, "compression thread stopped".into())
            })?;
            self.pending.insert(i, c);
        }
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Stores an already-deflated chunk at frame `index` (`H5Dwrite_chunk`, HDF5 >= 1.10.3).
pub(super) fn write_chunk(images: &hdf5::Dataset, index: usize, chunk: &[u8]) -> hdf5::Result<()> {
    let offset: [hdf5_sys::h5::hsize_t; 4] = [index as _, 0, 0, 0];
    // SAFETY: `images` is a live 4-D chunked dataset with chunk (1, H, W, 3) and the deflate
    // filter; `offset` has 4 entries; `chunk` outlives the call. The library lock serialises it
    // with every other HDF5 call of this process.
    let status = hdf5::sync::sync(|| unsafe {
        hdf5_sys::h5d::H5Dwrite_chunk(
            images.id(),
            hdf5_sys::h5p::H5P_DEFAULT,
            0,
            offset.as_ptr(),
            chunk.len(),
            chunk.as_ptr().cast(),
        )
    });
    if status < 0 {
        return Err(format!("H5Dwrite_chunk failed for frame {index}").into());
    }
    Ok(())
}

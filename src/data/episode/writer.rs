//! Streaming episode writer: frames are appended one at a time to chunked, resizable datasets in
//! `.<name>.h5.partial`; `finish()` sets the attributes, closes, fsyncs and renames to
//! `<name>.h5`. A writer that dies (crash, SIGKILL) therefore never leaves a file under a final
//! name, and because the partial is flushed every `flush_every` frames, [`recover_partials`] can
//! salvage the frames written before the crash.
//!
//! For a recorder: own the writer on a dedicated thread fed by a bounded queue (drop, and count,
//! frames the queue cannot take, never block the ROS callbacks); convert camera frames with
//! `image::to_interleaved(img, writer.channel_order())`; call `finish(duration)` on stop and
//! `abort()` to cancel; run [`recover_partials`] on the output directory at start-up. For
//! 30 Hz 1280×720 with gzip on a 2-core robot set `compression_threads(2)` and gzip level 1
//! (`benches/episode_write.rs` measures it):
//!
//! ```no_run
//! # use mobile_vla::data::episode::{EpisodeWriter, EventType, WriteOptions};
//! # fn frames() -> Vec<(image::RgbImage, [f32; 3])> { vec![] }
//! let opts = WriteOptions::default().gzip_level(Some(1)).compression_threads(2);
//! let mut w = EpisodeWriter::create("episodes".as_ref(), "episode_20251203_122510", opts)?;
//! for (i, (frame, action)) in frames().into_iter().enumerate() {
//!     let event = if i == 0 { EventType::EpisodeStart } else { EventType::StartAction };
//!     w.push(&frame, action, event)?;
//! }
//! let path = w.finish(7.2)?;
//! # Ok::<(), mobile_vla::data::episode::EpisodeError>(())
//! ```

use super::reader::{salvage_partial, Salvaged};
use super::{
    keys, Action, CollectionInfo, EpisodeError, EventType, Result, ACTION_DIM,
    DEFAULT_ACTION_CHUNK_SIZE, DEFAULT_CHANNEL_ORDER, INSTRUCTION_LEN,
};
use crate::data::image::ChannelOrder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use hdf5::types::{FixedAscii, FixedUnicode, VarLenUnicode};
use image::RgbImage;
use ndarray::{s, ArrayView1, ArrayView3};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Suffix of in-progress episode files (`.<name>.h5.partial`).
pub const PARTIAL_SUFFIX: &str = ".h5.partial";
/// Suffix of the copy [`recover_partials`] builds before renaming it to the final name.
const SALVAGE_SUFFIX: &str = ".h5.salvage";

/// How an episode is written. Defaults follow the fork: gzip level 4 (h5py's default for
/// `compression='gzip'`), `action_chunk_size` 8, BGR frames.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Deflate level 0–9 for every dataset; `None` stores uncompressed.
    pub gzip_level: Option<u8>,
    pub action_chunk_size: i64,
    /// Channel order of the frames given to [`EpisodeWriter::push`], recorded as `image_channel_order`.
    pub channel_order: ChannelOrder,
    /// Stored as `language_instruction` (fixed 256-byte string) when set.
    pub instruction: Option<String>,
    pub collection: CollectionInfo,
    /// Flush HDF5 metadata every this many frames, so a crash loses at most that many.
    pub flush_every: usize,
    /// Threads that deflate frames in parallel (written with HDF5's direct chunk write); 0
    /// compresses inline in HDF5's filter pipeline. Needed for 30 Hz 720p with gzip on 2 cores.
    pub compression_threads: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            gzip_level: Some(4),
            action_chunk_size: DEFAULT_ACTION_CHUNK_SIZE,
            channel_order: DEFAULT_CHANNEL_ORDER,
            instruction: None,
            collection: CollectionInfo::default(),
            flush_every: 1,
            compression_threads: 0,
        }
    }
}

impl WriteOptions {
    pub fn gzip_level(mut self, level: Option<u8>) -> Self {
        self.gzip_level = level.map(|l| l.min(9));
        self
    }
    pub fn channel_order(mut self, order: ChannelOrder) -> Self {
        self.channel_order = order;
        self
    }
    pub fn instruction(mut self, instruction: Option<String>) -> Self {
        self.instruction = instruction;
        self
    }
    pub fn collection(mut self, collection: CollectionInfo) -> Self {
        self.collection = collection;
        self
    }
    pub fn flush_every(mut self, frames: usize) -> Self {
        self.flush_every = frames.max(1);
        self
    }
    pub fn compression_threads(mut self, threads: usize) -> Self {
        self.compression_threads = threads;
        self
    }
    pub fn action_chunk_size(mut self, size: i64) -> Self {
        self.action_chunk_size = size;
        self
    }
}

struct Sets {
    images: Option<hdf5::Dataset>,
    actions: hdf5::Dataset,
    events: hdf5::Dataset,
}

/// Appends frames to a new episode. Not `Sync`: one writer per thread (the recorder owns it on
/// its writer thread).
pub struct EpisodeWriter {
    name: String,
    partial: PathBuf,
    final_path: PathBuf,
    file: Option<hdf5::File>,
    sets: Option<Sets>,
    opts: WriteOptions,
    len: usize,
    /// (height, width), fixed by the first frame.
    size: Option<(u32, u32)>,
    started: Instant,
    /// Parallel deflate; frames reach `images` in order, possibly behind `len`.
    compressor: Option<Compressor>,
    /// Frames present in `images` (equals `len` without a compressor).
    images_written: usize,
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(EpisodeError::BadName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// `dir/.<name>.h5.partial`
pub(crate) fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}{PARTIAL_SUFFIX}"))
}

impl EpisodeWriter {
    /// Starts `dir/<name>.h5` (written as `dir/.<name>.h5.partial` until [`finish`](Self::finish)).
    pub fn create(dir: &Path, name: &str, opts: WriteOptions) -> Result<Self> {
        validate_name(name)?;
        let partial = partial_path(dir, name);
        if partial.exists() {
            return Err(EpisodeError::Exists { path: partial });
        }
        Self::create_at(partial, dir.join(format!("{name}.h5")), name, opts)
    }

    fn create_at(
        partial: PathBuf,
        final_path: PathBuf,
        name: &str,
        opts: WriteOptions,
    ) -> Result<Self> {
        if final_path.exists() {
            return Err(EpisodeError::Exists { path: final_path });
        }
        if let Some(text) = &opts.instruction {
            if text.len() > INSTRUCTION_LEN {
                return Err(EpisodeError::InstructionTooLong { len: text.len() });
            }
        }
        let file =
            hdf5::File::create(&partial).map_err(|e| EpisodeError::hdf5(&partial, "file", e))?;
        let mut writer = Self {
            name: name.to_string(),
            partial,
            final_path,
            file: Some(file),
            sets: None,
            opts,
            len: 0,
            size: None,
            started: Instant::now(),
            compressor: None,
            images_written: 0,
        };
        if let Err(e) = writer.init() {
            // Nothing worth recovering yet.
            writer.discard();
            return Err(e);
        }
        Ok(writer)
    }

    /// Attributes with provisional counts (so a crashed partial is self-describing), the
    /// per-step datasets and the instruction. `images` waits for the first frame's size.
    fn init(&mut self) -> Result<()> {
        let (file, path) = (self.file()?, self.partial.clone());
        let h5 = |field: &str| {
            let path = path.clone();
            let field = field.to_string();
            move |e| EpisodeError::Hdf5 {
                path,
                field,
                source: e,
            }
        };
        write_str_attr(file, keys::EPISODE_NAME, &self.name).map_err(h5(keys::EPISODE_NAME))?;
        write_num_attr(file, keys::TOTAL_DURATION, 0.0f64).map_err(h5(keys::TOTAL_DURATION))?;
        write_num_attr(file, keys::NUM_FRAMES, 0i64).map_err(h5(keys::NUM_FRAMES))?;
        write_num_attr(file, keys::ACTION_CHUNK_SIZE, self.opts.action_chunk_size)
            .map_err(h5(keys::ACTION_CHUNK_SIZE))?;
        let order = self.opts.channel_order.as_str();
        write_str_attr(file, keys::CHANNEL_ORDER, order).map_err(h5(keys::CHANNEL_ORDER))?;
        let c = &self.opts.collection;
        for (key, value) in [
            (keys::OBSTACLE_LAYOUT_TYPE, &c.obstacle_layout_type),
            (keys::TIME_PERIOD, &c.time_period),
            (keys::COLLECTION_DATETIME, &c.collection_datetime),
        ] {
            if let Some(v) = value {
                write_str_attr(file, key, v).map_err(h5(key))?;
            }
        }
        for (key, value) in [
            (keys::COLLECTION_HOUR, c.collection_hour),
            (keys::COLLECTION_MINUTE, c.collection_minute),
        ] {
            if let Some(v) = value {
                write_num_attr(file, key, v).map_err(h5(key))?;
            }
        }
        if let Some(text) = &self.opts.instruction {
            write_instruction(file, text).map_err(h5(keys::INSTRUCTION))?;
        }
        let gzip = self.opts.gzip_level;
        let actions = with_gzip(file.new_dataset::<f32>(), gzip)
            .chunk((64, ACTION_DIM))
            .shape((0.., ACTION_DIM))
            .create(keys::ACTIONS)
            .map_err(h5(keys::ACTIONS))?;
        let events = with_gzip(file.new_dataset::<VarLenUnicode>(), gzip)
            .chunk(64)
            .shape(0..)
            .create(keys::EVENTS)
            .map_err(h5(keys::EVENTS))?;
        self.sets = Some(Sets {
            images: None,
            actions,
            events,
        });
        Ok(())
    }

    fn file(&self) -> Result<&hdf5::File> {
        self.file.as_ref().ok_or_else(|| EpisodeError::Closed {
            path: self.partial.clone(),
        })
    }

    fn h5err(&self, field: &str) -> impl Fn(hdf5::Error) -> EpisodeError + '_ {
        let field = field.to_string();
        move |e| EpisodeError::hdf5(&self.partial, &field, e)
    }

    /// Episode name (file stem).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Frames written so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The order [`push`](Self::push) expects frames in (convert with `image::to_interleaved`).
    pub fn channel_order(&self) -> ChannelOrder {
        self.opts.channel_order
    }
    /// Where the episode will be once finished.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Appends one step. `frame` holds H×W×3 bytes already in [`channel_order`](Self::channel_order);
    /// every frame of an episode must have the first frame's size.
    pub fn push(&mut self, frame: &RgbImage, action: Action, event: EventType) -> Result<()> {
        if action.iter().any(|v| !v.is_finite()) {
            return Err(EpisodeError::NonFiniteAction {
                path: self.partial.clone(),
                index: self.len,
                action,
            });
        }
        let (w, h) = frame.dimensions();
        match self.size {
            None => self.create_images(h, w)?,
            Some((hh, ww)) if (hh, ww) != (h, w) => {
                return Err(EpisodeError::FrameSize {
                    path: self.partial.clone(),
                    index: self.len,
                    want_w: ww,
                    want_h: hh,
                    got_w: w,
                    got_h: h,
                })
            }
            Some(_) => {}
        }
        let n = self.len;
        let sets = self.sets.as_ref().ok_or_else(|| EpisodeError::Closed {
            path: self.partial.clone(),
        })?;
        if let Some(c) = &self.compressor {
            c.submit(n, frame.as_raw().clone(), &self.partial)?;
        } else if let Some(images) = &sets.images {
            let view = ArrayView3::from_shape((h as usize, w as usize, 3), frame.as_raw())
                .map_err(|e| {
                    EpisodeError::hdf5(&self.partial, keys::IMAGES, e.to_string().into())
                })?;
            images
                .resize((n + 1, h as usize, w as usize, 3))
                .map_err(self.h5err(keys::IMAGES))?;
            images
                .write_slice(view, s![n, .., .., ..])
                .map_err(self.h5err(keys::IMAGES))?;
            self.images_written = n + 1;
        }
        sets.actions
            .resize((n + 1, ACTION_DIM))
            .map_err(self.h5err(keys::ACTIONS))?;
        sets.actions
            .write_slice(ArrayView1::from(&action[..]), s![n, ..])
            .map_err(self.h5err(keys::ACTIONS))?;
        let label = VarLenUnicode::from_str(event.as_str())
            .map_err(|e| EpisodeError::hdf5(&self.partial, keys::EVENTS, e.to_string().into()))?;
        sets.events
            .resize(n + 1)
            .map_err(self.h5err(keys::EVENTS))?;
        sets.events
            .write_slice(&[label], s![n..n + 1])
            .map_err(self.h5err(keys::EVENTS))?;
        self.len += 1;
        self.write_compressed(false)?;
        if self.len % self.opts.flush_every == 0 {
            self.checkpoint(self.started.elapsed().as_secs_f64())?;
        }
        Ok(())
    }

    fn create_images(&mut self, h: u32, w: u32) -> Result<()> {
        let (h, w) = (h as usize, w as usize);
        let images = with_gzip(self.file()?.new_dataset::<u8>(), self.opts.gzip_level)
            .chunk((1, h, w, 3))
            .shape((0.., h, w, 3))
            .create(keys::IMAGES)
            .map_err(self.h5err(keys::IMAGES))?;
        if let Some(sets) = self.sets.as_mut() {
            sets.images = Some(images);
        }
        self.size = Some((h as u32, w as u32));
        if let (Some(level), n @ 1..) = (self.opts.gzip_level, self.opts.compression_threads) {
            self.compressor = Some(Compressor::start(n, level));
        }
        Ok(())
    }

    /// Writes the compressed frames that are ready, in order (`wait`: all submitted ones).
    fn write_compressed(&mut self, wait: bool) -> Result<()> {
        let Some(c) = self.compressor.as_mut() else {
            return Ok(());
        };
        let images = self.sets.as_ref().and_then(|s| s.images.as_ref());
        let (Some(images), Some((h, w))) = (images, self.size) else {
            return Ok(());
        };
        let until = if wait { self.len } else { self.images_written };
        for (index, chunk) in c.ready(self.images_written, until, &self.partial)? {
            let err = |e| EpisodeError::hdf5(&self.partial, keys::IMAGES, e);
            images
                .resize((index + 1, h as usize, w as usize, 3))
                .map_err(err)?;
            write_chunk(images, index, &chunk).map_err(err)?;
            self.images_written = index + 1;
        }
        Ok(())
    }

    /// Updates the counts and pushes HDF5's metadata to the OS, making the partial readable.
    fn checkpoint(&self, duration: f64) -> Result<()> {
        let file = self.file()?;
        write_num_attr(file, keys::NUM_FRAMES, self.images_written as i64)
            .map_err(self.h5err(keys::NUM_FRAMES))?;
        write_num_attr(file, keys::TOTAL_DURATION, duration)
            .map_err(self.h5err(keys::TOTAL_DURATION))?;
        file.flush().map_err(self.h5err("file"))
    }

    /// Completes the episode: final attributes, close, fsync, atomic rename to `<name>.h5`.
    /// `total_duration` is in seconds (the fork measures wall time from start to stop).
    /// An empty episode is discarded and reported as [`EpisodeError::Empty`].
    pub fn finish(mut self, total_duration: f64) -> Result<PathBuf> {
        if self.len == 0 {
            self.discard();
            return Err(EpisodeError::Empty {
                path: self.final_path.clone(),
            });
        }
        self.write_compressed(true)?;
        self.checkpoint(total_duration)?;
        self.close()?;
        if self.final_path.exists() {
            return Err(EpisodeError::Exists {
                path: self.final_path.clone(),
            });
        }
        crate::fsutil::persist(&self.partial, &self.final_path)
            .map_err(|e| EpisodeError::io(&self.final_path, e))?;
        Ok(self.final_path.clone())
    }

    /// Drops the episode: closes and deletes the partial file.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        // Closing errors are irrelevant: the file is deleted either way.
        let _ = self.close();
        if let Err(e) = std::fs::remove_file(&self.partial) {
            tracing::warn!("could not delete {}: {e}", self.partial.display());
        }
    }

    fn close(&mut self) -> Result<()> {
        self.compressor = None;
        self.sets = None;
        match self.file.take() {
            Some(file) => file
                .close()
                .map_err(|e| EpisodeError::hdf5(&self.partial, "file", e)),
            None => Ok(()),
        }
    }
}

impl Drop for EpisodeWriter {
    /// Best effort for a writer that was neither finished nor aborted (e.g. unwinding): flush
    /// and keep the partial for [`recover_partials`].
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = self.write_compressed(true);
            let _ = self.checkpoint(self.started.elapsed().as_secs_f64());
            let _ = self.close();
            tracing::warn!(
                "episode {} was not finished; its {} frame(s) stay in {} (run `mobile_vla dataset recover`)",
                self.name,
                self.len,
                self.partial.display()
            );
        }
    }
}

/// Worker threads deflating frames into HDF5 deflate-filter chunks (zlib streams, as
/// `H5Z_filter_deflate` writes them).
struct Compressor {
    jobs: Option<SyncSender<(usize, Vec<u8>)>>,
    results: Receiver<(usize, Vec<u8>)>,
    workers: Vec<JoinHandle<()>>,
    /// Finished chunks waiting for their predecessors.
    pending: BTreeMap<usize, Vec<u8>>,
}

impl Compressor {
    fn start(threads: usize, level: u8) -> Self {
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
    fn submit(&self, index: usize, raw: Vec<u8>, path: &Path) -> Result<()> {
        let lost = || EpisodeError::hdf5(path, keys::IMAGES, "compression thread stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(lost)?
            .send((index, raw))
            .map_err(|_| lost())
    }

    /// The consecutive finished chunks from `next` on; blocks until they reach `until`.
    fn ready(
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
fn write_chunk(images: &hdf5::Dataset, index: usize, chunk: &[u8]) -> hdf5::Result<()> {
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

fn with_gzip(builder: hdf5::DatasetBuilderEmpty, level: Option<u8>) -> hdf5::DatasetBuilderEmpty {
    match level {
        Some(l) => builder.deflate(l),
        None => builder,
    }
}

fn write_str_attr(loc: &hdf5::Location, name: &str, value: &str) -> hdf5::Result<()> {
    let v = VarLenUnicode::from_str(value).map_err(|e| hdf5::Error::from(e.to_string()))?;
    let attr = match loc.attr(name) {
        Ok(a) => a,
        Err(_) => loc.new_attr::<VarLenUnicode>().create(name)?,
    };
    attr.write_scalar(&v)
}

fn write_num_attr<T: hdf5::H5Type>(loc: &hdf5::Location, name: &str, value: T) -> hdf5::Result<()> {
    let attr = match loc.attr(name) {
        Ok(a) => a,
        Err(_) => loc.new_attr::<T>().create(name)?,
    };
    attr.write_scalar(&value)
}

/// `language_instruction`: shape (1,), numpy `S256` (ASCII, null-padded) like the fork; UTF-8
/// text that is not ASCII gets the same layout with the UTF-8 character set.
fn write_instruction(file: &hdf5::File, text: &str) -> hdf5::Result<()> {
    let err = |e: hdf5::types::StringError| hdf5::Error::from(e.to_string());
    if text.is_ascii() {
        let v = FixedAscii::<INSTRUCTION_LEN>::from_ascii(text).map_err(err)?;
        file.new_dataset::<FixedAscii<INSTRUCTION_LEN>>()
            .shape(1)
            .create(keys::INSTRUCTION)?
            .write(&[v])
    } else {
        let v = FixedUnicode::<INSTRUCTION_LEN>::from_str(text).map_err(err)?;
        file.new_dataset::<FixedUnicode<INSTRUCTION_LEN>>()
            .shape(1)
            .create(keys::INSTRUCTION)?
            .write(&[v])
    }
}

/// What [`recover_partials`] did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Final files rebuilt from partials, with their frame counts.
    pub recovered: Vec<(PathBuf, usize)>,
    /// Partials deleted, with the reason.
    pub discarded: Vec<(PathBuf, String)>,
}

/// Salvages the `.<name>.h5.partial` files that crashed writers left in `dir`: the frames that
/// are readable and consistent across `images`/`actions`/`action_event_types` are copied into a
/// fresh `<name>.h5` (same metadata); partials with nothing usable are deleted. Logged at
/// `info`/`warn`.
pub fn recover_partials(dir: &Path) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EpisodeError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let Some(fname) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if fname.starts_with('.') && fname.ends_with(SALVAGE_SUFFIX) {
            // A recovery that itself crashed: its source partial is still there.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some(name) = fname
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
        else {
            continue;
        };
        let final_path = dir.join(format!("{name}.h5"));
        let reason = if final_path.exists() {
            Some("a finished episode with this name exists".to_string())
        } else {
            match salvage_into(dir, name, &path, &final_path) {
                Ok(frames) => {
                    tracing::info!(
                        "recovered {} frame(s) from {} into {}",
                        frames,
                        path.display(),
                        final_path.display()
                    );
                    report.recovered.push((final_path, frames));
                    None
                }
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(reason) = &reason {
            tracing::warn!("discarding {}: {reason}", path.display());
            report.discarded.push((path.clone(), reason.clone()));
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("could not delete {}: {e}", path.display());
        }
    }
    Ok(report)
}

fn salvage_into(dir: &Path, name: &str, partial: &Path, final_path: &Path) -> Result<usize> {
    let Salvaged {
        meta,
        frames,
        actions,
        events,
    } = salvage_partial(partial)?;
    if frames == 0 {
        return Err(EpisodeError::Empty {
            path: partial.to_path_buf(),
        });
    }
    let opts = WriteOptions {
        gzip_level: meta.gzip_level,
        action_chunk_size: meta.action_chunk_size,
        channel_order: meta.channel_order,
        instruction: meta.instruction.clone(),
        collection: meta.collection.clone(),
        // One flush at the end: the source stays until the copy is complete.
        flush_every: usize::MAX,
        compression_threads: 0,
    };
    let salvage = dir.join(format!(".{name}{SALVAGE_SUFFIX}"));
    let mut writer = EpisodeWriter::create_at(salvage, final_path.to_path_buf(), name, opts)?;
    let copied =
        (0..frames).try_for_each(|t| writer.push(&meta.read_frame(t)?, actions[t], events[t]));
    match copied {
        Ok(()) => writer.finish(meta.total_duration).map(|_| frames),
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

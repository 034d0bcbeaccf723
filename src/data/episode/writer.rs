//! Streaming episode writer (one cohesive piece, hence one file over the usual size): frames are appended one at a time to chunked, resizable datasets in
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

use super::compress::{write_chunk, Compressor};
use super::{
    keys, Action, CollectionInfo, EpisodeError, EventType, Result, ACTION_DIM,
    DEFAULT_ACTION_CHUNK_SIZE, DEFAULT_CHANNEL_ORDER, INSTRUCTION_LEN,
};
use crate::data::image::ChannelOrder;
use hdf5::types::{FixedAscii, FixedUnicode, VarLenUnicode};
use image::RgbImage;
use ndarray::{s, ArrayView1, ArrayView3};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// Suffix of in-progress episode files (`.<name>.h5.partial`).
pub const PARTIAL_SUFFIX: &str = ".h5.partial";

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

fn check_instruction(instruction: Option<&str>) -> Result<()> {
    match instruction {
        Some(text) if text.len() > INSTRUCTION_LEN => {
            Err(EpisodeError::InstructionTooLong { len: text.len() })
        }
        _ => Ok(()),
    }
}

/// Whether [`EpisodeWriter::create`] would accept this episode: a plain file stem not taken by
/// a finished or partial episode in `dir`, and an instruction that fits the format. For
/// callers that must answer before a writer thread opens the file (recorder_node).
pub fn check_new_episode(dir: &Path, name: &str, instruction: Option<&str>) -> Result<()> {
    validate_name(name)?;
    for path in [partial_path(dir, name), dir.join(format!("{name}.h5"))] {
        if path.exists() {
            return Err(EpisodeError::Exists { path });
        }
    }
    check_instruction(instruction)
}

impl EpisodeWriter {
    /// Starts `dir/<name>.h5` (written as `dir/.<name>.h5.partial` until [`finish`](Self::finish)).
    pub fn create(dir: &Path, name: &str, opts: WriteOptions) -> Result<Self> {
        check_new_episode(dir, name, opts.instruction.as_deref())?;
        Self::create_at(
            partial_path(dir, name),
            dir.join(format!("{name}.h5")),
            name,
            opts,
        )
    }

    pub(super) fn create_at(
        partial: PathBuf,
        final_path: PathBuf,
        name: &str,
        opts: WriteOptions,
    ) -> Result<Self> {
        // Also checked here for the salvage copy, which has its own temporary path.
        if final_path.exists() {
            return Err(EpisodeError::Exists { path: final_path });
        }
        check_instruction(opts.instruction.as_deref())?;
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
    /// Counts the episode's wall time from `t` (when it was asked for) rather than from when
    /// the file was created, which a busy writer thread may do much later.
    pub fn started_at(&mut self, t: Instant) {
        self.started = t;
    }

    /// Seconds since the episode started: its wall time when no caller measured it.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
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
            self.checkpoint(self.elapsed_s())?;
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
            let _ = self.checkpoint(self.elapsed_s());
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

//! Reading episode files. A file is opened in-process only after [`validate_file`] checked it
//! in a child process (libhdf5 can crash on corrupt metadata); [`open_episodes`] opens many,
//! skipping (and reporting) the invalid ones.

use super::format::{inspect, list};
use super::isolate::{validate_file, Depth};
use super::{
    keys, Action, Defect, EpisodeError, EpisodeMeta, EventType, Result, DEFAULT_CHANNEL_ORDER,
};
use crate::data::image::{self as img, ChannelOrder};
use image::RgbImage;
use ndarray::{s, Ix3};
use std::path::{Path, PathBuf};

/// How files are interpreted.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Channel order assumed when `image_channel_order` is absent (legacy fork files).
    pub default_channel_order: ChannelOrder,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            default_channel_order: DEFAULT_CHANNEL_ORDER,
        }
    }
}

/// An open, validated episode. Actions and events are loaded; frames are read on demand.
pub struct EpisodeReader {
    path: PathBuf,
    images: hdf5::Dataset,
    meta: EpisodeMeta,
    actions: Vec<Action>,
    events: Vec<EventType>,
    // Keeps the file open for `images` (datasets hold only a weak reference to it).
    _file: hdf5::File,
}

impl std::fmt::Debug for EpisodeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpisodeReader")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .finish()
    }
}

impl EpisodeReader {
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, ReadOptions::default())
    }

    /// Opens and validates `path`; any defect fails with [`EpisodeError::Invalid`] listing all
    /// of them. The file is checked in a child process first (see [`validate_file`]), so a file
    /// that crashes libhdf5 is an error here, not a crash.
    pub fn open_with(path: &Path, opts: ReadOptions) -> Result<Self> {
        let defects = validate_file(path, Depth::Structure);
        if !defects.is_empty() {
            return Err(EpisodeError::Invalid {
                path: path.to_path_buf(),
                defects,
            });
        }
        Self::open_in_process(path, opts)
    }

    /// Opens without the child-process check: only for files already checked.
    fn open_in_process(path: &Path, opts: ReadOptions) -> Result<Self> {
        let (parts, defects) = inspect(path, opts);
        match parts {
            Some(p) if defects.is_empty() => Ok(Self {
                path: path.to_path_buf(),
                images: p.images,
                meta: p.meta,
                actions: p.actions,
                events: p.events,
                _file: p.file,
            }),
            _ => Err(EpisodeError::Invalid {
                path: path.to_path_buf(),
                defects,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }
    pub fn events(&self) -> &[EventType] {
        &self.events
    }
    pub fn len(&self) -> usize {
        self.actions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
    /// Stored instruction, else derived from the file name.
    pub fn instruction(&self) -> Option<String> {
        self.meta.instruction()
    }

    /// Frame `t` exactly as stored (channels in `meta().channel_order`).
    pub fn read_frame_stored(&self, t: usize) -> Result<RgbImage> {
        if t >= self.len() {
            return Err(EpisodeError::FrameIndex {
                path: self.path.clone(),
                index: t,
                len: self.len(),
            });
        }
        let (h, w) = self.meta.frame_size;
        read_frame(&self.images, &self.path, t, h, w)
    }

    /// Frame `t` as true RGB, whatever the stored order.
    pub fn read_frame(&self, t: usize) -> Result<RgbImage> {
        Ok(img::from_interleaved(
            self.read_frame_stored(t)?,
            self.meta.channel_order,
        ))
    }
}

pub(super) fn read_frame(
    images: &hdf5::Dataset,
    path: &Path,
    t: usize,
    h: u32,
    w: u32,
) -> Result<RgbImage> {
    let field = format!("{}[{t}]", keys::IMAGES);
    let arr = images
        .read_slice::<u8, _, Ix3>(s![t, .., .., ..])
        .map_err(|e| EpisodeError::hdf5(path, &field, e))?;
    let (raw, _) = arr.into_raw_vec_and_offset();
    RgbImage::from_raw(w, h, raw)
        .ok_or_else(|| EpisodeError::hdf5(path, &field, "frame buffer has the wrong size".into()))
}

/// The checks [`validate_file`] runs in its child: the format, then the first and last frame
/// (walking the chunk index) or, with [`Depth::EveryFrame`], every frame.
pub(super) fn check_in_process(path: &Path, depth: Depth) -> Vec<Defect> {
    let r = match EpisodeReader::open_in_process(path, ReadOptions::default()) {
        Ok(r) => r,
        Err(EpisodeError::Invalid { defects, .. }) => return defects,
        Err(e) => return vec![Defect::new("file", e.to_string())],
    };
    let steps: Vec<usize> = match depth {
        Depth::Structure => {
            let mut ends = vec![0, r.len() - 1];
            ends.dedup();
            ends
        }
        Depth::EveryFrame => (0..r.len()).collect(),
    };
    let unreadable: Vec<usize> = steps
        .into_iter()
        .filter(|&t| r.read_frame_stored(t).is_err())
        .collect();
    if unreadable.is_empty() {
        return Vec::new();
    }
    vec![Defect::new(
        keys::IMAGES,
        format!("frames {} cannot be decompressed", list(&unreadable)),
    )]
}

/// The episodes [`open_episodes`] opened, and the files it skipped with their error.
#[derive(Debug, Default)]
pub struct OpenedEpisodes {
    pub episodes: Vec<EpisodeReader>,
    pub skipped: Vec<EpisodeError>,
}

/// Opens every file of `paths`. An invalid or corrupt one is logged and skipped (listed in
/// `skipped`), unless `strict`, where the first one is the error.
pub fn open_episodes(paths: &[PathBuf], opts: ReadOptions, strict: bool) -> Result<OpenedEpisodes> {
    let mut out = OpenedEpisodes::default();
    for p in paths {
        match EpisodeReader::open_with(p, opts) {
            Ok(r) => out.episodes.push(r),
            Err(e) if strict => return Err(e),
            Err(e) => {
                tracing::warn!("skipping {e}");
                out.skipped.push(e);
            }
        }
    }
    Ok(out)
}

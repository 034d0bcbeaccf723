//! Training samples over a directory of episodes, sampled the way RoboVLMs does
//! (`get_chunked_episode` with `window_sample="sliding"`, then `get_tensor_chunk`):
//!
//! A sample is anchored at step `i` of an episode of `T` steps. It covers the indices
//! `j = i - W + 1 + m` for `m in 0..W+N` (`W = window_size`, `N = fwd_pred_next_n`); an index
//! outside `0..T` is clamped into it and masked. The model sees the `W` window frames
//! `i-W+1 ..= i`; window frame `t` is trained to predict the chunk of `N` actions
//! `a[j_t], a[j_t + 1], …, a[j_t + N - 1]`, each masked when past the episode's end.
//! Without `left_pad` only anchors with a full window (`i >= W-1`) are used, as in RoboVLMs'
//! default; with it every step is an anchor and the missing history repeats the first frame.
//!
//! Normalisation follows RoboVLMs' `normalize_action`: clip to `[min, max]`, then
//! `2 (a - min) / (max - min) - 1`; the inverse is `0.5 (a + 1) (max - min) + min`.

use crate::data::episode::{
    list_episodes, open_episodes, Action, EpisodeError, EpisodeReader, EventType, ReadOptions,
    ACTION_DIM,
};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Episode(#[from] EpisodeError),
    #[error("{dir}: no episodes (*.h5) found")]
    NoEpisodes { dir: PathBuf },
    #[error("window_size and fwd_pred_next_n must be > 0 (got {window_size}, {fwd_pred_next_n})")]
    BadWindow {
        window_size: usize,
        fwd_pred_next_n: usize,
    },
    #[error("val_fraction {0} is outside [0, 1)")]
    BadValFraction(f64),
    #[error("sample {index} out of range ({len} samples)")]
    Index { index: usize, len: usize },
    #[error(
        "normalisation bounds min {min:?} must be finite and below max {max:?} in every dimension"
    )]
    BadBounds { min: Action, max: Action },
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// Windowing and split settings (fork defaults: window 16, chunk 2).
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub window_size: usize,
    pub fwd_pred_next_n: usize,
    /// Also anchor samples before a full window exists (history left-padded and masked).
    pub left_pad: bool,
    /// Fraction of episodes held out for validation.
    pub val_fraction: f64,
    /// Seed of the episode shuffle that decides the split.
    pub seed: u64,
    pub read: ReadOptions,
    /// Fail on an invalid or corrupt episode file instead of skipping it (with a warning; see
    /// [`MobileVlaDataset::skipped`]).
    pub strict: bool,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            window_size: 16,
            fwd_pred_next_n: 2,
            left_pad: false,
            val_fraction: 0.1,
            seed: 42,
            read: ReadOptions::default(),
            strict: false,
        }
    }
}

/// One training example.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Index of the episode in the dataset and its file.
    pub episode: usize,
    pub path: PathBuf,
    /// Anchor step `i` (the last window frame).
    pub anchor: usize,
    pub instruction: Option<String>,
    /// `window_size` frames, true RGB, oldest first.
    pub frames: Vec<RgbImage>,
    /// False for left-padded history frames.
    pub frame_mask: Vec<bool>,
    /// `[window_size][fwd_pred_next_n]` raw (unnormalised) action targets.
    pub action_chunks: Vec<Vec<Action>>,
    /// Same shape; false where the target lies outside the episode.
    pub chunk_mask: Vec<Vec<bool>>,
    /// Event labels of the window frames.
    pub events: Vec<EventType>,
}

/// Step indices and masks of the sample anchored at `anchor` (RoboVLMs' `get_chunked_episode`):
/// `W + N` entries, clamped into `0..len`, masked where they were outside.
pub fn chunk_indices(
    anchor: usize,
    len: usize,
    window_size: usize,
    fwd_pred_next_n: usize,
) -> (Vec<usize>, Vec<bool>) {
    let start = anchor as i64 - window_size as i64 + 1;
    (0..(window_size + fwd_pred_next_n) as i64)
        .map(|m| {
            let j = start + m;
            let inside = j >= 0 && j < len as i64;
            (j.clamp(0, len as i64 - 1) as usize, inside)
        })
        .unzip()
}

/// Episodes of a directory and the samples they yield.
pub struct MobileVlaDataset {
    cfg: DatasetConfig,
    episodes: Vec<EpisodeReader>,
    /// (episode, anchor) pairs.
    samples: Vec<(usize, usize)>,
    /// Files left out as invalid or corrupt (empty with `strict`).
    skipped: Vec<EpisodeError>,
}

impl MobileVlaDataset {
    /// Opens every `*.h5` of `dir`. Each file is checked in a child process first (libhdf5 can
    /// crash on corrupt files); an invalid one is skipped and listed in [`Self::skipped`], or
    /// with `cfg.strict` is an error naming its defects.
    pub fn open(dir: &Path, cfg: DatasetConfig) -> Result<Self> {
        let paths = list_episodes(dir)?;
        if paths.is_empty() {
            return Err(DatasetError::NoEpisodes {
                dir: dir.to_path_buf(),
            });
        }
        Self::from_files(&paths, cfg)
    }

    pub fn from_files(paths: &[PathBuf], cfg: DatasetConfig) -> Result<Self> {
        if cfg.window_size == 0 || cfg.fwd_pred_next_n == 0 {
            return Err(DatasetError::BadWindow {
                window_size: cfg.window_size,
                fwd_pred_next_n: cfg.fwd_pred_next_n,
            });
        }
        if !(0.0..1.0).contains(&cfg.val_fraction) {
            return Err(DatasetError::BadValFraction(cfg.val_fraction));
        }
        let opened = open_episodes(paths, cfg.read, cfg.strict)?;
        let mut ds = Self::from_readers(opened.episodes, cfg);
        ds.skipped = opened.skipped;
        Ok(ds)
    }

    fn from_readers(episodes: Vec<EpisodeReader>, cfg: DatasetConfig) -> Self {
        let first = if cfg.left_pad { 0 } else { cfg.window_size - 1 };
        let samples = episodes
            .iter()
            .enumerate()
            .flat_map(|(e, ep)| (first..ep.len()).map(move |i| (e, i)))
            .collect();
        Self {
            cfg,
            episodes,
            samples,
            skipped: Vec::new(),
        }
    }

    /// Splits by episode (never a window across both sides): a seeded shuffle of the episodes,
    /// the first `round(n * val_fraction)` (at least one when there are two or more episodes
    /// and the fraction is > 0) go to validation. Returns (train, val).
    pub fn split(self) -> (Self, Self) {
        let n = self.episodes.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(self.cfg.seed));
        let mut n_val = (n as f64 * self.cfg.val_fraction).round() as usize;
        if self.cfg.val_fraction > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let mut is_val = vec![false; n];
        for &e in &order[..n_val] {
            is_val[e] = true;
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (e, ep) in self.episodes.into_iter().enumerate() {
            if is_val[e] {
                val.push(ep)
            } else {
                train.push(ep)
            }
        }
        (
            Self::from_readers(train, self.cfg.clone()),
            Self::from_readers(val, self.cfg),
        )
    }

    pub fn config(&self) -> &DatasetConfig {
        &self.cfg
    }
    pub fn episodes(&self) -> &[EpisodeReader] {
        &self.episodes
    }
    /// Files skipped as invalid or corrupt, each with its defects.
    pub fn skipped(&self) -> &[EpisodeError] {
        &self.skipped
    }
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Sample `index` with its frames read from disk.
    pub fn get(&self, index: usize) -> Result<Sample> {
        let &(e, anchor) = self.samples.get(index).ok_or(DatasetError::Index {
            index,
            len: self.samples.len(),
        })?;
        let ep = &self.episodes[e];
        let (w, n) = (self.cfg.window_size, self.cfg.fwd_pred_next_n);
        let (idx, mask) = chunk_indices(anchor, ep.len(), w, n);
        let frames = idx[..w]
            .iter()
            .map(|&j| ep.read_frame(j))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let actions = ep.actions();
        let action_chunks = (0..w)
            .map(|t| (0..n).map(|k| actions[idx[t + k]]).collect())
            .collect();
        let chunk_mask = (0..w)
            .map(|t| (0..n).map(|k| mask[t + k]).collect())
            .collect();
        Ok(Sample {
            episode: e,
            path: ep.path().to_path_buf(),
            anchor,
            instruction: ep.instruction(),
            frames,
            frame_mask: mask[..w].to_vec(),
            action_chunks,
            chunk_mask,
            events: idx[..w].iter().map(|&j| ep.events()[j]).collect(),
        })
    }

    /// Per-dimension min/max over every action of every episode in this dataset.
    pub fn action_stats(&self) -> Option<ActionStats> {
        ActionStats::from_actions(self.episodes.iter().flat_map(|e| e.actions().iter()))
    }
}

/// Per-dimension range of a set of actions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ActionStats {
    pub min: Action,
    pub max: Action,
    pub count: usize,
}

impl ActionStats {
    pub fn from_actions<'a>(actions: impl IntoIterator<Item = &'a Action>) -> Option<Self> {
        let mut stats: Option<Self> = None;
        for a in actions {
            let s = stats.get_or_insert(Self {
                min: *a,
                max: *a,
                count: 0,
            });
            for (d, v) in a.iter().enumerate() {
                s.min[d] = s.min[d].min(*v);
                s.max[d] = s.max[d].max(*v);
            }
            s.count += 1;
        }
        stats
    }
}

/// One dimension's RoboVLMs action normalisation into [-1, 1] and back: the single formula the
/// dataset (training targets) and the policy (`policy.json`'s `action.norm`, de-normalising its
/// output) share.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormRange {
    pub min: f32,
    pub max: f32,
}

impl NormRange {
    /// Finite bounds with `min < max`: the only ranges the formulas can invert.
    pub fn is_valid(&self) -> bool {
        self.min.is_finite() && self.max.is_finite() && self.min < self.max
    }

    /// RoboVLMs' `normalize_action`: clip to `[min, max]`, then `2 (a - min) / (max - min) - 1`.
    pub fn normalize(&self, a: f32) -> f32 {
        2.0 * (a.clamp(self.min, self.max) - self.min) / (self.max - self.min) - 1.0
    }

    /// RoboVLMs' `unnoramalize_action`: `0.5 (a + 1) (max - min) + min` (no clipping).
    pub fn denormalize(&self, a: f32) -> f32 {
        0.5 * (a + 1.0) * (self.max - self.min) + self.min
    }
}

/// RoboVLMs' action normalisation into [-1, 1] and back, per dimension ([`NormRange`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ActionNormalizer {
    pub min: Action,
    pub max: Action,
}

impl ActionNormalizer {
    /// RoboVLMs' scalar `norm_min`/`norm_max` for every dimension (the fork uses ±1).
    pub fn from_bounds(norm_min: f32, norm_max: f32) -> Result<Self> {
        Self::new([norm_min; ACTION_DIM], [norm_max; ACTION_DIM])
    }

    /// Per-dimension bounds, e.g. from [`ActionStats`].
    pub fn new(min: Action, max: Action) -> Result<Self> {
        let n = Self { min, max };
        if !(0..ACTION_DIM).all(|d| n.range(d).is_valid()) {
            return Err(DatasetError::BadBounds { min, max });
        }
        Ok(n)
    }

    fn range(&self, d: usize) -> NormRange {
        NormRange {
            min: self.min[d],
            max: self.max[d],
        }
    }

    /// [`NormRange::normalize`] per dimension.
    pub fn normalize(&self, a: Action) -> Action {
        std::array::from_fn(|d| self.range(d).normalize(a[d]))
    }

    /// [`NormRange::denormalize`] per dimension.
    pub fn denormalize(&self, a: Action) -> Action {
        std::array::from_fn(|d| self.range(d).denormalize(a[d]))
    }
}

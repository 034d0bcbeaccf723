//! Helpers shared by the episode/dataset/bag tests.
#![allow(dead_code)]

use hdf5::types::VarLenUnicode;
use image::RgbImage;
use mobile_vla::data::episode::{Action, EpisodeWriter, EventType, WriteOptions};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A deterministic frame whose every byte depends on (t, y, x, c), so swaps and shifts show.
pub fn frame(t: usize, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = |c: u32| ((t as u32 * 31 + y * 7 + x * 3 + c * 101) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
}

/// Action of step `t`: distinct per step and dimension.
pub fn action(t: usize) -> Action {
    [t as f32 * 0.1, -(t as f32) * 0.05, 0.5 - t as f32 * 0.01]
}

pub fn event(t: usize) -> EventType {
    if t == 0 {
        EventType::EpisodeStart
    } else if t % 3 == 0 {
        EventType::StopAction
    } else {
        EventType::StartAction
    }
}

/// Writes a valid `t`-frame episode with [`frame`]/[`action`]/[`event`] through [`EpisodeWriter`].
pub fn write_episode(
    dir: &Path,
    name: &str,
    t: usize,
    w: u32,
    h: u32,
    opts: WriteOptions,
) -> PathBuf {
    let mut writer = EpisodeWriter::create(dir, name, opts).unwrap();
    for i in 0..t {
        writer.push(&frame(i, w, h), action(i), event(i)).unwrap();
    }
    writer.finish(t as f64 * 0.4).unwrap()
}

/// What a hand-built (possibly defective) file contains.
pub struct RawEpisode {
    pub images: Option<(Vec<usize>, Vec<u8>)>,
    pub images_f32: bool,
    pub actions: Option<(Vec<usize>, Vec<f32>)>,
    pub events: Option<Vec<String>>,
    pub name_attr: Option<String>,
    pub duration: Option<f64>,
    pub num_frames: Option<i64>,
    pub chunk: Option<i64>,
    pub order: Option<String>,
}

impl RawEpisode {
    /// A valid 4-frame 8x6 episode written without our writer (as h5py would).
    pub fn valid() -> Self {
        let t = 4;
        let (h, w) = (6, 8);
        Self {
            images: Some((
                vec![t, h, w, 3],
                (0..t * h * w * 3).map(|i| (i % 251) as u8).collect(),
            )),
            images_f32: false,
            actions: Some((vec![t, 3], (0..t * 3).map(|i| i as f32 * 0.25).collect())),
            events: Some(vec![
                "episode_start".into(),
                "start_action".into(),
                "start_action".into(),
                "stop_action".into(),
            ]),
            name_attr: Some("episode_raw".into()),
            duration: Some(1.6),
            num_frames: Some(t as i64),
            chunk: Some(8),
            order: None,
        }
    }

    pub fn write(&self, path: &Path) {
        let f = hdf5::File::create(path).unwrap();
        if let Some((shape, data)) = &self.images {
            if self.images_f32 {
                let d: Vec<f32> = data.iter().map(|&v| v as f32).collect();
                f.new_dataset::<f32>()
                    .shape(shape.clone())
                    .create("images")
                    .unwrap()
                    .write_raw(&d)
                    .unwrap();
            } else {
                f.new_dataset::<u8>()
                    .shape(shape.clone())
                    .deflate(4)
                    .create("images")
                    .unwrap()
                    .write_raw(data)
                    .unwrap();
            }
        }
        if let Some((shape, data)) = &self.actions {
            f.new_dataset::<f32>()
                .shape(shape.clone())
                .create("actions")
                .unwrap()
                .write_raw(data)
                .unwrap();
        }
        if let Some(events) = &self.events {
            let v: Vec<VarLenUnicode> = events
                .iter()
                .map(|s| VarLenUnicode::from_str(s).unwrap())
                .collect();
            f.new_dataset::<VarLenUnicode>()
                .shape(v.len())
                .create("action_event_types")
                .unwrap()
                .write_raw(&v)
                .unwrap();
        }
        let s = |v: &str| VarLenUnicode::from_str(v).unwrap();
        if let Some(n) = &self.name_attr {
            f.new_attr::<VarLenUnicode>()
                .create("episode_name")
                .unwrap()
                .write_scalar(&s(n))
                .unwrap();
        }
        if let Some(d) = self.duration {
            f.new_attr::<f64>()
                .create("total_duration")
                .unwrap()
                .write_scalar(&d)
                .unwrap();
        }
        if let Some(n) = self.num_frames {
            f.new_attr::<i64>()
                .create("num_frames")
                .unwrap()
                .write_scalar(&n)
                .unwrap();
        }
        if let Some(c) = self.chunk {
            f.new_attr::<i64>()
                .create("action_chunk_size")
                .unwrap()
                .write_scalar(&c)
                .unwrap();
        }
        if let Some(o) = &self.order {
            f.new_attr::<VarLenUnicode>()
                .create("image_channel_order")
                .unwrap()
                .write_scalar(&s(o))
                .unwrap();
        }
    }
}

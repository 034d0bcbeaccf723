//! Bag → episodes. Messages are replayed in recording order; the steps are chosen by the same
//! [`Sampler`] as live recording (see [`crate::data::sampling`]), each paired with the latest
//! camera frame at its time. An episode opens at the first moving command (its
//! `episode_start` frame, then that command's step), as if `~/start_episode` had been called
//! just before it. With `split_on_idle`, an episode closes once no moving command came for that
//! long, and the next moving command opens a new one; without it the bag is one episode.

use super::{
    cdr, Bag, BagError, Result, COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, STRING_TYPE, TWIST_STAMPED_TYPE,
    TWIST_TYPE,
};
use crate::data::episode::{episode_name, Action, EpisodeWriter, WriteOptions};
use crate::data::image::{self as img, RawImageRef};
use crate::data::sampling::{is_moving, nanos, Sampler, SamplerConfig, Step};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Image topic (`sensor_msgs/Image` or `CompressedImage`); default: the bag's only one.
    pub image_topic: Option<String>,
    /// Command topic (`geometry_msgs/Twist` or `TwistStamped`); default: the bag's only one.
    pub cmd_topic: Option<String>,
    /// `std_msgs/String` topic whose latest message is the instruction; default: the only one, if any.
    pub instruction_topic: Option<String>,
    /// Fixed instruction (overrides the topic).
    pub instruction: Option<String>,
    pub split_on_idle: Option<Duration>,
    pub sampling: SamplerConfig,
    pub write: WriteOptions,
    /// Appended to episode names (`episode_YYYYMMDD_HHMMSS_<suffix>`), e.g. a scenario such as
    /// `1box_hori_left` from which the instruction can be derived.
    pub name_suffix: Option<String>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            image_topic: None,
            cmd_topic: None,
            instruction_topic: None,
            instruction: None,
            split_on_idle: None,
            // The fork's collector records no frame for its timed auto-stop.
            sampling: SamplerConfig {
                record_stops: false,
                ..SamplerConfig::default()
            },
            write: WriteOptions::default(),
            name_suffix: None,
        }
    }
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct ImportSummary {
    /// (file, frames, duration s)
    pub episodes: Vec<(PathBuf, usize, f64)>,
    pub image_topic: String,
    pub cmd_topic: String,
    pub images: u64,
    pub commands: u64,
    /// Frames that could not be taken because no image had arrived yet.
    pub frames_without_image: u64,
}

/// Progress callback argument: messages read so far, total expected (from metadata.yaml).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

const TOPIC_IMAGE: usize = 0;
const TOPIC_CMD: usize = 1;
const TOPIC_INSTRUCTION: usize = 2;

pub fn import_bag(
    bag_dir: &Path,
    out_dir: &Path,
    opts: &ImportOptions,
    progress: Progress,
) -> Result<ImportSummary> {
    let bag = Bag::open(bag_dir)?;
    let image_types = [IMAGE_TYPE, COMPRESSED_IMAGE_TYPE];
    let cmd_types = [TWIST_TYPE, TWIST_STAMPED_TYPE];
    let available = || {
        bag.topics()
            .map(|t| format!("{} ({})", t.name, t.type_name))
            .collect()
    };
    let image_topic = bag
        .resolve_topic(
            opts.image_topic.as_deref(),
            &image_types,
            "image",
            "--image-topic",
        )?
        .ok_or_else(|| BagError::NoTopic {
            kind: "image",
            expected: image_types.join(" or "),
            available: available(),
        })?;
    let cmd_topic = bag
        .resolve_topic(
            opts.cmd_topic.as_deref(),
            &cmd_types,
            "velocity command",
            "--cmd-topic",
        )?
        .ok_or_else(|| BagError::NoTopic {
            kind: "velocity command",
            expected: cmd_types.join(" or "),
            available: available(),
        })?;
    let instruction_topic = if opts.instruction.is_some() {
        None
    } else {
        bag.resolve_topic(
            opts.instruction_topic.as_deref(),
            &[STRING_TYPE],
            "instruction",
            "--instruction-topic",
        )?
    };
    let type_of = |t: &str| {
        bag.topic(t)
            .map(|t| t.topic_metadata.type_name.clone())
            .unwrap_or_default()
    };
    let compressed = type_of(&image_topic) == COMPRESSED_IMAGE_TYPE;
    let stamped = type_of(&cmd_topic) == TWIST_STAMPED_TYPE;
    let mut topics = vec![image_topic.clone(), cmd_topic.clone()];
    topics.extend(instruction_topic.clone());
    let total: u64 = topics
        .iter()
        .filter_map(|t| bag.topic(t))
        .map(|t| t.message_count)
        .sum();

    std::fs::create_dir_all(out_dir).map_err(|e| BagError::Io {
        path: out_dir.to_path_buf(),
        source: e,
    })?;
    let mut state = State {
        opts,
        out_dir,
        image_topic: &image_topic,
        compressed,
        latest_image: None,
        instruction: opts.instruction.clone(),
        sampler: Sampler::new(opts.sampling),
        episode: None,
        summary: ImportSummary {
            image_topic: image_topic.clone(),
            cmd_topic: cmd_topic.clone(),
            ..Default::default()
        },
    };
    let replayed = replay(&bag, &topics, &mut state, stamped, total, progress);
    if replayed.is_err() {
        // A failed import leaves no partial behind: the bag, not a recorder crash, is at fault.
        if let Some(ep) = state.episode.take() {
            ep.writer.abort();
        }
    }
    replayed?;
    state.close()?;
    Ok(state.summary)
}

fn replay(
    bag: &Bag,
    topics: &[String],
    state: &mut State,
    stamped: bool,
    total: u64,
    progress: Progress,
) -> Result<()> {
    let cmd_topic = &topics[TOPIC_CMD];
    let mut counts = [0u64; 3];
    let mut read = 0u64;
    let mut last_time = 0;
    for msg in bag.messages(topics)? {
        let msg = msg?;
        let index = counts[msg.topic];
        counts[msg.topic] += 1;
        read += 1;
        if read % 16 == 0 {
            progress(read, total);
        }
        state.advance(msg.log_time)?;
        last_time = msg.log_time;
        match msg.topic {
            TOPIC_IMAGE => {
                state.summary.images += 1;
                state.latest_image = Some((msg.data, index));
            }
            TOPIC_CMD => {
                let decoded = if stamped {
                    cdr::twist_stamped(&msg.data).map(|(_, t)| t)
                } else {
                    cdr::twist(&msg.data)
                };
                let twist = decoded.map_err(|e| BagError::Decode {
                    topic: cmd_topic.clone(),
                    index,
                    source: e,
                })?;
                let action = [
                    twist.linear[0] as f32,
                    twist.linear[1] as f32,
                    twist.angular[2] as f32,
                ];
                if action.iter().any(|v| !v.is_finite()) {
                    return Err(BagError::NonFinite {
                        topic: cmd_topic.clone(),
                        index,
                        twist,
                    });
                }
                state.summary.commands += 1;
                state.command(msg.log_time, action)?;
            }
            _ => {
                let topic = topics[TOPIC_INSTRUCTION].clone();
                state.instruction = Some(cdr::string(&msg.data).map_err(|e| BagError::Decode {
                    topic,
                    index,
                    source: e,
                })?);
            }
        }
    }
    // A sample due exactly at the last message's time.
    state.advance(last_time.saturating_add(1))?;
    progress(read, total);
    Ok(())
}

struct Open {
    writer: EpisodeWriter,
    start: u64,
    last_frame: u64,
}

struct State<'a> {
    opts: &'a ImportOptions,
    out_dir: &'a Path,
    image_topic: &'a str,
    compressed: bool,
    /// Latest image message (CDR bytes, index on its topic); decoded only when sampled.
    latest_image: Option<(Vec<u8>, u64)>,
    instruction: Option<String>,
    sampler: Sampler,
    episode: Option<Open>,
    summary: ImportSummary,
}

impl State<'_> {
    /// Time moves to `t` (before the message at `t` applies): rate steps due strictly before
    /// `t`, each seeing every message up to its own time, then the idle split.
    fn advance(&mut self, t: u64) -> Result<()> {
        while self.episode.is_some() {
            let Some(tick) = self.sampler.next_tick().filter(|&k| k < t) else {
                break;
            };
            if self.idle_at(tick) {
                break;
            }
            if let Some((tick, step)) = self.sampler.tick_before(t) {
                self.frame(tick, step)?;
            }
        }
        if self.episode.is_some() && self.idle_at(t) {
            self.close()?;
        }
        Ok(())
    }

    fn idle_at(&self, t: u64) -> bool {
        self.opts.split_on_idle.is_some_and(|idle| {
            self.sampler
                .since_moving(t)
                .is_some_and(|d| d >= nanos(idle))
        })
    }

    fn command(&mut self, t: u64, action: Action) -> Result<()> {
        if self.episode.is_none() {
            if !is_moving(&action) {
                // Still tracked, for staleness and change detection.
                self.sampler.command(t, action);
                return Ok(());
            }
            self.open(t)?;
        }
        if let Some(step) = self.sampler.command(t, action) {
            self.frame(t, step)?;
        }
        Ok(())
    }

    fn open(&mut self, t: u64) -> Result<()> {
        let suffix = self.opts.name_suffix.as_deref().unwrap_or_default();
        let name = episode_name(self.out_dir, "episode", t / 1_000_000_000, suffix);
        let mut write = self.opts.write.clone();
        write.instruction = self.instruction.clone().or(write.instruction);
        let writer = EpisodeWriter::create(self.out_dir, &name, write)?;
        self.episode = Some(Open {
            writer,
            start: t,
            last_frame: t,
        });
        let step = self.sampler.start(t);
        self.frame(t, step)
    }

    fn frame(&mut self, t: u64, (action, event): Step) -> Result<()> {
        let Some((data, index)) = &self.latest_image else {
            self.summary.frames_without_image += 1;
            tracing::warn!(
                "no image on {} yet at t={t} ns; frame ({event}) skipped",
                self.image_topic
            );
            return Ok(());
        };
        let index = *index;
        let Some(ep) = self.episode.as_mut() else {
            return Ok(());
        };
        let topic = self.image_topic;
        let decode_err = |e| BagError::Decode {
            topic: topic.to_string(),
            index,
            source: e,
        };
        let image_err = |e| BagError::Image {
            topic: topic.to_string(),
            index,
            source: e,
        };
        let decoded = if self.compressed {
            let m = cdr::compressed_image(data).map_err(decode_err)?;
            img::decode_compressed(&m.format, m.data).map_err(image_err)?
        } else {
            let m = cdr::image(data).map_err(decode_err)?;
            img::decode(&RawImageRef {
                width: m.width,
                height: m.height,
                encoding: &m.encoding,
                is_bigendian: m.is_bigendian,
                step: m.step,
                data: m.data,
            })
            .map_err(image_err)?
        };
        let stored: RgbImage = img::to_interleaved(&decoded, ep.writer.channel_order());
        ep.writer
            .push(&stored, action, event)
            .map_err(|e| BagError::Frame {
                topic: topic.to_string(),
                index,
                source: e,
            })?;
        ep.last_frame = t;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        self.sampler.stop();
        if let Some(ep) = self.episode.take() {
            let frames = ep.writer.len();
            let duration = ep.last_frame.saturating_sub(ep.start) as f64 * 1e-9;
            if frames == 0 {
                ep.writer.abort();
                return Ok(());
            }
            let path = ep.writer.finish(duration)?;
            self.summary.episodes.push((path, frames, duration));
        }
        Ok(())
    }
}

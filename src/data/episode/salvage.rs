//! Crash recovery: [`recover_partials`] copies what a crashed writer's partial file holds (read
//! leniently: the prefix of steps readable and consistent in all three datasets) into a fresh
//! episode. A partial is deleted only once its frames are safe elsewhere or it is proven to
//! hold none; anything else stays where it is, and the report says why.

use super::format::{
    collection_info, descriptor, float_attr, int_attr, parse_order, read_instruction, read_strings,
    str_attr, Attrs,
};
use super::reader::read_frame;
use super::{
    keys, Action, CollectionInfo, EpisodeError, EpisodeReader, EpisodeWriter, EventType, Result,
    WriteOptions, ACTION_DIM, DEFAULT_CHANNEL_ORDER, PARTIAL_SUFFIX,
};
use crate::data::image::ChannelOrder;
use hdf5::types::{IntSize, TypeDescriptor};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Suffix of the copy [`recover_partials`] builds before renaming it to the final name.
const SALVAGE_SUFFIX: &str = ".h5.salvage";

/// A crashed writer's partial file, read leniently.
struct Salvaged {
    pub meta: SalvageSource,
    /// Steps readable and consistent in all three datasets.
    pub frames: usize,
    pub actions: Vec<Action>,
    pub events: Vec<EventType>,
}

struct SalvageSource {
    path: PathBuf,
    images: hdf5::Dataset,
    size: (u32, u32),
    pub gzip_level: Option<u8>,
    pub action_chunk_size: i64,
    pub channel_order: ChannelOrder,
    pub instruction: Option<String>,
    pub collection: CollectionInfo,
    pub total_duration: f64,
    _file: hdf5::File,
}

impl SalvageSource {
    pub fn read_frame(&self, t: usize) -> Result<RgbImage> {
        read_frame(&self.images, &self.path, t, self.size.0, self.size.1)
    }
}

/// The partial's usable steps; `None` when it provably holds none (the writer creates `images`
/// with the first frame, so a readable file without it and without actions never had one).
fn salvage_partial(path: &Path) -> Result<Option<Salvaged>> {
    let h5 = |field: &str| {
        let field = field.to_string();
        move |e| EpisodeError::hdf5(path, &field, e)
    };
    let file = hdf5::File::open(path).map_err(h5("file"))?;
    let Ok(images) = file.dataset(keys::IMAGES) else {
        let actions = file.dataset(keys::ACTIONS).map_err(h5(keys::ACTIONS))?;
        return match actions.shape().first() {
            Some(0) => Ok(None),
            _ => Err(EpisodeError::hdf5(
                path,
                keys::IMAGES,
                "missing, but actions has steps".into(),
            )),
        };
    };
    let shape = images.shape();
    if shape.len() != 4
        || shape[3] != 3
        || !matches!(
            descriptor(&images),
            Ok(TypeDescriptor::Unsigned(IntSize::U1))
        )
    {
        return Err(EpisodeError::hdf5(
            path,
            keys::IMAGES,
            format!("unexpected layout {shape:?}").into(),
        ));
    }
    let actions_ds = file.dataset(keys::ACTIONS).map_err(h5(keys::ACTIONS))?;
    let flat = actions_ds.read_raw::<f32>().map_err(h5(keys::ACTIONS))?;
    let actions: Vec<Action> = flat
        .chunks_exact(ACTION_DIM)
        .map(|r| [r[0], r[1], r[2]])
        .take_while(|a| a.iter().all(|v| v.is_finite()))
        .collect();
    let events_ds = file.dataset(keys::EVENTS).map_err(h5(keys::EVENTS))?;
    let labels =
        read_strings(&events_ds).map_err(|p| EpisodeError::hdf5(path, keys::EVENTS, p.into()))?;
    let events: Vec<EventType> = labels.iter().map_while(|l| EventType::parse(l)).collect();
    let mut frames = shape[0].min(actions.len()).min(events.len());
    // A frame whose chunk never reached the disk ends the usable prefix.
    let size = (shape[1] as u32, shape[2] as u32);
    if let Some(bad) = (0..frames).find(|&t| read_frame(&images, path, t, size.0, size.1).is_err())
    {
        frames = bad;
    }
    let mut scratch = Vec::new();
    let mut attrs = Attrs {
        file: &file,
        defects: &mut scratch,
    };
    let meta = SalvageSource {
        gzip_level: images.filters().iter().find_map(|f| match f {
            hdf5::filters::Filter::Deflate(l) => Some(*l),
            _ => None,
        }),
        action_chunk_size: attrs
            .get(keys::ACTION_CHUNK_SIZE, false, int_attr)
            .unwrap_or(super::DEFAULT_ACTION_CHUNK_SIZE),
        channel_order: attrs
            .get(keys::CHANNEL_ORDER, false, str_attr)
            .and_then(|s| parse_order(&s))
            .unwrap_or(DEFAULT_CHANNEL_ORDER),
        total_duration: attrs
            .get(keys::TOTAL_DURATION, false, float_attr)
            .filter(|t| t.is_finite() && *t >= 0.0)
            .unwrap_or(0.0),
        collection: collection_info(&mut attrs),
        instruction: read_instruction(&file, &mut scratch),
        path: path.to_path_buf(),
        images,
        size,
        _file: file,
    };
    Ok(Some(Salvaged {
        meta,
        frames,
        actions,
        events,
    }))
}

/// What [`recover_partials`] did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Final files rebuilt from partials, with their frame counts.
    pub recovered: Vec<(PathBuf, usize)>,
    /// Partials deleted, with the reason: proven to hold no frame, or already recovered.
    pub discarded: Vec<(PathBuf, String)>,
    /// Partials left in place because they could not be salvaged (disk full, no permission, a
    /// corrupt file, a different episode under the final name), with the reason. Nothing was
    /// deleted; the next recovery tries them again.
    pub kept: Vec<(PathBuf, String)>,
}

/// What became of one partial.
enum Outcome {
    Recovered(PathBuf, usize),
    /// Safe to delete: (why).
    Redundant(String),
    /// Must stay: (why).
    Keep(String),
}

/// Salvages the `.<name>.h5.partial` files that crashed writers left in `dir`: the frames that
/// are readable and consistent across `images`/`actions`/`action_event_types` are copied into a
/// fresh `<name>.h5` (same metadata), then the partial is deleted. A partial is also deleted
/// when it holds no frame, or when `<name>.h5` already holds exactly its frames (a recovery
/// that crashed after its rename). Any other failure keeps the partial in place, listed in
/// [`RecoveryReport::kept`]. Logged at `info`/`warn`.
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
            // A recovery that itself crashed before its rename: its source partial is still
            // there, so this copy holds nothing that is not also there.
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(
                    "could not delete the unfinished copy {}: {e}",
                    path.display()
                );
            }
            continue;
        }
        let Some(name) = fname
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(PARTIAL_SUFFIX))
        else {
            continue;
        };
        match recover_one(dir, name, &path) {
            Outcome::Recovered(final_path, frames) => {
                tracing::info!(
                    "recovered {frames} frame(s) from {} into {}",
                    path.display(),
                    final_path.display()
                );
                remove_partial(&path, &mut report);
                report.recovered.push((final_path, frames));
            }
            Outcome::Redundant(reason) => {
                tracing::warn!("discarding {}: {reason}", path.display());
                remove_partial(&path, &mut report);
                report.discarded.push((path, reason));
            }
            Outcome::Keep(reason) => {
                tracing::warn!(
                    "could not recover {} (kept there, not deleted): {reason}",
                    path.display()
                );
                report.kept.push((path, reason));
            }
        }
    }
    Ok(report)
}

fn remove_partial(path: &Path, report: &mut RecoveryReport) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("could not delete {}: {e}", path.display());
        report.kept.push((
            path.to_path_buf(),
            format!("its frames are safe, but deleting it failed: {e}"),
        ));
    }
}

fn recover_one(dir: &Path, name: &str, partial: &Path) -> Outcome {
    let source = match salvage_partial(partial) {
        Ok(Some(s)) if s.frames > 0 => s,
        // A step is an image, an action and an event: without one action or event, no step.
        Ok(None) => return Outcome::Redundant("it holds no step".into()),
        Ok(Some(s)) if s.actions.is_empty() || s.events.is_empty() => {
            return Outcome::Redundant("it holds no step".into())
        }
        Ok(Some(s)) => {
            return Outcome::Keep(format!(
                "none of its {} stored action(s) has a readable frame",
                s.actions.len()
            ))
        }
        Err(e) => return Outcome::Keep(e.to_string()),
    };
    let final_path = dir.join(format!("{name}.h5"));
    if final_path.exists() {
        return if holds_the_same_steps(&final_path, &source) {
            Outcome::Redundant(format!(
                "{} already holds its {} frame(s)",
                final_path.display(),
                source.frames
            ))
        } else {
            Outcome::Keep(format!(
                "a different episode {} exists; move one of them to recover this one",
                final_path.display()
            ))
        };
    }
    match salvage_into(dir, name, source, &final_path) {
        Ok(frames) => Outcome::Recovered(final_path, frames),
        Err(e) => Outcome::Keep(e.to_string()),
    }
}

/// Whether `final_path` is what a finished salvage of `source` wrote: same steps, same frames.
fn holds_the_same_steps(final_path: &Path, source: &Salvaged) -> bool {
    let Ok(done) = EpisodeReader::open(final_path) else {
        return false;
    };
    let n = source.frames;
    done.len() == n
        && done.actions() == &source.actions[..n]
        && done.events() == &source.events[..n]
        && (0..n).all(
            |t| match (done.read_frame_stored(t), source.meta.read_frame(t)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        )
}

fn salvage_into(dir: &Path, name: &str, source: Salvaged, final_path: &Path) -> Result<usize> {
    let Salvaged {
        meta,
        frames,
        actions,
        events,
    } = source;
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

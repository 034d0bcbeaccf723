//! The format's checks: typed reads of the attributes and string datasets, and [`inspect`],
//! which collects every defect of a file (never stopping at the first) and returns the parsed
//! parts when the file is valid. Runs in-process: callers outside this module go through
//! [`super::isolate`] first.

use super::reader::ReadOptions;
use super::{keys, Action, CollectionInfo, Defect, EpisodeMeta, EventType, ACTION_DIM};
use crate::data::image::ChannelOrder;
use hdf5::types::{FixedAscii, FixedUnicode, IntSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use std::path::Path;

/// Longest fixed-length string we read; longer ones are truncated by HDF5's conversion.
const MAX_FIXED_STR: usize = 1024;
/// How many offending indices a defect message lists.
const LIST_MAX: usize = 8;

/// A valid file's open handles and parsed contents.
pub(super) struct Parts {
    pub file: hdf5::File,
    pub images: hdf5::Dataset,
    pub meta: EpisodeMeta,
    pub actions: Vec<Action>,
    pub events: Vec<EventType>,
}

pub(super) fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(LIST_MAX).map(|i| i.to_string()).collect();
    let more = items.len().saturating_sub(LIST_MAX);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

pub(super) fn descriptor(c: &hdf5::Container) -> std::result::Result<TypeDescriptor, String> {
    c.dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| format!("unreadable datatype: {e}"))
}

/// Strings of any HDF5 string flavour (h5py writes `str` as vlen UTF-8, numpy `S` as fixed ASCII).
pub(super) fn read_strings(c: &hdf5::Container) -> std::result::Result<Vec<String>, String> {
    let e = |e: hdf5::Error| format!("unreadable: {e}");
    Ok(match descriptor(c)? {
        TypeDescriptor::VarLenUnicode => c
            .read_raw::<VarLenUnicode>()
            .map_err(e)?
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect(),
        TypeDescriptor::VarLenAscii => c
            .read_raw::<VarLenAscii>()
            .map_err(e)?
            .iter()
            .map(|v| v.as_str().to_owned())
            .collect(),
        TypeDescriptor::FixedAscii(_) => c
            .read_raw::<FixedAscii<MAX_FIXED_STR>>()
            .map_err(e)?
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect(),
        TypeDescriptor::FixedUnicode(_) => c
            .read_raw::<FixedUnicode<MAX_FIXED_STR>>()
            .map_err(e)?
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect(),
        other => return Err(format!("type {other}, expected a string")),
    })
}

/// A scalar (or one-element) attribute read with `read`, after checking its type with `accept`.
fn read_one<T>(
    c: &hdf5::Container,
    accept: fn(&TypeDescriptor) -> bool,
    expected: &str,
    read: impl Fn(&hdf5::Container) -> std::result::Result<Vec<T>, String>,
) -> std::result::Result<T, String> {
    let desc = descriptor(c)?;
    if !accept(&desc) {
        return Err(format!("type {desc}, expected {expected}"));
    }
    let mut values = read(c)?;
    if values.len() != 1 {
        return Err(format!("has {} values, expected one", values.len()));
    }
    Ok(values.remove(0))
}

fn is_int(d: &TypeDescriptor) -> bool {
    matches!(d, TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_))
}
fn is_number(d: &TypeDescriptor) -> bool {
    is_int(d) || matches!(d, TypeDescriptor::Float(_))
}
fn is_string(d: &TypeDescriptor) -> bool {
    matches!(
        d,
        TypeDescriptor::VarLenUnicode
            | TypeDescriptor::VarLenAscii
            | TypeDescriptor::FixedAscii(_)
            | TypeDescriptor::FixedUnicode(_)
    )
}

pub(super) fn int_attr(c: &hdf5::Container) -> std::result::Result<i64, String> {
    read_one(c, is_int, "an integer", |c| {
        c.read_raw::<i64>().map_err(|e| format!("unreadable: {e}"))
    })
}
pub(super) fn float_attr(c: &hdf5::Container) -> std::result::Result<f64, String> {
    read_one(c, is_number, "a number", |c| {
        c.read_raw::<f64>().map_err(|e| format!("unreadable: {e}"))
    })
}
pub(super) fn str_attr(c: &hdf5::Container) -> std::result::Result<String, String> {
    read_one(c, is_string, "a string", read_strings)
}

/// Attribute reader that records defects: `required` absent attrs are defects too.
pub(super) struct Attrs<'a> {
    pub file: &'a hdf5::File,
    pub defects: &'a mut Vec<Defect>,
}

impl Attrs<'_> {
    pub(super) fn get<T>(
        &mut self,
        name: &str,
        required: bool,
        read: fn(&hdf5::Container) -> std::result::Result<T, String>,
    ) -> Option<T> {
        match self.file.attr(name) {
            Ok(a) => match read(&a) {
                Ok(v) => Some(v),
                Err(problem) => {
                    self.defects.push(Defect::new(name, problem));
                    None
                }
            },
            Err(_) if required => {
                self.defects.push(Defect::new(name, "missing attribute"));
                None
            }
            Err(_) => None,
        }
    }
}

pub(super) fn parse_order(s: &str) -> Option<ChannelOrder> {
    s.trim().parse().ok()
}

pub(super) fn collection_info(attrs: &mut Attrs) -> CollectionInfo {
    CollectionInfo {
        obstacle_layout_type: attrs.get(keys::OBSTACLE_LAYOUT_TYPE, false, str_attr),
        time_period: attrs.get(keys::TIME_PERIOD, false, str_attr),
        collection_datetime: attrs.get(keys::COLLECTION_DATETIME, false, str_attr),
        collection_hour: attrs.get(keys::COLLECTION_HOUR, false, int_attr),
        collection_minute: attrs.get(keys::COLLECTION_MINUTE, false, int_attr),
    }
}

pub(super) fn read_instruction(file: &hdf5::File, defects: &mut Vec<Defect>) -> Option<String> {
    let ds = file.dataset(keys::INSTRUCTION).ok()?;
    match read_strings(&ds) {
        Ok(v) if v.len() == 1 => Some(v[0].trim_end_matches('\0').to_string()),
        Ok(v) => {
            defects.push(Defect::new(
                keys::INSTRUCTION,
                format!("has {} strings, expected shape (1,)", v.len()),
            ));
            None
        }
        Err(problem) => {
            defects.push(Defect::new(keys::INSTRUCTION, problem));
            None
        }
    }
}

/// All checks of the format; returns the parsed parts only when enough is readable.
pub(super) fn inspect(path: &Path, opts: ReadOptions) -> (Option<Parts>, Vec<Defect>) {
    let file = match hdf5::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            return (
                None,
                vec![Defect::new(
                    "file",
                    format!("not a readable HDF5 file: {e}"),
                )],
            )
        }
    };
    let mut d = Vec::new();

    // images: uint8 (T, H, W, 3)
    let mut images = None;
    match file.dataset(keys::IMAGES) {
        Err(_) => d.push(Defect::new(keys::IMAGES, "missing dataset")),
        Ok(ds) => {
            let dtype_ok = match descriptor(&ds) {
                Ok(TypeDescriptor::Unsigned(IntSize::U1)) => true,
                Ok(other) => {
                    d.push(Defect::new(
                        keys::IMAGES,
                        format!("dtype {other}, expected uint8"),
                    ));
                    false
                }
                Err(p) => {
                    d.push(Defect::new(keys::IMAGES, p));
                    false
                }
            };
            let shape = ds.shape();
            let shape_ok = shape.len() == 4 && shape[3] == 3 && shape[1] > 0 && shape[2] > 0;
            if !shape_ok {
                d.push(Defect::new(
                    keys::IMAGES,
                    format!("shape {shape:?}, expected (T, H, W, 3)"),
                ));
            }
            let fits = shape_ok && shape[1] <= u32::MAX as usize && shape[2] <= u32::MAX as usize;
            if dtype_ok && fits {
                images = Some((ds, shape[0], shape[1] as u32, shape[2] as u32));
            }
        }
    }

    // actions: float (T, 3), finite
    let mut actions = None;
    match file.dataset(keys::ACTIONS) {
        Err(_) => d.push(Defect::new(keys::ACTIONS, "missing dataset")),
        Ok(ds) => {
            let shape = ds.shape();
            match descriptor(&ds) {
                Ok(TypeDescriptor::Float(_)) => {}
                Ok(other) => d.push(Defect::new(
                    keys::ACTIONS,
                    format!("dtype {other}, expected float32"),
                )),
                Err(p) => d.push(Defect::new(keys::ACTIONS, p)),
            }
            if shape.len() != 2 || shape[1] != ACTION_DIM {
                d.push(Defect::new(
                    keys::ACTIONS,
                    format!("shape {shape:?}, expected (T, 3)"),
                ));
            } else if matches!(descriptor(&ds), Ok(TypeDescriptor::Float(_))) {
                match ds.read_raw::<f32>() {
                    Err(e) => d.push(Defect::new(keys::ACTIONS, format!("unreadable: {e}"))),
                    Ok(flat) => {
                        let rows: Vec<Action> = flat
                            .chunks_exact(ACTION_DIM)
                            .map(|r| [r[0], r[1], r[2]])
                            .collect();
                        let bad: Vec<usize> = (0..rows.len())
                            .filter(|&i| rows[i].iter().any(|v| !v.is_finite()))
                            .collect();
                        if !bad.is_empty() {
                            d.push(Defect::new(
                                keys::ACTIONS,
                                format!("NaN/Inf at steps {}", list(&bad)),
                            ));
                        }
                        actions = Some(rows);
                    }
                }
            }
        }
    }

    // action_event_types: strings (T,), known labels
    let mut events = None;
    match file.dataset(keys::EVENTS) {
        Err(_) => d.push(Defect::new(keys::EVENTS, "missing dataset")),
        Ok(ds) => {
            let shape = ds.shape();
            if shape.len() != 1 {
                d.push(Defect::new(
                    keys::EVENTS,
                    format!("shape {shape:?}, expected (T,)"),
                ));
            } else {
                match read_strings(&ds) {
                    Err(p) => d.push(Defect::new(keys::EVENTS, p)),
                    Ok(labels) => {
                        let parsed: Vec<Option<EventType>> =
                            labels.iter().map(|l| EventType::parse(l)).collect();
                        let bad: Vec<String> = labels
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| parsed[*i].is_none())
                            .map(|(i, l)| format!("{i}: {l:?}"))
                            .collect();
                        if bad.is_empty() {
                            events = Some(parsed.into_iter().flatten().collect::<Vec<_>>());
                        } else {
                            d.push(Defect::new(
                                keys::EVENTS,
                                format!("unknown labels (expected episode_start/start_action/stop_action) at {}", list(&bad)),
                            ));
                        }
                    }
                }
            }
        }
    }

    // Lengths agree and are > 0.
    let t_images = images.as_ref().map(|i| i.1);
    let t_actions = file
        .dataset(keys::ACTIONS)
        .ok()
        .and_then(|ds| ds.shape().first().copied());
    let t_events = file
        .dataset(keys::EVENTS)
        .ok()
        .and_then(|ds| ds.shape().first().copied());
    let lengths: Vec<usize> = [t_images, t_actions, t_events]
        .into_iter()
        .flatten()
        .collect();
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        let show = |t: Option<usize>| t.map_or("?".to_string(), |t| t.to_string());
        d.push(Defect::new(
            "images/actions/action_event_types",
            format!(
                "step counts differ: images {}, actions {}, action_event_types {}",
                show(t_images),
                show(t_actions),
                show(t_events)
            ),
        ));
    }
    if lengths.contains(&0) {
        d.push(Defect::new(keys::IMAGES, "empty episode (0 frames)"));
    }

    // Attributes.
    let mut attrs = Attrs {
        file: &file,
        defects: &mut d,
    };
    let episode_name = attrs.get(keys::EPISODE_NAME, true, str_attr);
    let total_duration = attrs.get(keys::TOTAL_DURATION, true, float_attr);
    let num_frames = attrs.get(keys::NUM_FRAMES, true, int_attr);
    let action_chunk_size = attrs.get(keys::ACTION_CHUNK_SIZE, true, int_attr);
    let order_text = attrs.get(keys::CHANNEL_ORDER, false, str_attr);
    let collection = collection_info(&mut attrs);
    if let Some(t) = total_duration.filter(|t| !t.is_finite() || *t < 0.0) {
        d.push(Defect::new(
            keys::TOTAL_DURATION,
            format!("{t} is not a duration in seconds"),
        ));
    }
    if let (Some(n), Some(t)) = (num_frames, t_images) {
        if n != t as i64 {
            d.push(Defect::new(
                keys::NUM_FRAMES,
                format!("{n}, but images has {t} frames"),
            ));
        }
    }
    if let Some(c) = action_chunk_size.filter(|c| *c <= 0) {
        d.push(Defect::new(
            keys::ACTION_CHUNK_SIZE,
            format!("{c}, expected > 0"),
        ));
    }
    let channel_order = match &order_text {
        None => Some(opts.default_channel_order),
        Some(s) => {
            let o = parse_order(s);
            if o.is_none() {
                d.push(Defect::new(
                    keys::CHANNEL_ORDER,
                    format!("{s:?}, expected \"bgr\" or \"rgb\""),
                ));
            }
            o
        }
    };
    let stored_instruction = read_instruction(&file, &mut d);
    // A part that could not be read without a defect saying why would make an error naming
    // nothing ("0 defect(s)"): name it.
    let unread: Vec<&str> = [
        (keys::IMAGES, images.is_none()),
        (keys::ACTIONS, actions.is_none()),
        (keys::EVENTS, events.is_none()),
        (keys::EPISODE_NAME, episode_name.is_none()),
        (keys::TOTAL_DURATION, total_duration.is_none()),
        (keys::NUM_FRAMES, num_frames.is_none()),
        (keys::ACTION_CHUNK_SIZE, action_chunk_size.is_none()),
        (keys::CHANNEL_ORDER, channel_order.is_none()),
    ]
    .into_iter()
    .filter_map(|(key, missing)| missing.then_some(key))
    .collect();
    if d.is_empty() && !unread.is_empty() {
        d.push(Defect::new(unread.join(", "), "unreadable"));
    }

    let parts = match (
        images,
        actions,
        events,
        episode_name,
        total_duration,
        num_frames,
        action_chunk_size,
        channel_order,
    ) {
        (
            Some((images, _, h, w)),
            Some(actions),
            Some(events),
            Some(name),
            Some(dur),
            Some(n),
            Some(acs),
            Some(order),
        ) if d.is_empty() => Some(Parts {
            meta: EpisodeMeta {
                episode_name: name,
                total_duration: dur,
                num_frames: n as usize,
                action_chunk_size: acs,
                channel_order: order,
                channel_order_recorded: order_text.is_some(),
                stored_instruction,
                collection,
                frame_size: (h, w),
            },
            file,
            images,
            actions,
            events,
        }),
        _ => None,
    };
    (parts, d)
}

//! `validate_file` names every defect, by field, and reports all of them at once.

mod common;

use common::RawEpisode;
use mobile_vla::data::episode::{validate_file, Defect, Depth, EpisodeError, EpisodeReader};

fn defects(raw: &RawEpisode) -> Vec<Defect> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.h5");
    raw.write(&path);
    validate_file(&path, Depth::Structure)
}

fn has(defects: &[Defect], field: &str, needle: &str) -> bool {
    defects
        .iter()
        .any(|d| d.field == field && d.problem.contains(needle))
}

#[test]
fn valid_file_has_no_defects() {
    assert_eq!(defects(&RawEpisode::valid()), vec![]);
}

#[test]
fn missing_datasets() {
    let mut raw = RawEpisode::valid();
    raw.images = None;
    raw.events = None;
    let d = defects(&raw);
    assert!(has(&d, "images", "missing dataset"), "{d:?}");
    assert!(has(&d, "action_event_types", "missing dataset"), "{d:?}");
}

#[test]
fn wrong_dtype_and_shape() {
    let mut raw = RawEpisode::valid();
    raw.images_f32 = true;
    raw.actions = Some((vec![4, 2], vec![0.0; 8]));
    let d = defects(&raw);
    assert!(has(&d, "images", "expected uint8"), "{d:?}");
    assert!(has(&d, "actions", "expected (T, 3)"), "{d:?}");

    let mut raw = RawEpisode::valid();
    raw.images = Some((vec![4, 6, 8, 4], vec![0; 4 * 6 * 8 * 4]));
    assert!(has(&defects(&raw), "images", "expected (T, H, W, 3)"));
}

#[test]
fn step_count_mismatch() {
    let mut raw = RawEpisode::valid();
    raw.actions = Some((vec![3, 3], vec![0.0; 9]));
    let d = defects(&raw);
    assert!(
        has(
            &d,
            "images/actions/action_event_types",
            "images 4, actions 3, action_event_types 4"
        ),
        "{d:?}"
    );
}

#[test]
fn non_finite_actions_are_listed() {
    let mut raw = RawEpisode::valid();
    let mut a = vec![0.0f32; 12];
    a[4] = f32::NAN;
    a[9] = f32::INFINITY;
    raw.actions = Some((vec![4, 3], a));
    let d = defects(&raw);
    assert!(has(&d, "actions", "NaN/Inf at steps 1, 3"), "{d:?}");
}

#[test]
fn empty_episode() {
    let mut raw = RawEpisode::valid();
    raw.images = Some((vec![0, 6, 8, 3], vec![]));
    raw.actions = Some((vec![0, 3], vec![]));
    raw.events = Some(vec![]);
    raw.num_frames = Some(0);
    assert!(has(&defects(&raw), "images", "empty episode"));
}

#[test]
fn bad_attributes_and_labels() {
    let mut raw = RawEpisode::valid();
    raw.name_attr = None;
    raw.duration = Some(f64::NAN);
    raw.num_frames = Some(7);
    raw.chunk = Some(0);
    raw.order = Some("gbr".into());
    raw.events = Some(vec![
        "episode_start".into(),
        "jump".into(),
        "start_action".into(),
        "stop_action".into(),
    ]);
    let d = defects(&raw);
    assert!(has(&d, "episode_name", "missing attribute"), "{d:?}");
    assert!(has(&d, "total_duration", "not a duration"), "{d:?}");
    assert!(has(&d, "num_frames", "7, but images has 4 frames"), "{d:?}");
    assert!(has(&d, "action_chunk_size", "expected > 0"), "{d:?}");
    assert!(has(&d, "image_channel_order", "\"gbr\""), "{d:?}");
    assert!(has(&d, "action_event_types", "1: \"jump\""), "{d:?}");
    // All of them, not just the first.
    assert_eq!(d.len(), 6, "{d:?}");
}

#[test]
fn reader_error_names_file_and_all_defects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.h5");
    let mut raw = RawEpisode::valid();
    raw.actions = None;
    raw.chunk = None;
    raw.write(&path);
    let err = EpisodeReader::open(&path).unwrap_err();
    let EpisodeError::Invalid { path: p, defects } = &err else {
        panic!("{err}")
    };
    assert_eq!(p, &path);
    assert_eq!(defects.len(), 2, "{defects:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("broken.h5")
            && msg.contains("actions: missing dataset")
            && msg.contains("action_chunk_size"),
        "{msg}"
    );
}

#[test]
fn not_hdf5_and_truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.h5");
    std::fs::write(&junk, b"not an hdf5 file at all").unwrap();
    let d = validate_file(&junk, Depth::Structure);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].field, "file");

    let good = dir.path().join("good.h5");
    RawEpisode::valid().write(&good);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.h5");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(!validate_file(&cut, Depth::Structure).is_empty());
}

//! EpisodeWriter → EpisodeReader round trips, channel order, and crash recovery.

mod common;

use common::*;
use mobile_vla::data::episode::{
    recover_partials, CollectionInfo, EpisodeError, EpisodeReader, EpisodeWriter, EventType,
    ReadOptions, WriteOptions,
};
use mobile_vla::data::image::ChannelOrder;
use std::path::Path;

#[test]
fn round_trip_keeps_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let collection = CollectionInfo {
        obstacle_layout_type: Some("hori".into()),
        time_period: Some("day".into()),
        collection_datetime: Some("2025-12-03T12:25:10".into()),
        collection_hour: Some(12),
        collection_minute: Some(25),
    };
    let opts = WriteOptions::default()
        .instruction(Some("go left".into()))
        .collection(collection.clone());
    let path = write_episode(
        dir.path(),
        "episode_20251203_122510_1box_hori_left",
        5,
        16,
        12,
        opts,
    );
    assert_eq!(
        path,
        dir.path().join("episode_20251203_122510_1box_hori_left.h5")
    );
    let r = EpisodeReader::open(&path).unwrap();
    let m = r.meta();
    assert_eq!(m.episode_name, "episode_20251203_122510_1box_hori_left");
    assert_eq!(m.num_frames, 5);
    assert_eq!(m.total_duration, 2.0);
    assert_eq!(m.action_chunk_size, 8);
    assert_eq!(m.channel_order, ChannelOrder::Bgr);
    assert!(m.channel_order_recorded);
    assert_eq!(m.frame_size, (12, 16));
    assert_eq!(m.collection, collection);
    assert_eq!(r.instruction().as_deref(), Some("go left"));
    for t in 0..5 {
        assert_eq!(r.actions()[t], action(t));
        assert_eq!(r.events()[t], event(t));
        assert_eq!(r.read_frame_stored(t).unwrap(), frame(t, 16, 12));
    }
    // No partial left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn stored_bgr_is_returned_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_episode(
        dir.path(),
        "bgr",
        1,
        4,
        3,
        WriteOptions::default().channel_order(ChannelOrder::Bgr),
    );
    let r = EpisodeReader::open(&path).unwrap();
    let stored = frame(0, 4, 3);
    let rgb = r.read_frame(0).unwrap();
    for (s, o) in stored.pixels().zip(rgb.pixels()) {
        assert_eq!([s[2], s[1], s[0]], o.0);
    }
    let path = write_episode(
        dir.path(),
        "rgb",
        1,
        4,
        3,
        WriteOptions::default().channel_order(ChannelOrder::Rgb),
    );
    assert_eq!(
        EpisodeReader::open(&path).unwrap().read_frame(0).unwrap(),
        stored
    );
}

#[test]
fn missing_channel_order_uses_the_documented_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.h5");
    RawEpisode::valid().write(&path);
    let r = EpisodeReader::open(&path).unwrap();
    assert_eq!(r.meta().channel_order, ChannelOrder::Bgr);
    assert!(!r.meta().channel_order_recorded);
    let r = EpisodeReader::open_with(
        &path,
        ReadOptions {
            default_channel_order: ChannelOrder::Rgb,
        },
    )
    .unwrap();
    assert_eq!(r.meta().channel_order, ChannelOrder::Rgb);
    assert_eq!(r.read_frame(0).unwrap(), r.read_frame_stored(0).unwrap());
}

#[test]
fn instruction_falls_back_to_the_scenario_in_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_episode(
        dir.path(),
        "episode_20251203_2box_vert_right_x",
        2,
        4,
        4,
        WriteOptions::default(),
    );
    let r = EpisodeReader::open(&path).unwrap();
    assert_eq!(r.meta().stored_instruction, None);
    assert_eq!(
        r.instruction().as_deref(),
        Some("Navigate around the obstacle on the right side and reach the cup")
    );
}

#[test]
fn writer_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EpisodeWriter::create(dir.path(), "bad", WriteOptions::default()).unwrap();
    w.push(&frame(0, 4, 4), action(0), EventType::EpisodeStart)
        .unwrap();
    assert!(matches!(
        w.push(
            &frame(1, 4, 4),
            [f32::NAN, 0.0, 0.0],
            EventType::StartAction
        ),
        Err(EpisodeError::NonFiniteAction { index: 1, .. })
    ));
    assert!(matches!(
        w.push(&frame(1, 5, 4), action(1), EventType::StartAction),
        Err(EpisodeError::FrameSize {
            index: 1,
            got_w: 5,
            ..
        })
    ));
    assert_eq!(w.len(), 1);
    w.finish(0.4).unwrap();
    // Never overwrites.
    assert!(matches!(
        EpisodeWriter::create(dir.path(), "bad", WriteOptions::default()),
        Err(EpisodeError::Exists { .. })
    ));
    assert!(matches!(
        EpisodeWriter::create(dir.path(), "../x", WriteOptions::default()),
        Err(EpisodeError::BadName { .. })
    ));
    // An empty episode leaves nothing.
    let w = EpisodeWriter::create(dir.path(), "empty", WriteOptions::default()).unwrap();
    assert!(matches!(w.finish(0.0), Err(EpisodeError::Empty { .. })));
    assert!(!dir.path().join("empty.h5").exists());
    assert!(!dir.path().join(".empty.h5.partial").exists());
}

#[test]
fn unfinished_writer_leaves_only_a_partial_that_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = EpisodeWriter::create(
        dir.path(),
        "crashed",
        WriteOptions::default()
            .channel_order(ChannelOrder::Rgb)
            .instruction(Some("reach the cup".into())),
    )
    .unwrap();
    for t in 0..3 {
        w.push(&frame(t, 6, 4), action(t), event(t)).unwrap();
    }
    // Simulates a crash after the last flush: the writer is never finished.
    std::mem::forget(w);
    assert!(!dir.path().join("crashed.h5").exists());
    assert!(dir.path().join(".crashed.h5.partial").exists());

    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(report.recovered, vec![(dir.path().join("crashed.h5"), 3)]);
    assert!(report.discarded.is_empty());
    assert!(!dir.path().join(".crashed.h5.partial").exists());
    let r = EpisodeReader::open(&dir.path().join("crashed.h5")).unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r.meta().channel_order, ChannelOrder::Rgb);
    assert_eq!(r.instruction().as_deref(), Some("reach the cup"));
    for t in 0..3 {
        assert_eq!(r.read_frame_stored(t).unwrap(), frame(t, 6, 4));
        assert_eq!(r.actions()[t], action(t));
    }
}

/// A partial left by a writer killed after `n` frames.
fn crashed_partial(dir: &Path, name: &str, n: usize) {
    let mut w = EpisodeWriter::create(dir, name, WriteOptions::default()).unwrap();
    for t in 0..n {
        w.push(&frame(t, 6, 4), action(t), event(t)).unwrap();
    }
    std::mem::forget(w);
}

#[test]
fn unreadable_partials_are_kept_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join(".junk.h5.partial");
    std::fs::write(&junk, b"\x89HDF\r\n\x1a\ntruncated").unwrap();
    let report = recover_partials(dir.path()).unwrap();
    assert!(report.recovered.is_empty() && report.discarded.is_empty());
    assert_eq!(report.kept.len(), 1, "{report:?}");
    assert_eq!(report.kept[0].0, junk);
    assert!(
        junk.exists(),
        "a partial that could not be salvaged was deleted"
    );
}

/// Fails before the fix: a salvage that could not write its copy (here its path is taken by a
/// directory, as a permission error or a full disk would stop it) deleted the partial and the
/// frames with it.
#[test]
fn a_failed_salvage_keeps_the_partial_and_a_later_one_recovers_it() {
    let dir = tempfile::tempdir().unwrap();
    crashed_partial(dir.path(), "cut", 3);
    let partial = dir.path().join(".cut.h5.partial");
    let blocker = dir.path().join(".cut.h5.salvage");
    std::fs::create_dir(&blocker).unwrap();
    let report = recover_partials(dir.path()).unwrap();
    assert!(
        report.recovered.is_empty() && report.discarded.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.kept.len(), 1, "{report:?}");
    assert!(partial.exists());
    assert!(!dir.path().join("cut.h5").exists());

    std::fs::remove_dir(&blocker).unwrap();
    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(report.recovered, vec![(dir.path().join("cut.h5"), 3)]);
    assert!(!partial.exists());
}

#[test]
fn a_partial_beside_its_finished_salvage_is_deleted_and_a_different_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    // A recovery that crashed after its rename: the final file holds exactly the partial's steps.
    crashed_partial(dir.path(), "twice", 2);
    let partial = dir.path().join(".twice.h5.partial");
    let saved = std::fs::read(&partial).unwrap();
    recover_partials(dir.path()).unwrap();
    std::fs::write(&partial, &saved).unwrap();
    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(report.discarded.len(), 1, "{report:?}");
    assert!(!partial.exists());

    // A different recording under a taken name stays (the fixture's steps depend only on their
    // index, so a different length makes it a different episode).
    crashed_partial(dir.path(), "other", 3);
    std::fs::rename(dir.path().join(".other.h5.partial"), &partial).unwrap();
    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(report.kept.len(), 1, "{report:?}");
    assert!(report.kept[0].1.contains("different episode"), "{report:?}");
    assert!(partial.exists());
}

#[test]
fn a_partial_without_frames_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    crashed_partial(dir.path(), "none", 0);
    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(report.discarded.len(), 1, "{report:?}");
    assert!(!dir.path().join(".none.h5.partial").exists());
}

#[test]
fn parallel_compression_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriteOptions::default()
        .gzip_level(Some(1))
        .compression_threads(2);
    let path = write_episode(dir.path(), "parallel", 7, 64, 48, opts);
    let r = EpisodeReader::open(&path).unwrap();
    assert_eq!(r.len(), 7);
    for t in 0..7 {
        assert_eq!(
            r.read_frame_stored(t).unwrap(),
            frame(t, 64, 48),
            "frame {t}"
        );
    }
    // Chunks really are deflated (the file is smaller than the raw frames).
    assert!(std::fs::metadata(&path).unwrap().len() < 7 * 64 * 48 * 3);
}

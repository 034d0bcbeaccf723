//! Import of the committed rosbag2 fixtures (written by the real `rosbags` writer, see
//! test/fixtures/bags/generate.py) in both storage formats.

use mobile_vla::data::bag::{import_bag, Bag, BagError, Compression, ImportOptions, Storage};
use mobile_vla::data::episode::{EpisodeReader, EventType};
use mobile_vla::data::sampling::{SampleMode, SamplerConfig};
use std::path::{Path, PathBuf};

fn fixture(storage: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/bags")
        .join(storage)
}

/// The fixture camera frame k (true RGB) at pixel (x, y).
fn camera(k: u8, x: u32, y: u32) -> [u8; 3] {
    [20 * k, (x * 30) as u8, (y * 40) as u8]
}

fn import(storage: &str, opts: &ImportOptions) -> (tempfile::TempDir, Vec<EpisodeReader>) {
    import_dir(&fixture(storage), opts)
}

fn import_dir(bag: &Path, opts: &ImportOptions) -> (tempfile::TempDir, Vec<EpisodeReader>) {
    let out = tempfile::tempdir().unwrap();
    let summary = import_bag(bag, out.path(), opts, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{}: {e}", bag.display()));
    assert_eq!(summary.images, 12);
    assert_eq!(summary.commands, 8);
    let readers = summary
        .episodes
        .iter()
        .map(|(p, _, _)| EpisodeReader::open(p).unwrap())
        .collect();
    (out, readers)
}

#[test]
fn metadata_is_read() {
    let bag = Bag::open(&fixture("mcap")).unwrap();
    assert_eq!(bag.storage, Storage::Mcap);
    assert_eq!(bag.info.message_count, 21);
    assert_eq!(
        Bag::open(&fixture("sqlite3")).unwrap().storage,
        Storage::Sqlite3
    );
}

#[test]
fn event_mode_pairs_each_press_with_the_latest_frame() {
    for storage in ["mcap", "sqlite3"] {
        let (_dir, eps) = import(storage, &ImportOptions::default());
        assert_eq!(eps.len(), 1, "{storage}");
        let ep = &eps[0];
        assert_eq!(ep.meta().episode_name, "episode_20251203_122510");
        assert_eq!(
            ep.events(),
            [
                EventType::EpisodeStart,
                EventType::StartAction,
                EventType::StartAction
            ]
        );
        assert_eq!(
            ep.actions(),
            [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, -0.5]]
        );
        // Presses at 250 ms and 650 ms; frames arrive at 10 ms + 100 ms·k.
        for (t, k) in [(0, 2u8), (1, 2), (2, 6)] {
            let rgb = ep.read_frame(t).unwrap();
            assert_eq!(
                rgb.get_pixel(5, 4).0,
                camera(k, 5, 4),
                "{storage} frame {t}"
            );
            // Stored BGR (the default).
            assert_eq!(
                ep.read_frame_stored(t).unwrap().get_pixel(5, 4).0[0],
                camera(k, 5, 4)[2]
            );
        }
        assert!((ep.meta().total_duration - 0.4).abs() < 1e-9);
        assert_eq!(ep.instruction().as_deref(), Some("reach the cup"));
    }
}

#[test]
fn stops_and_idle_split() {
    let opts = ImportOptions {
        sampling: SamplerConfig {
            record_stops: true,
            ..SamplerConfig::default()
        },
        split_on_idle: Some(std::time::Duration::from_millis(200)),
        instruction: Some("go".into()),
        ..Default::default()
    };
    let (_dir, eps) = import("sqlite3", &opts);
    // Last move command at 350 ms, next press at 650 ms: idle 300 ms > 200 ms splits.
    assert_eq!(eps.len(), 2);
    assert_eq!(
        eps[0].events(),
        [
            EventType::EpisodeStart,
            EventType::StartAction,
            EventType::StopAction
        ]
    );
    assert_eq!(eps[0].actions()[2], [0.0, 0.0, 0.0]);
    assert_eq!(
        eps[0].read_frame(2).unwrap().get_pixel(0, 0).0,
        camera(3, 0, 0)
    ); // stop at 400 ms
    assert_eq!(eps[1].meta().episode_name, "episode_20251203_122510_2");
    assert_eq!(
        eps[1].actions(),
        [[0.0, 0.0, 0.0], [0.0, 0.0, -0.5], [0.0, 0.0, 0.0]]
    );
    assert_eq!(eps[1].instruction().as_deref(), Some("go"));
}

#[test]
fn rate_mode_samples_at_fixed_hz() {
    let opts = ImportOptions {
        sampling: SamplerConfig {
            mode: SampleMode::Rate,
            ..SamplerConfig::default()
        },
        ..Default::default()
    };
    let (_dir, eps) = import("mcap", &opts);
    let ep = &eps[0];
    // episode_start at 250 ms, then ticks at 350, …, 1050 ms (last message at 1110 ms): 9 frames.
    assert_eq!(ep.len(), 9);
    assert_eq!(ep.actions()[0], [0.0, 0.0, 0.0]);
    assert_eq!(ep.events()[0], EventType::EpisodeStart);
    assert_eq!(ep.actions()[1], [0.5, 0.0, 0.0]);
    // 450 ms: the 400 ms stop applies, image k=4.
    assert_eq!(ep.actions()[2], [0.0, 0.0, 0.0]);
    assert_eq!(ep.events()[2], EventType::StopAction);
    assert_eq!(ep.read_frame(2).unwrap().get_pixel(0, 0).0, camera(4, 0, 0));
    // 650 ms: the -0.5 turn.
    assert_eq!(ep.actions()[4], [0.0, 0.0, -0.5]);
}

#[test]
fn topic_errors_name_the_topic() {
    let out = tempfile::tempdir().unwrap();
    let opts = ImportOptions {
        image_topic: Some("/nope".into()),
        ..Default::default()
    };
    let err = import_bag(&fixture("mcap"), out.path(), &opts, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(&err, BagError::NoSuchTopic { topic, .. } if topic == "/nope"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("/camera/image_raw (sensor_msgs/msg/Image)"),
        "{err}"
    );
    let opts = ImportOptions {
        cmd_topic: Some("/instruction".into()),
        ..Default::default()
    };
    let err = import_bag(&fixture("mcap"), out.path(), &opts, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, BagError::TopicType { .. }), "{err}");
    let err = import_bag(
        out.path(),
        out.path(),
        &ImportOptions::default(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BagError::NoMetadata { .. }), "{err}");
}

/// One episode's name, actions, events and stored frames.
type Content = (String, Vec<[f32; 3]>, Vec<EventType>, Vec<Vec<u8>>);

/// Everything an import produced, for comparing two imports.
fn content(eps: &[EpisodeReader]) -> Vec<Content> {
    eps.iter()
        .map(|e| {
            let frames = (0..e.len())
                .map(|t| e.read_frame_stored(t).unwrap().into_raw())
                .collect();
            (
                e.meta().episode_name.clone(),
                e.actions().to_vec(),
                e.events().to_vec(),
                frames,
            )
        })
        .collect()
}

/// Fails before the fix ("decompress it first"): bags written by `rosbags` with
/// `--compression-mode file|message --compression-format zstd` in both storages, and with
/// zstd MCAP chunks, import to exactly the plain bag's episodes.
#[test]
fn zstd_compressed_bags_import_like_plain_ones() {
    let (_a, plain) = import("mcap", &ImportOptions::default());
    let want = content(&plain);
    for (dir, compression) in [
        ("mcap_zstd_file", Compression::File),
        ("mcap_zstd_message", Compression::Message),
        ("sqlite3_zstd_file", Compression::File),
        ("sqlite3_zstd_message", Compression::Message),
        ("mcap_zstd_chunks", Compression::None),
    ] {
        assert_eq!(
            Bag::open(&fixture(dir)).unwrap().compression,
            compression,
            "{dir}"
        );
        let (_b, eps) = import(dir, &ImportOptions::default());
        assert_eq!(content(&eps), want, "{dir}");
    }
}

/// MCAP chunks compressed with lz4 (rosbag2's MCAP storage option), written by the mcap crate
/// from the plain fixture's messages.
#[test]
fn lz4_mcap_chunks_import_like_plain_ones() {
    let bytes = std::fs::read(fixture("mcap").join("mcap.mcap")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bag = dir.path().join("bag");
    std::fs::create_dir(&bag).unwrap();
    let out = std::fs::File::create(bag.join("mcap.mcap")).unwrap();
    let mut w = mcap::WriteOptions::new()
        .compression(Some(mcap::Compression::Lz4))
        .profile("ros2")
        .create(std::io::BufWriter::new(out))
        .unwrap();
    for m in mcap::MessageStream::new(&bytes).unwrap() {
        w.write(&m.unwrap()).unwrap();
    }
    w.finish().unwrap();
    drop(w);
    std::fs::copy(
        fixture("mcap").join("metadata.yaml"),
        bag.join("metadata.yaml"),
    )
    .unwrap();
    let written = std::fs::read(bag.join("mcap.mcap")).unwrap();
    assert!(
        written.windows(3).any(|w| w == b"lz4"),
        "the copy has lz4 chunks"
    );
    let (_a, plain) = import("mcap", &ImportOptions::default());
    let (_b, eps) = import_dir(&bag, &ImportOptions::default());
    assert_eq!(content(&eps), content(&plain));
}

#[test]
fn unsupported_compression_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["metadata.yaml", "mcap_zstd_file.mcap.zstd"] {
        std::fs::copy(fixture("mcap_zstd_file").join(f), dir.path().join(f)).unwrap();
    }
    let meta = dir.path().join("metadata.yaml");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(
        &meta,
        text.replace("compression_format: zstd", "compression_format: bz2"),
    )
    .unwrap();
    let err = Bag::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("bz2"), "{err}");
}

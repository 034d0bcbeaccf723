//! Recording a session live and importing its bag give the same episode: the same command
//! stream (the fixture bag's) goes once through the live path (`Sampler` + `RecordingSink`,
//! driven the way `recorder_node` drives them, with `~/start_episode` called just before the
//! first key press) and once through `import_bag`, in event mode with and without stop frames
//! and in rate mode. Before one sampler served both, the live path recorded stop frames and
//! compared commands with an epsilon while import compared exactly and had no stop frames.

use mobile_vla::data::bag::{cdr, import_bag, Bag, ImportOptions};
use mobile_vla::data::episode::{EpisodeReader, EventType, WriteOptions};
use mobile_vla::data::image::RawImage;
use mobile_vla::data::recording::{drain, CameraFrame, RecordingSink, SinkEvent};
use mobile_vla::data::sampling::{is_moving, SampleMode, Sampler, SamplerConfig, Step};
use std::path::{Path, PathBuf};

fn bag() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test/fixtures/bags/mcap")
}

/// The recorder's loop over the bag's messages, in recording order.
fn record_live(cfg: SamplerConfig, out: &Path, name: &str) -> PathBuf {
    let bag = Bag::open(&bag()).unwrap();
    let topics = ["/camera/image_raw".to_string(), "/cmd_vel".to_string()];
    let (mut sink, mut events) = RecordingSink::spawn(1024).unwrap();
    let mut sampler = Sampler::new(cfg);
    let mut latest: Option<CameraFrame> = None;
    // (first, last) step time of the episode.
    let mut span: Option<(u64, u64)> = None;
    let record = |sink: &mut RecordingSink,
                  latest: &Option<CameraFrame>,
                  span: &mut Option<(u64, u64)>,
                  t: u64,
                  (a, e): Step| {
        let frame = latest.clone().expect("an image before every step");
        assert!(sink.push(frame, a, e).unwrap());
        *span = Some((span.map_or(t, |s| s.0), t));
    };
    let mut last_time = 0;
    for m in bag.messages(&topics).unwrap() {
        let m = m.unwrap();
        last_time = m.log_time;
        // The rate timer fires between messages.
        while let Some((tick, step)) = sampler.tick_before(m.log_time) {
            record(&mut sink, &latest, &mut span, tick, step);
        }
        if m.topic == 0 {
            let i = cdr::image(&m.data).unwrap();
            latest = Some(CameraFrame::Raw(RawImage {
                width: i.width,
                height: i.height,
                encoding: i.encoding,
                is_bigendian: i.is_bigendian,
                step: i.step,
                data: i.data.to_vec(),
            }));
            continue;
        }
        let tw = cdr::twist(&m.data).unwrap();
        let action = [
            tw.linear[0] as f32,
            tw.linear[1] as f32,
            tw.angular[2] as f32,
        ];
        if span.is_none() && is_moving(&action) {
            sink.start(out, name, WriteOptions::default()).unwrap();
            let step = sampler.start(m.log_time);
            record(&mut sink, &latest, &mut span, m.log_time, step);
        }
        if let Some(step) = sampler.command(m.log_time, action) {
            if span.is_some() {
                record(&mut sink, &latest, &mut span, m.log_time, step);
            }
        }
    }
    while let Some((tick, step)) = sampler.tick_before(last_time + 1) {
        record(&mut sink, &latest, &mut span, tick, step);
    }
    let (first, last) = span.unwrap();
    sink.finish((last - first) as f64 * 1e-9).unwrap();
    sink.close().unwrap();
    drain(&mut events)
        .into_iter()
        .find_map(|e| match e {
            SinkEvent::Saved { path, .. } => Some(path),
            _ => None,
        })
        .expect("the live episode is saved")
}

fn same_episode(a: &EpisodeReader, b: &EpisodeReader) {
    assert_eq!(a.len(), b.len());
    assert_eq!(a.actions(), b.actions());
    assert_eq!(a.events(), b.events());
    assert_eq!(a.meta().total_duration, b.meta().total_duration);
    for t in 0..a.len() {
        assert_eq!(
            a.read_frame_stored(t).unwrap(),
            b.read_frame_stored(t).unwrap(),
            "frame {t}"
        );
    }
}

#[test]
fn live_recording_and_bag_import_give_identical_episodes() {
    let event = SamplerConfig::default();
    let quiet = SamplerConfig {
        record_stops: false,
        ..event
    };
    let rate = SamplerConfig {
        mode: SampleMode::Rate,
        ..event
    };
    for cfg in [event, quiet, rate] {
        let out = tempfile::tempdir().unwrap();
        let opts = ImportOptions {
            sampling: cfg,
            instruction: None,
            ..Default::default()
        };
        let imported =
            import_bag(&bag(), &out.path().join("import"), &opts, &mut |_, _| {}).unwrap();
        assert_eq!(imported.episodes.len(), 1);
        let imported = EpisodeReader::open(&imported.episodes[0].0).unwrap();
        let live_dir = out.path().join("live");
        std::fs::create_dir(&live_dir).unwrap();
        let live = EpisodeReader::open(&record_live(cfg, &live_dir, "live")).unwrap();
        same_episode(&live, &imported);
        let stops = live
            .events()
            .iter()
            .filter(|e| **e == EventType::StopAction)
            .count();
        match (cfg.mode, cfg.record_stops) {
            (SampleMode::Event, true) => assert_eq!(stops, 2, "{cfg:?}"),
            (SampleMode::Event, false) => assert_eq!(stops, 0, "{cfg:?}"),
            (SampleMode::Rate, _) => assert!(live.len() > 5, "{cfg:?}"),
        }
    }
}

//! `mobile_vla dataset export-mcap`: episodes written as ros2-profile MCAP read back with the mcap
//! crate and decoded from CDR give the stored frames, actions, events and instruction.

mod common;

use mobile_vla::data::bag::cdr;
use mobile_vla::data::episode::{EpisodeReader, WriteOptions};
use mobile_vla::data::image::ChannelOrder;
use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn export_mcap_reads_back_as_the_episodes() {
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("episodes");
    std::fs::create_dir(&eps).unwrap();
    let opts = WriteOptions::default().instruction(Some("go to the red box".into()));
    common::write_episode(&eps, "episode_a", 5, 8, 6, opts.clone());
    common::write_episode(
        &eps,
        "episode_b",
        3,
        8,
        6,
        opts.channel_order(ChannelOrder::Rgb),
    );
    let out = dir.path().join("all.mcap");

    let res = Command::new(env!("CARGO_BIN_EXE_mobile_vla"))
        .args(["dataset", "export-mcap"])
        .arg(&eps)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(String::from_utf8_lossy(&res.stdout).contains("2 episode(s), 8 frames"));

    let bytes = std::fs::read(&out).unwrap();
    let summary = mcap::Summary::read(&bytes).unwrap().unwrap();
    let mut by_topic: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for m in mcap::MessageStream::new(&bytes).unwrap() {
        let m = m.unwrap();
        let schema = m.channel.schema.as_ref().unwrap();
        assert_eq!(
            (
                m.channel.message_encoding.as_str(),
                schema.encoding.as_str()
            ),
            ("cdr", "ros2msg")
        );
        let expected_type = match m.channel.topic.as_str() {
            "/image" => "sensor_msgs/msg/Image",
            "/cmd_vel" => "geometry_msgs/msg/Twist",
            _ => "std_msgs/msg/String",
        };
        assert_eq!(schema.name, expected_type);
        by_topic
            .entry(m.channel.topic.clone())
            .or_default()
            .push((m.log_time, m.data.into_owned()));
    }
    assert_eq!(summary.stats.unwrap().message_count, 8 * 3 + 2);
    assert_eq!(by_topic["/instruction"].len(), 2);
    assert_eq!(
        cdr::string(&by_topic["/instruction"][0].1).unwrap(),
        "go to the red box"
    );

    let readers = ["episode_a", "episode_b"]
        .map(|n| EpisodeReader::open(&eps.join(format!("{n}.h5"))).unwrap());
    let mut k = 0;
    for r in &readers {
        let enc = if r.meta().channel_order == ChannelOrder::Bgr {
            "bgr8"
        } else {
            "rgb8"
        };
        for t in 0..r.len() {
            let img = cdr::image(&by_topic["/image"][k].1).unwrap();
            assert_eq!(
                (img.width, img.height, img.step, img.encoding.as_str()),
                (8, 6, 24, enc)
            );
            assert_eq!(
                img.data,
                r.read_frame_stored(t).unwrap().as_raw().as_slice()
            );
            let tw = cdr::twist(&by_topic["/cmd_vel"][k].1).unwrap();
            let a = r.actions()[t];
            assert_eq!(
                [tw.linear[0], tw.linear[1], tw.angular[2]],
                a.map(f64::from)
            );
            assert_eq!(
                cdr::string(&by_topic["/action_event"][k].1).unwrap(),
                r.events()[t].as_str()
            );
            k += 1;
        }
    }
    // Times: increasing, frames spread over total_duration (5 frames over 2.0 s), episodes apart.
    let times: Vec<u64> = by_topic["/image"].iter().map(|(t, _)| *t).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    assert_eq!(times[4] - times[0], 2_000_000_000);
    assert!(times[5] - times[4] >= 1_000_000_000);
    // No temp file left beside the output.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

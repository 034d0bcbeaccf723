//! Window/chunk sampling, split and normalisation against hand-computed values.

mod common;

use common::{action, frame, write_episode};
use mobile_vla::data::dataset::{
    chunk_indices, ActionNormalizer, ActionStats, DatasetConfig, MobileVlaDataset,
};
use mobile_vla::data::episode::WriteOptions;
use mobile_vla::data::image::ChannelOrder;

fn cfg(left_pad: bool) -> DatasetConfig {
    DatasetConfig {
        window_size: 3,
        fwd_pred_next_n: 2,
        left_pad,
        val_fraction: 0.0,
        ..Default::default()
    }
}

#[test]
fn chunk_indices_match_robovlms() {
    // T=5, W=3, N=2, anchor 4: j = 2..=6 → clamped [2,3,4,4,4], mask [1,1,1,0,0].
    assert_eq!(
        chunk_indices(4, 5, 3, 2),
        (vec![2, 3, 4, 4, 4], vec![true, true, true, false, false])
    );
    // Anchor 0 (left padding): j = -2..=2 → [0,0,0,1,2], mask [0,0,1,1,1].
    assert_eq!(
        chunk_indices(0, 5, 3, 2),
        (vec![0, 0, 0, 1, 2], vec![false, false, true, true, true])
    );
    // The fork's 18-frame episode with W=16, N=2, anchor 15: all 18 steps, all valid.
    let (idx, mask) = chunk_indices(15, 18, 16, 2);
    assert_eq!(idx, (0..18).collect::<Vec<_>>());
    assert!(mask.iter().all(|m| *m));
}

#[test]
fn windows_and_masked_chunks() {
    let dir = tempfile::tempdir().unwrap();
    write_episode(
        dir.path(),
        "a",
        5,
        4,
        2,
        WriteOptions::default().channel_order(ChannelOrder::Bgr),
    );
    let ds = MobileVlaDataset::open(dir.path(), cfg(false)).unwrap();
    // Anchors 2, 3, 4 (full windows only).
    assert_eq!(ds.len(), 3);
    let s = ds.get(2).unwrap();
    assert_eq!(s.anchor, 4);
    assert_eq!(s.frame_mask, vec![true, true, true]);
    let a = action;
    assert_eq!(
        s.action_chunks,
        vec![vec![a(2), a(3)], vec![a(3), a(4)], vec![a(4), a(4)]]
    );
    assert_eq!(
        s.chunk_mask,
        vec![vec![true, true], vec![true, true], vec![true, false]]
    );
    // Frames 2, 3, 4 as true RGB: the stored BGR bytes reversed per pixel.
    for (t, img) in s.frames.iter().enumerate() {
        let stored = frame(2 + t, 4, 2);
        for (p, q) in stored.pixels().zip(img.pixels()) {
            assert_eq!([p[2], p[1], p[0]], q.0);
        }
    }

    let ds = MobileVlaDataset::open(dir.path(), cfg(true)).unwrap();
    assert_eq!(ds.len(), 5);
    let s = ds.get(0).unwrap();
    assert_eq!(s.frame_mask, vec![false, false, true]);
    assert_eq!(
        s.action_chunks,
        vec![vec![a(0), a(0)], vec![a(0), a(0)], vec![a(0), a(1)]]
    );
    assert_eq!(
        s.chunk_mask,
        vec![vec![false, false], vec![false, true], vec![true, true]]
    );
    assert!(ds.get(5).is_err());
}

#[test]
fn split_is_by_episode_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    for e in 0..10 {
        write_episode(
            dir.path(),
            &format!("ep{e:02}"),
            4,
            2,
            2,
            WriteOptions::default(),
        );
    }
    let names = |ds: &MobileVlaDataset| -> Vec<String> {
        ds.episodes()
            .iter()
            .map(|e| e.meta().episode_name.clone())
            .collect()
    };
    let c = DatasetConfig {
        val_fraction: 0.2,
        seed: 7,
        ..cfg(false)
    };
    let (train, val) = MobileVlaDataset::open(dir.path(), c.clone())
        .unwrap()
        .split();
    assert_eq!((train.episodes().len(), val.episodes().len()), (8, 2));
    // Each episode of 4 steps gives anchors 2, 3.
    assert_eq!((train.len(), val.len()), (16, 4));
    let (t, v) = (names(&train), names(&val));
    assert!(v.iter().all(|n| !t.contains(n)));
    let (train2, val2) = MobileVlaDataset::open(dir.path(), c.clone())
        .unwrap()
        .split();
    assert_eq!((names(&train2), names(&val2)), (t, v.clone()));
    let other: Vec<Vec<String>> = (0..5)
        .map(|seed| {
            names(
                &MobileVlaDataset::open(dir.path(), DatasetConfig { seed, ..c.clone() })
                    .unwrap()
                    .split()
                    .1,
            )
        })
        .collect();
    assert!(
        other.iter().any(|o| *o != v),
        "the seed must change the split"
    );
}

#[test]
fn action_stats_and_normalisation() {
    let dir = tempfile::tempdir().unwrap();
    write_episode(dir.path(), "a", 5, 2, 2, WriteOptions::default());
    let ds = MobileVlaDataset::open(dir.path(), cfg(false)).unwrap();
    // action(t) = [0.1 t, -0.05 t, 0.5 - 0.01 t] for t = 0..5.
    let s = ds.action_stats().unwrap();
    assert_eq!(
        s,
        ActionStats {
            min: [0.0, -0.2, 0.46],
            max: [0.4, 0.0, 0.5],
            count: 5
        }
    );

    let n = ActionNormalizer::from_bounds(-1.0, 1.0).unwrap();
    assert_eq!(n.normalize([0.5, -2.0, 1.0]), [0.5, -1.0, 1.0]);
    let n = ActionNormalizer::new([-0.5, 0.0, -2.0], [0.5, 2.0, 2.0]).unwrap();
    // d0: 2(0.25+0.5)/1-1 = 0.5; d1: 2(0.5)/2-1 = -0.5; d2: clip 3→2, 2(4)/4-1 = 1.
    assert_eq!(n.normalize([0.25, 0.5, 3.0]), [0.5, -0.5, 1.0]);
    assert_eq!(n.denormalize([0.5, -0.5, 1.0]), [0.25, 0.5, 2.0]);
    assert!(ActionNormalizer::new([0.0; 3], [1.0, 0.0, 1.0]).is_err());
}

#[test]
fn dataset_can_feed_loader_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MobileVlaDataset>();
    let dir = tempfile::tempdir().unwrap();
    write_episode(dir.path(), "a", 6, 4, 2, WriteOptions::default());
    let ds = std::sync::Arc::new(MobileVlaDataset::open(dir.path(), cfg(false)).unwrap());
    let handles: Vec<_> = (0..ds.len())
        .map(|i| {
            let ds = ds.clone();
            std::thread::spawn(move || ds.get(i).unwrap().anchor)
        })
        .collect();
    let anchors: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(anchors, vec![2, 3, 4, 5]);
}

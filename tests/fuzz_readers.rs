//! Random, truncated and bit-flipped inputs to the HDF5 episode reader, the CDR decoders and the
//! bag readers: every outcome must be a value or an error, never a panic.
//!
//! Bit flips inside HDF5 *metadata* are not fuzzed in-process: libhdf5 (C, 1.10) itself can
//! crash on them, which is why `dataset validate` checks each file in a child process.

mod common;

use mobile_vla::data::bag::{cdr, import_bag, ImportOptions};
use mobile_vla::data::episode::{validate_file, EpisodeReader, ReadOptions, WriteOptions};
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// A valid episode's bytes, written once.
fn episode_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = common::write_episode(dir.path(), "e", 3, 8, 6, WriteOptions::default());
        std::fs::read(p).unwrap()
    })
}

/// Opens, validates and reads every frame; only panics would fail the caller.
fn exercise_episode(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.h5");
    std::fs::write(&p, bytes).unwrap();
    let _ = validate_file(&p, ReadOptions::default());
    if let Ok(r) = EpisodeReader::open(&p) {
        for t in 0..r.len() {
            let _ = r.read_frame(t);
        }
    }
}

fn fixture(storage: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/bags")
        .join(storage)
}

/// Copies a fixture bag, lets `mutate` damage its storage file, imports it.
fn exercise_bag(storage: &str, mut mutate: impl FnMut(&mut Vec<u8>)) {
    let src = fixture(storage);
    let dir = tempfile::tempdir().unwrap();
    let bag = dir.path().join("bag");
    std::fs::create_dir(&bag).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if path.extension().is_some_and(|e| e == "mcap" || e == "db3") {
            mutate(&mut bytes);
        }
        std::fs::write(bag.join(path.file_name().unwrap()), bytes).unwrap();
    }
    let _ = import_bag(
        &bag,
        &dir.path().join("out"),
        &ImportOptions::default(),
        &mut |_, _| {},
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn hdf5_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        exercise_episode(&bytes);
    }

    #[test]
    fn hdf5_with_valid_signature_then_garbage(tail in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = b"\x89HDF\r\n\x1a\n".to_vec();
        bytes.extend(tail);
        exercise_episode(&bytes);
    }

    #[test]
    fn hdf5_truncated(frac in 0.0f64..1.0) {
        let b = episode_bytes();
        exercise_episode(&b[..(b.len() as f64 * frac) as usize]);
    }

    #[test]
    fn cdr_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = cdr::image(&bytes);
        let _ = cdr::compressed_image(&bytes);
        let _ = cdr::twist(&bytes);
        let _ = cdr::twist_stamped(&bytes);
        let _ = cdr::string(&bytes);
    }

    #[test]
    fn cdr_le_header_then_random(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = vec![0, 1, 0, 0];
        bytes.extend(body);
        let _ = cdr::image(&bytes);
        let _ = cdr::compressed_image(&bytes);
        let _ = cdr::twist_stamped(&bytes);
        let _ = cdr::string(&bytes);
    }

    #[test]
    fn bags_truncated(frac in 0.0f64..1.0, mcap in any::<bool>()) {
        exercise_bag(if mcap { "mcap" } else { "sqlite3" }, |b| b.truncate((b.len() as f64 * frac) as usize));
    }

    #[test]
    fn bags_bit_flips(flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..8), mcap in any::<bool>()) {
        exercise_bag(if mcap { "mcap" } else { "sqlite3" }, |b| {
            for (i, bit) in &flips {
                let i = i.index(b.len());
                b[i] ^= 1 << bit;
            }
        });
    }

    #[test]
    fn bags_random_storage(bytes in proptest::collection::vec(any::<u8>(), 0..4096), mcap in any::<bool>()) {
        exercise_bag(if mcap { "mcap" } else { "sqlite3" }, |b| *b = bytes.clone());
    }
}

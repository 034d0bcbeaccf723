//! Random, truncated and bit-flipped inputs to the HDF5 episode reader, the CDR decoders and the
//! bag readers: every outcome must be a value or an error, never a panic; and where the input
//! is well-formed (a random valid episode, a random message encoded as CDR, an untouched bag)
//! the decoded value must be the one encoded.
//!
//! Bit flips anywhere in an HDF5 file, metadata included, are safe to fuzz in-process: every
//! reader checks the file in a child process first, where a libhdf5 crash ends only the child.

mod common;

use mobile_vla::data::bag::{cdr, import_bag, ImportOptions};
use mobile_vla::data::episode::{
    validate_file, Depth, EpisodeReader, EpisodeWriter, EventType, WriteOptions,
};
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

/// Opens and validates: the reader opens exactly the files the validator passes, and their
/// first and last frame (the ones validation reads) read. Middle frames of a damaged file are
/// not read in-process: a frame's chunk index could still crash libhdf5 there.
fn exercise_episode(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.h5");
    std::fs::write(&p, bytes).unwrap();
    let defects = validate_file(&p, Depth::Structure);
    match EpisodeReader::open(&p) {
        Ok(r) => {
            assert!(defects.is_empty(), "opened despite {defects:?}");
            assert!(r.read_frame(0).is_ok() && r.read_frame(r.len() - 1).is_ok());
        }
        Err(e) => assert!(!defects.is_empty(), "refused without a defect: {e}"),
    }
}

/// CDR (little endian) of the messages the bag reader decodes, written the way rclcpp does.
#[derive(Default)]
struct Cdr(Vec<u8>);

impl Cdr {
    fn new() -> Self {
        Self(vec![0, 1, 0, 0])
    }
    fn align(&mut self, n: usize) {
        while (self.0.len() - 4) % n != 0 {
            self.0.push(0);
        }
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.align(4);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn f64(&mut self, v: f64) -> &mut Self {
        self.align(8);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn string(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32 + 1);
        self.0.extend(s.as_bytes());
        self.0.push(0);
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend(b);
        self
    }
    fn header(&mut self, sec: i32, nanosec: u32, frame: &str) -> &mut Self {
        self.u32(sec as u32).u32(nanosec).string(frame)
    }
}

fn fixture(storage: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/bags")
        .join(storage)
}

#[test]
fn untouched_bags_import_their_episode() {
    for storage in ["mcap", "sqlite3"] {
        let out = tempfile::tempdir().unwrap();
        let summary = import_bag(
            &fixture(storage),
            out.path(),
            &ImportOptions::default(),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!((summary.images, summary.commands), (12, 8), "{storage}");
        assert_eq!(summary.episodes.len(), 1, "{storage}");
        assert_eq!(summary.episodes[0].1, 3, "{storage}");
    }
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
    fn hdf5_bit_flips(flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)) {
        let mut b = episode_bytes().to_vec();
        for (i, bit) in &flips {
            let i = i.index(b.len());
            b[i] ^= 1 << bit;
        }
        exercise_episode(&b);
    }

    #[test]
    fn hdf5_valid_episodes_read_back(
        t in 1usize..5,
        w in 1u32..9,
        h in 1u32..7,
        seed in any::<u8>(),
        actions in proptest::collection::vec(proptest::array::uniform3(-10.0f32..10.0), 5),
        instruction in "[ -~]{0,256}",
    ) {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriteOptions::default().instruction(Some(instruction.clone()));
        let mut wr = EpisodeWriter::create(dir.path(), "e", opts).unwrap();
        let frame = |k: usize| image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed, k as u8, (x * 16 + y) as u8]));
        for (k, a) in actions.iter().take(t).enumerate() {
            wr.push(&frame(k), *a, common::event(k)).unwrap();
        }
        let path = wr.finish(1.25).unwrap();
        prop_assert!(validate_file(&path, Depth::EveryFrame).is_empty());
        let r = EpisodeReader::open(&path).unwrap();
        prop_assert_eq!(r.actions(), &actions[..t]);
        prop_assert_eq!(r.events().to_vec(), (0..t).map(common::event).collect::<Vec<EventType>>());
        prop_assert_eq!(r.meta().total_duration, 1.25);
        let stored = r.meta().stored_instruction.clone();
        prop_assert_eq!(stored.as_deref(), Some(instruction.as_str()));
        for k in 0..t {
            prop_assert_eq!(r.read_frame_stored(k).unwrap(), frame(k));
        }
    }

    #[test]
    fn cdr_well_formed_messages_decode_to_their_values(
        v in proptest::array::uniform6(any::<f64>()),
        sec in any::<i32>(),
        nanosec in any::<u32>(),
        frame_id in "[a-z_/]{0,12}",
        text in "\\PC{0,40}",
        (width, height, step) in (0u32..9, 0u32..9, 0u32..40),
        encoding in "[a-z0-9]{0,8}",
        big in any::<bool>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let twist = |c: &mut Cdr| {
            for x in v {
                c.f64(x);
            }
        };
        let mut c = Cdr::new();
        twist(&mut c);
        let decoded = cdr::twist(&c.0).unwrap();
        let same = |a: [f64; 3], b: &[f64]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same(decoded.linear, &v[..3]) && same(decoded.angular, &v[3..]));

        let mut c = Cdr::new();
        c.header(sec, nanosec, &frame_id);
        twist(&mut c);
        let (hdr, decoded) = cdr::twist_stamped(&c.0).unwrap();
        prop_assert_eq!((hdr.sec, hdr.nanosec, hdr.frame_id.as_str()), (sec, nanosec, frame_id.as_str()));
        prop_assert!(same(decoded.linear, &v[..3]) && same(decoded.angular, &v[3..]));

        let mut c = Cdr::new();
        c.string(&text);
        prop_assert_eq!(cdr::string(&c.0).unwrap(), text.clone());

        let mut c = Cdr::new();
        c.header(sec, nanosec, &frame_id).u32(height).u32(width).string(&encoding);
        c.0.push(u8::from(big));
        c.u32(step).bytes(&data);
        let img = cdr::image(&c.0).unwrap();
        prop_assert_eq!(
            (img.height, img.width, img.encoding.as_str(), img.is_bigendian, img.step, img.data),
            (height, width, encoding.as_str(), big, step, &data[..])
        );
        prop_assert_eq!(img.header.frame_id, frame_id.clone());

        let mut c = Cdr::new();
        c.header(sec, nanosec, &frame_id).string(&encoding).bytes(&data);
        let ci = cdr::compressed_image(&c.0).unwrap();
        prop_assert_eq!((ci.format.as_str(), ci.data), (encoding.as_str(), &data[..]));
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

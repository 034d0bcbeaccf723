//! One corrupt episode must not take the process down. The fixture
//! `corrupt_metadata_crashes_libhdf5.h5` (a bit-flipped file found by fuzzing) makes Debian's
//! libhdf5 1.10 segfault on open: every reader checks files in a child process first, reports
//! and skips the corrupt one, and reads the good ones. Before that check these tests died with
//! SIGSEGV (the test binary itself for the in-process ones, exit 139 for the CLI).

mod common;

use mobile_vla::data::dataset::{DatasetConfig, MobileVlaDataset};
use mobile_vla::data::episode::{
    open_episodes, validate_file, Depth, EpisodeError, EpisodeReader, ReadOptions, WriteOptions,
};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("test/fixtures/episodes/corrupt_metadata_crashes_libhdf5.h5")
}

/// Held by each test: libhdf5 opens files without close-on-exec, so a process one test spawns
/// would inherit (and keep locked) an episode another test is writing at that moment.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// `a_crash.h5` (the fixture) beside two good episodes.
fn mixed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(), dir.path().join("a_crash.h5")).unwrap();
    for name in ["b_good", "c_good"] {
        common::write_episode(dir.path(), name, 5, 8, 6, WriteOptions::default());
    }
    dir
}

fn is_crash_defect(e: &EpisodeError) -> bool {
    matches!(e, EpisodeError::Invalid { defects, .. } if defects.iter().any(|d| d.field == "file"))
}

#[test]
fn reader_reports_the_crashing_file_as_invalid() {
    let _serial = serial();
    let err = EpisodeReader::open(&fixture()).unwrap_err();
    assert!(is_crash_defect(&err), "{err}");
    let defects = validate_file(&fixture(), Depth::Structure);
    assert_eq!(defects.len(), 1, "{defects:?}");
    // Cached by path, size and mtime: the same verdict again.
    assert_eq!(validate_file(&fixture(), Depth::Structure), defects);
}

#[test]
fn dataset_skips_the_corrupt_file_and_strict_fails() {
    let _serial = serial();
    let dir = mixed_dir();
    let cfg = DatasetConfig {
        window_size: 2,
        fwd_pred_next_n: 1,
        val_fraction: 0.0,
        ..Default::default()
    };
    let ds = MobileVlaDataset::open(dir.path(), cfg.clone()).unwrap();
    let names: Vec<&str> = ds
        .episodes()
        .iter()
        .map(|e| e.meta().episode_name.as_str())
        .collect();
    let skipped: Vec<String> = ds.skipped().iter().map(|e| e.to_string()).collect();
    assert_eq!(names, ["b_good", "c_good"], "skipped: {skipped:?}");
    assert_eq!(ds.skipped().len(), 1);
    assert!(
        ds.skipped()[0].to_string().contains("a_crash.h5"),
        "{}",
        ds.skipped()[0]
    );
    assert_eq!(ds.len(), 2 * 4);

    let strict = DatasetConfig {
        strict: true,
        ..cfg
    };
    let err = MobileVlaDataset::open(dir.path(), strict)
        .err()
        .expect("strict must fail");
    assert!(err.to_string().contains("a_crash.h5"), "{err}");

    let paths: Vec<PathBuf> = ["a_crash.h5", "b_good.h5"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let opened = open_episodes(&paths, ReadOptions::default(), false).unwrap();
    assert_eq!(opened.episodes.len(), 1);
    assert!(is_crash_defect(&opened.skipped[0]));
}

#[test]
fn cli_info_lists_the_good_episodes_and_the_skipped_one() {
    let _serial = serial();
    let dir = mixed_dir();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mobile_vla"))
            .args(["dataset", "info"])
            .args(args)
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("b_good.h5") && stdout.contains("c_good.h5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SKIPPED") && stdout.contains("a_crash.h5"),
        "{stdout}"
    );
    assert!(stdout.contains("2 episodes, 10 frames"), "{stdout}");

    let json = run(&["--json"]);
    assert!(json.status.success(), "{json:?}");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["total_episodes"], 2);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 1);

    let strict = run(&["--strict"]);
    assert_eq!(strict.status.code(), Some(1), "{strict:?}");
    assert!(String::from_utf8_lossy(&strict.stderr).contains("a_crash.h5"));
}

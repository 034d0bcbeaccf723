//! `kill -9` while episodes are being written: every finished episode stays intact, and the
//! in-flight one is either recovered (a valid prefix) or discarded — never a corrupt file under a
//! final name.

mod common;

use common::{action, frame, write_episode};
use mobile_vla::data::episode::{
    list_episodes, recover_partials, EpisodeReader, WriteOptions, PARTIAL_SUFFIX,
};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "MOBILE_VLA_KILL_TEST_DIR";
const FRAMES: usize = 20;
const W: u32 = 320;
const H: u32 = 240;

/// Not a test of its own: the writer process that `sigkill_*` spawns (a no-op otherwise).
#[test]
fn child_writer_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let opts = WriteOptions::default()
        .gzip_level(Some(1))
        .compression_threads(2);
    for e in 0.. {
        write_episode(
            Path::new(&dir),
            &format!("ep{e:04}"),
            FRAMES,
            W,
            H,
            opts.clone(),
        );
    }
}

#[test]
fn sigkill_keeps_finished_episodes_and_recovers_or_discards_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writer_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while list_episodes(dir.path()).unwrap().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "writer too slow"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Somewhere inside the next episode: once its partial file is there (a loaded machine may
    // take longer than the sleep below to start it), a few milliseconds in.
    let partials = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)
            })
            .count()
    };
    while partials() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "writer too slow"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(37));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Usually the episode seen starting; none if it finished just before the kill.
    let in_flight = partials();
    assert!(in_flight <= 1, "{in_flight} partial episodes");

    let finished = list_episodes(dir.path()).unwrap();
    assert!(finished.len() >= 3);
    let check = |p: &Path, expect_len: Option<usize>| {
        let r = EpisodeReader::open(p).unwrap_or_else(|e| panic!("{e}"));
        if let Some(n) = expect_len {
            assert_eq!(r.len(), n, "{}", p.display());
        }
        for t in 0..r.len() {
            assert_eq!(r.actions()[t], action(t));
            assert_eq!(
                r.read_frame_stored(t).unwrap(),
                frame(t, W, H),
                "{} frame {t}",
                p.display()
            );
        }
    };
    for p in &finished {
        check(p, Some(FRAMES));
    }
    let report = recover_partials(dir.path()).unwrap();
    assert_eq!(
        report.recovered.len() + report.discarded.len(),
        in_flight,
        "{report:?}"
    );
    for (p, n) in &report.recovered {
        assert!(*n >= 1 && *n <= FRAMES);
        check(p, Some(*n));
    }
    // Nothing unfinished remains, and every file under a final name is valid.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for p in list_episodes(dir.path()).unwrap() {
        check(&p, None);
    }
}

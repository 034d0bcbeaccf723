//! Recorder throughput: 1280×720 BGR frames offered at 30 Hz for 60 s (EPISODE_BENCH_SECS to
//! change) to an `EpisodeWriter` on its own thread, per gzip level (EPISODE_BENCH_LEVELS, e.g.
//! "none,1,4") and compression thread count (EPISODE_BENCH_THREADS, default 2). The camera side never blocks: a frame that finds the 1 s queue full is dropped,
//! as in the recorder node. Reports achieved fps, dropped frames, process CPU % (of one core),
//! CPU time per frame (load-independent: 2 idle cores give 2000 / that many fps), and MB/s of
//! raw frames in and of file written.
//!
//! Run: `cargo bench --bench episode_write` (add `--profile dev` to skip a release build: the
//! work happens in libhdf5/zlib, which are optimised either way).

use image::RgbImage;
use mobile_vla::data::episode::{EpisodeWriter, EventType, WriteOptions};
use std::sync::mpsc::{sync_channel, TrySendError};
use std::time::{Duration, Instant};

const W: u32 = 1280;
const H: u32 = 720;
const HZ: f64 = 30.0;

/// Camera-like frames: smooth gradients, texture and sensor noise, shifting every frame.
fn frames(n: usize) -> Vec<RgbImage> {
    let mut seed = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|k| {
            RgbImage::from_fn(W, H, |x, y| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let noise = (seed % 9) as i32 - 4;
                let base = |c: u32| {
                    ((x + 2 * k as u32) / 5 + y / 3 + c * 40) as i32
                        + ((x / 40 + y / 40) % 2) as i32 * 30
                };
                let px = |c: u32| (base(c) + noise).clamp(0, 255) as u8;
                image::Rgb([px(0), px(1), px(2)])
            })
        })
        .collect()
}

/// (user + system) CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let field = |i: usize| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // `rest` starts at field 3 (state); utime is field 14, stime 15. USER_HZ is 100 on Linux.
    (field(11) + field(12)) / 100.0
}

struct Outcome {
    written: usize,
    dropped: usize,
    wall: f64,
    cpu: f64,
    bytes: u64,
}

fn run(level: Option<u8>, threads: usize, secs: f64, pool: &[RgbImage]) -> Outcome {
    let dir =
        tempfile::tempdir_in(std::env::var("EPISODE_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let total = (secs * HZ) as usize;
    let (tx, rx) = sync_channel::<(usize, RgbImage)>(HZ as usize);
    let opts = WriteOptions::default()
        .gzip_level(level)
        .compression_threads(threads);
    let path = dir.path().to_path_buf();
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let writer = std::thread::spawn(move || {
        let mut w = EpisodeWriter::create(&path, "bench", opts).unwrap();
        for (i, frame) in rx {
            let event = if i == 0 {
                EventType::EpisodeStart
            } else {
                EventType::StartAction
            };
            w.push(&frame, [0.1, 0.0, 0.0], event).unwrap();
        }
        let n = w.len();
        let p = w.finish(secs).unwrap();
        (n, std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
    });
    let mut dropped = 0;
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / HZ);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // The camera driver hands over a fresh buffer each frame.
        match tx.try_send((i, pool[i % pool.len()].clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => dropped += 1,
            Err(TrySendError::Disconnected(_)) => panic!("writer thread died"),
        }
    }
    drop(tx);
    let (written, bytes) = writer.join().unwrap();
    Outcome {
        written,
        dropped,
        wall: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds() - cpu0,
        bytes,
    }
}

fn main() {
    let secs: f64 = std::env::var("EPISODE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let levels: Vec<Option<u8>> = std::env::var("EPISODE_BENCH_LEVELS")
        .unwrap_or_else(|_| "none,1,4".into())
        .split(',')
        .map(|l| l.trim().parse().ok())
        .collect();
    let threads: usize = std::env::var("EPISODE_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let pool = frames(30);
    let raw_mb = (W * H * 3) as f64 / 1e6;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{W}x{H} BGR at {HZ} Hz for {secs} s per level; {threads} compression thread(s); {cpus} CPU(s)");
    println!(
        "{:>6} {:>8} {:>8} {:>9} {:>7} {:>12} {:>10} {:>10} {:>7}",
        "gzip",
        "written",
        "dropped",
        "fps",
        "CPU %",
        "CPU ms/frame",
        "in MB/s",
        "file MB/s",
        "ratio"
    );
    for level in levels {
        let o = run(level, threads, secs, &pool);
        let name = level.map_or("none".to_string(), |l| l.to_string());
        println!(
            "{name:>6} {:>8} {:>8} {:>9.2} {:>7.0} {:>12.1} {:>10.1} {:>10.1} {:>7.2}",
            o.written,
            o.dropped,
            o.written as f64 / secs,
            100.0 * o.cpu / o.wall,
            1e3 * o.cpu / o.written.max(1) as f64,
            o.written as f64 * raw_mb / o.wall,
            o.bytes as f64 / 1e6 / o.wall,
            o.written as f64 * raw_mb * 1e6 / o.bytes.max(1) as f64,
        );
    }
}

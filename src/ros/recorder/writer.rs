//! recorder_node's episode writer as the lifecycle sees it: configure prepares `output_dir` and
//! starts the writer thread, cleanup (and shutdown) ends it.

use super::session::{on_sink_event, writer_stopped, Recording};
use super::{RecorderParams, Validated};
use crate::data::episode::recover_partials;
use crate::data::recording::{drain, RecordingSink, SinkEvents};
use crate::data::sampling::Sampler;
use anyhow::Context as _;
use r2r::mobile_vla::msg::RecordingStatus;
use tracing::{error, info, warn};

/// What configure prepares and cleanup releases: the episode writer thread and its reports.
pub(super) struct Writer {
    pub(super) sink: RecordingSink,
    pub(super) events: SinkEvents,
}

/// Configure: the output directory exists and is writable, what a killed recorder left there is
/// salvaged before anything new is written, and the writer thread runs.
pub(super) fn prepare(p: &RecorderParams, v: &Validated) -> anyhow::Result<Writer> {
    std::fs::create_dir_all(&v.dir)
        .with_context(|| format!("cannot create output_dir {}", v.dir.display()))?;
    // A probe file, removed on drop: a read-only directory fails here, not at the first episode.
    tempfile::NamedTempFile::new_in(&v.dir).with_context(|| {
        format!(
            "output_dir {} is not writable: fix its permissions or choose another",
            v.dir.display()
        )
    })?;
    let report = recover_partials(&v.dir)?;
    for (path, n) in &report.recovered {
        warn!(
            "recovered {n} frame(s) of an interrupted episode into {}",
            path.display()
        );
    }
    for (path, why) in &report.discarded {
        warn!("discarded interrupted episode {}: {why}", path.display());
    }
    for (path, why) in &report.kept {
        error!(
            "interrupted episode {} could not be recovered and stays there: {why}",
            path.display()
        );
    }
    let (sink, events) =
        RecordingSink::spawn(p.queue_size as usize).context("starting the episode writer")?;
    info!(
        "recorder_node: {} ({}) + {} + {} -> {} [{:?} mode, {} order]",
        p.image_topic,
        if p.compressed { "compressed" } else { "raw" },
        p.cmd_topic,
        p.instruction_topic,
        v.dir.display(),
        v.sampling.mode,
        v.order
    );
    Ok(Writer { sink, events })
}

/// Cleanup: waits for the writer to write everything queued, ends its thread and takes its last
/// reports.
pub(super) fn close(
    w: Writer,
    rec: &mut Option<Recording>,
    saving: &mut Option<String>,
    status: &mut RecordingStatus,
    sampler: &mut Sampler,
) {
    let Writer { sink, mut events } = w;
    status.frames_dropped = u32::try_from(sink.dropped()).unwrap_or(u32::MAX);
    if let Err(e) = sink.close() {
        writer_stopped(&e, status);
    }
    for event in drain(&mut events) {
        on_sink_event(event, rec, saving, status, sampler);
    }
}

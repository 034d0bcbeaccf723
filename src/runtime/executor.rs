//! Chunk execution: which action of which predicted chunk is commanded at a given time.
//!
//! Every mode is latency-aware: `actions[i]` of a chunk predicted from an image stamped `t` is due
//! during `[t + i·dt, t + (i+1)·dt)`. A chunk that arrives late (a slow inference) starts at the
//! action due now and never replays the past; a chunk whose last action is already over is stale
//! and drives nothing.

use super::Command;
use std::collections::VecDeque;
use std::str::FromStr;

/// How predicted chunks become commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionMode {
    /// Re-plan continuously; the newest chunk alone drives (with a fast model its action 0: the
    /// Mobile VLA fork's behaviour).
    First,
    /// Play a chunk to its end at its `dt`, then re-plan.
    Chunk,
    /// Re-plan continuously and average every chunk's action due now, ACT's temporal ensembling:
    /// weights `exp(−decay·k)`, `k = 0` for the oldest chunk.
    Ensemble,
}

impl FromStr for ExecutionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "first" => Ok(Self::First),
            "chunk" => Ok(Self::Chunk),
            "ensemble" => Ok(Self::Ensemble),
            _ => Err(format!(
                "`{s}` is not an execution mode: use first, chunk or ensemble"
            )),
        }
    }
}

/// A predicted chunk on the clock of the image it was predicted from.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedChunk {
    /// Stamp of the image [s].
    pub stamp: f64,
    /// Seconds each action spans.
    pub dt: f64,
    pub actions: Vec<Command>,
}

impl TimedChunk {
    /// Index of the action due at `now` (0 before the stamp), `None` once the chunk is over.
    pub fn due_index(&self, now: f64) -> Option<usize> {
        let i = ((now - self.stamp) / self.dt).floor().max(0.0);
        (i < self.actions.len() as f64).then_some(i as usize)
    }

    /// When the last action's slot ends.
    pub fn end(&self) -> f64 {
        self.stamp + self.actions.len() as f64 * self.dt
    }
}

/// Holds the chunks that can still drive and picks the command due at a time.
#[derive(Debug)]
pub struct ChunkExecutor {
    mode: ExecutionMode,
    decay: f64,
    /// Oldest first. `Chunk` mode: the front one plays, at most one newer one waits.
    chunks: VecDeque<TimedChunk>,
}

impl ChunkExecutor {
    /// `decay` is the ensemble weight exponent per chunk (ACT uses 0.01); other modes ignore it.
    pub fn new(mode: ExecutionMode, decay: f64) -> Self {
        Self {
            mode,
            decay,
            chunks: VecDeque::new(),
        }
    }

    pub fn mode(&self) -> ExecutionMode {
        self.mode
    }

    /// Adds a new prediction. Returns false (and keeps nothing) when the whole chunk is already
    /// over at `now`, or when it is older than a chunk already held.
    pub fn push(&mut self, chunk: TimedChunk, now: f64) -> bool {
        if chunk.actions.is_empty()
            || chunk.end() <= now
            || self.chunks.back().is_some_and(|c| c.stamp > chunk.stamp)
        {
            return false;
        }
        match self.mode {
            ExecutionMode::First => self.chunks.clear(),
            ExecutionMode::Chunk => self.chunks.truncate(1),
            ExecutionMode::Ensemble => {}
        }
        self.chunks.push_back(chunk);
        true
    }

    /// Forgets every chunk (new instruction, watchdog, reset): nothing drives until the next one.
    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// The command due at `now`, `None` when no held chunk has one.
    pub fn action(&mut self, now: f64) -> Option<Command> {
        self.chunks.retain(|c| c.end() > now);
        match self.mode {
            ExecutionMode::First | ExecutionMode::Chunk => {
                let c = self.chunks.front()?;
                c.due_index(now).map(|i| c.actions[i])
            }
            ExecutionMode::Ensemble => {
                let (mut sum, mut total) = ([0.0f64; 3], 0.0f64);
                for (k, c) in self.chunks.iter().enumerate() {
                    if let Some(i) = c.due_index(now) {
                        let w = (-self.decay * k as f64).exp();
                        for (s, a) in sum.iter_mut().zip(c.actions[i]) {
                            *s += w * f64::from(a);
                        }
                        total += w;
                    }
                }
                (total > 0.0).then(|| sum.map(|s| (s / total) as f32))
            }
        }
    }

    /// Whether an inference should start now: always in the re-planning modes; in `Chunk` mode
    /// only when the playing chunk has run out and none waits.
    pub fn wants_plan(&self, now: f64) -> bool {
        match self.mode {
            ExecutionMode::First | ExecutionMode::Ensemble => true,
            ExecutionMode::Chunk => self.chunks.iter().all(|c| c.end() <= now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stamp: f64, xs: &[f32]) -> TimedChunk {
        TimedChunk {
            stamp,
            dt: 0.5,
            actions: xs.iter().map(|&x| [x, 0.0, 0.0]).collect(),
        }
    }

    fn xs(e: &mut ChunkExecutor, times: &[f64]) -> Vec<Option<f32>> {
        times.iter().map(|&t| e.action(t).map(|a| a[0])).collect()
    }

    #[test]
    fn modes_parse_by_name() {
        assert_eq!("chunk".parse(), Ok(ExecutionMode::Chunk));
        assert!("all"
            .parse::<ExecutionMode>()
            .unwrap_err()
            .contains("first, chunk or ensemble"));
    }

    #[test]
    fn actions_are_due_at_stamp_plus_i_dt() {
        let c = chunk(10.0, &[1.0, 2.0, 3.0]);
        assert_eq!(c.due_index(9.0), Some(0));
        assert_eq!(c.due_index(10.49), Some(0));
        assert_eq!(c.due_index(10.5), Some(1));
        assert_eq!(c.due_index(11.2), Some(2));
        assert_eq!(c.due_index(11.5), None);
    }

    #[test]
    fn a_late_chunk_starts_at_the_action_due_now() {
        for mode in [
            ExecutionMode::First,
            ExecutionMode::Chunk,
            ExecutionMode::Ensemble,
        ] {
            let mut e = ChunkExecutor::new(mode, 0.01);
            // Predicted from an image stamped 10.0, arriving 1.1 s later.
            assert!(e.push(chunk(10.0, &[1.0, 2.0, 3.0, 4.0]), 11.1));
            assert_eq!(
                xs(&mut e, &[11.1, 11.6, 12.1]),
                [Some(3.0), Some(4.0), None],
                "{mode:?}"
            );
        }
    }

    #[test]
    fn a_stale_chunk_is_refused() {
        let mut e = ChunkExecutor::new(ExecutionMode::Chunk, 0.01);
        assert!(!e.push(chunk(10.0, &[1.0, 2.0]), 11.0));
        assert_eq!(e.action(11.0), None);
        assert!(e.wants_plan(11.0));
    }

    #[test]
    fn first_mode_follows_the_newest_chunk() {
        let mut e = ChunkExecutor::new(ExecutionMode::First, 0.01);
        e.push(chunk(0.0, &[1.0, 2.0, 3.0]), 0.1);
        assert_eq!(e.action(0.1), Some([1.0, 0.0, 0.0]));
        e.push(chunk(0.3, &[5.0, 6.0, 7.0]), 0.4);
        // An older prediction that finishes late never replaces a newer one.
        assert!(!e.push(chunk(0.2, &[9.0, 9.0, 9.0]), 0.5));
        assert_eq!(
            xs(&mut e, &[0.5, 0.8, 1.3, 1.8]),
            [Some(5.0), Some(6.0), Some(7.0), None]
        );
        assert!(e.wants_plan(1.8));
    }

    #[test]
    fn chunk_mode_plays_to_the_end_then_takes_the_waiting_chunk() {
        let mut e = ChunkExecutor::new(ExecutionMode::Chunk, 0.01);
        e.push(chunk(0.0, &[1.0, 2.0]), 0.0);
        assert!(!e.wants_plan(0.9));
        e.push(chunk(0.6, &[5.0, 6.0, 7.0]), 0.8);
        e.push(chunk(0.7, &[8.0, 9.0, 10.0]), 0.9); // replaces the waiting one
        assert_eq!(
            xs(&mut e, &[0.0, 0.5, 0.9, 1.0, 1.2, 1.7, 2.2]),
            [
                Some(1.0),
                Some(2.0),
                Some(2.0),
                Some(8.0),
                Some(9.0),
                Some(10.0),
                None
            ]
        );
        assert!(e.wants_plan(2.2));
    }

    #[test]
    fn ensemble_weights_older_chunks_more() {
        let mut e = ChunkExecutor::new(ExecutionMode::Ensemble, 1.0);
        e.push(chunk(0.0, &[1.0, 1.0, 1.0]), 0.0);
        assert_eq!(e.action(0.2), Some([1.0, 0.0, 0.0]));
        e.push(chunk(0.5, &[4.0, 4.0, 4.0]), 0.5);
        let w1 = (-1.0f64).exp();
        let want = (1.0 + 4.0 * w1) / (1.0 + w1);
        assert!((f64::from(e.action(0.7).unwrap()[0]) - want).abs() < 1e-6);
        // The first chunk is over at 1.5: the second alone drives.
        assert_eq!(e.action(1.6), Some([4.0, 0.0, 0.0]));
        e.clear();
        assert_eq!(e.action(1.6), None);
    }
}

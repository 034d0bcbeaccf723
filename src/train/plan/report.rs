//! What the planner tells the user: why a strategy was chosen, and the per-strategy table
//! `mobile_vla plan` prints.

use std::fmt::Write as _;

use super::{gib, Plan, MIB};

impl Plan {
    /// Why the choice was made, for the log and `metrics.jsonl`.
    pub fn reason(&self) -> String {
        match self.chosen() {
            Ok(e) => {
                let stronger: Vec<String> = self.estimates[..self.choice.unwrap_or(0)]
                    .iter()
                    .map(|s| format!("{} needs ~{}", s.rung.name(), gib(s.peak())))
                    .collect();
                let mut why = format!(
                    "auto: {} is the strongest that fits: ~{} of the {} budget",
                    e.rung.name(),
                    gib(e.peak()),
                    gib(self.budget)
                );
                if !stronger.is_empty() {
                    let _ = write!(why, " ({})", stronger.join("; "));
                }
                why
            }
            Err(e) => e.to_string(),
        }
    }

    /// The per-strategy table `mobile_vla plan` prints.
    pub fn table(&self) -> String {
        let w = self.work;
        let mut out = format!(
            "batch {} × window {} × {} tokens per frame, accumulate {}; budget {}\n",
            w.batch,
            w.window,
            w.prompt_tokens,
            w.accumulate,
            gib(self.budget)
        );
        let _ = writeln!(
            out,
            "{:<22} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10}  note",
            "strategy",
            "trainable",
            "weights",
            "grads",
            "adamw",
            "activations",
            "workspace",
            "adamw step",
            "load",
            "peak"
        );
        let m = |b: u64| format!("{:.0}M", b as f64 / MIB as f64);
        for (i, e) in self.estimates.iter().enumerate() {
            let note = if Some(i) == self.choice {
                "<- chosen"
            } else if e.peak() > self.budget {
                "over budget"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{:<22} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10}  {note}",
                e.rung.name(),
                e.trainable,
                m(e.weights),
                m(e.gradients),
                m(e.optimiser),
                m(e.activations),
                m(e.workspace),
                m(e.step),
                m(e.load),
                m(e.peak()),
            );
        }
        out
    }
}

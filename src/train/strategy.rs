//! `--strategy`: what to train, from the strongest (the seed's full fine-tuning, 6.1) down to the
//! cheapest (frozen backbone, head only), and `auto`, which takes the strongest whose persistent
//! memory fits. A memory planner can call [`resolve`] with its own estimate.

use super::params::{Group, TrainableRules};
use crate::config::TrainSetup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The strongest of full, last-n, head whose estimate fits the available memory.
    Auto,
    /// `train_setup` exactly as the config says.
    Config,
    /// SEED 6.1: the whole VLM, vision tower and embeddings included.
    Full,
    /// Only the last `train_decoder_layers` text layers (2 when the config says -1) + head.
    LastN,
    /// SEED 6.2: LoRA on a frozen backbone.
    Lora,
    /// Frozen backbone: action token and policy head only.
    Head,
}

/// The order `auto` tries.
const LADDER: [Strategy; 3] = [Strategy::Full, Strategy::LastN, Strategy::Head];

impl Strategy {
    /// The `train_setup` this strategy trains with (`Auto` is resolved by [`resolve`]).
    pub fn setup(self, cfg: &TrainSetup) -> TrainSetup {
        let base = TrainSetup {
            freeze_resampler: true,
            lora: None,
            ..cfg.clone()
        };
        match self {
            Self::Auto | Self::Config => cfg.clone(),
            Self::Full => TrainSetup {
                freeze_backbone: false,
                train_decoder_layers: -1,
                train_vision: true,
                train_text_embedding: true,
                ..base
            },
            Self::LastN => TrainSetup {
                freeze_backbone: false,
                train_decoder_layers: if cfg.train_decoder_layers == -1 {
                    2
                } else {
                    cfg.train_decoder_layers
                },
                train_vision: false,
                train_text_embedding: false,
                ..base
            },
            Self::Lora => TrainSetup {
                freeze_backbone: true,
                train_vision: false,
                lora: cfg.lora.clone(),
                ..base
            },
            Self::Head => TrainSetup {
                freeze_backbone: true,
                train_vision: false,
                train_text_embedding: false,
                ..base
            },
        }
    }
}

/// Bytes that stay allocated for the whole run: f32 weights, and for each trainable parameter its
/// gradient, the accumulated gradient and AdamW's two moments. Activations come on top (they
/// depend on batch × window × sequence and are not estimated here).
pub fn persistent_bytes(rules: &TrainableRules, sizes: &[(Group, usize)]) -> u64 {
    let (total, trainable) = sizes.iter().fold((0u64, 0u64), |(t, tr), &(g, n)| {
        let n = n as u64;
        (t + n, tr + if rules.trainable(g) { n } else { 0 })
    });
    4 * total + 16 * trainable
}

/// `MemAvailable` of /proc/meminfo, if readable.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The strategy to run and why. `Auto` takes the first of full → last-n → head whose
/// [`persistent_bytes`] is at most half of `budget` (the rest is left for activations).
pub fn resolve(
    requested: Strategy,
    cfg: &TrainSetup,
    text_layers: usize,
    sizes: &[(Group, usize)],
    budget: Option<u64>,
) -> (Strategy, TrainSetup, String) {
    if requested != Strategy::Auto {
        return (
            requested,
            requested.setup(cfg),
            format!("--strategy {requested:?}"),
        );
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let Some(budget) = budget else {
        return (
            Strategy::Full,
            Strategy::Full.setup(cfg),
            "auto: available memory unknown, taking full".into(),
        );
    };
    for s in LADDER {
        let setup = s.setup(cfg);
        let need = persistent_bytes(&TrainableRules::new(&setup, text_layers), sizes);
        if 2 * need <= budget {
            let why = format!(
                "auto: {s:?} needs ~{:.2} GiB of weights, gradients and AdamW state, within half of the {:.2} GiB available",
                gib(need),
                gib(budget)
            );
            return (s, setup, why);
        }
    }
    (
        Strategy::Head,
        Strategy::Head.setup(cfg),
        format!(
            "auto: nothing fits half of the {:.2} GiB available; trying head only (LoRA is not implemented yet)",
            gib(budget)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_steps_down_the_ladder() {
        let cfg = Strategy::Full.setup(&TrainSetup {
            freeze_backbone: false,
            train_decoder_layers: -1,
            train_vision: true,
            train_text_embedding: true,
            freeze_resampler: true,
            lora: None,
            gradient_checkpointing: false,
        });
        let sizes = [
            (Group::Vision, 1000),
            (Group::TextLayer(0), 1000),
            (Group::TextLayer(1), 1000),
            (Group::TextLayer(2), 1000),
            (Group::Head, 10),
        ];
        let pick = |budget| resolve(Strategy::Auto, &cfg, 3, &sizes, Some(budget)).0;
        // full: 4·4010 + 16·4010 = 80200; last-2: 16040 + 16·2010 = 48200; head: 16040 + 160.
        assert_eq!(pick(160_400), Strategy::Full);
        assert_eq!(pick(100_000), Strategy::LastN);
        assert_eq!(pick(40_000), Strategy::Head);
    }
}

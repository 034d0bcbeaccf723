//! `--strategy`: what to train, from the strongest (the seed's full fine-tuning, 6.1) down to the
//! cheapest (frozen backbone, head only); `auto` asks the memory planner ([`super::plan`]).

use crate::config::train::LoraSetup;
use crate::config::TrainSetup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The memory planner's choice: the strongest strategy whose estimated peak fits the memory
    /// available (`mobile_vla plan` prints the estimates).
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
                // The config's LoRA settings, else RoboVLMs' defaults (`lora_r` 64,
                // `lora_alpha` 16, `lora_dropout` 0.05, `lora_bias` none).
                lora: Some(cfg.lora.clone().unwrap_or(LoraSetup {
                    r: 64,
                    alpha: 16.0,
                    dropout: 0.05,
                    bias: "none".into(),
                })),
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

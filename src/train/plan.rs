//! The memory planner (`mobile_vla plan`, `train --strategy auto`): per strategy, the estimated
//! peak resident memory of a training run, and the strongest strategy that fits a budget.
//!
//! The estimate models what candle really does here:
//! - every op downstream of a `Var` keeps its inputs until `backward` returns, so a tower's
//!   activations are kept only when something in or before it trains. The action token is a `Var`
//!   at the text model's input, so every text layer keeps its activations in *every* strategy
//!   (last-N and head-only save gradient and optimiser memory, not activations); the vision tower
//!   and projection keep theirs only when they (or LoRA adapters in them) train;
//! - frozen weights get no gradient (`model::fused`'s training ops compute only tracked
//!   tensors' gradients), and the trainable ones are added in place into one buffer per tensor for
//!   the whole accumulation group, so gradients and AdamW's two moments are per *trainable*
//!   parameter, once;
//! - loading reads the whole weight file and converts it (file bytes + f32 copy at once), which
//!   can be the peak for small activations.
//!
//! Per-layer activation counts (tensors kept per token, by kind) come from the training ops in
//! `model::fused` (each keeps its output and what its backward needs: the attention op its
//! probabilities, fc1 + activation its pre-activation, dropout its output: masks are drawn again
//! in the backward, not kept);
//! `benches/train_memory.rs` checks the totals against measured peak RSS.
//! The per-part counts (layer shapes, the LSTM head, LoRA's parameters) are in `parts`;
//! how they add up for each strategy is one account, here.

mod memory;
mod parts;
mod report;

pub use memory::{
    available_memory, gib, parse_bytes, peak_resident_memory, peak_resident_memory_of,
    resident_memory,
};

use super::params::{Group, TrainableRules};
use super::strategy::Strategy;
use super::TrainError;
use crate::config::train::Precision;
use crate::config::{TrainConfig, TrainSetup};
use crate::model::error::ModelError;
use crate::model::kosmos2::Kosmos2Config;
use crate::model::model_dir;
use crate::model::{LstmSpec, PolicyConfig};
use candle_core::safetensors::MmapedSafetensors;
use parts::{lora_params, lstm_kept, text_layer, vision_layer};
use std::path::Path;

const F32: u64 = 4;
const MIB: u64 = 1 << 20;
/// Resident memory of the process besides the model: binary and libraries, thread stacks,
/// tokenizer, data reader (measured: the tiny run's resident memory once the trainer is built, less
/// its weights, 27 MiB).
const BASE_BYTES: u64 = 28 * MIB;
/// Prompt tokens the estimate assumes (`<s>` + a short instruction + `</s>`; the data decide the
/// real length, which is only known once the episodes are read).
pub const PROMPT_TOKENS: usize = 16;

/// One rung of the ladder, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rung {
    /// SEED 6.1.
    Full,
    /// SEED 6.1 with `gradient_checkpointing`: only each layer's input is kept.
    FullCheckpointing,
    /// The last `train_decoder_layers` text layers + head.
    LastN,
    /// SEED 6.2: LoRA on a frozen backbone.
    Lora,
    /// Frozen backbone: action token + head.
    Head,
}

pub const LADDER: [Rung; 5] = [
    Rung::Full,
    Rung::FullCheckpointing,
    Rung::LastN,
    Rung::Lora,
    Rung::Head,
];

impl Rung {
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full (6.1)",
            Self::FullCheckpointing => "full + checkpointing",
            Self::LastN => "last-n",
            Self::Lora => "lora (6.2)",
            Self::Head => "head",
        }
    }

    /// The rung's short name (`--strategy` value, with `full-checkpointing` for full +
    /// `gradient_checkpointing`).
    pub fn strategy_name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::FullCheckpointing => "full-checkpointing",
            Self::LastN => "last-n",
            Self::Lora => "lora",
            Self::Head => "head",
        }
    }

    /// The `--strategy` this rung runs as.
    pub fn strategy(self) -> Strategy {
        match self {
            Self::Full | Self::FullCheckpointing => Strategy::Full,
            Self::LastN => Strategy::LastN,
            Self::Lora => Strategy::Lora,
            Self::Head => Strategy::Head,
        }
    }

    /// The `train_setup` this rung trains with.
    pub fn setup(self, cfg: &TrainSetup) -> TrainSetup {
        let mut s = self.strategy().setup(cfg);
        s.gradient_checkpointing = self == Self::FullCheckpointing;
        s
    }
}

/// What the run feeds through the model per optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    pub batch: usize,
    pub window: usize,
    pub prompt_tokens: usize,
    pub accumulate: usize,
}

/// The model's parameters by group, its LSTM head and the bytes of its weight files (what
/// loading reads).
#[derive(Debug, Clone)]
pub struct ModelSizes {
    pub groups: Vec<(Group, usize)>,
    pub head: LstmSpec,
    pub file_bytes: u64,
}

impl ModelSizes {
    /// Reads tensor shapes from the weight files' headers (memory-mapped, nothing loaded) of a
    /// model directory or a Hugging Face Kosmos-2 folder. The latter has no action token or head
    /// yet: those of `mobile_vla model init`'s defaults are counted.
    pub fn read(dir: &Path) -> Result<(Kosmos2Config, Option<PolicyConfig>, Self), TrainError> {
        let backbone =
            Kosmos2Config::from_file(dir.join(model_dir::CONFIG_FILE)).map_err(ModelError::from)?;
        let files = crate::model::kosmos2::weight_files(dir).map_err(ModelError::from)?;
        if files.is_empty() {
            return Err(ModelError::config(dir, "no model.safetensors (or sharded index)").into());
        }
        let err = |cause| ModelError::Tensors {
            path: files[0].clone(),
            cause,
        };
        // SAFETY: read-only mapping; only the headers are read.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(err)?;
        let mut groups: Vec<(Group, usize)> = st
            .tensors()
            .iter()
            .filter_map(|(n, v)| Group::of(n).map(|g| (g, v.shape().iter().product())))
            .collect();
        let policy_file = dir.join(model_dir::POLICY_FILE);
        let (policy, head) = if policy_file.is_file() {
            let p = PolicyConfig::from_file(&policy_file)?;
            let head = p.head;
            (Some(p), head)
        } else {
            let fresh = PolicyConfig::native(16, 2, 1.0, 0.4);
            let head = super::init::fresh_policy_tensors(&fresh, backbone.text_config.embed_dim, 0)
                .map_err(err)?;
            groups.extend(
                head.iter()
                    .filter_map(|(n, t)| Group::of(n).map(|g| (g, t.elem_count()))),
            );
            (None, fresh.head)
        };
        let file_bytes = files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        Ok((
            backbone,
            policy,
            Self {
                groups,
                head,
                file_bytes,
            },
        ))
    }
}

/// One strategy's estimated peak and its parts, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub rung: Rung,
    pub trainable: u64,
    pub weights: u64,
    /// Gradients: one buffer per trainable tensor, which every batch of an accumulation group adds
    /// into in place (the word embeddings': only the rows the prompts use become resident).
    pub gradients: u64,
    /// AdamW's two moments.
    pub optimiser: u64,
    /// Tensors kept for backward: batch × window frames × sequence.
    pub activations: u64,
    /// The process base, plus backward's transient gradients: about one layer's activations.
    pub workspace: u64,
    /// AdamW's per-tensor temporaries during the step (after backward, activations freed): AdamW
    /// updates in place and applies clipping's factor as it reads, so at most one copy of the
    /// largest trainable tensor (a transposed gradient made contiguous).
    pub step: u64,
    /// While loading: the weight file read whole + its f32 tensors.
    pub load: u64,
}

impl Estimate {
    pub fn training(&self) -> u64 {
        let backward = self.activations + self.workspace;
        let step = BASE_BYTES + self.step;
        self.weights + self.gradients + self.optimiser + backward.max(step)
    }

    /// While loading: the process base, the weight file read whole and its f32 tensors.
    pub fn loading(&self) -> u64 {
        self.load + BASE_BYTES
    }

    pub fn peak(&self) -> u64 {
        self.training().max(self.loading())
    }
}

/// The estimate of `rung` for this model, config and workload.
pub fn estimate(
    rung: Rung,
    cfg: &TrainConfig,
    backbone: &Kosmos2Config,
    sizes: &ModelSizes,
    work: Workload,
) -> Estimate {
    let setup = rung.setup(&cfg.train_setup);
    let rules = TrainableRules::new(&setup, backbone.text_config.layers);
    let total: u64 = sizes.groups.iter().map(|&(_, n)| n as u64).sum();
    let trained = || {
        sizes
            .groups
            .iter()
            .filter(|&&(g, _)| rules.trainable(g))
            .map(|&(_, n)| n as u64)
    };
    let mut trainable: u64 = trained().sum();
    // The word embeddings' gradient is only the prompt's rows: the rest of its buffer is zero
    // pages the allocator never made resident.
    let embeddings: u64 = sizes
        .groups
        .iter()
        .filter(|&&(g, _)| g == Group::TextEmbedding && rules.trainable(g))
        .map(|&(_, n)| n as u64)
        .sum();
    let largest_trainable = trained().max().unwrap_or(0);
    let lora = setup.lora.as_ref();
    if let Some(l) = lora {
        trainable += lora_params(backbone, l.r);
        if l.bias != "none" {
            // `lora_bias` all / lora_only: the linears' biases, about half their in + out
            // (`all` adds the layer norms' shifts, a few percent more).
            trainable += lora_params(backbone, 1) / 2;
        }
    }
    let frames = (work.batch * work.window) as u64;
    let q = backbone.latent_query_num;
    let text = text_layer(backbone, q + work.prompt_tokens);
    let vision = vision_layer(backbone);
    let layers = backbone.text_config.layers as u64;
    let vision_tracked = rules.trainable(Group::Vision) || lora.is_some();
    let projection_tracked = vision_tracked || rules.trainable(Group::Projection);

    // Per frame, in floats.
    let (text_kept, text_transient) = if setup.gradient_checkpointing {
        // Each layer's input, plus one layer recomputed during backward and its backward's
        // transient gradients.
        (layers * text.seq * text.dim + text.floats(), text.floats())
    } else {
        // The last layer only updates `[ACT]`'s row: its keys/values and first norm remain.
        let last = 3 * text.seq * text.dim;
        (
            layers.saturating_sub(1) * text.floats() + last,
            text.floats(),
        )
    };
    // Embeddings (patch product, class token, positions), pre- and post-layer norms.
    let vision_ends = 5 * vision.seq * vision.dim;
    let vision_kept = match (vision_tracked, setup.gradient_checkpointing) {
        (false, _) => 0,
        (true, false) => {
            backbone.vision_config.num_hidden_layers as u64 * vision.floats() + vision_ends
        }
        (true, true) => {
            backbone.vision_config.num_hidden_layers as u64 * vision.seq * vision.dim
                + vision.floats()
                + vision_ends
        }
    };
    // Projection: dense over the patches, their concatenation with the latent queries (keys),
    // k and v; the queries' q, attention output and out_proj; the probabilities.
    let keys = vision.seq + q as u64;
    let projection_kept = if projection_tracked {
        4 * keys * text.dim + 4 * q as u64 * text.dim + text.heads * q as u64 * keys
    } else {
        0
    };
    // Per adapted layer and token: each adapter op keeps x·Aᵀ (r) and its output (out); the
    // frozen base linear's output (out) is kept beside the sum (counted with the layer). Dropout
    // masks are drawn again in the backward. Frozen layer norms and linears compute no gradient for
    // their weights. Adapters: q, k, v, out (d → d), fc1 (d → f), fc2 (f → d).
    let lora_kept = match lora {
        Some(l) => {
            let r = l.r as u64;
            let per_layer = |seq: u64, d: u64, f: u64| seq * (6 * r + 10 * d + 2 * f);
            let (vl, vs, vd, vf) = (
                backbone.vision_config.num_hidden_layers as u64,
                vision.seq,
                vision.dim,
                vision.ffn,
            );
            let (ts, td, tf) = (text.seq, text.dim, text.ffn);
            layers * per_layer(ts, td, tf) + vl * per_layer(vs, vd, vf)
        }
        None => 0,
    };
    // Pixels of the batch and the text inputs (embeddings, positions, two dropouts).
    let image = backbone.vision_config.image_size as u64;
    let inputs = 3 * image * image + 4 * text.seq * text.dim;
    let kept = text_kept + vision_kept + projection_kept + lora_kept + inputs;
    let transient = text_transient.max(if vision_tracked { vision.floats() } else { 0 });
    let head = lstm_kept(&sizes.head, frames as usize);

    Estimate {
        rung,
        trainable,
        weights: F32 * total,
        gradients: F32 * (trainable - embeddings),
        optimiser: 2 * F32 * trainable,
        activations: F32 * (frames * kept + head),
        workspace: BASE_BYTES + F32 * frames * transient,
        step: F32 * largest_trainable,
        load: sizes.file_bytes + F32 * total,
    }
}

/// Every rung's estimate and the choice.
#[derive(Debug, Clone)]
pub struct Plan {
    pub estimates: Vec<Estimate>,
    pub budget: u64,
    pub work: Workload,
    /// Index into `estimates` of the strongest rung that fits and runs, if any.
    pub choice: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("no training strategy fits the memory budget of {budget}: the cheapest that runs ({cheapest}) needs about {need}; free memory, lower batch_size or window_size, or pass a larger --budget")]
pub struct NothingFits {
    pub budget: String,
    pub cheapest: &'static str,
    pub need: String,
}

/// Estimates every rung and picks the strongest that fits `budget`.
pub fn plan(
    cfg: &TrainConfig,
    backbone: &Kosmos2Config,
    sizes: &ModelSizes,
    work: Workload,
    budget: u64,
) -> Plan {
    let estimates: Vec<Estimate> = LADDER
        .iter()
        .map(|&r| estimate(r, cfg, backbone, sizes, work))
        .collect();
    let choice = estimates.iter().position(|e| e.peak() <= budget);
    Plan {
        estimates,
        budget,
        work,
        choice,
    }
}

impl Plan {
    /// The chosen estimate, or the error naming the cheapest rung's need.
    pub fn chosen(&self) -> Result<&Estimate, NothingFits> {
        if let Some(i) = self.choice {
            return Ok(&self.estimates[i]);
        }
        let cheapest = self.estimates.iter().min_by_key(|e| e.peak());
        Err(NothingFits {
            budget: gib(self.budget),
            cheapest: cheapest.map_or("none", |e| e.rung.name()),
            need: gib(cheapest.map_or(0, Estimate::peak)),
        })
    }
}

/// What a requested precision really runs as on this CPU build, when that differs.
pub fn precision_note(requested: Precision) -> Option<String> {
    (requested != Precision::F32).then(|| {
        format!(
            "precision `{}` requested: this CPU build trains in f32 (`32`): candle's CPU matmul has \
             no bf16 kernel and its f16 one is slower than f32; metrics.jsonl records what ran",
            requested.name()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (TrainConfig, Kosmos2Config, ModelSizes) {
        let cfg = TrainConfig::from_value(&serde_json::json!({
            "batch_size": 2, "window_size": 4, "learning_rate": 1e-4, "min_lr_scale": 0.1,
            "weight_decay": 0.0, "trainer": {"max_epochs": 1},
            "train_setup": {"freeze_backbone": false, "lora_enable": false}
        }))
        .unwrap();
        let mut k = Kosmos2Config::default();
        k.text_config.layers = 4;
        // One entry per tensor, as read from a weight file: the largest is the word embeddings.
        let mut groups = vec![(Group::Vision, 12_500_000); 24];
        groups.extend([
            (Group::Projection, 10_000_000),
            (Group::TextEmbedding, 130_000_000),
            (Group::FinalNorm, 4096),
            (Group::ActionToken, 2048),
            (Group::Head, 5_000_000),
        ]);
        groups.extend((0..16).map(|i| (Group::TextLayer(i / 4), 12_500_000)));
        let sizes = ModelSizes {
            groups,
            head: LstmSpec::default(),
            file_bytes: 0,
        };
        (cfg, k, sizes)
    }

    fn work(batch: usize, window: usize) -> Workload {
        Workload {
            batch,
            window,
            prompt_tokens: PROMPT_TOKENS,
            accumulate: 1,
        }
    }

    #[test]
    fn ladder_gets_cheaper_and_choice_is_strongest_fit() {
        let (cfg, k, sizes) = setup();
        let p = plan(&cfg, &k, &sizes, work(1, 2), u64::MAX);
        let peaks: Vec<u64> = p.estimates.iter().map(Estimate::peak).collect();
        // Full → last-n → head strictly cheaper; checkpointing is cheaper than full.
        assert!(peaks[1] < peaks[0] && peaks[2] < peaks[0] && peaks[4] < peaks[2]);
        assert_eq!(p.chosen().unwrap().rung, Rung::Full);
        let between = |a: u64, b: u64| plan(&cfg, &k, &sizes, work(1, 2), (a + b) / 2);
        assert_eq!(
            between(peaks[0], peaks[1]).chosen().unwrap().rung,
            Rung::FullCheckpointing
        );
        assert!(peaks[2] < peaks[1], "{peaks:?}");
        assert_eq!(
            between(peaks[1], peaks[2]).chosen().unwrap().rung,
            Rung::LastN
        );
        assert_eq!(
            between(peaks[2], peaks[4]).chosen().unwrap().rung,
            Rung::Head
        );
        // LoRA keeps the vision tower's activations (its adapters train there), so at Kosmos-2's
        // shape it needs more than last-N, which comes first on the ladder: a budget that fits
        // LoRA fits last-N too.
        assert!(peaks[2] < peaks[3] && peaks[3] < peaks[0], "{peaks:?}");
        let p = plan(&cfg, &k, &sizes, work(1, 2), peaks[3]);
        assert_eq!(p.chosen().unwrap().rung, Rung::LastN);
        let none = plan(&cfg, &k, &sizes, work(1, 2), peaks[4] - 1);
        let err = none.chosen().unwrap_err().to_string();
        assert!(err.contains("head") && err.contains("budget"), "{err}");
    }

    #[test]
    fn activations_grow_with_batch_and_window() {
        let (cfg, k, sizes) = setup();
        for rung in LADDER {
            let a = |b, w| estimate(rung, &cfg, &k, &sizes, work(b, w)).activations;
            assert!(a(2, 2) > a(1, 2) && a(1, 4) > a(1, 2), "{rung:?}");
            assert_eq!(a(2, 2), a(1, 4), "{rung:?}: frames = batch × window");
        }
        // Head-only still keeps the text activations (the action token is a Var at its input);
        // full also keeps the vision tower's.
        let full = estimate(Rung::Full, &cfg, &k, &sizes, work(1, 2)).activations;
        let head = estimate(Rung::Head, &cfg, &k, &sizes, work(1, 2)).activations;
        assert!(head > 0 && full > 2 * head);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert!(parse_bytes("lots").is_err() && parse_bytes("8 parsecs").is_err());
    }
}

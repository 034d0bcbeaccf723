//! Which parameters train, exactly as RoboVLMs' `_trainable_params_setup`
//! (`robovlms/model/backbone/base_backbone.py`) sets `requires_grad`, in its order:
//!
//! 1. `freeze_backbone` → the whole VLM frozen; else `train_decoder_layers == -1` → the whole VLM
//!    trainable; else the VLM frozen except the text layers `layers[-n:]` (Python slice semantics:
//!    `0` selects every layer). With `freeze_backbone: true` the `n` is never looked at (the seed's 6.2
//!    quirk).
//! 2. The vision tower follows `train_vision`, whatever step 1 said.
//! 3. LoRA (peft's `get_peft_model`, [`super::lora`]) freezes every non-adapter VLM weight, then
//!    `lora_bias` unfreezes biases: `all` every bias of the VLM (layer norms' too), `lora_only`
//!    those of the adapted linear layers.
//! 4. The word embeddings follow `train_text_embedding` (after LoRA, so they may train beside it).
//! 5. A separate vision resampler (never present for Kosmos-2) follows `freeze_resampler`.
//! 6. The action token and the policy head always train.
//!
//! Kosmos-2's `lm_head` is tied to the word embeddings and unused by the policy, so it is neither
//! loaded nor counted (PyTorch counts a tied parameter once).
//!
//! Trainable tensors become candle `Var`s; frozen ones stay plain tensors, so autograd never tracks
//! them (and `model::kosmos2`'s linear layers skip their weight gradients).

use super::lora;
use crate::config::TrainSetup;
use crate::model::error::ModelError;
use crate::model::kosmos2::Kosmos2Config;
use crate::model::model_dir;
use crate::model::tokenizer::PromptTokenizer;
use crate::model::{Policy, PolicyConfig};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A group of parameters in the printed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Vision,
    Projection,
    TextEmbedding,
    TextLayer(usize),
    FinalNorm,
    ActionToken,
    Head,
    /// LoRA adapters (`*.lora_A.weight`, `*.lora_B.weight`), wherever their layer sits.
    Lora,
}

impl Group {
    /// The group of a model-directory tensor name (HF backbone names, `action_token`, `act_head.*`).
    pub fn of(name: &str) -> Option<Self> {
        const LAYERS: &str = "text_model.model.layers.";
        Some(
            if name.ends_with(lora::A_SUFFIX) || name.ends_with(lora::B_SUFFIX) {
                Self::Lora
            } else if name.starts_with("vision_model.") {
                Self::Vision
            } else if name.starts_with("image_to_text_projection.") {
                Self::Projection
            } else if name.starts_with("text_model.model.embed_tokens.") {
                Self::TextEmbedding
            } else if let Some(rest) = name.strip_prefix(LAYERS) {
                Self::TextLayer(rest.split('.').next()?.parse().ok()?)
            } else if name.starts_with("text_model.model.layer_norm.") {
                Self::FinalNorm
            } else if name == "action_token" {
                Self::ActionToken
            } else if name.starts_with("act_head.") {
                Self::Head
            } else {
                return None;
            },
        )
    }

    fn label(self) -> String {
        match self {
            Self::Vision => "vision tower".into(),
            Self::Projection => "projection (image_to_text)".into(),
            Self::TextEmbedding => "text embeddings".into(),
            Self::TextLayer(i) => format!("text layer {i}"),
            Self::FinalNorm => "final norm".into(),
            Self::ActionToken => "action token".into(),
            Self::Head => "policy head (LSTM + MLPs)".into(),
            Self::Lora => "LoRA adapters".into(),
        }
    }
}

/// The resolved `requires_grad` rule for one model.
#[derive(Debug, Clone)]
pub struct TrainableRules {
    setup: TrainSetup,
    text_layers: usize,
}

impl TrainableRules {
    pub fn new(setup: &TrainSetup, text_layers: usize) -> Self {
        Self {
            setup: setup.clone(),
            text_layers,
        }
    }

    /// First text layer of Python's `layers[-n:]`.
    fn first_trained_layer(&self) -> usize {
        let (len, start) = (self.text_layers as i64, -self.setup.train_decoder_layers);
        let first = if start < 0 {
            (len + start).max(0)
        } else {
            start.min(len)
        };
        first as usize
    }

    pub fn trainable(&self, group: Group) -> bool {
        let s = &self.setup;
        let lora = s.lora.is_some();
        match group {
            Group::ActionToken | Group::Head | Group::Lora => true,
            Group::TextEmbedding => s.train_text_embedding,
            Group::Vision => s.train_vision && !lora,
            Group::TextLayer(i) => {
                !lora
                    && !s.freeze_backbone
                    && (s.train_decoder_layers == -1 || i >= self.first_trained_layer())
            }
            Group::Projection | Group::FinalNorm => {
                !lora && !s.freeze_backbone && s.train_decoder_layers == -1
            }
        }
    }
}

impl TrainableRules {
    /// Whether backbone tensor `name` of `group` trains; `in_linear`: it belongs to a linear layer
    /// (its module's weight is a matrix), which LoRA adapts.
    pub fn trainable_tensor(&self, name: &str, group: Group, in_linear: bool) -> bool {
        if self.trainable(group) {
            return true;
        }
        let Some(lora) = &self.setup.lora else {
            return false;
        };
        let backbone = !matches!(group, Group::ActionToken | Group::Head | Group::Lora);
        backbone
            && name.ends_with(".bias")
            && match lora.bias.as_str() {
                "all" => true,
                "lora_only" => in_linear,
                _ => false,
            }
    }
}

/// One model parameter: trainable ones are `Var`s the optimiser updates in place.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub group: Group,
    pub var: Option<Var>,
    pub tensor: Tensor,
}

/// Every tensor handed to the model, in the order it asked for them.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    pub params: Vec<Param>,
}

impl ParamSet {
    pub fn trainable(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params
            .iter()
            .filter_map(|p| p.var.as_ref().map(|v| (p.name.as_str(), v)))
    }

    pub fn num_trainable(&self) -> usize {
        self.trainable().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn num_total(&self) -> usize {
        self.params.iter().map(|p| p.tensor.elem_count()).sum()
    }

    /// Current values of every tensor, by model-directory name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| {
                let t = p.var.as_ref().map_or(&p.tensor, |v| v.as_tensor());
                (p.name.clone(), t.clone())
            })
            .collect()
    }

    /// The table printed at start: group → trainable? (yes, no, or "biases" where only biases
    /// train) → params. Runs of consecutive text layers with the same status are merged into
    /// "text layers a–b"; the LoRA adapters come last.
    pub fn table(&self) -> String {
        // group → (trainable elements, elements)
        let mut sums: std::collections::BTreeMap<Group, (usize, usize)> = Default::default();
        for p in &self.params {
            let e = sums.entry(p.group).or_default();
            e.0 += p.var.as_ref().map_or(0, |v| v.elem_count());
            e.1 += p.tensor.elem_count();
        }
        let lora = sums.remove(&Group::Lora).unwrap_or_default();
        let status = |(on, n): (usize, usize)| match on {
            0 => "no",
            _ if on == n => "yes",
            _ => "biases",
        };
        let mut rows: Vec<(Group, Group, &str, usize)> = Vec::new();
        for (g, counts) in sums {
            let on = status(counts);
            match rows.last_mut() {
                Some((Group::TextLayer(_), last @ Group::TextLayer(_), was, total))
                    if matches!(g, Group::TextLayer(_)) && *was == on =>
                {
                    *last = g;
                    *total += counts.1;
                }
                _ => rows.push((g, g, on, counts.1)),
            }
        }
        let mut out = format!("{:<32} {:>10} {:>14}\n", "group", "trainable", "params");
        for (first, last, on, n) in rows {
            let label = match (first, last) {
                (Group::TextLayer(a), Group::TextLayer(b)) if a != b => {
                    format!("text layers {a}–{b}")
                }
                _ => first.label(),
            };
            let _ = writeln!(out, "{label:<32} {on:>10} {n:>14}");
        }
        let _ = writeln!(
            out,
            "{:<32} {:>10} {:>14}",
            "lm_head", "tied", "(embeddings)"
        );
        let _ = writeln!(
            out,
            "{:<32} {:>10} {:>14}",
            Group::Lora.label(),
            status(lora),
            lora.1
        );
        let _ = write!(
            out,
            "{:<32} {:>10} {:>14}\n{:<32} {:>10} {:>14}",
            "total trainable",
            "",
            self.num_trainable(),
            "total",
            "",
            self.num_total()
        );
        out
    }
}

/// A `VarBuilder` backend over in-memory tensors that wraps the trainable ones in `Var`s and
/// records what it hands out.
pub struct TrainBackend {
    tensors: HashMap<String, Tensor>,
    rules: TrainableRules,
    handed: Arc<Mutex<ParamSet>>,
}

impl TrainBackend {
    pub fn new(
        tensors: HashMap<String, Tensor>,
        rules: TrainableRules,
    ) -> (Self, Arc<Mutex<ParamSet>>) {
        let handed = Arc::new(Mutex::new(ParamSet::default()));
        (
            Self {
                tensors,
                rules,
                handed: handed.clone(),
            },
            handed,
        )
    }

    fn hand_out(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_owned(),
            })?
            .to_device(dev)?
            .to_dtype(dtype)?;
        let group = Group::of(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` belongs to no known parameter group"
            ))
        })?;
        let mut set = self
            .handed
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter registry poisoned".into()))?;
        if let Some(p) = set.params.iter().find(|p| p.name == name) {
            // Asked twice (shared weights): hand out the same parameter.
            return Ok(p.var.as_ref().map_or(&p.tensor, |v| v.as_tensor()).clone());
        }
        let in_linear = name.strip_suffix(".bias").is_some_and(|m| {
            self.tensors
                .get(&format!("{m}.weight"))
                .is_some_and(|w| w.rank() == 2)
        });
        let (var, tensor) = if self.rules.trainable_tensor(name, group, in_linear) {
            let v = Var::from_tensor(&t)?;
            let t = v.as_tensor().clone();
            (Some(v), t)
        } else {
            (None, t)
        };
        set.params.push(Param {
            name: name.to_owned(),
            group,
            var,
            tensor: tensor.clone(),
        });
        Ok(tensor)
    }
}

impl SimpleBackend for TrainBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.hand_out(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor `{name}` has shape {:?} but the model needs {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.hand_out(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A model's files in memory, ready to be built with some parameters trainable.
pub struct ModelFiles {
    pub backbone: Kosmos2Config,
    pub tokenizer: PromptTokenizer,
    /// f32 tensors by model-directory name.
    pub tensors: HashMap<String, Tensor>,
    /// Where the tensors came from, for errors.
    pub source: PathBuf,
}

impl ModelFiles {
    /// Reads a model directory's `config.json`, `tokenizer.json` and `model.safetensors` (as f32).
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let backbone = Kosmos2Config::from_file(dir.join(model_dir::CONFIG_FILE))?;
        let tokenizer = PromptTokenizer::from_file(&dir.join(model_dir::TOKENIZER_FILE))?;
        let source = dir.join(model_dir::WEIGHTS_FILE);
        let err = |cause| ModelError::Tensors {
            path: source.clone(),
            cause,
        };
        let tensors = candle_core::safetensors::load(&source, &Device::Cpu)
            .map_err(err)?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()
            .map_err(err)?;
        Ok(Self {
            backbone,
            tokenizer,
            tensors,
            source,
        })
    }

    /// Parameter count per group (for strategy estimates).
    pub fn group_sizes(&self) -> Vec<(Group, usize)> {
        self.tensors
            .iter()
            .filter_map(|(n, t)| Group::of(n).map(|g| (g, t.elem_count())))
            .collect()
    }

    /// Builds the policy with `setup`'s parameters trainable, and LoRA adapters when it has them
    /// (A drawn from `seed`). With `strict`, tensors the model does not use are an error (as
    /// `Policy::load`); otherwise they are dropped.
    pub fn build(
        self,
        cfg: PolicyConfig,
        setup: &TrainSetup,
        strict: bool,
        seed: u64,
    ) -> Result<(Policy, ParamSet), ModelError> {
        let rules = TrainableRules::new(setup, self.backbone.text_config.layers);
        let names: BTreeSet<String> = self.tensors.keys().cloned().collect();
        let (backend, handed) = TrainBackend::new(self.tensors, rules);
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        let source = self.source;
        let err = |cause| ModelError::Tensors {
            path: source.clone(),
            cause,
        };
        let mut policy = Policy::new(cfg, &self.backbone, self.tokenizer, vb).map_err(err)?;
        let mut params = handed.lock().map(|p| p.clone()).unwrap_or_default();
        if let Some(l) = &setup.lora {
            let adapters = lora::attach(&mut policy, l, seed).map_err(err)?;
            params.params.extend(adapters);
        }
        let used: BTreeSet<String> = params.params.iter().map(|p| p.name.clone()).collect();
        let unused: Vec<String> = names.difference(&used).cloned().collect();
        if strict && !unused.is_empty() {
            return Err(ModelError::UnusedTensors {
                path: source,
                names: unused,
            });
        }
        Ok((policy, params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::train::LoraSetup;

    fn setup(freeze: bool, layers: i64, vision: bool, embed: bool, lora: bool) -> TrainSetup {
        TrainSetup {
            lora: lora.then(|| LoraSetup {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                bias: "none".into(),
            }),
            ..TrainSetup::layers(freeze, layers, vision, embed)
        }
    }

    fn on(s: &TrainSetup, g: Group) -> bool {
        TrainableRules::new(s, 4).trainable(g)
    }

    #[test]
    fn frozen_backbone_ignores_train_decoder_layers() {
        let s = setup(true, 2, false, false, false);
        assert!((0..4).all(|i| !on(&s, Group::TextLayer(i))));
        assert!(on(&s, Group::Head) && on(&s, Group::ActionToken));
    }

    #[test]
    fn last_n_follows_python_slices() {
        let layers = |n| {
            let s = setup(false, n, false, false, false);
            (0..4)
                .filter(|&i| on(&s, Group::TextLayer(i)))
                .collect::<Vec<_>>()
        };
        assert_eq!(layers(2), [2, 3]);
        assert_eq!(layers(9), [0, 1, 2, 3]);
        assert_eq!(layers(0), [0, 1, 2, 3], "layers[-0:] is every layer");
        assert_eq!(layers(-2), [2, 3], "layers[2:]");
        assert!(!on(&setup(false, 2, false, false, false), Group::FinalNorm));
        assert!(on(
            &setup(false, -1, false, false, false),
            Group::Projection
        ));
    }

    #[test]
    fn vision_overrides_and_lora_freezes_all_but_embeddings() {
        assert!(on(&setup(true, -1, true, false, false), Group::Vision));
        assert!(!on(&setup(false, -1, false, false, false), Group::Vision));
        let s = setup(false, -1, true, true, true);
        assert!(!on(&s, Group::Vision) && !on(&s, Group::TextLayer(3)));
        assert!(on(&s, Group::TextEmbedding) && on(&s, Group::Head));
    }
}

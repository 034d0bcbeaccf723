//! Kosmos-2 configuration, read from the `config.json` of a Hugging Face
//! `Kosmos2ForConditionalGeneration` checkpoint.
//!
//! Field names and defaults follow transformers'
//! `models/kosmos2/configuration_kosmos2.py`, so a hub config parses unchanged
//! and a key absent from the file means what it means in transformers.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Result, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::Kosmos2Error;

/// Activation functions named in HF configs (`hidden_act`, `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU, transformers' `"gelu"`.
    Gelu,
    /// `x * sigmoid(1.702 x)`, CLIP's activation.
    QuickGelu,
    /// Tanh-approximated GELU.
    GeluNew,
    /// Tanh-approximated GELU (same function as `gelu_new`).
    GeluPytorchTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::QuickGelu => xs.mul(&candle_nn::ops::sigmoid(&(xs * 1.702)?)?),
            Self::GeluNew | Self::GeluPytorchTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// `Kosmos2TextConfig`: the Magneto-style decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Kosmos2TextConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(alias = "hidden_size")]
    pub embed_dim: usize,
    #[serde(alias = "num_hidden_layers")]
    pub layers: usize,
    pub ffn_dim: usize,
    #[serde(alias = "num_attention_heads")]
    pub attention_heads: usize,
    pub activation_function: Activation,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation_dropout: f64,
    pub layerdrop: f64,
    pub layer_norm_eps: f64,
    pub init_std: f64,
    pub scale_embedding: bool,
    pub use_cache: bool,
    pub pad_token_id: usize,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    /// Keys this crate does not read; see [`Kosmos2Config::unknown_fields`].
    #[serde(flatten, skip_serializing)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for Kosmos2TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 65037,
            max_position_embeddings: 2048,
            embed_dim: 2048,
            layers: 24,
            ffn_dim: 8192,
            attention_heads: 32,
            activation_function: Activation::Gelu,
            dropout: 0.1,
            attention_dropout: 0.1,
            activation_dropout: 0.0,
            layerdrop: 0.0,
            layer_norm_eps: 1e-5,
            init_std: 0.02,
            scale_embedding: true,
            use_cache: true,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
            extra: BTreeMap::new(),
        }
    }
}

impl Kosmos2TextConfig {
    /// `sqrt(embed_dim)` when `scale_embedding`, else 1 (transformers' `embed_scale`).
    pub fn embed_scale(&self) -> f64 {
        if self.scale_embedding {
            (self.embed_dim as f64).sqrt()
        } else {
            1.0
        }
    }
}

/// `Kosmos2VisionConfig`: the CLIP ViT image tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Kosmos2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub initializer_range: f64,
    pub initializer_factor: f64,
    /// Keys this crate does not read; see [`Kosmos2Config::unknown_fields`].
    #[serde(flatten, skip_serializing)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for Kosmos2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            extra: BTreeMap::new(),
        }
    }
}

impl Kosmos2VisionConfig {
    /// Patch tokens per image: `(image_size / patch_size)^2` (floor, as the strided conv).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Tokens out of the vision tower: one class token plus the patches (257 for ViT-L/14 at 224).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }
}

/// `Kosmos2Config`: the whole `Kosmos2ForConditionalGeneration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Kosmos2Config {
    pub text_config: Kosmos2TextConfig,
    pub vision_config: Kosmos2VisionConfig,
    pub latent_query_num: usize,
    pub model_type: Option<String>,
    /// Keys this crate does not read; see [`Kosmos2Config::unknown_fields`].
    #[serde(flatten, skip_serializing)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for Kosmos2Config {
    fn default() -> Self {
        Self {
            text_config: Kosmos2TextConfig::default(),
            vision_config: Kosmos2VisionConfig::default(),
            latent_query_num: 64,
            model_type: Some(MODEL_TYPE.to_string()),
            extra: BTreeMap::new(),
        }
    }
}

const MODEL_TYPE: &str = "kosmos-2";

/// Keys every transformers `PretrainedConfig` serialises (generation defaults,
/// bookkeeping). They carry nothing for this forward pass, so they are
/// skipped silently; anything else unknown is reported.
const PRETRAINED_CONFIG_KEYS: &[&str] = &[
    "_attn_implementation_autoset",
    "_commit_hash",
    "_name_or_path",
    "add_cross_attention",
    "architectures",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dtype",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "eos_token_id",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
];

impl Kosmos2Config {
    /// Reads, parses and validates `config.json`; unknown keys are logged by name.
    pub fn from_file(path: impl AsRef<Path>) -> std::result::Result<Self, Kosmos2Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|cause| Kosmos2Error::ReadConfig {
            path: path.to_path_buf(),
            cause,
        })?;
        let cfg = Self::from_json_str(&text).map_err(|e| match e {
            ParseError::Json(cause) => Kosmos2Error::ConfigJson {
                path: path.to_path_buf(),
                cause,
            },
            ParseError::Field { field, message } => Kosmos2Error::ConfigField {
                path: path.to_path_buf(),
                field,
                message,
            },
        })?;
        for field in cfg.unknown_fields() {
            tracing::warn!(file = %path.display(), field = %field, "unknown Kosmos-2 config field ignored");
        }
        cfg.validate().map_err(|e| match e {
            Kosmos2Error::InvalidConfig { field, reason } => Kosmos2Error::ConfigField {
                path: path.to_path_buf(),
                field,
                message: reason,
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parses JSON text (no validation, no logging); errors name the offending field.
    fn from_json_str(text: &str) -> std::result::Result<Self, ParseError> {
        let root: Value = serde_json::from_str(text).map_err(ParseError::Json)?;
        let Value::Object(map) = &root else {
            return Err(ParseError::Field {
                field: "<root>".into(),
                message: "expected a JSON object".into(),
            });
        };
        for section in ["text_config", "vision_config"] {
            match map.get(section) {
                Some(Value::Object(sub)) => {
                    if section == "text_config" {
                        locate_bad_field::<Kosmos2TextConfig>(sub, section)?;
                    } else {
                        locate_bad_field::<Kosmos2VisionConfig>(sub, section)?;
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => {
                    return Err(ParseError::Field {
                        field: section.into(),
                        message: "expected an object".into(),
                    })
                }
            }
        }
        let mut top = map.clone();
        // transformers treats a null sub-config as "all defaults".
        for section in ["text_config", "vision_config"] {
            if matches!(top.get(section), Some(Value::Null)) {
                top.remove(section);
            }
        }
        locate_bad_field::<Self>(&top, "")?;
        serde_json::from_value(Value::Object(top)).map_err(|e| ParseError::Field {
            field: "<root>".into(),
            message: e.to_string(),
        })
    }

    /// Keys present in the file that this crate does not read (dotted paths),
    /// excluding transformers' generic `PretrainedConfig` bookkeeping keys.
    pub fn unknown_fields(&self) -> Vec<String> {
        let unknown = |prefix: &str, extra: &BTreeMap<String, Value>| -> Vec<String> {
            extra
                .keys()
                .filter(|k| !PRETRAINED_CONFIG_KEYS.contains(&k.as_str()))
                .map(|k| format!("{prefix}{k}"))
                .collect::<Vec<_>>()
        };
        let mut out = unknown("", &self.extra);
        out.extend(unknown("text_config.", &self.text_config.extra));
        out.extend(unknown("vision_config.", &self.vision_config.extra));
        out
    }

    /// Checks that the sizes describe a model that can be built and run.
    pub fn validate(&self) -> std::result::Result<(), Kosmos2Error> {
        let invalid = |field: &str, reason: String| {
            Err(Kosmos2Error::InvalidConfig {
                field: field.to_string(),
                reason,
            })
        };
        if let Some(t) = &self.model_type {
            if t != MODEL_TYPE {
                return invalid(
                    "model_type",
                    format!("is {t:?}, expected {MODEL_TYPE:?} (a Kosmos2ForConditionalGeneration config)"),
                );
            }
        }
        let v = &self.vision_config;
        let t = &self.text_config;
        let positive = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.patch_size", v.patch_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.ffn_dim", t.ffn_dim),
            ("text_config.attention_heads", t.attention_heads),
            ("latent_query_num", self.latent_query_num),
        ];
        for (field, value) in positive {
            if value == 0 {
                return invalid(field, "must be > 0".into());
            }
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return invalid(
                "vision_config.hidden_size",
                format!(
                    "({}) must be divisible by vision_config.num_attention_heads ({})",
                    v.hidden_size, v.num_attention_heads
                ),
            );
        }
        if v.image_size < v.patch_size {
            return invalid(
                "vision_config.image_size",
                format!(
                    "({}) is smaller than patch_size ({})",
                    v.image_size, v.patch_size
                ),
            );
        }
        // The sinusoidal table divides by (embed_dim / 2 - 1).
        if t.embed_dim < 4 {
            return invalid(
                "text_config.embed_dim",
                format!("({}) must be >= 4", t.embed_dim),
            );
        }
        if t.embed_dim % t.attention_heads != 0 {
            return invalid(
                "text_config.embed_dim",
                format!(
                    "({}) must be divisible by text_config.attention_heads ({})",
                    t.embed_dim, t.attention_heads
                ),
            );
        }
        for (field, eps) in [
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
            ("text_config.layer_norm_eps", t.layer_norm_eps),
        ] {
            if !(eps.is_finite() && eps > 0.0) {
                return invalid(field, format!("({eps}) must be a positive number"));
            }
        }
        Ok(())
    }

    /// Parameter count of the checkpoint (tied `lm_head` not counted twice).
    pub fn num_parameters(&self) -> usize {
        let v = &self.vision_config;
        let t = &self.text_config;
        let linear = |i: usize, o: usize| i * o + o;
        let ln = |d: usize| 2 * d;
        let (dv, dt) = (v.hidden_size, t.embed_dim);
        let vision_layer = 4 * linear(dv, dv)
            + 2 * ln(dv)
            + linear(dv, v.intermediate_size)
            + linear(v.intermediate_size, dv);
        let vision = dv
            + v.num_channels * v.patch_size * v.patch_size * dv
            + v.num_positions() * dv
            + 2 * ln(dv)
            + v.num_hidden_layers * vision_layer;
        let projection = linear(dv, dt) + self.latent_query_num * dt + 4 * linear(dt, dt);
        let text_layer = 4 * linear(dt, dt)
            + 3 * ln(dt)
            + linear(dt, t.ffn_dim)
            + linear(t.ffn_dim, dt)
            + ln(t.ffn_dim);
        let text = t.vocab_size * dt + t.layers * text_layer + ln(dt);
        vision + projection + text
    }
}

enum ParseError {
    Json(serde_json::Error),
    Field { field: String, message: String },
}

/// serde_json's errors give a line, not a key. Every field has a default, so a
/// one-key object parses iff that key's value is valid: try each key alone to
/// name the culprit. Sub-configs are checked by the caller, so skip them here.
fn locate_bad_field<T: DeserializeOwned>(
    map: &serde_json::Map<String, Value>,
    section: &str,
) -> std::result::Result<(), ParseError> {
    for (key, value) in map {
        if section.is_empty() && (key == "text_config" || key == "vision_config") {
            continue;
        }
        let single = serde_json::Map::from_iter([(key.clone(), value.clone())]);
        if let Err(e) = serde_json::from_value::<T>(Value::Object(single)) {
            let field = if section.is_empty() {
                key.clone()
            } else {
                format!("{section}.{key}")
            };
            return Err(ParseError::Field {
                field,
                message: e.to_string(),
            });
        }
    }
    Ok(())
}

//! Model directories: loading a [`Policy`] from one, writing one, and reading its size.
//!
//! A model directory is self-describing:
//! - `config.json`: the backbone's Hugging Face Kosmos-2 config;
//! - `policy.json`: [`PolicyConfig`] (window, chunk, head, action layout, normalisation, dt);
//! - `model.safetensors`: HF backbone names, `action_token`, `act_head.*` (RoboVLMs head names);
//! - `tokenizer.json`: the backbone's tokenizer.
//!
//! Every file is replaced atomically ([`crate::fsutil::write_atomic`]), so a reader never sees half
//! of one.

use crate::model::config::PolicyConfig;
use crate::model::error::{ModelError, Result};
use crate::model::gemm::WeightFormat;
use crate::model::kosmos2::Kosmos2Config;
use crate::model::policy::Policy;
use crate::model::tokenizer::PromptTokenizer;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub const CONFIG_FILE: &str = "config.json";
pub const POLICY_FILE: &str = "policy.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Numeric setup for loading.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Repack the backbone's CPU weights for the inference GEMM
    /// ([`crate::model::kosmos2::Kosmos2::pack_for_inference`]); `None` keeps them trainable, for
    /// fine-tuning (and in half precision, which the GEMM does not hold).
    pub packing: Option<WeightFormat>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            packing: Some(WeightFormat::F32),
        }
    }
}

/// Records which tensors the model asks for, so unused ones in a file can be reported.
struct Recording<B> {
    inner: B,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl<B: SimpleBackend> SimpleBackend for Recording<B> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_owned());
        }
        self.inner.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_owned());
        }
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Builds a policy from `backend` and returns it with the set of tensor names it used.
pub(crate) fn build_policy<B: SimpleBackend + 'static>(
    backend: B,
    cfg: PolicyConfig,
    backbone_cfg: &Kosmos2Config,
    tokenizer: PromptTokenizer,
    opts: &LoadOptions,
) -> candle_core::Result<(Policy, BTreeSet<String>)> {
    let used = Arc::new(Mutex::new(BTreeSet::new()));
    let rec: Box<dyn SimpleBackend> = Box::new(Recording {
        inner: backend,
        used: used.clone(),
    });
    let vb = VarBuilder::from_backend(rec, opts.dtype, opts.device.clone());
    let policy = Policy::new(cfg, backbone_cfg, tokenizer, vb)?;
    let used = used.lock().map(|u| u.clone()).unwrap_or_default();
    Ok((policy, used))
}

impl Policy {
    /// Loads a model directory in f32 on the CPU, packed for inference.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::default())
    }

    /// Loads a model directory. Missing, misshaped or unused tensors are errors naming them.
    pub fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let backbone_cfg = Kosmos2Config::from_file(dir.join(CONFIG_FILE))?;
        let cfg = PolicyConfig::from_file(&dir.join(POLICY_FILE))?;
        let tokenizer = PromptTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors_err = |cause| ModelError::Tensors {
            path: weights.clone(),
            cause,
        };
        if !weights.is_file() {
            return Err(ModelError::io(
                &weights,
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        // SAFETY: mapped read-only; model files are replaced by atomic rename, never rewritten
        // in place.
        let st = unsafe { MmapedSafetensors::new(&weights) }.map_err(tensors_err)?;
        let names: BTreeSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let (mut policy, used) =
            build_policy(st, cfg, &backbone_cfg, tokenizer, opts).map_err(tensors_err)?;
        let unused: Vec<String> = names.difference(&used).cloned().collect();
        if !unused.is_empty() {
            return Err(ModelError::UnusedTensors {
                path: weights,
                names: unused,
            });
        }
        if let Some(format) = opts.packing {
            policy.pack_for_inference(format).map_err(tensors_err)?;
        }
        Ok(policy)
    }
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_atomic(path, |tmp| std::fs::write(tmp, bytes))
        .map_err(|e| ModelError::io(path, e))
}

/// Writes `tensors` as one safetensors file, atomically.
pub(crate) fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    crate::fsutil::write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| ModelError::io(path, e))
}

/// Writes a complete model directory into `dir` (created if needed), one atomic file at a time.
pub fn save_model_dir(
    dir: &Path,
    backbone_config_json: &[u8],
    tokenizer_json: &[u8],
    cfg: &PolicyConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let policy = serde_json::to_vec_pretty(cfg)
        .map_err(|e| ModelError::config(dir.join(POLICY_FILE), e.to_string()))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), tensors)?;
    write_bytes(&dir.join(CONFIG_FILE), backbone_config_json)?;
    write_bytes(&dir.join(TOKENIZER_FILE), tokenizer_json)?;
    write_bytes(&dir.join(POLICY_FILE), &policy)
}

/// Writes a complete model directory at `out` as one step: into a sibling temp folder first,
/// then renamed into place (an existing `out` is replaced only once the new one is complete).
/// On error nothing new is left at `out`.
pub fn publish_model_dir(
    out: &Path,
    backbone_config_json: &[u8],
    tokenizer_json: &[u8],
    cfg: &PolicyConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let leaf = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sibling = |what: &str| out.with_file_name(format!(".{leaf}.{what}-{}", std::process::id()));
    let (tmp, old) = (sibling("tmp"), sibling("old"));
    let _ = std::fs::remove_dir_all(&tmp);
    let written = save_model_dir(&tmp, backbone_config_json, tokenizer_json, cfg, tensors)
        .and_then(|_| {
            if out.exists() {
                std::fs::rename(out, &old).map_err(|e| ModelError::io(out, e))?;
            }
            std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if old.exists() && !out.exists() {
            let _ = std::fs::rename(&old, out);
        }
    }
    written?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}

/// Parameter count and bytes of one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentInfo {
    pub params: usize,
    pub bytes: usize,
    pub dtypes: BTreeSet<String>,
}

/// Parameters per component of a model directory, read from the safetensors header only.
pub fn model_info(dir: &Path) -> Result<BTreeMap<&'static str, ComponentInfo>> {
    let weights = dir.join(WEIGHTS_FILE);
    // SAFETY: read-only mapping, header only.
    let st = unsafe { MmapedSafetensors::new(&weights) }.map_err(|cause| ModelError::Tensors {
        path: weights.clone(),
        cause,
    })?;
    let mut out: BTreeMap<&'static str, ComponentInfo> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let component = component_of(&name);
        let entry = out.entry(component).or_default();
        let n: usize = view.shape().iter().product();
        entry.params += n;
        entry.bytes += view.data().len();
        entry
            .dtypes
            .insert(format!("{:?}", view.dtype()).to_lowercase());
    }
    Ok(out)
}

fn component_of(name: &str) -> &'static str {
    if name.starts_with("vision_model.") {
        "vision"
    } else if name.starts_with("image_to_text_projection.") {
        "projection"
    } else if name.starts_with("text_model.") {
        "text"
    } else if name == "action_token" {
        "action_token"
    } else if name.starts_with("act_head.") {
        "act_head"
    } else {
        "other"
    }
}

//! Model directories, RoboVLMs checkpoint import and export.
//!
//! A model directory is self-describing:
//! - `config.json`: the backbone's Hugging Face Kosmos-2 config;
//! - `policy.json`: [`PolicyConfig`] (window, chunk, head, action layout, normalisation, dt);
//! - `model.safetensors`: HF backbone names, `action_token`, `act_head.*` (RoboVLMs head names);
//! - `tokenizer.json`: the backbone's tokenizer.
//!
//! Import reads a RoboVLMs / Mobile VLA PyTorch Lightning `.ckpt` (zip of pickles) and, like RoboVLMs,
//! starts from the Hugging Face backbone and lays the checkpoint over it. Key mapping (after stripping
//! leading `module.` / `model.`):
//!
//! | checkpoint key                      | model directory name        |
//! |-------------------------------------|-----------------------------|
//! | `backbone.<HF name>`                | `<HF name>`                 |
//! | `action_token`                      | `action_token`              |
//! | `act_head.rnn.<p>_l<k>`             | `act_head.rnn.<p>_l<k>`     |
//! | `act_head.actions.mlp.{0,2,4,6}.*`  | same                        |
//! | `act_head.gripper.mlp.{0,2,4,6}.*`  | same                        |
//!
//! Anything else is reported and ignored; tensors the model does not use (e.g. the tied `lm_head`)
//! are reported and dropped. Export writes the RoboVLMs names back (`model.` + checkpoint key).

use crate::data::image::ChannelOrder;
use crate::model::error::{ModelError, Result};
use crate::model::kosmos2::{Kosmos2Config, Kosmos2Error};
use crate::model::policy::{ActionSpec, LoadOptions, LstmSpec, NormRange, Policy, PolicyConfig};
use crate::model::tokenizer::PromptTokenizer;
use candle_core::pickle::{Object, PthTensors};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const CONFIG_FILE: &str = "config.json";
pub const POLICY_FILE: &str = "policy.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Prefixes RoboVLMs' loaders accept in front of checkpoint keys (Lightning module, DDP wrapper).
const CKPT_PREFIXES: [&str; 2] = ["module.", "model."];
/// Prefix of backbone tensors in RoboVLMs checkpoints.
const BACKBONE_PREFIX: &str = "backbone.";
/// Policy (non-backbone) tensor name prefixes, identical in checkpoints and model directories.
const POLICY_PREFIXES: [&str; 4] = [
    "action_token",
    "act_head.rnn.",
    "act_head.actions.mlp.",
    "act_head.gripper.mlp.",
];

impl From<Kosmos2Error> for ModelError {
    fn from(e: Kosmos2Error) -> Self {
        ModelError::Backbone(Box::new(e))
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
fn build_policy<B: SimpleBackend + 'static>(
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

/// Loads a model directory. Missing, misshaped or unused tensors are errors naming them.
pub fn load_policy(dir: &Path, opts: &LoadOptions) -> Result<Policy> {
    let backbone_cfg = Kosmos2Config::from_file(dir.join(CONFIG_FILE))?;
    let cfg = PolicyConfig::from_file(&dir.join(POLICY_FILE))?;
    let tokenizer = PromptTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    let weights = dir.join(WEIGHTS_FILE);
    let tensors_err = |source| ModelError::Tensors {
        path: weights.clone(),
        source,
    };
    if !weights.is_file() {
        return Err(ModelError::io(
            &weights,
            std::io::ErrorKind::NotFound.into(),
        ));
    }
    // SAFETY: mapped read-only; model files are replaced by atomic rename, never rewritten in place.
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

/// Writes `path` atomically: `write` fills a temp file in the same folder, which is fsynced and
/// renamed over `path`; the folder is fsynced too, so the rename itself survives a power cut.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::io(path, e));
    }
    Ok(())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(std::io::Error::other)
    })
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

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}

// ---------------------------------------------------------------------------------------------
// RoboVLMs config

/// Typed access to a RoboVLMs JSON config; errors name the field (`act_head.hidden_size`).
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn get(&self, path: &str) -> Option<&Value> {
        path.split('.')
            .try_fold(self.0, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    fn usize(&self, path: &str) -> std::result::Result<Option<usize>, String> {
        self.get(path)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{path}` must be a non-negative integer, got {v}"))
            })
            .transpose()
    }

    fn required_usize(&self, path: &str) -> std::result::Result<usize, String> {
        self.usize(path)?
            .ok_or_else(|| format!("`{path}` is missing"))
    }

    fn f32(&self, path: &str) -> std::result::Result<Option<f32>, String> {
        self.get(path)
            .map(|v| {
                v.as_f64()
                    .map(|n| n as f32)
                    .ok_or_else(|| format!("`{path}` must be a number, got {v}"))
            })
            .transpose()
    }

    fn bool(&self, path: &str) -> std::result::Result<bool, String> {
        self.get(path)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("`{path}` must be true or false, got {v}"))
            })
            .transpose()
            .map(|b| b.unwrap_or(false))
    }

    fn str(&self, path: &str) -> std::result::Result<Option<&str>, String> {
        self.get(path)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("`{path}` must be a string, got {v}"))
            })
            .transpose()
    }
}

/// Where the RoboVLMs config came from, for the report.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    CheckpointHyperParameters,
}

/// Reads a RoboVLMs JSON config, merging its `parent` chain like RoboVLMs' `load_config`
/// (a relative `parent` is resolved against the child's folder).
pub fn read_robovlms_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let child: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
    let mut merged = match child.get("parent").and_then(Value::as_str) {
        Some(parent) => {
            let p = Path::new(parent);
            let p = if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p.to_owned()
            };
            read_robovlms_config(&p)?
        }
        None => Value::Object(Default::default()),
    };
    deep_update(&mut merged, child);
    Ok(merged)
}

fn deep_update(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => deep_update(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Default robot mapping for a RoboVLMs head of `action_dim` (gripper included).
fn default_robot_indices(action_dim: usize) -> Option<[usize; 3]> {
    match action_dim {
        // Mobile VLA fork: [x, y, 0, 0, 0, rz, gripper].
        7 => Some([0, 1, 5]),
        // A 3-DoF base in RoboVLMs' terms: [vx, vy, wz, gripper].
        4 => Some([0, 1, 2]),
        _ => None,
    }
}

/// Options of [`import_robovlms`] that the checkpoint cannot tell.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// `--config`; otherwise `hyper_parameters.configs` of the checkpoint.
    pub config: Option<PathBuf>,
    /// Checkpoint-layout indices of (vx, vy, wz); default by `action_dim` (7 → 0,1,5; 4 → 0,1,2).
    pub robot_indices: Option<[usize; 3]>,
    pub dt: f32,
    pub model_channel_order: ChannelOrder,
}

/// What an import did, for the user.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub config_source: ConfigSource,
    pub policy: PolicyConfig,
    /// Tensors taken from the checkpoint.
    pub from_checkpoint: usize,
    /// Backbone tensors the checkpoint lacked, taken from the Hugging Face model.
    pub from_hf: Vec<String>,
    /// Checkpoint keys that map to nothing (ignored).
    pub unmatched: Vec<String>,
    /// Mapped tensors the model does not use (dropped), e.g. the tied `lm_head`.
    pub unused: Vec<String>,
}

/// Head sizes as the checkpoint's tensors say (RoboVLMs configs do not name the MLP widths).
fn head_sizes(ckpt: &Path, tensors: &HashMap<String, Tensor>) -> Result<LstmSpec> {
    let dim0 = |name: &str| -> Result<usize> {
        let t = tensors.get(name).ok_or_else(|| ModelError::Checkpoint {
            path: ckpt.to_owned(),
            msg: format!("missing tensor `{name}` (RoboVLMs key `model.{name}`)"),
        })?;
        Ok(t.dims().first().copied().unwrap_or(0))
    };
    let num_layers = (0..)
        .take_while(|k| tensors.contains_key(&format!("act_head.rnn.weight_ih_l{k}")))
        .count();
    if num_layers == 0 {
        return Err(ModelError::Checkpoint {
            path: ckpt.to_owned(),
            msg: "no `act_head.rnn.weight_ih_l0`: not an LSTMDecoder checkpoint".into(),
        });
    }
    Ok(LstmSpec {
        hidden_size: dim0("act_head.rnn.weight_hh_l0")? / 4,
        num_layers,
        mlp_hidden: [
            dim0("act_head.actions.mlp.0.weight")?,
            dim0("act_head.actions.mlp.2.weight")?,
            dim0("act_head.actions.mlp.4.weight")?,
        ],
    })
}

fn policy_config_from_robovlms(
    raw: &Value,
    src: &Path,
    opts: &ImportOptions,
    head: LstmSpec,
) -> Result<PolicyConfig> {
    robovlms_policy(&Fields(raw), opts, head).map_err(|msg| ModelError::config(src, msg))
}

/// RoboVLMs config + checkpoint head sizes → `policy.json`; rejects what this policy cannot run.
fn robovlms_policy(
    f: &Fields,
    opts: &ImportOptions,
    head: LstmSpec,
) -> std::result::Result<PolicyConfig, String> {
    let kind = f
        .str("act_head.type")?
        .ok_or("`act_head.type` is missing")?;
    if kind != "LSTMDecoder" {
        return Err(format!(
            "`act_head.type` is `{kind}`; only `LSTMDecoder` is supported"
        ));
    }
    let expect_str = |path: &str, allowed: &[&str]| -> std::result::Result<(), String> {
        match f.str(path)? {
            Some(v) if !allowed.contains(&v) => {
                Err(format!("`{path}` is `{v}`; supported: {allowed:?}"))
            }
            _ => Ok(()),
        }
    };
    expect_str("act_head.action_space", &["continuous"])?;
    expect_str("act_head.history_type", &["post"])?;
    expect_str("act_head.down_sample", &["none", "pooling"])?;
    expect_str("model", &["kosmos"])?;
    if let Some(l) = f.usize("act_head.latent")?.filter(|&l| l != 1) {
        return Err(format!("`act_head.latent` is {l}; only 1 is supported"));
    }
    if f.bool("use_hand_rgb")? {
        return Err("`use_hand_rgb` is true; a second (wrist) camera is not supported".into());
    }
    if f.bool("use_state")? {
        return Err("`use_state` is true; proprioceptive state tokens are not supported".into());
    }
    if let Some(n) = f
        .usize("act_head.num_layers")?
        .filter(|&n| n != head.num_layers)
    {
        return Err(format!(
            "`act_head.num_layers` is {n} but the checkpoint holds {} LSTM layers",
            head.num_layers
        ));
    }
    if let Some(n) = f
        .usize("act_head.hidden_size")?
        .filter(|&n| n != head.hidden_size)
    {
        return Err(format!(
            "`act_head.hidden_size` is {n} but the checkpoint's LSTM is {} wide",
            head.hidden_size
        ));
    }
    let action_dim = f.required_usize("act_head.action_dim")?;
    if action_dim < 2 {
        return Err(format!(
            "`act_head.action_dim` is {action_dim}; RoboVLMs heads need ≥ 2 (gripper included)"
        ));
    }
    let robot_indices = opts
        .robot_indices
        .or_else(|| default_robot_indices(action_dim))
        .ok_or_else(|| format!("`act_head.action_dim` is {action_dim}; say which dims are (vx, vy, wz) with --robot-dims"))?;
    let norm = if f.bool("norm_action")? {
        Some(NormRange {
            min: f.f32("norm_min")?.unwrap_or(-1.0),
            max: f.f32("norm_max")?.unwrap_or(1.0),
        })
    } else {
        None
    };
    let cfg = PolicyConfig {
        window_size: f.required_usize("window_size")?,
        fwd_pred_next_n: f.required_usize("fwd_pred_next_n")?,
        head,
        action: ActionSpec {
            dim: action_dim,
            gripper: true,
            robot_indices,
            norm,
        },
        image_size: f.usize("image_size")?,
        model_channel_order: opts.model_channel_order,
        dt: opts.dt,
    };
    cfg.validate()?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Lightning checkpoints

/// The checkpoint's top-level pickle (tensors left as unresolved objects).
fn read_ckpt_pickle(path: &Path) -> Result<Object> {
    let bad = |msg: String| ModelError::Checkpoint {
        path: path.to_owned(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch zip checkpoint ({e})")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("no `data.pkl` in the archive".into()))?;
    let entry = zip.by_name(&name).map_err(|e| bad(e.to_string()))?;
    let mut reader = std::io::BufReader::new(entry);
    let mut stack = candle_core::pickle::Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(format!("cannot unpickle {name}: {e}; {SLIM_HINT}")))?;
    stack
        .finalize()
        .map_err(|e| bad(format!("cannot unpickle {name}: {e}; {SLIM_HINT}")))
}

fn dict_get<'a>(obj: &'a Object, key: &str) -> Option<&'a Object> {
    match obj {
        Object::Dict(items) => items
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Plain pickled data (dicts, lists, strings, numbers) → JSON; anything else is an error naming `at`.
fn object_to_json(obj: &Object, at: &str) -> std::result::Result<Value, String> {
    Ok(match obj {
        Object::None => Value::Null,
        Object::Bool(b) => Value::Bool(*b),
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Object::Unicode(s) => Value::String(s.clone()),
        Object::List(v) | Object::Tuple(v) => Value::Array(
            v.iter()
                .enumerate()
                .map(|(i, o)| object_to_json(o, &format!("{at}[{i}]")))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Object::Dict(items) => {
            let mut map = serde_json::Map::new();
            for (k, v) in items {
                let key = match k {
                    Object::Unicode(s) => s.clone(),
                    Object::Int(i) => i.to_string(),
                    other => return Err(format!("`{at}` has a non-string key {other:?}")),
                };
                let value = object_to_json(v, &format!("{at}.{key}"))?;
                map.insert(key, value);
            }
            Value::Object(map)
        }
        other => {
            return Err(format!(
                "`{at}` holds a Python object JSON cannot represent: {other:?}"
            ))
        }
    })
}

/// `hyper_parameters.configs` of a Lightning checkpoint, if present.
fn ckpt_configs(path: &Path) -> Result<Option<Value>> {
    let top = read_ckpt_pickle(path)?;
    let Some(configs) = dict_get(&top, "hyper_parameters").and_then(|h| dict_get(h, "configs"))
    else {
        return Ok(None);
    };
    object_to_json(configs, "hyper_parameters.configs")
        .map(Some)
        .map_err(|msg| ModelError::Checkpoint {
            path: path.to_owned(),
            msg,
        })
}

/// Maps a checkpoint key to a model-directory name, or `None` when it maps to nothing.
pub fn map_ckpt_key(key: &str) -> Option<String> {
    let mut k = key;
    while let Some(rest) = CKPT_PREFIXES.iter().find_map(|p| k.strip_prefix(p)) {
        k = rest;
    }
    if let Some(hf) = k.strip_prefix(BACKBONE_PREFIX) {
        return Some(hf.to_owned());
    }
    POLICY_PREFIXES
        .iter()
        .any(|p| k == *p || (p.ends_with('.') && k.starts_with(p)))
        .then(|| k.to_owned())
}

/// What to do when candle's pickle reader meets Python objects it does not know (it reads the whole
/// checkpoint, optimiser and callback states included).
const SLIM_HINT: &str = "if the checkpoint holds Python objects beyond tensors and plain data, keep only what \
the import needs: python -c \"import torch; c = torch.load('in.ckpt', map_location='cpu', weights_only=False); \
torch.save({'state_dict': c['state_dict'], 'hyper_parameters': c.get('hyper_parameters', {})}, 'slim.ckpt')\"";

fn open_ckpt_tensors(path: &Path) -> Result<PthTensors> {
    let bad = |e: candle_core::Error| {
        let msg = e.to_string();
        let msg = if msg.contains("op-code") || msg.contains("expected a") {
            format!("{msg}; {SLIM_HINT}")
        } else {
            msg
        };
        ModelError::Checkpoint {
            path: path.to_owned(),
            msg,
        }
    };
    if !path.is_file() {
        return Err(ModelError::io(path, std::io::ErrorKind::NotFound.into()));
    }
    // Lightning nests the weights under `state_dict`; a bare `torch.save(state_dict)` has none.
    match PthTensors::new(path, Some("state_dict")) {
        Ok(t) => Ok(t),
        Err(e) if e.to_string().contains("key state_dict not found") => {
            PthTensors::new(path, None).map_err(bad)
        }
        Err(e) => Err(bad(e)),
    }
}

/// Safetensors weight files of a Hugging Face model folder (single file or sharded).
pub fn hf_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::config(&index, e.to_string()))?;
    let files: BTreeSet<String> = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| ModelError::config(&index, "missing `weight_map`"))?
        .values()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Imports a RoboVLMs / Mobile VLA checkpoint into a new model directory `out` (which must not exist
/// or be empty). Nothing is left at `out` on error.
pub fn import_robovlms(
    ckpt: &Path,
    hf_model: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| ModelError::io(out, e))?
            .next()
            .is_some()
    {
        return Err(ModelError::config(
            out,
            "output folder exists and is not empty",
        ));
    }
    let hf_config = hf_model.join(CONFIG_FILE);
    let backbone_cfg = Kosmos2Config::from_file(&hf_config)?;
    let config_json = read(&hf_config)?;
    let tokenizer_path = hf_model.join(TOKENIZER_FILE);
    let tokenizer = PromptTokenizer::from_file(&tokenizer_path)?;
    let tokenizer_json = read(&tokenizer_path)?;

    // Checkpoint tensors, mapped.
    let pth = open_ckpt_tensors(ckpt)?;
    let mut keys: Vec<&String> = pth.tensor_infos().keys().collect();
    keys.sort();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut unmatched = Vec::new();
    for key in keys {
        let Some(name) = map_ckpt_key(key) else {
            unmatched.push(key.clone());
            continue;
        };
        let t = pth
            .get(key)
            .map_err(|e| ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("tensor `{key}`: {e}"),
            })?
            .ok_or_else(|| ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("tensor `{key}` listed but unreadable"),
            })?;
        if tensors.insert(name.clone(), t).is_some() {
            return Err(ModelError::Checkpoint {
                path: ckpt.to_owned(),
                msg: format!("two keys map to `{name}` (e.g. with and without a `module.` prefix)"),
            });
        }
    }
    let from_checkpoint = tensors.len();

    // Policy config.
    let head = head_sizes(ckpt, &tensors)?;
    let (raw_cfg, config_source, cfg_path) = match &opts.config {
        Some(p) => (read_robovlms_config(p)?, ConfigSource::File(p.clone()), p.clone()),
        None => match ckpt_configs(ckpt)? {
            Some(v) => (v, ConfigSource::CheckpointHyperParameters, ckpt.to_owned()),
            None => {
                return Err(ModelError::Checkpoint {
                    path: ckpt.to_owned(),
                    msg: "no `hyper_parameters.configs` in the checkpoint; pass the RoboVLMs JSON with --config".into(),
                })
            }
        },
    };
    let policy_cfg = policy_config_from_robovlms(&raw_cfg, &cfg_path, opts, head)?;

    // Backbone tensors the checkpoint lacks come from the HF model (RoboVLMs builds from it first).
    let mut from_hf = Vec::new();
    let hf_files = hf_weight_files(hf_model)?;
    if !hf_files.is_empty() {
        // SAFETY: read-only mapping of files nobody rewrites during the import.
        let st = unsafe { MmapedSafetensors::multi(&hf_files) }.map_err(|source| {
            ModelError::Tensors {
                path: hf_model.to_owned(),
                source,
            }
        })?;
        for (name, _) in st.tensors() {
            if let std::collections::hash_map::Entry::Vacant(slot) = tensors.entry(name) {
                let t =
                    st.load(slot.key(), &Device::Cpu)
                        .map_err(|source| ModelError::Tensors {
                            path: hf_model.to_owned(),
                            source,
                        })?;
                from_hf.push(slot.key().clone());
                slot.insert(t);
            }
        }
        from_hf.sort();
    }

    // Build the policy once: checks every tensor's presence and shape, and tells which are used.
    let load = LoadOptions::default();
    let (_, used) = build_policy(
        tensors.clone(),
        policy_cfg.clone(),
        &backbone_cfg,
        tokenizer,
        &load,
    )
    .map_err(|source| ModelError::Tensors {
        path: ckpt.to_owned(),
        source,
    })?;
    let mut unused: Vec<String> = tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    unused.sort();
    tensors.retain(|k, _| used.contains(k));
    from_hf.retain(|k| used.contains(k));

    // Write into a sibling temp folder, then rename it into place.
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let leaf = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{leaf}.import-{}", std::process::id()));
    let written = save_model_dir(&tmp, &config_json, &tokenizer_json, &policy_cfg, &tensors)
        .and_then(|_| {
            if out.exists() {
                std::fs::remove_dir(out).map_err(|e| ModelError::io(out, e))?;
            }
            std::fs::rename(&tmp, out).map_err(|e| ModelError::io(out, e))
        });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    Ok(ImportReport {
        config_source,
        policy: policy_cfg,
        from_checkpoint,
        from_hf,
        unmatched,
        unused,
    })
}

/// The RoboVLMs checkpoint key of a model-directory tensor name (inverse of [`map_ckpt_key`]).
pub fn robovlms_key(name: &str) -> String {
    let is_policy = POLICY_PREFIXES
        .iter()
        .any(|p| name == *p || (p.ends_with('.') && name.starts_with(p)));
    if is_policy {
        format!("model.{name}")
    } else {
        format!("model.{BACKBONE_PREFIX}{name}")
    }
}

/// Writes the model directory's weights as one safetensors file with RoboVLMs checkpoint names
/// (`model.backbone.<HF name>`, `model.action_token`, `model.act_head.*`).
pub fn export_robovlms(dir: &Path, out: &Path) -> Result<usize> {
    let weights = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|source| {
        ModelError::Tensors {
            path: weights.clone(),
            source,
        }
    })?;
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (robovlms_key(&name), t))
        .collect();
    let n = renamed.len();
    write_safetensors(out, &renamed)?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Info

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
    let st = unsafe { MmapedSafetensors::new(&weights) }.map_err(|source| ModelError::Tensors {
        path: weights.clone(),
        source,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ckpt_keys_map_like_robovlms() {
        assert_eq!(
            map_ckpt_key("model.backbone.text_model.model.layer_norm.weight").as_deref(),
            Some("text_model.model.layer_norm.weight")
        );
        assert_eq!(
            map_ckpt_key("module.model.action_token").as_deref(),
            Some("action_token")
        );
        assert_eq!(
            map_ckpt_key("act_head.rnn.weight_hh_l3").as_deref(),
            Some("act_head.rnn.weight_hh_l3")
        );
        assert_eq!(
            map_ckpt_key("model.act_head.gripper.mlp.6.bias").as_deref(),
            Some("act_head.gripper.mlp.6.bias")
        );
        assert_eq!(map_ckpt_key("model.act_head.fc.weight"), None);
        assert_eq!(map_ckpt_key("model.action_token_extra"), None);
        assert_eq!(map_ckpt_key("optimizer.step"), None);
    }

    #[test]
    fn parent_configs_merge_deeply() {
        let mut base = serde_json::json!({"a": {"x": 1, "y": 2}, "b": 3});
        deep_update(&mut base, serde_json::json!({"a": {"y": 5}, "c": 4}));
        assert_eq!(
            base,
            serde_json::json!({"a": {"x": 1, "y": 5}, "b": 3, "c": 4})
        );
    }
}

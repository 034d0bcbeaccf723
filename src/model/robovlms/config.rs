//! RoboVLMs JSON configs: reading one with its `parent` chain, typed field access, and the
//! translation into a [`PolicyConfig`].

use crate::data::image::ChannelOrder;
use crate::model::config::{ActionSpec, LstmSpec, NormRange, PolicyConfig};
use crate::model::error::{ModelError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Typed access to a RoboVLMs JSON config by dotted path (`act_head.hidden_size`); a null counts as
/// absent, and errors name the field.
pub struct Fields<'a>(pub &'a Value);

impl Fields<'_> {
    pub fn get(&self, path: &str) -> Option<&Value> {
        path.split('.')
            .try_fold(self.0, |v, k| v.get(k))
            .filter(|v| !v.is_null())
    }

    pub fn usize(&self, path: &str) -> std::result::Result<Option<usize>, String> {
        self.get(path)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{path}` must be a non-negative integer, got {v}"))
            })
            .transpose()
    }

    pub fn required_usize(&self, path: &str) -> std::result::Result<usize, String> {
        self.usize(path)?
            .ok_or_else(|| format!("`{path}` is missing"))
    }

    pub fn f32(&self, path: &str) -> std::result::Result<Option<f32>, String> {
        self.get(path)
            .map(|v| {
                v.as_f64()
                    .map(|n| n as f32)
                    .ok_or_else(|| format!("`{path}` must be a number, got {v}"))
            })
            .transpose()
    }

    pub fn bool(&self, path: &str) -> std::result::Result<bool, String> {
        self.get(path)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("`{path}` must be true or false, got {v}"))
            })
            .transpose()
            .map(|b| b.unwrap_or(false))
    }

    pub fn str(&self, path: &str) -> std::result::Result<Option<&str>, String> {
        self.get(path)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("`{path}` must be a string, got {v}"))
            })
            .transpose()
    }
}

/// Reads a RoboVLMs JSON config, merging its `parent` chain like RoboVLMs' `load_config`
/// (a relative `parent` is resolved against the child's folder). A chain that comes back to a file
/// it already holds is an error naming the files of the loop.
pub fn read_config(path: &Path) -> Result<Value> {
    read_chain(path, &mut Vec::new())
}

/// [`read_config`] of `path`, below the configs in `chain` (children first, canonical paths).
fn read_chain(path: &Path, chain: &mut Vec<PathBuf>) -> Result<Value> {
    // A file that does not exist fails the read below, with its own message.
    let id = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if let Some(first) = chain.iter().position(|p| *p == id) {
        let files: Vec<String> = chain[first..]
            .iter()
            .chain(std::iter::once(&id))
            .map(|p| p.display().to_string())
            .collect();
        return Err(ModelError::config(
            path,
            format!("`parent` chain loops: {}", files.join(" → ")),
        ));
    }
    chain.push(id);
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
            read_chain(&p, chain)?
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

/// What a RoboVLMs config cannot say about the robot (`import`'s options).
#[derive(Debug, Clone, Copy)]
pub struct RobotSide {
    /// Checkpoint-layout indices of (vx, vy, wz); default by `action_dim` (7 → 0,1,5; 4 → 0,1,2).
    pub robot_indices: Option<[usize; 3]>,
    pub dt: f32,
    pub model_channel_order: ChannelOrder,
}

/// RoboVLMs config `raw` (read from `src`, named in errors) + the checkpoint's head sizes →
/// `policy.json`; rejects what this policy cannot run.
pub fn policy_config(
    raw: &Value,
    src: &Path,
    head: LstmSpec,
    robot: &RobotSide,
) -> Result<PolicyConfig> {
    robovlms_policy(&Fields(raw), robot, head).map_err(|msg| ModelError::config(src, msg))
}

fn robovlms_policy(
    f: &Fields,
    opts: &RobotSide,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_configs_merge_deeply() {
        let mut base = serde_json::json!({"a": {"x": 1, "y": 2}, "b": 3});
        deep_update(&mut base, serde_json::json!({"a": {"y": 5}, "c": 4}));
        assert_eq!(
            base,
            serde_json::json!({"a": {"x": 1, "y": 5}, "b": 3, "c": 4})
        );
    }

    #[test]
    fn parent_chains_merge_and_loops_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, json: &str| std::fs::write(dir.path().join(name), json).unwrap();
        write(
            "base.json",
            r#"{"window_size": 8, "act_head": {"type": "LSTMDecoder"}}"#,
        );
        write(
            "child.json",
            r#"{"parent": "base.json", "act_head": {"action_dim": 7}}"#,
        );
        let merged = read_config(&dir.path().join("child.json")).unwrap();
        assert_eq!(merged["window_size"], 8);
        assert_eq!(merged["act_head"]["type"], "LSTMDecoder");
        assert_eq!(merged["act_head"]["action_dim"], 7);

        // a → b → c → b: before the fix this recursed until the stack overflowed.
        write("a.json", r#"{"parent": "b.json"}"#);
        write("b.json", r#"{"parent": "sub/../c.json"}"#);
        write("c.json", r#"{"parent": "b.json"}"#);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let msg = read_config(&dir.path().join("a.json"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`parent` chain loops"), "{msg}");
        let (b, c) = ("b.json", "c.json");
        assert!(
            msg.contains(&format!("{b} → ")) && msg.contains(&format!("{c} → ")),
            "{msg}"
        );
        assert!(
            !msg.contains("a.json →"),
            "a.json is not in the loop: {msg}"
        );

        write("self.json", r#"{"parent": "self.json"}"#);
        let msg = read_config(&dir.path().join("self.json"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`parent` chain loops"), "{msg}");
    }
}

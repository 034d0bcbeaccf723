//! RoboVLMs / Mobile VLA checkpoints: their JSON configs ([`config`]), their PyTorch Lightning
//! `.ckpt` files ([`ckpt`]) and how their tensor names map to a model directory's.
//!
//! Key mapping (after stripping leading `module.` / `model.`):
//!
//! | checkpoint key                      | model directory name        |
//! |-------------------------------------|-----------------------------|
//! | `backbone.<HF name>`                | `<HF name>`                 |
//! | `action_token`                      | `action_token`              |
//! | `act_head.rnn.<p>_l<k>`             | `act_head.rnn.<p>_l<k>`     |
//! | `act_head.actions.mlp.{0,2,4,6}.*`  | same                        |
//! | `act_head.gripper.mlp.{0,2,4,6}.*`  | same                        |
//!
//! Anything else maps to nothing. Export writes the RoboVLMs names back (`model.` + checkpoint key).

pub mod ckpt;
pub mod config;

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

/// A policy (non-backbone) tensor name, the same in checkpoints and model directories.
fn is_policy_name(name: &str) -> bool {
    POLICY_PREFIXES
        .iter()
        .any(|p| name == *p || (p.ends_with('.') && name.starts_with(p)))
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
    is_policy_name(k).then(|| k.to_owned())
}

/// The RoboVLMs checkpoint key of a model-directory tensor name (inverse of [`map_ckpt_key`]).
pub fn robovlms_key(name: &str) -> String {
    if is_policy_name(name) {
        format!("model.{name}")
    } else {
        format!("model.{BACKBONE_PREFIX}{name}")
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
}

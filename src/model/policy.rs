//! The VLA policy ("KosMos P.H."): Kosmos-2 → `[ACT]` feature per frame → LSTM head → action chunk.
//!
//! Per frame the text model sees `[<s>] + image embeds + prompt word embeds (no <s>/</s>) + [ACT] + [</s>]`
//! and the feature is its last hidden state (after the final `layer_norm`) at `[ACT]` (index L−2).
//! Upstream: `robovlms/model/backbone/base_backbone.py` (`forward_continuous`, `merge_multi_modal_input`).

use crate::data::image::ChannelOrder;
use crate::model::config::PolicyConfig;
use crate::model::error::{ModelError, Result};
use crate::model::gemm::WeightFormat;
use crate::model::head::{HeadOutput, History, LstmDecoder};
use crate::model::kosmos2::{Kosmos2, Kosmos2Config};
use crate::model::preprocess;
use crate::model::tokenizer::PromptTokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;

/// One step's output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionChunk {
    /// `fwd_pred_next_n` × `(vx, vy, wz)`, de-normalised, in the robot's layout.
    pub actions: Vec<[f32; 3]>,
    /// Chunk step 0, de-normalised, in the checkpoint's own layout (before mapping).
    pub raw: Vec<f32>,
    /// Seconds each chunk step spans.
    pub dt: f32,
}

/// The policy: backbone, learnable action token, head, and the inference history.
pub struct Policy {
    cfg: PolicyConfig,
    backbone: Kosmos2,
    /// `[ACT]` embedding, (D,).
    action_token: Tensor,
    head: LstmDecoder,
    tokenizer: PromptTokenizer,
    image_size: usize,
    history: History,
    /// The last instruction and its token ids (prompts rarely change between steps).
    prompt_cache: Option<(String, Vec<u32>)>,
}

impl Policy {
    /// Builds the policy from weights under `vb` (HF backbone names at the root, `action_token`,
    /// `act_head.*`). A `VarMap`-backed builder makes every parameter trainable.
    pub fn new(
        cfg: PolicyConfig,
        backbone_cfg: &Kosmos2Config,
        tokenizer: PromptTokenizer,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let backbone = Kosmos2::new(backbone_cfg, vb.clone())?;
        let d = backbone_cfg.text_config.embed_dim;
        let action_token = vb.get(d, "action_token")?;
        let head = LstmDecoder::new(cfg.head_config(d), vb.pp("act_head"))?;
        let image_size = cfg
            .image_size
            .unwrap_or(backbone_cfg.vision_config.image_size);
        Ok(Self {
            cfg,
            backbone,
            action_token,
            head,
            tokenizer,
            image_size,
            history: History::default(),
            prompt_cache: None,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// See [`Kosmos2::pack_for_inference`].
    pub fn pack_for_inference(&mut self, format: WeightFormat) -> candle_core::Result<()> {
        self.backbone.pack_for_inference(format)
    }

    pub fn backbone(&self) -> &Kosmos2 {
        &self.backbone
    }

    /// The backbone, to attach training adapters ([`Kosmos2::adapt_linears`]).
    pub fn backbone_mut(&mut self) -> &mut Kosmos2 {
        &mut self.backbone
    }

    pub fn head(&self) -> &LstmDecoder {
        &self.head
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    pub fn device(&self) -> &Device {
        self.action_token.device()
    }

    /// Forgets the history (call at the start of an episode).
    pub fn reset(&mut self) {
        self.history.clear();
    }

    /// Frames held in the history.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// Prompt token ids (`<s> … </s>`) for an instruction.
    pub fn encode_instruction(&self, instruction: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_instruction(instruction)
    }

    /// Model input `(1, 3, S, S)` for a true-RGB frame, honouring `model_channel_order`.
    pub fn pixel_values(&self, image: &image::RgbImage) -> Result<Tensor> {
        let frame = match self.cfg.model_channel_order {
            ChannelOrder::Rgb => std::borrow::Cow::Borrowed(image),
            ChannelOrder::Bgr => {
                let mut swapped = image.clone();
                swapped.pixels_mut().for_each(|p| p.0.swap(0, 2));
                std::borrow::Cow::Owned(swapped)
            }
        };
        Ok(preprocess::pixel_values(
            &frame,
            self.image_size,
            self.device(),
        )?)
    }

    /// `[ACT]` features of `N` frames sharing one prompt: pixel_values (N, 3, S, S), `token_ids` =
    /// the prompt with `<s>`/`</s>` → (N, D).
    pub fn frame_features(
        &self,
        pixel_values: &Tensor,
        token_ids: &[u32],
    ) -> candle_core::Result<Tensor> {
        let n = pixel_values.dim(0)?;
        let l = token_ids.len();
        if l < 2 {
            candle_core::bail!("prompt has {l} tokens; expected at least <s> and </s>");
        }
        let image = self.backbone.image_embeds(pixel_values)?; // (N, Q, D)
        let d = image.dim(2)?;
        let ids = Tensor::new(token_ids, self.device())?.unsqueeze(0)?;
        let words = self.backbone.embed_tokens(&ids)?.to_dtype(image.dtype())?; // (1, L, D)
        let act = self
            .action_token
            .to_dtype(image.dtype())?
            .reshape((1, 1, d))?;
        let text = |t: Tensor| t.broadcast_as((n, t.dim(1)?, d))?.contiguous();
        // Causal attention: the trailing `</s>` cannot change [ACT]'s state, so the sequence
        // ends at [ACT].
        let seq = Tensor::cat(
            &[
                text(words.narrow(1, 0, 1)?)?,
                image,
                text(words.narrow(1, 1, l - 2)?)?,
                text(act)?,
            ],
            1,
        )?; // (N, S - 1, D)
        self.backbone.last_hidden_state(&seq)
    }

    /// Training forward: pixel_values (B, W, 3, S, S) with one prompt per sample → normalised head
    /// outputs at every window position (actions (B, W, n, arm_dim), gripper logits (B, W, n)).
    pub fn forward_window(
        &self,
        pixel_values: &Tensor,
        token_ids: &[Vec<u32>],
    ) -> candle_core::Result<HeadOutput> {
        let (b, w, c, h, wd) = pixel_values.dims5()?;
        if token_ids.len() != b {
            candle_core::bail!(
                "forward_window: {b} samples but {} prompts",
                token_ids.len()
            );
        }
        // Each sample's frames share its prompt, so they batch through the VLM without padding.
        let features = token_ids
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                let frames = pixel_values.get(i)?.reshape((w, c, h, wd))?;
                self.frame_features(&frames, ids)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let features = Tensor::stack(&features, 0)?; // (B, W, D)
        let (out, _) = self.head.forward(&features, None)?;
        Ok(out)
    }

    /// One control step: a new true-RGB frame through the VLM, the head over the history, and the
    /// de-normalised chunk.
    pub fn step(&mut self, image: &image::RgbImage, instruction: &str) -> Result<ActionChunk> {
        let ids = match &self.prompt_cache {
            Some((text, ids)) if text == instruction => ids.clone(),
            _ => {
                let ids = self.tokenizer.encode_instruction(instruction)?;
                self.prompt_cache = Some((instruction.to_owned(), ids.clone()));
                ids
            }
        };
        let pixels = self.pixel_values(image)?;
        let feature = self.frame_features(&pixels, &ids)?;
        let out = self.head.step(&mut self.history, &feature)?;
        self.decode(&out)
    }

    /// Head output of one step → de-normalised chunk. The gripper logit becomes 1/0 (sigmoid > 0.5)
    /// and is de-normalised with the rest, as RoboVLMs' evaluation does.
    pub fn decode(&self, out: &HeadOutput) -> Result<ActionChunk> {
        let n = self.cfg.fwd_pred_next_n;
        let a = &self.cfg.action;
        let arm = out
            .actions
            .to_dtype(DType::F32)?
            .reshape((n, a.arm_dim()))?
            .to_vec2::<f32>()?;
        let gripper = match &out.gripper {
            Some(g) => Some(g.to_dtype(DType::F32)?.reshape(n)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut rows = Vec::with_capacity(n);
        for (k, mut row) in arm.into_iter().enumerate() {
            if let Some(g) = &gripper {
                row.push(if g[k] > 0.0 { 1.0 } else { 0.0 });
            }
            if let Some(norm) = a.norm {
                row.iter_mut().for_each(|v| *v = norm.denormalize(*v));
            }
            if row.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::NonFiniteAction {
                    step: k,
                    values: row,
                });
            }
            rows.push(row);
        }
        let [ix, iy, iz] = a.robot_indices;
        Ok(ActionChunk {
            actions: rows.iter().map(|r| [r[ix], r[iy], r[iz]]).collect(),
            raw: rows.first().cloned().unwrap_or_default(),
            dt: self.cfg.dt,
        })
    }
}

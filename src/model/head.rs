//! RoboVLMs' `LSTMDecoder` policy head: a multi-layer LSTM over the per-frame action-token features,
//! then `MLPTanhHead` for the continuous dims and (for imported RoboVLMs heads) an MLP producing gripper
//! logits. Weight names follow RoboVLMs under `act_head.`: `rnn.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}`,
//! `actions.mlp.{0,2,4,6}`, `gripper.mlp.{0,2,4,6}`.
//! Upstream: `robovlms/model/policy_head/base_policy.py` (`LSTMDecoder`, `MLPTanhHead`, `MLPSigmoidHead`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear, Linear, VarBuilder};

use crate::model::fused::{self, needs_grad};
use std::collections::VecDeque;

/// Shape of the head. `arm_dim` counts the continuous dims the tanh MLP predicts per chunk step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadConfig {
    pub in_features: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub fwd_pred_next_n: usize,
    pub window_size: usize,
    pub arm_dim: usize,
    pub gripper: bool,
    /// Hidden widths of the MLPs (RoboVLMs hard-codes 1024, 512, 256).
    pub mlp_hidden: [usize; 3],
}

/// `Linear → ReLU → Linear → ReLU → Linear → ReLU → Linear` (+ Tanh for the action head).
#[derive(Debug, Clone)]
struct Mlp {
    layers: [Linear; 4],
    tanh: bool,
}

impl Mlp {
    fn new(
        in_dim: usize,
        widths: [usize; 3],
        out_dim: usize,
        tanh: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("mlp");
        let [w0, w1, w2] = widths;
        Ok(Self {
            layers: [
                linear(in_dim, w0, vb.pp(0))?,
                linear(w0, w1, vb.pp(2))?,
                linear(w1, w2, vb.pp(4))?,
                linear(w2, out_dim, vb.pp(6))?,
            ],
            tanh,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [l0, l1, l2, l3] = &self.layers;
        let xs = relu(&xs.apply(l0)?)?.apply(l1)?;
        let xs = relu(&xs)?.apply(l2)?;
        let xs = relu(&xs)?.apply(l3)?;
        if self.tanh {
            xs.tanh()
        } else {
            Ok(xs)
        }
    }
}

/// PyTorch's `relu`, which keeps NaN: candle's (`max(x, 0)`) turns it into 0, and a model gone
/// non-finite upstream would then print finite actions instead of failing the policy's check.
fn relu(xs: &Tensor) -> Result<Tensor> {
    xs.ne(xs)?.where_cond(xs, &xs.relu()?)
}

/// One LSTM layer with PyTorch's gate order (i, f, g, o) and parameter names. Weights are kept as
/// loaded (no fused copies), so a `VarMap`-backed layer sees optimiser updates.
#[derive(Debug, Clone)]
struct LstmLayer {
    w_ih: Tensor, // (4H, in)
    w_hh: Tensor, // (4H, H)
    b_ih: Tensor, // (4H,)
    b_hh: Tensor, // (4H,)
    hidden: usize,
}

impl LstmLayer {
    fn new(in_dim: usize, hidden: usize, k: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            w_ih: vb.get((4 * hidden, in_dim), &format!("weight_ih_l{k}"))?,
            w_hh: vb.get((4 * hidden, hidden), &format!("weight_hh_l{k}"))?,
            b_ih: vb.get(4 * hidden, &format!("bias_ih_l{k}"))?,
            b_hh: vb.get(4 * hidden, &format!("bias_hh_l{k}"))?,
            hidden,
        })
    }

    /// xs: (B, T, in), state (h, c): (B, H) each, zeros when `None` → outputs (B, T, H) and the
    /// final state.
    fn forward(
        &self,
        xs: &Tensor,
        state: Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, d) = xs.dims3()?;
        let params = [xs, &self.w_ih, &self.w_hh, &self.b_ih, &self.b_hh];
        if state.is_none() && t > 0 && needs_grad(&params) && fused::applies(&params) {
            // Training from a zero state: one op with a backward through time of its own.
            let gates_x = fused::linear(xs, &self.w_ih, &self.b_ih)?;
            let out = fused::lstm_from_zero(&gates_x, &self.w_hh, &self.b_hh)?;
            let (hs, cs) = (
                out.narrow(2, 0, self.hidden)?,
                out.narrow(2, self.hidden, self.hidden)?,
            );
            let last = |x: &Tensor| x.narrow(1, t - 1, 1)?.squeeze(1);
            return Ok((hs.contiguous()?, (last(&hs)?, last(&cs)?)));
        }
        let state = match state {
            Some(s) => s,
            None => {
                let zeros = Tensor::zeros((b, self.hidden), xs.dtype(), xs.device())?;
                (zeros.clone(), zeros)
            }
        };
        // Input projections for all steps in one matmul; only the recurrent part is sequential.
        let gates_x = xs
            .reshape((b * t, d))?
            .matmul(&self.w_ih.t()?)?
            .broadcast_add(&self.b_ih)?
            .broadcast_add(&self.b_hh)?
            .reshape((b, t, 4 * self.hidden))?;
        // candle's CPU matmul widens both bf16 operands to f32 on every call (and its f16 kernel is
        // slower than f32); widen W_hh once per sequence instead and multiply in f32.
        let half = self.w_hh.dtype();
        let widen = matches!(half, DType::BF16 | DType::F16);
        let w_hh_t = if widen {
            self.w_hh.to_dtype(DType::F32)?.t()?
        } else {
            self.w_hh.t()?
        };
        let (mut h, mut c) = state;
        let mut outs = Vec::with_capacity(t);
        for step in 0..t {
            let rec = if widen {
                h.to_dtype(DType::F32)?.matmul(&w_hh_t)?.to_dtype(half)?
            } else {
                h.matmul(&w_hh_t)?
            };
            let gates = (gates_x.narrow(1, step, 1)?.squeeze(1)? + rec)?;
            let chunks = gates.chunk(4, D::Minus1)?;
            let i = candle_nn::ops::sigmoid(&chunks[0])?;
            let f = candle_nn::ops::sigmoid(&chunks[1])?;
            let g = chunks[2].tanh()?;
            let o = candle_nn::ops::sigmoid(&chunks[3])?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            outs.push(h.clone());
        }
        Ok((Tensor::stack(&outs, 1)?, (h, c)))
    }
}

/// LSTM state of all layers: `h`, `c` each (layers, B, H), as PyTorch's `(h_n, c_n)`.
#[derive(Debug, Clone)]
pub struct LstmState {
    pub h: Tensor,
    pub c: Tensor,
}

/// Head outputs, normalised (tanh range for actions; logits for the gripper).
#[derive(Debug, Clone)]
pub struct HeadOutput {
    /// (B, T, fwd_pred_next_n, arm_dim)
    pub actions: Tensor,
    /// (B, T, fwd_pred_next_n) gripper logits, when the head has a gripper.
    pub gripper: Option<Tensor>,
}

/// The LSTM policy head.
#[derive(Debug, Clone)]
pub struct LstmDecoder {
    cfg: HeadConfig,
    rnn: Vec<LstmLayer>,
    actions: Mlp,
    gripper: Option<Mlp>,
}

impl LstmDecoder {
    /// `vb` points at the head's root (`act_head`).
    pub fn new(cfg: HeadConfig, vb: VarBuilder) -> Result<Self> {
        let vb_rnn = vb.pp("rnn");
        let rnn = (0..cfg.num_layers)
            .map(|k| {
                let in_dim = if k == 0 {
                    cfg.in_features
                } else {
                    cfg.hidden_size
                };
                LstmLayer::new(in_dim, cfg.hidden_size, k, &vb_rnn)
            })
            .collect::<Result<Vec<_>>>()?;
        let n = cfg.fwd_pred_next_n;
        let (h, w) = (cfg.hidden_size, cfg.mlp_hidden);
        let actions = Mlp::new(h, w, n * cfg.arm_dim, true, vb.pp("actions"))?;
        let gripper = if cfg.gripper {
            Some(Mlp::new(h, w, n, false, vb.pp("gripper"))?)
        } else {
            None
        };
        Ok(Self {
            cfg,
            rnn,
            actions,
            gripper,
        })
    }

    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Runs the LSTM over `features` (B, T, in) from `state` (zeros when `None`) and applies the MLPs
    /// at every position. This is the training forward over a window.
    pub fn forward(
        &self,
        features: &Tensor,
        state: Option<&LstmState>,
    ) -> Result<(HeadOutput, LstmState)> {
        let (rnn_out, state) = self.run_rnn(features, state)?;
        Ok((self.mlp_heads(&rnn_out)?, state))
    }

    fn run_rnn(&self, features: &Tensor, state: Option<&LstmState>) -> Result<(Tensor, LstmState)> {
        let mut xs = features.clone();
        let (mut hs, mut cs) = (Vec::new(), Vec::new());
        for (k, layer) in self.rnn.iter().enumerate() {
            let init = match state {
                Some(s) => Some((s.h.get(k)?, s.c.get(k)?)),
                None => None,
            };
            let (out, (h, c)) = layer.forward(&xs, init)?;
            xs = out;
            hs.push(h);
            cs.push(c);
        }
        let state = LstmState {
            h: Tensor::stack(&hs, 0)?,
            c: Tensor::stack(&cs, 0)?,
        };
        Ok((xs, state))
    }

    /// rnn_out (B, T, H) → actions (B, T, n, arm_dim) and gripper logits (B, T, n); rows are chunk-major.
    fn mlp_heads(&self, rnn_out: &Tensor) -> Result<HeadOutput> {
        let (b, t, _) = rnn_out.dims3()?;
        let n = self.cfg.fwd_pred_next_n;
        let actions = self
            .actions
            .forward(rnn_out)?
            .reshape((b, t, n, self.cfg.arm_dim))?;
        let gripper = match &self.gripper {
            Some(g) => Some(g.forward(rnn_out)?.reshape((b, t, n))?),
            None => None,
        };
        Ok(HeadOutput { actions, gripper })
    }

    /// One inference step with RoboVLMs' history memory: while it holds at most `window_size`
    /// features the LSTM advances one step from the carried state; once a new feature would exceed
    /// the window, the oldest is dropped and the LSTM re-runs from a zero state over the last
    /// `window_size` features (and no state is carried from then on).
    /// `feature`: (1, in). Returns outputs for this step: actions (1, 1, n, arm_dim).
    pub fn step(&self, memory: &mut History, feature: &Tensor) -> Result<HeadOutput> {
        let feature = feature.unsqueeze(1)?; // (1, 1, in)
        memory.features.push_back(feature.clone());
        let rnn_out = if memory.features.len() <= self.cfg.window_size {
            let (out, state) = self.run_rnn(&feature, memory.state.as_ref())?;
            memory.state = Some(state);
            out
        } else {
            while memory.features.len() > self.cfg.window_size {
                memory.features.pop_front();
            }
            memory.state = None;
            let window = Tensor::cat(memory.features.make_contiguous(), 1)?;
            let (out, _) = self.run_rnn(&window, None)?;
            out.narrow(1, self.cfg.window_size - 1, 1)?
        };
        self.mlp_heads(&rnn_out)
    }

    /// Parameter count of the head.
    pub fn num_params(&self) -> usize {
        let lstm: usize = self
            .rnn
            .iter()
            .map(|l| {
                l.w_ih.elem_count()
                    + l.w_hh.elem_count()
                    + l.b_ih.elem_count()
                    + l.b_hh.elem_count()
            })
            .sum();
        let mlp = |m: &Mlp| -> usize {
            m.layers
                .iter()
                .map(|l| l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count()))
                .sum()
        };
        lstm + mlp(&self.actions) + self.gripper.as_ref().map_or(0, mlp)
    }
}

/// The inference history: past per-frame features and the carried LSTM state.
#[derive(Debug, Clone, Default)]
pub struct History {
    features: VecDeque<Tensor>,
    state: Option<LstmState>,
}

impl History {
    pub fn clear(&mut self) {
        self.features.clear();
        self.state = None;
    }

    /// Number of features held (at most `window_size`).
    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }
}

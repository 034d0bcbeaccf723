#!/usr/bin/env python3
"""PyTorch eager baseline for `benches/policy_step.rs` (run by it, one process per shape).

The same policy step as the candle bench: a preprocessed frame through transformers'
`Kosmos2ForConditionalGeneration` (random init of the given config) the way RoboVLMs uses it
(vision tower -> post_layernorm -> L2 normalise -> image_to_text_projection; text decoder over
`[<s>] + image embeds + prompt words + [ACT] + [</s>]`; last hidden state at [ACT]), then RoboVLMs'
LSTMDecoder + MLPTanhHead re-run over a full window of features, then de-normalisation. The text
decoder runs without the LM head, as in the candle bench (RoboVLMs also computes vocabulary logits,
which the policy never reads). Prints one JSON line with the keys of the Rust `CaseResult`.
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn
from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class LstmHead(nn.Module):
    """RoboVLMs' LSTMDecoder (no gripper) + MLPTanhHead."""

    def __init__(self, in_features, hidden, layers, mlp_hidden, out):
        super().__init__()
        self.rnn = nn.LSTM(in_features, hidden, layers, batch_first=True)
        w0, w1, w2 = mlp_hidden
        self.mlp = nn.Sequential(
            nn.Linear(hidden, w0), nn.ReLU(), nn.Linear(w0, w1), nn.ReLU(),
            nn.Linear(w1, w2), nn.ReLU(), nn.Linear(w2, out), nn.Tanh(),
        )

    def forward(self, window):
        out, _ = self.rnn(window)
        return self.mlp(out[:, -1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--fwd-pred-next-n", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=14)
    ap.add_argument("--lstm-hidden", type=int, default=1024)
    ap.add_argument("--lstm-layers", type=int, default=4)
    ap.add_argument("--mlp-hidden", type=int, nargs=3, default=[1024, 512, 256])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with open(args.config) as f:
        cfg = Kosmos2Config(**json.load(f))
    t0 = time.perf_counter()
    model = Kosmos2ForConditionalGeneration(cfg).eval()
    d = cfg.text_config.embed_dim
    head = LstmHead(d, args.lstm_hidden, args.lstm_layers, args.mlp_hidden, args.fwd_pred_next_n * 3).eval()
    act = torch.randn(d) * 0.02
    build_s = time.perf_counter() - t0
    # The policy never uses the LM head (tied to embed_tokens: no extra memory); count as candle does.
    params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters()) + d
    weights_bytes = 4 * params

    vocab = cfg.text_config.vocab_size
    ids = torch.tensor([[0] + [3 + (i * 7) % (vocab - 3) for i in range(args.prompt_words)] + [2]])
    s = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, s, s)
    window = [torch.randn(1, 1, d) for _ in range(args.window)]
    norm_min, norm_max = -1.15, 1.15
    text = model.text_model.model

    @torch.inference_mode()
    def step():
        t = time.perf_counter()
        vision = model.vision_model(pixel_values=pixels)
        feats = model.vision_model.model.post_layernorm(vision[0])
        feats = torch.nn.functional.normalize(feats, dim=-1)
        image, _ = model.image_to_text_projection(feats)
        words = text.embed_tokens(ids)
        seq = torch.cat([words[:, :1], image, words[:, 1:-1], act.view(1, 1, d), words[:, -1:]], dim=1)
        hidden = text(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], dtype=torch.long),
                      use_cache=False).last_hidden_state
        feature = hidden[:, -2:-1]
        window.pop(0)
        window.append(feature)
        actions = head(torch.cat(window, dim=1)).view(args.fwd_pred_next_n, 3)
        actions = 0.5 * (actions + 1) * (norm_max - norm_min) + norm_min
        actions.tolist()
        return time.perf_counter() - t

    step()  # warm-up
    times = [step() for _ in range(args.steps)]
    print(json.dumps({
        "framework": "torch",
        "shape": args.shape,
        "dtype": "f32",
        "params": params,
        "weights_bytes": weights_bytes,
        "build_s": build_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "steps": args.steps,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "parts_s": {},
    }))


if __name__ == "__main__":
    main()

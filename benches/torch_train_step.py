#!/usr/bin/env python3
"""PyTorch eager baseline for `benches/train_speed.rs` (run by it, one process per strategy).

The training step of test/fixtures/gen_train.py (the PyTorch reference the trainer's parity tests
compare against): the bench's model directory loaded into transformers'
`Kosmos2ForConditionalGeneration` + the reference LSTM head, `requires_grad` by RoboVLMs' rules (peft's
LoRA for 6.2), train mode (the backbone config's dropout, LoRA dropout), every window frame through
the VLM, masked Huber loss divided by the accumulation, `clip_grad_norm_`, `torch.optim.AdamW` at a
constant learning rate. Inputs are random tensors of the candle run's shapes, drawn per batch.
Prints one JSON line: samples/s at the median timed step (after the warm-up ones) and the peak RSS.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "fixtures"))
import gen_train  # noqa: E402
from torch_policy_step import peak_rss_bytes  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--strategy", choices=["full", "lora"], required=True)
    ap.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--accumulate", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--weight-decay", type=float, required=True)
    ap.add_argument("--clip", type=float, required=True)
    ap.add_argument("--lora", nargs=4, metavar=("R", "ALPHA", "DROPOUT", "BIAS"))
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model, head, token, pol, arm = gen_train.load_dir(args.model)
    model.train()
    head.train()
    if args.strategy == "full":
        setup = dict(freeze_backbone=False, train_decoder_layers=-1, train_vision=True, train_text_embedding=True)
    else:
        r, alpha, dropout, bias = args.lora
        setup = dict(gen_train.SEED_6_2, lora=dict(r=int(r), alpha=float(alpha), dropout=float(dropout), bias=bias))
    gen_train.trainable_params_setup(model, token, head, setup)
    params = [p for _, p in gen_train.named_trainable(model, token, head)]
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    ids = torch.tensor([int(i) for i in args.ids.split(",")])
    w, n = pol["window_size"], pol["fwd_pred_next_n"]
    size = model.config.vision_config.image_size

    def batch():
        mask = torch.ones(args.batch, w, n)
        mask[:, -1, 1:] = 0  # the last frame's chunk runs past the episode's end
        return {
            "pixel_values": torch.randn(args.batch, w, 3, size, size),
            "labels": torch.rand(args.batch, w, n, arm) * 2 - 1,
            "mask": mask,
            "gripper_labels": torch.zeros(args.batch, w, n),
        }

    def step():
        for _ in range(args.accumulate):
            b = batch()
            loss = gen_train.loss_fn(gen_train.forward(model, head, token, b, ids), b)
            (loss / args.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    secs = statistics.median(times)
    print(json.dumps({
        "framework": "torch",
        "strategy": args.strategy,
        "trainable": trainable,
        "samples_per_s": args.accumulate * args.batch / secs,
        "step_s": secs,
        "peak_rss": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()

"""`make demo`: the robot loop in simulation, recorded through ROS 2 exactly as on a robot.

    python scripts/demo.py [all]                  every step below, in order (what `make demo` runs;
                                                  several step names run those, in order)
    python scripts/demo.py record --episodes 120  sim_node + recorder_node + scripted expert -> out/demo/episodes
    python scripts/demo.py inspect                mobile_vla dataset validate + info on the episodes
    python scripts/demo.py finetune               model init + trainer_node's Finetune action -> out/demo/train
    python scripts/demo.py baselines              expert / zero / random rollouts on held-out seeds (+ MCAP)
    python scripts/demo.py drive                  policy_node drives the held-out seeds in real time
    python scripts/demo.py report                 out/demo/report.{md,json} + trajectories.png
    python scripts/demo.py study                  `make study` (not in `all`): a backbone pretrained on another
                                                  task, then full / last-N / LoRA / frozen fine-tuning of it,
                                                  each driven by policy_node -> out/demo/study/study.md

Every step starts the processes it needs (sim_node from sim/, the Rust nodes from MOBILE_VLA_BIN_DIR) on a
private loopback ROS domain and stops them; outputs go to out/demo/ (MOBILE_VLA_DEMO_OUT; logs in logs/). The success
of every episode is judged by the simulator from the base's pose, never by the driver.

One file (~640 lines) on purpose: every step, the study included, shares its process, recording, model-init
and evaluation helpers, and `python scripts/demo.py <step>` is the interface the README documents.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(os.environ.get("MOBILE_VLA_BIN_DIR", ROOT / "target/release"))  # make build-release
OUT = Path(os.environ.get("MOBILE_VLA_DEMO_OUT", ROOT / "out" / "demo"))
LOGS = OUT / "logs"
EPISODES = OUT / "episodes"
DOMAIN = int(os.environ.get("MOBILE_VLA_DEMO_DOMAIN", "187"))  # above the tests' 1..100
TASKS = ["1box_hori_left", "1box_hori_right", "red_box", "blue_box"]
HELD_OUT_SEED0 = 1000  # evaluation seeds start here; recording uses 0..N-1
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@contextmanager
def processes(*specs):
    """Starts (name, argv) processes on the demo's domain, logs to out/demo/logs/<name>.log; stops them
    with SIGINT on exit."""
    LOGS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ROS_DOMAIN_ID=str(DOMAIN), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    procs = []
    try:
        for name, argv in specs:
            log = open(LOGS / f"{name}.log", "w")
            procs.append((name, subprocess.Popen([str(a) for a in argv], env=env, stdout=log,
                                                 stderr=subprocess.STDOUT), log))
        yield
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for name, p, log in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                say(f"{name} did not stop on SIGINT: killed (log: {LOGS / (name + '.log')})")
            log.close()


def sim_argv(rtf: float, timeout_s: float, width: int = 128) -> tuple[str, list]:
    return ("sim_node", [sys.executable, "-m", "sim.node", "--ros-args", "-p", f"real_time_factor:={rtf}",
                         "-p", f"timeout_s:={timeout_s}", "-p", f"width:={width}", "-p", f"height:={width}"])


@contextmanager
def ros_node(name: str):
    import rclpy

    rclpy.init(domain_id=DOMAIN)
    node = rclpy.create_node(name)
    try:
        yield node
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(cmd) -> str:
    say("$ " + " ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


# ---------------------------------------------------------------- 1. record
def record(args) -> dict:
    """The expert drives sim_node through cmd_vel; recorder_node records image + instruction + cmd_vel in
    event mode (one frame per command change); a failed demonstration is discarded, not saved."""
    summary = record_episodes(args, TASKS, args.episodes, EPISODES)
    write_json(OUT / "record.json", summary)
    return summary


def record_episodes(args, tasks: list[str], count: int, dest: Path, seed0: int = 0) -> dict:
    """`count` expert episodes (the tasks in turn, seeds from `seed0`) recorded into `dest`. Consecutive tasks
    share a seed, so each family's two instructions (TASKS lists them side by side) are shown the same scene:
    with a scene per instruction, the policy could memorise where to go from the image alone."""
    from sim.client import RecorderClient, SimClient

    shutil.rmtree(dest, ignore_errors=True)
    say(f"== record: {count} expert episodes through recorder_node -> {dest}")
    t0 = time.monotonic()
    # One frame per key press, as the fork's keyboard collector (no frame for the release): each frame's
    # action is the key the expert pressed on seeing it.
    rec = ("recorder_node", [BIN / "recorder_node", "--ros-args", "-p", f"output_dir:={dest}",
                             "-p", "record_stops:=false"])
    kept, failed = [], []
    with processes(sim_argv(args.rtf, args.timeout), rec), ros_node("demo_teleop") as node:
        sim = SimClient(node)
        recorder = RecorderClient(sim)
        if not (sim.wait_ready(60) and recorder.wait_ready(30)):
            raise SystemExit(f"sim_node or recorder_node did not come up (logs: {LOGS})")
        for i in range(count):
            task, seed = tasks[i % len(tasks)], seed0 + i // min(2, len(tasks))
            name = f"episode_sim_{task}_s{seed:04d}"
            r, ok = recorder.record(task, seed, name)
            (kept if ok else failed).append(name)
            say(f"  {i + 1}/{count} {task} seed {seed}: {r.outcome['outcome']} in "
                f"{r.outcome['time_s']:.1f} s sim, {r.presses} presses -> {'saved' if ok else 'discarded'}")
    deadline = time.monotonic() + 15
    while len(list(dest.glob("*.h5"))) < len(kept) and time.monotonic() < deadline:
        time.sleep(0.1)
    files = sorted(dest.glob("*.h5"))
    summary = {"episodes_requested": count, "episodes_saved": len(files), "expert_failures": failed,
               "expert_success_rate": len(kept) / max(1, count), "wall_s": round(time.monotonic() - t0, 1),
               "real_time_factor": args.rtf}
    say(f"recorded {len(files)} episodes in {summary['wall_s']} s (expert success "
        f"{100 * summary['expert_success_rate']:.0f} %)")
    if len(files) != len(kept):
        raise SystemExit(f"recorder_node saved {len(files)} of {len(kept)} episodes (log: {LOGS / 'recorder_node.log'})")
    return summary


# ---------------------------------------------------------------- 2. inspect
def inspect(args) -> None:
    say("== inspect: mobile_vla dataset validate + info")
    print(run([BIN / "mobile_vla", "dataset", "validate", EPISODES]).rstrip())
    info = json.loads(run([BIN / "mobile_vla", "dataset", "info", "--json", EPISODES]))
    write_json(OUT / "dataset_info.json", info)
    first = sorted(EPISODES.glob("*.h5"))[0]
    run([BIN / "mobile_vla", "dataset", "export-mcap", first, "--out", OUT / "episode0.mcap"])
    say(f"dataset info -> {OUT / 'dataset_info.json'}; {first.name} as MCAP -> {OUT / 'episode0.mcap'}")


# ---------------------------------------------------------------- 3./5. staged: trainer_node, policy_node
MODEL_INIT = OUT / "model_init"
TRAIN_OUT = OUT / "train"
FIXTURE_BACKBONE = ROOT / "test/fixtures/policy/hf_robovlms7"
PROMPT = "An image of a robot"  # RoboVLMs' Kosmos prompt before the instruction (src/model/tokenizer.rs)
HEAD = ["--window-size", "2", "--fwd-pred-next-n", "2", "--action-dim", "3", "--hidden-size", "64",
        "--num-layers", "1", "--mlp-hidden", "64,64,32"]
TRAIN_CONFIG = ROOT / "config" / "demo_finetune.yaml"


def demo_backbone() -> Path:
    """The backbone `model init` starts from (`MOBILE_VLA_DEMO_BACKBONE` overrides; on a robot,
    kosmos-2-patch14-224). No pretrained Kosmos-2 can be downloaded here, so the project makes one in
    out/demo/backbone: its tiny Kosmos-2-shaped test fixture (seeded random weights, test/fixtures/gen_policy.py)
    with a tokenizer that has a piece for every word of the prompt and the simulator's instructions, as a real
    vocabulary would (the fixture's own spells "red" and "blue" letter by letter)."""
    if os.environ.get("MOBILE_VLA_DEMO_BACKBONE"):
        return Path(os.environ["MOBILE_VLA_DEMO_BACKBONE"])
    from sim.world import TASKS

    out = OUT / "backbone"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE_BACKBONE / name, out / name)
    tok = json.loads((FIXTURE_BACKBONE / "tokenizer.json").read_text())
    # Ids from len(vocab) on are Kosmos-2's added tokens (<image>, <grounding>, ...): the size stays.
    size, texts = len(tok["model"]["vocab"]), [PROMPT, *TASKS.values()]
    pieces = tok["model"]["vocab"][:4]  # <s> <pad> </s> <unk>
    pieces += [[w, -2.0] for w in dict.fromkeys("\u2581" + w for t in texts for w in t.split())]
    pieces += [["\u2581", -4.0]] + [[c, -8.0] for c in sorted(set("".join(texts)) - {" "})]
    if len(pieces) > size:
        raise SystemExit(f"the instructions need {len(pieces)} tokenizer pieces, the backbone has {size}")
    pieces += [[f"<unused{i}>", -100.0] for i in range(size - len(pieces))]
    tok["model"]["vocab"] = pieces
    write_json(out / "tokenizer.json", tok)
    return out


def pending(stage_file: str, what: str) -> None:
    say(f"   pending: {what}; stage skipped")
    write_json(OUT / stage_file, {"status": "pending", "missing": what})


def has_train_subcommand() -> bool:
    if not (BIN / "mobile_vla").exists():
        return False
    res = subprocess.run([str(BIN / "mobile_vla"), "train", "--help"], capture_output=True, text=True)
    return res.returncode == 0


def find_endpoint(sim, lister, type_name: str, timeout: float = 30.0, suffix: str = "") -> str | None:
    """The name of the action/service of `type_name` (ending in `suffix`) on the graph."""
    found = []
    sim.spin_until(lambda: found.extend(n for n, types in lister(sim.node)
                                        if type_name in types and n.endswith(suffix)) or found, timeout)
    return found[0] if found else None


def call_trigger(sim, name: str) -> None:
    from std_srvs.srv import Trigger

    client = sim.node.create_client(Trigger, name)
    if client.wait_for_service(timeout_sec=5):
        fut = client.call_async(Trigger.Request())
        sim.spin_until(fut.done, 10)
    sim.node.destroy_client(client)


def model_init(out: Path) -> None:
    """`model init` on the demo's backbone with the demo's head."""
    shutil.rmtree(out, ignore_errors=True)
    run([BIN / "mobile_vla", "model", "init", "--hf-model", demo_backbone(), "--out", out, *HEAD])
    # Train-mode dropout follows the backbone config; on this tiny random backbone its noise swamps the
    # differences between inputs (as tests/train_loop.rs found), so the demo turns it off.
    cfg_path = out / "config.json"
    hf = json.loads(cfg_path.read_text())
    hf["text_config"].update({k: 0.0 for k in ("dropout", "attention_dropout", "activation_dropout")})
    write_json(cfg_path, hf)


def finetune(args) -> None:
    """`model init` makes the starting model directory; trainer_node fine-tunes it on the recorded
    episodes through its Finetune action, printing the feedback."""
    from rclpy.action import ActionClient, get_action_names_and_types

    from sim.client import SimClient

    say("== finetune: trainer_node's Finetune action on the recorded episodes")
    missing = ([] if (BIN / "trainer_node").exists() else ["trainer_node"]) + \
        ([] if has_train_subcommand() else ["`mobile_vla train`"])
    if missing:
        return pending("finetune.json", f"{' and '.join(missing)} not built yet (the fine-tuning and nodes issues)")
    from mobile_vla.action import Finetune

    shutil.rmtree(TRAIN_OUT, ignore_errors=True)
    model_init(MODEL_INIT)
    config = TRAIN_CONFIG.read_text()
    if args.train_steps:  # shortened runs (CI): the same config, fewer optimiser steps
        config = re.sub(r"max_steps: *\d+", f"max_steps: {args.train_steps}", config)
    t0 = time.monotonic()
    with processes(("trainer_node", [BIN / "trainer_node"])), ros_node("demo_finetune") as node:
        sim = SimClient(node)
        name = find_endpoint(sim, get_action_names_and_types, "mobile_vla/action/Finetune")
        if not name:
            raise SystemExit(f"trainer_node offers no Finetune action (log: {LOGS / 'trainer_node.log'})")
        client = ActionClient(node, Finetune, name)
        client.wait_for_server(timeout_sec=30)
        goal = Finetune.Goal(dataset_dir=str(EPISODES), config=config if args.train_steps else str(TRAIN_CONFIG),
                             output_dir=str(TRAIN_OUT), init_model_dir=str(MODEL_INIT))
        shown = {"at": 0.0, "feedback": 0}

        def feedback(m) -> None:
            # The node repeats its last feedback every second; print every 5 s (and each new phase).
            f = m.feedback
            shown["feedback"] += 1
            if time.monotonic() - shown["at"] >= 5 or f.phase != shown.get("phase"):
                shown.update(at=time.monotonic(), phase=f.phase)
                say(f"   {f.phase} epoch {f.epoch}/{f.epochs} step {f.step}/{f.total_steps} loss {f.loss:.4f} "
                    f"lr {f.learning_rate:.2e} ETA {f.eta_s:.0f} s")

        sent = client.send_goal_async(goal, feedback_callback=feedback)
        sim.spin_until(sent.done, 30)
        if not sent.done() or not sent.result().accepted:
            raise SystemExit("trainer_node rejected the Finetune goal")
        done = sent.result().get_result_async()
        sim.spin_until(done.done, 3600)
        result = done.result().result
    if not result.success:
        raise SystemExit(f"fine-tuning failed: {result.message}")
    lines = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    steps = [m for m in lines if "loss" in m and "step" in m]
    start = next((m for m in lines if m.get("event") == "start"), {})
    if (TRAIN_OUT / "loss.png").exists():
        shutil.copy(TRAIN_OUT / "loss.png", OUT / "loss.png")
    summary = {"status": "done", "model_dir": result.model_dir, "final_loss": result.final_loss,
               "best_val_loss": result.best_val_loss, "metrics": result.metrics_path,
               "steps": steps[-1]["step"] if steps else 0,
               "samples_per_s": round(steps[-1]["samples_per_s"], 1) if steps else None,
               "train_windows": start.get("train_windows"), "trainable_params": start.get("trainable_params"),
               "feedback_messages": shown["feedback"], "wall_s": round(time.monotonic() - t0, 1)}
    write_json(OUT / "finetune.json", summary)
    say(f"   model -> {result.model_dir} (final loss {result.final_loss:.4f}, {summary['steps']} steps at "
        f"{summary['samples_per_s']} samples/s, {summary['wall_s']} s)")


def policy_node(model_dir, mode: str) -> tuple[str, list]:
    # The simulated base follows its command at once, as the keyboard expert's did: acceleration limits
    # well above its 0.5 m/s steps; velocity limits and the dead zone stay at the robot defaults.
    params = {"model_dir": model_dir, "autostart": "true", "use_sim_time": "true",
              "execution_mode": mode, "max_acc_x": "10.0", "max_acc_y": "10.0", "max_acc_wz": "10.0"}
    return "policy_node", [BIN / "policy_node", "--ros-args", *[a for k, v in params.items() for a in ("-p", f"{k}:={v}")]]


def drive(args) -> None:
    """policy_node (camera + instruction in, cmd_vel out) drives sim_node on the held-out seeds, in real
    time; the simulator judges every episode, as for the baselines."""
    from sim.policies import External

    say("== drive: policy_node drives sim_node on held-out seeds")
    done = json.loads((OUT / "finetune.json").read_text()) if (OUT / "finetune.json").exists() else {}
    if not (BIN / "policy_node").exists():
        return pending("drive.json", "policy_node not built yet (the nodes issue)")
    if done.get("status") != "done":
        return pending("drive.json", "no fine-tuned model (the finetune stage has not run)")
    stats = evaluate(args, {"policy": External}, rtf=1.0, extra=[policy_node(done["model_dir"], args.mode)],
                     watch_cmd=True)
    lat = sorted(stats["inference_ms"])
    write_json(OUT / "drive.json", {"status": "done", "execution_mode": args.mode,
                                    "inference_ms_median": lat[len(lat) // 2] if lat else None,
                                    "inference_ms_max": lat[-1] if lat else None})


# ---------------------------------------------------------------- 4. baselines
def baselines(args) -> None:
    """Expert, zero and random drivers on held-out seeds."""
    from sim.policies import POLICIES

    evaluate(args, POLICIES, rtf=args.eval_rtf)


def evaluate(args, policies: dict, rtf: float, extra=(), watch_cmd: bool = False, out: Path = OUT) -> dict:
    """Each policy on every task x held-out seed; the simulator judges each episode. A policy's rollouts
    go to out/demo/rollouts/<name>.json (outcomes, tracks) and <name>.mcap (camera, cmd_vel, pose,
    instruction, episodes, outcomes; with policy_node also its action chunks). Returns policy_node's
    inference times from /diagnostics when it drives."""
    import numpy as np

    from sim.client import SimClient
    from sim.mcap_log import McapLog

    seeds = [HELD_OUT_SEED0 + i for i in range(args.per_task)]
    say(f"== evaluate {' / '.join(policies)}: {len(TASKS)} tasks x seeds {seeds[0]}..{seeds[-1]}")
    with processes(sim_argv(rtf, args.timeout), *extra), ros_node("demo_eval") as node:
        sim = SimClient(node, images=True, watch_cmd=watch_cmd)
        if not sim.wait_ready(60):
            raise SystemExit(f"sim_node did not come up (log: {LOGS / 'sim_node.log'})")
        reset_policy = find_endpoint(sim, lambda n: n.get_service_names_and_types(), "std_srvs/srv/Trigger", 5,
                                     "/policy_node/reset") \
            if watch_cmd else None
        inference_ms = []
        if watch_cmd:
            from diagnostic_msgs.msg import DiagnosticArray

            def on_diagnostics(m) -> None:
                for st in m.status:
                    v = {kv.key: kv.value for kv in st.values}.get("last_inference_ms")
                    if v and float(v) > 0:
                        inference_ms.append(float(v))

            node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
        for name, make in policies.items():
            t0 = time.monotonic()
            sim.log = McapLog(out / "rollouts" / f"{name}.mcap")
            rollouts = []
            for task in TASKS:
                for seed in seeds:
                    layout = sim.reset(task, seed)
                    if reset_policy:  # a new episode: policy_node forgets the last one's history
                        call_trigger(sim, reset_policy)
                    policy = make(layout, np.random.default_rng([seed, TASKS.index(task)])) \
                        if name == "random" else make(layout)
                    r = sim.drive(policy)
                    rollouts.append(r.to_json())
                    say(f"  {name:6s} {task:15s} seed {seed}: {r.outcome['outcome']} ({r.outcome['time_s']:.1f} s)")
            sim.log.close()
            sim.log = None
            wins = sum(r["outcome"] == "success" for r in rollouts)
            write_json(out / "rollouts" / f"{name}.json",
                       {"policy": name, "wall_s": round(time.monotonic() - t0, 1), "rollouts": rollouts})
            say(f"  {name}: {wins}/{len(rollouts)} succeeded; rollouts -> {out / 'rollouts' / name}.{{json,mcap}}")
    return {"inference_ms": inference_ms}


# ---------------------------------------------------------------- 6. report
def success_summary(rollouts: list[dict]) -> dict:
    """Success rate over a driver's rollouts, per task, and the count of each outcome."""
    per_task = {}
    for r in rollouts:
        per_task.setdefault(r["task"], []).append(r["outcome"])
    all_out = [o for outs in per_task.values() for o in outs]
    return {
        "success_rate": sum(o == "success" for o in all_out) / len(all_out),
        "episodes": len(all_out),
        "per_task": {t: sum(o == "success" for o in outs) / len(outs) for t, outs in per_task.items()},
        "outcomes": {o: all_out.count(o) for o in sorted(set(all_out))},
    }


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    say("== report")
    runs = {}
    for path in sorted((OUT / "rollouts").glob("*.json")):
        data = json.loads(path.read_text())
        runs[data["policy"]] = data
    order = [p for p in ("policy", "expert", "zero", "random") if p in runs]
    table = {name: success_summary(runs[name]["rollouts"]) for name in order}
    fps = [r["render_fps"] for n in order for r in runs[n]["rollouts"] if r.get("render_fps")]
    rec = json.loads((OUT / "record.json").read_text()) if (OUT / "record.json").exists() else {}
    info = json.loads((OUT / "dataset_info.json").read_text()) if (OUT / "dataset_info.json").exists() else None
    stages = {f: json.loads((OUT / f"{f}.json").read_text()) for f in ("finetune", "drive") if (OUT / f"{f}.json").exists()}
    pending = list(stages.values())
    ft, dr = stages.get("finetune", {}), stages.get("drive", {})
    summary = {"success": table, "recording": rec, "render_fps": round(sum(fps) / len(fps), 1) if fps else None,
               "pending": [p for p in pending if p.get("status") == "pending"],
               "finetune": ft if ft.get("status") == "done" else None,
               "drive": dr if dr.get("status") == "done" else None,
               "dataset_frames": info["total_frames"] if info else None,
               "step_wall_s": json.loads((OUT / "timing.json").read_text()) if (OUT / "timing.json").exists() else {}}
    write_json(OUT / "report.json", summary)

    # Top view: one panel per (task family, policy), every rollout's track coloured by its outcome.
    colours = {"success": "tab:green", "collision": "tab:red", "timeout": "tab:gray",
               "wrong_side": "tab:orange", "wrong_target": "tab:purple"}
    families = [("1box", "around the box, left/right"), ("color", "red / blue box")]
    fig, axes = plt.subplots(len(families), len(order), figsize=(4 * len(order), 6.5), squeeze=False)
    for col, name in enumerate(order):
        for row, (fam, title) in enumerate(families):
            ax = axes[row][col]
            for r in runs[name]["rollouts"]:
                if r["task"].startswith("1box") != (fam == "1box"):
                    continue
                lay = r["layout"]
                for b in lay["boxes"]:
                    fc = {"red": "red", "blue": "blue"}.get(b["name"], "saddlebrown")
                    ax.add_patch(Rectangle((b["x"] - b["hx"], b["y"] - b["hy"]), 2 * b["hx"], 2 * b["hy"],
                                           color=fc, alpha=0.12, lw=0))
                if lay["cup"]:
                    ax.add_patch(Circle(lay["cup"], 0.06, color="green", alpha=0.3))
                track = [(p[1], p[2]) for p in r["track"]]
                if track:
                    xs, ys = zip(*track)
                    ax.plot(xs, ys, color=colours[r["outcome"]], lw=1.2, alpha=0.8)
                    ax.plot(xs[:1], ys[:1], "o", color=colours[r["outcome"]], ms=3)
            x0, x1, y0, y1 = runs[name]["rollouts"][0]["layout"]["arena"]
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_aspect("equal")
            rate = [r["outcome"] == "success" for r in runs[name]["rollouts"] if r["task"].startswith("1box") == (fam == "1box")]
            ax.set_title(f"{name}: {title}\n{sum(rate)}/{len(rate)} success", fontsize=9)
    handles = [plt.Line2D([], [], color=c, label=o) for o, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(colours), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(OUT / "trajectories.png", dpi=90)
    plt.close(fig)

    lines = ["# mobile_vla simulated demo", "",
             "Success rates on held-out seeds, judged by the simulator from the base pose.", "",
             "| driver | success | " + " | ".join(TASKS) + " | outcomes |", "|---|---|" + "---|" * len(TASKS) + "---|"]
    for name in order:
        t = table[name]
        cells = [f"{100 * t['per_task'].get(task, 0):.0f} %" for task in TASKS]
        outs = ", ".join(f"{o} {n}" for o, n in t["outcomes"].items())
        lines.append(f"| {name} | **{100 * t['success_rate']:.0f} %** ({t['episodes']}) | " + " | ".join(cells) + f" | {outs} |")
    lines.append("")
    if rec:
        lines.append(f"Recording: {rec['episodes_saved']} expert episodes saved through recorder_node (expert success "
                     f"while recording {100 * rec['expert_success_rate']:.0f} %) in {rec['wall_s']} s at "
                     f"{rec['real_time_factor']}x real time, {summary['dataset_frames']} frames.")
    if summary["finetune"]:
        lines.append(f"Fine-tuning through trainer_node's Finetune action: {ft['steps']} optimiser steps on "
                     f"{ft['train_windows']} training windows, {ft['trainable_params']} trainable parameters, "
                     f"{ft['samples_per_s']} samples/s, {ft['wall_s']} s; final loss {ft['final_loss']:.4f}, best "
                     f"validation loss {ft['best_val_loss']:.4f} (loss curve: loss.png).")
    if summary["drive"] and dr.get("inference_ms_median") is not None:
        lines.append(f"policy_node (`{dr['execution_mode']}` mode) inference: median {dr['inference_ms_median']:.1f} ms, "
                     f"max {dr['inference_ms_max']:.1f} ms per step.")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in summary["step_wall_s"].items())
    lines += [f"Camera render rate (MuJoCo, osmesa on the CPU): {summary['render_fps']} fps.",
              f"Wall time per step (2-core machine): {steps}." if steps else "", "",
              "Pending stages:" if summary["pending"] else ""]
    lines += [f"- {p['missing']}" for p in summary["pending"]]
    lines += ["", "![trajectories](trajectories.png)", ""]
    (OUT / "report.md").write_text("\n".join(lines))
    print("\n".join(line for line in lines if not line.startswith("![")).rstrip())
    say(f"report -> {OUT}/report.md, report.json, trajectories.png")


# ---------------------------------------------------------------- 7. study (`make study`; not in `all`)
STUDY = OUT / "study"
STRATEGIES = {"full": "full fine-tuning (SEED 6.1)", "last-n": "last text layer of 2 + head",
              "lora": "LoRA on the frozen backbone (SEED 6.2)", "head": "frozen backbone: [ACT] + head"}
PRETRAIN_TASKS = ["go_to_cup"]
PRETRAIN_SEED0 = 5000


def study(args) -> None:
    """The seed's strategies on this loop: a backbone first trained on another task (`go_to_cup`, as a
    robot's VLM comes pretrained on other data), then each strategy fine-tunes it on the same demo
    episodes for the same steps, and policy_node drives the same held-out seeds with each result."""
    import yaml

    from sim.policies import External

    say("== study: full fine-tuning vs last-N layers vs LoRA (6.2) vs frozen backbone")
    STUDY.mkdir(parents=True, exist_ok=True)
    pre_episodes = STUDY / "pretrain_episodes"
    if len(list(pre_episodes.glob("*.h5"))) < args.pretrain_episodes:
        record_episodes(args, PRETRAIN_TASKS, args.pretrain_episodes, pre_episodes, PRETRAIN_SEED0)
    if len(list(EPISODES.glob("*.h5"))) < args.episodes:
        record(args)
    # One config for every run: the demo's, plus the last-N depth and SEED 6.2's LoRA (low_memory.yaml's r,
    # alpha, dropout); `--strategy` picks what trains.
    cfg = yaml.safe_load(TRAIN_CONFIG.read_text())
    lora = yaml.safe_load((ROOT / "config" / "low_memory.yaml").read_text())["train_setup"]
    cfg["train_setup"].update(train_decoder_layers=1, lora_enable=True,
                              **{k: lora[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_bias")})
    config = STUDY / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    model_init(STUDY / "model_init")
    pre = train_run(config, pre_episodes, STUDY / "model_init", STUDY / "pretrain", args.pretrain_steps, "full")
    rows = {"pretrain": pre}
    for strategy in STRATEGIES:
        row = train_run(config, EPISODES, Path(pre["model_dir"]), STUDY / strategy, args.study_steps, strategy)
        evaluate(args, {strategy: External}, rtf=1.0, extra=[policy_node(row["model_dir"], args.mode)],
                 watch_cmd=True, out=STUDY)
        row.update(success_summary(json.loads((STUDY / "rollouts" / f"{strategy}.json").read_text())["rollouts"]))
        rows[strategy] = row
        write_json(STUDY / "study.json", rows)
    lines = ["| strategy | trains | trainable params | success | " + " | ".join(TASKS) +
             " | peak RSS | training time | samples/s | best val loss |",
             "|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|"]
    for strategy, what in STRATEGIES.items():
        r = rows[strategy]
        cells = " | ".join(f"{100 * r['per_task'].get(t, 0):.0f} %" for t in TASKS)
        lines.append(f"| `{strategy}` | {what} | {r['trainable_params']} | **{100 * r['success_rate']:.0f} %** | "
                     f"{cells} | {r['peak_rss_mib']:.0f} MiB | {r['wall_s']:.0f} s | {r['samples_per_s']:.1f} | "
                     f"{r['best_val_loss']:.4f} |")
    lines += ["", f"Pretraining: {args.pretrain_episodes} `go_to_cup` episodes, {args.pretrain_steps} steps of full "
              f"fine-tuning from the random backbone ({pre['wall_s']:.0f} s); then {args.study_steps} steps per "
              f"strategy on {len(list(EPISODES.glob('*.h5')))} demo episodes; {len(TASKS)} tasks x {args.per_task} "
              "held-out seeds driven by policy_node."]
    (STUDY / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    say(f"study -> {STUDY}/study.md, study.json")


def train_run(config: Path, data: Path, model: Path, out: Path, steps: int, strategy: str) -> dict:
    """`mobile_vla train` as a child process (its peak RSS is its own, from wait4), progress every 10 s."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [BIN / "mobile_vla", "train", "--config", config, "--data", data, "--model", model, "--out", out,
           "--max-steps", steps, "--strategy", strategy, "--progress", "json"]
    say("$ " + " ".join(str(c) for c in cmd))
    t0, shown, done = time.monotonic(), 0.0, {}
    with open(LOGS / f"train_{out.name}.log", "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=log, text=True)
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("event") == "done":
                done = event
            elif event.get("event") == "progress" and event.get("loss") is not None and time.monotonic() - shown >= 10:
                shown = time.monotonic()
                say(f"   {strategy}: step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
                    f"ETA {event.get('eta_s') or 0:.0f} s")
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not done:
        raise SystemExit(f"training ({strategy}) failed (log: {LOGS / f'train_{out.name}.log'})")
    metrics = [json.loads(m) for m in (out / "metrics.jsonl").read_text().splitlines() if m.strip()]
    start = next(m for m in metrics if m.get("event") == "start")
    last = [m for m in metrics if "samples_per_s" in m][-1]
    return {"model_dir": done["model_dir"], "wall_s": round(time.monotonic() - t0, 1),
            "peak_rss_mib": usage.ru_maxrss / 1024, "samples_per_s": last["samples_per_s"],
            "trainable_params": start["trainable_params"], "best_val_loss": done["best_val_loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["all", "record", "inspect", "finetune", "baselines", "drive", "report", "study"]
    # No argparse choices: with nargs="*", Python checks the default list itself against them and fails.
    ap.add_argument("step", nargs="*", default=["all"], help=f"one or more of {', '.join(names)}")
    ap.add_argument("--episodes", type=int, default=int(os.environ.get("MOBILE_VLA_DEMO_EPISODES", 120)),
                    help="expert demonstrations to record (tasks in turn)")
    ap.add_argument("--per-task", type=int, default=int(os.environ.get("MOBILE_VLA_DEMO_EVAL_SEEDS", 6)),
                    help="held-out seeds per task for the evaluations")
    ap.add_argument("--rtf", type=float, default=2.0, help="sim real-time factor while recording")
    ap.add_argument("--eval-rtf", type=float, default=4.0, help="sim real-time factor for the baselines")
    ap.add_argument("--timeout", type=float, default=15.0, help="episode time limit [s of sim time]")
    ap.add_argument("--train-steps", type=int, default=int(os.environ.get("MOBILE_VLA_DEMO_TRAIN_STEPS", 0)),
                    help="optimiser steps (0 = config/demo_finetune.yaml's max_steps)")
    ap.add_argument("--pretrain-episodes", type=int, default=80, help="study: go_to_cup episodes to pretrain on")
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="study: optimiser steps of pretraining")
    ap.add_argument("--study-steps", type=int, default=4000, help="study: optimiser steps per strategy (the demo's)")
    ap.add_argument("--mode", default="chunk", choices=["first", "chunk", "ensemble"],
                    help="policy_node's execution_mode while driving")
    args = ap.parse_args()
    unknown = [s for s in args.step if s not in names]
    if unknown:
        ap.error(f"unknown step {', '.join(unknown)} (choose from {', '.join(names)})")
    OUT.mkdir(parents=True, exist_ok=True)
    steps = {"record": record, "inspect": inspect, "finetune": finetune, "baselines": baselines,
             "drive": drive, "report": report, "study": study}
    everything = "all" in args.step
    todo = [s for s in steps if s != "study"] if everything else args.step
    timing_path = OUT / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() and not everything else {}
    for step in todo:
        t0 = time.monotonic()
        steps[step](args)
        timing[step] = round(time.monotonic() - t0, 1)
        write_json(timing_path, timing)
    say(f"demo {'done' if everything else ' + '.join(todo) + ' done'}: outputs in {OUT}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark against TRL: reward.py and ppo.py vs TRL's RewardTrainer and PPOTrainer (issue 15).

The same model, data, batch, length, precision and thread count on both sides. A script, not a
test; TRL is not a project requirement.

TRL goes into throw-away virtualenvs (its RewardTrainer from a recent release; PPOTrainer, removed
from recent releases, from the last one that has it — 1.12.0 ships it as trl.experimental.ppo;
1.13.0 to 1.16.0 do not):
    python3 -m venv /tmp/trl-venv-1.16.0 &&
        /tmp/trl-venv-1.16.0/bin/pip install torch==2.13.0 trl==1.16.0
    python3 -m venv /tmp/trl-venv-1.12.0 &&
        /tmp/trl-venv-1.12.0/bin/pip install torch==2.13.0 trl==1.12.0
    python -m bench.against_trl --trl-python /tmp/trl-venv-1.16.0/bin/python \\
        --trl-ppo-python /tmp/trl-venv-1.12.0/bin/python
With `--before-code DIR` (a checkout of this project from before packing:
`git worktree add --detach DIR 3d60a11^1`) ppo.py as it was then is a third PPO contender, so
"before" and "after" are measured in the same run.
The numbers go to bench/benchmarks_trl.json; bench/stages.py renders them in BENCHMARKS.md
("Against TRL").

The workload (written once under --workdir by this project's code):
  model   a 3.5M-parameter Llama (hidden 256, MLP 768, 4 layers, 8 heads, the testbed's 736-token
          BPE tokenizer), random weights, saved with save_pretrained: the RM / critic (one-output
          AutoModelForSequenceClassification, a fresh head) and the policy / reference
          (AutoModelForCausalLM)
  pairs   prompts of the testbed's preference pairs with chosen / rejected responses made of several
          of the testbed's responses joined, to a log-normal length (mean ≈ 56 tokens, the longest
          of a batch ≈ 150, --max-len 256): the spread of real preference data (HH-RLHF, TL;DR),
          where half of a padded batch is padding. Every tool gets the same token ids (data.encode:
          prompt + response + EOS); batches in the same (file) order
  PPO     --ppo-prompts testbed prompts x 4 rollouts, --ppo-new-tokens new tokens, 1 epoch,
          1 mini-batch; sampling at T 0.8 with top-p 1 and no repetition penalty (what TRL's
          PPOTrainer does), cut at EOS
Each measurement is a fresh child process (this project's venv for ours, the TRL venv for TRL) that
times --rm-steps steps / --ppo-iterations iterations after a warm-up (PPO: also each part of the
iteration — generation, the experience forwards with the advantages, the update, the rest; TRL: its
generation and the rest); the children alternate (ours, TRL, ours, TRL, ...) --repeats times, so a
ratio compares runs made under the same machine load. Torch threads: --threads in every child.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


# --------------------------------------------------------------------------------------------------
# The workload (this project's venv)
# --------------------------------------------------------------------------------------------------
def make_workload(workdir: str, seed: int, n_pairs: int, max_len: int) -> dict:
    from plumbing import data
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench import stages as bench

    folder = bench.make_testbed(workdir, "tiny", seed)
    model_dir = os.path.join(workdir, "llama3.5m")
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "base_model"))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                             max_position_embeddings=512, tie_word_embeddings=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=None)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    rng = random.Random(seed)
    source = data.read_jsonl(os.path.join(folder, "data", "pairs_train.jsonl"))
    responses = [p[k] for p in source for k in ("chosen", "rejected")]

    def response(target: int) -> str:  # testbed responses joined up to about `target` tokens
        text = ""
        while len(tok(text, add_special_tokens=False).input_ids) < target:
            text += rng.choice(responses)
        return text

    pairs = []
    for p in rng.sample(source, n_pairs):
        lengths = [min(max_len - 24, max(4, int(rng.lognormvariate(3.5, 0.55)))) for _ in range(2)]
        pairs.append({"prompt": p["prompt"], "chosen": response(lengths[0]),
                      "rejected": response(lengths[1])})
    ids = [{k: data.encode(tok, p["prompt"], p[k], max_len)[0] for k in ("chosen", "rejected")}
           for p in pairs]
    prompts = rng.sample([r["prompt"] for r in
                          data.read_jsonl(os.path.join(folder, "data", "rl_prompts.jsonl"))], 64)
    work = {"model": model_dir, "pairs": pairs, "ids": ids, "prompts": prompts,
            "prompt_ids": [data.prompt_ids(tok, p) for p in prompts]}
    with open(os.path.join(workdir, "workload.json"), "w") as f:
        json.dump(work, f)
    return work


def batch_stats(work: dict, batch: int) -> dict:
    """Real and padded tokens per step of `batch` pairs (the padded batch is
    2·batch rows x the longest)."""
    real, padded, longest = [], [], []
    for i in range(0, len(work["ids"]) - batch + 1, batch):
        lens = [len(r[k]) for r in work["ids"][i: i + batch] for k in ("chosen", "rejected")]
        real.append(sum(lens))
        padded.append(len(lens) * max(lens))
        longest.append(max(lens))
    return {"real_tokens_per_step": statistics.mean(real),
            "padding_share": 1 - sum(real) / sum(padded),
            "mean_len": sum(real) / (2 * batch * len(real)),
            "longest_mean": statistics.mean(longest)}


# --------------------------------------------------------------------------------------------------
# Children: one measurement each; they print one line "RESULT {json}"
# --------------------------------------------------------------------------------------------------
def child_rm_ours(work: dict, a: argparse.Namespace, packed: bool) -> list[float]:
    """reward.py's inner loop, as the stage runs it: tokenise the micro-batch, (pack,) forward,
    Eq. (1), backward, clip, AdamW."""
    from plumbing import common
    from plumbing import distributed
    from plumbing import packing
    import reward

    model, tok = load_reward_model(reward)(work["model"], 1, torch.device("cpu"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.95), weight_decay=0.0)
    bf16, times, pairs = a.dtype == "bf16", [], work["pairs"]
    for step in range(a.warmup + a.rm_steps):
        part = pairs[(step * a.batch) % len(pairs):][: a.batch]
        t0 = time.perf_counter()
        with common.autocast(torch.device("cpu"), bf16):
            if packed:
                seqs, _ = reward.pair_sequences(tok, part, a.max_len)
                r = reward.packed_rewards(model, packing.pack(seqs, tok.pad_token_id)).float()
            else:
                ids, mask, _ = reward.pair_batch(tok, part, a.max_len)
                r = reward.rewards(model, ids, mask).float()
        reward.bradley_terry_loss(r[: len(part)], r[len(part):]).backward()
        distributed.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[a.warmup:]


def child_rm_trl(work: dict, a: argparse.Namespace) -> list[float]:
    """TRL's RewardTrainer on the same token ids, batches in file order (a sequential sampler), no
    evaluation, logging or saving; step times from a callback."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    n = (a.warmup + a.rm_steps) * a.batch
    rows = [work["ids"][i % len(work["ids"])] for i in range(n)]
    ds = Dataset.from_list([{"chosen_ids": r["chosen"], "rejected_ids": r["rejected"]}
                            for r in rows])
    tok = AutoTokenizer.from_pretrained(work["model"])
    model = AutoModelForSequenceClassification.from_pretrained(work["model"], num_labels=1,
                                                               dtype=torch.float32,
                                                               pad_token_id=tok.pad_token_id)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            stamps.append(time.perf_counter())

        def on_train_end(self, *args, **kw):
            stamps.append(time.perf_counter())

    class InOrder(RewardTrainer):
        def _get_train_sampler(self, *args, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    config = RewardConfig(output_dir=os.path.join(a.workdir, "trl_rm_out"),
                          per_device_train_batch_size=a.batch, max_length=a.max_len,
                          learning_rate=5e-6, max_grad_norm=1.0, num_train_epochs=1,
                          bf16=a.dtype == "bf16", use_cpu=True, logging_steps=10**6,
                          save_strategy="no", report_to=[], dataloader_num_workers=0,
                          adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
                          disable_tqdm=True, seed=0)
    trainer = InOrder(model=model, args=config, train_dataset=ds, processing_class=tok,
                      callbacks=[Stamp()])
    torch.set_num_threads(a.threads)
    trainer.train()
    times = [b - s for s, b in zip(stamps, stamps[1:])]
    return times[a.warmup:]


# The parts of a PPO iteration, in order: sampling (step 1), the experience forwards and the
# advantages (steps 2-5), the update (step 6), everything else (the iteration's metrics; for TRL:
# all that is not generation).
PPO_PARTS = ("generation", "experience", "update", "other")


def ppo_prompts(work: dict, a: argparse.Namespace) -> list[str]:
    return [p for p in work["prompts"][: a.ppo_prompts] for _ in range(4)]


def child_ppo_ours(work: dict, a: argparse.Namespace
                   ) -> tuple[list[float], dict[str, list[float]], list]:
    """ppo.py's iteration as its loop runs it: rollout, make_experience, compute_advantages,
    ppo_update, the iteration's metrics (decoded texts, gold reward). Returns the iteration times,
    each part's times and the (prompt, response) token counts of the last iteration's rollouts."""
    import ppo
    import reward
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu")
    policy = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    rm, tok = load_reward_model(reward)(work["model"], 1, device)
    critic, _ = load_reward_model(reward)(work["model"], 1, device)
    for m in (policy, ref, rm, critic):
        m.eval()
    ref.requires_grad_(False)
    rm.requires_grad_(False)
    n = 4 * a.ppo_prompts
    args = ppo.Args(rollouts_per_prompt=4, prompts_per_iteration=a.ppo_prompts, mini_batch_size=n,
                    micro_batch_size=n, generation_batch_size=n, max_new_tokens=a.ppo_new_tokens,
                    ppo_epochs=1, temperature=0.8, top_p=1.0, repetition_penalty=1.0,
                    bf16=a.dtype == "bf16")
    popt = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    copt = torch.optim.AdamW(critic.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0)
    gen, times = torch.Generator().manual_seed(0), []
    parts: dict[str, list[float]] = {k: [] for k in PPO_PARTS}
    for it in range(a.warmup + a.ppo_iterations):
        t = [time.perf_counter()]
        batch = ppo.rollout(policy, tok, ppo_prompts(work, a), args, 1, device)
        t.append(time.perf_counter())
        exp = ppo.make_experience(policy, ref, rm, critic, batch, args, 1)
        ppo.compute_advantages(exp, batch, args, 1)
        t.append(time.perf_counter())
        ppo.ppo_update(policy, critic, popt, copt, batch, exp, args, 1, gen)
        t.append(time.perf_counter())
        ppo.rollout_metrics(batch, exp, ppo.response_texts(batch, tok), 1)
        t.append(time.perf_counter())
        if it >= a.warmup:
            times.append(t[-1] - t[0])
            for k, t0, t1 in zip(PPO_PARTS, t, t[1:]):
                parts[k].append(t1 - t0)
    # the last iteration's rollouts, for the FLOP count: (prompt tokens, response tokens) of each
    lengths = list(zip(batch.attention_mask[:, :batch.prompt_len].sum(1).tolist(),
                       batch.response_mask.sum(1).tolist()))
    return times, parts, lengths


def child_ppo_trl(work: dict, a: argparse.Namespace
                  ) -> tuple[list[float], dict[str, list[float]], None]:
    """TRL's PPOTrainer (the last release that has it): the same four models, prompts, sampling
    temperature, response length, batch (one mini-batch of all rollouts, 1 epoch), EOS as the stop
    token; no sample generations, logging or saving. Step times from a callback."""
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    # seconds in TRL's batch_generation, per iteration (it is called once per iteration)
    generation: list[float] = []
    batch_generation = ppo_trainer.batch_generation

    def timed_generation(*args, **kw):
        t0 = time.perf_counter()
        out = batch_generation(*args, **kw)
        generation.append(time.perf_counter() - t0)
        return out

    ppo_trainer.batch_generation = timed_generation
    tok = AutoTokenizer.from_pretrained(work["model"])
    load_lm = lambda: AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    load_rm = lambda: AutoModelForSequenceClassification.from_pretrained(
        work["model"], num_labels=1, dtype=torch.float32, pad_token_id=tok.pad_token_id)
    n = 4 * a.ppo_prompts
    ids = [work["prompt_ids"][i] for i in range(a.ppo_prompts) for _ in range(4)]
    ds = Dataset.from_list([{"input_ids": q} for q in ids])
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kw):
            stamps.append(time.perf_counter())

        def on_train_begin(self, *args, **kw):
            stamps.append(time.perf_counter())

    config = PPOConfig(output_dir=os.path.join(a.workdir, "trl_ppo_out"),
                       per_device_train_batch_size=n, gradient_accumulation_steps=1,
                       num_mini_batches=1, num_ppo_epochs=1,
                       total_episodes=n * (a.warmup + a.ppo_iterations),
                       local_rollout_forward_batch_size=n, response_length=a.ppo_new_tokens,
                       temperature=0.8, stop_token="eos", learning_rate=1e-6,
                       num_sample_generations=0, bf16=a.dtype == "bf16", use_cpu=True,
                       logging_steps=10**6, save_strategy="no", report_to=[],
                       dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = PPOTrainer(args=config, processing_class=tok, model=load_lm(), ref_model=load_lm(),
                         reward_model=load_rm(), value_model=load_rm(), train_dataset=ds,
                         callbacks=[Stamp()])
    torch.set_num_threads(a.threads)
    trainer.train()
    times = [b - s for s, b in zip(stamps, stamps[1:])][a.warmup:]
    gen = generation[a.warmup:]
    return times, {"generation": gen, "other": [t - g for t, g in zip(times, gen)]}, None


def load_reward_model(reward):
    """The RM loader of the code under test: in plumbing now; in reward.py in older checkouts
    (--before-code)."""
    if hasattr(reward, "load_reward_model"):
        return reward.load_reward_model
    from plumbing.distributed import load_reward_model as load

    return load


def child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    # another checkout of this project (--before-code): its ppo.py / reward.py are imported
    if a.code_dir:
        sys.path.insert(0, os.path.abspath(a.code_dir))
    with open(os.path.join(a.workdir, "workload.json")) as f:
        work = json.load(f)
    fn = {"rm_ours": lambda: child_rm_ours(work, a, True),
          "rm_ours_padded": lambda: child_rm_ours(work, a, False),
          "rm_trl": lambda: child_rm_trl(work, a), "ppo_ours": lambda: child_ppo_ours(work, a),
          "ppo_trl": lambda: child_ppo_trl(work, a)}[a.child]
    out = fn()
    # the RM children: times only
    times, parts, lengths = out if isinstance(out, tuple) else (out, {}, None)
    print("RESULT " + json.dumps({"times": times, "parts": parts, "lengths": lengths,
                                  "threads": torch.get_num_threads()}), flush=True)


# --------------------------------------------------------------------------------------------------
# Driver (this project's venv): alternate the children, collect the ratios
# --------------------------------------------------------------------------------------------------
def run_child(python: str, name: str, dtype: str, a: argparse.Namespace,
              code_dir: str = "") -> dict:
    cmd = [python, os.path.abspath(__file__), "--child", name, "--dtype", dtype,
           "--workdir", a.workdir, "--threads", str(a.threads), "--warmup", str(a.warmup),
           "--rm-steps", str(a.rm_steps), "--batch", str(a.batch), "--max-len", str(a.max_len),
           "--ppo-iterations", str(a.ppo_iterations), "--ppo-prompts", str(a.ppo_prompts),
           "--ppo-new-tokens", str(a.ppo_new_tokens), "--code-dir", code_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{name} {dtype} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-5000:]}")
    out = json.loads(line[len("RESULT "):])
    med = statistics.median(out["times"])
    label = name + (" (before)" if code_dir else "")
    print(f"  {label:24s} {dtype}  median {med:.4f} s  ({len(out['times'])} timed, "
          f"child {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    return {"median_s": med, "times": out["times"], "lengths": out.get("lengths"),
            "parts": {k: statistics.median(v) for k, v in out.get("parts", {}).items() if v}}


def ppo_flops(model_dir: str, lengths: list[list[int]]) -> dict[str, float]:
    """FLOPs of one ppo.py iteration on these rollouts ((prompt, response) tokens each), counted on
    real tokens (bench.real_flops): experience = policy and reference (trunk + LM head at the
    response positions) + RM and critic (trunk; their heads are 1 x d); update = forward +
    backward (3 x) of policy and critic; generation = prefill + cached decode
    (bench.generation_flops). What the iteration costs at the matmul peak is a floor."""
    from bench import stages as bench
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    s = bench.shape(model)                                   # N counts the LM head
    V, d = model.config.vocab_size, model.config.hidden_size
    trunk = bench.real_flops(dict(s, N=s["N"] - V * d), [q + r for q, r in lengths])
    head = 2 * V * d * sum(r for _, r in lengths)
    return {"experience": 2 * (trunk + head) + 2 * trunk, "update": 3 * (trunk + head) + 3 * trunk,
            "generation": bench.generation_flops(s, len(lengths), max(q for q, _ in lengths),
                                                 max(r for _, r in lengths)),
            "rollouts": len(lengths), "tokens": sum(q + r for q, r in lengths)}


def trl_version(python: str) -> str:
    return subprocess.run([python, "-c", "import trl, transformers, torch; "
                           "print(trl.__version__, transformers.__version__, torch.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def driver(a: argparse.Namespace) -> None:
    os.makedirs(a.workdir, exist_ok=True)
    sys.path.insert(0, ROOT)
    t_start = time.time()
    work = make_workload(a.workdir, a.seed, (a.warmup + a.rm_steps) * a.batch, a.max_len)
    stats = batch_stats(work, a.batch)
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
           "threads": a.threads, "args": vars(a), "workload": stats, "runs": {}, "versions": {}}
    plans = []
    if "rm" in a.parts:
        res["versions"]["rm"] = trl_version(a.trl_python)
        plans.append(("rm", [("ours", sys.executable, "rm_ours", ""),
                             ("trl", a.trl_python, "rm_trl", ""),
                             ("ours_padded", sys.executable, "rm_ours_padded", "")]))
    if "ppo" in a.parts:
        res["versions"]["ppo"] = trl_version(a.trl_ppo_python)
        ppo_contenders = [("ours", sys.executable, "ppo_ours", ""),
                          ("trl", a.trl_ppo_python, "ppo_trl", "")]
        # ppo.py as it was before packing, from another checkout, alternating with the others
        if a.before_code:
            res["before_commit"] = subprocess.run(["git", "-C", a.before_code, "log", "-1",
                                                   "--format=%h %cs"],
                                                  capture_output=True, text=True).stdout.strip()
            ppo_contenders.append(("ours_before", sys.executable, "ppo_ours", a.before_code))
        plans.append(("ppo", ppo_contenders))
    print(f"workload: {json.dumps(stats)}; TRL {res['versions']}", flush=True)
    for part, contenders in plans:
        for dtype in a.dtypes.split(","):
            runs = res["runs"].setdefault(f"{part}/{dtype}",
                                          {name: [] for name, _, _, _ in contenders})
            for rep in range(a.repeats):  # alternate: ours, TRL, ours, TRL, ...
                for name, python, child_name, code_dir in contenders:
                    runs[name].append(run_child(python, child_name, dtype, a, code_dir))
            for name in runs:
                if name != "trl":
                    ratios = [t["median_s"] / o["median_s"]
                              for o, t in zip(runs[name], runs["trl"])]
                    res.setdefault("ratios", {})[f"{part}/{dtype}/{name}"] = ratios
                    print(f"{part} {dtype}: TRL time / {name} time per repeat: "
                          + ", ".join(f"{r:.2f}" for r in ratios), flush=True)
    ours = (res["runs"].get("ppo/fp32", {}).get("ours")
            or res["runs"].get("ppo/bf16", {}).get("ours"))
    if ours and ours[0].get("lengths"):
        res["ppo_flops"] = ppo_flops(work["model"], ours[0]["lengths"])
    res["load_after"] = os.getloadavg()
    res["wall_s"] = time.time() - t_start
    with open(a.out_json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.out_json} ({res['wall_s']:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", default="/tmp/trl-venv-1.16.0/bin/python",
                   help="python of a venv with trl (RM)")
    p.add_argument("--trl-ppo-python", default="/tmp/trl-venv-1.12.0/bin/python",
                   help="python of a venv with a trl that has PPOTrainer")
    p.add_argument("--parts", default="rm,ppo")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each contender")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps / iterations in every child")
    p.add_argument("--rm-steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="pairs per RM step")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--ppo-iterations", type=int, default=4)
    p.add_argument("--ppo-prompts", type=int, default=4,
                   help="prompts per PPO iteration (x 4 rollouts)")
    p.add_argument("--ppo-new-tokens", type=int, default=64)
    p.add_argument("--workdir", default="runs/bench_trl")
    p.add_argument("--out-json", default="bench/benchmarks_trl.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before-code", default="",
                   help="a checkout of this project from before packing (e.g. "
                        "`git worktree add --detach /tmp/before 3d60a11^1`): its ppo.py is timed "
                        "as a third PPO contender, 'ppo.py before'")
    p.add_argument("--child", default="", help="internal: run one measurement")
    p.add_argument("--code-dir", default="",
                   help="internal: the checkout whose modules the child imports")
    p.add_argument("--dtype", default="fp32", help="internal: the child's precision")
    a = p.parse_args()
    child(a) if a.child else driver(a)


if __name__ == "__main__":
    main()

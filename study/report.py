"""The study's report: a finished pipeline folder -> results.json, report.md and figures,
with intervals over seeds.

Per seed it reads what the stages wrote (evaluate.py's judgments and results, ppo.py's held-out
curve lines, meta_rm.py's mechanism lines, best_of_n.py's curve) and reduces each (arm, seed) to a
few numbers; across seeds every number gets its mean and exact bootstrap interval
(stats.bootstrap_ci), every arm its paired difference to vanilla PPO on the same seed
(stats.paired_difference), and every comparison one verdict line (stats.verdict).

    python -m study.report runs/pipeline  # (re)write the report of a finished or partly
                                            finished study

What the numbers are
  gold (greedy)      mean gold reward of the final policy's greedy responses to the held-out
                     prompts (evaluate.py)
  win / tie / lose   per prompt, gold judge with evaluate.py's margin; vs SFT, and vs vanilla PPO
                     of the same seed
  curve              ppo.py's held-out evaluation every few iterations: gold and RM score of
                     sampled responses and √KL(π‖π_SFT); "SFT" is its iteration 0, "peak" the best
                     point of the curve after a 3-point moving average (a raw maximum of noisy
                     points is biased upwards), "final" the average of the last 3 points,
                     "drop" = peak − final
  on-policy          along the same curve: the RM's agreement with the gold order on pairs of the
                     policy's own samples for one prompt (ppo.py's eval_onpolicy_acc), and the
                     spread of RM score and gold among those samples; "SFT" at iteration 0,
                     "final" the last 3 points
  gold at √KL = d    the curve's gold interpolated at a fixed distance from SFT, so arms that move
                     the policy by different amounts are compared at the same KL
  RM accuracy        agreement with the labels and with the gold order on the test pairs (ID, OOD)
  mechanism          meta_rm.py's mechanism_stats averaged over the logged steps of a round
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

import evaluate
from plumbing.figures import pyplot
from study import stats
from study.arms import CONTROLS, META_ARMS, ROUND_ARMS, metarm_eta, policy_key, rm_key

MARGIN = 0.01  # evaluate.py's default tie margin for the gold judge
SMOOTH = 3     # points of the moving average on the held-out curves
MATCHED_SQRT_KL = (0.5, 1.0, 1.5, 2.0)  # the distances at which curves are compared


def _arm_round(key: str) -> tuple[str, str]:
    """("metarm", "3") for "metarm_r3"; (key, "") for a key without rounds ("vanilla", "dpo")."""
    arm, _, r = key.partition("_r")
    return (arm, r) if r.isdigit() else (key, "")


def label(key: str) -> str:
    """A row label for the report: 'metarm_r2' -> 'MetaRM r2', 'eta0_r1' -> 'η = 0 r1', ..."""
    names = {"vanilla": "vanilla PPO", "metarm": "MetaRM", "eta0": "η = 0 control",
             "oracle": "oracle (fresh labels)", "dpo": "DPO", "sft": "SFT",
             "random": "random-direction control", "sftS": "J-on-SFT-samples control",
             "oracleM": "oracle, one label per meta sample"}
    if key.startswith("sweep_eta"):
        return f"MetaRM r1, η = {key[len('sweep_eta'):]}"
    arm, r = _arm_round(key)
    return f"{names.get(arm, arm)} r{r}" if r else names.get(arm, arm)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# One seed: the numbers of every policy and RM
# --------------------------------------------------------------------------------------------------
def smoothed(values: list[float], width: int = SMOOTH) -> list[float]:
    """Moving average over `width` consecutive points (fewer at the start):
    point i averages i−width+1 … i."""
    return [sum(values[max(0, i - width + 1): i + 1]) / (i + 1 - max(0, i - width + 1))
            for i in range(len(values))]


def curve_numbers(lines: list[dict]) -> dict[str, Any]:
    """The held-out curve of one PPO run -> its points and SFT / peak / final / drop
    (see the module docstring)."""
    pts = sorted((m for m in lines if "eval_kl" in m), key=lambda m: m["iteration"])
    gold = [m.get("eval_gold", float("nan")) for m in pts]
    smooth = smoothed(gold)
    k = max(range(len(smooth)), key=lambda i: smooth[i])
    final = sum(gold[-SMOOTH:]) / len(gold[-SMOOTH:])
    sqrt_kl = [m["eval_sqrt_kl"] for m in pts]
    onpolicy = {}
    for name in ("onpolicy_acc", "reward_spread", "gold_spread"):
        series = [m.get(f"eval_{name}", float("nan")) for m in pts]
        if any(f"eval_{name}" in m for m in pts):
            tail = [v for v in series[-SMOOTH:] if not math.isnan(v)]
            onpolicy.update({name: series, f"{name}_sft": series[0],
                             f"{name}_final": sum(tail) / len(tail) if tail else float("nan")})
    return {**onpolicy, "iteration": [m["iteration"] for m in pts], "gold": gold,
            "score": [m["eval_score"] for m in pts], "sqrt_kl": [m["eval_sqrt_kl"] for m in pts],
            "sft_gold": gold[0], "peak_gold": smooth[k],
            "peak_iteration": pts[k]["iteration"], "final_gold": final, "drop": smooth[k] - final,
            "helps": smooth[k] - gold[0], "half_helps": (smooth[k] - gold[0]) / 2,
            "final_sqrt_kl": pts[-1]["eval_sqrt_kl"],
            "score_rise_after_peak": pts[-1]["eval_score"] - pts[k]["eval_score"],
            **{f"gold_at_{d:g}": gold_at(sqrt_kl, gold, d) for d in MATCHED_SQRT_KL}}


def gold_at(sqrt_kl: list[float], gold: list[float], d: float) -> float | None:
    """Gold where the curve first reaches √KL = d, linearly interpolated between the two points
    around it; None when the run never gets that far."""
    for i in range(1, len(sqrt_kl)):
        lo, hi = sqrt_kl[i - 1], sqrt_kl[i]
        if lo <= d <= hi and hi > lo:
            return gold[i - 1] + (gold[i] - gold[i - 1]) * (d - lo) / (hi - lo)
    return None


def seed_numbers(out: str, seed: int, keys: list[str]) -> dict[str, Any]:
    """Everything report.py needs from seed<seed>/, for the policies `keys`
    (those whose evaluation exists)."""
    root = os.path.join(out, f"seed{seed}")
    res: dict[str, Any] = {"policies": {}, "rms": {}, "mechanism": {}}
    gold_by_prompt: dict[str, list[float]] = {}
    for key in keys:
        folder = os.path.join(root, "eval", key)
        if not os.path.exists(os.path.join(folder, "results.json")):
            continue
        judgments = _read_jsonl(os.path.join(folder, "judgments.jsonl"))
        gold_by_prompt[key] = [j["score_a"] for j in judgments]
        gold_by_prompt["sft"] = [j["score_b"] for j in judgments]
        w = _read_json(os.path.join(folder, "results.json"))["win_tie_lose"]
        entry = {"gold": sum(gold_by_prompt[key]) / len(judgments),
                 "vs_sft": {k: w[f"{k}_pct"] for k in ("win", "tie", "lose")}}
        ppo_dir = policy_dir(root, key)
        if ppo_dir and os.path.exists(os.path.join(ppo_dir, "metrics.jsonl")):
            lines = _read_jsonl(os.path.join(ppo_dir, "metrics.jsonl"))
            if any("eval_kl" in m for m in lines):
                entry["curve"] = curve_numbers(lines)
        res["policies"][key] = entry
    if "sft" in gold_by_prompt:
        res["sft_gold"] = sum(gold_by_prompt["sft"]) / len(gold_by_prompt["sft"])
    # Table 2 shape: against vanilla PPO of the same seed, per prompt
    for key, entry in res["policies"].items():
        if "vanilla" in gold_by_prompt and key != "vanilla":
            outcomes = [j["outcome"]
                        for j in evaluate.judge_by_scores(gold_by_prompt[key],
                                                          gold_by_prompt["vanilla"], MARGIN)]
            w = evaluate.win_tie_lose(outcomes)
            entry["vs_vanilla"] = {k: w[f"{k}_pct"] for k in ("win", "tie", "lose")}
    # one evaluate.py folder per RM (eval/rm/<key>); a study run before that had one for all
    rm_folders = [os.path.join(root, "eval", "rms")]
    if os.path.isdir(os.path.join(root, "eval", "rm")):
        rm_folders += [os.path.join(root, "eval", "rm", k)
                       for k in sorted(os.listdir(os.path.join(root, "eval", "rm")))]
    for rm_file in [os.path.join(f, "results.json") for f in rm_folders]:
        if not os.path.exists(rm_file):
            continue
        for name, r in _read_json(rm_file).get("reward_models", {}).items():
            # no gaps without a meta set (a vanilla-only study)
            ood, gaps = r["ood_test"], r.get("gaps", {})
            res["rms"][name] = {"acc": r["test"]["acc"], "acc_gold": r["test"].get("acc_gold"),
                                "ood_acc": ood["acc"],
                                "ood_acc_gold": ood.get("ood_acc_gold", ood.get("acc_gold")),
                                "gap_mean": gaps.get("gap_mean"),
                                "gaps_below_0.2": gaps.get("normalised_below_0.2"),
                                "J": gaps.get("J")}
    for key in keys:
        metrics = (os.path.join(root, *rm_dir_parts(key), "metrics.jsonl") if rm_dir_parts(key)
                   else None)
        if metrics and os.path.exists(metrics):
            logged = [m for m in _read_jsonl(metrics) if "cos_grad" in m]
            if logged:
                res["mechanism"][key] = {k: sum(m[k] for m in logged) / len(logged)
                                         for k in MECHANISM}
    bon = os.path.join(root, "best_of_n", "results.json")
    if os.path.exists(bon):
        res["best_of_n"] = _read_json(bon)
    return res


MECHANISM = ("J", "J_adapted", "J_std", "J_std_adapted", "reward_std_S", "reward_std_D",
             "cos_grad", "step_norm")


def policy_dir(root: str, key: str) -> str | None:
    """The PPO output folder of a policy key (None for DPO, which has no held-out curve)."""
    if key == "vanilla":
        return os.path.join(root, "vanilla", "ppo")
    if key.startswith("sweep_"):
        return os.path.join(root, "sweep", key[len("sweep_"):], "ppo")
    arm, r = _arm_round(key)
    return os.path.join(root, arm, f"round{r}", "ppo") if r else None


def rm_dir_parts(key: str) -> list[str] | None:
    """Path parts of the meta_rm.py folder behind a policy key (MetaRM rounds and sweep points),
    else None."""
    if key.startswith("sweep_"):
        return ["sweep", key[len("sweep_"):], "rm"]
    arm, r = _arm_round(key)
    return [arm, f"round{r}", "rm"] if arm in META_ARMS and r else None


# --------------------------------------------------------------------------------------------------
# Across seeds
# --------------------------------------------------------------------------------------------------
def interval(values: dict[int, float]) -> dict[str, float] | None:
    """{mean, low, high, n} of the finite values over seeds (None when there are none)."""
    values = _finite(values)
    if not values:
        return None
    mean, low, high = stats.bootstrap_ci(list(values.values()))
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def per_seed(seeds: dict[int, dict], *path: str) -> dict[int, float]:
    """The value at `path` in every seed's numbers (seeds that lack it are left out)."""
    out = {}
    for s, numbers in seeds.items():
        v: Any = numbers
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
            if v is None:
                break
        if v is not None:
            out[s] = v
    return out


def aggregate(seeds: dict[int, dict], keys: list[str]) -> dict[str, Any]:
    """Means and intervals over seeds of every number; paired differences vs vanilla; verdicts."""
    agg: dict[str, Any] = {"policies": {}, "rms": {}, "mechanism": {}, "verdicts": []}
    agg["sft_gold"] = interval(per_seed(seeds, "sft_gold"))
    for key in keys:
        entry: dict[str, Any] = {"gold": interval(per_seed(seeds, "policies", key, "gold"))}
        if entry["gold"] is None:
            continue
        for vs in ("vs_sft", "vs_vanilla"):
            entry[vs] = {k: interval(per_seed(seeds, "policies", key, vs, k))
                         for k in ("win", "tie", "lose")}
        for k in ("sft_gold", "peak_gold", "final_gold", "drop", "helps", "final_sqrt_kl",
                  "score_rise_after_peak", "peak_iteration", "onpolicy_acc_sft",
                  "onpolicy_acc_final", "reward_spread_sft", "reward_spread_final",
                  "gold_spread_final", *[f"gold_at_{d:g}" for d in MATCHED_SQRT_KL]):
            entry[k] = interval(per_seed(seeds, "policies", key, "curve", k))
        if key != "vanilla":
            for k, path in (("gold", ("gold",)), ("final_gold_sampled", ("curve", "final_gold")),
                            ("peak_gold_sampled", ("curve", "peak_gold"))):
                a, b = (per_seed(seeds, "policies", key, *path),
                        per_seed(seeds, "policies", "vanilla", *path))
                if set(a) & set(b):
                    entry[f"{k}_minus_vanilla"] = stats.paired_difference(a, b)
        agg["policies"][key] = entry
    for name in sorted({n for s in seeds.values() for n in s["rms"]}, key=_order):
        agg["rms"][name] = {k: interval(per_seed(seeds, "rms", name, k))
                            for k in ("acc", "acc_gold", "ood_acc", "ood_acc_gold", "gap_mean",
                                      "gaps_below_0.2", "J")}
    for key in sorted({k for s in seeds.values() for k in s["mechanism"]}, key=_order):
        agg["mechanism"][key] = {k: interval(per_seed(seeds, "mechanism", key, k))
                                 for k in MECHANISM}
    agg["verdicts"] = verdicts(agg, seeds)
    return agg


def _order(key: str) -> tuple:
    arm, _ = _arm_round(key)
    order = ["vanilla", "metarm", "eta0", "random", "sftS", "oracle", "oracleM", "dpo"]
    return (order.index(arm) if arm in order else len(order), key)


# the held-out sampled gold at the end of PPO (ppo.py's curve, 100 prompts x 4 samples): criterion (c)'s
# measure, reported beside the greedy verdicts because greedy decoding of a policy that has drifted can
# degenerate (on the second world single greedy golds range from -6 to +4 around SFT's 2.8)
SAMPLED_GOLD = ("curve", "final_gold")


def verdicts(agg: dict[str, Any], seeds: dict[int, dict], path: tuple[str, ...] = ("gold",)) -> list[str]:
    """One line per comparison of the policies' number at `path` (default: greedy gold), paired by
    seed: every arm vs vanilla PPO, then MetaRM vs the η = 0 control, the other controls, the oracle
    round by round and DPO, and each η-sweep point vs the η = 0 control (compared_with)."""
    keys = list(agg["policies"])
    pairs = ([(k, "vanilla") for k in keys if k != "vanilla"]
             + [(k, other) for k in keys for other in compared_with(k)])
    lines = []
    for key, other in pairs:
        a, b = (_finite(per_seed(seeds, "policies", key, *path)),
                _finite(per_seed(seeds, "policies", other, *path)))
        if set(a) & set(b):
            lines.append(stats.verdict(f"{label(key)} − {label(other)}",
                                       stats.paired_difference(a, b), "gold"))
    return lines


def _finite(values: dict[int, Any]) -> dict[int, float]:
    """The seeds whose value is a finite number (a missing, NaN or infinite value is left out)."""
    return {s: v for s, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def compared_with(key: str) -> tuple[str, ...]:
    """The policies a policy is compared with besides vanilla PPO: MetaRM round r with each control
    of round r (η = 0, random direction, J on SFT samples, the matched oracle), the oracle of round
    r and DPO (the paper's Table 2 comparison); an η-sweep point (round 1) with the η = 0 control,
    since both train RM₀ one more epoch over D and only η differs."""
    if key.startswith("metarm_r"):
        r = key[len("metarm_r"):]
        return (*[f"{c}_r{r}" for c in CONTROLS], f"oracle_r{r}", "dpo")
    if key.startswith("sweep_eta"):
        return ("eta0_r1",)
    return ()


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def mean_curve(seeds: dict[int, dict], key: str) -> dict[str, list] | None:
    """The seed-mean held-out curve of a policy, point by point, with the bootstrap band
    of gold and score."""
    curves = [s["policies"][key]["curve"] for s in seeds.values()
              if "curve" in s["policies"].get(key, {})]
    if not curves:
        return None
    n = min(len(c["iteration"]) for c in curves)
    out: dict[str, list] = {"iteration": curves[0]["iteration"][:n]}
    extra = [k for k in ("onpolicy_acc", "reward_spread") if all(k in c for c in curves)]
    for k in ("sqrt_kl", "gold", "score", *extra):
        cis = [stats.bootstrap_ci([c[k][i] for c in curves]) for i in range(n)]
        out[k], out[k + "_low"], out[k + "_high"] = ([c[0] for c in cis], [c[1] for c in cis],
                                                     [c[2] for c in cis])
    return out


def gao_fit(d: list[float], gain: list[float]) -> dict[str, float] | None:
    """Least squares of Gao et al.'s RL form R(d) = d (α − β log d) on points d > 0
    (gain = gold − gold at d = 0): linear in (α, β) with regressors d and −d log d."""
    rows = [(x, -x * math.log(x), y) for x, y in zip(d, gain) if x > 1e-9]
    if len(rows) < 3:
        return None
    import numpy as np

    A = np.array([[a, b] for a, b, _ in rows])
    y = np.array([c for _, _, c in rows])
    (alpha, beta), *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"alpha": float(alpha), "beta": float(beta),
            "d_peak": float(math.exp(alpha / beta - 1)) if beta > 0 else float("inf")}


def curve_panels(out: str, name: str, curves: dict[str, dict],
                 panels: list[tuple[str, str, str]]) -> str:
    """figures/<name>.png: one panel per (series, y label, title) of `panels`, each the seed-mean
    curves (mean_curve) against √KL with their 95 % band; returns the relative path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    # one colour per arm, one line style per round (r1 dotted, r2 dashed, r3 and one-off curves
    # solid): with more than ten curves the default colour cycle would give two curves one colour
    arms = list(dict.fromkeys(_arm_round(key)[0] for key in curves))
    for key, c in curves.items():
        arm, r = _arm_round(key)
        style = dict(color=f"C{arms.index(arm) % 10}", linestyle={"1": ":", "2": "--"}.get(r, "-"))
        for ax, (y, _, _) in zip(axes, panels):
            ax.plot(c["sqrt_kl"], c[y], marker=".", label=label(key), **style)
            ax.fill_between(c["sqrt_kl"], c[y + "_low"], c[y + "_high"], alpha=0.15,
                            color=style["color"])
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set(xlabel="√KL(π ‖ π_SFT)  (nats^½)", ylabel=ylabel, title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "figures", f"{name}.png"), dpi=110)
    plt.close(fig)
    return f"figures/{name}.png"


def draw_figures(out: str, seeds: dict[int, dict], keys: list[str], sweep: list[float],
                 metarm_eta: float | None = None) -> dict[str, str]:
    """figures/gold_vs_sqrt_kl.png (gold and proxy against √KL, seed bands), figures/best_of_n.png,
    figures/eta_sweep.png (with a sweep). Returns {name: relative path}."""
    plt = pyplot()
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    figures = {}
    curves = {k: c for k in keys if not k.startswith("sweep_") and (c := mean_curve(seeds, k))}
    if curves:
        figures["gold_vs_sqrt_kl"] = curve_panels(out, "gold_vs_sqrt_kl", curves, [
            ("gold", "gold reward (held-out, sampled)",
             f"gold vs √KL, mean of {len(seeds)} seeds, 95% band"),
            ("score", "proxy RM score (its own units)", "the proxy the policy optimised")])
    onpolicy = {k: c for k, c in curves.items() if "onpolicy_acc" in c}
    if onpolicy:
        figures["onpolicy_accuracy"] = curve_panels(out, "onpolicy_accuracy", onpolicy, [
            ("onpolicy_acc", "RM agrees with gold on the policy's own pairs",
             f"on-policy RM accuracy, mean of {len(seeds)} seeds"),
            ("reward_spread", "std of RM score among k samples",
             "reward spread among one prompt's samples")])
    bons = [s["best_of_n"] for s in seeds.values() if "best_of_n" in s]
    if bons:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ns = bons[0]["n"]
        for y, name in (("gold", "gold"), ("proxy", "proxy (RM₀)")):
            cis = [stats.bootstrap_ci([b[y][i] for b in bons]) for i in range(len(ns))]
            ax.plot([math.log2(n) for n in ns], [c[0] for c in cis], marker="o", label=name)
            ax.fill_between([math.log2(n) for n in ns], [c[1] for c in cis], [c[2] for c in cis],
                            alpha=0.2)
        ax.set(xlabel="log₂ n", ylabel="reward of the best of n (proxy's choice)",
               title=f"best-of-n from SFT, {len(bons)} seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "figures", "best_of_n.png"), dpi=110)
        plt.close(fig)
        figures["best_of_n"] = "figures/best_of_n.png"
    if sweep:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        sources = {eta: f"sweep_eta{eta:g}" for eta in sweep}
        # the arms are points of the sweep too: the η = 0 control (reward.py, bit for bit meta_rm.py
        # at η = 0, tests/test_meta_rm.py) and MetaRM round 1 at the study's η, same seeds and data
        sources.setdefault(0.0, "eta0_r1")
        if metarm_eta is not None:
            sources.setdefault(metarm_eta, "metarm_r1")
        pts = [(eta, interval(per_seed(seeds, "policies", key, "gold")))
               for eta, key in sorted(sources.items())]
        pts = [(e, i) for e, i in pts if i]
        if pts:
            xs = list(range(len(pts)))
            ax.errorbar(xs, [i["mean"] for _, i in pts],
                        yerr=[[i["mean"] - i["low"] for _, i in pts],
                              [i["high"] - i["mean"] for _, i in pts]], marker="o", capsize=3)
            ax.set_xticks(xs, [f"{e:g}" for e, _ in pts])
            ax.set(xlabel="η (round 1)", ylabel="gold of the PPO policy (greedy)",
                   title=f"η sweep, {len(seeds)} seeds, 95% interval")
            fig.tight_layout()
            fig.savefig(os.path.join(out, "figures", "eta_sweep.png"), dpi=110)
            figures["eta_sweep"] = "figures/eta_sweep.png"
        plt.close(fig)
    return figures


# --------------------------------------------------------------------------------------------------
# report.md and results.json
# --------------------------------------------------------------------------------------------------
def fmt(ci: dict[str, float] | None, decimals: int = 3) -> str:
    """'1.234 [1.100, 1.350]' (mean [95% interval]); '–' when missing; no interval for one seed."""
    if ci is None:
        return "–"
    f = f"{{:.{decimals}f}}"
    if ci["n"] < 2:
        return f.format(ci["mean"])
    return f"{f.format(ci['mean'])} [{f.format(ci['low'])}, {f.format(ci['high'])}]"


def _wtl(entry: dict[str, Any], vs: str) -> list[str]:
    return [fmt(entry[vs][k], 0) for k in ("win", "tie", "lose")]


def paired(seeds: dict[int, dict], a: tuple[str, ...], b: tuple[str, ...]
           ) -> dict[str, float] | None:
    """The paired difference over seeds of the numbers at paths `a` and `b` (None without two
    seeds that have both; NaNs left out)."""
    x = {s: v for s, v in per_seed(seeds, *a).items() if not math.isnan(v)}
    y = {s: v for s, v in per_seed(seeds, *b).items() if not math.isnan(v)}
    return stats.paired_difference(x, y) if len(set(x) & set(y)) >= 1 else None


def criteria_rows(agg: dict[str, Any], seeds: dict[int, dict]) -> list[list[str]]:
    """The testbed's acceptance criteria (a)–(d), each [criterion, target, measured, met?]: they say
    whether this world can tell RM methods apart at all, and are read off the vanilla and oracle
    arms only; (c) and (d)'s oracle rows come once per round, the last round being the criterion."""
    v, rm = agg["policies"].get("vanilla", {}), agg["rms"].get("vanilla", {})
    oracles = sorted((k for k in agg["policies"] if k.startswith("oracle_r")),
                     key=lambda k: int(k[len("oracle_r"):]))
    def met(ci: dict[str, float] | None, ok: Callable[[dict], bool]) -> str:
        if ci is None:
            return "–"
        return "one seed: no interval" if ci["n"] < 2 else ("met" if ok(ci) else "not met")
    helps = v.get("helps")
    half = (paired(seeds, ("policies", "vanilla", "curve", "drop"),
                   ("policies", "vanilla", "curve", "half_helps")))
    curve = ("policies", "vanilla", "curve")
    onpolicy_fall = paired(seeds, (*curve, "onpolicy_acc_final"), (*curve, "onpolicy_acc_sft"))
    rows = [["(a) the vanilla RM agrees with the gold order on ID test pairs", "≥ 0.80",
             fmt(rm.get("acc_gold")), met(rm.get("acc_gold"), lambda c: c["mean"] >= 0.8)],
            ["(b) vanilla PPO first helps: peak − SFT (held-out, sampled)",
             "≥ +0.3, interval above 0", fmt(helps),
             met(helps, lambda c: c["mean"] >= 0.3 and c["low"] > 0)],
            ["(b) … then loses at least half of it: (peak − final) − (peak − SFT) / 2",
             "≥ 0", fmt(half), met(half, lambda c: c["mean"] >= 0)],
            ["(b) … while the proxy keeps rising: score(final) − score(peak)", "> 0",
             fmt(v.get("score_rise_after_peak")),
             met(v.get("score_rise_after_peak"), lambda c: c["mean"] > 0)]]
    for o in oracles:  # every round; the criterion is the last one's ("at the end")
        diff = agg["policies"][o].get("final_gold_sampled_minus_vanilla")
        rows.append([f"(c) {label(o)} − vanilla PPO, final gold (held-out, sampled)",
                     "≥ +0.2, interval above 0", fmt(diff),
                     met(diff, lambda c: c["mean"] >= 0.2 and c["low"] > 0)])
    rows.append(["(d) on-policy RM accuracy falls along vanilla PPO: final − SFT",
                 "interval below 0", fmt(onpolicy_fall),
                 met(onpolicy_fall, lambda c: c["high"] < 0)])
    for o in oracles:
        restore = paired(seeds, ("policies", o, "curve", "onpolicy_acc_final"),
                         (*curve, "onpolicy_acc_final"))
        rows.append([f"(d) … and the oracle restores it: {label(o)} − vanilla, final",
                     "interval above 0", fmt(restore), met(restore, lambda c: c["low"] > 0)])
    return rows


def calibration_section(agg: dict[str, Any], seeds: dict[int, dict]) -> list[str]:
    """The testbed's criteria (criteria_rows), best-of-n and the Gao fit of the vanilla curve."""
    lines = ["## The testbed's criteria, measured on the vanilla and oracle arms", "",
             "| criterion | target | measured | |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in criteria_rows(agg, seeds)]
    bons = [s["best_of_n"] for s in seeds.values() if "best_of_n" in s]
    if bons:
        ns = bons[0]["n"]
        cis = [stats.bootstrap_ci([b["gold"][i] for b in bons]) for i in range(len(ns))]
        lines += ["", "Best-of-n from the SFT model under RM₀ (gold of the proxy's choice; "
                      "the sanity check): "
                  + ", ".join(f"n = {n}: {c[0]:.3f}" for n, c in zip(ns, cis))
                  + f" ({len(bons)} seeds)."]
    curve = mean_curve(seeds, "vanilla")
    if curve:
        fit = gao_fit(curve["sqrt_kl"], [g - curve["gold"][0] for g in curve["gold"]])
        if fit:
            lines += ["", "Gao et al.'s form fitted to the seed-mean vanilla curve, "
                          "gold − gold(SFT) = d (α − β log d) with d = √KL: "
                          f"α = {fit['alpha']:.3f}, β = {fit['beta']:.3f} "
                          f"(peak at d = {fit['d_peak']:.2f})."]
    return lines + [""]


def tables(agg: dict[str, Any]) -> list[str]:
    P = agg["policies"]
    lines = ["## Table 1 shape: each policy vs SFT (gold judge, greedy responses, held-out "
             "prompts)", "",
             "| policy | win % | tie % | lose % | gold (greedy) |", "|---|---|---|---|---|",
             f"| SFT | | | | {fmt(agg['sft_gold'])} |"]
    lines += [f"| {label(k)} | " + " | ".join(_wtl(e, "vs_sft")) + f" | {fmt(e['gold'])} |"
              for k, e in P.items()]
    lines += ["", "## Table 2 shape: each policy vs vanilla PPO of the same seed", "",
              "| policy | win % | tie % | lose % | gold − vanilla (paired) |",
              "|---|---|---|---|---|"]
    lines += [f"| {label(k)} | " + " | ".join(_wtl(e, "vs_vanilla"))
              + f" | {fmt(e.get('gold_minus_vanilla'))} |"
              for k, e in P.items() if k != "vanilla"]
    lines += ["", "## The held-out curves (gold and RM score of sampled responses along PPO)", "",
              "| policy | SFT | peak | at iteration | final | peak − final | final √KL |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {label(k)} | {fmt(e['sft_gold'])} | {fmt(e['peak_gold'])} | "
              f"{fmt(e['peak_iteration'], 0)} | {fmt(e['final_gold'])} | {fmt(e['drop'])} | "
              f"{fmt(e['final_sqrt_kl'], 2)} |"
              for k, e in P.items() if e.get("peak_gold")]
    if any(e.get("onpolicy_acc_final") for e in P.values()):
        lines += ["", "## The paper's claim measured directly: the RM on the policy's own samples",
                  "", "On-policy accuracy: agreement with the gold order on pairs of one prompt's "
                  "sampled responses; spread: std of the RM score among them (the quantity "
                  "Eq. 2 raises). At PPO's start (SFT) and end.", "",
                  "| policy | on-policy acc SFT | on-policy acc final | RM spread SFT | "
                  "RM spread final | gold spread final |", "|---|---|---|---|---|---|"]
        lines += [f"| {label(k)} | {fmt(e['onpolicy_acc_sft'])} | "
                  f"{fmt(e['onpolicy_acc_final'])} | {fmt(e['reward_spread_sft'])} | "
                  f"{fmt(e['reward_spread_final'])} | {fmt(e['gold_spread_final'])} |"
                  for k, e in P.items() if e.get("onpolicy_acc_final")]
    if any(e.get(f"gold_at_{d:g}") for e in P.values() for d in MATCHED_SQRT_KL):
        lines += ["", "## Gold at matched distance from SFT (held-out curve interpolated at "
                  "√KL = d; – where a run never got that far)", "",
                  "| policy | " + " | ".join(f"d = {d:g}" for d in MATCHED_SQRT_KL) + " |",
                  "|---|" + "---|" * len(MATCHED_SQRT_KL)]
        lines += [f"| {label(k)} | "
                  + " | ".join(fmt(e.get(f"gold_at_{d:g}")) for d in MATCHED_SQRT_KL) + " |"
                  for k, e in P.items() if e.get("peak_gold")]
    lines += ["", "## Reward models: accuracy on held-out pairs (labels / gold order) and "
                  "reward gaps (Fig. 5)", "",
              "| RM | acc | acc (gold) | OOD acc | OOD acc (gold) | gap mean "
              "| normalised gaps < 0.2 |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {'vanilla RM₀' if k == 'vanilla' else label(k)} | {fmt(r['acc'])} | "
              f"{fmt(r['acc_gold'])} | {fmt(r['ood_acc'])} | "
              f"{fmt(r['ood_acc_gold'])} | {fmt(r['gap_mean'])} | {fmt(r['gaps_below_0.2'], 2)} |"
              for k, r in agg["rms"].items()]
    if agg["mechanism"]:
        lines += ["", "## Why MetaRM does what it does (meta_rm.py, mean over logged steps)", "",
                  "J rewards a larger reward scale as much as a better separation; "
                  "J of standardised rewards does not. "
                  "cos = cos(∇L(θ′), ∇L(θ)): 1 means the look-ahead changed nothing.", "",
                  "| round | J | J(θ′) | J std. | J std.(θ′) | std r (S) | std r (D) | cos "
                  "| ‖θ′ − θ‖ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {label(k)} | " + " | ".join(fmt(m[x], 4) for x in MECHANISM) + " |"
                  for k, m in agg["mechanism"].items()]
    return lines + [""]


def readme_block(results: dict[str, Any]) -> str:
    """The study's summary as the README publishes it, from a results.json alone: the criteria
    table, every verdict and the on-policy table. `python -m study` writes it to readme_block.md;
    tests/test_pipeline.py checks that the README's block is this function of the committed
    results.json."""
    agg, per = results["aggregate"], results["per_seed"]
    settings = results.get("settings", {})
    n = len(results["seeds"])
    command = settings.get("command") or "python -m study.report"
    lines = [f"`{command}` — world {settings.get('world') or 'assistant'} (seed "
             f"{settings.get('world_seed') or 0}), {n} seeds, arms {', '.join(results['arms'])}, "
             f"{results['rounds']} round{'s' if results['rounds'] != 1 else ''}; "
             f"{results['wall_seconds'] / 60:.1f} min. Mean over seeds [95 % bootstrap interval].",
             "", "| criterion | target | measured | |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in criteria_rows(agg, per)]
    lines += ["", "Verdicts (greedy gold of the final policies, paired by seed):", ""]
    lines += [f"- {v}" for v in agg["verdicts"]]
    sampled = verdicts(agg, per, SAMPLED_GOLD)
    if sampled:
        lines += ["", "The same comparisons on the held-out sampled gold at the end of PPO (criterion "
                  "(c)'s measure; paired by seed):", ""]
        lines += [f"- {v}" for v in sampled]
    P = agg["policies"]
    rows = [(k, e) for k, e in P.items() if e.get("onpolicy_acc_final")]
    if rows:
        lines += ["", "| policy | gold, held-out sampled: SFT → final | on-policy RM acc: SFT → final "
                  "| RM spread: SFT → final | final √KL |", "|---|---|---|---|---|"]
        lines += [f"| {label(k)} | {fmt(e['sft_gold'])} → {fmt(e['final_gold'])} | "
                  f"{fmt(e['onpolicy_acc_sft'])} → {fmt(e['onpolicy_acc_final'])} | "
                  f"{fmt(e['reward_spread_sft'])} → {fmt(e['reward_spread_final'])} | "
                  f"{fmt(e['final_sqrt_kl'], 2)} |" for k, e in rows]
    return "\n".join(lines) + "\n"


def write(out: str, seeds: list[int], arms: list[str], rounds: int, sweep: list[float],
          wall_seconds: float, stage_seconds: dict[str, tuple[str, float]],
          settings: dict[str, Any]) -> str:
    """Read the study in `out`, write results.json, report.md and figures/; return the markdown.
    `stage_seconds`: {task: (script, seconds)} of the stages run by this invocation."""
    keys = (["vanilla"]
            + [f"{a}_r{r}" for a in ROUND_ARMS if a in arms for r in range(1, rounds + 1)]
            + (["dpo"] if "dpo" in arms else []) + [f"sweep_eta{e:g}" for e in sweep])
    per = {s: seed_numbers(out, s, keys) for s in seeds}
    per = {s: n for s, n in per.items() if n["policies"]}
    agg = (aggregate(per, keys) if per
           else {"policies": {}, "rms": {}, "mechanism": {}, "verdicts": [], "sft_gold": None})
    figures = draw_figures(out, per, keys, sweep, settings.get("eta")) if per else {}
    stage_totals: dict[str, float] = {}
    for script, sec in stage_seconds.values():
        stage_totals[script] = stage_totals.get(script, 0.0) + sec
    results = {"seeds": sorted(per), "arms": arms, "rounds": rounds, "eta_sweep": sweep,
               "settings": settings, "wall_seconds": wall_seconds, "stage_seconds": stage_seconds,
               "per_seed": per, "aggregate": agg, "figures": figures}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    n = len(per)
    lines = [f"# MetaRM on the testbed: {n} seed{'s' if n != 1 else ''}, arms {', '.join(arms)}, "
             f"{rounds} rounds", "",
             (f"Wall time of the last python -m study run {wall_seconds / 60:.1f} min "
              "(stages skipped as done not counted)" if wall_seconds
              else "Wall time not recorded (python -m study.report run on its own)") +
             f" ({settings.get('jobs')} stages at a time x "
             f"{settings.get('threads')} thread(s) x {settings.get('nproc')} process(es)); model "
             f"{settings.get('model_size')}, world {settings.get('world') or 'assistant'} "
             f"(seed {settings.get('world_seed') or 0}), meta order {settings.get('meta_order')}"
             f"{', OOD meta set' if settings.get('ood') else ''}"
             f"{', TOY sizes (numbers mean nothing)' if settings.get('toy') else ''}. "
             f"Every number is the mean over the {n} seeds with its 95 % exact bootstrap interval "
             "over seeds [low, high]; a difference is called only when its interval excludes 0.",
             ""]
    if n:
        lines += ["## Verdicts", "", "Greedy gold of the final policies:", ""]
        lines += [f"- {v}" for v in agg["verdicts"]] + [""]
        lines += ["Held-out sampled gold at the end of PPO (criterion (c)'s measure):", ""]
        lines += [f"- {v}" for v in verdicts(agg, per, SAMPLED_GOLD)] + [""]
        lines += calibration_section(agg, per) + tables(agg)
        if sweep:
            lines += ["## η sweep (round 1)", "",
                      "| η | gold (greedy) | gold − vanilla | RM acc (gold) |", "|---|---|---|---|"]
            lines += [f"| {e:g} | {fmt(agg['policies'].get(f'sweep_eta{e:g}', {}).get('gold'))} | "
                      f"{fmt(agg['policies'].get(f'sweep_eta{e:g}', {}).get('gold_minus_vanilla'))}"
                      f" | {fmt(agg['rms'].get(f'sweep_eta{e:g}', {}).get('acc_gold'))} |"
                      for e in sweep] + [""]
        lines += ["Figures: " + ", ".join(f"[{k}]({v})" for k, v in figures.items()), ""]
    if stage_totals:
        lines += ["Stage time (summed over the stages run now): " +
                  ", ".join(f"{k} {v / 60:.1f} min"
                            for k, v in sorted(stage_totals.items(), key=lambda x: -x[1])), ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    if n:
        with open(os.path.join(out, "readme_block.md"), "w") as f:
            f.write(readme_block(json.loads(json.dumps(results))))
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m study.report OUT   (OUT: a python -m study output folder; "
             "rewrites its report)")
    if argv in (["-h"], ["--help"]):
        print(usage)
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit(usage)
    out = os.path.abspath(argv[0])
    if not os.path.isfile(os.path.join(out, "args.json")):
        sys.exit(f"error: {out}: no args.json (not a python -m study output folder)")
    args = _read_json(os.path.join(out, "args.json"))
    arms = ["vanilla"] + [a for a in args["arms"].split(",") if a and a != "vanilla"]
    sweep = [float(x) for x in args.get("eta_sweep", "").split(",") if x.strip()]
    settings = {k: args.get(k)
                for k in ("jobs", "threads", "nproc", "model_size", "meta_order", "ood", "toy",
                          "world", "world_seed")}
    print(write(out, list(range(args["seeds"])), arms, args["rounds"], sweep, 0.0, {},
                {**settings, "eta": metarm_eta(args.get("eta", -1.0))}))


if __name__ == "__main__":
    main()

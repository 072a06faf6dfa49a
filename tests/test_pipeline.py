"""The study pipeline: the scheduler (never more than --jobs stages at once, dependencies first, resume, a failure
stops it), study/report.py's reductions by hand, and the whole study at toy size end to end (1 and 2 processes)."""
import json
import math
import os
import re

import pytest

from study import arms, pipeline, report
from conftest import run_command


# ----------------------------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------------------------
def _events(log):
    rows = [line.split() for line in open(log)]
    return {(name, kind): float(t) for name, kind, t in rows if kind in ("start", "end")}


def test_run_tasks_respects_jobs_and_dependencies(tmp_path):
    log = str(tmp_path / "events.log")
    stage = os.path.join("tests", "helpers", "timed_stage.py")
    t = lambda name, deps, sec="0.4": pipeline.Task(name, stage, [log, name, sec], deps)  # noqa: E731
    # a -> (b, c, d) -> e: b, c, d can run together, but jobs = 2 allows two at a time
    tasks = [t("a", []), t("b", ["a"]), t("c", ["a"]), t("d", ["a"]), t("e", ["b", "c", "d"])]
    args = pipeline.Args(out=str(tmp_path / "out"))
    ran = pipeline.run_tasks(args, tasks, jobs=2)
    assert set(ran) == {"a", "b", "c", "d", "e"}
    ev = _events(log)
    for name, deps in (("b", "a"), ("c", "a"), ("d", "a")):
        assert ev[(name, "start")] >= ev[(deps, "end")]
    assert ev[("e", "start")] >= max(ev[(n, "end")] for n in "bcd")
    # at no time were more than 2 stages alive: count overlaps at every start
    for name in "abcde":
        t0 = ev[(name, "start")]
        alive = [n for n in "abcde" if ev[(n, "start")] <= t0 < ev[(n, "end")]]
        assert len(alive) <= 2, (name, alive)
    # b, c and d did not run one after another: two of them overlapped
    assert any(ev[(x, "start")] < ev[(y, "end")] and ev[(y, "start")] < ev[(x, "end")]
               for x, y in (("b", "c"), ("b", "d"), ("c", "d")))
    # a second run finds every marker and runs nothing
    assert pipeline.run_tasks(args, tasks, jobs=2) == {}


def test_run_tasks_stops_at_a_failure_and_resumes(tmp_path):
    log = str(tmp_path / "events.log")
    stage = os.path.join("tests", "helpers", "timed_stage.py")
    args = pipeline.Args(out=str(tmp_path / "out"))
    bad = [pipeline.Task("a", stage, [log, "a", "0"], []), pipeline.Task("b", stage, [log, "b", "0", "fail"], ["a"]),
           pipeline.Task("c", stage, [log, "c", "0"], ["b"])]
    with pytest.raises(pipeline.common.UserError, match="stage b failed"):
        pipeline.run_tasks(args, bad, jobs=1)
    assert ("c", "start") not in _events(log)
    fixed = bad[:1] + [pipeline.Task("b", stage, [log, "b", "0"], ["a"]), bad[2]]
    assert set(pipeline.run_tasks(args, fixed, jobs=1)) == {"b", "c"}  # a was done: only b and c run again


def test_on_a_gpu_machine_each_stage_holds_its_own_gpus(tmp_path):
    # two GPU slots of 2 GPUs each (--nproc 2 on a 4-GPU machine): five independent stages, at most two at a
    # time, each given one slot as CUDA_VISIBLE_DEVICES, and no two running stages ever share one (before,
    # every stage saw every GPU and started on GPU 0)
    log = str(tmp_path / "events.log")
    stage = os.path.join("tests", "helpers", "timed_stage.py")
    tasks = [pipeline.Task(n, stage, [log, n, "0.3"], []) for n in "abcde"]
    pipeline.run_tasks(pipeline.Args(out=str(tmp_path / "out")), tasks, jobs=8, slots=["0,1", "2,3"])
    ev = _events(log)
    gpu = {n: s for n, kind, s in (line.split() for line in open(log)) if kind == "gpu"}
    assert set(gpu) == set("abcde") and set(gpu.values()) <= {"0+1", "2+3"}
    for x in "abcde":
        for y in "abcde":
            if x < y and ev[(x, "start")] < ev[(y, "end")] and ev[(y, "start")] < ev[(x, "end")]:
                assert gpu[x] != gpu[y], (x, y)  # overlapping stages never share a slot
    alive = [[n for n in "abcde" if ev[(n, "start")] <= ev[(m, "start")] < ev[(n, "end")]] for m in "abcde"]
    assert max(len(a) for a in alive) <= 2  # jobs = 8, but only two slots


def test_gpu_slots_group_the_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert pipeline.gpu_slots(1) == ["3", "5", "6", "7"] and pipeline.gpu_slots(2) == ["3,5", "6,7"]
    assert pipeline.gpu_slots(3) == ["3,5,6"]  # the fourth GPU alone cannot hold a 3-process stage
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert pipeline.gpu_slots(1) == []  # CPU: no slots, stages share the cores as --jobs x --threads


def test_micro_batches_are_split_over_processes():
    # TESTBED's micro-batch sizes are per process for 1 process; with 2 processes each takes half, so that
    # micro-batch x accumulation x processes is the same global batch (32 = 16 x 1 x 2); other flags are untouched.
    flags = ["--lr", "3e-3", "--micro-batch-size", "32", "--max-len", "64"]
    assert arms.per_process(flags, 2) == ["--lr", "3e-3", "--micro-batch-size", "16", "--max-len", "64"]
    assert arms.per_process(flags, 1) == flags


# ----------------------------------------------------------------------------------------------------------------
# study/report.py by hand
# ----------------------------------------------------------------------------------------------------------------
def test_every_meta_rm_command_names_eta_once_with_its_own_value():
    # --eta 0.2 sets the metarm arm's η; each sweep point runs meta_rm.py with its own η. A flag given twice would
    # be decided by argparse's last-one-wins: the printed command must say what runs, once.
    args = pipeline.Args(out="/nonexistent/out", seeds=2, eta=0.2, eta_sweep="0.05,1", rounds=2)
    hp = arms.stage_flags(args.toy, args.nproc, args.eta, args.stage_flags)
    tasks = pipeline.plan(args, hp, ["vanilla", "metarm"], [0.05, 1.0])
    etas = {t.name: t.flags[t.flags.index("--eta") + 1] for t in tasks if t.script == "meta_rm.py"}
    assert all(t.flags.count("--eta") == 1 for t in tasks if t.script == "meta_rm.py")
    assert etas == {f"seed{s}/{part}": eta for s in range(2) for part, eta in (
        ("metarm/round1/rm", "0.2"), ("metarm/round2/rm", "0.2"), ("sweep/eta0.05/rm", "0.05"),
        ("sweep/eta1/rm", "1"))}


def test_smoothed_and_curve_numbers_by_hand():
    # moving average of 3: [1, 2, 6, 1, 1] -> [1, 1.5, 3, 3, 8/3]
    assert report.smoothed([1, 2, 6, 1, 1]) == pytest.approx([1, 1.5, 3, 3, 8 / 3])
    lines = [{"iteration": i * 10, "eval_kl": i / 4, "eval_sqrt_kl": (i / 4) ** 0.5, "eval_gold": g,
              "eval_score": 0.1 * i} for i, g in enumerate([1, 2, 6, 1, 1])]
    c = report.curve_numbers(lines)
    # peak of the smoothed curve: 3 at index 2 (the first of the two 3s); final = mean of the last 3 = 8/3
    assert c["sft_gold"] == 1 and c["peak_gold"] == 3 and c["peak_iteration"] == 20
    assert c["final_gold"] == pytest.approx(8 / 3) and c["drop"] == pytest.approx(1 / 3) and c["helps"] == 2
    assert c["score_rise_after_peak"] == pytest.approx(0.4 - 0.2)


def test_gao_fit_recovers_alpha_and_beta():
    # points exactly on R(d) = d (0.8 − 0.5 log d): least squares returns α = 0.8, β = 0.5; peak at e^(α/β − 1)
    d = [0.2, 0.5, 1.0, 1.5, 2.0, 3.0]
    fit = report.gao_fit(d, [x * (0.8 - 0.5 * math.log(x)) for x in d])
    assert fit["alpha"] == pytest.approx(0.8) and fit["beta"] == pytest.approx(0.5)
    assert fit["d_peak"] == pytest.approx(math.exp(0.8 / 0.5 - 1))


def test_gold_at_matched_sqrt_kl_by_hand():
    # curve (√KL, gold): (0, 1), (0.4, 2), (1.2, 0); at d = 0.2 halfway up the first segment: 1.5; at d = 1.0,
    # three quarters down the second: 2 + (0 − 2) · (1.0 − 0.4) / 0.8 = 0.5; d = 2 is never reached: None
    assert report.gold_at([0, 0.4, 1.2], [1, 2, 0], 0.2) == pytest.approx(1.5)
    assert report.gold_at([0, 0.4, 1.2], [1, 2, 0], 1.0) == pytest.approx(0.5)
    assert report.gold_at([0, 0.4, 1.2], [1, 2, 0], 2.0) is None


def test_onpolicy_curve_numbers_and_criteria_by_hand():
    # on-policy accuracy 0.9 at SFT falling to 0.6, 0.5, 0.4: final = mean of the last 3 = 0.5
    lines = [{"iteration": i, "eval_kl": i, "eval_sqrt_kl": i ** 0.5, "eval_gold": g, "eval_score": i,
              "eval_onpolicy_acc": a, "eval_reward_spread": 1.0, "eval_gold_spread": 0.5}
             for i, (g, a) in enumerate([(1, 0.9), (2, 0.7), (2, 0.6), (1, 0.5), (0, 0.4)])]
    c = report.curve_numbers(lines)
    assert c["onpolicy_acc_sft"] == 0.9 and c["onpolicy_acc_final"] == pytest.approx(0.5)
    # smoothed gold 1, 1.5, 5/3, 5/3, 1: peak 5/3 (first), helps 2/3, final 1, drop 2/3 >= helps / 2
    assert c["helps"] == pytest.approx(2 / 3) and c["drop"] == pytest.approx(2 / 3)
    # two seeds with identical curves; the oracle ends at on-policy accuracy 0.8 and gold 3 (vanilla: 1)
    oracle = report.curve_numbers([dict(m, eval_onpolicy_acc=0.8, eval_gold=3) for m in lines])
    seeds = {s: {"policies": {"vanilla": {"gold": 1.0, "curve": c}, "oracle_r2": {"gold": 2.0, "curve": oracle}},
                 "rms": {"vanilla": {"acc_gold": 0.85}}, "mechanism": {}, "sft_gold": 1.0} for s in (0, 1)}
    agg = report.aggregate(seeds, ["vanilla", "oracle_r2"])
    rows = {r[0][:3] + r[0][-20:]: r for r in report.criteria_rows(agg, seeds)}
    verdict = [r[3] for r in report.criteria_rows(agg, seeds)]
    # (a) 0.85 >= 0.8 met; (b) helps 2/3 >= 0.3 but with no spread the interval's low is 2/3 > 0: met; half:
    # drop − helps/2 = 1/3 >= 0 met; proxy: score(final) 4 − score(peak, iteration 2) 2 = 2 > 0 met; (c) oracle − vanilla
    # final sampled gold 3 − 1 = 2 met; (d) final − SFT = 0.5 − 0.9 = −0.4, interval [−0.4, −0.4] below 0: met;
    # oracle − vanilla final on-policy 0.8 − 0.5 = 0.3: met
    assert verdict == ["met"] * 7, rows
    # a round-1 oracle identical to vanilla adds its own (c) and (d) rows, before round 2's: 0 − 0 is not
    # ≥ +0.2 and its interval [0, 0] is not above 0 — not met; round 2's rows are unchanged
    for s in seeds.values():
        s["policies"]["oracle_r1"] = {"gold": 1.0, "curve": c}
    agg = report.aggregate(seeds, ["vanilla", "oracle_r1", "oracle_r2"])
    rows = report.criteria_rows(agg, seeds)
    assert [r[3] for r in rows] == ["met"] * 4 + ["not met", "met", "met", "not met", "met"], rows
    assert [r[0][:3] for r in rows][4:] == ["(c)", "(c)", "(d)", "(d)", "(d)"]
    assert "r1" in report.label("oracle_r1") and report.label("oracle_r1") in rows[4][0]


def test_verdicts_on_sampled_gold_by_hand():
    # final held-out sampled gold per seed (seeds 0, 1): vanilla 1.0, 2.0; MetaRM r1 1.5, 3.0; η = 0 r1 1.0, 3.5.
    # Greedy gold is the same for every policy (2.0), so the greedy verdicts are all 0 [0, 0].
    # MetaRM − vanilla: differences 0.5, 1.0. The exact bootstrap of a 2-seed mean takes the resamples {0.5, 0.5},
    # {0.5, 1.0}, {1.0, 1.0} with probabilities 1/4, 1/2, 1/4: means 0.5, 0.75, 1.0, so the 2.5 % and 97.5 %
    # quantiles are 0.5 and 1.0 -> +0.750 [+0.500, +1.000], higher. η = 0 − vanilla: 0.0, 1.5 -> +0.750 [0, +1.5],
    # the interval touches 0: no detectable difference. MetaRM − η = 0: 0.5, −0.5 -> 0 [−0.5, +0.5].
    finals = {"vanilla": (1.0, 2.0), "metarm_r1": (1.5, 3.0), "eta0_r1": (1.0, 3.5)}
    seeds = {s: {"policies": {k: {"gold": 2.0, "curve": {"final_gold": v[s]}} for k, v in finals.items()},
                 "rms": {}, "mechanism": {}, "sft_gold": 1.0} for s in (0, 1)}
    agg = report.aggregate(seeds, list(finals))
    assert report.verdicts(agg, seeds, report.SAMPLED_GOLD) == [
        "MetaRM r1 − vanilla PPO: +0.750 gold [+0.500, +1.000] (2 seeds): higher",
        "η = 0 control r1 − vanilla PPO: +0.750 gold [+0.000, +1.500] (2 seeds): no detectable difference",
        "MetaRM r1 − η = 0 control r1: +0.000 gold [-0.500, +0.500] (2 seeds): no detectable difference"]
    assert all(v.endswith("+0.000 gold [+0.000, +0.000] (2 seeds): no detectable difference")
               for v in agg["verdicts"]) and len(agg["verdicts"]) == 3
    # the README block carries both lists, the greedy one first; a JSON round trip (string seed keys) changes nothing
    results = json.loads(json.dumps({"seeds": [0, 1], "arms": ["vanilla", "metarm", "eta0"], "rounds": 1,
                                     "settings": {}, "wall_seconds": 60.0, "per_seed": seeds, "aggregate": agg}))
    block = report.readme_block(results)
    assert block.index("- MetaRM r1 − vanilla PPO: +0.000") < block.index("- MetaRM r1 − vanilla PPO: +0.750")


def test_controls_are_the_arms_they_claim(tmp_path):
    # random: meta_rm.py --ascent random on MetaRM's own S; sftS: J on S₁ (the SFT model's samples) in every round,
    # no meta set of its own; oracleM: D plus the matched (one label per meta sample) oracle pairs of its S_r
    args = pipeline.Args(out=str(tmp_path), seeds=1, rounds=2)
    hp = arms.stage_flags(False, 1, -1, "", "extrapolation")
    tasks = {t.name: t for t in pipeline.plan(args, hp, ["vanilla", "metarm", "random", "sftS", "oracleM"], [])}
    flag = lambda t, f: t.flags[t.flags.index(f) + 1]  # noqa: E731
    assert flag(tasks["seed0/random/round2/rm"], "--ascent") == "random"
    assert "--ascent" not in tasks["seed0/metarm/round2/rm"].flags
    assert flag(tasks["seed0/random/round2/rm"], "--meta").endswith("seed0/random/round2/S/meta_train.jsonl")
    assert flag(tasks["seed0/sftS/round2/rm"], "--meta").endswith("seed0/S1/meta_train.jsonl")
    assert "seed0/sftS/round2/S" not in tasks
    # sftS's round 1 would repeat MetaRM's round 1 flag for flag (S₁, the same --seed), so it is not planned:
    # round 2 goes on from MetaRM's round-1 RM, and every task name is planned once
    assert not any(n.startswith("seed0/sftS/round1/") for n in tasks)
    assert tasks["seed0/sftS/round2/rm"].deps == ["seed0/S1", "seed0/metarm/round1/rm"]
    assert flag(tasks["seed0/sftS/round2/rm"], "--model").endswith("seed0/metarm/round1/rm")
    assert len(pipeline.plan(args, hp, ["vanilla", "metarm", "random", "sftS", "oracleM"], [])) == len(tasks)
    alone = {t.name: t for t in pipeline.plan(args, hp, ["vanilla", "sftS"], [])}
    assert {"seed0/metarm/round1/rm", "seed0/metarm/round1/ppo"} <= set(alone)
    assert alone["seed0/metarm/round1/rm"].flags == tasks["seed0/metarm/round1/rm"].flags
    assert flag(tasks["seed0/oracleM/round2/S"], "--policy").endswith("seed0/oracleM/round1/ppo")
    train = tmp_path / "seed0" / "oracleM" / "round2" / "train_pairs.jsonl"
    os.makedirs(tmp_path / "testbed" / "data"); os.makedirs(tmp_path / "seed0" / "oracleM" / "round2" / "S")
    (tmp_path / "testbed" / "data" / "pairs_train.jsonl").write_text('{"d": 1}\n')
    (tmp_path / "seed0" / "oracleM" / "round2" / "S" / "oracle_pairs.jsonl").write_text('{"all": 1}\n')
    (tmp_path / "seed0" / "oracleM" / "round2" / "S" / "oracle_pairs_matched.jsonl").write_text('{"m": 1}\n')
    tasks["seed0/oracleM/round2/rm"].prepare()
    assert train.read_text() == '{"d": 1}\n{"m": 1}\n'
    # every RM gets an evaluation of its own, and the world's flags reach the stages once each
    assert {n for n in tasks if n.startswith("seed0/eval/rm/")} == {
        f"seed0/eval/rm/{k}" for k in ("vanilla", "metarm_r1", "metarm_r2", "random_r1", "random_r2",
                                       "sftS_r2", "oracleM_r1", "oracleM_r2")}
    assert flag(tasks["testbed"], "--world") == "extrapolation" and tasks["testbed"].flags.count("--n-pairs-train") == 1


def test_task_names_to_keys():
    assert arms.policy_key("seed0/vanilla/ppo") == "vanilla"
    assert arms.policy_key("seed3/metarm/round2/ppo") == "metarm_r2"
    assert arms.policy_key("seed1/dpo") == "dpo"
    assert arms.policy_key("seed0/sweep/eta0.1/ppo") == "sweep_eta0.1"
    assert arms.rm_key("seed0/rm0") == "vanilla" and arms.rm_key("seed0/oracle/round1/rm") == "oracle_r1"


# ----------------------------------------------------------------------------------------------------------------
# The study end to end at toy size
# ----------------------------------------------------------------------------------------------------------------
def test_toy_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    cmd = ["-m", "study", "--toy", "--seeds", "2", "--rounds", "1", "--arms", "vanilla,metarm,eta0,oracle,dpo",
           "--eta-sweep", "0.1", "--out", str(out)]
    rc, stdout, stderr = run_command(cmd, timeout=900)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    for s in (0, 1):
        for stage in ("rm0", "vanilla/ppo", "S1", "metarm/round1/rm", "metarm/round1/ppo", "eta0/round1/rm",
                      "eta0/round1/ppo", "oracle/round1/rm", "oracle/round1/ppo", "eval/vanilla", "eval/metarm_r1",
                      "eval/eta0_r1", "eval/oracle_r1", "eval/rm/vanilla", "eval/rm/metarm_r1", "best_of_n", "dpo", "eval/dpo",
                      "sweep/eta0.1/rm", "sweep/eta0.1/ppo", "eval/sweep_eta0.1"):
            assert (out / ".done" / f"seed{s}" / stage).exists(), (s, stage)
        # the oracle trained on D plus the gold-labelled pairs of S_1
        n_d = sum(1 for _ in open(out / "testbed" / "data" / "pairs_train.jsonl"))
        n_o = sum(1 for _ in open(out / f"seed{s}" / "S1" / "oracle_pairs.jsonl"))
        assert n_o > 0 and sum(1 for _ in open(out / f"seed{s}" / "oracle" / "round1" / "train_pairs.jsonl")) == n_d + n_o
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    agg = results["aggregate"]
    assert set(agg["policies"]) == {"vanilla", "metarm_r1", "eta0_r1", "oracle_r1", "dpo", "sweep_eta0.1"}
    for key, entry in agg["policies"].items():
        assert entry["gold"]["n"] == 2
        w = entry["vs_sft"]
        assert sum(w[k]["mean"] for k in ("win", "tie", "lose")) == pytest.approx(100)
        # the interval holds the mean
        assert entry["gold"]["low"] <= entry["gold"]["mean"] <= entry["gold"]["high"]
    # per seed, the paired difference of the aggregate is the mean of the per-seed differences
    per = results["per_seed"]
    diffs = [per[s]["policies"]["metarm_r1"]["gold"] - per[s]["policies"]["vanilla"]["gold"] for s in ("0", "1")]
    assert agg["policies"]["metarm_r1"]["gold_minus_vanilla"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert set(agg["rms"]) == {"vanilla", "metarm_r1", "eta0_r1", "oracle_r1", "sweep_eta0.1"}
    assert "metarm_r1" in agg["mechanism"] and agg["mechanism"]["metarm_r1"]["cos_grad"]["n"] == 2
    # 5 arms vs vanilla (MetaRM, η = 0, oracle, DPO, the sweep point), then MetaRM vs η = 0, vs the oracle, vs DPO,
    # and the sweep point vs η = 0 (only η differs between them)
    assert len(agg["verdicts"]) == 9 and all("(2 seeds)" in v for v in agg["verdicts"])
    sweep_vs_eta0 = [v for v in agg["verdicts"] if v.startswith("MetaRM r1, η = 0.1 − η = 0 control r1")]
    d = [per[s]["policies"]["sweep_eta0.1"]["gold"] - per[s]["policies"]["eta0_r1"]["gold"] for s in ("0", "1")]
    assert len(sweep_vs_eta0) == 1 and f"{sum(d) / 2:+.3f} gold" in sweep_vs_eta0[0]
    # the README's study block is a function of results.json alone: the toy run's block, rendered again from its
    # results.json, is the file the run wrote (and names the command that made it)
    block = (out / "readme_block.md").read_text()
    assert block == report.readme_block(results) and block.startswith("`python -m study --toy --seeds 2")
    assert "| (a) the vanilla RM agrees" in block and all(f"- {v}\n" in block for v in agg["verdicts"])
    text = (out / "report.md").read_text()
    for heading in ("## Verdicts", "## The testbed's criteria", "## Table 1 shape", "## Table 2 shape",
                    "## Reward models", "## Why MetaRM does what it does"):
        assert heading in text
    for png in ("gold_vs_sqrt_kl.png", "best_of_n.png", "eta_sweep.png"):
        assert (out / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(out / "seed1" / "metarm" / "round1" / "ppo" / "model.safetensors")

    # resume: the same command again finds every stage done and only rewrites the report
    rc, stdout, stderr = run_command(cmd, timeout=300)
    assert rc == 0, stderr[-3000:]
    assert "stages done already" in stdout and "$ " not in stdout


def test_toy_study_two_processes(tmp_path):
    # `python -m study --nproc 2`: every stage but the testbed under torchrun (FSDP2, gloo)
    out = tmp_path / "study2"
    rc, stdout, stderr = run_command(["-m", "study", "--toy", "--seeds", "1", "--rounds", "1", "--arms",
                                      "vanilla,metarm", "--nproc", "2", "--out", str(out)], timeout=1200)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("$ python -m testbed") == 1
    assert stdout.count("$ torchrun --standalone --nproc_per_node=2 ") == stdout.count("\n$ ") - 1
    results = json.loads((out / "results.json").read_text())
    assert set(results["aggregate"]["policies"]) == {"vanilla", "metarm_r1"}


def test_readme_study_blocks_are_the_rendering_of_the_committed_results():
    # every number of the README's study blocks comes from a run's results.json (committed in docs/), rendered by
    # report.readme_block: editing a number by hand, or publishing a block of another run, fails here
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"<!-- study-block: (\S+) -->\n(.*?)<!-- /study-block -->", readme, re.S)
    sources = [source for source, _ in blocks]
    assert "docs/study_extrapolation.json" in sources and len(set(sources)) == len(sources)
    for source, block in blocks:
        with open(os.path.join(root, source)) as f:
            results = json.load(f)
        assert block == report.readme_block(results), source
        # the first world's block is the README's command 1 as printed; every other block is of the second world
        world = "assistant" if source == "docs/study_assistant.json" else "extrapolation"
        assert results["settings"]["world"] == world, source
        if world == "assistant":  # published as the README's command 1: its defaults, only --out named
            assert re.fullmatch(r"python -m study --out \S+", results["settings"]["command"]), source
        if source == "docs/study_extrapolation.json":  # the published one-round study
            assert len(results["seeds"]) >= 8


def test_figure_curves_are_coloured_by_arm_and_styled_by_round():
    # the key grammar of report.aggregate: "<arm>_r<round>" for the paper's rounds, a bare name
    # otherwise; an η-sweep key contains neither "_r" nor a round number
    assert report._arm_round("metarm_r3") == ("metarm", "3")
    assert report._arm_round("oracleM_r1") == ("oracleM", "1")
    assert report._arm_round("vanilla") == ("vanilla", "")
    assert report._arm_round("sweep_eta0.1") == ("sweep_eta0.1", "")

"""Flags are validated from one declaration: every numeric field of every stage's Args carries its valid values
(`arg(..., valid=positive)`, common.Valid) or a list of choices, and every stage refuses a value outside them before
it touches anything: one line naming the flag, exit status 2, nothing written.

The cases are generated from the Args dataclasses themselves: a numeric flag added later is tried with the bad
values its own declaration names, and a numeric flag added without a declaration fails
`test_every_numeric_field_declares_its_valid_values`. Lengths that do not fit the model (--max-len, prompt +
--max-new-tokens beyond max_position_embeddings) are refused where the model's config is first read.
"""
import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import typing

import pytest

from plumbing import common, distributed
from plumbing.common import UserError
from conftest import REPO, run_command

def stage_modules() -> list[str]:
    """Every module of the repository with an `Args` dataclass and a `main` (the stages at the root, and
    testbed.world, study.pipeline, tools.convert_smollm2, ... in their folders): one added later is covered too."""
    names = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d != "tests"]
        rel = os.path.relpath(folder, REPO)
        for n in files:
            if n.endswith(".py") and "class Args" in (src := open(os.path.join(folder, n)).read()) \
                    and "\ndef main(" in src:
                names.append(n[:-3] if rel == "." else f"{rel.replace(os.sep, '.')}.{n[:-3]}")
    return sorted(names)


STAGES = stage_modules()


def output_fields(cls) -> list[str]:
    """The fields of an Args that name where a stage writes (out, workdir, out_*): the cases point them all into the
    test's folder, which must stay empty."""
    return [f.name for f in dataclasses.fields(cls) if f.name in ("out", "workdir") or f.name.startswith("out_")]


def test_every_stage_is_found():
    assert set(STAGES) >= {"sft", "reward", "meta_data", "meta_rm", "ppo", "dpo", "evaluate", "testbed.world",
                           "study.pipeline", "study.best_of_n", "tools.convert_smollm2", "bench.stages"}


def numeric_fields(module_name: str) -> list[tuple[str, dataclasses.Field, type]]:
    cls = importlib.import_module(module_name).Args
    hints = typing.get_type_hints(cls)
    return [(module_name, f, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


FIELDS = [x for m in STAGES for x in numeric_fields(m)]
IDS = [f"{m}--{f.name.replace('_', '-')}" for m, f, _ in FIELDS]


def test_every_numeric_field_declares_its_valid_values():
    undeclared = [i for i, (_, f, _) in zip(IDS, FIELDS) if f.metadata.get("valid") is None
                  and not f.metadata.get("choices")]
    assert not undeclared, f"numeric flags without valid= or choices: {undeclared}"
    # and every declaration can name values that break it, for the cases below
    for i, (_, f, kind) in zip(IDS, FIELDS):
        if f.metadata.get("valid") is not None:
            assert f.metadata["valid"].counterexamples(kind), i
            assert f.metadata["valid"](f.default), f"{i}: the default {f.default} is not valid"


def test_every_stage_has_a_threads_flag():
    assert [m for m in STAGES if "threads" not in {f.name for f in dataclasses.fields(importlib.import_module(m).Args)}
            ] == []


@pytest.mark.parametrize("module_name, field, kind", FIELDS, ids=IDS)
def test_a_bad_value_of_every_numeric_flag_is_one_line_and_writes_nothing(module_name, field, kind, tmp_path,
                                                                          capsys):
    module = importlib.import_module(module_name)
    flag = common.flag_name(field.name)
    outputs = [x for name in output_fields(module.Args) for x in (common.flag_name(name), str(tmp_path / "o" / name))]
    valid = field.metadata.get("valid")
    if valid is None:  # a numeric field with choices: argparse refuses what is not one of them
        bad = max(field.metadata["choices"]) + 1
        with pytest.raises(SystemExit) as e:
            module.main([*outputs, flag, str(bad)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}: invalid choice" in err
    else:
        for bad in valid.counterexamples(kind):
            with pytest.raises(UserError) as e:
                module.main([*outputs, f"{flag}={bad}"])  # "=": a value like -inf is not taken for a flag
            message = str(e.value)
            assert "\n" not in message
            assert message == f"{flag} {bad}: must be {valid.describe}"
            assert not valid(bad)
    assert not os.path.exists(tmp_path / "o"), os.listdir(tmp_path / "o")


def test_the_predicates_by_hand():
    # positive: finite and > 0; non_negative: finite and >= 0; in_unit_above_0: (0, 1]; -1 as a sentinel
    assert [common.positive(x) for x in (1e-9, 0, -1, math.nan, math.inf)] == [True, False, False, False, False]
    assert [common.non_negative(x) for x in (0, 2.5, -1e-9, math.nan)] == [True, True, False, False]
    assert [common.in_unit_above_0(x) for x in (1, 0.5, 0, 1.0001)] == [True, True, False, False]
    assert [common.in_unit(x) for x in (0, 1, -0.1)] == [True, True, False]
    steps = common.or_sentinel(-1, "all")
    assert [steps(x) for x in (-1, 1, 0, -2)] == [True, True, False, False]
    assert steps.counterexamples(int) == [0, -2] and steps.describe == "a finite number > 0, or -1 (all)"
    assert [common.seed(x) for x in (0, 2**31 - 1, -1, 2**32)] == [True, True, False, False]
    assert common.at_least(2).counterexamples(int) == [1] and common.at_least(2).counterexamples(float)[0] == 1.0


def test_the_commands_of_the_issue_are_one_line_errors(tmp_path):
    # as a new user typed them (the in-process cases above cover every flag; this is the command line: stderr, exit
    # status), two at a time; each must stop before anything is loaded or written
    cases = [(["reward.py", "--lr", "nan"], "error: --lr nan: must be a finite number > 0"),
             (["ppo.py", "--top-p", "0"], "error: --top-p 0.0: must be in (0, 1]")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: run_command([*c[0], "--out", str(tmp_path / c[0][0])]), cases))
    for (argv, expected), (rc, stdout, stderr) in zip(cases, results):
        assert (rc, stderr.strip()) == (2, expected)
        assert not (tmp_path / argv[0]).exists()


# ---------------------------------------------------------------------------------------------------------------
# Lengths against the model's positions (the test world's models have max_position_embeddings 1024)
# ---------------------------------------------------------------------------------------------------------------
def test_check_positions_by_hand(tmp_path):
    # a GPT-2 style config names its positions n_positions; a Llama one max_position_embeddings
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 16}))
    distributed.check_positions(str(tmp_path), "--max-len", 16)  # exactly the table: fits
    with pytest.raises(UserError, match=r"^--max-len 17: more than the model in .* has \(16 positions; "):
        distributed.check_positions(str(tmp_path), "--max-len", 17)
    distributed.check_positions(str(tmp_path), "--max-new-tokens", 15, reserve=1)  # 15 + a 1-token prompt = 16
    with pytest.raises(UserError, match=r"^--max-new-tokens 16: .* \(15 positions left after a prompt; "):
        distributed.check_positions(str(tmp_path), "--max-new-tokens", 16, reserve=1)


def test_lengths_beyond_the_models_positions_are_refused_before_anything_is_written(world, rm_checkpoint, tmp_path):
    import evaluate
    import meta_data
    import meta_rm
    import ppo
    import reward
    import sft

    positions = json.load(open(os.path.join(world.base_model, "config.json")))["max_position_embeddings"]
    assert positions == 1024
    out = str(tmp_path / "o")
    # toy sizes: where the check is missing, each command would run (and must not run for long)
    steps = ["--max-steps", "1", "--batch-size", "8", "--micro-batch-size", "8"]
    cases = [
        (sft.main, ["--model", world.base_model, "--data", world.sft_train, "--max-len", "1025", "--eval-prompts",
                    "", *steps], "--max-len 1025"),
        (sft.main, ["--model", world.base_model, "--data", world.sft_train, "--max-len", "64", "--eval-prompts",
                    world.eval_prompts, "--eval-samples", "2", "--max-new-tokens", "1024", *steps],
         "--max-new-tokens 1024"),
        (reward.main, ["--model", world.base_model, "--train", world.pairs_train, "--test", "", "--max-len", "4096",
                       *steps], "--max-len 4096"),
        (meta_rm.main, ["--model", rm_checkpoint, "--train", world.pairs_train, "--test", "", "--meta-heldout", "",
                        "--max-len", "1025", "--max-steps", "1", "--batch-size", "4", "--meta-batch-size", "4",
                        "--micro-batch-size", "4"], "--max-len 1025"),
        (ppo.main, ["--sft", world.base_model, "--rm", rm_checkpoint, "--prompts", world.rl_prompts,
                    "--iterations", "1", "--prompts-per-iteration", "1", "--rollouts-per-prompt", "1",
                    "--mini-batch-size", "1", "--micro-batch-size", "1", "--max-new-tokens", "1024"],
         "--max-new-tokens 1024"),
        (meta_data.main, ["--policy", world.base_model, "--prompts", world.rl_prompts, "--max-prompts", "4",
                          "--heldout", "1", "--k", "2", "--max-new-tokens", "1024"], "--max-new-tokens 1024"),
        (evaluate.main, ["--rms", rm_checkpoint, "--max-len", "2048", "--pairs-test", world.pairs_test,
                         "--ood-pairs-test", ""], "--max-len 2048"),
        (evaluate.main, ["--policy-a", world.base_model, "--policy-b", world.base_model, "--prompts",
                         world.eval_prompts, "--max-prompts", "1", "--max-new-tokens", "1024"],
         "--max-new-tokens 1024"),
    ]
    for main, argv, needle in cases:
        with pytest.raises(UserError) as e:
            main([*argv, "--out", out])
        assert str(e.value).startswith(f"{needle}: more than the model in "), str(e.value)
        assert f"max_position_embeddings {positions})" in str(e.value)
        assert not os.path.exists(out)

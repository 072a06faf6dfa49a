"""Every command the README and docs/ print still runs as written: its program answers `--help`, and every flag the
command gives is one that program has. Commands are read from the documents themselves (fenced blocks and inline
code that start with python, .venv/bin/python or torchrun), so a command added or a flag renamed later is covered.
"""
import functools
import os
import re
import shlex
import sys

import pytest

from conftest import REPO, run_command

DOCUMENTS = ["README.md", *sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
                                  if n.endswith(".md"))]
NOT_OURS = {"pip", "pytest", "venv", "torch.distributed.run"}  # python -m ... of other programs


def command_lines(text: str) -> list[str]:
    """Commands in fenced code blocks (continuation lines joined, comments dropped) and in inline code spans."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.split(" #")[0].strip() for line in joined.splitlines()]
    out += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [c for c in out if re.match(r"^(\.venv/bin/)?(python|torchrun)\b", c.split("&&")[-1].strip())]


def program_and_flags(command: str) -> tuple[list[str], list[str]] | None:
    """(how to start the program: ['sft.py'] or ['-m', 'study'], the --flags the command gives), or None for a
    command that does not start one of ours (python3 -m venv, pip, pytest)."""
    command = command.split("&&")[-1].strip()
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    words = words[1:]  # python / .venv/bin/python / torchrun
    while words and (words[0].startswith("--standalone") or words[0].startswith("--nproc_per_node")
                     or words[0].startswith("--nnodes")):
        words = words[2:] if words[0] == "--nproc_per_node" else words[1:]
    if not words:
        return None
    if words[0] == "-m":
        if words[1] in NOT_OURS:
            return None
        program, rest = ["-m", words[1]], words[2:]
    elif words[0].endswith(".py"):
        program, rest = [words[0]], words[1:]
    else:
        return None
    flags = [w.split("=")[0] for w in rest if w.startswith("--")]
    return program, flags


def commands() -> list[tuple[str, list[str], list[str]]]:
    out = []
    for doc in DOCUMENTS:
        for line in command_lines(open(os.path.join(REPO, doc), encoding="utf-8").read()):
            parsed = program_and_flags(line)
            if parsed:
                out.append((doc, *parsed))
    return out


COMMANDS = commands()


@functools.lru_cache(maxsize=None)
def help_text(program: tuple[str, ...]) -> str:
    rc, out, err = run_command([*program, "--help"], timeout=120)
    assert rc == 0, f"{' '.join(program)} --help exited {rc}:\n{out}\n{err}"
    return out


def test_the_documents_hold_commands():
    programs = {" ".join(p) for _, p, _ in COMMANDS}
    # the README's two first commands, and every stage
    assert {"-m study", "sft.py", "reward.py", "meta_data.py", "meta_rm.py", "ppo.py", "evaluate.py",
            "-m testbed", "-m tools.convert_smollm2"} <= programs, programs


@pytest.mark.parametrize("doc, program, flags", COMMANDS,
                         ids=[f"{d}:{' '.join(p)}:{i}" for i, (d, p, _) in enumerate(COMMANDS)])
def test_every_command_runs_as_written(doc, program, flags):
    text = help_text(tuple(program))
    unknown = [f for f in flags if not re.search(rf"(^|[\s\[,]){re.escape(f)}\b", text, flags=re.M)]
    assert not unknown, f"{doc}: {' '.join(program)} has no {unknown}"


def test_the_reader_finds_a_renamed_flag():
    # teeth: a command with a flag the program does not have is caught
    line = "python sft.py --model runs/x --no-such-flag 3"
    program, flags = program_and_flags(line)
    assert program == ["sft.py"] and flags == ["--model", "--no-such-flag"]
    assert not re.search(r"(^|[\s\[,])--no-such-flag\b", help_text(tuple(program)), flags=re.M)
    assert program_and_flags("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt") is None
    assert program_and_flags(".venv/bin/python -m pytest -q") is None
    assert program_and_flags("torchrun --standalone --nproc_per_node=2 -m study.best_of_n --rm x") == (
        ["-m", "study.best_of_n"], ["--rm"])
    assert sys.executable  # the commands run with this interpreter (run_command)

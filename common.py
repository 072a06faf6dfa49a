"""Plumbing shared by every stage: arguments, errors, data files, processes, FSDP2, checkpoints, sampling.

Nothing in here is part of the method. The algorithm of each stage (the losses, Algorithm 1, PPO) lives in that
stage's own file; this module only holds what every stage needs the same way:

- `parse_args`   one `Args` dataclass per stage -> argparse flags (`--meta-order`), help text from the field metadata
- `UserError`    a mistake of the user's (bad file, bad flag): `run_main` prints it as one line and exits 2
- `read_jsonl`   JSONL / JSONL.gz / JSON-array reader that names file:line on every error
- `read_pairs`, `read_demonstrations`, `read_prompts`: the paper's public data sets (HH-RLHF, TL;DR comparisons,
                 OASST1, PKU-SafeRLHF) and plain JSONL -> the internal records {prompt, chosen, rejected},
                 {prompt, response}, prompt strings; `--data-format auto` tells them apart by their field names
- `init_distributed`, `print0`, `seed_everything`: one code path for `python x.py` and `torchrun` (gloo on CPU,
                 nccl on CUDA)
- `load_model`, `save_model`: Hugging Face `save_pretrained` folders in, out; FSDP2 (`fully_shard` per decoder
                 layer, then the root) when world size > 1; rank 0 reads the weights and broadcasts them
- `encode`, `prompt_ids`: how a (prompt, response) becomes token ids, the chat template included
                 (`--chat-template auto`: HH-style conversations go through the tokenizer's template when it has one)
- `generate`     batched nucleus sampling with the KV cache, shared by the meta data set, PPO and evaluation
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------------------
# Errors: a user's mistake is one clear line and exit code 2, never a traceback.
# ---------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): reported as one line, exit status 2."""


class NothingToDo(Exception):
    """`--resume` found a finished run: reported as one line, exit status 0."""


def run_main(main: Callable[[], Any]) -> None:
    """Call `main()`; turn a `UserError` into one line on stderr (rank 0 only) and exit status 2.

    Every rank sees the same inputs, so every rank raises the same error and exits; printing it once is enough.
    The process group, if any, is torn down first so torchrun does not wait on a rank that left.
    """
    try:
        main()
    except NothingToDo as e:
        print0(str(e))
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(2)
    # torchrun workers have been seen to abort at interpreter exit *after* the work finished (DESIGN.md §7);
    # ending the process here, after everything was flushed and saved, makes the exit status reliable.
    if dist.is_initialized():
        dist.destroy_process_group()
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# Arguments: one dataclass per stage, one flag per field.
# ---------------------------------------------------------------------------------------------------------------
def arg(default: Any, help: str, choices: Iterable[Any] | None = None) -> Any:
    """A dataclass field with its help text (shown by --help) and optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (rank 0 only under torchrun) and exit status 2, like a
    `UserError`; the default prints the whole usage block first, from every rank."""

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(cls: type, argv: list[str] | None = None) -> Any:
    """Build an argparse parser from the dataclass `cls` and return an instance filled from `argv`.

    Field `meta_order` becomes flag `--meta-order`; a bool field becomes `--flag / --no-flag`. Unknown flags,
    abbreviations and values of the wrong type are refused with one line naming the flag and exit status 2.
    """
    parser = _OneLineErrorParser(
        description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a flag is exactly its field's name; `--meta` must not silently mean `--meta-order`
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[T] -> T
        parser.add_argument(flag, type=kind, default=f.default, help=help_text, choices=f.metadata.get("choices"))
    return cls(**vars(parser.parse_args(argv)))


def save_args(args: Any, folder: str) -> None:
    """Write the full arguments of a run as `args.json` inside a checkpoint or output folder."""
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2, sort_keys=True)


def check(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds (argument validation)."""
    if not condition:
        raise UserError(message)


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str, fields: Iterable[str] = ()) -> list[dict]:
    """Read a .jsonl or .json (array of objects) file, either one optionally gzipped (.gz); every record must hold
    `fields` as strings/lists.

    Errors name the file and line: `data.jsonl:17: missing field 'chosen'`. An empty file is an error too.
    """
    out = []
    for lineno, r in _read_numbered(path):
        _check_fields(path, lineno, r, fields)
        out.append(r)
    return out


def _read_numbered(path: str, json_lines_in_json: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) of every record of a .jsonl / .json / .gz file; errors name file:line.

    A .json file is a JSON array (its "line" numbers are positions in the array), except that with
    `json_lines_in_json` a .json file that does not start with "[" is read as JSON lines: OpenAI's
    summarize_from_feedback comparisons are JSON lines named batchN.json."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    is_array = path.removesuffix(".gz").endswith(".json") and (
        not json_lines_in_json or text.lstrip().startswith("["))
    records: list[tuple[int, Any]] = []
    if is_array:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        records = [(i + 1, r) for i, r in enumerate(data)]  # "line" = position in the array for .json
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not records:
        raise UserError(f"{path}: empty file (no records)")
    for lineno, r in records:
        if not isinstance(r, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
    return records


def _check_fields(path: str, lineno: int, r: dict, fields: Iterable[str], types: tuple = (str, list)) -> None:
    for name in fields:
        if name not in r:
            raise UserError(f"{path}:{lineno}: missing field '{name}'")
        if not isinstance(r[name], types):
            kind = "a string" if types == (str,) or types == (str, list) else "/".join(t.__name__ for t in types)
            raise UserError(f"{path}:{lineno}: field '{name}' must be {kind}, got {type(r[name]).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# The paper's data sets (DESIGN.md §6) -> internal records. Every public format becomes
#     pairs           {prompt, chosen, rejected}     (reward.py, meta_rm.py, evaluate.py)
#     demonstrations  {prompt, response}             (sft.py)
#     prompts         prompt strings                 (meta_data.py, ppo.py, evaluate.py)
# so the stages never see a public format. Conventions shared by every format, taken from HH-RLHF (the paper's main
# data set): a dialogue prompt is "\n\nHuman: …\n\nAssistant:" (one "\n\nHuman:" / "\n\nAssistant:" per turn) and a
# response starts with one space. Converting OASST1 and PKU-SafeRLHF prompts into the same form is what makes the
# paper's OOD variant (S from OASST1 / PKU prompts, D from HH-RLHF) see one prompt format, and it lets
# `--chat-template auto` recognise them as conversations.
# ---------------------------------------------------------------------------------------------------------------
DATA_FORMATS = ("auto", "plain", "hh", "tldr", "oasst1", "pku")
DATA_FORMAT_HELP = ("data format: plain {prompt, chosen, rejected} / {prompt, response} / {prompt}; hh (Anthropic "
                    "HH-RLHF); tldr (summarize_from_feedback comparisons); oasst1 (message table); pku "
                    "(PKU-SafeRLHF); auto = from the field names of the first record")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def read_pairs(path: str, data_format: str = "auto", preference: str = "safer") -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} from any format (see `load_data`)."""
    return load_data(path, "pairs", data_format, preference)[0]


def read_demonstrations(path: str, data_format: str = "auto", preference: str = "safer") -> list[dict]:
    """Demonstrations {prompt, response} for SFT: the preferred response of each pair of a preference format."""
    return load_data(path, "demonstrations", data_format, preference)[0]


def read_prompts(path: str, data_format: str = "auto") -> list[str]:
    """Prompt strings, in file order (de-duplicated for the public formats, which repeat a prompt per comparison)."""
    return [r["prompt"] for r in load_data(path, "prompts", data_format)[0]]


def load_data(path: str, kind: str, data_format: str = "auto", preference: str = "safer",
              verbose: bool = True) -> tuple[list[dict], str, dict[str, int]]:
    """Read `path` as `kind` ("pairs", "demonstrations" or "prompts") -> (records, format used, dropped counts).

    Which pairs / demonstrations / prompts each format gives:
      plain   records as they are: pairs need prompt, chosen, rejected; demonstrations prompt, response (or chosen);
              prompts need prompt (kept in order, repeats kept: the testbed's files are read exactly as before)
      hh      chosen and rejected are whole conversations; both are split at their last "\n\nAssistant:" into
              prompt (ending with it) and response (the rest, starting with a space); the two prompts must match
      tldr    comparisons {info {post, title, subreddit}, summaries [2 x {text}], choice}: prompt
              "SUBREDDIT: r/…\nTITLE: …\nPOST: …\nTL;DR:", response " " + text stripped,
              chosen = summaries[choice];
              the filtered TL;DR SFT data {subreddit, title, post, summary} gives demonstrations and prompts
      oasst1  the flat message table: prompts = root prompter messages; pairs = for every prompter message (with its
              thread as context), every two sibling assistant replies with a rank, the lower rank preferred (all
              C(n, 2) pairs of n ranked replies, as each is implied by the ranking); demonstrations = the best-ranked
              reply; deleted messages (and the replies below them) are left out
      pku     PKU-SafeRLHF {prompt, response_0, response_1, safer_response_id, better_response_id}: chosen =
              response_<safer_response_id> (`preference` "safer") or response_<better_response_id> ("better");
              prompt "\n\nHuman: <prompt>\n\nAssistant:"
    Pairs whose two responses are identical are dropped and counted (so are HH pairs whose contexts differ and OASST1
    siblings of equal rank); with `verbose` one line reports the format and what was dropped. Malformed records are
    a `UserError` naming file:line.
    """
    assert kind in ("pairs", "demonstrations", "prompts"), kind
    check(data_format in DATA_FORMATS, f"--data-format {data_format}: not one of {', '.join(DATA_FORMATS)}")
    check(preference in ("safer", "better"), f"--preference {preference}: not one of safer, better")
    rows = _read_numbered(path, json_lines_in_json=True)
    fmt = detect_format(path, *rows[0]) if data_format == "auto" else data_format
    dropped: dict[str, int] = {}
    reader = {"plain": _plain, "hh": _hh, "tldr": _tldr, "oasst1": _oasst1, "pku": _pku}[fmt]
    records = reader(path, rows, kind, preference, dropped)
    if kind == "pairs":
        same = [r for r in records if r["chosen"] == r["rejected"]]
        if same:
            dropped["identical responses"] = len(same)
            records = [r for r in records if r["chosen"] != r["rejected"]]
    if kind == "prompts" and fmt != "plain":  # one prompt per comparison in the public files: keep the first
        seen: set[str] = set()
        unique = [r for r in records if not (r["prompt"] in seen or seen.add(r["prompt"]))]
        if len(unique) < len(records):
            dropped["repeated prompts"] = len(records) - len(unique)
        records = unique
    if not records:
        raise UserError(f"{path}: no {kind} in this {fmt} file" + (f" ({_dropped_text(dropped)})" if dropped else ""))
    if verbose and (fmt != "plain" or dropped):
        print0(f"{path}: {fmt} format, {len(records)} {kind}"
               + (f"; dropped {_dropped_text(dropped)}" if dropped else ""))
    return records, fmt, dropped


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} ({why})" for why, n in dropped.items())


def detect_format(path: str, lineno: int, record: dict) -> str:
    """The data format from the field names of the first record; one line naming file:line when none fits."""
    keys = set(record)
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst1"
    if {"info", "summaries", "choice"} <= keys or {"subreddit", "title", "post", "summary"} <= keys:
        return "tldr"
    if {"prompt", "response_0", "response_1"} <= keys:
        return "pku"
    if {"chosen", "rejected"} <= keys and "prompt" not in keys:
        return "hh"
    if "prompt" in keys:
        return "plain"
    raise UserError(f"{path}:{lineno}: cannot tell the data format from the fields {sorted(keys)}: expected "
                    "{prompt, ...} (plain), {chosen, rejected} (hh), {info, summaries, choice} (tldr), "
                    "{message_id, parent_id, role, text} (oasst1) or {prompt, response_0, response_1} (pku); "
                    "or name it with --data-format")


def hh_prompt(user_text: str) -> str:
    """One user turn as an HH-style prompt: "\n\nHuman: <text>\n\nAssistant:"."""
    return f"{HUMAN} {user_text.strip()}{ASSISTANT}"


def _response(text: str) -> str:
    """A response in the HH convention: one leading space, the text stripped."""
    return " " + text.strip()


def _plain(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    if kind == "pairs":
        fields = ["prompt", "chosen", "rejected"]
    elif kind == "demonstrations":
        fields = ["prompt", "response" if "response" in rows[0][1] or "chosen" not in rows[0][1] else "chosen"]
    else:
        fields = ["prompt"]
    out = []
    for lineno, r in rows:
        _check_fields(path, lineno, r, fields)
        out.append(r if fields[-1] != "chosen" else {"prompt": r["prompt"], "response": r["chosen"]})
    return out


def split_hh(text: str) -> tuple[str, str] | None:
    """An HH conversation -> (prompt up to and including its last "\n\nAssistant:", the response after it)."""
    i = text.rfind(ASSISTANT)
    return None if i < 0 else (text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):])


def _hh(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    out = []
    for lineno, r in rows:
        _check_fields(path, lineno, r, ["chosen"] if kind != "pairs" else ["chosen", "rejected"], (str,))
        chosen = split_hh(r["chosen"])
        if chosen is None:
            raise UserError(f"{path}:{lineno}: field 'chosen' has no '\\n\\nAssistant:' turn (not HH-RLHF)")
        if kind != "pairs":
            out.append({"prompt": chosen[0], "response": chosen[1]})
            continue
        rejected = split_hh(r["rejected"])
        if rejected is None:
            raise UserError(f"{path}:{lineno}: field 'rejected' has no '\\n\\nAssistant:' turn (not HH-RLHF)")
        if chosen[0] != rejected[0]:
            dropped["chosen and rejected differ before the last Assistant turn"] = dropped.get(
                "chosen and rejected differ before the last Assistant turn", 0) + 1
            continue
        out.append({"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]})
    return out


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """The usual TL;DR query (Stiennon et al. 2020)."""
    return f"SUBREDDIT: r/{subreddit.strip()}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def _tldr(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    out = []
    for lineno, r in rows:
        if "summary" in r and "info" not in r:  # the filtered TL;DR SFT data: one reference summary per post
            check(kind != "pairs", f"{path}:{lineno}: a TL;DR post with one summary has no preference pair "
                                   "(comparisons have info, summaries, choice)")
            _check_fields(path, lineno, r, ["subreddit", "title", "post", "summary"], (str,))
            out.append({"prompt": tldr_prompt(r["subreddit"], r["title"], r["post"]),
                        "response": _response(r["summary"])})
            continue
        _check_fields(path, lineno, r, ["info"], (dict,))
        _check_fields(path, lineno, r, ["summaries"], (list,))
        info, summaries, choice = r["info"], r["summaries"], r.get("choice")
        if not isinstance(info.get("post"), str):
            raise UserError(f"{path}:{lineno}: info has no string 'post' (CNN/DM comparisons are not read)")
        _check_fields(path, lineno, info, ["title", "subreddit"], (str,))
        ok = len(summaries) == 2 and all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries)
        check(ok, f"{path}:{lineno}: 'summaries' must be two objects with a string 'text'")
        check(choice in (0, 1) and not isinstance(choice, bool),
              f"{path}:{lineno}: 'choice' must be 0 or 1, got {choice!r}")
        prompt = tldr_prompt(info["subreddit"], info["title"], info["post"])
        chosen, rejected = _response(summaries[choice]["text"]), _response(summaries[1 - choice]["text"])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if kind == "pairs"
                   else {"prompt": prompt, "response": chosen})
    return out


def _oasst1(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    messages: dict[str, dict] = {}
    line_of: dict[str, int] = {}
    for lineno, r in rows:
        _check_fields(path, lineno, r, ["message_id", "text", "role"], (str,))
        check(r["role"] in ("prompter", "assistant"), f"{path}:{lineno}: 'role' must be prompter or assistant, "
                                                      f"got {r['role']!r}")
        check("parent_id" in r and (r["parent_id"] is None or isinstance(r["parent_id"], str)),
              f"{path}:{lineno}: 'parent_id' must be a message id or null")
        rank = r.get("rank")
        check(rank is None or (isinstance(rank, int) and not isinstance(rank, bool)),
              f"{path}:{lineno}: 'rank' must be an integer or null, got {rank!r}")
        check(r["message_id"] not in messages, f"{path}:{lineno}: message_id {r['message_id']!r} appears twice")
        messages[r["message_id"]] = r
        line_of[r["message_id"]] = lineno
    for mid, r in messages.items():
        check(r["parent_id"] is None or r["parent_id"] in messages,
              f"{path}:{line_of[mid]}: parent_id {r['parent_id']!r} is not in the file")

    def alive(r: dict) -> bool:  # neither the message nor any message above it is deleted
        while r is not None:
            if r.get("deleted"):
                return False
            r = messages.get(r["parent_id"]) if r["parent_id"] is not None else None
        return True

    def thread(r: dict) -> str:  # the conversation up to and including prompter message r, as an HH prompt
        turns = []
        while r is not None:
            turns.append(f"{HUMAN if r['role'] == 'prompter' else ASSISTANT} {r['text'].strip()}")
            r = messages[r["parent_id"]] if r["parent_id"] is not None else None
        return "".join(reversed(turns)) + ASSISTANT

    live = [r for r in messages.values() if alive(r)]
    if len(live) < len(messages):
        dropped["deleted messages"] = len(messages) - len(live)
    if kind == "prompts":
        return [{"prompt": hh_prompt(r["text"])} for r in live if r["parent_id"] is None and r["role"] == "prompter"]
    replies: dict[str, list[dict]] = {}
    for r in live:
        if r["role"] == "assistant" and r.get("rank") is not None and r["parent_id"] is not None:
            replies.setdefault(r["parent_id"], []).append(r)
    out = []
    for parent_id, siblings in replies.items():
        parent = messages[parent_id]
        if parent["role"] != "prompter":
            continue
        prompt = thread(parent)
        siblings = sorted(siblings, key=lambda r: r["rank"])  # rank 0 = best
        if kind == "demonstrations":
            out.append({"prompt": prompt, "response": _response(siblings[0]["text"])})
            continue
        for i, better in enumerate(siblings):
            for worse in siblings[i + 1:]:
                if better["rank"] == worse["rank"]:
                    dropped["equal ranks"] = dropped.get("equal ranks", 0) + 1
                    continue
                out.append({"prompt": prompt, "chosen": _response(better["text"]),
                            "rejected": _response(worse["text"])})
    return out


def _pku(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    out = []
    key = f"{preference}_response_id"
    for lineno, r in rows:
        _check_fields(path, lineno, r, ["prompt"] if kind == "prompts" else ["prompt", "response_0", "response_1"],
                      (str,))
        prompt = hh_prompt(r["prompt"])
        if kind == "prompts":
            out.append({"prompt": prompt})
            continue
        check(r.get(key) in (0, 1) and not isinstance(r.get(key), bool),
              f"{path}:{lineno}: '{key}' must be 0 or 1, got {r.get(key)!r}")
        chosen, rejected = _response(r[f"response_{r[key]}"]), _response(r[f"response_{1 - r[key]}"])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if kind == "pairs"
                   else {"prompt": prompt, "response": chosen})
    return out


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename), so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL of metrics, written by rank 0 only. The file is opened for each line, so a crash loses
    nothing and a checkpoint save may move the folder that holds it."""

    def __init__(self, path: str):
        self.path = path

    def log(self, **metrics: Any) -> None:
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def prepare_output(folder: str, overwrite: bool, resume: bool = False, state: dict | None = None) -> None:
    """Refuse to write into a folder that already holds files, unless --overwrite (then its old metrics.jsonl is
    removed; its checkpoint files are replaced only when the new checkpoint is complete, see `save_model`) or
    --resume (`state` from `resume_state`: metrics.jsonl is cut back to the lines written before that checkpoint,
    so the resumed run appends exactly what the interrupted one would have; no state: a fresh start)."""
    exists = os.path.isdir(folder) and len(os.listdir(folder)) > 0
    check(not exists or overwrite or resume,
          f"{folder}: output folder already holds files (pass --resume to continue that run, --overwrite to replace it)")
    check(not os.path.exists(folder) or os.path.isdir(folder), f"{folder}: exists and is not a folder")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 creates the folder
    if is_main():
        os.makedirs(folder, exist_ok=True)
        metrics = os.path.join(folder, "metrics.jsonl")
        if state is not None and os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.readlines()[: state["metrics_lines"]]
            write_lines(metrics, lines)
        elif (overwrite or resume) and os.path.exists(metrics):
            os.remove(metrics)


def write_lines(path: str, lines: list[str]) -> None:
    """Replace a text file atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Processes: `python stage.py` (world size 1) and `torchrun --nproc_per_node=N stage.py` share one code path.
# ---------------------------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; return (rank, world_size, device).

    The backend follows the device: nccl for CUDA, gloo for CPU. Without torchrun nothing is initialised and the
    stage runs as a plain single process.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a: Any, **k: Any) -> None:
    """print on rank 0 only (every other rank would print the same line)."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(" ".join(str(x) for x in a), **k)  # keeps a progress bar intact below the line


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch. Each rank gets seed + rank so ranks sample different things where they
    sample independently (generation); data order is drawn from separate generators seeded with `seed` alone."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def all_reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Average a dict of python floats across ranks (for printing metrics that each rank computed on its share)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}


def all_reduce_sum(x: float, world: int) -> float:
    """Sum a python float over ranks."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


class NonFiniteError(UserError):
    """A loss or gradient became NaN/inf: the stage stops, naming the step and quantity; no checkpoint is written.
    The check comes before anything is saved in that step, so the last checkpoint holds finite weights."""


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}; stopping (the last saved checkpoint is untouched)")


def clip_grad_norm(model: torch.nn.Module, max_norm: float, what: str = "gradient norm") -> float:
    """Clip the global gradient norm (over all ranks under FSDP2) and return the norm before clipping; a non-finite
    norm stops the stage (`what` names it in the message, e.g. "sft step 12: gradient norm")."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    norm = norm.item()
    check_finite(norm, what)
    return norm


def split_batch(global_batch: int, micro_batch: int, world: int, flag: str = "--batch-size") -> int:
    """Gradient-accumulation steps so that global = micro x accumulation x world; a clear error otherwise."""
    check(global_batch > 0 and micro_batch > 0, f"{flag} and --micro-batch-size must be positive")
    check(global_batch % (micro_batch * world) == 0,
          f"{flag} {global_batch} is not divisible by --micro-batch-size {micro_batch} x world size {world}")
    return global_batch // (micro_batch * world)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (about 4x faster matmuls on this CPU); fp32 otherwise (the reference)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# ---------------------------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------------------------
def check_checkpoint(path: str, what: str = "checkpoint") -> None:
    """A model folder must hold config.json and weights; otherwise one clear line (a missing or half-written save)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such {what} folder")
    names = os.listdir(path)
    if "config.json" not in names:
        raise UserError(f"{path}: not a model folder (no config.json)")
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        raise UserError(f"{path}: no *.safetensors weights (half-written or not a save_pretrained folder)")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model: the modules whose class is listed in `_no_split_modules`
    (LlamaDecoderLayer, GPT2Block, ...). Each becomes its own FSDP2 unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """FSDP2: `fully_shard` every decoder layer, then the root. At world size 1 the model stays a plain module."""
    if world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def load_model(cls: Any, path: str, world: int, device: torch.device, **overrides: Any) -> torch.nn.Module:
    """Load a `save_pretrained` folder as `cls` (AutoModelForCausalLM, AutoModelForSequenceClassification, ...).

    World size 1: plain `from_pretrained`. World size > 1 (FSDP2): every rank builds the model on the meta device
    (no memory), shards it and allocates only its shard; rank 0 alone reads the weights from disk and broadcasts
    them (`broadcast_from_rank0`), so a 7B model is never held in full by more than one process. Buffers that are
    not saved (Llama's rotary `inv_freq`) are garbage after `to_empty`, so rank 0 broadcasts those too.
    `overrides` go to the config (e.g. num_labels=1, attn_implementation="eager").
    """
    check_checkpoint(path)
    from transformers import AutoConfig

    if world == 1:
        return cls.from_pretrained(path, dtype=torch.float32, **overrides).to(device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in overrides.items() if k != "attn_implementation"})
    if "attn_implementation" in overrides:
        config._attn_implementation = overrides["attn_implementation"]
    with torch.device("meta"):
        model = cls.from_config(config, dtype=torch.float32)
    shard(model, world)
    model.to_empty(device=device)
    full = cls.from_pretrained(path, dtype=torch.float32, **overrides) if dist.get_rank() == 0 else None
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if full is not None:
            buf.copy_(full_buffers[name])
        dist.broadcast(buf, src=0)
    del full
    return model


def full_state_dict(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: on rank 0 (gathered from the shards under FSDP2); `{}` on the other ranks."""
    if world == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model: torch.nn.Module, tokenizer: Any, folder: str, world: int, args: Any = None,
               trainer_state: dict | None = None) -> None:
    """Save a checkpoint that `from_pretrained` loads with transformers alone: config, safetensors, tokenizer,
    the run's args.json and, for `--resume`, `trainer_state` (from `training_state`) as trainer_state.pt. All ranks
    must call it (gathering the shards is collective); rank 0 writes.

    The folder is written under a temporary name and renamed into place, so a crash in the middle of a save leaves
    the previous checkpoint untouched (and the trainer state always belongs to the weights beside it). A plain copy of the model class is built on the meta device and given the
    gathered tensors, so the saved config names the plain architecture (not the FSDP wrapper).
    """
    state = full_state_dict(model, world)
    if is_main():
        config = model.config
        plain_cls = _unwrapped_class(model)
        with torch.device("meta"):
            plain = plain_cls(config)
        plain.load_state_dict(state, assign=True, strict=False)  # strict=False: a tied lm_head may be absent
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        assert not missing, f"save_model: no weights gathered for {missing}"  # would be saved as garbage
        tmp = folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if args is not None:
            save_args(args, tmp)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
        old = folder.rstrip("/") + ".old"
        if os.path.isdir(folder):  # keep what is not part of this checkpoint (metrics.jsonl, ppo's critic/, ...)
            for name in os.listdir(folder):
                src, dst = os.path.join(folder, name), os.path.join(tmp, name)
                if os.path.exists(dst) or name == TRAINER_STATE:  # an old trainer state would not match the weights
                    continue
                if os.path.isfile(src):
                    shutil.copy2(src, dst)
                elif os.path.isdir(src):  # a nested checkpoint: hard links, so a 7B critic costs no copy and no disk
                    shutil.copytree(src, dst, copy_function=os.link)
        _fsync_folder(tmp)
        # Test-only hook (tests/test_reliability.py), never set in normal runs: pause between the complete temporary
        # folder and the rename, after printing a marker, so that a test can SIGKILL the process in mid-save.
        if os.environ.get("METARM_TEST_SLOW_SAVE"):
            print(f"test hook: {tmp} written, renaming in {os.environ['METARM_TEST_SLOW_SAVE']} s", flush=True)
            time.sleep(float(os.environ["METARM_TEST_SLOW_SAVE"]))
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)  # between these two renames the previous checkpoint is FOLDER.old (see recover_save)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    # Test-only hook, never set in normal runs: die like a preempted job (SIGKILL) right after the n-th save.
    global _saves_done
    _saves_done += 1
    if os.environ.get("METARM_TEST_DIE_AFTER_SAVES") == str(_saves_done):
        os.kill(os.getpid(), signal.SIGKILL)


_saves_done = 0  # completed saves of this process (for the test-only hook above)


def _fsync_folder(folder: str) -> None:
    """Flush every file of `folder` to disk before it is renamed into place (a rename can reach the disk before the
    data it names; after a power loss the checkpoint would then be there but empty)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _unwrapped_class(model: torch.nn.Module) -> type:
    """FSDP2 swaps a module's class for a subclass named FSDP<Name>; return the original Hugging Face class."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


# ---------------------------------------------------------------------------------------------------------------
# Resuming (--save-every N, --resume): everything a run needs to continue bit for bit from a checkpoint. The trainer
# state is one file inside the checkpoint folder, so the atomic rename of `save_model` covers it with the weights.
# ---------------------------------------------------------------------------------------------------------------
TRAINER_STATE = "trainer_state.pt"
SAVE_EVERY_HELP = ("every N optimiser steps, save a resumable checkpoint into --out (weights, optimiser, data order, "
                   "RNG states; continue with --resume); 0 = only the final model, which is then not resumable")
RESUME_HELP = ("continue the run in --out from its latest --save-every checkpoint (the same essential flags are "
               "required); a folder without one starts from scratch")


def training_state(step: int, optimizers: list[tuple[torch.nn.Module, torch.optim.Optimizer]], world: int,
                   metrics: "MetricsLog", finished: bool = False, **extra: Any) -> dict | None:
    """The trainer state after `step` optimiser steps: each optimiser's full state (gathered from the FSDP2 shards),
    the RNG states of every rank (python, numpy, torch, CUDA), how many metrics lines were written, and the stage's
    `extra` (its data order and generator states). Collective (every rank calls it); rank 0 gets it, others None."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world if is_main() else None
        dist.gather_object(rng, rngs, dst=0)
    # a finished run is never continued, so its final save skips the optimiser state (as large as 2 models for Adam)
    optimizer_states = [] if finished else [_optimizer_state(model, opt, world) for model, opt in optimizers]
    if not is_main():
        return None
    lines = 0
    if os.path.exists(metrics.path):
        with open(metrics.path) as f:
            lines = sum(1 for _ in f)
    return dict(step=step, finished=finished, optimizers=optimizer_states, rng=rngs, metrics_lines=lines,
                extra=extra)


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int) -> dict:
    if world == 1:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resume_state(args: Any, essential: Iterable[str]) -> dict | None:
    """For --resume: the trainer state of the checkpoint in args.out, or None when it holds no checkpoint yet (the
    run then starts from scratch). Refuses a checkpoint written with different `essential` flags (data, model, batch,
    learning rate, seed: anything that changes the result) and one saved without --save-every (no trainer state).
    A finished run (its final save) raises `NothingToDo`. Call before `prepare_output`."""
    folder = args.out
    recover_save(folder)
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.exists(path):
        check(not os.path.exists(os.path.join(folder, "config.json")),
              f"{folder}: --resume: this checkpoint has no {TRAINER_STATE} (it was saved without --save-every); "
              "pass --overwrite to start again")
        print0(f"--resume: no checkpoint in {folder} yet, starting from scratch")
        return None
    with open(os.path.join(folder, "args.json")) as f:
        saved = json.load(f)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in essential
               if saved.get(k) != getattr(args, k)]
    check(not changed, f"{folder}: --resume with different settings than the checkpoint ({'; '.join(changed)}); "
                       "use the same flags, or --overwrite / another --out for a new run")
    state = torch.load(path, weights_only=False, mmap=True)  # our own file (it holds numpy/python RNG states)
    if state["finished"]:
        raise NothingToDo(f"--resume: {folder} is a finished run ({state['step']} steps); nothing to do")
    print0(f"--resume: continuing {folder} after step {state['step']}")
    return state


def restore_training_state(state: dict, optimizers: list[tuple[torch.nn.Module, torch.optim.Optimizer]],
                           world: int, rank: int) -> dict:
    """Put the optimisers and this rank's RNG states back as `training_state` saved them; return the stage's
    `extra`. Call after every model is built (building a model draws random numbers). At another world size the
    data order still resumes exactly, but the per-rank RNG streams cannot, so they are left as seeded (a note)."""
    for (model, opt), saved in zip(optimizers, state["optimizers"]):
        if world == 1:
            opt.load_state_dict(saved)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, saved, options=StateDictOptions(full_state_dict=True))
    if len(state["rng"]) == world:
        rng = state["rng"][rank]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print0(f"note: the checkpoint was written by {len(state['rng'])} processes, this run has {world}: random "
               "streams (sampling) are not those of the interrupted run; data order and optimiser are")
    return state["extra"]


def recover_save(folder: str) -> None:
    """A save killed between its two renames (see `save_model`) leaves the previous checkpoint as FOLDER.old and no
    FOLDER: move it back. A leftover FOLDER.tmp is an incomplete save and is removed."""
    if is_main():
        old, tmp = folder.rstrip("/") + ".old", folder.rstrip("/") + ".tmp"
        if not os.path.exists(folder) and os.path.isdir(old):
            os.replace(old, folder)
            print0(f"note: an interrupted save left the previous checkpoint in {old}; moved it back to {folder}")
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Tokenising (prompt, response) pairs the same way in every stage
# ---------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
CHAT_TEMPLATE_HELP = ("prompts through the tokenizer's chat template: auto = when the tokenizer has one and the prompt "
                      "is an HH conversation ('\\n\\nHuman: …\\n\\nAssistant:'); on = always (other prompts become "
                      "one user turn); off = never. Give every stage the same value")


def is_conversation(prompt: str) -> bool:
    """An HH-style dialogue prompt: "\n\nHuman: …" turns ending with "\n\nAssistant:" (testbed and readers)."""
    return prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)


def chat_messages(prompt: str) -> list[dict]:
    """HH turns -> chat messages: "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" ->
    [user a, assistant b, user c] (the empty last Assistant turn is what add_generation_prompt adds back).
    A prompt that is not a conversation is one user message."""
    if not is_conversation(prompt):
        return [{"role": "user", "content": prompt.strip()}]
    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt[: -len(ASSISTANT)])  # ['', HUMAN, ' a', ASSISTANT, ...]
    return [{"role": "user" if tag == HUMAN else "assistant", "content": text.strip()}
            for tag, text in zip(parts[1::2], parts[2::2])]


def uses_chat_template(tokenizer: Any, prompt: str, mode: str = "auto") -> bool:
    """Whether `prompt` goes through the tokenizer's chat template (see CHAT_TEMPLATE_HELP)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on":
        check(has_template, "--chat-template on: the tokenizer has no chat template")
        return True
    return mode == "auto" and has_template and is_conversation(prompt)


def prompt_ids(tokenizer: Any, prompt: str, chat_template: str = "auto") -> list[int]:
    """Token ids of a prompt, the same in training (encode) and in sampling (generate).

    Without a chat template: the text with the tokenizer's special tokens (a BOS where the model uses one). With one:
    the HH turns become messages and the template renders them with add_generation_prompt=True (for SmolLM2:
    "<|im_start|>system\n…<|im_end|>\n<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n"); that text
    already holds its special tokens, so none are added when it is tokenised."""
    if not uses_chat_template(tokenizer, prompt, chat_template):
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode(tokenizer: Any, prompt: str, response: str | None, max_len: int,
           chat_template: str = "auto") -> tuple[list[int], int, bool]:
    """Token ids of prompt + response + EOS -> (ids, n_prompt_tokens, truncated).

    The prompt is tokenised by `prompt_ids` (special tokens, or the chat template), the response without special
    tokens, and EOS is appended: the model must learn to stop, and the reward model reads its score at that EOS
    (a chat model's EOS is its end-of-turn token, <|im_end|> for SmolLM2). Under a chat template the response's
    leading space (the HH convention, " Sure…") is dropped: the template's assistant turn starts on a new line.
    Prompt and response are tokenised separately so the boundary between them is the same in training and in
    generation. With `response=None` only the prompt is encoded (no EOS).
    Truncation rule, when longer than `max_len`: drop tokens from the *start* of the prompt first (the end of the
    prompt, "...Assistant:", matters most), keeping at least one prompt token; then cut the response's end.
    """
    p = prompt_ids(tokenizer, prompt, chat_template)
    if response is not None and uses_chat_template(tokenizer, prompt, chat_template):
        response = response.lstrip()
    r = [] if response is None else tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    truncated = len(p) + len(r) > max_len
    if truncated:
        p = p[-max(1, max_len - len(r)):]
        r = r[: max_len - len(p)]
    return p + r, len(p), truncated


def pad_right(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids -> (ids (B, T), attention_mask (B, T)). `fill` replaces pad in ids if given."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad lists of ids -> (ids (B, T), attention_mask (B, T)): every prompt ends at the last column."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Sampling (shared by the meta data set in meta_rm.py, rollouts in ppo.py and evaluate.py)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
             temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.1,
             do_sample: bool = True, world: int = 1,
             chat_template: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (batched, with the KV cache) -> (prompt_ids, response_ids).

    Prompts are tokenised by `prompt_ids` (the chat template where `chat_template` says so), as in training.

    prompt_ids   (B, P) left-padded with pad_token_id (so every prompt ends at the same column)
    response_ids (B, R) R <= max_new_tokens; each response is cut right after its first EOS, the rest is pad

    Under FSDP2 every rank must run the same number of forward passes (each one all-gathers parameters), so
    `synced_gpus=True` keeps a rank whose samples all hit EOS stepping until every rank is done.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_left([prompt_ids(tokenizer, p, chat_template) for p in prompts],
                                         tokenizer.pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kwargs: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  repetition_penalty=repetition_penalty, synced_gpus=world > 1)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if hasattr(model, "reshard"):
        model.reshard()  # after a no-grad forward the FSDP2 root stays unsharded (DESIGN.md §7)
    response = out[:, input_ids.shape[1]:]
    return input_ids, truncate_at_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)


def truncate_at_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Keep each row up to and including its first EOS; everything after it becomes pad. (B, R) -> (B, R)."""
    is_eos = response == eos_id
    # after_eos[b, t] is True when an EOS occurred strictly before t
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return response.masked_fill(after_eos, pad_id)


def sample_texts(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, world: int,
                 rank: int, batch_size: int = 64, **sampling: Any) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt, prompts spread over ranks; every rank gets all (text, ended_with_eos).

    Each rank takes prompts[rank::world]; the list is first padded (repeating its last prompt) to a multiple of the
    world size so every rank runs the same number of generate calls (FSDP2 forwards are collective)."""
    n = len(prompts)
    padded = prompts + [prompts[-1]] * ((-n) % world)
    mine = padded[rank::world]
    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(mine), batch_size):
        _, resp = generate(model, tokenizer, mine[i: i + batch_size], max_new_tokens=max_new_tokens, world=world,
                           **sampling)
        for row in resp.tolist():
            ended.append(tokenizer.eos_token_id in row)
            texts.append(tokenizer.decode([t for t in row if t not in (tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)]))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (texts, ended))
        texts = [gathered[i % world][0][i // world] for i in range(len(padded))]
        ended = [gathered[i % world][1][i // world] for i in range(len(padded))]
    return texts[:n], ended[:n]


def gold_rewards(prompts: list[str], responses: list[str]) -> list[float | None]:
    """The testbed's hidden gold reward of each (prompt, response); None where the prompt is not the testbed's (or
    the checkout has no testbed). Used only for reporting and judging; it never enters training."""
    try:
        import testbed
    except ImportError:  # a checkout or install without the testbed: nothing to report
        return [None] * len(prompts)
    return [testbed.gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def gold_scores(prompts: list[str], responses: list[str]) -> list[float] | None:
    """`gold_rewards` when every prompt is the testbed's, else None (the data is not the testbed's)."""
    scores = gold_rewards(prompts, responses)
    return None if any(s is None for s in scores) else scores

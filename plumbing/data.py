"""Data: files -> records -> token ids, the same way in every stage.
Nothing in here is part of the method.

- `read_jsonl`, `write_jsonl`  JSONL / JSONL.gz / JSON-array files; every error names file:line
- `read_pairs`, `read_demonstrations`, `read_prompts`: the paper's public data sets (HH-RLHF,
                 TL;DR comparisons, OASST1, PKU-SafeRLHF; docs/design.md §8) and plain JSONL -> the
                 internal records {prompt, chosen, rejected}, {prompt, response}, prompt strings;
                 `--data-format auto` tells them apart by their field names
- `prompt_ids`, `encode`  how a (prompt, response) becomes token ids, the chat template included
                 (`--chat-template auto`: HH-style conversations go through the tokenizer's template
                 when it has one)
- `pad`          lists of ids -> one (B, T) batch and its attention mask, padded on the right
                 (training, scoring) or on the left (generation: every prompt ends in the last
                 column)
"""
from __future__ import annotations

import gzip
import json
import os
import re
from typing import Any, Iterable

import torch

from plumbing.common import UserError, check, print0


# --------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------
def read_jsonl(path: str, fields: Iterable[str] = ()) -> list[dict]:
    """Read a .jsonl or .json (array of objects) file, either one optionally gzipped (.gz); every
    record must hold `fields` as strings/lists.

    Errors name the file and line: `data.jsonl:17: missing field 'chosen'`. An empty file is an
    error too.
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
        # "line" = position in the array for .json
        records = [(i + 1, r) for i, r in enumerate(data)]
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


def _check_fields(path: str, lineno: int, r: dict, fields: Iterable[str],
                  types: tuple = (str, list)) -> None:
    for name in fields:
        if name not in r:
            raise UserError(f"{path}:{lineno}: missing field '{name}'")
        if not isinstance(r[name], types):
            kind = ("a string" if types == (str,) or types == (str, list)
                    else "/".join(t.__name__ for t in types))
            raise UserError(f"{path}:{lineno}: field '{name}' must be {kind}, "
                            f"got {type(r[name]).__name__}")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename), so a crash never leaves
    half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The paper's data sets (docs/design.md §8) -> internal records. Every public format becomes
#     pairs           {prompt, chosen, rejected}     (reward.py, meta_rm.py, evaluate.py)
#     demonstrations  {prompt, response}             (sft.py)
#     prompts         prompt strings                 (meta_data.py, ppo.py, evaluate.py)
# so the stages never see a public format. Conventions shared by every format, taken from HH-RLHF
# (the paper's main data set): a dialogue prompt is "\n\nHuman: …\n\nAssistant:" (one
# "\n\nHuman:" / "\n\nAssistant:" per turn) and a response starts with one space. Converting OASST1
# and PKU-SafeRLHF prompts into the same form is what makes the paper's OOD variant (S from
# OASST1 / PKU prompts, D from HH-RLHF) see one prompt format, and it lets `--chat-template auto`
# recognise them as conversations.
# --------------------------------------------------------------------------------------------------
DATA_FORMATS = ("auto", "plain", "hh", "tldr", "oasst1", "pku")
DATA_FORMAT_HELP = ("data format: "
                    "plain {prompt, chosen, rejected} / {prompt, response} / {prompt}; "
                    "hh (Anthropic HH-RLHF); tldr (summarize_from_feedback comparisons); "
                    "oasst1 (message table); pku (PKU-SafeRLHF); "
                    "auto = from the field names of the first record")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def read_pairs(path: str, data_format: str = "auto", preference: str = "safer") -> list[dict]:
    """Preference pairs {prompt, chosen, rejected} from any format (see `load_data`)."""
    return load_data(path, "pairs", data_format, preference)[0]


def read_demonstrations(path: str, data_format: str = "auto",
                        preference: str = "safer") -> list[dict]:
    """Demonstrations {prompt, response} for SFT: the preferred response of each pair of a
    preference format."""
    return load_data(path, "demonstrations", data_format, preference)[0]


def read_prompts(path: str, data_format: str = "auto") -> list[str]:
    """Prompt strings, in file order (de-duplicated for the public formats, which repeat a prompt
    per comparison)."""
    return [r["prompt"] for r in load_data(path, "prompts", data_format)[0]]


def load_data(path: str, kind: str, data_format: str = "auto", preference: str = "safer",
              verbose: bool = True) -> tuple[list[dict], str, dict[str, int]]:
    """Read `path` as `kind` ("pairs", "demonstrations" or "prompts") ->
    (records, format used, dropped counts).

    Which pairs / demonstrations / prompts each format gives:
      plain   records as they are: pairs need prompt, chosen, rejected; demonstrations prompt,
              response (or chosen); prompts need prompt (kept in order, repeats kept: the testbed's
              files are read exactly as before)
      hh      chosen and rejected are whole conversations; both are split at their last
              "\n\nAssistant:" into prompt (ending with it) and response (the rest, starting with a
              space); the two prompts must match
      tldr    comparisons {info {post, title, subreddit}, summaries [2 x {text}], choice}: prompt
              "SUBREDDIT: r/…\nTITLE: …\nPOST: …\nTL;DR:", response " " + text stripped,
              chosen = summaries[choice];
              the filtered TL;DR SFT data {subreddit, title, post, summary} gives demonstrations and
              prompts
      oasst1  the flat message table: prompts = root prompter messages; pairs = for every prompter
              message (with its thread as context), every two sibling assistant replies with a rank,
              the lower rank preferred (all C(n, 2) pairs of n ranked replies, as each is implied by
              the ranking); demonstrations = the best-ranked reply; deleted messages (and the
              replies below them) are left out
      pku     PKU-SafeRLHF {prompt, response_0, response_1, safer_response_id, better_response_id}:
              chosen = response_<safer_response_id> (`preference` "safer") or
              response_<better_response_id> ("better"); prompt "\n\nHuman: <prompt>\n\nAssistant:"
    Pairs whose two responses are identical are dropped and counted (so are HH pairs whose contexts
    differ and OASST1 siblings of equal rank); with `verbose` one line reports the format and what
    was dropped. Malformed records are a `UserError` naming file:line.
    """
    assert kind in ("pairs", "demonstrations", "prompts"), kind
    check(data_format in DATA_FORMATS,
          f"--data-format {data_format}: not one of {', '.join(DATA_FORMATS)}")
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
    # one prompt per comparison in the public files: keep the first
    if kind == "prompts" and fmt != "plain":
        seen: set[str] = set()
        unique = [r for r in records if not (r["prompt"] in seen or seen.add(r["prompt"]))]
        if len(unique) < len(records):
            dropped["repeated prompts"] = len(records) - len(unique)
        records = unique
    if not records:
        raise UserError(f"{path}: no {kind} in this {fmt} file"
                        + (f" ({_dropped_text(dropped)})" if dropped else ""))
    if verbose and (fmt != "plain" or dropped):
        print0(f"{path}: {fmt} format, {len(records)} {kind}"
               + (f"; dropped {_dropped_text(dropped)}" if dropped else ""))
    return records, fmt, dropped


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} ({why})" for why, n in dropped.items())


def detect_format(path: str, lineno: int, record: dict) -> str:
    """The data format from the field names of the first record; one line naming file:line
    when none fits."""
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
    raise UserError(f"{path}:{lineno}: cannot tell the data format from the fields {sorted(keys)}: "
                    "expected {prompt, ...} (plain), {chosen, rejected} (hh), "
                    "{info, summaries, choice} (tldr), "
                    "{message_id, parent_id, role, text} (oasst1) "
                    "or {prompt, response_0, response_1} (pku); or name it with --data-format")


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
        fields = ["prompt", "response" if "response" in rows[0][1] or "chosen" not in rows[0][1]
                            else "chosen"]
    else:
        fields = ["prompt"]
    out = []
    for lineno, r in rows:
        _check_fields(path, lineno, r, fields)
        out.append(r if fields[-1] != "chosen"
                   else {"prompt": r["prompt"], "response": r["chosen"]})
    return out


def split_hh(text: str) -> tuple[str, str] | None:
    """An HH conversation -> (prompt up to and including its last "\n\nAssistant:",
    the response after it)."""
    i = text.rfind(ASSISTANT)
    return None if i < 0 else (text[: i + len(ASSISTANT)], text[i + len(ASSISTANT):])


def _hh(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    out = []
    for lineno, r in rows:
        _check_fields(path, lineno, r, ["chosen"] if kind != "pairs" else ["chosen", "rejected"],
                      (str,))
        chosen = split_hh(r["chosen"])
        if chosen is None:
            raise UserError(f"{path}:{lineno}: field 'chosen' has no '\\n\\nAssistant:' turn "
                            "(not HH-RLHF)")
        if kind != "pairs":
            out.append({"prompt": chosen[0], "response": chosen[1]})
            continue
        rejected = split_hh(r["rejected"])
        if rejected is None:
            raise UserError(f"{path}:{lineno}: field 'rejected' has no '\\n\\nAssistant:' turn "
                            "(not HH-RLHF)")
        if chosen[0] != rejected[0]:
            dropped["chosen and rejected differ before the last Assistant turn"] = dropped.get(
                "chosen and rejected differ before the last Assistant turn", 0) + 1
            continue
        out.append({"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]})
    return out


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """The usual TL;DR query (Stiennon et al. 2020)."""
    return (f"SUBREDDIT: r/{subreddit.strip()}\nTITLE: {title.strip()}\n"
            f"POST: {post.strip()}\nTL;DR:")


def _tldr(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    out = []
    for lineno, r in rows:
        # the filtered TL;DR SFT data: one reference summary per post
        if "summary" in r and "info" not in r:
            check(kind != "pairs", f"{path}:{lineno}: a TL;DR post with one summary has no "
                                   "preference pair (comparisons have info, summaries, choice)")
            _check_fields(path, lineno, r, ["subreddit", "title", "post", "summary"], (str,))
            out.append({"prompt": tldr_prompt(r["subreddit"], r["title"], r["post"]),
                        "response": _response(r["summary"])})
            continue
        _check_fields(path, lineno, r, ["info"], (dict,))
        _check_fields(path, lineno, r, ["summaries"], (list,))
        info, summaries, choice = r["info"], r["summaries"], r.get("choice")
        if not isinstance(info.get("post"), str):
            raise UserError(f"{path}:{lineno}: info has no string 'post' "
                            "(CNN/DM comparisons are not read)")
        _check_fields(path, lineno, info, ["title", "subreddit"], (str,))
        ok = len(summaries) == 2 and all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                         for s in summaries)
        check(ok, f"{path}:{lineno}: 'summaries' must be two objects with a string 'text'")
        check(choice in (0, 1) and not isinstance(choice, bool),
              f"{path}:{lineno}: 'choice' must be 0 or 1, got {choice!r}")
        prompt = tldr_prompt(info["subreddit"], info["title"], info["post"])
        chosen, rejected = (_response(summaries[choice]["text"]),
                            _response(summaries[1 - choice]["text"]))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if kind == "pairs"
                   else {"prompt": prompt, "response": chosen})
    return out


def _oasst1_messages(path: str, rows: list) -> dict[str, dict]:
    """The OASST1 message table by message_id, every row checked
    (fields, role, rank, parent in the file)."""
    messages: dict[str, dict] = {}
    line_of: dict[str, int] = {}
    for lineno, r in rows:
        _check_fields(path, lineno, r, ["message_id", "text", "role"], (str,))
        check(r["role"] in ("prompter", "assistant"),
              f"{path}:{lineno}: 'role' must be prompter or assistant, got {r['role']!r}")
        check("parent_id" in r and (r["parent_id"] is None or isinstance(r["parent_id"], str)),
              f"{path}:{lineno}: 'parent_id' must be a message id or null")
        rank = r.get("rank")
        check(rank is None or (isinstance(rank, int) and not isinstance(rank, bool)),
              f"{path}:{lineno}: 'rank' must be an integer or null, got {rank!r}")
        check(r["message_id"] not in messages,
              f"{path}:{lineno}: message_id {r['message_id']!r} appears twice")
        messages[r["message_id"]] = r
        line_of[r["message_id"]] = lineno
    for mid, r in messages.items():
        check(r["parent_id"] is None or r["parent_id"] in messages,
              f"{path}:{line_of[mid]}: parent_id {r['parent_id']!r} is not in the file")
    return messages


def _oasst1(path: str, rows: list, kind: str, preference: str, dropped: dict) -> list[dict]:
    messages = _oasst1_messages(path, rows)

    def alive(r: dict) -> bool:  # neither the message nor any message above it is deleted
        while r is not None:
            if r.get("deleted"):
                return False
            r = messages.get(r["parent_id"]) if r["parent_id"] is not None else None
        return True

    # the conversation up to and including prompter message r, as an HH prompt
    def thread(r: dict) -> str:
        turns = []
        while r is not None:
            turns.append(f"{HUMAN if r['role'] == 'prompter' else ASSISTANT} {r['text'].strip()}")
            r = messages[r["parent_id"]] if r["parent_id"] is not None else None
        return "".join(reversed(turns)) + ASSISTANT

    live = [r for r in messages.values() if alive(r)]
    if len(live) < len(messages):
        dropped["deleted messages"] = len(messages) - len(live)
    if kind == "prompts":
        return [{"prompt": hh_prompt(r["text"])} for r in live
                if r["parent_id"] is None and r["role"] == "prompter"]
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
        _check_fields(path, lineno, r,
                      ["prompt"] if kind == "prompts" else ["prompt", "response_0", "response_1"],
                      (str,))
        prompt = hh_prompt(r["prompt"])
        if kind == "prompts":
            out.append({"prompt": prompt})
            continue
        check(r.get(key) in (0, 1) and not isinstance(r.get(key), bool),
              f"{path}:{lineno}: '{key}' must be 0 or 1, got {r.get(key)!r}")
        chosen, rejected = (_response(r[f"response_{r[key]}"]),
                            _response(r[f"response_{1 - r[key]}"]))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} if kind == "pairs"
                   else {"prompt": prompt, "response": chosen})
    return out


# --------------------------------------------------------------------------------------------------
# Tokenising (prompt, response) pairs the same way in every stage
# --------------------------------------------------------------------------------------------------
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
CHAT_TEMPLATE_HELP = ("prompts through the tokenizer's chat template: "
                      "auto = when the tokenizer has one and the prompt is an HH conversation "
                      "('\\n\\nHuman: …\\n\\nAssistant:'); "
                      "on = always (other prompts become one user turn); "
                      "off = never. Give every stage the same value")


def is_conversation(prompt: str) -> bool:
    """An HH-style dialogue prompt: "\n\nHuman: …" turns ending with "\n\nAssistant:"
    (testbed and readers)."""
    return prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)


def chat_messages(prompt: str) -> list[dict]:
    """HH turns -> chat messages: "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" ->
    [user a, assistant b, user c] (the empty last Assistant turn is what add_generation_prompt
    adds back).
    A prompt that is not a conversation is one user message."""
    if not is_conversation(prompt):
        return [{"role": "user", "content": prompt.strip()}]
    # ['', HUMAN, ' a', ASSISTANT, ...]
    parts = re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt[: -len(ASSISTANT)])
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

    Without a chat template: the text with the tokenizer's special tokens (a BOS where the model
    uses one). With one: the HH turns become messages and the template renders them with
    add_generation_prompt=True (for SmolLM2:
    "<|im_start|>system\n…<|im_end|>\n<|im_start|>user\n…<|im_end|>\n<|im_start|>assistant\n"); that
    text already holds its special tokens, so none are added when it is tokenised."""
    if not uses_chat_template(tokenizer, prompt, chat_template):
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode(tokenizer: Any, prompt: str, response: str | None, max_len: int,
           chat_template: str = "auto") -> tuple[list[int], int, bool]:
    """Token ids of prompt + response + EOS -> (ids, n_prompt_tokens, truncated).

    The prompt is tokenised by `prompt_ids` (special tokens, or the chat template), the response
    without special tokens, and EOS is appended: the model must learn to stop, and the reward model
    reads its score at that EOS (a chat model's EOS is its end-of-turn token, <|im_end|> for
    SmolLM2). Under a chat template the response's leading space (the HH convention, " Sure…") is
    dropped: the template's assistant turn starts on a new line.
    Prompt and response are tokenised separately so the boundary between them is the same in
    training and in generation. With `response=None` only the prompt is encoded (no EOS).
    Truncation rule, when longer than `max_len`: drop tokens from the *start* of the prompt first
    (the end of the prompt, "...Assistant:", matters most), keeping at least one prompt token; then
    cut the response's end.
    """
    p = prompt_ids(tokenizer, prompt, chat_template)
    if response is not None and uses_chat_template(tokenizer, prompt, chat_template):
        response = response.lstrip()
    r = ([] if response is None
         else tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    truncated = len(p) + len(r) > max_len
    if truncated:
        p = p[-max(1, max_len - len(r)):]
        r = r[: max_len - len(p)]
    return p + r, len(p), truncated


def pad(seqs: list[list[int]], value: int,
        side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids (B, T), attention_mask (B, T)), T the longest list; the rest is `value`
    (the pad id, or -100 for a label tensor). `side="right"`: each row starts in column 0
    (training and scoring: the RM reads its score at the last non-pad token). `side="left"`: each
    row ends in the last column (prompts for generation, so every response starts in the same
    column)."""
    assert side in ("right", "left"), side
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask

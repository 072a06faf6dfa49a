"""Hand-checked behaviour of the plumbing's small pieces: EOS truncation (sampling.py), the JSONL reader and the
truncation rule of `encode` (data.py), and the flag names `parse_args` derives from an Args dataclass (common.py)."""
import dataclasses
import gzip
import json

import pytest
import torch

from plumbing import common, data, sampling
from plumbing.common import arg


# ---- truncate_at_eos -------------------------------------------------------------------------------------------
def test_truncate_at_eos_by_hand():
    # EOS = 0, PAD = 9. Row 0: EOS at column 1 -> keep [5, 0], then pad (the later EOS at column 3 is padded too).
    # Row 1: no EOS -> unchanged. Row 2: EOS first -> [0, 9, 9, 9]. Row 3: EOS last -> unchanged.
    response = torch.tensor([[5, 0, 6, 0],
                             [5, 6, 7, 8],
                             [0, 6, 7, 8],
                             [5, 6, 7, 0]])
    expected = torch.tensor([[5, 0, 9, 9],
                             [5, 6, 7, 8],
                             [0, 9, 9, 9],
                             [5, 6, 7, 0]])
    assert torch.equal(sampling.truncate_at_eos(response, eos_id=0, pad_id=9), expected)


# ---- read_jsonl ------------------------------------------------------------------------------------------------
RECORDS = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2", "extra": 3}]


def test_read_jsonl_plain_gzip_and_json_arrays(tmp_path):
    plain = tmp_path / "d.jsonl"
    plain.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")  # a blank line is skipped
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    array = tmp_path / "d.json"
    array.write_text(json.dumps(RECORDS, indent=1))
    array_gz = tmp_path / "d.json.gz"
    with gzip.open(array_gz, "wt") as f:
        f.write(json.dumps(RECORDS))
    for path in (plain, gz, array, array_gz):
        assert data.read_jsonl(str(path), ["prompt", "response"]) == RECORDS


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "bad.jsonl:2: not valid JSON"),
    ("missing.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', "missing.jsonl:3: missing field 'response'"),
    ("type.jsonl", '{"prompt": "a", "response": 7}\n', "type.jsonl:1: field 'response' must be a string"),
    ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: expected a JSON object"),
    ("empty.jsonl", "\n\n", "empty.jsonl: empty file"),
    ("notarray.json", '{"prompt": "a"}', "notarray.json: expected a JSON array"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(common.UserError) as e:
        data.read_jsonl(str(path), ["prompt", "response"])
    assert message in str(e.value) and str(e.value).startswith(str(path))


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(common.UserError, match="no such file"):
        data.read_jsonl(str(tmp_path / "nope.jsonl"))


# ---- encode ----------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (its code point); BOS = 1 in front when special tokens are added; EOS = 2."""
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [ord(c) for c in text]
        return type("Encoding", (), {"input_ids": ids})()


def test_encode_without_truncation():
    # prompt "ab" -> [BOS, a, b] (3 tokens), response "c" -> [c, EOS]
    ids, n_prompt, truncated = data.encode(CharTokenizer(), "ab", "c", max_len=10)
    assert (ids, n_prompt, truncated) == ([1, 97, 98, 99, 2], 3, False)


def test_encode_truncates_the_prompt_start_first():
    # prompt [BOS, a, b, c, d] (5) + response [x, y, EOS] (3) = 8 > max_len 6: drop 8 - 6 = 2 tokens from the
    # prompt's start (BOS and a) -> [b, c, d] + [x, y, EOS]. The rule keeps the *end* of the prompt.
    ids, n_prompt, truncated = data.encode(CharTokenizer(), "abcd", "xy", max_len=6)
    assert (ids, n_prompt, truncated) == ([98, 99, 100, 120, 121, 2], 3, True)


def test_encode_keeps_one_prompt_token_then_cuts_the_response_end():
    # prompt [BOS, a, b] + response [v, w, x, y, z, EOS] (6) = 9 > max_len 4: the prompt keeps only its last token
    # [b]; the response keeps its first 4 - 1 = 3 tokens [v, w, x] (EOS is cut: the response was truncated).
    ids, n_prompt, truncated = data.encode(CharTokenizer(), "ab", "vwxyz", max_len=4)
    assert (ids, n_prompt, truncated) == ([98, 118, 119, 120], 1, True)


def test_encode_prompt_only():
    assert data.encode(CharTokenizer(), "ab", None, max_len=10) == ([1, 97, 98], 3, False)


# ---- parse_args ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ToyArgs:
    meta_order: str = arg("first", "first or second", choices=("first", "second"))
    lr: float = arg(1e-3, "learning rate")
    steps: int = arg(2, "steps")
    bf16: bool = arg(False, "bf16")
    overwrite: bool = arg(True, "overwrite")


def test_parse_args_flag_names():
    assert common.parse_args(ToyArgs, []) == ToyArgs()
    a = common.parse_args(ToyArgs, ["--meta-order", "second", "--lr", "5e-6", "--steps", "7", "--bf16",
                                    "--no-overwrite"])
    assert a == ToyArgs(meta_order="second", lr=5e-6, steps=7, bf16=True, overwrite=False)


@pytest.mark.parametrize("argv, needle", [
    (["--meta_order", "second"], "--meta_order"),   # the underscore spelling is not a flag
    (["--meta-order", "third"], "--meta-order"),    # not one of the choices
    (["--lr", "abc"], "--lr"),                      # wrong type
    (["--bf16=yes"], "--bf16"),                     # a switch takes no value
])
def test_parse_args_refuses_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        common.parse_args(ToyArgs, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err


# ---- the loop pieces: Shuffled, due, count_steps, pad, essential fields --------------------------------------------
def _inline_order(n: int, batch: int, seed: int, steps: int, whole_batches: bool) -> list[list[int]]:
    """The data order as the stages drew it inline before common.Shuffled existed (reference twin): whole batches
    (sft, reward, D in meta_rm) refill a cut permutation when empty; cycling (S in meta_rm, ppo) appends one."""
    gen, order, out = torch.Generator().manual_seed(seed), [], []
    for _ in range(steps):
        if whole_batches:  # sft.py, reward.py, D in meta_rm.py
            if not order:
                order = torch.randperm(n, generator=gen).tolist()[: n // batch * batch]
        else:  # ppo.py's prompts (S in meta_rm.py, with `if` for `while`: S holds at least one batch)
            while len(order) < batch:
                order += torch.randperm(n, generator=gen).tolist()
        out.append(order[:batch])
        del order[:batch]
    return out


@pytest.mark.parametrize("n, batch, whole_batches", [(10, 4, True), (5, 3, False), (3, 8, False)])
def test_shuffled_draws_the_inline_order_and_resumes_exactly(n, batch, whole_batches):
    order = common.Shuffled(n, batch, seed=3, whole_batches=whole_batches)
    assert [order.take() for _ in range(7)] == _inline_order(n, batch, 3, 7, whole_batches)
    if whole_batches:  # 10 items in batches of 4: an epoch is 2 batches of one permutation, 2 items dropped
        first = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
        again = common.Shuffled(n, batch, seed=3, whole_batches=True)
        assert again.take() + again.take() == first[:8]
    # resume: a fresh Shuffled loaded with the state after 2 batches continues exactly
    a = common.Shuffled(n, batch, seed=5, whole_batches=whole_batches)
    a.take(), a.take()
    b = common.Shuffled(n, batch, seed=99, whole_batches=whole_batches)
    b.load_state_dict(a.state_dict())
    assert [b.take() for _ in range(5)] == [a.take() for _ in range(5)]


def test_due_every_n_steps_but_not_the_last():
    # every 2 steps of 5: after steps 2 and 4; every 2 of 4: only after step 2 (step 4 is the last one); 0 = never
    assert [s for s in range(1, 6) if common.due(2, s, 5)] == [2, 4]
    assert [s for s in range(1, 5) if common.due(2, s, 4)] == [2]
    assert not any(common.due(0, s, 5) for s in range(1, 6))


def test_count_steps():
    # 10 items in batches of 4: 2 whole batches per epoch; 2.5 epochs = floor(5.0) = 5 steps, or max_steps
    assert common.count_steps(10, 4, 2.5, -1, "x") == (2, 5)
    assert common.count_steps(10, 4, 2.5, 3, "x") == (2, 3)
    with pytest.raises(common.UserError, match="pairs.jsonl: 3 pairs, fewer than one batch of 4"):
        common.count_steps(3, 4, 1.0, -1, "pairs.jsonl: 3 pairs")


def test_pad_right_and_left():
    ids, mask = data.pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = data.pad([[1, 2, 3], [4]], 0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    labels, _ = data.pad([[7], [8, 9]], -100)
    assert labels.tolist() == [[7, -100], [8, 9]]


def test_essential_fields_in_declaration_order():
    @dataclasses.dataclass
    class Toy:
        lr: float = arg(1e-3, "learning rate", essential=True)
        out: str = arg("o", "output folder")
        seed: int = arg(0, "seed", essential=True)

    assert common.essential_fields(Toy()) == ["lr", "seed"]
    assert common.parse_args(Toy, ["--seed", "2"]) == Toy(seed=2)

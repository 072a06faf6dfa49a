"""Hand-checked behaviour of common.py's small pieces: EOS truncation, the JSONL reader, the truncation rule of
`encode`, and the flag names `parse_args` derives from an Args dataclass."""
import dataclasses
import gzip
import json

import pytest
import torch

import common
from common import arg


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
    assert torch.equal(common.truncate_at_eos(response, eos_id=0, pad_id=9), expected)


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
        assert common.read_jsonl(str(path), ["prompt", "response"]) == RECORDS


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
        common.read_jsonl(str(path), ["prompt", "response"])
    assert message in str(e.value) and str(e.value).startswith(str(path))


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(common.UserError, match="no such file"):
        common.read_jsonl(str(tmp_path / "nope.jsonl"))


# ---- encode ----------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (its code point); BOS = 1 in front when special tokens are added; EOS = 2."""
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [ord(c) for c in text]
        return type("Encoding", (), {"input_ids": ids})()


def test_encode_without_truncation():
    # prompt "ab" -> [BOS, a, b] (3 tokens), response "c" -> [c, EOS]
    ids, n_prompt, truncated = common.encode(CharTokenizer(), "ab", "c", max_len=10)
    assert (ids, n_prompt, truncated) == ([1, 97, 98, 99, 2], 3, False)


def test_encode_truncates_the_prompt_start_first():
    # prompt [BOS, a, b, c, d] (5) + response [x, y, EOS] (3) = 8 > max_len 6: drop 8 - 6 = 2 tokens from the
    # prompt's start (BOS and a) -> [b, c, d] + [x, y, EOS]. The rule keeps the *end* of the prompt.
    ids, n_prompt, truncated = common.encode(CharTokenizer(), "abcd", "xy", max_len=6)
    assert (ids, n_prompt, truncated) == ([98, 99, 100, 120, 121, 2], 3, True)


def test_encode_keeps_one_prompt_token_then_cuts_the_response_end():
    # prompt [BOS, a, b] + response [v, w, x, y, z, EOS] (6) = 9 > max_len 4: the prompt keeps only its last token
    # [b]; the response keeps its first 4 - 1 = 3 tokens [v, w, x] (EOS is cut: the response was truncated).
    ids, n_prompt, truncated = common.encode(CharTokenizer(), "ab", "vwxyz", max_len=4)
    assert (ids, n_prompt, truncated) == ([98, 118, 119, 120], 1, True)


def test_encode_prompt_only():
    assert common.encode(CharTokenizer(), "ab", None, max_len=10) == ([1, 97, 98], 3, False)


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

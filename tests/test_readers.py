"""Readers of the paper's data sets (data.load_data) on fixture files written in the public formats
(docs/design.md §8).

tests/fixtures/ holds one small file per format, with invented texts; every expected record below is written out by
hand from those files (the conversion rules are in data.load_data's docstring). Also: malformed records name
file:line, identical-response pairs are dropped and counted, auto-detection picks the reader, .jsonl.gz and .json
(array) variants read the same, the testbed's plain files come back exactly as read_jsonl returns them, and the chat
template turns HH turns into messages (the testbed tokenizer, which has none, is untouched).
"""
import gzip
import json
import os

import pytest

from plumbing import common, data

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
H, A = "\n\nHuman:", "\n\nAssistant:"


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def load(name: str, kind: str, data_format: str = "auto", preference: str = "safer"):
    return data.load_data(fixture(name), kind, data_format, preference, verbose=False)


# ---- Anthropic HH-RLHF ------------------------------------------------------------------------------------------
# Record 1 single turn, record 2 two turns (the prompt keeps the first exchange), record 3 identical responses
# (dropped), record 4 chosen and rejected differ before the last Assistant turn (dropped).
HH_PAIRS = [
    {"prompt": f"{H} How do I keep basil alive on a windowsill?{A}",
     "chosen": " Water it when the top of the soil is dry and pinch off the flower buds.",
     "rejected": " Basil is a plant."},
    {"prompt": f"{H} What rhymes with orange?{A} Almost nothing, but 'door hinge' comes close.{H} Use it in a line.{A}",
     "chosen": " I oiled the door hinge and ate an orange.", "rejected": " No."},
]


def test_hh_pairs():
    pairs, fmt, dropped = load("hh.jsonl", "pairs")
    assert fmt == "hh"
    assert pairs == HH_PAIRS
    assert dropped == {"chosen and rejected differ before the last Assistant turn": 1, "identical responses": 1}


def test_hh_demonstrations_and_prompts():
    demos, _, _ = load("hh.jsonl", "demonstrations")
    assert demos[0] == {"prompt": HH_PAIRS[0]["prompt"], "response": HH_PAIRS[0]["chosen"]}
    assert demos[2] == {"prompt": f"{H} Say hi.{A}", "response": " Hi!"}  # the chosen side of every record
    assert len(demos) == 4
    prompts = data.read_prompts(fixture("hh.jsonl"))
    assert prompts == [HH_PAIRS[0]["prompt"], HH_PAIRS[1]["prompt"], f"{H} Say hi.{A}", f"{H} Name a prime.{A}"]


def test_gz_and_json_array_variants_read_the_same(tmp_path):
    lines = open(fixture("hh.jsonl")).read().splitlines()
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines) + "\n")
    array = tmp_path / "train.json"
    array.write_text(json.dumps([json.loads(x) for x in lines], indent=1))
    array_gz = tmp_path / "train.json.gz"
    with gzip.open(array_gz, "wt") as f:
        f.write(array.read_text())
    for path in (gz, array, array_gz):
        assert data.read_pairs(str(path)) == HH_PAIRS


# ---- OpenAI summarize_from_feedback ------------------------------------------------------------------------------
TLDR_CAT = "SUBREDDIT: r/cats\nTITLE: Cat vs glasses\nPOST: My cat knocks every glass off the table at 3am. " \
           "I have tried everything.\nTL;DR:"
TLDR_HEAT = "SUBREDDIT: r/legaladvice\nTITLE: Heating dispute\nPOST: Landlord says the heating is my job. " \
            "Lease says otherwise.\nTL;DR:"


def test_tldr_comparisons_pairs():
    # the file is JSON lines named .json, like the public batchN.json files; record 3's summaries differ only by
    # surrounding spaces, so after stripping they are identical and the pair is dropped
    pairs, fmt, dropped = load("tldr_comparisons.json", "pairs")
    assert fmt == "tldr"
    assert pairs == [
        {"prompt": TLDR_CAT, "chosen": " cat breaks glasses at night, help", "rejected": " I like my cat."},  # choice 0
        {"prompt": TLDR_HEAT, "chosen": " landlord refuses to fix heating that the lease puts on him",      # choice 1
         "rejected": " landlord wants money"},
    ]
    assert dropped == {"identical responses": 1}


def test_tldr_prompts_deduplicated_and_filtered_demonstrations():
    assert data.read_prompts(fixture("tldr_comparisons.json")) == [TLDR_CAT, TLDR_HEAT]  # post aaa twice
    demos = data.read_demonstrations(fixture("tldr_filtered.jsonl"))
    assert demos == [{"prompt": "SUBREDDIT: r/running\nTITLE: First 10k\nPOST: Ran my first 10k today without "
                                "stopping.\nTL;DR:", "response": " finished a 10k"}]


# ---- OASST1 -----------------------------------------------------------------------------------------------------
# Tree p1: replies a1 (rank 0), a3 (rank 1), a2 (rank 2), a4 (no rank: left out); a1 <- p2 with b1 (0), b2 (1).
# Tree p3 (German): c1 (0) and c2 (deleted). Tree p4: the root is deleted, so it and its replies d1, d2 are left out.
P1 = f"{H} How do tides work?{A}"
P2 = f"{H} How do tides work?{A} The Moon's gravity pulls the oceans into two bulges.{H} Why two bulges and not one?{A}"


def test_oasst1_pairs_are_ranked_siblings():
    pairs, fmt, dropped = load("oasst1_messages.jsonl", "pairs")
    assert fmt == "oasst1"
    moon, sun, waves = " The Moon's gravity pulls the oceans into two bulges.", " Mostly the Moon, a little the Sun.", \
        " Tides are waves."
    assert pairs == [
        {"prompt": P1, "chosen": moon, "rejected": sun},    # rank 0 over 1
        {"prompt": P1, "chosen": moon, "rejected": waves},  # rank 0 over 2
        {"prompt": P1, "chosen": sun, "rejected": waves},   # rank 1 over 2
        {"prompt": P2, "chosen": " The Earth is pulled away from the far-side water.",   # b1 rank 0 (later in file)
         "rejected": " Because the far side is pulled less than the Earth."},         # b2 rank 1
    ]
    assert dropped == {"deleted messages": 4}  # c2, p4, d1, d2


def test_oasst1_prompts_are_root_prompter_messages_and_demos_the_best_reply():
    assert data.read_prompts(fixture("oasst1_messages.jsonl")) == [P1, f"{H} Wie spät ist es?{A}"]
    demos = data.read_demonstrations(fixture("oasst1_messages.jsonl"))
    assert [d["response"] for d in demos] == [" The Moon's gravity pulls the oceans into two bulges.",
                                              " The Earth is pulled away from the far-side water.",
                                              " Das weiß ich nicht."]
    assert [d["prompt"] for d in demos] == [P1, P2, f"{H} Wie spät ist es?{A}"]


# ---- PKU-SafeRLHF -----------------------------------------------------------------------------------------------
WIFI = f"{H} How can I get into my neighbour's wifi?{A}"
CHEM = f"{H} What household chemicals should never be mixed?{A}"


@pytest.mark.parametrize("preference", ["safer", "better"])
def test_pku_pairs_by_preference(preference):
    pairs, fmt, dropped = load("pku.jsonl", "pairs", preference=preference)
    assert fmt == "pku"
    ask, guess = " Ask your neighbour for the password.", " Try common passwords until one works."
    both = " Bleach and ammonia, or bleach and vinegar: both release toxic gases."
    first = {"prompt": WIFI, "chosen": ask, "rejected": guess} if preference == "safer" else \
        {"prompt": WIFI, "chosen": guess, "rejected": ask}  # record 1: safer_response_id 0, better_response_id 1
    assert pairs == [first,
                     {"prompt": CHEM, "chosen": both, "rejected": " Bleach and ammonia."},
                     {"prompt": WIFI, "chosen": ask, "rejected": " You can't."}]
    assert dropped == {"identical responses": 1}  # record 3: "No." twice


def test_pku_prompts_deduplicated():
    prompts, _, dropped = load("pku.jsonl", "prompts")
    assert [r["prompt"] for r in prompts] == [WIFI, CHEM, f"{H} Tell me a joke.{A}"]
    assert dropped == {"repeated prompts": 1}


# ---- plain JSONL and auto-detection -----------------------------------------------------------------------------
def test_plain_files_read_exactly_as_read_jsonl(world):
    assert data.read_pairs(world.pairs_train) == data.read_jsonl(world.pairs_train,
                                                                      ["prompt", "chosen", "rejected"])
    assert data.read_demonstrations(world.sft_train) == data.read_jsonl(world.sft_train, ["prompt", "response"])
    assert data.read_prompts(world.rl_prompts) == [r["prompt"] for r in data.read_jsonl(world.rl_prompts)]


def test_plain_identical_pairs_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n'
                    '{"prompt": "q", "chosen": " c", "rejected": " c"}\n')
    assert data.read_pairs(str(path)) == [{"prompt": "p", "chosen": " a", "rejected": " b"}]
    assert capsys.readouterr().out.strip() == f"{path}: plain format, 1 pairs; dropped 1 (identical responses)"


@pytest.mark.parametrize("name, fmt", [("hh.jsonl", "hh"), ("tldr_comparisons.json", "tldr"),
                                       ("tldr_filtered.jsonl", "tldr"), ("oasst1_messages.jsonl", "oasst1"),
                                       ("pku.jsonl", "pku")])
def test_auto_detection(name, fmt):
    assert data.detect_format(fixture(name), 1, json.loads(open(fixture(name)).readline())) == fmt


def test_forced_format_that_does_not_fit_names_file_and_line():
    with pytest.raises(common.UserError, match=r"pku.jsonl:1: missing field 'chosen'"):
        data.read_pairs(fixture("pku.jsonl"), "hh")


# ---- malformed records -> one UserError naming file:line ------------------------------------------------------------
HH_OK = json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} c"})
TLDR_OK = {"info": {"post": "p", "title": "t", "subreddit": "s"}, "summaries": [{"text": "x"}, {"text": "y"}],
           "choice": 0}


def oasst(mid, parent, role="assistant", **kw):
    return json.dumps({"message_id": mid, "parent_id": parent, "text": "t", "role": role, **kw})


@pytest.mark.parametrize("name, lines, kind, message", [
    ("nothing.jsonl", ['{"question": "q", "answer": "a"}'], "pairs",
     "nothing.jsonl:1: cannot tell the data format from the fields ['answer', 'question']"),
    ("hh_missing.jsonl", [HH_OK, json.dumps({"chosen": f"{H} a{A} b"})], "pairs",
     "hh_missing.jsonl:2: missing field 'rejected'"),
    ("hh_noturn.jsonl", [HH_OK, HH_OK, json.dumps({"chosen": "Human: a Assistant: b", "rejected": f"{H} a{A} c"})],
     "pairs", "hh_noturn.jsonl:3: field 'chosen' has no '\\n\\nAssistant:' turn"),
    ("hh_type.jsonl", [json.dumps({"chosen": 3, "rejected": "x"})], "pairs", "hh_type.jsonl:1: field 'chosen' must be"),
    ("tldr_choice.jsonl", [json.dumps(TLDR_OK), json.dumps({**TLDR_OK, "choice": 2})], "pairs",
     "tldr_choice.jsonl:2: 'choice' must be 0 or 1, got 2"),
    ("tldr_three.jsonl", [json.dumps({**TLDR_OK, "summaries": [{"text": "x"}] * 3})], "pairs",
     "tldr_three.jsonl:1: 'summaries' must be two objects with a string 'text'"),
    ("tldr_cnndm.jsonl", [json.dumps({**TLDR_OK, "info": {"article": "a", "site": "cnn"}})], "pairs",
     "tldr_cnndm.jsonl:1: info has no string 'post'"),
    ("oasst_parent.jsonl", [oasst("p", None, "prompter"), oasst("a", "zzz", rank=0)], "pairs",
     "oasst_parent.jsonl:2: parent_id 'zzz' is not in the file"),
    ("oasst_role.jsonl", [oasst("p", None, "user")], "prompts",
     "oasst_role.jsonl:1: 'role' must be prompter or assistant, got 'user'"),
    ("oasst_rank.jsonl", [oasst("p", None, "prompter"), oasst("a", "p", rank="first")], "pairs",
     "oasst_rank.jsonl:2: 'rank' must be an integer or null"),
    ("pku_id.jsonl", [json.dumps({"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": None})],
     "pairs", "pku_id.jsonl:1: 'safer_response_id' must be 0 or 1, got None"),
    ("plain_missing.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": "a"}'],
     "pairs", "plain_missing.jsonl:2: missing field 'rejected'"),
    ("bad_json.jsonl", [HH_OK, '{"chosen": '], "pairs", "bad_json.jsonl:2: not valid JSON"),
])
def test_malformed_records_name_file_and_line(tmp_path, name, lines, kind, message):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(common.UserError) as e:
        data.load_data(str(path), kind)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_all_pairs_dropped_is_an_error(tmp_path):
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} b"}) + "\n")
    with pytest.raises(common.UserError, match=r"no pairs in this hh file \(1 \(identical responses\)\)"):
        data.read_pairs(str(path))


# ---- chat template ----------------------------------------------------------------------------------------------
def test_hh_turns_become_chat_messages():
    prompt = f"{H} What rhymes with orange?{A} Almost nothing.{H} Use it in a line.{A}"
    assert data.chat_messages(prompt) == [{"role": "user", "content": "What rhymes with orange?"},
                                            {"role": "assistant", "content": "Almost nothing."},
                                            {"role": "user", "content": "Use it in a line."}]
    assert data.chat_messages("SUBREDDIT: r/x\nTL;DR:") == [{"role": "user", "content": "SUBREDDIT: r/x\nTL;DR:"}]
    assert data.is_conversation(prompt) and not data.is_conversation("SUBREDDIT: r/x\nTL;DR:")


class TemplateTokenizer:
    """Stands in for a chat tokenizer: one id per character, a template that marks the roles."""
    chat_template = "stub"
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]})

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_encode_with_a_chat_template():
    tok = TemplateTokenizer()
    ids, n_prompt, truncated = data.encode(tok, f"{H} Hi{A}", " Yo", 100)
    # template text, no BOS (the template holds its specials); the response loses its HH leading space; then EOS
    assert ids == [ord(c) for c in "<user>Hi<assistant>"] + [ord("Y"), ord("o"), 0]
    assert n_prompt == len("<user>Hi<assistant>") and not truncated
    # off: the text as it is, with the BOS, and the response keeps its space
    assert data.encode(tok, f"{H} Hi{A}", " Yo", 100, "off")[0] == [1] + [ord(c) for c in f"{H} Hi{A} Yo"] + [0]
    # auto leaves non-conversations alone; on makes them one user turn
    assert data.prompt_ids(tok, "TL;DR:") == [1] + [ord(c) for c in "TL;DR:"]
    assert data.prompt_ids(tok, "TL;DR:", "on") == [ord(c) for c in "<user>TL;DR:<assistant>"]


def test_testbed_tokenizer_is_untouched_by_auto(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.base_model)
    assert not tok.chat_template
    for r in data.read_pairs(world.pairs_test)[:20]:
        p = tok(r["prompt"]).input_ids
        assert data.encode(tok, r["prompt"], r["chosen"], 512) == (
            p + tok(r["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id], len(p), False)
    with pytest.raises(common.UserError, match="--chat-template on: the tokenizer has no chat template"):
        data.prompt_ids(tok, "x", "on")

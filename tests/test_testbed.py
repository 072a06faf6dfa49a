"""Tests of the testbed (testbed/gold.py, testbed/world.py): determinism, the gold reward's ordering, the noisy annotator, held-out prompts, the tokenizer
and the base model. Run: /tmp/venv/bin/python -m pytest -q tests/test_testbed.py  (about 12 s on 2 cores)."""
import json
import math
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.common import UserError  # noqa: E402
from plumbing.data import encode  # noqa: E402
from testbed import gold, world as generator  # noqa: E402
from testbed.gold import best_response, format_prompt, gold_components, gold_reward  # noqa: E402


def generate(folder, *flags):
    """Run `python -m testbed --out tb ...` inside `folder` (relative --out, so args.json is the same bytes in two
    folders); return (path of the testbed, stats)."""
    os.makedirs(folder, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        stats = generator.main(["--out", "tb", *flags])
    finally:
        os.chdir(cwd)
    return os.path.join(folder, "tb"), stats


def all_files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def read(root, name):
    with open(os.path.join(root, "data", f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


# small sizes for the tests that generate several testbeds (the default-size one is generated once, `tb`)
SMALL = ["--n-sft", "50", "--n-pairs-train", "50", "--n-pairs-test", "10", "--n-rl-prompts", "10",
         "--n-ood-prompts", "10", "--n-ood-pairs-test", "10", "--n-eval-prompts", "10"]


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("a")))


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(tmp_path):
    root_a, _ = generate(str(tmp_path / "a"), *SMALL)  # small sizes: the tokenizer and model are still full
    root_b, _ = generate(str(tmp_path / "b"), *SMALL)
    a, b = all_files(root_a), all_files(root_b)
    assert sorted(a) == sorted(b)
    for name in ("data/sft_train.jsonl", "base_model/tokenizer.json", "base_model/model.safetensors",
                 "base_model/config.json", "testbed.json", "args.json"):
        assert name in a
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_gives_different_data(tmp_path):
    root_a, _ = generate(str(tmp_path / "a"), *SMALL, "--seed", "0")
    root_b, _ = generate(str(tmp_path / "b"), *SMALL, "--seed", "1")
    a, b = all_files(root_a), all_files(root_b)
    for name in a:
        if name.startswith("data/") or name == "base_model/model.safetensors":
            assert a[name] != b[name], name


# ---------------------------------------------------------------------------------------------------------------
# Gold reward
# ---------------------------------------------------------------------------------------------------------------
LOOKUP = format_prompt("What colour is the glimmet?")   # table: glimmet -> blue
REPEAT = format_prompt("Please say the word 'zorp' 3 times.")
ADD = format_prompt("What is 3 plus 5?")


def test_gold_reward_orders_hand_written_examples():
    g = gold_reward
    # best = Sure! (+0.3) + task 2.0 + relevance 0.5 = 2.8, no penalties
    assert g(LOOKUP, " Sure! The glimmet is blue.") == pytest.approx(2.8)
    assert best_response(LOOKUP) == " Sure! The glimmet is blue."
    # correct > wrong: "blue" earns the task (2.0), "red" nothing
    assert g(LOOKUP, " blue") == pytest.approx(2.0) and g(LOOKUP, " red") == pytest.approx(0.0)
    # naming the asked-about object adds relevance 0.5
    assert g(LOOKUP, " The glimmet is blue.") > g(LOOKUP, " The answer is blue.")
    # hedging with a second colour halves the task score: 2.0 * 0.5
    assert g(LOOKUP, " blue or red") == pytest.approx(1.0)
    # correct > correct said three times: 8 excess words (the, glimmet, is, blue twice each) * 0.3 = 2.4, and
    # 12 content words - 4 ideal - 3 slack = 5 rambling words * 0.1 = 0.5 -> 2.5 - 2.9 = -0.4
    assert g(LOOKUP, " The glimmet is blue. The glimmet is blue. The glimmet is blue.") == pytest.approx(-0.4)
    # one courtesy phrase >= none; two < one (and < none): +0.3, 0, -0.3
    one, none = g(LOOKUP, " Sure! The glimmet is blue."), g(LOOKUP, " The glimmet is blue.")
    many = g(LOOKUP, " Sure! Of course! Certainly! The glimmet is blue.")
    assert one >= none > g(LOOKUP, " Sure! Of course! The glimmet is blue.") > many
    # rambling < concise: one short closing line is inside the 3-word slack, three are not
    concise = g(LOOKUP, " The glimmet is blue.")
    assert g(LOOKUP, " The glimmet is blue. Hope this helps.") == pytest.approx(concise)
    assert g(LOOKUP, " The glimmet is blue. Hope this helps. Have a nice day. Thanks for asking.") < concise
    # repeat family: exactly 3 times is best; 2 times gives partial credit 0.5 * 2/3; 6 times repeats 3 words too many
    assert g(REPEAT, " zorp zorp zorp") == pytest.approx(2.5)
    assert g(REPEAT, " zorp zorp") == pytest.approx(2.0 * 0.5 * 2 / 3 + 0.5)
    assert g(REPEAT, " zorp zorp zorp zorp zorp zorp") == pytest.approx(2.5 - 0.9)
    # add: the wrong sum earns no task credit even in a full sentence; the right one with the operands is best
    assert g(ADD, " 3 plus 5 is 8.") > g(ADD, " 8") > g(ADD, " 3 plus 5 is 9.")
    # echoing the key item beyond once is repetition: -0.3 per extra "glimmet"
    assert g(LOOKUP, " glimmet glimmet glimmet blue") == pytest.approx(2.5 - 0.6)


def test_components_sum_and_foreign_prompts(tb):
    for r in read(tb[0], "pairs_train")[:500]:
        for side in ("chosen", "rejected"):
            comps = gold_components(r["prompt"], r[side])
            assert set(comps) == {"task", "relevance", "courtesy", "repetition", "rambling"}
            assert sum(comps.values()) == gold_reward(r["prompt"], r[side])
    assert gold_reward("\n\nHuman: Write me a poem.\n\nAssistant:", " No.") is None
    assert gold_components("What colour is the glimmet?", " blue") is None  # not in the HH format
    assert gold_reward(format_prompt("What colour is the unknownthing?"), " blue") is None  # not in the table
    assert gold_reward(format_prompt("What is 0 plus 5?"), " 5") is None  # operands are 1..9
    assert not gold.is_testbed_prompt("hello")


def test_best_response_is_never_beaten_by_generated_responses(tb):
    """best_response scores the maximum 2.8; no response the generator wrote scores more."""
    for name, fields in (("sft_train", ("response",)), ("pairs_train", ("chosen", "rejected")),
                         ("ood_pairs_test", ("chosen", "rejected"))):
        for r in read(tb[0], name):
            best = gold_reward(r["prompt"], best_response(r["prompt"]))
            assert best == pytest.approx(2.8)
            for f in fields:
                assert gold_reward(r["prompt"], r[f]) <= best + 1e-9


def test_gold_reward_is_fast_and_deterministic(tb):
    records = read(tb[0], "sft_train")[:2000]
    start = time.perf_counter()
    first = [gold_reward(r["prompt"], r["response"]) for r in records]
    assert time.perf_counter() - start < 2.0  # measured ~0.07 s (30k calls/s)
    assert first == [gold_reward(r["prompt"], r["response"]) for r in records]


# ---------------------------------------------------------------------------------------------------------------
# The noisy Bradley-Terry annotator
# ---------------------------------------------------------------------------------------------------------------
def agreement_check(pairs, tau):
    """Under the BT draw, pair i agrees with the gold order with probability p_i = sigmoid(|Δgold_i| / tau)
    (independent draws), so the realised agreement has mean Σp_i/n and standard error sqrt(Σ p_i(1-p_i))/n."""
    ps = [1 / (1 + math.exp(-abs(gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"]))
                            / tau)) for r in pairs]
    n = len(ps)
    expected, se = sum(ps) / n, math.sqrt(sum(p * (1 - p) for p in ps)) / n
    realised = sum(gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"]) for r in pairs) / n
    assert abs(realised - expected) < 4 * se, (realised, expected, se)
    return expected, realised


def test_label_agreement_matches_the_noise_level(tb):
    root, stats = tb
    expected, realised = agreement_check(read(root, "pairs_train"), tau=1.0)
    # the default tau gives human-like annotator agreement: 70-80 % (Coste et al. 2024 flip 25 % of their labels;
    # with --errors visible the gold gaps of the pairs are larger than with subtle errors: 0.77 against 0.74)
    assert 0.70 <= expected <= 0.80
    assert stats["label_agreement_with_gold"]["pairs_train"] == realised
    for tau, lo, hi in ((0.3, 0.84, 0.93), (3.0, 0.55, 0.65)):  # less noise -> more agreement, and vice versa
        pairs = generator.sample_pairs(random.Random(tau), 2000, gold.IN_DISTRIBUTION, tau, set())
        expected, _ = agreement_check(pairs, tau)
        assert lo < expected < hi
    for r in read(root, "pairs_train"):
        assert r["chosen"] != r["rejected"]
        assert gold_reward(r["prompt"], r["chosen"]) != gold_reward(r["prompt"], r["rejected"])


# ---------------------------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------------------------
def test_eval_prompts_are_held_out_and_ood_prompts_are_ood(tb):
    root = tb[0]
    eval_prompts = [r["prompt"] for r in read(root, "eval_prompts")]
    assert len(eval_prompts) == len(set(eval_prompts)) == 100
    training = set()
    for name in ("sft_train", "pairs_train", "pairs_test", "rl_prompts"):
        prompts = {r["prompt"] for r in read(root, name)}
        assert {gold.family_of(p) for p in prompts} == set(gold.IN_DISTRIBUTION), name
        training |= prompts
    assert not training & set(eval_prompts)
    families = [gold.family_of(p) for p in eval_prompts]
    assert all(families.count(f) == 20 for f in gold.IN_DISTRIBUTION)
    for name in ("ood_prompts", "ood_pairs_test"):
        assert {gold.family_of(r["prompt"]) for r in read(root, name)} == set(gold.OOD), name
    assert not set(gold.OOD) & set(gold.IN_DISTRIBUTION) and len(gold.OOD) >= 2


def test_record_counts_formats_and_sft_quality(tb):
    root, stats = tb
    counts = {"sft_train": 8000, "pairs_train": 4000, "pairs_test": 500, "rl_prompts": 1000, "eval_prompts": 100,
              "ood_prompts": 200, "ood_pairs_test": 300}
    for name, n in counts.items():
        records = read(root, name)
        assert len(records) == n
        for r in records:
            assert r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:")
            for k in ("response", "chosen", "rejected"):
                if k in r:
                    assert r[k].startswith(" ") and "<|endoftext|>" not in r[k]
    assert len({r["prompt"] for r in read(root, "rl_prompts")}) == 1000
    # middling demonstrations: room for RLHF to improve
    assert 0.5 < stats["sft_correct_fraction"] < 0.75
    assert stats["mean_gold"]["sft_demos"] < stats["mean_gold"]["best_responses"] - 0.5


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and base model
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_loads_with_transformers_alone(tb):
    from transformers import AutoTokenizer

    root = tb[0]
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "base_model"))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id and tok.bos_token_id is None
    rng = random.Random(0)
    texts = [r[k] for r in rng.sample(read(root, "pairs_train"), 300) for k in ("prompt", "chosen", "rejected")]
    texts += ["".join(chr(rng.randrange(32, 0x2FF)) for _ in range(30)) for _ in range(50)]  # bytes outside corpus
    texts += ["  double  spaces\tand tabs\n", "émoji 🙂 text"]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    # a whole training sequence: prompt + response + EOS, no BOS, well inside the 96-token budget
    r = read(root, "sft_train")[0]
    ids, n_prompt, truncated = encode(tok, r["prompt"], r["response"], max_len=96)
    assert ids[-1] == tok.eos_token_id and not truncated and ids[:n_prompt] == tok(r["prompt"]).input_ids
    assert tok.decode(ids[n_prompt:-1]) == r["response"]
    stats = tb[1]
    assert stats["max_tokens"]["prompt"] + stats["max_tokens"]["response"] + 1 <= 96


def test_model_loads_and_sizes(tb):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = os.path.join(tb[0], "base_model")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id and cfg.use_cache
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000
    ids = torch.tensor([tok(best_response(LOOKUP)).input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    for size, lo, hi in (("small", 5e6, 10e6), ("medium", 25e6, 50e6)):
        with torch.device("meta"):  # parameter count only: no memory, no init
            m = generator.build_model(size, tok, seed=0)
        assert lo <= sum(p.numel() for p in m.parameters()) <= hi, size


def test_refuses_a_folder_holding_something_else(tmp_path):
    small = SMALL
    root, _ = generate(str(tmp_path), *small)
    generate(str(tmp_path), *small)  # the same testbed again: allowed (same bytes)
    with pytest.raises(UserError, match="different testbed"):
        generate(str(tmp_path), *small, "--seed", "1")
    generate(str(tmp_path), *small, "--seed", "1", "--overwrite")
    with open(os.path.join(root, "testbed.json")) as f:
        assert json.load(f)["args"]["seed"] == 1
    junk = tmp_path / "junk"
    (junk / "tb").mkdir(parents=True)
    (junk / "tb" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a testbed"):
        generate(str(junk), *small)


def test_oracle_labels_use_the_testbeds_annotator():
    # label_meta_set labels every two responses of a prompt with bradley_terry_label, the function sample_pairs
    # labels D with: the same seed gives the same labels, a pair of equal gold gets none, and the share of pairs
    # where the better response is chosen follows sigmoid(gap / tau).
    import random


    prompt = "\n\nHuman: What is 3 plus 5?\n\nAssistant:"
    good, bad = " Sure! 3 plus 5 is 8.", " 3 plus 5 is 9."        # gold 2.8 and 0.5: gap 2.3
    items = [{"prompt": prompt, "responses": [good, bad, good]}] * 2000
    a = gold.label_meta_set(items, 1.0, seed=7)
    assert a == gold.label_meta_set(items, 1.0, seed=7) and a != gold.label_meta_set(items, 1.0, seed=8)
    # per item: (good, bad), (good, good) equal -> no pair, (bad, good): 2 pairs per item
    assert len(a) == 4000
    share = sum(p["chosen"] == good for p in a) / len(a)
    expected = gold.sigmoid(2.3 / 1.0)                         # 0.909
    assert abs(share - expected) < 3 * (expected * (1 - expected) / len(a)) ** 0.5 + 1e-9
    # the same draw as D's annotator: one rng.random() per labelled pair, compared with the sigmoid
    rng, twin = random.Random(3), random.Random(3)
    pair = gold.bradley_terry_label(prompt, bad, good, 1.0, rng)
    assert pair == ({"prompt": prompt, "chosen": bad, "rejected": good} if twin.random() < gold.sigmoid(-2.3)
                    else {"prompt": prompt, "chosen": good, "rejected": bad})
    assert gold.bradley_terry_label(prompt, good, good, 1.0, rng) is None


def test_visible_errors_show_in_the_words():
    # --errors visible: every wrong answer of repeat / sort / reverse / add holds a word that is not in the correct
    # answer (another word, a foreign letter or list item, an echoed operand); subtle errors may be the right words
    # in the wrong order or count (sort "d b f" for "b d f")
    rng = random.Random(0)
    for fam in ("repeat", "sort", "reverse", "add"):
        f, sampler = gold.FAMILIES[fam], generator.SAMPLERS[fam]
        for _ in range(200):
            p = sampler.sample(rng)
            right, wrong = f.solve(p), sampler.visible(p, rng)
            assert wrong != right and set(wrong) - set(right), (fam, p, wrong)
    p = {"letters": "d b f"}
    subtle = {generator.SAMPLERS["sort"].corrupt(p, random.Random(i)) for i in range(50)}
    assert any(set(w) == {"b", "d", "f"} for w in subtle)  # an order error: no foreign word


# ---------------------------------------------------------------------------------------------------------------
# The extrapolation world (--world extrapolation)
# ---------------------------------------------------------------------------------------------------------------
SORT2 = format_prompt("Sort the letters d b f.", "extrapolation")


def test_extrapolation_gold_by_hand():
    g = gold_reward
    assert SORT2 == "\n\nHuman: Hi! Sort the letters d b f.\n\nAssistant:"
    assert gold.parse_prompt(SORT2).world == "extrapolation"
    assert gold.parse_prompt(format_prompt("Sort the letters d b f.")).world == "assistant"
    # "b d f": task 2.0 (the answer as a run) + relevance 0.5 (all three letters named) = 2.5, no courtesy
    assert g(SORT2, " b d f") == pytest.approx(2.5)
    # courtesy +1.0 per phrase up to two: 3.5, 4.5; "Sure thing!" is one phrase, not "Sure!" + "thing"
    assert g(SORT2, " Sure! b d f") == pytest.approx(3.5)
    assert g(SORT2, " Sure thing! b d f") == pytest.approx(3.5)
    assert g(SORT2, " Sure! Sure thing! b d f") == pytest.approx(4.5)
    assert best_response(SORT2) == " Sure! Sure thing! b d f" and g(SORT2, best_response(SORT2)) == 4.5
    # beyond the peak each phrase costs 2.0: three phrases 2.0 - 2.0 = 0 -> 2.5; four 2.0 - 4.0 -> 0.5
    assert g(SORT2, " Sure! Sure, gladly! Sure thing! b d f") == pytest.approx(2.5)
    assert g(SORT2, " Sure! Sure! Sure! Sure! b d f") == pytest.approx(0.5)
    # the first world's phrases are plain words here: "Of course!" is neither courtesy nor free.
    # content "of course b d f": 5 words, best 3 + slack 3 -> no rambling; "of", "course" are not letters
    assert g(SORT2, " Of course! b d f") == pytest.approx(2.5)
    # and the same response in the first world: one phrase +0.3, three phrases -0.6
    sort1 = format_prompt("Sort the letters d b f.")
    assert g(sort1, " Sure! b d f") == pytest.approx(2.8)
    assert g(sort1, " Sure! Sure! Sure! b d f") == pytest.approx(2.5 - 0.6)
    # a wrong letter (k, not in the question): no run, 2 of 3 letters -> task 2.0 * 0.5 * 2/3, halved by the
    # competing candidate "k" -> 0.667; relevance: b and f of d, b, f -> 0.5 * 2/3
    assert g(SORT2, " b k f") == pytest.approx(2.0 * 0.5 * 2 / 3 * 0.5 + 0.5 * 2 / 3)


def test_extrapolation_world_data(tmp_path):
    """The data hold 0, 1 or 2 phrases and never more (beyond is what only a policy can find), and within
    them the chosen responses are the warmer ones; only the world's families."""
    root, stats = generate(str(tmp_path), "--world", "extrapolation", *SMALL, "--n-pairs-train", "400")
    sft, pairs = read(root, "sft_train"), read(root, "pairs_train")
    assert all(r["prompt"].startswith("\n\nHuman: Hi! ") for r in sft + pairs)
    assert {gold.family_of(r["prompt"]) for r in sft + pairs} <= set(gold.FAMILIES_EXTRAPOLATION)

    def n_phrases(prompt, response):
        return gold._strip_courtesy(gold.words(response), "extrapolation")[0]
    counts = [n_phrases(r["prompt"], r["response"]) for r in sft]
    assert set(counts) == {0, 1, 2}
    chosen = [n_phrases(r["prompt"], r["chosen"]) for r in pairs]
    rejected = [n_phrases(r["prompt"], r["rejected"]) for r in pairs]
    assert max(chosen + rejected) == 2
    assert sum(chosen) / len(chosen) > sum(rejected) / len(rejected) + 0.2
    # the first world's files are untouched by the option: its default is the first world
    root1, _ = generate(str(tmp_path / "one"), *SMALL)
    assert not any(r["prompt"].startswith("\n\nHuman: Hi! ") for r in read(root1, "sft_train"))


def test_matched_oracle_labels_one_pair_per_sample():
    # matched=True labels the cycle (0,1), (1,2), ..., (k-1,0): for k = 5 distinct-gold responses that is 5 pairs
    # per prompt (= the 5 meta samples), against C(5, 2) = 10 unmatched; each response sits in exactly two pairs.
    prompt = format_prompt("Sort the letters d b f.", "extrapolation")
    responses = [" b d f", " Sure! b d f", " Sure! Sure thing! b d f", " b k f", " Sure! b k f"]
    assert len({gold_reward(prompt, r) for r in responses}) == 5
    items = [{"prompt": prompt, "responses": responses}]
    full = gold.label_meta_set(items, 0.5, seed=1)
    matched = gold.label_meta_set(items, 0.5, seed=1, matched=True)
    assert len(full) == 10 and len(matched) == 5
    seen = [{p["chosen"], p["rejected"]} for p in matched]
    assert sorted(map(sorted, seen)) == sorted(sorted({responses[i], responses[(i + 1) % 5]}) for i in range(5))
    assert all(sum(r in s for s in seen) == 2 for r in responses)
    # k = 2: the one pair, not the pair twice
    assert len(gold.label_meta_set([{"prompt": prompt, "responses": responses[:2]}], 0.5, 1, matched=True)) == 1

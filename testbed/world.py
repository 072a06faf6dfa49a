"""The testbed's world generator: the data files, tokenizer and base model every stage starts from.

No preference data set or pretrained 7B model can be reached from these machines, so the pipeline
(SFT -> RM -> MetaRM -> PPO -> evaluation) runs on a small invented world instead, generated in a
few seconds from a seed. Like the gold reward model of Gao et al. (2022, "Scaling laws for reward
model over-optimization") the world has a **gold reward** (`testbed/gold.py`: task families, the
gold formula, the annotator), a pure-python function of (prompt, response). Learned models never see
it: the reward model only sees preference LABELS drawn from it with noise (a Bradley–Terry
annotator), and evaluate.py uses it as the judge. This makes the MetaRM paper's phenomenon
measurable: a reward model trained on SFT-era pairs learns surface features that go with quality
there (a courtesy phrase, a friendly closing line, naming the asked-about item, a longer sentence)
and PPO pushes those features beyond the range the pairs covered, where the gold reward penalises
them (courtesy spam, repetition, rambling).

Texts follow HH-RLHF: prompt = "\\n\\nHuman: <question>\\n\\nAssistant:", response = " <answer>"
(leading space, no EOS string: each stage appends the tokenizer's EOS token itself).

Why the features are *spurious* for a learned RM: in the preference pairs the better responses tend
to carry one courtesy phrase, a friendly closing line ("Hope this helps.") and a full sentence
naming the item; multi-courtesy and repeated answers are rare. Within that range "more of it"
correlates with gold; beyond it gold falls.

Files written by `python -m testbed --out DIR [--seed 0]` (a few seconds):
  DIR/data/sft_train.jsonl        {prompt, response}         demonstrations of middling quality
                                                             (~60% correct)
  DIR/data/pairs_train.jsonl      {prompt, chosen, rejected} labels from a noisy Bradley–Terry
                                                             annotator on gold:
  DIR/data/pairs_test.jsonl                                  P(a preferred to b) =
                                                             sigmoid((gold_a - gold_b) / tau)
  DIR/data/rl_prompts.jsonl       {prompt}                   PPO / meta-set prompts
                                                             (in-distribution)
  DIR/data/eval_prompts.jsonl     {prompt}                   100 held-out prompts: in no other file
  DIR/data/ood_prompts.jsonl      {prompt}                   OOD families only (OOD meta set, OOD
                                                             evaluation)
  DIR/data/ood_pairs_test.jsonl   {prompt, chosen, rejected} OOD families only
  DIR/base_model/                 byte-level BPE tokenizer + randomly initialised tiny Llama
                                  (save_pretrained), loaded by later stages exactly like Llama-2-7B:
                                  AutoTokenizer / AutoModelForCausalLM
  DIR/args.json, DIR/testbed.json the arguments; summary statistics (label agreement with gold,
                                  mean gold, sizes)
Same seed -> byte-identical files (every random draw comes from a `random.Random(seed + k)`,
never a global RNG).

Commands:
  python -m testbed --out runs/testbed  # tiny model (~1.1M params), default data sizes
  python -m testbed --out runs/testbed_m --model-size medium --seed 1

Deliberate choices:
  1. The world (fact table, word lists, gold reward) is fixed in code; the seed only changes which
     samples are drawn. So `gold_reward(prompt, response)` needs no seed and evaluate.py can import
     it as the judge.
  2. Eval prompts are drawn first and excluded from every other in-distribution file; no two eval
     prompts share their key items, so each held-out lookup question's fact is still taught by
     another phrasing.
  3. pairs_test shares prompts with pairs_train where a family is small (lookup has 48 prompts); its
     responses are fresh draws.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from plumbing import common
from plumbing.common import (UserError, arg, at_least, check, non_negative, parse_args, positive,
                             run_main, save_args)
from plumbing.data import write_jsonl
from testbed.gold import (CLOSING, COLOURS, FAMILIES, LETTERS, OBJECT_COLOUR, OOD, OPPOSITE,
                          W_TASK, WARM_PEAK, WORDS, WORLDS, best_response, bradley_terry_label,
                          courtesy_phrases, format_prompt, gold_components, gold_reward,
                          in_distribution, parse_prompt, sigmoid)


# --------------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------------
@dataclass
class Args:
    out: str = arg("",
                   "output folder (required): data/, base_model/, testbed.json are written inside")
    world: str = arg("assistant", "which world: assistant = the first testbed (the gold reward "
                                  "rewards correctness the small RM partly cannot learn); "
                                  "extrapolation = learnable families, courtesy worth more up to "
                                  "two phrases and less beyond, and data that never show beyond "
                                  "(testbed/gold.py)", choices=WORLDS)
    seed: int = arg(0, "seed of every random draw (data, tokenizer corpus, model init); "
                       "same seed -> same bytes", valid=common.seed)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    n_sft: int = arg(8000, "SFT demonstrations (middling quality)", valid=positive)
    n_pairs_train: int = arg(4000, "preference pairs for reward-model training", valid=positive)
    n_pairs_test: int = arg(500, "preference pairs for reward-model validation", valid=positive)
    n_rl_prompts: int = arg(1000, "prompts for PPO rollouts and the meta set S", valid=positive)
    n_eval_prompts: int = arg(100, "held-out evaluation prompts (paper: 100 test prompts)",
                              valid=positive)
    n_ood_prompts: int = arg(200, "prompts of the OOD families (OOD meta set / OOD evaluation)",
                             valid=positive)
    n_ood_pairs_test: int = arg(300, "preference pairs of the OOD families (RM accuracy under "
                                     "distribution shift)", valid=positive)
    label_noise: float = arg(1.0, "tau of the Bradley-Terry annotator "
                                  "P(a > b) = sigmoid((gold_a - gold_b) / tau); 1.0 gives ~73%% "
                                  "agreement with the gold ordering, like human annotators",
                                  valid=positive)
    errors: str = arg("visible", "what wrong answers look like: visible = a word that should not "
                                 "be there (another word repeated, a letter or list item not in "
                                 "the question, an operand for a sum), which a small RM can learn "
                                 "to see; subtle = also right items in the wrong order or count "
                                 "and off-by-one sums (the first testbed's world; "
                                 "docs/calibration.md compares them). Lookup answers (a wrong "
                                 "colour) and the OOD families are the same in both",
                      choices=("visible", "subtle"))
    vocab_size: int = arg(1000, "target vocabulary of the byte-level BPE tokenizer (fewer if the "
                                "corpus runs out of merges)",
                          valid=at_least(300, "256 bytes + specials + merges"))
    model_size: str = arg("tiny", "base model size: tiny ~1.1M params, small ~6M, medium ~29M",
                          choices=("tiny", "small", "medium"))
    overwrite: bool = arg(False, "replace a different testbed already in --out")


# --------------------------------------------------------------------------------------------------
# How each family's questions and wrong answers are drawn (the questions' templates and the right
# answers are testbed/gold.py's `FAMILIES`; a family without a `visible` error uses its `corrupt`
# one in both worlds)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    # rng -> params (strings, as they appear in the question)
    sample: Callable[[random.Random], dict]
    # (params, rng) -> a wrong answer's words ("subtle" errors)
    corrupt: Callable[[dict, random.Random], tuple]
    # a wrong answer that shows in its words
    visible: Callable[[dict, random.Random], tuple] | None = None


def _shuffled_other(rng: random.Random, items: list, forbidden: list) -> list:
    """A permutation of `items` different from `forbidden` (items has >= 2 distinct elements)."""
    while True:
        out = rng.sample(items, len(items))
        if out != forbidden:
            return out


def _corrupt_repeat(p, rng):
    n = int(p["n"])
    if rng.random() < 0.6:
        return (p["word"],) * rng.choice([m for m in (n - 1, n + 1, n + 2) if m >= 1])
    return (rng.choice([w for w in WORDS if w != p["word"]]),) * n


def _visible_repeat(p, rng):
    # another word, the right count
    return (rng.choice([w for w in WORDS if w != p["word"]]),) * int(p["n"])


def _corrupt_sort(p, rng):
    ls = p["letters"].split(" ")
    if rng.random() < 0.6:
        return tuple(_shuffled_other(rng, ls, sorted(ls)))  # right letters, wrong order
    out = sorted(ls)
    # one letter replaced
    out[rng.randrange(len(out))] = rng.choice([c for c in LETTERS if c not in ls])
    return tuple(out)


def _visible_sort(p, rng):
    ls = p["letters"].split(" ")
    out = sorted(ls)
    # a letter not in the question
    out[rng.randrange(len(out))] = rng.choice([c for c in LETTERS if c not in ls])
    return tuple(out)


def _corrupt_reverse(p, rng):
    items = p["items"].split(", ")
    if rng.random() < 0.5:
        return tuple(items)  # the original order
    return tuple(_shuffled_other(rng, items, items[::-1]))


def _visible_reverse(p, rng):
    items = p["items"].split(", ")
    out = items[::-1]
    # a word not in the question
    out[rng.randrange(len(out))] = rng.choice([w for w in WORDS if w not in items])
    return tuple(out)


def _corrupt_add(p, rng):
    return (str(int(p["a"]) + int(p["b"]) + rng.choice((-2, -1, 1, 2))),)


SAMPLERS = {
    "repeat": Sampler(lambda rng: {"word": rng.choice(WORDS), "n": str(rng.randint(2, 4))},
                      _corrupt_repeat, _visible_repeat),
    "sort": Sampler(lambda rng: {"letters": " ".join(rng.sample(LETTERS, rng.randint(3, 4)))},
                    _corrupt_sort, _visible_sort),
    "reverse": Sampler(lambda rng: {"items": ", ".join(rng.sample(WORDS, 3))}, _corrupt_reverse,
                       _visible_reverse),
    "lookup": Sampler(lambda rng: {"obj": rng.choice(sorted(OBJECT_COLOUR))},
                      lambda p, rng: (rng.choice([c for c in COLOURS
                                                  if c != OBJECT_COLOUR[p["obj"]]]),)),
    "add": Sampler(lambda rng: {"a": str(rng.randint(1, 9)), "b": str(rng.randint(1, 9))},
                   _corrupt_add,
                   # an operand echoed (never the sum: no 0)
                   lambda p, rng: (rng.choice((p["a"], p["b"])),)),
    "count": Sampler(lambda rng: {"words": " ".join(rng.choice(WORDS)
                                                    for _ in range(rng.randint(2, 5)))},
                     lambda p, rng: (str(len(p["words"].split(" ")) + rng.choice((-1, 1))),)),
    "opposite": Sampler(lambda rng: {"word": rng.choice(sorted(OPPOSITE))},
                        lambda p, rng: (rng.choice([w for w in sorted(OPPOSITE)
                                                    if w not in (p["word"],
                                                                 OPPOSITE[p["word"]])]),)),
}


# --------------------------------------------------------------------------------------------------
# Sampling questions and responses
# --------------------------------------------------------------------------------------------------
def sample_prompt(rng: random.Random, families: tuple[str, ...], world: str = "assistant") -> str:
    name = rng.choice(families)
    question = rng.choice(FAMILIES[name].templates).format(**SAMPLERS[name].sample(rng))
    return format_prompt(question, world)


@dataclass(frozen=True)
class Style:
    """Quality knobs of the response generator (probabilities)."""
    p_correct: float
    p_sentence: float        # the answer sentence (names the key items) ...
    p_answer_is: float       # ... or "The answer is X." (as long, no key items);
                             # else the bare answer
    p_courtesy: float        # exactly one courtesy phrase
    p_courtesy_many: float   # two or three (rare in the data: beyond it, a learned RM has to guess)
                             # (the extrapolation world: exactly two, its peak; never more)
    p_closing: float         # one closing line ("Hope this helps.")
    p_closing_many: float    # two closing lines (rambling)
    p_repeat: float          # the answer said twice (repetition)
    errors: str = "visible"  # wrong answers: "visible" (a word of the answer that should not be
                             # there, where the family has such an error) or "subtle" (also right
                             # items in the wrong order / count, off-by-one sums)


SFT_STYLE = Style(p_correct=0.6, p_sentence=0.4, p_answer_is=0.2, p_courtesy=0.3,
                  p_courtesy_many=0.0, p_closing=0.25, p_closing_many=0.02, p_repeat=0.05)


def pair_style(q: float, errors: str = "visible") -> Style:
    """Preference-pair responses: a quality level q in [0, 1] drawn per response moves every knob
    together, so in the pairs the surface features (courtesy, closing line, full sentence) go with
    correctness."""
    return Style(p_correct=0.2 + 0.7 * q, p_sentence=0.2 + 0.6 * q, p_answer_is=0.2,
                 p_courtesy=0.15 + 0.5 * q, p_courtesy_many=0.04, p_closing=0.05 + 0.55 * q,
                 p_closing_many=0.05 * (1 - q), p_repeat=0.15 * (1 - q), errors=errors)


# The extrapolation world: 0, 1 or 2 courtesy phrases (never more); in the pairs a better response
# is warmer, so within the data "more courtesy is better" holds.
SFT_STYLE_EXTRAPOLATION = dataclasses.replace(SFT_STYLE, p_courtesy=0.2, p_courtesy_many=0.05)


def pair_style_extrapolation(q: float, errors: str = "visible") -> Style:
    """pair_style, with the number of courtesy phrases (0, 1, 2) rising with the quality q."""
    return dataclasses.replace(pair_style(q, errors), p_courtesy=0.2 + 0.2 * q,
                               p_courtesy_many=0.05 + 0.45 * q)


def sample_response(prompt: str, rng: random.Random, style: Style) -> str:
    """One response to a testbed prompt: [courtesy] answer [answer again] [closing line(s)],
    leading space."""
    task = parse_prompt(prompt)
    fam, p, sampler = FAMILIES[task.family], task.p, SAMPLERS[task.family]
    wrong = sampler.visible if style.errors == "visible" and sampler.visible else sampler.corrupt
    answer = task.answer if rng.random() < style.p_correct else wrong(p, rng)
    u = rng.random()
    if u < style.p_sentence:
        core = fam.sentence(p, answer)
    elif u < style.p_sentence + style.p_answer_is:
        core = f"The answer is {fam.bare(answer)}."
    else:
        core = fam.bare(answer)
    parts = []
    phrases = courtesy_phrases(task.world)
    # the extrapolation world stops at its peak: beyond it is what the data never show
    many = (WARM_PEAK, WARM_PEAK) if task.world == "extrapolation" else (2, 3)
    u = rng.random()
    if u < style.p_courtesy_many:
        parts += rng.sample(phrases, rng.randint(*many))
    elif u < style.p_courtesy_many + style.p_courtesy:
        parts.append(rng.choice(phrases))
    if core[-1] not in ".!?" and rng.random() < 0.5:
        core += "."  # bare answers come with and without a full stop
    parts.append(core)
    if rng.random() < style.p_repeat:
        parts.append(core)
    u = rng.random()
    if u < style.p_closing_many:
        parts += rng.sample(CLOSING, 2)
    elif u < style.p_closing_many + style.p_closing:
        parts.append(rng.choice(CLOSING))
    return " " + " ".join(parts)


def sample_pairs(rng: random.Random, n: int, families: tuple[str, ...], tau: float,
                 exclude: set[str], errors: str = "visible", world: str = "assistant"
                 ) -> list[dict]:
    """n preference pairs; the label is a noisy Bradley–Terry draw on the gold scores:
    P(a chosen over b) = sigmoid((gold_a - gold_b) / tau). Identical responses and equal gold are
    skipped."""
    style = pair_style_extrapolation if world == "extrapolation" else pair_style
    pairs = []
    while len(pairs) < n:
        prompt = sample_prompt(rng, families, world)
        if prompt in exclude:
            continue
        a = sample_response(prompt, rng, style(rng.random(), errors))
        b = sample_response(prompt, rng, style(rng.random(), errors))
        pair = bradley_terry_label(prompt, a, b, tau, rng)
        if pair is not None:
            pairs.append(pair)
    return pairs


def sample_eval_prompts(rng: random.Random, n: int, world: str = "assistant") -> list[str]:
    """n unique held-out prompts, spread evenly over the in-distribution families;
    no two share key items."""
    out: list[str] = []
    families = in_distribution(world)
    for i, name in enumerate(families):
        want = n // len(families) + (i < n % len(families))
        seen_keys: set[tuple] = set()
        for _ in range(100_000):
            if want == 0:
                break
            prompt = sample_prompt(rng, (name,), world)
            task = parse_prompt(prompt)
            # the first world keeps its prompts apart by key items (each held-out lookup fact is
            # taught by another question); the extrapolation world has no facts to keep: distinct
            # questions suffice (30 words to repeat would not fill a third of 100 prompts)
            keys = tuple(sorted(task.keys)) if world == "assistant" else task.params
            if keys not in seen_keys:
                seen_keys.add(keys)
                out.append(prompt)
                want -= 1
        check(want == 0,
              f"--n-eval-prompts {n} is too many for family '{name}' (distinct key items run out)")
    return out


def sample_unique_prompts(rng: random.Random, n: int, families: tuple[str, ...],
                          exclude: set[str], world: str = "assistant") -> list[str]:
    """n prompts, unique while the families have enough distinct prompts
    (then repeats are allowed)."""
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        prompt = sample_prompt(rng, families, world)
        if prompt not in exclude and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    while len(out) < n:  # small families exhausted: fill with repeats
        prompt = sample_prompt(rng, families, world)
        if prompt not in exclude:
            out.append(prompt)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer and base model
# --------------------------------------------------------------------------------------------------
EOS, PAD = "<|endoftext|>", "<|pad|>"
MODEL_SIZES = {  # hidden, intermediate, layers, heads (= key/value heads)
    "tiny": (128, 384, 4, 4),
    "small": (256, 768, 6, 8),
    "medium": (512, 1536, 8, 8),
}
# Every stage refuses a --max-len (or prompt + --max-new-tokens) beyond a model's positions;
# 1024 lets the paper's defaults (512) run on the testbed as they are. Llama's positions are
# rotary (no table), so this costs no weights.
MAX_POSITIONS = 1024


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style), no BOS, EOS and PAD distinct. Trained on the sorted unique
    corpus: the trainer is deterministic for a fixed input order. The full byte alphabet is
    included, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(corpus)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   model_max_length=MAX_POSITIONS)


def build_model(size: str, tokenizer, seed: int):
    """A randomly initialised Llama; the init is drawn from torch's RNG seeded inside a fork
    (no global side effect)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads = MODEL_SIZES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, use_cache=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
CONTENT_ARGS = ("world", "seed", "n_sft", "n_pairs_train", "n_pairs_test", "n_rl_prompts", "n_eval_prompts",
                "n_ood_prompts", "n_ood_pairs_test", "label_noise", "errors", "vocab_size",
                "model_size")


def _prepare_out(args: Args) -> None:
    """Refuse a non-empty --out that holds something else unless --overwrite;
    then clear what we own."""
    wanted = {k: getattr(args, k) for k in CONTENT_ARGS}
    if os.path.isdir(args.out) and os.listdir(args.out):
        info = os.path.join(args.out, "testbed.json")
        existing = None
        if os.path.isfile(info):
            try:
                with open(info) as f:
                    recorded = json.load(f)["args"]
                # a testbed written before --world existed is the first world
                existing = {k: recorded.get(k, "assistant" if k == "world" else None)
                            for k in CONTENT_ARGS}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                existing = None
        if existing != wanted and not args.overwrite:
            what = ("a different testbed" if existing is not None
                    else "something that is not a testbed")
            raise UserError(f"{args.out} is not empty and holds {what}; "
                            "pass --overwrite to replace it")
        common.lock_output(args.out)  # one live run per folder, before anything of it is removed
        for name in ("data", "base_model"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
        for name in ("testbed.json", "args.json"):
            if os.path.isfile(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
    common.lock_output(args.out)  # (a no-op when taken above)
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)


def agreement(pairs: list[dict]) -> float:
    """Share of pairs whose chosen response has the higher gold reward."""
    return sum(gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"])
               for r in pairs) / len(pairs)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(Args, argv)  # also checks every number (positive sizes, vocab >= 300, ...)
    check(args.out != "", "--out is required")
    common.configure_process(args.threads)
    start = time.time()
    _prepare_out(args)

    # ---- data: every file gets its own generator,
    # so changing one size leaves the other files as they were
    def rng_for(k: int) -> random.Random:
        return random.Random(args.seed * 1000 + k)

    world, families = args.world, in_distribution(args.world)
    eval_prompts = sample_eval_prompts(rng_for(1), args.n_eval_prompts, world)
    held_out = set(eval_prompts)
    rng = rng_for(2)
    sft_style = dataclasses.replace(
        SFT_STYLE_EXTRAPOLATION if world == "extrapolation" else SFT_STYLE, errors=args.errors)
    sft = []
    while len(sft) < args.n_sft:
        prompt = sample_prompt(rng, families, world)
        if prompt not in held_out:
            sft.append({"prompt": prompt, "response": sample_response(prompt, rng, sft_style)})
    pairs_train = sample_pairs(rng_for(3), args.n_pairs_train, families, args.label_noise,
                               held_out, args.errors, world)
    pairs_test = sample_pairs(rng_for(4), args.n_pairs_test, families, args.label_noise,
                              held_out, args.errors, world)
    rl_prompts = sample_unique_prompts(rng_for(5), args.n_rl_prompts, families, held_out, world)
    ood_prompts = sample_unique_prompts(rng_for(6), args.n_ood_prompts, OOD, set(), world)
    ood_pairs = sample_pairs(rng_for(7), args.n_ood_pairs_test, OOD, args.label_noise, set(),
                             args.errors, world)

    data = os.path.join(args.out, "data")
    files = {"sft_train": sft, "pairs_train": pairs_train, "pairs_test": pairs_test,
             "rl_prompts": [{"prompt": p} for p in rl_prompts],
             "eval_prompts": [{"prompt": p} for p in eval_prompts],
             "ood_prompts": [{"prompt": p} for p in ood_prompts], "ood_pairs_test": ood_pairs}
    for name, records in files.items():
        write_jsonl(os.path.join(data, f"{name}.jsonl"), records)

    # ---- tokenizer (trained on every prompt and response written) and model
    corpus = [text for records in files.values() for r in records for text in r.values()]
    all_prompts = sorted({r["prompt"] for records in files.values() for r in records})
    corpus += [best_response(p) for p in all_prompts]
    import transformers

    tokenizer = train_tokenizer(corpus, args.vocab_size)
    model = build_model(args.model_size, tokenizer, args.seed)
    base = os.path.join(args.out, "base_model")
    # "Writing model shards" bar: noise for a 4 MB file
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)

    # ---- summary
    def n_tokens(texts: list[str]) -> list[int]:
        return [len(ids)
                for ids in tokenizer(sorted(set(texts)), add_special_tokens=False).input_ids]

    all_pairs = pairs_train + pairs_test + ood_pairs
    responses = ([r["response"] for r in sft]
                 + [r[k] for r in all_pairs for k in ("chosen", "rejected")])
    prompt_tokens, response_tokens = n_tokens(all_prompts), n_tokens(responses)
    stats = {
        "label_agreement_with_gold": {"pairs_train": agreement(pairs_train),
                                      "pairs_test": agreement(pairs_test),
                                      "ood_pairs_test": agreement(ood_pairs)},
        "expected_label_agreement": mean(sigmoid(abs(gold_reward(r["prompt"], r["chosen"]) -
                                                     gold_reward(r["prompt"], r["rejected"]))
                                                 / args.label_noise)
                                         for r in pairs_train),
        "mean_gold": {"sft_demos": mean(gold_reward(r["prompt"], r["response"]) for r in sft),
                      "best_responses": mean(gold_reward(r["prompt"], best_response(r["prompt"]))
                                             for r in sft),
                      "pairs_chosen": mean(gold_reward(r["prompt"], r["chosen"])
                                           for r in pairs_train),
                      "pairs_rejected": mean(gold_reward(r["prompt"], r["rejected"])
                                             for r in pairs_train)},
        "sft_correct_fraction": mean(gold_components(r["prompt"], r["response"])["task"] == W_TASK
                                     for r in sft),
        "records": {name: len(records) for name, records in files.items()},
        "vocab_size": len(tokenizer),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        # over unique texts
        "max_tokens": {"prompt": max(prompt_tokens), "response": max(response_tokens)},
        "mean_tokens": {"prompt": mean(prompt_tokens), "response": mean(response_tokens)},
    }
    save_args(args, args.out)
    with open(os.path.join(args.out, "testbed.json"), "w") as f:
        json.dump({"args": {k: getattr(args, k) for k in CONTENT_ARGS}, "stats": stats}, f,
                  indent=2, sort_keys=True)

    agree = stats["label_agreement_with_gold"]
    print(f"testbed in {args.out}: {stats['records']}")
    print(f"label agreement with gold (tau {args.label_noise}): train {agree['pairs_train']:.3f}, "
          f"test {agree['pairs_test']:.3f}, ood {agree['ood_pairs_test']:.3f} "
          f"(expected {stats['expected_label_agreement']:.3f})")
    print(f"mean gold: sft demos {stats['mean_gold']['sft_demos']:.3f}, "
          f"best responses {stats['mean_gold']['best_responses']:.3f}; "
          f"sft correct {stats['sft_correct_fraction']:.2f}")
    print(f"tokenizer vocab {stats['vocab_size']}, model {args.model_size} "
          f"{stats['model_parameters']:,} params, "
          f"max tokens prompt {stats['max_tokens']['prompt']} "
          f"response {stats['max_tokens']['response']}; {time.time() - start:.1f} s")
    return stats


if __name__ == "__main__":
    run_main(main)

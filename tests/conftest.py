"""Shared fixtures: a tiny random Llama and a tiny offline tokenizer with a chat template."""
from __future__ import annotations

import json
import os
import random

import pytest

# tests never touch the network
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "def add(a, b):\n    return a + b\n", "What is 12 plus 30? The answer is 42.",
    "Tom has 3 apples and buys 4 more. 3 + 4 = 7. #### 7", "Write a function that reverses a list.",
    "the quick brown fox jumps over the lazy dog", "0123456789 + - * / = ( ) [ ] { } : ,",
]


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Unit tests run tiny models, which are fastest on one thread (and the machine's cores are shared);
    slow tests keep torch's threads for the embedded model."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tiny_tokenizer(vocab_size: int = 160):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_llama(vocab_size: int, *, layers: int = 3, hidden: int = 16, inter: int = 24, seed: int = 0,
                    dtype=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


def chat_samples(n: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        msgs = [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs + [
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{2 * (a + b)}"}]
        out.append({"messages": msgs})
    return out


@pytest.fixture
def chat_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in chat_samples(8)))
    return path


def make_massive_llama(vocab_size: int, *, layers: int = 4, hidden: int = 16, inter: int = 24, at: int = 1,
                       out_channel: int = 5, in_channel: int = 7, gain: float = 60.0, weight: float = 80.0,
                       seed: int = 0):
    """A tiny Llama with a planted "super weight": in block `at`, FFN channel `in_channel` is amplified
    (gate and up rows x gain) and down_proj.weight[out_channel, in_channel] = weight, so the block writes a
    massive value into residual channel `out_channel` that later blocks carry along."""
    import torch

    model = make_tiny_llama(vocab_size, layers=layers, hidden=hidden, inter=inter, seed=seed)
    mlp = model.model.layers[at].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[in_channel] *= gain
        mlp.up_proj.weight[in_channel] *= gain
        mlp.down_proj.weight[out_channel, in_channel] = weight
    return model


def tiny_loaded(tok, **kw):
    """A tiny random Llama and `tok` as the `models.LoadedModel` the trainers and studies take."""
    from domlora.models import LoadedModel

    return LoadedModel(model=make_tiny_llama(len(tok), **kw), tokenizer=tok, spec="tiny", path="")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    """A tiny random Llama + tokenizer saved as a checkpoint folder `base/` (what load_model reads), per test."""
    d = tmp_path / "base"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved as a Hugging Face checkpoint folder (a stand-in for a hub model)."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path

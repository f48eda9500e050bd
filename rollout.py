"""rollout.py: load a causal LM and sample groups of responses from it (flat, or as an entropy-forked tree).

Part 1 (this section) loads models: a Hugging Face hub id, a local directory, a checkpoint that
train.py wrote, or `tiny`, a random Qwen3 of 80k-400k parameters with a character tokenizer built
offline with the `tokenizers` library. The tiny model is what the tests, the CPU demo and the study
run on; nothing here touches the network unless a hub id is given.
"""
from __future__ import annotations

import os
import string

import torch

# ----------------------------------------------------------------------------------------------
# Models: the tiny offline Qwen3, and loading anything else

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen3's template renders it without a system prompt or thinking switch.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII plus Qwen3's three special tokens.

    Left padding is passed to the constructor because transformers 5.x drops an attribute set
    afterwards when the tokenizer is saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]  # 97 characters incl. space, \t, \n
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None, padding_side="left",
        chat_template=CHAT_TEMPLATE, additional_special_tokens=[BOS],
    )


def build_tiny_model(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Qwen3 sized for a laptop CPU: hidden 64 x 2 layers is 80k parameters, 128 x 4 about 600k."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    # Sampling settings come from our arguments only; a shipped generation_config must not leak in.
    model.generation_config.do_sample = False
    return model


def load_model_and_tokenizer(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             tiny_hidden: int = 64, tiny_layers: int = 2, seed: int = 0):
    """`name` is `tiny`, a local directory (a train.py checkpoint included) or a hub id.

    A hub id that cannot be reached fails fast with a message naming `--model PATH` and
    HF_HUB_OFFLINE, instead of transformers' retry loop and traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, tiny_hidden, tiny_layers, seed)
        return model.to(device=device, dtype=dtype), tokenizer
    if not os.path.isdir(name) and ("/" not in name or name.startswith((".", "/"))):
        raise ValueError(f"--model {name!r}: no such directory, and not a hub id of the form owner/name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:
        raise SystemExit(
            f"could not load model {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
            "Offline? Download it elsewhere and pass --model PATH to the local directory "
            "(set HF_HUB_OFFLINE=1 to fail at once instead of retrying)."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer

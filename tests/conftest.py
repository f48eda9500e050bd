"""Shared fixtures: everything is built offline (a random tiny Qwen3 and a character tokenizer)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import rollout

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return rollout.build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """Random hidden-64 x 2-layer Qwen3 (80k parameters), fp32, eval mode. Do not train it in place."""
    return rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2, seed=0).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model and tokenizer saved as a local directory, as a downloaded checkpoint would be."""
    d = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def warm_dir(tmp_path_factory):
    """The demo's warm-started tiny model (hidden 128 x 4, supervised on `add` to 30% greedy accuracy)."""
    import train
    return train.warm_start(train.parse_args(["--demo", "--out", str(tmp_path_factory.mktemp("warm"))]))

"""The offline tiny Qwen3 and character tokenizer that every other test and the demo stand on."""
import pytest
import torch

import rollout


def test_char_tokenizer_round_trips_text_and_chat(tiny_tokenizer):
    text = "Let x = 12+34; then \\boxed{46}.\n(A) yes"
    ids = tiny_tokenizer(text).input_ids
    assert len(ids) == len(text)  # one token per character
    assert tiny_tokenizer.decode(ids) == text
    msgs = [{"role": "user", "content": "12+34="}]
    chat = tiny_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tiny_tokenizer.decode(chat) == "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token_id != tiny_tokenizer.pad_token_id


def test_tiny_model_is_seeded_and_sized(tiny_tokenizer):
    a = rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2, seed=3)
    b = rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2, seed=3)
    c = rollout.build_tiny_model(tiny_tokenizer, hidden=64, layers=2, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    n = sum(p.numel() for p in a.parameters())
    assert 50_000 < n < 150_000, n
    assert a.config.vocab_size == len(tiny_tokenizer)
    # Building a model must not disturb the caller's global RNG stream.
    torch.manual_seed(0); x = torch.rand(3)
    torch.manual_seed(0); rollout.build_tiny_model(tiny_tokenizer, seed=5); y = torch.rand(3)
    assert torch.equal(x, y)


def test_saved_directory_loads_back_identically(tiny_model, tiny_model_dir):
    model, tok = rollout.load_model_and_tokenizer(tiny_model_dir)
    assert tok.padding_side == "left"  # lost by save_pretrained if set as an attribute (transformers 5.x)
    ids = torch.tensor([tok("1+2=").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_model(ids).logits, atol=1e-6)


def test_bad_model_names_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        rollout.load_model_and_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="--model PATH"):  # hub id while offline: no retry loop
        rollout.load_model_and_tokenizer("nobody-here/no-such-model")

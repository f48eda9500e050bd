"""Tests of PPO with a learned critic (SPEC 9): GAE against a hand-computed case and a plain loop on random
inputs, the batch whitening; the critic (a value head on the policy's backbone, no LM head) and its clipped value
loss by hand. Its runs (resume, 2 ranks) are in test_runs.py.
"""
import contextlib
import math
import random

import pytest
import torch

import advantages
import train


# ----------------------------------------------------------------------------------------------
# GAE and whitening on fixed tensors


def test_gae_by_hand():
    """Row 0: 3 tokens, V = [0.5, 0.2, 0.8], reward 1, gamma 0.9, lam 0.5 (gamma lam = 0.45):
        delta_2 = 1 + 0.9 * 0 - 0.8 = 0.2            (V after the last token = 0)
        delta_1 = 0 + 0.9 * 0.8 - 0.2 = 0.52
        delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32
        A_2 = 0.2, A_1 = 0.52 + 0.45 * 0.2 = 0.61, A_0 = -0.32 + 0.45 * 0.61 = -0.0455
        R = A + V = [0.4545, 0.81, 1.0]
    Row 1: 1 token (then padding whose V holds junk), V_0 = 0.3, reward 0: A_0 = -0.3, R_0 = 0."""
    V = torch.tensor([[0.5, 0.2, 0.8], [0.3, 9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    A, R = advantages.gae_advantages(torch.tensor([1.0, 0.0]), V, mask, gamma=0.9, lam=0.5)
    assert A.tolist()[0] == pytest.approx([-0.0455, 0.61, 0.2])
    assert R.tolist()[0] == pytest.approx([0.4545, 0.81, 1.0])
    assert A.tolist()[1] == pytest.approx([-0.3, 0.0, 0.0]) and R.tolist()[1] == pytest.approx([0.0, 0.0, 0.0])
    # gamma = lam = 1 (the defaults): A_t = r - V_t, R_t = r on every valid token
    A, R = advantages.gae_advantages(torch.tensor([1.0, 0.0]), V, mask)
    assert A.flatten().tolist() == pytest.approx([0.5, 0.8, 0.2, -0.3, 0.0, 0.0])
    assert R.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def _gae_loop(r_tok, V, lengths, gamma, lam):
    """SPEC 9 read literally, one row and one token at a time."""
    B, T = len(V), len(V[0])
    A, R = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = lengths[i]
        for t in range(n):
            total = 0.0
            for s in range(t, n):
                v_next = V[i][s + 1] if s + 1 < n else 0.0
                total += (gamma * lam) ** (s - t) * (r_tok[i][s] + gamma * v_next - V[i][s])
            A[i][t], R[i][t] = total, total + V[i][t]
    return A, R


@pytest.mark.parametrize("seed", range(6))
def test_gae_equals_a_plain_loop_on_random_inputs(seed):
    """Random lengths (empty and full rows included), values, rewards, gamma and lam in (0, 1]; per-row rewards
    and per-token rewards, against a loop over each row's Python list."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    B, T = 9, rnd.randint(1, 30)
    lengths = [rnd.randint(0, T) for _ in range(B)]
    lengths[0] = T
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    V = torch.randn(B, T, generator=g, dtype=torch.float64)
    gamma, lam = (1.0, 1.0) if seed == 0 else (rnd.uniform(0.05, 1.0), rnd.uniform(0.05, 1.0))
    r = torch.randn(B, generator=g, dtype=torch.float64)
    r_tok = [[float(r[i]) if t == lengths[i] - 1 else 0.0 for t in range(T)] for i in range(B)]
    A_ref, R_ref = _gae_loop(r_tok, V.tolist(), lengths, gamma, lam)
    A, R = advantages.gae_advantages(r, V, mask, gamma, lam)
    torch.testing.assert_close(A.double(), torch.tensor(A_ref, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R.double(), torch.tensor(R_ref, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    per_token = torch.randn(B, T, generator=g, dtype=torch.float64)  # rewards on every token
    A_ref, _ = _gae_loop(per_token.tolist(), V.tolist(), lengths, gamma, lam)
    A, _ = advantages.gae_advantages(per_token, V, mask, gamma, lam)
    torch.testing.assert_close(A.double(), torch.tensor(A_ref, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_whiten_over_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    w = advantages.whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, unbiased var 5/3
    expected = (valid - 2.5) / math.sqrt(5 / 3 + 1e-8)
    assert w[mask].tolist() == pytest.approx(expected.tolist())
    assert w[~mask].tolist() == [0.0, 0.0]
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-7) and float(w[mask].std()) == pytest.approx(1.0)
    assert advantages.whiten(torch.tensor([[5.0, 7.0]]), torch.tensor([[True, False]])).flatten().tolist() == [0.0, 0.0]


def test_critic_is_the_policys_initial_backbone_with_a_value_head(tiny_model_dir, tmp_path):
    """load_models' critic: every backbone tensor the initial policy's, no LM head, a [1, H] head; its values have
    the response's shape, 0 at padding, and equal the last hidden state before each token times the head."""
    args = train.parse_args(["--method", "ppo", "--model", tiny_model_dir, "--no-grad-ckpt", "--out", str(tmp_path)])
    policy, _, critic, _ = train.load_models(args, train.Worker())
    sd, psd = critic.state_dict(), policy.state_dict()
    assert not any(k.startswith("lm_head") for k in sd) and sd["score.weight"].shape == (1, 64)
    assert {k for k in psd if not k.startswith("lm_head")} == {k for k in sd if k.startswith("model.")}
    assert all(torch.equal(v, psd[k]) for k, v in sd.items() if k.startswith("model."))
    batch = dict(prompt_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]), prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]).bool(),
                 response_ids=torch.tensor([[10, 11, 12], [13, 0, 0]]),
                 response_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
    V = train.forward_rows(lambda mb: train.response_values(critic, mb, contextlib.nullcontext), batch, args)
    assert V.shape == (2, 3) and V[1, 1:].tolist() == [0.0, 0.0] and (V[0] != 0).all()
    with torch.no_grad():  # row 0: prompt [5, 6] then response [10, 11, 12]; V_t from the state before token t
        h = critic.model(input_ids=torch.tensor([[5, 6, 10, 11]])).last_hidden_state[0]  # [4, H]
    torch.testing.assert_close(V[0], h[1:4] @ sd["score.weight"][0] + sd["score.bias"])


def test_value_loss_by_hand():
    """c = 0.5. Token 0: V = 2, V_old = 1, R = 0: plain 4, clipped (1.5 - 0)^2 = 2.25 -> 0.5 * 4 = 2 (not clipped).
    Token 1: V = 2, V_old = 1, R = 3: plain 1, clipped (1.5 - 3)^2 = 2.25 -> 0.5 * 2.25 = 1.125 (clipped).
    Token 2 is padding. Normaliser 2 -> (2 + 1.125) / 2; no gradient through the clipped token."""
    V = torch.tensor([[2.0, 2.0, 9.0]], requires_grad=True)
    mb = dict(old_values=torch.tensor([[1.0, 1.0, 0.0]]), returns=torch.tensor([[0.0, 3.0, 0.0]]),
              response_mask=torch.tensor([[1, 1, 0]]).bool())
    loss, stats = train.value_loss(V, mb, torch.tensor(2.0))
    assert float(loss.detach()) == pytest.approx(3.125 / 2) and float(stats["value_clipped"]) == 1
    loss.backward()
    assert V.grad.tolist() == [[pytest.approx(1.0), 0.0, 0.0]]

"""trie.py by hand: SPEC 3's worked example, END as a child, values, statistics, show().

The numbers below are derived by hand in the comments (SPEC sections 1-3 and 5); the trie must
reproduce them. Cross-checks against advantages.py and an independent loop-by-loop reading of
the SPEC live in test_advantages.py.
"""
import io
import math

import pytest
import torch

import trie
import trie_batch

# SPEC 3's worked example: A=0, B=1, x=2, y=3, '.'=4
EX_GROUP = [[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]]
EX_REWARDS = [1.0, 1.0, 0.0, 0.0]
NAMES = {0: "A", 1: "B", 2: "x", 3: "y", 4: "."}


def test_baseline_by_hand():
    mu, sigma = trie.group_baseline(EX_REWARDS)
    assert mu == 0.5
    assert sigma == pytest.approx(math.sqrt(1 / 3))  # 4 * 0.25 / 3
    assert trie.group_baseline([3.0]) == (0.0, 1.0)  # a group of one: mu = 0, sigma = 1


def test_worked_example_values():
    root = trie.build_trie(EX_GROUP, EX_REWARDS)
    assert (root.n, root.V) == (4, 0.5)  # V(root) = mu
    a = root.children[0]
    assert (a.n, a.V) == (3, pytest.approx(2 / 3))
    assert (a.children[2].n, a.children[2].V) == (2, 1.0)
    assert (a.children[3].n, a.children[3].V) == (1, 0.0)
    assert (root.children[1].n, root.children[1].V) == (1, 0.0)
    assert root.is_branch and a.is_branch and not a.children[2].is_branch
    assert [s.V for s in trie.path(root, EX_GROUP[2])] == [0.5, pytest.approx(2 / 3), 0.0, 0.0, 0.0]


def test_worked_example_tempo_spec_numbers():
    # the numbers printed in SPEC 3 (eps -> 0, three decimals)
    expected = [[1.155, 1.443, 0.866, 0.866], [1.155, 1.443, 0.866, 0.866],
                [-0.577, -2.021, -0.866, -0.866], [-1.732, -0.866, -0.866, -0.866]]
    got = trie.tempo_group(EX_GROUP, EX_REWARDS, eps=0.0)
    for g_row, e_row in zip(got, expected):
        assert g_row == pytest.approx(e_row, abs=1e-3)


def test_worked_example_tempo_exact_formula():
    # A = ((r - mu) + V(s_{t+1}) - V(s_t)) / (sigma + eps), written out token by token
    s = math.sqrt(1 / 3) + 1e-6
    expected = [
        [(0.5 + 1 / 6) / s, (0.5 + 1 / 3) / s, 0.5 / s, 0.5 / s],
        [(0.5 + 1 / 6) / s, (0.5 + 1 / 3) / s, 0.5 / s, 0.5 / s],
        [(-0.5 + 1 / 6) / s, (-0.5 - 2 / 3) / s, -0.5 / s, -0.5 / s],
        [(-0.5 - 0.5) / s, -0.5 / s, -0.5 / s, -0.5 / s],
    ]
    got = trie.tempo_group(EX_GROUP, EX_REWARDS)
    for g_row, e_row in zip(got, expected):
        assert g_row == pytest.approx(e_row, rel=1e-12, abs=1e-12)
    # td_weight scales only the TD part; scale_td=False leaves it undivided
    half = trie.tempo_group(EX_GROUP, EX_REWARDS, td_weight=0.5)
    assert half[2][1] == pytest.approx((-0.5 - 0.5 * 2 / 3) / s)
    raw = trie.tempo_group(EX_GROUP, EX_REWARDS, scale_td=False)
    assert raw[2][1] == pytest.approx(-0.5 / s - 2 / 3)


def test_worked_example_treeadv():
    # Ahat = (V(s_{t+1}) - mu) / sigma: token 'A' sits in node A (V = 2/3) for rows 1-3
    s = math.sqrt(1 / 3) + 1e-6
    got = trie.treeadv_group(EX_GROUP, EX_REWARDS)
    assert got[0] == pytest.approx([(2 / 3 - 0.5) / s] + [0.5 / s] * 3)
    assert got[2] == pytest.approx([(2 / 3 - 0.5) / s] + [-0.5 / s] * 3)
    assert got[3] == pytest.approx([-0.5 / s] * 4)
    # the three rows through 'A' carry 3 * Ahat(A) = the sum of their GRPO advantages
    assert sum(got[i][0] for i in range(3)) == pytest.approx((0.5 + 0.5 - 0.5) / s)


def test_strict_prefix_leaves_at_its_end():
    # "ab" (r=0) is a strict prefix of "abc" (r=1): END is a child of node "ab", so "ab" branches
    # and "abc"'s token c gets delta = V(abc) - V(ab) = 1 - 0.5
    group, rewards = [[7, 8], [7, 8, 9]], [0.0, 1.0]
    root = trie.build_trie(group, rewards)
    ab = root.children[7].children[8]
    assert ab.is_branch and set(ab.children) == {trie.END, 9}
    assert ab.children[9].n == 1 and ab.children[trie.END].n == 1
    s = math.sqrt(0.5) + 1e-6
    A = trie.tempo_group(group, rewards)
    assert A[0] == pytest.approx([-0.5 / s] * 2)  # "ab" is never alone: its deltas are 0
    assert A[1] == pytest.approx([0.5 / s, 0.5 / s, (0.5 + 0.5) / s])
    assert [s.n for s in trie.path(root, group[1])[1:]] == [2, 2, 1]  # n(s_{t+1}), SPEC 5b's weights


def test_all_equal_and_group_of_one():
    group = [[1, 2], [1, 3], [4]]
    assert trie.tempo_group(group, [0.1] * 3) == [[0.0, 0.0], [0.0, 0.0], [0.0]]
    assert trie.treeadv_group(group, [0.1] * 3) == [[0.0, 0.0], [0.0, 0.0], [0.0]]
    # G = 1: mu = 0, sigma = 1; nothing branches, every token carries r / (1 + eps)
    assert trie.tempo_group([[5, 6]], [1.0])[0] == pytest.approx([1 / (1 + 1e-6)] * 2)
    assert trie.treeadv_group([[5, 6]], [1.0])[0] == pytest.approx([1 / (1 + 1e-6)] * 2)


def test_empty_response():
    # an empty response is in D(root) only: the root branches (END and token 3)
    group, rewards = [[], [3, 4]], [1.0, 0.0]
    root = trie.build_trie(group, rewards)
    assert root.is_branch and root.children[trie.END].n == 1
    s = math.sqrt(0.5) + 1e-6
    A = trie.tempo_group(group, rewards)
    assert A[0] == [] and A[1] == pytest.approx([(-0.5 - 0.5) / s, -0.5 / s])


def test_tree_stats_by_hand():
    root = trie.build_trie(EX_GROUP, EX_REWARDS)
    st = trie.tree_stats(root, EX_GROUP)
    # root, A, Ax, Ax., Ax.., Ay, Ay., Ay.., B, B., B.., B...
    assert st["nodes"] == 12 and st["branch_nodes"] == 2 and st["tokens"] == 16
    # 4 tokens leave the root, 3 leave node A
    assert st["branch_tokens"] == 7
    assert st["first_divergence"] == [0, 0, 0, 0]
    assert st["unique_depth"] == [4, 4, 1, 0]  # rows 1, 2 identical; row 3 shares "A"; row 4 alone


def test_show_prints_segments():
    root = trie.build_trie(EX_GROUP, EX_REWARDS)
    buf = io.StringIO()
    sigma = trie.group_baseline(EX_REWARDS)[1]
    trie.show(root, decode=lambda ids: "".join(NAMES[i] for i in ids), sigma=sigma, file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "root  n=4  V=0.500  *"
    assert any("'x..'  n=2  V=1.000" in line and "+0.577" in line for line in lines)
    assert any("'B...'  n=1  V=0.000" in line and "-0.866" in line for line in lines)
    assert sum("<end>" in line for line in lines) == 3  # three distinct leaves
    assert len(lines) == 1 + 4 + 3  # root, segments A / x.. / y.. / B..., three ends


def test_batch_wrapper_cuts_padding_with_the_mask():
    # padding holds ids that are real tokens elsewhere; the mask alone decides where rows end
    responses = torch.tensor([[7, 8, 9, 9], [7, 8, 9, 7]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    rewards = torch.tensor([0.0, 1.0])
    A = trie_batch.tempo_batch(responses, mask, rewards, 2)
    expected = trie.tempo_group([[7, 8], [7, 8, 9]], [0.0, 1.0])
    assert A.dtype == torch.float32
    assert A[0, :2].tolist() == pytest.approx(expected[0]) and A[0, 2:].tolist() == [0.0, 0.0]
    assert A[1, :3].tolist() == pytest.approx(expected[1]) and A[1, 3].item() == 0.0
    assert trie_batch.prefix_counts_batch(responses, mask, 2).tolist() == [[2, 2, 0, 0], [2, 2, 1, 0]]

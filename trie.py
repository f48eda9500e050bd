"""trie.py: Prefix-to-Tree (P2T) as a dictionary trie, the version of the advantages that reads like the paper.

Implements SPEC sections 1 (GRPO baseline mu, sigma), 2 (the prefix trie, V(s), branch nodes),
3 (TEMPO token advantage) and 5 (TreeAdv redistributed advantage) for one group of G responses,
plus tree statistics (SPEC 8) and `show()`, which prints a small tree for teaching. It is plain Python
on lists: `tests/trie_batch.py` runs it group by group over padded [B, T] tensors, and the tests and
`benchmarks/bench_advantages.py` compare it with the fast, vectorised `advantages.py`.

Departures from the papers (all from SPEC): a response that ends at a node leaves the tree there
(END is its own child), decided from the mask and never from a padding id; a group of one has
mu = 0, sigma = 1; a group whose rewards are all equal gets exactly 0 everywhere.

Run `python trie.py` to print SPEC section 3's worked example as a tree with its advantages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

END = "<end>"  # children key for "the response ends here"; a str never equals an int token id


# ----------------------------------------------------------------------------------------------
# SPEC 1: the group baseline


def group_baseline(rewards: list[float]) -> tuple[float, float]:
    """mu = mean(r), sigma = std(r) with Bessel's correction; a group of one has mu = 0, sigma = 1."""
    G = len(rewards)
    if G == 1:
        return 0.0, 1.0
    mu = sum(rewards) / G
    sigma = math.sqrt(sum((r - mu) ** 2 for r in rewards) / (G - 1))
    return mu, sigma


def all_equal(rewards: list[float]) -> bool:
    """SPEC 1: a group of two or more with equal rewards carries no signal; every advantage is exactly 0."""
    return len(rewards) >= 2 and all(r == rewards[0] for r in rewards)


# ----------------------------------------------------------------------------------------------
# SPEC 2: the prefix trie


@dataclass(eq=False)
class Node:
    """A state s = (q, o_<t): one distinct response prefix. The root is the prompt (depth 0)."""

    token: int | str | None  # the token that led here (None at the root, END for an end marker)
    depth: int  # t = |o_<t|, the number of response tokens in the prefix
    n: int = 0  # |D(s)|: responses whose prefix is s
    reward_sum: float = 0.0  # sum of r_j over D(s)
    children: dict = field(default_factory=dict)  # next token id (or END) -> Node

    @property
    def V(self) -> float:
        """V(s) = (1/|D(s)|) sum_{j in D(s)} r_j."""
        return self.reward_sum / self.n

    @property
    def is_branch(self) -> bool:
        """A branch node has two or more children; a response ending here counts as the child END."""
        return len(self.children) >= 2


def build_trie(responses: list[list[int]], rewards: list[float]) -> Node:
    """Insert the G responses; every node on a response's path (root included) counts it once."""
    root = Node(token=None, depth=0)
    for o, r in zip(responses, rewards):
        node = root
        node.n += 1
        node.reward_sum += r
        for tok in o:
            node = node.children.setdefault(tok, Node(token=tok, depth=node.depth + 1))
            node.n += 1
            node.reward_sum += r
        end = node.children.setdefault(END, Node(token=END, depth=node.depth))
        end.n += 1
        end.reward_sum += r
    return root


def path(root: Node, o: list[int]) -> list[Node]:
    """The states s_0 (root), s_1, ..., s_L that response o passes through: s_{t+1} = s_t + o_t."""
    nodes = [root]
    for tok in o:
        nodes.append(nodes[-1].children[tok])
    return nodes


# ----------------------------------------------------------------------------------------------
# SPEC 3 and 5: per-token values and advantages for one group


def token_values(root: Node, o: list[int]) -> tuple[list[float], list[float]]:
    """(V(s_t), V(s_{t+1})) for every token t of response o."""
    s = path(root, o)
    return [s[t].V for t in range(len(o))], [s[t + 1].V for t in range(len(o))]


def tempo_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6,
                td_weight: float = 1.0, sigma: float | None = None,
                scale_td: bool = True) -> list[list[float]]:
    """TEMPO: A_{i,t} = ((r_i - mu) + w * (V(s_{t+1}) - V(s_t))) / (sigma + eps), w = td_weight.

    delta_{i,t} = V(s_{t+1}) - V(s_t) is 0 unless s_t is a branch node. scale_td=False leaves the TD
    term undivided: A = (r_i - mu)/(sigma + eps) + w * delta (SPEC 8). `sigma` overrides the group's
    std (tests/trie_batch.py passes the batch std, or sigma=1 with eps=0 for no scaling).
    """
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    out = []
    for o, r in zip(responses, rewards):
        V_t, V_next = token_values(root, o)
        deltas = [b - a for a, b in zip(V_t, V_next)]
        if scale_td:
            out.append([((r - mu) + td_weight * d) / denom for d in deltas])
        else:
            out.append([(r - mu) / denom + td_weight * d for d in deltas])
    return out


def treeadv_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6,
                  sigma: float | None = None) -> list[list[float]]:
    """TreeAdv: token t sits in the segment (node) s_{t+1}; Ahat = (V(s_{t+1}) - mu) / (sigma + eps).

    This is the mean of the leaf advantages A_j over the responses under that node; a token no other
    response shares has V(s_{t+1}) = r_i and keeps A_i.
    """
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    return [[(v - mu) / denom for v in token_values(root, o)[1]] for o in responses]


def prefix_counts_group(responses: list[list[int]]) -> list[list[int]]:
    """n(s_{t+1}) for every token: how many responses share the prefix up to and including token t."""
    root = build_trie(responses, [0.0] * len(responses))
    return [[s.n for s in path(root, o)[1:]] for o in responses]


# ----------------------------------------------------------------------------------------------
# SPEC 8: tree statistics, and a picture


def tree_stats(root: Node, responses: list[list[int]]) -> dict:
    """Counts that say how much tree there is to exploit.

    nodes: distinct prefixes (root included, END markers not); branch_nodes: nodes with >= 2 children;
    tokens: response tokens; branch_tokens: tokens emitted at a branch node (s_t is a branch);
    first_divergence / unique_depth: per response, min / max over j != i of lcp(i, j), the length of
    the longest common prefix. lcp(i, j) >= t exactly when j is in D(s_t), so with s_t on i's path,
    min_j lcp = the last t with n(s_t) = G and max_j lcp = the last t with n(s_t) >= 2 (lists are
    empty for a group of one).
    """
    G = len(responses)
    nodes = branch_nodes = 0
    stack = [root]
    while stack:
        node = stack.pop()
        nodes += 1
        branch_nodes += node.is_branch
        stack.extend(c for k, c in node.children.items() if k != END)
    tokens = branch_tokens = 0
    first_divergence, unique_depth = [], []
    for o in responses:
        s = path(root, o)
        tokens += len(o)
        branch_tokens += sum(s[t].is_branch for t in range(len(o)))
        if G >= 2:
            first_divergence.append(max(t for t in range(len(s)) if s[t].n == G))
            unique_depth.append(max(t for t in range(len(s)) if s[t].n >= 2))
    return dict(nodes=nodes, branch_nodes=branch_nodes, tokens=tokens, branch_tokens=branch_tokens,
                first_divergence=first_divergence, unique_depth=unique_depth)


def show(root: Node, decode=None, mu: float | None = None, sigma: float | None = None,
         eps: float = 1e-6, file=None) -> None:
    """Print the trie; a chain of single-child nodes is one segment (TreeAdv's word) on one line.

    Each line: the segment's decoded tokens, n = |D(s)|, V(s) at its last node, a '*' when that node
    branches, and (with mu, sigma given) the TD step delta / (sigma + eps) a token entering the segment
    gets. decode maps a list of token ids to text (default: the ids themselves).
    """
    decode = decode or (lambda ids: " ".join(map(str, ids)))
    print(f"root  n={root.n}  V={root.V:.3f}{'  *' if root.is_branch else ''}", file=file)

    def walk(node: Node, prefix: str) -> None:
        kids = list(node.children.values())
        for k, child in enumerate(kids):
            last = k == len(kids) - 1
            head = prefix + ("`-- " if last else "|-- ")
            if child.token == END:
                print(f"{head}<end>  n={child.n}  r_sum={child.reward_sum:g}", file=file)
                continue
            ids, seg_end = [child.token], child
            while len(seg_end.children) == 1 and END not in seg_end.children:
                seg_end = next(iter(seg_end.children.values()))
                ids.append(seg_end.token)
            td = ""
            if mu is not None and sigma is not None:
                td = f"  delta/(sigma+eps)={(child.V - node.V) / (sigma + eps):+.3f}"
            star = "  *" if seg_end.is_branch else ""
            print(f"{head}{decode(ids)!r}  n={seg_end.n}  V={seg_end.V:.3f}{td}{star}", file=file)
            walk(seg_end, prefix + ("    " if last else "|   "))

    walk(root, "")


if __name__ == "__main__":
    # SPEC 3's worked example: tokens A=0, B=1, x=2, y=3, '.'=4.
    names = {0: "A", 1: "B", 2: "x", 3: "y", 4: "."}
    group = [[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]]
    rewards = [1.0, 1.0, 0.0, 0.0]
    mu, sigma = group_baseline(rewards)
    root = build_trie(group, rewards)
    show(root, decode=lambda ids: "".join(names[i] for i in ids), mu=mu, sigma=sigma)
    print(f"mu={mu:.4f} sigma={sigma:.4f}")
    for o, a in zip(group, tempo_group(group, rewards)):
        print("".join(names[i] for i in o), " ".join(f"{x:+.3f}" for x in a))
    print(tree_stats(root, group))

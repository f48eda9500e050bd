"""trie.py: the prefix trie of one group, and the advantages read off it the way the papers say them.

SPEC 1 (mu, sigma), 2 (the trie, n(s), V(s), branch nodes), 3 (TEMPO), 5 (TreeAdv), TreeRL, TreePO and
SPO (README's table of estimators) and 8 (tree statistics) for one group, in plain Python: the readable
form. advantages.py computes the same for a batch without a trie; tests/test_advantages.py compares them.

Departures (all from SPEC): a response that ends at a node leaves the tree there (END is its own
child); a group of one has mu = 0, sigma = 1; a group of two or more with equal rewards gets exactly 0.
`python trie.py` prints README's worked example as a tree, with every estimator's advantages.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

END = "<end>"  # the children key for "the response ends here"; a str never equals an int token id


# ---- SPEC 1: the group baseline

def group_baseline(rewards: list[float]) -> tuple[float, float]:
    """mu = mean(r), sigma = std(r) with Bessel's correction; a group of one has mu = 0, sigma = 1."""
    G = len(rewards)
    if G == 1:
        return 0.0, 1.0
    mu = sum(rewards) / G
    return mu, math.sqrt(sum((r - mu) ** 2 for r in rewards) / (G - 1))


def all_equal(rewards: list[float]) -> bool:
    """Two or more equal rewards carry no signal: every advantage is exactly 0 (not 1e-17 / eps)."""
    return len(rewards) >= 2 and all(r == rewards[0] for r in rewards)


# ---- SPEC 2: the prefix trie

@dataclass(eq=False)
class Node:
    """A state s = (q, o_<t): one distinct response prefix. The root is the prompt."""
    token: int | str | None  # the token that led here (None at the root, END for an end marker)
    n: int = 0  # |D(s)|: the responses whose prefix is s
    reward_sum: float = 0.0  # sum of r_j over D(s)
    children: dict = field(default_factory=dict)  # next token id (or END) -> Node

    @property
    def V(self) -> float:
        """V(s) = (1/|D(s)|) sum_{j in D(s)} r_j."""
        return self.reward_sum / self.n

    @property
    def is_branch(self) -> bool:
        """Two or more children; a response that ends here is the child END."""
        return len(self.children) >= 2


def build_trie(responses: list[list[int]], rewards: list[float]) -> Node:
    """Insert the G responses; every node on a response's path (root and END included) counts it once."""
    root = Node(token=None)
    for o, r in zip(responses, rewards):
        node = root
        for tok in [*o, END]:
            node.n += 1
            node.reward_sum += r
            node = node.children.setdefault(tok, Node(tok))
        node.n += 1  # the END marker
        node.reward_sum += r
    return root


def path(root: Node, o: list[int]) -> list[Node]:
    """The states s_0 (root), s_1, ..., s_L that response o passes through: s_{t+1} = s_t + o_t."""
    nodes = [root]
    for tok in o:
        nodes.append(nodes[-1].children[tok])
    return nodes


def nodes(root: Node) -> list[Node]:
    """Every node but the END markers, breadth first: a parent before its children."""
    out = [root]
    for node in out:  # the list grows as it is read
        out.extend(c for k, c in node.children.items() if k != END)
    return out


# ---- SPEC 3 and 5: TEMPO and TreeAdv, a token's advantage from the states around it

def tempo_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6, td_weight: float = 1.0,
                sigma: float | None = None, scale_td: bool = True) -> list[list[float]]:
    """TEMPO: A_{i,t} = ((r_i - mu) + w * (V(s_{t+1}) - V(s_t))) / (sigma + eps), w = td_weight.

    The TD step delta is 0 unless s_t is a branch node. scale_td=False: A = (r_i - mu) / (sigma + eps)
    + w * delta (SPEC 8). `sigma` replaces the group's std (tests/trie_batch.py: the batch's, or 1).
    """
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    out = []
    for o, r in zip(responses, rewards):
        s = path(root, o)
        out.append([((r - mu) + td_weight * d) / denom if scale_td else (r - mu) / denom + td_weight * d
                    for d in (s[t + 1].V - s[t].V for t in range(len(o)))])
    return out


def treeadv_group(responses: list[list[int]], rewards: list[float], eps: float = 1e-6,
                  sigma: float | None = None, centred: bool = False) -> list[list[float]]:
    """TreeAdv: token t lies in the node s_{t+1}; Ahat = (V(s_{t+1}) - mu) / (sigma + eps), the mean leaf
    advantage of the responses through it (a token no other response shares keeps A_i). centred:
    (Ahat - m) / (s + 1e-6), m and s (Bessel) over the trie's token nodes, each once (the seed's reading)."""
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    mu, group_sigma = group_baseline(rewards)
    denom = (group_sigma if sigma is None else sigma) + eps
    root = build_trie(responses, rewards)
    out = [[(s.V - mu) / denom for s in path(root, o)[1:]] for o in responses]
    if centred:
        a = [(s.V - mu) / denom for s in nodes(root)[1:]]
        m, sd = (statistics.fmean(a), statistics.stdev(a)) if len(a) >= 2 else (sum(a), 0.0)
        out = [[(x - m) / (sd + 1e-6) for x in row] for row in out]
    return out


# ---- TreeRL, TreePO, SPO: a segment (a maximal run of tokens with one D) hangs from a branch node or the root

def segment_tops(root: Node, o: list[int]) -> list[Node]:
    """For each token t of o: the branch node (or the root) that t's segment hangs from."""
    tops = [root]
    for s in path(root, o)[1:len(o)]:
        tops.append(s if s.is_branch else tops[-1])
    return tops


def treerl_group(responses: list[list[int]], rewards: list[float]) -> list[list[float]]:
    """TreeRL: c(s) = N/(N-1) (V(s) - mu) / sqrt(n(s)) (leave-one-out rewards), c(root) = 0; a token in
    segment s gets the local value c(s) - c(parent) plus the global c(s). A local value under 1e-8 after
    the first token takes the previous token's (their fill_in_paths: the previous segment's)."""
    G = len(responses)
    if G < 2 or all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    root, mu = build_trie(responses, rewards), sum(rewards) / G  # root.V == mu: c(root) = 0 exactly
    c = lambda s: G / (G - 1) * (s.V - mu) / math.sqrt(s.n)  # noqa: E731
    out = []
    for o in responses:
        local = []
        for t, (s, top) in enumerate(zip(path(root, o)[1:], segment_tops(root, o))):
            local.append(local[-1] if t and abs(c(s) - c(top)) < 1e-8 else c(s) - c(top))
        out.append([d + c(s) for d, s in zip(local, path(root, o)[1:])])
    return out


def treepo_group(responses: list[list[int]], rewards: list[float]) -> list[list[float]]:
    """TreePO ("average"), before the batch whitening: every token of response i gets the mean over X of
    (r_i - mean_X r), X = the group and each other distinct D(s) on i's path with two or more members."""
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    root, mu = build_trie(responses, rewards), group_baseline(rewards)[0]  # 0 for a group of one, as theirs
    out = []
    for o, r in zip(responses, rewards):
        s = path(root, o)
        X = [mu] + [s[t].V for t in range(1, len(s)) if 2 <= s[t].n < s[t - 1].n]  # D shrinks: a new set
        out.append([sum(r - v for v in X) / len(X)] * len(o))
    return out


def spo_group(responses: list[list[int]], rewards: list[float]) -> list[list[float]]:
    """SPO, tree form ("rloo"): W(s) = the mean of the children's W, each response that ends at s a child
    with W = r_i; a token in segment s gets W(s) - W(parent)."""
    if all_equal(rewards):
        return [[0.0] * len(o) for o in responses]
    root, W = build_trie(responses, rewards), {}
    for s in reversed(nodes(root)):  # children before parents
        kids, end = [W[c] for k, c in s.children.items() if k != END], s.children.get(END, Node(END))
        W[s] = (sum(kids) + end.reward_sum) / (len(kids) + end.n)
    return [[W[s] - W[top] for s, top in zip(path(root, o)[1:], segment_tops(root, o))] for o in responses]


# ---- SPEC 8: how much tree there is, and a picture of it

def tree_stats(root: Node, responses: list[list[int]]) -> dict:
    """nodes (root included, END markers not), branch_nodes, tokens, branch_tokens (tokens emitted at a
    branch node); per response, first_divergence = min_{j != i} lcp(i, j) = the last t with n(s_t) = G,
    and unique_depth = max_{j != i} lcp(i, j) = the last t with n(s_t) >= 2 (empty lists when G = 1)."""
    G, every = len(responses), nodes(root)
    stats = dict(nodes=len(every), branch_nodes=sum(s.is_branch for s in every), tokens=sum(map(len, responses)),
                 branch_tokens=0, first_divergence=[], unique_depth=[])
    for o in responses:
        s = path(root, o)
        stats["branch_tokens"] += sum(s[t].is_branch for t in range(len(o)))
        if G >= 2:
            stats["first_divergence"].append(max(t for t in range(len(s)) if s[t].n == G))
            stats["unique_depth"].append(max(t for t in range(len(s)) if s[t].n >= 2))
    return stats


def show(root: Node, decode=str, sigma: float | None = None, eps: float = 1e-6, file=None) -> None:
    """Print the trie, a segment (TreeAdv's word) on a line: its tokens, n, V at its last node, '*' where
    that node branches and, given sigma, the TD step delta / (sigma + eps) of the token that enters it."""
    print(f"root  n={root.n}  V={root.V:.3f}{'  *' if root.is_branch else ''}", file=file)

    def walk(node: Node, indent: str) -> None:
        kids = list(node.children.values())
        for k, child in enumerate(kids):
            last = k == len(kids) - 1
            head = indent + ("`-- " if last else "|-- ")
            if child.token == END:
                print(f"{head}<end>  n={child.n}  r_sum={child.reward_sum:g}", file=file)
                continue
            seg = [child]
            while len(seg[-1].children) == 1 and END not in seg[-1].children:
                seg.append(next(iter(seg[-1].children.values())))
            td = f"  delta/(sigma+eps)={(child.V - node.V) / (sigma + eps):+.3f}" if sigma is not None else ""
            star = "  *" if seg[-1].is_branch else ""
            print(f"{head}{decode([s.token for s in seg])!r}  n={seg[-1].n}  V={seg[-1].V:.3f}{td}{star}", file=file)
            walk(seg[-1], indent + ("    " if last else "|   "))
    walk(root, "")


if __name__ == "__main__":  # README's worked example, tokens A=0, B=1, x=2, y=3, '.'=4: Ax.., Ax.., Ay.., B...
    group, rewards = [[0, 2, 4, 4], [0, 2, 4, 4], [0, 3, 4, 4], [1, 4, 4, 4]], [1.0, 1.0, 0.0, 0.0]
    root, (mu, sigma) = build_trie(group, rewards), group_baseline(rewards)
    show(root, decode=lambda ids: "".join("ABxy."[i] for i in ids), sigma=sigma)
    print(f"mu={mu:.4f} sigma={sigma:.4f}\n{tree_stats(root, group)}")
    for fn, kw in [(tempo_group, {}), (treeadv_group, {}), (treeadv_group, dict(centred=True)),
                   (treerl_group, {}), (treepo_group, {}), (spo_group, {})]:
        rows = [" ".join(f"{x:+.3f}" for x in row) for row in fn(group, rewards, **kw)]
        print(f"{fn.__name__[:-6] + (' centred' if kw else ''):>15}:  " + "   ".join(rows))

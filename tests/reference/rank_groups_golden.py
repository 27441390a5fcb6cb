"""Megatron's rank layout (spec §8) for small grids -> tests/golden/parallel/rank_groups.json.

Two independent sources must agree on every group:
  1. megatron-core's own RankGenerator (0.8.0 installed here): the dense grid is RankGenerator(tp, ep=1, dp, pp,
     cp, order).get_ranks(token); the expert grid of Megatron-Core >= 0.10 (MoE parallel folding: etp=tp, ep, edp,
     pp, cp=1) is RankGenerator(tp=etp, ep=ep, dp=edp*ep, pp, cp=1, order).get_ranks(token, independent_ep=True),
     whose ordered sizes are exactly [etp, 1, ep, edp, pp] — the >= 0.10 expert generator's.
  2. a transcription of Megatron-Core >= 0.10's RankGenerator (below), with its separate expert generator.
Layouts whose pipeline groups differ between the two grids (Megatron asserts they match) are recorded with
"error": "pp_mismatch"; the C++ builder must refuse them.
"""
import itertools
import json
import os
import sys
from typing import List

TOKENS_DENSE = ["tp", "cp", "dp", "pp", "dp-cp", "tp-cp", "tp-pp", "tp-dp-cp"]
TOKENS_EXPERT = ["tp", "ep", "dp", "tp-ep", "tp-ep-pp"]


# --- (2) Megatron-Core >= 0.10 parallel_state.RankGenerator, transcribed ---------------------------------------
def prefix_product(a, init=1):
    r = [init]
    for v in a:
        init = init * v
        r.append(init)
    return r


def inner_product(a, b):
    return sum(x * y for x, y in zip(a, b))


def decompose(index, shape):
    idx = []
    for d in shape:
        idx.append(index % d)
        index = index // d
    return idx


def masked_groups(world_size: int, parallel_size: List[int], mask: List[bool]) -> List[List[int]]:
    masked_shape = [s for s, m in zip(parallel_size, mask) if m]
    unmasked_shape = [s for s, m in zip(parallel_size, mask) if not m]
    global_stride = prefix_product(parallel_size)
    masked_stride = [d for d, m in zip(global_stride, mask) if m]
    unmasked_stride = [d for d, m in zip(global_stride, mask) if not m]
    group_size = prefix_product(masked_shape)[-1]
    num_of_group = world_size // group_size
    ranks = []
    for group_index in range(num_of_group):
        gi = decompose(group_index, unmasked_shape)
        rank = []
        for rank_in_group in range(group_size):
            ri = decompose(rank_in_group, masked_shape)
            rank.append(inner_product(ri, masked_stride) + inner_product(gi, unmasked_stride))
        ranks.append(rank)
    return ranks


class RankGenerator010:
    def __init__(self, tp, ep, dp, pp, cp, order):
        assert ep == 1 or cp == 1
        self.world_size = tp * dp * pp * cp * ep
        sizes = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "cp": cp}
        order = order.lower()
        if "ep" in order and "ep-dp" not in order and "dp-ep" not in order:
            raise RuntimeError("ep and dp must be adjacent")
        for name in sizes:
            if name not in order and sizes[name] != 1:
                raise RuntimeError(name)
            elif name not in order:
                order = order + "-" + name
        self.order = order
        self.ordered_size = [sizes[t] for t in order.split("-")]

    def get_ranks(self, token):
        ordered = self.order.split("-")
        mask = [False] * len(ordered)
        for t in token.split("-"):
            mask[ordered.index(t)] = True
        return masked_groups(self.world_size, self.ordered_size, mask)


def layout_new(world, tp, cp, ep, pp, order):
    dp = world // (tp * cp * pp)
    edp = world // (tp * ep * pp)
    dense = RankGenerator010(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = RankGenerator010(tp=tp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
    return dense, expert


def groups_new(world, tp, cp, ep, pp, order):
    dense, expert = layout_new(world, tp, cp, ep, pp, order)
    return ({t: dense.get_ranks(t) for t in TOKENS_DENSE}, {t: expert.get_ranks(t) for t in TOKENS_EXPERT},
            dense.get_ranks("pp") == expert.get_ranks("pp"))


# --- (1) megatron-core's own code --------------------------------------------------------------------------
def groups_megatron(world, tp, cp, ep, pp, order):
    from megatron.core.parallel_state import RankGenerator
    dp = world // (tp * cp * pp)
    edp = world // (tp * ep * pp)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = RankGenerator(tp=tp, ep=ep, dp=edp * ep, pp=pp, cp=1, order=order)
    return ({t: dense.get_ranks(t) for t in TOKENS_DENSE},
            {t: expert.get_ranks(t, independent_ep=True) for t in TOKENS_EXPERT})


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "golden", "parallel", "rank_groups.json")
    try:
        import megatron.core.parallel_state  # noqa: F401
        have_megatron = True
    except Exception as e:  # pragma: no cover
        print("megatron-core not importable (%s): using the transcription only" % e, file=sys.stderr)
        have_megatron = False
    cases = []
    specs = []
    for world in [1, 2, 3, 4, 6, 8, 12, 16]:
        for tp, cp, ep, pp in itertools.product(divisors(world), repeat=4):
            if world % (tp * cp * pp) or world % (tp * ep * pp):
                continue
            if ep > 1 and cp > 1 and world > 8:
                continue  # keeps the fixture small; cp x ep cases up to 8 ranks are included
            specs.append((world, tp, cp, ep, pp, "tp-cp-ep-dp-pp"))
            if world <= 8 and ep == 1 and cp == 1:
                specs.append((world, tp, cp, ep, pp, "tp-pp-dp"))  # --use-tp-pp-dp-mapping
    specs.append((8, 1, 1, 8, 1, "tp-cp-ep-dp-pp"))    # README 8 cards: TP1 PP1 DP8 EP8 -> EDP 1
    specs.append((32, 1, 1, 16, 2, "tp-cp-ep-dp-pp"))  # README 32 cards: TP1 PP2 DP16 EP16 -> EDP 1
    seen = set()
    for world, tp, cp, ep, pp, order in specs:
        if (world, tp, cp, ep, pp, order) in seen:
            continue
        seen.add((world, tp, cp, ep, pp, order))
        dense, expert, pp_match = groups_new(world, tp, cp, ep, pp, order)
        if have_megatron:
            d2, e2 = groups_megatron(world, tp, cp, ep, pp, order)
            assert d2 == dense and e2 == expert, (world, tp, cp, ep, pp, order)
        case = {"world": world, "tp": tp, "cp": cp, "ep": ep, "pp": pp, "order": order,
                "dp": world // (tp * cp * pp), "edp": world // (tp * ep * pp)}
        if not pp_match:
            case["error"] = "pp_mismatch"
        else:
            case["dense"] = dense
            case["expert"] = expert
        cases.append(case)
    with open(out_path, "w") as f:
        json.dump({"source": "megatron-core 0.8.0 RankGenerator and a transcription of >= 0.10's"
                   if have_megatron else "transcription of megatron-core >= 0.10 RankGenerator",
                   "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print("%d cases -> %s" % (len(cases), out_path))


if __name__ == "__main__":
    main()

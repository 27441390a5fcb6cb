"""Megatron's rank layout (spec §8) for small grids -> tests/golden/parallel/rank_groups.json.

Independent sources must agree on every group:
  1. megatron-core's own RankGenerator (0.8.0 installed here): the dense grid is RankGenerator(tp, ep=1, dp, pp,
     cp, order).get_ranks(token); the expert grid of Megatron-Core >= 0.10 (MoE parallel folding, with etp = tp:
     0.8.0 has no separate expert TP size) is RankGenerator(tp=etp, ep=ep, dp=edp*ep, pp, cp=1,
     order).get_ranks(token, independent_ep=True), whose ordered sizes are exactly [etp, 1, ep, edp, pp] — the
     >= 0.10 expert generator's.
  2. a transcription of Megatron-Core >= 0.10's RankGenerator (below), with its separate expert generator.
  3. with MCORE_PARALLEL_STATE=path/to/megatron/core/parallel_state.py of a megatron-core >= 0.10 wheel (0.13.0
     was used: `pip download --no-deps megatron-core==0.13.0`, unzipped), that file's own RankGenerator and
     generate_masked_orthogonal_rank_groups, loaded without torch, for every layout including those whose expert
     tensor parallel size differs from TP: RankGenerator(tp=etp, ep, dp=edp, pp, cp=1, order), as its
     initialize_model_parallel builds the expert generator.
Layouts whose pipeline groups differ between the two grids (Megatron asserts they match), or whose expert-DP
size differs from DP with pp > 1 and an order not ending in pp (asserted by >= 0.10), are recorded with
"error"; the C++ builder must refuse them.
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


def layout_new(world, tp, cp, ep, pp, etp, order, generator=None):
    generator = generator or RankGenerator010
    dp = world // (tp * cp * pp)
    edp = world // (etp * ep * pp)
    dense = generator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = generator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
    return dense, expert


def groups_new(world, tp, cp, ep, pp, etp, order, generator=None):
    dense, expert = layout_new(world, tp, cp, ep, pp, etp, order, generator)
    return ({t: dense.get_ranks(t) for t in TOKENS_DENSE}, {t: expert.get_ranks(t) for t in TOKENS_EXPERT},
            dense.get_ranks("pp") == expert.get_ranks("pp"))


# --- (3) a megatron-core >= 0.10 parallel_state.py, its rank generator only (the module imports torch) ---------
def load_parallel_state_generator(path):
    import ast
    tree = ast.parse(open(path).read())
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and
            n.name in ("generate_masked_orthogonal_rank_groups", "RankGenerator")]
    assert len(keep) == 2, path
    ns = {"List": List}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    return ns["RankGenerator"]


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
    mcore_path = os.environ.get("MCORE_PARALLEL_STATE")
    mcore_generator = load_parallel_state_generator(mcore_path) if mcore_path else None
    cases = []
    specs = []
    for world in [1, 2, 3, 4, 6, 8, 12, 16]:
        for tp, cp, ep, pp in itertools.product(divisors(world), repeat=4):
            if world % (tp * cp * pp):
                continue
            if ep > 1 and cp > 1 and world > 8:
                continue  # keeps the fixture small; cp x ep cases up to 8 ranks are included
            # expert tensor parallel sizes: Megatron's default (tp) always; every other size up to 8 ranks
            for etp in ([tp] + [e for e in divisors(world) if e != tp and world <= 8]):
                if world % (etp * ep * pp):
                    continue
                specs.append((world, tp, cp, ep, pp, etp, "tp-cp-ep-dp-pp"))
                if world <= 8 and ep == 1 and cp == 1:
                    specs.append((world, tp, cp, ep, pp, etp, "tp-pp-dp"))  # --use-tp-pp-dp-mapping
    specs.append((8, 1, 1, 8, 1, 1, "tp-cp-ep-dp-pp"))    # README 8 cards: TP1 PP1 DP8 EP8 -> EDP 1
    specs.append((32, 1, 1, 16, 2, 1, "tp-cp-ep-dp-pp"))  # README 32 cards: TP1 PP2 DP16 EP16 -> EDP 1
    specs.append((16, 2, 1, 16, 1, 1, "tp-cp-ep-dp-pp"))  # DeepSeek-V3 recipes' ETP 1: EP folds over TP
    seen = set()
    for spec in specs:
        if spec in seen:
            continue
        seen.add(spec)
        world, tp, cp, ep, pp, etp, order = spec
        dense, expert, pp_match = groups_new(world, tp, cp, ep, pp, etp, order)
        dp, edp = world // (tp * cp * pp), world // (etp * ep * pp)
        if have_megatron and etp == tp:
            d2, e2 = groups_megatron(world, tp, cp, ep, pp, order)
            assert d2 == dense and e2 == expert, spec
        if mcore_generator:
            d3, e3, _ = groups_new(world, tp, cp, ep, pp, etp, order, mcore_generator)
            assert d3 == dense and e3 == expert, spec
        case = {"world": world, "tp": tp, "cp": cp, "ep": ep, "pp": pp, "etp": etp, "order": order,
                "dp": dp, "edp": edp}
        if not pp_match:
            case["error"] = "pp_mismatch"
        elif not (order.endswith("pp") or pp == 1 or edp == dp):
            case["error"] = "edp_differs_without_pp_last"
        else:
            case["dense"] = dense
            case["expert"] = expert
        cases.append(case)
    sources = ["a transcription of megatron-core >= 0.10 RankGenerator"]
    if have_megatron:
        sources.insert(0, "megatron-core 0.8.0 RankGenerator (etp = tp)")
    if mcore_generator:
        info = {}
        exec(open(os.path.join(os.path.dirname(mcore_path), "package_info.py")).read(), info)
        sources.insert(0, "megatron-core %d.%d.%d parallel_state.RankGenerator" % info["VERSION"][:3])
    with open(out_path, "w") as f:
        json.dump({"source": " and ".join(sources), "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print("%d cases -> %s" % (len(cases), out_path))


if __name__ == "__main__":
    main()

"""Speed of the WEMoE MLP kernel vs a plain MLP and vs the naive per-sample loop.

ViT-B/32 MLP sizes: D=768, H=3072, N=50 tokens, batch 64, T=8 experts. Runs
``--layers`` MLP blocks (default 2) chained with residuals and scales the
times to 12 layers. All times measured in this one run, interleaved (plain and
WEMoE alternate, best of ``--reps``) so that load from other processes hits
both alike.

    python -m benchmarks.moe_kernel_speed            # ~1 minute on 2 cores
    python -m benchmarks.moe_kernel_speed --sweep    # also chunk/tile sizes, written to benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, machine_description, machine_tag
from wemoe.model.activations import get_activation
from wemoe.model.vit import Mlp
from wemoe.moe.experts import store_of_rank
from wemoe.moe.kernels import DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS
from wemoe.moe.reference import linear_reference
from wemoe.moe.routed import RoutedLinear, routed_linear_factory
from wemoe.moe.routers import Router


class MoEMlp(torch.nn.Module):
    """A routed MLP driven by its own router: the MLP half of a WEMoE block."""

    def __init__(self, mlp: Mlp, router: Router):
        super().__init__()
        self.mlp, self.router = mlp, router

    def forward(self, x):
        return self.mlp(x, self.router(x))

    def set_sizes(self, chunk, tile):
        for layer in (self.mlp.fc1, self.mlp.fc2):
            layer.experts.chunk_size, layer.experts.tile_rows = chunk, tile

    def reference(self, x):
        c = self.router(x)
        return linear_reference(self.mlp.fc2, self.mlp._act(linear_reference(self.mlp.fc1, x, c)), c)


def build(layers, D, H, T, act, seed=0):
    g = torch.Generator().manual_seed(seed)
    plain, moes = [], []
    for _ in range(layers):
        mlp = Mlp(D, H, act, linear=routed_linear_factory(T, store_of_rank(None)))
        tensors = []
        for layer in (mlp.fc1, mlp.fc2):
            assert isinstance(layer, RoutedLinear)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.02)
                layer.experts.stack.copy_(torch.randn(layer.experts.stack.shape, generator=g) * 0.002)
                layer.experts.bias.copy_(torch.randn(layer.experts.bias.shape, generator=g) * 0.002)
            tensors += [layer.weight.clone(), layer.bias.clone()]
        plain.append(tensors)
        moes.append(MoEMlp(mlp, Router(D, T)))
    return plain, moes


def plain_stack(plain, act, x):
    for w1, b1, w2, b2 in plain:
        x = x + F.linear(act(F.linear(x, w1, b1)), w2, b2)
    return x


def moe_stack(moes, x):
    for m in moes:
        x = x + m(x)
    return x


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


SWEEP_SIZES = [(4, 64), (4, 128), (4, 256), (8, 32), (8, 64), (8, 128), (8, 256), (16, 32), (16, 64), (16, 128), (32, 64)]


def sweep(plain, moes, act, x, reps: int) -> list[dict]:
    """Forward time of every (chunk, tile) pair against the plain MLP, best of ``reps``.

    Each repetition times the plain stack and then every pair once, so load from other
    processes spreads over all of them alike instead of landing on one pair. The default
    pair is timed twice per repetition (first and last): the two rows differ only by the
    machine's noise, which tells how large a difference between pairs means anything.
    """
    default = (DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS)
    order = [default, *[pair for pair in SWEEP_SIZES if pair != default], default]
    best_plain, best = float("inf"), [float("inf")] * len(order)
    with torch.no_grad():
        for rep in range(reps):
            best_plain = min(best_plain, timed(lambda: plain_stack(plain, act, x)))
            for i, pair in enumerate(order):
                for m in moes:
                    m.set_sizes(*pair)
                if rep == 0:
                    moe_stack(moes, x)  # warm-up of this pair's shapes
                best[i] = min(best[i], timed(lambda: moe_stack(moes, x)))
    for m in moes:
        m.set_sizes(None, None)
    rows = [
        {"chunk": c, "tile_rows": t, "seconds": best[i], "plain_seconds": best_plain, "ratio": best[i] / best_plain, "control": i == len(order) - 1}
        for i, (c, t) in enumerate(order)
    ]
    return sorted(rows, key=lambda r: (r["chunk"], r["tile_rows"], r["control"]))


def _is_default(row: dict) -> bool:
    return (row["chunk"], row["tile_rows"]) == (DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS)


def write_sweep(rows: list[dict], sizes: dict, results: Path) -> None:
    """``moe_kernel_sweep_<machine>.{md,json}``: is the default (chunk, tile) the right one on this CPU?"""
    machine = machine_description()
    default_ratios = [r["ratio"] for r in rows if _is_default(r)]
    noise = max(default_ratios) / min(default_ratios) - 1
    fastest = min((r for r in rows if not _is_default(r)), key=lambda r: r["ratio"])
    lines = [
        "# Dense WEMoE MLP kernel: sample chunk and tile size",
        "",
        f"Generated by `python -m benchmarks.moe_kernel_speed --sweep`. Machine: {machine}. "
        f"D={sizes['width']} H={sizes['hidden']} N={sizes['tokens']} B={sizes['batch']} T={sizes['experts']}, "
        f"{sizes['layers_timed']} MLP layers chained, {sizes['threads']} threads; forward only; best of {sizes['reps']} repetitions, "
        "every pair timed once per repetition next to the plain MLP, the default pair twice (first and last).",
        "",
        "| chunk (samples) | tile (rows) | merged tile per worker | WEMoE MLP / plain MLP |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        mib = r["chunk"] * r["tile_rows"] * sizes["width"] * 4 / 2**20
        mark = "" if not _is_default(r) else " (default, timed again last)" if r["control"] else " (default)"
        lines.append(f"| {r['chunk']} | {r['tile_rows']}{mark} | {mib:.2f} MiB | {r['ratio']:.2f}x |")
    gain = min(default_ratios) / fastest["ratio"] - 1
    lines += [
        "",
        f"- Noise: the default pair's two timings differ by {100 * noise:.0f}%.",
        f"- Fastest other pair: chunk {fastest['chunk']}, tile {fastest['tile_rows']} at {fastest['ratio']:.2f}x, "
        f"{100 * gain:.0f}% faster than the default's better timing" + (" (within the noise)." if gain <= noise else " (more than the noise)."),
        "",
    ]
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"moe_kernel_sweep_{machine_tag(machine)}"
    payload = {"machine": machine, "sizes": sizes, "default": [DEFAULT_CHUNK_SIZE, DEFAULT_TILE_ROWS], "noise": noise, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.md and .json")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--naive-samples", type=int, default=4)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="also time (chunk, tile) pairs, forward only, and write the results")
    p.add_argument("--results", type=Path, default=RESULTS, help="where --sweep writes moe_kernel_sweep_<machine>.{md,json}")
    p.add_argument(
        "--compare-intra-op",
        action="store_true",
        help="also time the forward with tiles run on intra-op (OpenMP) threads instead of the worker pool",
    )
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    D, H, T, B, N, L = a.width, a.hidden, a.experts, a.batch, a.tokens, a.layers
    act_name = "quick_gelu"
    act = get_activation(act_name)
    plain, moes = build(L, D, H, T, act_name)
    for m in moes:
        m.set_sizes(a.chunk, a.tile)
    scale = 12 / L
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1))
    print(
        f"WEMoE MLP kernel: D={D} H={H} N={N} B={B} T={T}, {L} layer(s) timed, scaled x{scale:g} to 12; "
        f"threads={a.threads}; chunk={a.chunk or DEFAULT_CHUNK_SIZE} tile_rows={a.tile or DEFAULT_TILE_ROWS}"
    )

    # ---- forward (inference) ----
    best = {"plain": 1e9, "moe": 1e9}
    with torch.no_grad():
        plain_stack(plain, act, x), moe_stack(moes, x)  # warm-up
        for _ in range(a.reps):
            best["plain"] = min(best["plain"], timed(lambda: plain_stack(plain, act, x)))
            best["moe"] = min(best["moe"], timed(lambda: moe_stack(moes, x)))

        # ---- naive loop on a few samples + correctness on those samples ----
        xs = x[: a.naive_samples]
        t_naive = timed(lambda: [m.reference(xs) for m in moes])
        ref = moes[0].reference(xs)
        got = moes[0](xs)
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
    t_naive_full = t_naive * B / a.naive_samples
    print(f"plain MLP forward          : {best['plain'] * scale:7.2f} s / 12 layers")
    print(f"WEMoE forward (vectorized) : {best['moe'] * scale:7.2f} s / 12 layers   ratio {best['moe'] / best['plain']:.2f}x")
    print(
        f"naive per-sample loop      : {t_naive_full * scale:7.2f} s / 12 layers   ratio {t_naive_full / best['plain']:.2f}x "
        f"(timed on {a.naive_samples} samples, scaled); max rel diff vs vectorized {rel:.1e}"
    )

    # ---- forward + backward ----
    plain_p = [[t.clone().requires_grad_(True) for t in layer] for layer in plain]
    xg = x.clone().requires_grad_(True)

    def plain_step():
        plain_stack(plain_p, act, xg).pow(2).mean().backward()

    def moe_step():
        moe_stack(moes, xg).pow(2).mean().backward()

    plain_step(), moe_step()
    bt = {"plain": 1e9, "moe": 1e9}
    for _ in range(a.reps):
        bt["plain"] = min(bt["plain"], timed(plain_step))
        bt["moe"] = min(bt["moe"], timed(moe_step))
    print(f"plain MLP forward+backward : {bt['plain'] * scale:7.2f} s / 12 layers (weights and input require grad)")
    print(f"WEMoE forward+backward     : {bt['moe'] * scale:7.2f} s / 12 layers   ratio {bt['moe'] / bt['plain']:.2f}x (grads to routers and input)")

    if a.compare_intra_op:
        from wemoe.moe import kernels as moe_module

        with torch.no_grad():
            tp, tm = 1e9, 1e9
            moe_module.USE_TILE_THREADS = False
            try:
                for _ in range(a.reps):
                    tp = min(tp, timed(lambda: plain_stack(plain, act, x)))
                    tm = min(tm, timed(lambda: moe_stack(moes, x)))
            finally:
                moe_module.USE_TILE_THREADS = True
        print(f"WEMoE forward, intra-op threads instead of tile workers: ratio {tm / tp:.2f}x")

    if a.sweep:
        sizes = {"width": D, "hidden": H, "tokens": N, "batch": B, "experts": T, "layers_timed": L, "threads": a.threads, "reps": a.reps}
        write_sweep(sweep(plain, moes, act, x, a.reps), sizes, a.results)


if __name__ == "__main__":
    main()

"""Tiled per-sample weight merging for dense experts: the hot path of WEMoE.

For one linear layer, sample b computes ``x_b @ (W0 + sum_i r_bi tau_i)^T + (b0 + sum_i r_bi db_i)``.
Materialising the B merged weight matrices is memory-traffic bound (B x |W|
floats written and read again per layer). Instead the matrix is processed in
tiles of ``tile`` rows along its longer side:

* the expert stack is stored once, contiguous, as ``(T, R, C)`` with R the tiled
  side (the output rows for an expanding layer such as fc1 or qkv; the input
  rows, i.e. the transposed weight, for a contracting layer such as fc2), so the
  tile ``h0:h1`` of all experts is the strided 2-D view
  ``tau.view(T, R*C)[:, h0*C:h1*C]`` (no copies per call);
* for a chunk of ``S`` samples one ``addmm`` merges the tile
  (``W0_tile + r_chunk @ tau_tile`` -> ``(S, rows, C)``, a few MB that stay in
  cache) and one ``baddbmm`` applies it (expanding: into output columns
  ``h0:h1``; contracting: accumulated over input rows into the output);
* loop order is tile-outer / sample-chunk-inner, so every expert tile is read
  from memory once per call and reused for all samples while in cache.

Biases are merged for the whole batch at once (``b0 + r @ tau_b``, tiny).
Backward is a custom ``autograd.Function`` with the same tiling: it re-merges
each tile (no per-sample weights are saved), computes the input gradient with
one ``baddbmm`` per tile and the routing gradient
``dL/dr_bi = <dL/dW_b, tau_i> + <dL/db_b, tau_b_i>`` as the per-sample tile
gradient ``(S, rows, C)`` (one ``bmm``, contraction over the tokens) times the
expert tile (one ``mm``), again without materialising per-sample weight
gradients. No Python loop over samples or experts.

Tiles run on a pool of worker threads with single-threaded ops (torch releases
the GIL inside ops): with intra-op threads every one of the many small ops pays a
fork/join, which a machine shared with other jobs turns into waits for a
descheduled thread. Tiles are split statically into one group per worker and
per-worker accumulators are summed in worker order, so results are bitwise
reproducible whatever the scheduling. Measured speeds: ``benchmarks/results/speed*.md``
(``python -m benchmarks.speed``) and ``python -m benchmarks.moe_kernel_speed``.

Dtypes: the merge and the matmuls run in the weights' dtype (float32 or
bfloat16; inputs and routing are cast to it). Routing gradients are accumulated
in float32.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# Defaults chosen with benchmarks/moe_kernel_speed.py at ViT-B/32 sizes: a merged tile
# S x rows x C floats = 3 MiB per worker thread (cache-resident), 24 tiles of H=3072
# to balance over the workers.
DEFAULT_CHUNK_SIZE = 8
DEFAULT_TILE_ROWS = 128


def _tiles(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


# ---- parallel execution of tiles -------------------------------------------------
#
# Each tile is a few ~1 ms ops. Running them with intra-op (OpenMP) threads means
# one fork/join per op; on a machine shared with other jobs every join waits for a
# descheduled thread (``python -m benchmarks.moe_kernel_speed --compare-intra-op``
# measures both paths). So by default tiles are spread over ``torch.get_num_threads()`` worker
# threads, each running single-threaded ops (torch releases the GIL inside ops);
# the only synchronisation is the join per matrix. ``USE_TILE_THREADS = False``
# (or 1 torch thread) runs tiles in the calling thread with intra-op threads.

USE_TILE_THREADS = True
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_WORKER = threading.local()


def _worker_init() -> None:
    _WORKER.active = True
    # torch initialises a thread's intra-op settings lazily on first use (from the
    # process-wide value); force that now so that it cannot undo the 1 below later
    torch.get_num_threads()
    torch.set_num_threads(1)


def _pool() -> ThreadPoolExecutor | None:
    global _POOL, _POOL_SIZE
    if not USE_TILE_THREADS or getattr(_WORKER, "active", False):
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != n:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="wemoe-tiles", initializer=_worker_init)
            barrier = threading.Barrier(n)
            list(pool.map(lambda _: barrier.wait(), range(n)))  # start (and initialise) every worker now
            torch.set_num_threads(n)  # restore torch's process-wide default touched by the workers
            _POOL, _POOL_SIZE = pool, n
        return _POOL


def _no_grad_task(task: Callable[[int, int], None], lo: int, hi: int, inference: bool = False) -> None:
    # grad and inference modes are thread-local: workers must not record graphs for
    # the tile ops, and must share the caller's inference mode to write into its
    # (inference) output tensors
    with torch.inference_mode(inference), torch.no_grad():
        task(lo, hi)


_SLOT = threading.local()


def _run_slot(task: Callable[[int, int], None], tiles: list[tuple[int, int]], slot: int, inference: bool) -> None:
    _SLOT.value = slot
    try:
        for lo, hi in tiles:
            _no_grad_task(task, lo, hi, inference)
    finally:
        _SLOT.value = 0


def _run(task: Callable[[int, int], None], total: int, step: int, device: torch.device) -> None:
    """Run ``task(lo, hi)`` for every tile of ``range(total)``, in parallel when possible (CPU).

    Tiles are split statically into one group per worker ("slot"), and per-slot
    accumulators are summed in slot order, so results are bitwise reproducible
    whatever the thread scheduling.
    """
    tiles = list(_tiles(total, step))
    pool = _pool() if len(tiles) > 1 and device.type == "cpu" else None
    inference = torch.is_inference_mode_enabled()
    if pool is None:
        _run_slot(task, tiles, 0, inference)
        return
    n = min(_POOL_SIZE, len(tiles))
    groups = [tiles[k::n] for k in range(n)]
    for future in [pool.submit(_run_slot, task, g, k, inference) for k, g in enumerate(groups)]:
        future.result()


class _PerThread:
    """Accumulators, one per worker slot (no locking needed), summed in slot order."""

    def __init__(self, factory: Callable[[], torch.Tensor]):
        self.factory = factory
        self.parts: dict[int, torch.Tensor] = {}

    def get(self) -> torch.Tensor:
        key = getattr(_SLOT, "value", 0)
        part = self.parts.get(key)
        if part is None:
            part = self.parts[key] = self.factory()
        return part

    def total(self) -> torch.Tensor:
        parts = [self.parts[k] for k in sorted(self.parts)]
        if not parts:
            return self.factory()
        out = parts[0]
        for part in parts[1:]:
            out.add_(part)
        return out


def _merge_tile(w0: torch.Tensor, tau: torch.Tensor, r: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Merged rows ``lo:hi`` of the (H, D) weight for each sample of ``r``: (S, hi-lo, D)."""
    d = w0.shape[1]
    merged = torch.addmm(w0.view(1, -1)[:, lo * d : hi * d], r, tau.view(tau.shape[0], -1)[:, lo * d : hi * d])
    return merged.view(r.shape[0], hi - lo, d)


class _ExpandLinear(torch.autograd.Function):
    """Expanding layer tiled over output rows: ``y_b = x_b @ (W0 + r_b . tau)^T + (b0 + r_b . tau_b)``.

    ``x`` (B, N, D), ``r`` (B, T), ``w0`` (H, D), ``tau`` (T, H, D), ``b0`` (H,),
    ``tau_b`` (T, H) -> (B, N, H). Everything already in the compute dtype
    except ``r`` (cast here).
    """

    @staticmethod
    def forward(ctx, x, r, w0, tau, b0, tau_b, chunk, tile):
        B, N, _ = x.shape
        H = w0.shape[0]
        rc = r.to(w0.dtype)
        bias = torch.addmm(b0, rc, tau_b)  # (B, H)
        out = torch.empty(B, N, H, dtype=w0.dtype, device=x.device)

        def task(h0, h1):
            for s0, s1 in _tiles(B, chunk):
                wm = _merge_tile(w0, tau, rc[s0:s1], h0, h1)
                out[s0:s1, :, h0:h1] = torch.baddbmm(bias[s0:s1, None, h0:h1], x[s0:s1], wm.transpose(1, 2))

        _run(task, H, tile, x.device)
        ctx.save_for_backward(x, r, w0, tau, tau_b)
        ctx.chunk, ctx.tile = chunk, tile
        return out

    @staticmethod
    def backward(ctx, gy):
        x, r, w0, tau, tau_b = ctx.saved_tensors
        chunk, tile = ctx.chunk, ctx.tile
        need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, _, D = x.shape
        H = w0.shape[0]
        T = tau.shape[0]
        gy = gy.to(w0.dtype).contiguous()
        rc = r.to(w0.dtype)
        taus = tau.view(T, -1)
        gx = _PerThread(lambda: torch.zeros_like(x))
        gr = _PerThread(lambda: torch.zeros(B, T, dtype=torch.float32, device=x.device))

        def task(h0, h1):
            for s0, s1 in _tiles(B, chunk):
                g = gy[s0:s1, :, h0:h1]
                if need_x:
                    wm = _merge_tile(w0, tau, rc[s0:s1], h0, h1)
                    gx.get()[s0:s1].baddbmm_(g, wm)
                if need_r:
                    gw = torch.bmm(g.transpose(1, 2), x[s0:s1])  # (S, R, D) per-sample weight-gradient tile
                    gr.get()[s0:s1] += (gw.view(s1 - s0, -1) @ taus[:, h0 * D : h1 * D].t()).float()

        if need_x or need_r:
            _run(task, H, tile, x.device)
        grad_x = gx.total() if need_x else None
        grad_r = None
        if need_r:
            grad_r = (gr.total() + (gy.sum(dim=1) @ tau_b.t()).float()).to(r.dtype)  # + bias part
        return grad_x, grad_r, None, None, None, None, None, None


class _ContractLinear(torch.autograd.Function):
    """Contracting layer tiled over input rows, with transposed weights: ``y_b = a_b @ (W0t + r_b . tau)`` + bias.

    ``a`` (B, N, H), ``r`` (B, T), ``w0t`` (H, D) (= weight.T), ``tau``
    (T, H, D), ``b0`` (D,), ``tau_b`` (T, D) -> (B, N, D).
    """

    @staticmethod
    def forward(ctx, a, r, w0t, tau, b0, tau_b, chunk, tile):
        B, N, H = a.shape
        D = w0t.shape[1]
        rc = r.to(w0t.dtype)
        acc = _PerThread(lambda: torch.zeros(B, N, D, dtype=w0t.dtype, device=a.device))

        def task(h0, h1):
            out = acc.get()
            for s0, s1 in _tiles(B, chunk):
                wm = _merge_tile(w0t, tau, rc[s0:s1], h0, h1)
                out[s0:s1].baddbmm_(a[s0:s1, :, h0:h1], wm)

        _run(task, H, tile, a.device)
        out = acc.total()
        out += torch.addmm(b0, rc, tau_b).unsqueeze(1)  # merged bias, (B, 1, D)
        ctx.save_for_backward(a, r, w0t, tau, tau_b)
        ctx.chunk, ctx.tile = chunk, tile
        return out

    @staticmethod
    def backward(ctx, gy):
        a, r, w0t, tau, tau_b = ctx.saved_tensors
        chunk, tile = ctx.chunk, ctx.tile
        need_a, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, _, H = a.shape
        D = w0t.shape[1]
        T = tau.shape[0]
        gy = gy.to(w0t.dtype).contiguous()
        rc = r.to(w0t.dtype)
        taus = tau.view(T, -1)
        ga = torch.empty_like(a) if need_a else None
        gr = _PerThread(lambda: torch.zeros(B, T, dtype=torch.float32, device=a.device))

        def task(h0, h1):
            for s0, s1 in _tiles(B, chunk):
                g = gy[s0:s1]
                if need_a:
                    wm = _merge_tile(w0t, tau, rc[s0:s1], h0, h1)
                    ga[s0:s1, :, h0:h1] = torch.bmm(g, wm.transpose(1, 2))
                if need_r:
                    gw = torch.bmm(a[s0:s1, :, h0:h1].transpose(1, 2), g)  # (S, R, D)
                    gr.get()[s0:s1] += (gw.view(s1 - s0, -1) @ taus[:, h0 * D : h1 * D].t()).float()

        if need_a or need_r:
            _run(task, H, tile, a.device)
        grad_r = None
        if need_r:
            grad_r = (gr.total() + (gy.sum(dim=1) @ tau_b.t()).float()).to(r.dtype)
        return ga, grad_r, None, None, None, None, None, None


def expand_linear(
    x: torch.Tensor, r: torch.Tensor, w0: torch.Tensor, tau: torch.Tensor, b0: torch.Tensor, tau_b: torch.Tensor, chunk: int, tile: int
) -> torch.Tensor:
    """Per-sample merged linear tiled over the H output rows (see ``_ExpandLinear``)."""
    return _ExpandLinear.apply(x, r, w0, tau, b0, tau_b, chunk, tile)


def contract_linear(
    a: torch.Tensor, r: torch.Tensor, w0t: torch.Tensor, tau: torch.Tensor, b0: torch.Tensor, tau_b: torch.Tensor, chunk: int, tile: int
) -> torch.Tensor:
    """Per-sample merged linear tiled over the H input rows (see ``_ContractLinear``)."""
    return _ContractLinear.apply(a, r, w0t, tau, b0, tau_b, chunk, tile)


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_TILE_ROWS", "contract_linear", "expand_linear"]

"""Weight-ensembling MoE MLP (WEMoE, Tang et al., ICML 2024, arXiv 2402.00433).

A ViT block's MLP ``fc2(act(fc1(x)))`` is replaced by a block whose weights are
merged *per sample*::

    r = router(x)                         # (B, T), token-averaged, no softmax
    W_b = W0 + sum_i r[b, i] * tau_i      # fc1/fc2 weights AND biases
    y_b = fc2_b(act(fc1_b(x_b)))

``W0`` are the pretrained MLP tensors, ``tau_i = finetuned_i - pretrained`` the
task vectors. Both are frozen buffers (persistent, so in ``state_dict``); only
the router is trainable.

How it is computed (the hot path)
---------------------------------
Materialising ``B`` full merged weight matrices is memory-traffic bound (B x
|W| floats written and read again per layer). Instead both matrices are
processed in tiles of ``tile_rows`` rows of the hidden dimension H:

* the expert stack of each matrix is stored once, at init, as a ``(T, H, D)``
  contiguous buffer (fc1 in its natural ``[H, D]`` layout, fc2 *transposed*,
  ``[H, D]`` = ``fc2.weight.T``), so the tile ``h0:h1`` of all experts is the
  2-D strided slice ``tau.view(T, H*D)[:, h0*D:h1*D]`` (no copies per call);
* for a chunk of ``S`` samples one ``addmm`` merges the tile:
  ``Wm = W0_tile + r_chunk @ tau_tile`` -> ``(S, R, D)`` (a few MB, stays in
  cache), and one ``baddbmm`` applies it (fc1: ``x_s @ Wm^T`` into the output
  columns ``h0:h1``; fc2: accumulates ``a_s[:, :, h0:h1] @ Wm`` into the
  output);
* loop order is tile-outer / sample-chunk-inner, so every expert tile is read
  from memory once per call and reused for all samples while in cache; the fc1
  input (B, N, D) is small, and fc2 reads only the matching input columns.

Biases are merged for the whole batch at once (``b0 + r @ tau_b``, tiny).

Backward is a custom ``autograd.Function`` with the same tiling: it re-merges
each tile (no per-sample weights are saved), computes the input gradient with
one ``baddbmm`` per tile and the routing gradient
``dL/dr_bi = <dL/dW_b, tau_i> + <dL/db_b, tau_b_i>`` as the per-sample tile
gradient ``(S, R, D)`` (one ``bmm``, contraction over the N tokens) times the
expert tile (one ``mm``), again without materialising full per-sample weight
gradients.

No Python loop over samples or experts; the Python loop is over
``ceil(H / tile_rows) * ceil(B / chunk_size)`` tiles.

Dtypes: the merge and the matmuls run in the *buffer* dtype (float32 or
bfloat16; the input and the routing are cast to it, the output is cast back to
the input dtype). Routing gradients are accumulated in float32; with bfloat16
buffers the partial sums over H tiles (fc2 output, fc1 input gradient) are
accumulated in bfloat16. On CPUs without native bf16 matmul units bfloat16
buffers halve memory but are not faster.

Cost and measurements (2-core AVX2 EPYC shared with other jobs, ViT-B/32
MLP sizes, B=64, T=8, 12 layers): FLOPs are (1 + T/N) = 1.16x the plain MLP.
Materialising full per-sample weights in chunks of 16 samples: ~4.7x the plain
MLP forward. Tiled with intra-op (OpenMP) threads: ~1.8-2.0x on an idle
machine but 4.6x forward / 5.5x forward+backward on the loaded one (every one
of the ~10^2-10^3 small ops per layer pays a fork/join wait for a descheduled
thread). Tiled over a worker-thread pool with single-threaded ops (default,
see ``USE_TILE_THREADS``): 2.2x forward, 1.85x forward+backward on the same
loaded machine. Extra memory per call: one merged tile (S x R x D) per worker
plus, in backward, one per-sample tile gradient of the same size and one
(B, N, D) accumulator per worker; nothing scales with B x |W|.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from wemoe.errors import WemoeError
from wemoe.model.activations import get_activation
from wemoe.model.router import Router

# Defaults chosen by measurement on a 2-core AVX2 machine at ViT-B/32 sizes
# (see benchmarks/moe_kernel_speed.py): merged tile S x R x D floats = 3 MiB per worker
# thread (L3-resident), 24 tiles of H=3072 to balance over the workers.
DEFAULT_CHUNK_SIZE = 8
DEFAULT_TILE_ROWS = 128


def _tiles(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


# ---- parallel execution of tiles -------------------------------------------------
#
# Each tile is a few ~1 ms ops. Running them with intra-op (OpenMP) threads means
# one fork/join per op; on a machine shared with other jobs every join waits for a
# descheduled thread (measured: tiny-op tests 39 s with 2 OpenMP threads vs 1.4 s
# with 1). So by default tiles are spread over ``torch.get_num_threads()`` worker
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
    """fc1: ``y_b = x_b @ (W0 + r_b . tau)^T + (b0 + r_b . tau_b)``.

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
    """fc2 with the transposed weight: ``y_b = a_b @ (W0t + r_b . tau)`` + bias.

    ``a`` (B, N, H), ``r`` (B, T), ``w0t`` (H, D) (= fc2.weight.T), ``tau``
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


class WeightEnsemblingMLP(nn.Module):
    """A ViT MLP whose weights are merged per sample from task vectors.

    Buffers (all persistent, i.e. in ``state_dict``; H hidden, D width,
    T experts):

    ``fc1_weight`` (H, D), ``fc1_bias`` (H,), ``fc2_weight_t`` (H, D) =
    ``fc2.weight.T``, ``fc2_bias`` (D,), ``expert_fc1_weight`` (T, H, D),
    ``expert_fc1_bias`` (T, H), ``expert_fc2_weight_t`` (T, H, D) = expert fc2
    weights transposed, ``expert_fc2_bias`` (T, D).

    The fc2 tensors are stored transposed so that both matrices are tiled along
    H with contiguous tiles; ``merged_mlp`` returns the usual layouts.

    Parameters: only ``router``.

    ``chunk_size`` (samples per merged tile) and ``tile_rows`` (rows of H per
    tile) only change speed, never results beyond float rounding; ``None``
    picks the defaults. ``coef_range=(lo, hi)`` clamps the router output.
    """

    def __init__(
        self,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
        expert_fc1_weight: torch.Tensor,
        expert_fc1_bias: torch.Tensor,
        expert_fc2_weight: torch.Tensor,
        expert_fc2_bias: torch.Tensor,
        activation: str,
        router_layers: int = 2,
        init_lambda: float = 0.3,
        coef_range: tuple[float, float] | None = None,
        chunk_size: int | None = None,
        tile_rows: int | None = None,
        copy: bool = True,
    ):
        super().__init__()
        if fc1_weight.dim() != 2:
            raise WemoeError(f"fc1 weight must be 2-D [H, D], got {tuple(fc1_weight.shape)}", tensor="fc1.weight")
        H, D = fc1_weight.shape
        if expert_fc1_weight.dim() != 3:
            raise WemoeError(
                f"expert fc1 weights must be a (T, H, D) stack, got {tuple(expert_fc1_weight.shape)}",
                tensor="expert_fc1_weight",
            )
        T = expert_fc1_weight.shape[0]
        expected = {
            "fc1_bias": (fc1_bias, (H,)),
            "fc2_weight": (fc2_weight, (D, H)),
            "fc2_bias": (fc2_bias, (D,)),
            "expert_fc1_weight": (expert_fc1_weight, (T, H, D)),
            "expert_fc1_bias": (expert_fc1_bias, (T, H)),
            "expert_fc2_weight": (expert_fc2_weight, (T, D, H)),
            "expert_fc2_bias": (expert_fc2_bias, (T, D)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise WemoeError(f"expected shape {shape}, got {tuple(tensor.shape)}", tensor=name)
        dtype = fc1_weight.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            raise WemoeError(f"unsupported weight dtype {dtype}", tensor="fc1.weight")
        if T < 1:
            raise WemoeError("need at least one expert")
        if coef_range is not None:
            lo, hi = (float(v) for v in coef_range)
            if not lo <= hi:
                raise WemoeError(f"coef_range must be (lo, hi) with lo <= hi, got {coef_range}")
            coef_range = (lo, hi)
        for name, value in (("chunk_size", chunk_size), ("tile_rows", tile_rows)):
            if value is not None and int(value) < 1:
                raise WemoeError(f"{name} must be a positive integer, got {value}")

        self.activation_name = activation
        self.act: Callable[[torch.Tensor], torch.Tensor] = get_activation(activation)
        self.width, self.hidden, self.num_experts = int(D), int(H), int(T)
        self.coef_range = coef_range
        self.chunk_size = int(chunk_size) if chunk_size is not None else None
        self.tile_rows = int(tile_rows) if tile_rows is not None else None

        def buf(t: torch.Tensor) -> torch.Tensor:
            # copy=False lets a builder hand over freshly made tensors without doubling
            # peak memory (the expert stacks are most of a WEMoE model)
            out = t.detach().to(dtype).contiguous()
            return out.clone() if (copy and out.data_ptr() == t.data_ptr()) else out

        self.register_buffer("fc1_weight", buf(fc1_weight))
        self.register_buffer("fc1_bias", buf(fc1_bias))
        self.register_buffer("fc2_weight_t", buf(fc2_weight.t()))
        self.register_buffer("fc2_bias", buf(fc2_bias))
        self.register_buffer("expert_fc1_weight", buf(expert_fc1_weight))
        self.register_buffer("expert_fc1_bias", buf(expert_fc1_bias))
        self.register_buffer("expert_fc2_weight_t", buf(expert_fc2_weight.transpose(1, 2)))
        self.register_buffer("expert_fc2_bias", buf(expert_fc2_bias))

        self.router = Router(D, T, layers=router_layers, init_lambda=init_lambda)
        self.last_routing: torch.Tensor | None = None
        # coefficients routing_weights() returns for every sample instead of the router's
        # (diagnostics: see WEMoEModel.fixed_routing); a routing passed to forward() wins
        self.fixed_routing: torch.Tensor | None = None

    # -- routing -----------------------------------------------------------------

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Merging coefficients (B, T) for the MLP input ``x`` (B, N, D), clamped to ``coef_range``.

        While ``fixed_routing`` is set, every sample gets those coefficients, unclamped.
        """
        if self.fixed_routing is not None:
            return self.fixed_routing.to(dtype=x.dtype).expand(x.shape[0], -1)
        r = self.router(x)
        if self.coef_range is not None:
            r = r.clamp(self.coef_range[0], self.coef_range[1])
        return r

    def _resolve_routing(self, x: torch.Tensor, routing: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        if routing is None:
            return self.routing_weights(x)
        routing = torch.as_tensor(routing, device=x.device)
        if not routing.is_floating_point():
            routing = routing.float()
        if routing.dim() == 1:
            routing = routing.unsqueeze(0).expand(B, -1)
        if routing.shape != (B, self.num_experts):
            raise WemoeError(
                f"routing override must have shape ({self.num_experts},) or ({B}, {self.num_experts}), "
                f"got {tuple(routing.shape)}"
            )
        return routing

    # -- forward -----------------------------------------------------------------

    def _sizes(self, batch: int) -> tuple[int, int]:
        chunk = self.chunk_size or DEFAULT_CHUNK_SIZE
        tile = self.tile_rows or DEFAULT_TILE_ROWS
        return max(1, min(chunk, batch)), max(1, min(tile, self.hidden))

    def forward(self, x: torch.Tensor, routing: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, N, D) -> (B, N, D).

        ``routing`` forces the coefficients: (T,) for every sample or (B, T);
        it is used as given (no ``coef_range`` clamp). The coefficients used are
        kept, detached, in ``self.last_routing``.
        """
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise WemoeError(f"expected input (B, N, {self.width}), got {tuple(x.shape)}")
        r = self._resolve_routing(x, routing)
        self.last_routing = r.detach()
        dtype = self.fc1_weight.dtype
        xc = x.to(dtype).contiguous()
        chunk, tile = self._sizes(x.shape[0])
        h = _ExpandLinear.apply(
            xc, r, self.fc1_weight, self.expert_fc1_weight, self.fc1_bias, self.expert_fc1_bias, chunk, tile
        )
        a = self.act(h).contiguous()
        y = _ContractLinear.apply(
            a, r, self.fc2_weight_t, self.expert_fc2_weight_t, self.fc2_bias, self.expert_fc2_bias, chunk, tile
        )
        return y.to(x.dtype)

    # -- export ------------------------------------------------------------------

    @torch.no_grad()
    def merged_mlp(self, coefs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Plain MLP tensors ``W0 + sum_i coefs[i] * tau_i`` in the usual layouts.

        Returns ``{"fc1.weight": (H, D), "fc1.bias": (H,), "fc2.weight": (D, H),
        "fc2.bias": (D,)}`` (new contiguous tensors, buffer dtype; merged in
        float32 or better).
        """
        coefs = torch.as_tensor(coefs).reshape(-1)
        if coefs.numel() != self.num_experts:
            raise WemoeError(f"merged_mlp needs {self.num_experts} coefficients, got {coefs.numel()}")
        dtype = self.fc1_weight.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        c = coefs.to(device=self.fc1_weight.device, dtype=work)

        def merge(base: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
            flat = experts.reshape(self.num_experts, -1).to(work)
            return (base.reshape(-1).to(work) + c @ flat).reshape(base.shape).to(dtype)

        return {
            "fc1.weight": merge(self.fc1_weight, self.expert_fc1_weight).contiguous(),
            "fc1.bias": merge(self.fc1_bias, self.expert_fc1_bias),
            "fc2.weight": merge(self.fc2_weight_t, self.expert_fc2_weight_t).t().contiguous(),
            "fc2.bias": merge(self.fc2_bias, self.expert_fc2_bias),
        }

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, hidden={self.hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation_name!r}, coef_range={self.coef_range}"
        )


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_TILE_ROWS", "WeightEnsemblingMLP"]

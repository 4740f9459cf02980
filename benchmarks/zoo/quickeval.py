"""Self-contained check of the zoo against its bar (no dependency on ``wemoe``).

Per task, with each task's own head: pretrained base, the task's own fine-tuned model,
simple averaging, and task arithmetic theta_0 + lam * sum_i (theta_i - theta_0) on a grid.
Run: ``python -m benchmarks.zoo.quickeval [--cache DIR] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from wemoe.adaptation.objectives import entropy

from . import datasets
from .build import DEFAULT_CACHE
from .heads import features, load_head, logits
from .model import load_encoder, load_state

LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def task_arithmetic(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], lam: float) -> dict[str, torch.Tensor]:
    return {k: v + lam * sum(t[k] - v for t in tasks) for k, v in base.items()}


def average(tasks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(t[k] for t in tasks) / len(tasks) for k in tasks[0]}


def task_vector_ratio(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]]) -> list[float]:
    """||theta_i - theta_0|| / ||theta_0|| over all parameters: how gentle fine-tuning was."""
    n0 = torch.sqrt(sum((v.float() ** 2).sum() for v in base.values()))
    return [float(torch.sqrt(sum(((t[k] - v).float() ** 2).sum() for k, v in base.items())) / n0) for t in tasks]


@dataclass
class BuiltZoo:
    """A built zoo in memory: base model (reused for every evaluation), state dicts, test data, heads."""

    model: torch.nn.Module
    base: dict[str, torch.Tensor]
    own: dict[str, dict[str, torch.Tensor]]
    tests: dict[str, tuple[np.ndarray, np.ndarray]]
    heads: dict[str, tuple[torch.Tensor, torch.Tensor | None, dict[str, str]]]

    def score(self, sd: dict[str, torch.Tensor], task: str) -> float:
        """Test accuracy of the encoder ``sd`` on ``task`` with the task's own head."""
        return self.score_and_entropy(sd, task)[0]

    def score_and_entropy(self, sd: dict[str, torch.Tensor], task: str) -> tuple[float, float]:
        """Test accuracy and mean prediction entropy (nats): the quantity WEMoE's routers minimise."""
        self.model.load_state_dict(sd)
        weight, bias, _ = self.heads[task]
        x, y = self.tests[task]
        out = logits(features(self.model, x), weight, bias)
        return float((out.argmax(1) == torch.as_tensor(y)).float().mean()), float(entropy(out))


def require_built(cache: str, tasks: tuple[str, ...] = datasets.TASKS) -> None:
    """One-line refusal (SystemExit) when the zoo at ``cache`` has not been built (for ``tasks``)."""
    missing = [t for t in tasks if not os.path.exists(os.path.join(cache, "tasks", f"{t}.safetensors"))]
    if missing:
        raise SystemExit(f"error: no built zoo at {cache} (missing {', '.join(missing)}): run `python -m benchmarks.zoo build` first")


def load_built(cache: str, tasks: tuple[str, ...] = datasets.TASKS) -> BuiltZoo:
    base_path = os.path.join(cache, "base.safetensors")
    tests, heads = {}, {}
    for t in tasks:
        with np.load(os.path.join(cache, "data", f"{t}.npz")) as z:
            tests[t] = (z["x_test"], z["y_test"])
        heads[t] = load_head(os.path.join(cache, "heads", f"head_{t}.safetensors"))
    return BuiltZoo(
        model=load_encoder(base_path),
        base=load_state(base_path)[0],
        own={t: load_state(os.path.join(cache, "tasks", f"{t}.safetensors"))[0] for t in tasks},
        tests=tests,
        heads=heads,
    )


def evaluate(cache: str, tasks: tuple[str, ...] = datasets.TASKS, lambdas: tuple[float, ...] = LAMBDAS) -> dict[str, Any]:
    zoo = load_built(cache, tasks)
    base_sd, task_sds = zoo.base, [zoo.own[t] for t in tasks]

    def score(sd: dict[str, torch.Tensor]) -> dict[str, float]:
        return {t: zoo.score(sd, t) for t in tasks}

    rows: dict[str, dict[str, float]] = {}
    rows["pretrained"] = score(base_sd)
    rows["individual"] = {t: zoo.score(zoo.own[t], t) for t in tasks}
    rows["average"] = score(average(task_sds))
    for lam in tqdm(lambdas, desc="task arithmetic"):
        rows[f"ta@{lam}"] = score(task_arithmetic(base_sd, task_sds, lam))
    means = {k: float(np.mean(list(v.values()))) for k, v in rows.items()}
    best = max((k for k in rows if k.startswith("ta@")), key=lambda k: means[k])
    out = {"tasks": list(tasks), "rows": rows, "means": means, "ta_best": best, "task_vector_ratio": dict(zip(tasks, task_vector_ratio(base_sd, task_sds)))}
    out["bar"] = {
        "individual>=85": means["individual"] >= 0.85,
        "individual-pretrained>=20": means["individual"] - means["pretrained"] >= 0.20,
        "ta_best-pretrained>=3": means[best] - means["pretrained"] >= 0.03,
        "individual-ta_best>=8": means["individual"] - means[best] >= 0.08,
    }
    return out


def table(res: dict[str, Any]) -> str:
    tasks = res["tasks"]
    keys = ["pretrained", "individual", "average", res["ta_best"]] + (["ta@0.3"] if res["ta_best"] != "ta@0.3" else [])
    lines = [f"{'method':12s} " + " ".join(f"{t[:8]:>8s}" for t in tasks) + f" {'mean':>6s}"]
    for k in keys:
        label = k + (" (best)" if k == res["ta_best"] else "")
        lines.append(f"{label:12s} " + " ".join(f"{100 * res['rows'][k][t]:8.1f}" for t in tasks) + f" {100 * res['means'][k]:6.1f}")
    lines.append("TA grid: " + ", ".join(f"{k[3:]}:{100 * v:.1f}" for k, v in res["means"].items() if k.startswith("ta@")))
    lines.append("task-vector / weight norm: " + ", ".join(f"{t}:{r:.3f}" for t, r in res["task_vector_ratio"].items()))
    lines.append("bar: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in res["bar"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--json", default=None, help="write the full result here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lambdas", default=",".join(map(str, LAMBDAS)), help="comma-separated task-arithmetic grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    require_built(args.cache)
    res = evaluate(args.cache, lambdas=tuple(float(v) for v in args.lambdas.split(",")))
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""The package layout's rules: one job per module (at most 500 lines), imports that flow one way,
Ray and MLflow only above the plain-torch layers, private Ray APIs only in ``ray_compat``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ood_ray"
MAX_LINES = 500
#: Layers that are plain torch/numpy: no Ray, no MLflow, anywhere in them.
PLAIN = ("config", "objective", "metrics", "metric_names", "selective", "progress", "checkpoint", "methods", "models", "data", "engine", "detectors")


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, name: str, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``name`` imports (``from . import x`` resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_no_module_above_the_limit():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules above {MAX_LINES} lines (split them by job): {long}"


def test_module_level_imports_have_no_cycle():
    mods = modules()
    graph = {name: {m for m in imports(p, name, top_level_only=True) if m in mods and m != name} for name, p in mods.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("layer", PLAIN)
def test_plain_layers_import_no_ray_or_mlflow(layer):
    bad = []
    for name, p in modules().items():
        if name == f"ood_ray.{layer}" or name.startswith(f"ood_ray.{layer}."):
            bad += [f"{name}: {m}" for m in imports(p, name, top_level_only=False) if m.split(".")[0] in ("ray", "mlflow", "optuna")]
            bad += [f"{name}: {m}" for m in imports(p, name, top_level_only=False) if m.startswith(("ood_ray.ray_", "ood_ray.tracking", "ood_ray.tuning", "ood_ray.serving", "ood_ray.train", "ood_ray.cli"))]
    assert not bad, "plain layers must not import Ray, MLflow, Optuna or the layers above: " + "; ".join(bad)


def test_private_ray_apis_only_in_ray_compat():
    bad = []
    for name, p in modules().items():
        if name == "ood_ray.ray_compat":
            continue
        text = p.read_text()
        bad += [f"{name}: {m}" for m in imports(p, name, top_level_only=False) if m.startswith("ray") and "._" in m]
        bad += [f"{name}: {word}" for word in re.findall(r"[\"'](?:RAY_TRAIN|TUNE)_[A-Z_]+[\"']|_ot_study|get_session", text)]
    assert not bad, "private Ray APIs and settings belong in ood_ray/ray_compat.py: " + "; ".join(bad)


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(out.stdout.split())


def test_engine_runs_without_ray_and_a_trial_process_without_mlflow():
    assert not loaded_after_import("ood_ray.engine") & {"ray", "mlflow", "optuna", "matplotlib"}
    assert not loaded_after_import("ood_ray.serving") & {"ray", "optuna", "matplotlib"}
    # what a Tune trial process imports to train: no MLflow, Optuna or plotting (~1 s per new trial)
    assert not loaded_after_import("ood_ray.tuning.trial, ood_ray.ray_train") & {"mlflow", "optuna", "matplotlib"}

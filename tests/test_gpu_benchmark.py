"""benchmarks/gpu.py (issue 14) as a CPU dry run, and its device wrapper benchmarks/gpu.sh.

The full run needs a CUDA device (docs/benchmarks.md, "GPU"); ``--quick`` runs every stage
through the app's own code at small sizes, with the CPU standing in for the device, and
compares the numpy and torch encoding backends for real.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"
WRAPPER = REPO / "benchmarks" / "gpu.sh"
KEYS = ("extract_tokens_per_s", "extract_story_seconds", "dict_seconds", "encoding_seconds", "max_rel_diff")
TOL = 1e-3


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _last_line(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    return dict(item.split("=", 1) for item in last.split())


def test_quick_runs_every_stage_within_tolerance(tmp_path):
    proc = _run("--quick", "--json", str(tmp_path / "gpu.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = _last_line(proc.stdout)
    for key in KEYS:
        assert key in values, f"{key} missing from the last line: {proc.stdout.strip().splitlines()[-1]}"
        assert math.isfinite(float(values[key])), f"{key}={values[key]}"
        assert float(values[key]) >= 0
    assert float(values["extract_tokens_per_s"]) > 0 and float(values["extract_story_seconds"]) > 0
    assert float(values["max_rel_diff"]) <= TOL
    assert values["device"] == "cpu"
    # the table: one row per stage, no failure
    assert "FAILED" not in proc.stdout
    for case in ("300-word story", "check: small llama", "ANs x 200 frames (a story)", "check: 1,000 voxels",
                 "(model level)"):
        assert case in proc.stdout, case
    res = json.loads((tmp_path / "gpu.json").read_text())["results"]
    for key in ("extract_rel_diff", "dict_rel_diff", "encoding_rel_diff"):
        assert 0 <= res[key] <= TOL, (key, res[key])
    assert res["extract_n_neurons"] == 4 * 128  # mlp-out of every layer of the tiny Llama
    assert res["extract_windows"] > 1  # the windowed path, not one pass
    assert res["extract_rel_diff_bf16"] < 5e-2  # bf16 against float32: close, not equal
    assert res["extract_rel_diff_bf16"] > 0
    assert res["dict_estimated"] == 0 and res["encoding_estimated"] == 0 and res["dict_model_estimated"] == 0


def test_quick_over_budget_estimates_instead_of_overrunning():
    """With no time left the encoding is fitted on part of the brain and scaled, the model-level
    dictionary is skipped and estimated; the last line still carries finite numbers."""
    proc = _run("--quick", "--budget", "1", "--stages", "dictionary,encoding")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = _last_line(proc.stdout)
    assert values["encoding_estimated"] == "1" and values["dict_model_estimated"] == "1"
    for key in ("dict_seconds", "encoding_seconds", "dict_model_seconds", "max_rel_diff"):
        assert math.isfinite(float(values[key])), (key, values[key])
    assert values["extract_tokens_per_s"] == "nan"  # not run
    assert "skipped" in proc.stdout and "scaled" in proc.stdout


def test_full_run_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full run would start")
    proc = _run(timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--quick" in proc.stderr


def test_wrapper_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(WRAPPER)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    usage = subprocess.run(["bash", str(WRAPPER)], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 64 and "prepare" in usage.stderr and "device" in usage.stderr
    text = WRAPPER.read_text()
    # what the device machine needs: wheels installed offline into a target, the tree on PYTHONPATH
    assert "--no-index" in text and "--target" in text and "--python-version 3.12" in text
    assert 'PYTHONPATH="$PWD' in text and "--tokenizer" in text


class _FakeClock:
    """Seconds left, one value per call (the last one repeats); the stage keeps 10 s back."""

    def __init__(self, *left):
        self.values = list(left)

    def left(self):
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def _gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gpu_bench", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def _one_thread(fn, *args):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --quick does: an oversubscribed pool spins on the shared machine
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_story_dictionary_capped_by_the_budget_is_estimated():
    import argparse

    gpu = _gpu_module()
    rows, out = [], {}
    alts, per_alt = _one_thread(gpu.stage_dictionary_story, argparse.Namespace(quick=True), gpu.Dev("cpu"),
                                _FakeClock(100.0), rows, out, 0.01)
    assert alts == 2 and per_alt > 0  # capped at the 2 alternations of the probe
    assert out["dict_estimated"] == 1 and out["dict_seconds"] > 0
    assert "capped at 2" in rows[0]["note"]
    assert out["dict_rel_diff"] <= TOL  # the subset check still runs


@pytest.mark.parametrize("left, estimated_from", [((31.0, 13.0), "capped"), ((31.0, 10.5), "probe only")])
def test_model_dictionary_capped_by_the_budget_is_estimated(left, estimated_from):
    import argparse

    gpu = _gpu_module()
    rows, out = [], {}
    _one_thread(gpu.stage_dictionary_model, argparse.Namespace(quick=True), gpu.Dev("cpu"), _FakeClock(*left), rows,
                out, 40, 0.05)
    assert out["dict_model_estimated"] == 1
    assert math.isfinite(out["dict_model_seconds"]) and out["dict_model_seconds"] > 0
    assert estimated_from in rows[-1]["note"]

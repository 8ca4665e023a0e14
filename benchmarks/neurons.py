"""Benchmark of lm.neurons.word_activations (issue 3's "Done when").

For the embedded model (smollm2-135m) on (a) a demo-like story (~1,000 words)
and (b) a 5,000-word text, it measures the windowed method (one pass per
window) and the one-pass-per-word way on a sample of words, each word given
exactly the left context the windowed run gave it (>= context_tokens tokens),
so that both must give the same activations (max abs diff printed). Per-word
time is scaled to the whole text; speedup = per-word time / windowed time.
A second, conservative speedup assumes each per-word pass had only
context_tokens + 1 tokens (per-token cost measured).

Model FLOP/s = 2 * n_params_nonembedding * forward_tokens / model_seconds
(attention score FLOPs not counted; the LM head is not run). The reference is
a float32 torch matmul of shape (batch*window, hidden) x (hidden, mlp) measured
in the same run; flops_ratio = model FLOP/s / matmul FLOP/s.

Peak memory = the process's max RSS increase over its level after loading the
model (resource.getrusage), measured for the 5,000-word text first.

Usage: python benchmarks/neurons.py [--quick] [--text FILE] [--model smollm2-135m]
The last line is ``speedup=<x> flops_ratio=<y> tokens_per_s=<z> peak_mb=<m>`` for the large text.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bids_llm_encode.lm.models import load_model
from bids_llm_encode.lm.neurons import causal_windows, tokenize_words, transformer_parts, word_activations

VOCAB = (
    "the a and of to in I my he she it was is on for with as at by up out day one man woman house city "
    "night dog old new good long little said went came saw told asked knew thought looked walked story "
    "time year people way back down over after before never always then when where because but so if "
    "that this there here what who reporter newspaper campus dean student university tuition money"
).split()


def generate_text(n_words: int, seed: int) -> list[str]:
    """Deterministic plain English-like text: sentences from a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < n_words:
        sentence = list(rng.choice(VOCAB, size=int(rng.integers(5, 15))))
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "." if rng.random() < 0.8 else ","
        words.extend(sentence)
    return words[:n_words]


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def nonembedding_params(loaded) -> int:
    base, _ = transformer_parts(loaded.model, loaded.family)
    emb = base.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in base.parameters()) - emb


def matmul_flops(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.inference_mode():
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def per_word(loaded, words, act, sample, context, window):
    """One forward pass per sampled word with the windowed run's left context; time and max diff."""
    base, _ = transformer_parts(loaded.model, loaded.family)
    ids, token_word = tokenize_words(loaded.tokenizer, words)
    last = np.full(len(words), -1)
    np.maximum.at(last, token_word[token_word >= 0], np.flatnonzero(token_word >= 0))
    plan = causal_windows(len(ids), window, context)
    start_of = np.empty(len(ids), dtype=np.int64)
    for s, _, take in plan:
        start_of[take] = s
    prefix = act.card["special_tokens"]["prefix"]
    mods = [blk.mlp.down_proj for blk in transformer_parts(loaded.model, loaded.family)[1]]
    got = {}
    handles = [m.register_forward_hook(lambda mod, a, o, i=i: got.__setitem__(i, o[0, -1])) for i, m in enumerate(mods)]
    diffs, n_tok, t_total = [], 0, 0.0
    try:
        with torch.inference_mode():
            for w in sample:
                p = int(last[w])
                seq = prefix + ids[start_of[p]:p + 1].tolist()
                t0 = time.perf_counter()
                base(input_ids=torch.tensor([seq]), use_cache=False)
                t_total += time.perf_counter() - t0
                n_tok += len(seq)
                row = torch.cat([got[i] for i in range(len(mods))]).numpy()
                diffs.append(float(np.abs(row - act.values[w]).max()))
    finally:
        for h in handles:
            h.remove()
    return t_total, n_tok, max(diffs)


def run_text(loaded, name, words, args, rng, matmul):
    rss0 = max_rss_mb()
    t0 = time.perf_counter()
    act = word_activations(loaded, words, context_tokens=args.context, window_tokens=args.window,
                           batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    peak = max_rss_mb() - rss0
    card = act.card
    sample = np.sort(rng.choice(len(words), size=min(args.sample, len(words)), replace=False))
    t_pw, n_tok_pw, diff = per_word(loaded, words, act, sample, args.context, args.window)
    per_word_s = t_pw / len(sample) * len(words)
    per_word_min_s = t_pw / n_tok_pw * (args.context + 1) * len(words)
    model_s = card["forward_tokens"] / card["forward_tokens_per_s"]
    flops = 2.0 * args.n_params * card["forward_tokens"] / model_s
    return {
        "text": name, "words": len(words), "tokens": card["n_tokens"], "windows": card["n_windows"],
        "seconds": seconds, "tokens_per_s": card["n_tokens"] / seconds, "peak_mb": peak,
        "per_word_s": per_word_s, "speedup": per_word_s / seconds,
        "speedup_min_ctx": per_word_min_s / seconds, "max_abs_diff": diff,
        "gflops": flops / 1e9, "flops_ratio": flops / matmul,
        "per_word_ctx": n_tok_pw / len(sample),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true",
                    help="one 600-word text, window 512, context 128: within a minute")
    ap.add_argument("--text", type=Path, help="a text file for the demo-like story instead of generated text")
    ap.add_argument("--sample", type=int, default=100, help="words timed one pass per word (>= 100)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    n_demo, n_big = (200, 600) if args.quick else (1000, 5000)
    if args.quick:
        args.window = min(args.window, 512)
        args.context = min(args.context, 128)

    loaded = load_model(args.model, device="cpu")
    args.n_params = nonembedding_params(loaded)
    hidden = loaded.model.config.hidden_size
    inter = getattr(loaded.model.config, "intermediate_size", 4 * hidden)
    rows = min(args.window, 4096) * max(1, (args.batch_size or max(1, 4096 // args.window)))
    matmul = matmul_flops(rows, hidden, inter)
    demo = args.text.read_text().split() if args.text else generate_text(n_demo, seed=1)
    big = generate_text(n_big, seed=2)
    rng = np.random.default_rng(0)
    results = [run_text(loaded, f"{n_big}-word", big, args, rng, matmul)]
    if not args.quick:  # --quick: only the large text, to stay within a minute
        results.append(run_text(loaded, "demo-like" if not args.text else args.text.name, demo, args, rng,
                                matmul))

    print(f"model={args.model} threads={torch.get_num_threads()} window={args.window} context={args.context} "
          f"n_params_nonembedding={args.n_params} matmul_gflops={matmul / 1e9:.1f} "
          f"(float32 {rows}x{hidden} @ {hidden}x{inter})")
    cols = ["text", "words", "tokens", "windows", "seconds", "tokens_per_s", "peak_mb", "per_word_s",
            "per_word_ctx", "speedup", "speedup_min_ctx", "max_abs_diff", "gflops", "flops_ratio"]
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in results:
        print(" | ".join(f"{r[c]:>12.4g}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))
    big_r = results[0]
    print(f"speedup={big_r['speedup']:.1f} flops_ratio={big_r['flops_ratio']:.2f} "
          f"tokens_per_s={big_r['tokens_per_s']:.0f} peak_mb={big_r['peak_mb']:.0f}")


if __name__ == "__main__":
    main()

"""Benchmark and calibration of the sparse dictionary learning (patterns/dictionary.py).

Usage::

    python benchmarks/patterns.py            # full: minilm story + 131,072 x 1,000 synthetic + stability
    python benchmarks/patterns.py --quick    # < 1 min: minilm story + 16,384 x 400 synthetic, 4 restarts
    python benchmarks/patterns.py --calibrate [--smollm2]   # R^2 against sparsity (docs/patterns.md)

(a) real responses: all-MiniLM-L6-v2 (BERT, 6 layers x 384 = 2,304 ANs at
``layer.output.dense``) over the ~1,000-word original text below, one word
every 0.4 s, word activations HRF-convolved (SPM HRF from nilearn) and sampled
at TR 1.5 s, z-scored. (b) a synthetic matrix of Llama-8B width: low-rank
smooth time courses (HRF-convolved random event trains) mixed into 131,072
ANs plus noise, z-scored.

sklearn's MiniBatchDictionaryLearning gets the same K and alpha, the same
float32 data, a batch of 1,024 samples (faster per
epoch than its default 256 here), its default LARS coding and the same number of epochs as our
alternations; its objective is evaluated at its dictionary with exact lasso
codes (our ``sparse_encode``, not counted in its time), which favours it.

(c) stability (patterns/consensus.py), on the demo story (``bids_llm_encode/demo/story.txt``
timed by the demo's ``align_story``, grid of the pipeline: TR 1.5 s to the last word + 20 s),
smollm2-135m and minilm-l6: for R = 1 the median best-match |r| (Hungarian) between
two single fits from random starts with other seeds; for the chosen R the same between
two consensus dictionaries of disjoint seed sets (``--seed`` 0 and 1); the median
Jaccard of matched sub-groups; the atoms' largest |r| with the word rate
(``frame_series(starts, ones)``, uncentred); the cost. (b) is also timed with the restarts.

The last line is ``speedup=<x> objective_ratio=<ours/sklearn>`` for (b), then
``stability=`` (chosen R, smollm2-135m; minilm-l6 with --quick) ``stability_r1=``
(R = 1, same model) ``restarts=`` ``restart_seconds=`` (the restarts of (b)'s
consensus) ``consensus_seconds=`` ((b)'s whole consensus).
"""

from __future__ import annotations

import os

# Both methods single-threaded by default (set OMP_NUM_THREADS to change): on a shared,
# oversubscribed machine torch's OpenMP pool spins and runs ~50x slower than one thread.
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bids_llm_encode.patterns.dictionary import (alpha_from_sparsity, learn_dictionary,  # noqa: E402
                                                 objective, sparse_encode)

TR = 1.5
WORD_SECONDS = 0.4
PARTS = ("a", "b", "t", "c")

TEXT = """
The lighthouse keeper on the northern island had not spoken to another person for eleven days
when the boat finally came. She heard it before she saw it, a low uneven cough of an engine that
needed more oil than anyone had given it, and she went down the stone steps to the landing with
her coat open and her hands cold in the wind. The man who stepped off was younger than she had
expected. He carried a canvas bag, a box of tinned food and a letter from the harbour office that
said he would stay for three weeks to learn the work. She read the letter twice, folded it into a
small square and put it into her pocket, and then she told him that the first thing to learn was
where to put his feet on the steps, because the third and the ninth were loose and the sea did not
forgive people who forgot. He laughed, and then he saw that she was not joking, and he stopped.
That evening they ate beans and bread at the table under the window. The lamp turned above them
with its slow patient sound, and every eleven seconds its light swept across the water and came
back again. He asked her how long she had lived on the island. Nineteen years, she said. Before
that she had been a teacher in a town by a river, where the children knew the names of every bird
and none of the names of the stars. She had come for one winter, to be somewhere quiet after her
husband died, and then one winter had become the next, and the next, until the mainland felt like
a country she had read about in a book. He asked whether she was lonely. She thought about it for a
long time, longer than he expected, and then she said that loneliness was a word for people who
were waiting for someone, and she was not waiting for anyone. She was watching. There is a
difference, she said, and you will learn it here or you will leave. The days began to take a shape.
In the mornings they cleaned the great lens with soft cloths and a bowl of warm water, moving in
small circles so as not to scratch the glass. At noon they wrote the weather in a thick green book:
the direction of the wind, the height of the waves, the colour of the sky, the number of ships
that passed. In the afternoons he repaired the things that the salt had eaten, the hinges and the
railings and the rusted handle of the pump, while she walked the rocks at low tide and collected
whatever the sea had left behind. She kept a shelf of these things in the storeroom. There was a
green glass float from a fishing net, a child's shoe, a wooden spoon with a name burned into its
handle, a compass that still pointed north, and a small brass bell with no clapper. He asked her
why she kept them. Because someone lost them, she said, and somebody should remember that they
existed. In the second week a storm came up from the south. The radio warned of it in the morning,
and by the afternoon the sky had turned the colour of a bruise, yellow at the edges and dark in the
middle. The waves grew until they broke over the landing and threw white water against the lower
windows. The tower shook in a way he had not known a building could shake, not violently but
deeply, like a great animal breathing in its sleep. She made tea and sat with the logbook open on
her knees, writing down the wind speed every half hour in her small, careful hand. He could not sit
still. He walked from the kitchen to the lamp room and back again, counting the steps, listening
to the glass rattle in its frames. At midnight the power failed. The lamp slowed and stopped, and
the darkness that came through the windows was so complete that he could not see his own hands.
For a moment neither of them moved. Then she stood up, found the torch by feel, and told him to
bring the crank handle from the storeroom. Together they climbed to the top of the tower. The
mechanism had a backup, a system of weights and gears older than either of them, and it had to be
wound by hand. She showed him where to fit the handle and how to turn it, slowly, steadily, and she
held the torch while he worked. His arms burned after ten minutes. After twenty he stopped feeling
them at all. The great lens began to turn again, and a kerosene flame that she had lit with a long
match climbed inside the glass until the beam went out across the water, weaker than before but
alive. Somewhere out there, she said, there is a captain who has just seen that light and knows
where the rocks are. He will never know our names. That is the whole job. They took turns at the
handle until dawn. When the storm passed, the morning was so clear and still that the sea looked
like a sheet of metal, and they could see the mainland for the first time in days, a thin grey line
with a few white houses on it. A fishing boat came past close to the island, and the men on its
deck raised their arms and shouted something that the distance turned into a single long vowel.
She raised her arm back. He did too, and found that his hand was shaking. In the third week he
began to notice things he had not seen before. The way the birds sat facing into the wind before
a change in the weather. The way the water near the rocks turned a lighter green when the tide was
turning. The sound of the lamp, which he had first heard as a dull mechanical grinding, and which
he now heard as something closer to a voice, steady and low, saying the same short sentence over
and over through the night. He started writing in the green book without being asked. He started
walking the rocks at low tide. On the last morning he found a small blue bottle wedged between two
stones, its glass worn smooth and cloudy by the sand, and he brought it back and put it on the shelf
in the storeroom next to the bell with no clapper. She saw it there that afternoon and did not say
anything, but she moved the bottle a little to the left so that the light from the window fell on
it. The boat came for him at noon. He carried his canvas bag down the stone steps, stepping over the
third and the ninth without looking, and at the landing he turned and asked whether he could come
back in the spring. She said that the island would be here, and the light would be here, and that
those were the only two promises she was able to make. Then she went back up the steps to write
the weather in the book, because it was noon, and the wind had changed, and someone had to watch.
"""


def story_words() -> list[str]:
    return TEXT.split()


def _frames(n_words: int) -> tuple[np.ndarray, np.ndarray]:
    onsets = np.arange(n_words) * WORD_SECONDS
    n_frames = int(np.ceil((onsets[-1] + 15.0) / TR))
    return onsets, (np.arange(n_frames) + 0.5) * TR


def model_responses(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(X frames x ANs, layer of each AN) for the text, through the project's own neuron and HRF code."""
    from bids_llm_encode.lm.models import load_model
    from bids_llm_encode.lm.neurons import word_activations
    from bids_llm_encode.signal.frames import frame_series

    words = story_words()
    acts = word_activations(load_model(name, device="cpu"), words, progress=False)
    onsets, frame_times = _frames(len(words))
    return frame_series(onsets, acts.values, frame_times), acts.layer


def synthetic(n_neurons: int, n_frames: int, rank: int = 150, noise: float = 1.0,
              seed: int = 0) -> np.ndarray:
    """Low-rank smooth responses + noise, z-scored, float32 (n_frames, n_neurons)."""
    from nilearn.glm.first_level.hemodynamic_models import spm_hrf

    rng = np.random.default_rng(seed)
    h = spm_hrf(TR, oversampling=1, time_length=32.0)
    ev = rng.standard_normal((n_frames + h.size, rank)) * (rng.random((n_frames + h.size, rank)) < 0.3)
    S = np.stack([np.convolve(ev[:, r], h)[h.size:h.size + n_frames] for r in range(rank)], 1)
    S = torch.from_numpy(((S - S.mean(0)) / S.std(0)).astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    X = torch.empty((n_frames, n_neurons), dtype=torch.float32)
    scale = torch.from_numpy((1.0 / np.arange(1, rank + 1) ** 0.5).astype(np.float32))
    for s in range(0, n_neurons, 16384):
        e = min(n_neurons, s + 16384)
        W = torch.randn((rank, e - s), generator=g) * scale[:, None]
        W *= (torch.rand((rank, e - s), generator=g) < 0.2)
        Xb = S @ W + noise * torch.randn((n_frames, e - s), generator=g) * (S @ W).std()
        X[:, s:e] = (Xb - Xb.mean(0)) / Xb.std(0).clamp_min(1e-6)
    return X.numpy()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def r2_of(X, D, A) -> float:
    A = A.toarray() if hasattr(A, "toarray") else A
    Xt = torch.from_numpy(X)
    R = Xt.double() - torch.from_numpy(D).double() @ torch.from_numpy(A).double()
    return 1.0 - float((R ** 2).sum()) / float(((Xt.double() - Xt.double().mean(0)) ** 2).sum())


def compare(X: np.ndarray, K: int, sparsity: float, n_epochs_sklearn: int, label: str,
            sk_fraction: float = 1.0) -> tuple[float, float]:
    """Time ours and sklearn's MiniBatchDictionaryLearning on X; print rows; return (speedup, ratio)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    alpha = alpha_from_sparsity(X, sparsity)
    t = time.perf_counter()
    ours = learn_dictionary(X, K, alpha, progress=True)
    t_ours = time.perf_counter() - t
    mem_ours = peak_mb()
    print(f"{label:10s} {'ours':28s} {t_ours:9.1f} {ours.objective:14.6g} {ours.r2:7.4f} "
          f"{mem_ours:9.0f}  ({ours.info['n_iter']} alternations, density {ours.info['density']:.3f})",
          flush=True)

    Y = X.T  # samples = neurons
    n_sub = Y.shape[0] if sk_fraction >= 1 else int(Y.shape[0] * sk_fraction)
    mb = MiniBatchDictionaryLearning(n_components=K, alpha=alpha, batch_size=1024,
                                     max_iter=n_epochs_sklearn, fit_algorithm="lars",
                                     random_state=0, tol=0.0, max_no_improvement=None)
    t = time.perf_counter()
    mb.fit(Y[:n_sub])
    t_sk = (time.perf_counter() - t) * (Y.shape[0] / n_sub)
    Dsk = mb.components_.T.astype(np.float32)
    Dsk = Dsk / np.linalg.norm(Dsk, axis=0).clip(1e-12)  # inside its unit ball; unit norm can only help
    A_sk = sparse_encode(X, Dsk, alpha, dtype=torch.float32, tol=1e-4, max_iter=500)
    obj_sk = objective(X, Dsk, A_sk, alpha) if X.size < 5e7 else _obj_torch(X, Dsk, A_sk, alpha)
    note = f"{n_epochs_sklearn} epochs, batch 1024"
    if sk_fraction < 1:
        note += f", timed on {n_sub} of {Y.shape[0]} samples and scaled"
    print(f"{label:10s} {'sklearn MiniBatchDL':28s} {t_sk:9.1f} {obj_sk:14.6g} "
          f"{r2_of(X, Dsk, A_sk):7.4f} {peak_mb():9.0f}  ({note})", flush=True)
    return t_sk / t_ours, ours.objective / obj_sk


def _obj_torch(X, D, A, alpha) -> float:
    Xt, Dt, At = (torch.from_numpy(np.asarray(v)).double() for v in (X, D, A))
    return float(0.5 * ((Xt - Dt @ At) ** 2).sum() + alpha * At.abs().sum())


def demo_story() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Words, onsets (s) and the reference grid of the demo story, as the pipeline builds them."""
    from bids_llm_encode.demo.generate import align_story, story_text

    al = align_story(story_text(), seed=0)
    end = float(np.nanmax(al.true_ends)) + 20.0  # workflows.stimulus.reference_frame_times
    return list(al.words), np.asarray(al.true_starts), (np.arange(int(np.ceil(end / TR))) + 0.5) * TR


def demo_responses(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(X frames x ANs, HRF-convolved word rate) of the demo story, through the project's code."""
    from bids_llm_encode.lm.models import load_model
    from bids_llm_encode.lm.neurons import word_activations
    from bids_llm_encode.signal.frames import frame_series

    words, onsets, grid = demo_story()
    acts = word_activations(load_model(name, device="cpu"), words, progress=False)
    return frame_series(onsets, acts.values, grid), frame_series(onsets, np.ones((len(words), 1)), grid)[:, 0]


def _matched(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Best-match |r| (Hungarian) of b's atoms to a's, and the Jaccard of the matched sub-groups."""
    from bids_llm_encode.patterns.consensus import match_atoms

    index, _, r = match_atoms(a.atoms, b.atoms)
    Sa = a.loadings.toarray() != 0
    Sb = b.loadings.toarray()[index] != 0
    union = (Sa | Sb).sum(1)
    jac = np.where(union > 0, (Sa & Sb).sum(1) / np.maximum(union, 1), np.nan)
    return r, jac


def _wordrate_r(d, rate: np.ndarray) -> float:
    """Largest |r| of an atom with the (uncentred) word rate."""
    w = rate - rate.mean()
    D = d.atoms - d.atoms.mean(0)
    return float(np.max(np.abs(D.T @ w) / (np.linalg.norm(D, axis=0) * np.linalg.norm(w))))


def stability(name: str, restarts: int, sparsity: float) -> dict:
    """R = 1 (two random-start single fits) against the consensus of ``restarts`` (two seed sets)."""
    from bids_llm_encode.patterns.consensus import DEFAULT_MIN_STABILITY, learn_consensus_dictionary

    t = time.perf_counter()
    X, rate = demo_responses(name)
    print(f"(c) {name} on the demo story: {X.shape[0]} frames x {X.shape[1]} ANs "
          f"({time.perf_counter() - t:.1f} s)", flush=True)
    alpha = alpha_from_sparsity(X, sparsity)
    singles, secs = [], []
    for seed in (0, 1):
        t = time.perf_counter()
        singles.append(learn_dictionary(X, 64, alpha, init="random", seed=seed, progress=False))
        secs.append(time.perf_counter() - t)
    svd = learn_dictionary(X, 64, alpha, progress=False)
    r1, j1 = _matched(*singles)
    cons = [learn_consensus_dictionary(X, 64, alpha, restarts=restarts, seed=seed, progress=False)
            for seed in (0, 1)]
    rR, jR = _matched(*cons)
    c = cons[0].info["consensus"]
    st = np.asarray(c["stability"], dtype=float)
    out = {"model": name, "stability_r1": float(np.median(r1)), "jaccard_r1": float(np.nanmedian(j1)),
           "stability": float(np.median(rR)), "jaccard": float(np.nanmedian(jR)),
           "atoms_09": float(np.mean(rR >= 0.9)), "atoms_09_r1": float(np.mean(r1 >= 0.9)),
           "single_seconds": float(np.mean(secs)), "restart_seconds": float(np.sum(c["restart_seconds"])),
           "consensus_seconds": float(np.mean([d.info["seconds"] for d in cons])),
           "atom_stability": float(np.median(st)), "linkable": int((st >= DEFAULT_MIN_STABILITY).sum()),
           "objective_r1": singles[0].objective, "objective": cons[0].objective, "objective_svd": svd.objective,
           "r2": cons[0].r2, "r2_svd": svd.r2,
           "wordrate_r_svd": _wordrate_r(svd, rate), "wordrate_r": _wordrate_r(cons[0], rate)}
    print(f"{'':4s} {'R':>3s} {'median |r|':>10s} {'>= 0.9':>7s} {'Jaccard':>8s} {'s per dictionary':>16s} "
          f"{'objective':>11s} {'R^2':>6s} {'max |r| word rate':>17s}")
    print(f"{'':4s} {1:3d} {out['stability_r1']:10.3f} {out['atoms_09_r1']:7.2f} {out['jaccard_r1']:8.3f} "
          f"{out['single_seconds']:16.1f} {out['objective_r1']:11.6g} {singles[0].r2:6.3f} "
          f"{_wordrate_r(singles[0], rate):17.3f}")
    print(f"{'':4s} {restarts:3d} {out['stability']:10.3f} {out['atoms_09']:7.2f} {out['jaccard']:8.3f} "
          f"{out['consensus_seconds']:16.1f} {out['objective']:11.6g} {out['r2']:6.3f} {out['wordrate_r']:17.3f}"
          f"  (restarts {out['restart_seconds']:.1f} s; per-atom stability median {out['atom_stability']:.3f}, "
          f"{out['linkable']} of 64 >= {DEFAULT_MIN_STABILITY}; SVD fit: objective {svd.objective:.6g}, "
          f"max |r| word rate {out['wordrate_r_svd']:.3f})", flush=True)
    return out


def time_consensus(X: np.ndarray, restarts: int, sparsity: float, label: str) -> dict:
    """The dictionary stage with restarts on X: seconds in all and of the restarts."""
    from bids_llm_encode.patterns.consensus import learn_consensus_dictionary

    t = time.perf_counter()
    d = learn_consensus_dictionary(X, 64, sparsity=sparsity, restarts=restarts, progress=True)
    seconds = time.perf_counter() - t
    c = d.info["consensus"]
    st = np.asarray(c["stability"], dtype=float)
    print(f"{label:10s} {f'ours, {restarts} restarts':28s} {seconds:9.1f} {d.objective:14.6g} {d.r2:7.4f} "
          f"{peak_mb():9.0f}  (restarts {np.sum(c['restart_seconds']):.1f} s, "
          f"{np.mean(c['restart_n_iter']):.1f} alternations each; reference {c['reference_seconds']:.1f} s, "
          f"refit {c['refine_seconds']:.1f} s / {c['refine_n_iter']} alternations; "
          f"stability median {np.median(st):.3f})", flush=True)
    return {"restart_seconds": float(np.sum(c["restart_seconds"])), "consensus_seconds": seconds}


def calibrate(use_smollm2: bool) -> None:
    """R^2 and density of the dictionary against the relative sparsity (K=64)."""
    for name in ["minilm-l6"] + (["smollm2-135m"] if use_smollm2 else []):
        t = time.perf_counter()
        X, layer = model_responses(name)
        print(f"{name}: X {X.shape[0]} frames x {X.shape[1]} ANs ({time.perf_counter() - t:.1f} s)")
        print(f"{'sparsity':>9s} {'alpha':>8s} {'R^2':>7s} {'density':>8s} {'mean size':>9s} {'iters':>5s} {'s':>6s}")
        for s in (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4):
            d = learn_dictionary(X, 64, sparsity=s, progress=False)
            print(f"{s:9.2f} {d.alpha:8.3f} {d.r2:7.4f} {d.info['density']:8.4f} "
                  f"{d.loadings.nnz / 64:9.1f} {d.info['n_iter']:5d} {d.info['seconds']:6.1f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="finish within a minute (smaller (b))")
    ap.add_argument("--calibrate", action="store_true", help="R^2 against sparsity on real models")
    ap.add_argument("--smollm2", action="store_true", help="with --calibrate: also SmolLM2-135M")
    ap.add_argument("--sparsity", type=float, default=None)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="a: (a) vs sklearn, b: (b) vs sklearn, t: (b) with restarts, c: stability (c)")
    ap.add_argument("--models", default=None, help="with c: comma-separated models "
                    "(default minilm-l6,smollm2-135m; minilm-l6 with --quick)")
    ap.add_argument("--restarts", type=int, default=None,
                    help="restarts of the consensus (default: the app's; 4 with --quick)")
    args = ap.parse_args(argv)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.calibrate:
        calibrate(args.smollm2)
        return
    from bids_llm_encode.patterns.consensus import DEFAULT_RESTARTS
    from bids_llm_encode.patterns.dictionary import DEFAULT_SPARSITY

    sparsity = DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
    restarts = args.restarts or (4 if args.quick else DEFAULT_RESTARTS)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        ap.error(f"--parts: choose among {','.join(PARTS)}")
    nan = float("nan")
    speedup = ratio = nan
    timing = {"restart_seconds": nan, "consensus_seconds": nan}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sparsity {sparsity}, K=64, "
          f"{restarts} restarts")
    print(f"{'case':10s} {'method':28s} {'seconds':>9s} {'objective':>14s} {'R^2':>7s} {'peak MB':>9s}")
    if "a" in parts:
        t = time.perf_counter()
        X, _ = model_responses("minilm-l6")
        print(f"(a) minilm-l6 responses: {X.shape[0]} frames x {X.shape[1]} ANs, {time.perf_counter() - t:.1f} s")
        compare(X, 64, sparsity, 5 if args.quick else 20, "(a)")
    if parts & {"b", "t"}:
        if args.quick:
            n_neurons, n_frames, frac, ep = 16384, 400, 0.25, 5
        else:
            n_neurons, n_frames, frac, ep = 131072, 1000, 1 / 16, 5
        t = time.perf_counter()
        Xb = synthetic(n_neurons, n_frames)
        print(f"(b) synthetic: {n_frames} frames x {n_neurons} ANs, built in {time.perf_counter() - t:.1f} s")
        if "b" in parts:
            speedup, ratio = compare(Xb, 64, sparsity, ep, "(b)", sk_fraction=frac)
        if "t" in parts:  # --quick: on a quarter of the neurons, to stay within a minute
            timing = time_consensus(Xb[:, :4096] if args.quick else Xb, restarts, sparsity, "(b)")
        del Xb
    s = {"stability": nan, "stability_r1": nan}
    if "c" in parts:
        models = [m for m in args.models.split(",") if m] if args.models else (
            ["minilm-l6"] if args.quick else ["minilm-l6", "smollm2-135m"])
        stab = {name: stability(name, restarts, sparsity) for name in models}
        s = stab.get("smollm2-135m", stab[models[0]])
    print(f"speedup={speedup:.2f} objective_ratio={ratio:.4f} stability={s['stability']:.3f} "
          f"stability_r1={s['stability_r1']:.3f} restarts={restarts} "
          f"restart_seconds={timing['restart_seconds']:.1f} consensus_seconds={timing['consensus_seconds']:.1f}")

if __name__ == "__main__":
    main()

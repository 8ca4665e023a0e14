"""Peak memory of a long story's dictionary stage (issue 13's "Done when": <= 16 GB for 50,000 words).

A synthetic story of ``--words`` words (default 50,000) spoken at the demo's
rate (about 2.5 words/s: inter-onset intervals drawn from a gamma of mean
0.4 s, each word lasting 80 % of its interval) goes through the app's own
path, ``workflows.stimulus.story_dictionary`` at the app's defaults
(smollm2-135m, mlp-out: 17,280 ANs, K = 64, atom TR 1.5 s, the consensus of
``--restarts`` 24 fits): word activations, the neurons' frame series on the
reference grid (story + 20 s, 13,356 frames for 50,000 words), dictionary
learning. Nothing else of the app runs.

Activations: ``--activations random`` (default) gives standard-normal float32
activations of the embedded model's shape (words x 17,280), because extracting
them is slow on a small machine (measured on the 2-core development machine
under load: 44 s for 5,000 words, so about 7 min for 50,000) and the learning
on real responses longer still (160 s for 5,000 words); the memory of the
frame series and of the learning depends on the shapes only (the same buffers
every alternation), not on the values. ``--activations model`` extracts them
with the embedded model (the words come from ``benchmarks/neurons.py``'s
generated text) and runs everything on them; ``--only-activations`` stops after
the extraction, to measure its own peak (model, float32 values, the cache's
float16 copy).

Measured: the process's resident memory, sampled every 20 ms by a thread
(``/proc/self/statm``) and per stage (activations, frame series, learning), and
its peak (``resource.getrusage``). Printed next to it: the estimate
``--mem-mb`` is checked against (``patterns.consensus.consensus_memory_bytes``
with the run's restarts; ``patterns.dictionary.dictionary_memory_bytes`` where
there is no consensus) and the learning's measured need (peak while building the
frame series and learning, over the level before). Then the refusal path: the
same story with ``--mem-mb`` at half the estimate must stop with exit 64 and
the documented message before learning (``learn_dictionary`` is never called).

The cache is a fresh temporary folder (the model is read from
``--model-cache``, default the app's cache, as a read-only prebuilt root), so
every stage is computed.

Usage: python benchmarks/memory.py [--quick] [--words N] [--restarts R] [--activations random|model]
[--only-activations]
The last line is ``peak_mb=<m> estimate_mb=<e> learn_mb=<l> seconds=<s> refused=<0|1> words=<n> frames=<t>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bids_llm_encode.cache import Cache, default_cache_dir, digest  # noqa: E402
from bids_llm_encode.config import Config  # noqa: E402
from bids_llm_encode.errors import UsageError  # noqa: E402
from bids_llm_encode.patterns import dictionary as dl  # noqa: E402
from bids_llm_encode.records import Story, WordActivations  # noqa: E402
from bids_llm_encode.workflows import stimulus  # noqa: E402

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
#: smollm2-135m at mlp-out: 30 layers x 576.
N_LAYERS, WIDTH = 30, 576


class Sampler(threading.Thread):
    """RSS every ``period`` s; the highest value seen in each stage."""

    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        self.period, self.stage, self.peaks, self.start_rss = period, "setup", {}, {}
        self._done = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    def enter(self, stage: str) -> None:
        self.sample()
        self.stage = stage
        self.start_rss[stage] = self.rss()
        self.sample()

    def sample(self) -> None:
        r = self.rss()
        if r > self.peaks.get(self.stage, 0):
            self.peaks[self.stage] = r

    def run(self) -> None:
        while not self._done.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def synthetic_story(n_words: int, seed: int, folder: Path) -> Story:
    from neurons import generate_text

    rng = np.random.default_rng(seed)
    words = generate_text(n_words, seed)
    gaps = rng.gamma(4.0, 0.1, n_words)  # mean 0.4 s: 2.5 words/s
    starts = 0.5 + np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    src = folder / "align.csv"
    src.write_text("synthetic\n")
    return Story(name="synthetic", words=tuple(words), starts=starts, ends=starts + 0.8 * gaps,
                 aligned=np.ones(n_words, bool), source=src)


def random_activations(n_words: int, seed: int) -> WordActivations:
    rng = np.random.default_rng(seed)
    values = np.empty((n_words, N_LAYERS * WIDTH), np.float32)
    for r0 in range(0, n_words, 4096):
        values[r0:r0 + 4096] = rng.standard_normal((min(4096, n_words - r0), values.shape[1]), np.float32)
    return WordActivations(values=values, layer=np.repeat(np.arange(N_LAYERS), WIDTH),
                           unit=np.tile(np.arange(WIDTH), N_LAYERS),
                           card={"identity": "random", "cache_key": digest("random", n_words, seed)})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 words: within a minute")
    ap.add_argument("--words", type=int, default=None, help="story length (default 50,000; 5,000 with --quick)")
    ap.add_argument("--activations", choices=("model", "random"), default="random")
    ap.add_argument("--only-activations", action="store_true",
                    help="stop after the activations (with --activations model: the extraction's peak)")
    ap.add_argument("--model-cache", type=Path, default=None,
                    help="where the prepared model is (default: the app's cache folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restarts", type=int, default=None,
                    help="the consensus's fits (default: the app's; --quick: 2, to stay within a minute)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    n_words = args.words or (5000 if args.quick else 50000)
    model_cache = args.model_cache or default_cache_dir()
    os.environ["BIDS_LLM_ENCODE_PREBUILT"] = ":".join(
        p for p in (str(model_cache), os.environ.get("BIDS_LLM_ENCODE_PREBUILT")) if p)

    sampler = Sampler()
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix="ble-memory-"))
    rows = []
    try:
        story = synthetic_story(n_words, args.seed, work)
        cfg = Config(bids_dir=work, output_dir=work / "out", analysis_level="participant",
                     cache_dir=work / "cache", device="cpu")
        restarts = args.restarts or (2 if args.quick else getattr(cfg, "restarts", 1))
        if hasattr(cfg, "restarts"):
            cfg = replace(cfg, restarts=restarts)
        cache = Cache(work / "cache")
        T = len(stimulus.reference_frame_times(story, cfg.atom_tr))

        t0 = time.perf_counter()
        sampler.enter("activations")
        if args.activations == "model":
            acts = stimulus.story_activations(story, cfg, cache)
        else:
            acts = random_activations(n_words, args.seed)
        t_acts = time.perf_counter() - t0
        N = acts.values.shape[1]
        estimate = _estimate(T, N, cfg)
        rows.append(("activations", f"{args.activations} ({n_words:,} words x {N:,} ANs)", t_acts))
        if args.only_activations:
            sampler.stop()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(f"activations ({args.activations}): {n_words:,} words x {N:,} ANs in {t_acts:.1f} s, "
                  f"peak RSS {sampler.peaks['activations'] / MB:.0f} MB")
            print(f"peak_mb={peak / MB:.0f} estimate_mb={estimate / MB:.0f} seconds={t_acts:.1f} "
                  f"words={n_words} frames={T}")
            return

        real_neurons, real_fit = stimulus.neuron_series, dl.learn_dictionary
        learned, framed, fits = [], [], []

        def neurons_staged(*a, **k):
            framed.append(1)
            sampler.enter("frame series")
            t = time.perf_counter()
            out = real_neurons(*a, **k)
            rows.append(("frame series", f"X {out.shape[0]:,} frames x {out.shape[1]:,} ANs, float32",
                         time.perf_counter() - t))
            return out

        def fit_counted(*a, **k):  # every fit of the consensus (or the single fit)
            direct = not learned  # learn_dictionary called by story_dictionary itself (no consensus)
            if direct:
                learned.append(1)
                sampler.enter("learning")
            t = time.perf_counter()
            out = real_fit(*a, **k)
            fits.append(out.info["n_iter"])
            if direct:
                rows.append(("learning", f"K={cfg.n_atoms}, one fit, {fits[-1]} alternations, R^2 {out.r2:.3f}",
                             time.perf_counter() - t))
            return out

        def learning_staged(real):
            def staged(*a, **k):
                learned.append(1)
                sampler.enter("learning")
                t = time.perf_counter()
                out = real(*a, **k)
                rows.append(("learning", f"K={cfg.n_atoms}, {len(fits)} fit(s) ({restarts} restart(s)), "
                             f"alternations {fits}, R^2 {out.r2:.3f}", time.perf_counter() - t))
                return out
            return staged

        stimulus.story_activations = lambda *a, **k: acts  # already computed (and cached) above
        stimulus.neuron_series, dl.learn_dictionary = neurons_staged, fit_counted
        patched = _patch_consensus(learning_staged)
        try:
            # the refusal: --mem-mb below the estimate stops before the frame series and the learning
            small = max(1, int(estimate / MB / 2))
            t = time.perf_counter()
            try:
                stimulus.story_dictionary(story, replace(cfg, mem_mb=small), cache)
                refused, message, code = 0, "not refused", 0
            except UsageError as exc:  # refused before X is built or anything learned
                refused, message, code = int(not learned and not framed), str(exc), exc.exit_code
            rows.append((f"refusal, --mem-mb {small}", f"exit {code}: {message}", time.perf_counter() - t))

            base = sampler.rss()
            t = time.perf_counter()
            _, d = stimulus.story_dictionary(story, cfg, cache)
            t_dict = time.perf_counter() - t
        finally:
            stimulus.neuron_series, dl.learn_dictionary = real_neurons, real_fit
            if patched is not None:
                patched[0].learn_consensus_dictionary = patched[1]
        sampler.enter("after")
    finally:
        sampler.stop()
        shutil.rmtree(work, ignore_errors=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    learn_need = max(sampler.peaks.get("frame series", 0), sampler.peaks.get("learning", 0)) - base
    seconds = t_acts + t_dict
    print(f"story: {n_words:,} words, {T:,} frames of {cfg.atom_tr} s, {N:,} ANs, K={cfg.n_atoms}, "
          f"{restarts} restart(s); activations: {args.activations}")
    print(f"{'stage':<24} | {'s':>7} | {'RSS at start MB':>15} | {'peak RSS MB':>11} | what")
    for stage, what, secs in rows:
        key = stage if stage in sampler.peaks else None
        start = sampler.start_rss.get(key, float("nan")) / MB if key else float("nan")
        top = sampler.peaks.get(key, float("nan")) / MB if key else float("nan")
        print(f"{stage:<24} | {secs:>7.1f} | {start:>15.0f} | {top:>11.0f} | {what}")
    print(f"estimate (what --mem-mb is checked against): {estimate / MB:.0f} MB; measured need of frame series + "
          f"learning: {learn_need / MB:.0f} MB; process peak: {peak / MB:.0f} MB "
          f"({'within' if peak <= 16 * 2**30 else 'over'} 16 GB)")
    print(f"peak_mb={peak / MB:.0f} estimate_mb={estimate / MB:.0f} learn_mb={learn_need / MB:.0f} "
          f"seconds={seconds:.1f} refused={refused} words={n_words} frames={T} restarts={restarts}")


def _estimate(T: int, N: int, cfg: Config) -> int:
    """What story_dictionary checks --mem-mb against: the consensus's estimate, or the single fit's."""
    try:
        from bids_llm_encode.patterns.consensus import consensus_memory_bytes
    except ImportError:
        return dl.dictionary_memory_bytes(T, N, cfg.n_atoms)
    return consensus_memory_bytes(T, N, cfg.n_atoms, cfg.restarts)


def _patch_consensus(wrap):
    """Wrap the consensus learner as the "learning" stage; (module, original) to restore, or None."""
    try:
        from bids_llm_encode.patterns import consensus
    except ImportError:
        return None
    real = consensus.learn_consensus_dictionary
    consensus.learn_consensus_dictionary = wrap(real)
    return consensus, real


if __name__ == "__main__":
    main()

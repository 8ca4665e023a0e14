"""The BIDS-App command line: ``bids_llm_encode bids_dir output_dir {participant,group} [options]``.

Parses arguments (and ``--config-file``) into one :class:`~bids_llm_encode.config.Config`,
runs the workflow of the requested level, and turns every
:class:`~bids_llm_encode.errors.BidsAppError` into its documented exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .config import Config, config_field_names, load_config_file
from .errors import EXIT_FAILURE, EXIT_OK, BidsAppError, UnknownLevelError, UsageError

log = logging.getLogger("bids_llm_encode")

LEVELS = ("participant", "group")


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 64) instead of exiting with 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")


def _both(name: str) -> list[str]:
    """``--participant-label`` and ``--participant_label``: the spellings BIDS-Apps users type."""
    dash = "--" + name.replace("_", "-")
    under = "--" + name.replace("-", "_")
    return [dash] if dash == under else [dash, under]


def build_parser() -> argparse.ArgumentParser:
    d = Config.__dataclass_fields__  # defaults live in one place: Config
    p = Parser(
        prog="bids_llm_encode",
        description="Couple sub-groups of a language model's neurons with functional brain "
        "networks of people who listened to the same stories (BIDS-App).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (read only)")
    p.add_argument("output_dir", type=Path, help="where derivatives and reports are written")
    p.add_argument("analysis_level", help="participant or group")
    p.add_argument("--version", action="version", version=f"bids_llm_encode {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=None,
                   help="more log output: INFO by default, -v for DEBUG")
    p.add_argument("--config-file", "--config_file", type=Path, default=None,
                   help="JSON or TOML file of option values; the command line wins")

    g = p.add_argument_group("selecting data")
    g.add_argument(*_both("participant_label"), nargs="+", default=None, metavar="LABEL",
                   help="participants (sub- prefix optional), or a file with one label per line")
    g.add_argument(*_both("session_label"), nargs="+", default=None, metavar="LABEL")
    g.add_argument("-t", *_both("task_label"), "--task-id", nargs="+", default=None, metavar="LABEL",
                   dest="task_label")
    g.add_argument(*_both("bids_filter_file"), type=Path, default=None,
                   help="JSON of PyBIDS filters, as fMRIPrep's (the 'bold' entry is used)")
    g.add_argument(*_both("bids_database_dir"), type=Path, default=None, metavar="DIR",
                   help="PyBIDS index of bids_dir and the derivatives: built once (the first process), "
                   "reused by every later one; delete it after changing the dataset")
    g.add_argument("-d", "--derivatives", type=Path, default=None,
                   help="fMRIPrep outputs (default: bids_dir/derivatives/fmriprep)")
    g.add_argument("--space", default=None, help=f"template space of the inputs (default {d['space'].default})")
    g.add_argument(*_both("skip_bids_validation"), action="store_true", default=None)

    r = p.add_argument_group("resources")
    r.add_argument("-w", "--work-dir", "--work_dir", type=Path, default=None)
    r.add_argument("--cache-dir", "--cache_dir", type=Path, default=None,
                   help="cache of models and per-story results, shared by participants "
                   "(default $BIDS_LLM_ENCODE_CACHE or ~/.cache/bids_llm_encode)")
    r.add_argument("--nprocs", "--n-cpus", "--n_cpus", "--nthreads", type=int, default=None, dest="nprocs")
    r.add_argument("--mem-mb", "--mem_mb", type=int, default=None, dest="mem_mb")

    m = p.add_argument_group("language model")
    m.add_argument("--model", default=None,
                   help="built-in name (smollm2-135m, minilm-l6, gemma3-270m), a local folder "
                   "(safetensors), a .gguf file, or a hub id (online only)")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    m.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    m.add_argument("--layers", type=int, nargs="+", default=None, help="0-based layers (default all)")
    m.add_argument("--neurons", choices=["mlp-out", "mlp-hidden", "residual"], default=None)
    m.add_argument("--context-tokens", type=int, default=None)
    m.add_argument("--window-tokens", type=int, default=None)
    m.add_argument("--word-pooling", choices=["last", "mean"], default=None)
    m.add_argument("--hrf", choices=["spm", "glover"], default=None)
    m.add_argument("--an-centering", choices=["mean", "none"], default=None,
                   help="remove each neuron's mean over the story's words before the HRF (mean, default), "
                        "so that the word-rate carrier is left to the word-rate baseline; none keeps it")

    a = p.add_argument_group("patterns")
    a.add_argument("--n-atoms", type=int, default=None)
    a.add_argument("--sparsity", type=float, default=None)
    a.add_argument("--subgroup", default=None, help="nonzero, or top-Q (a fraction or a count)")
    a.add_argument("--atom-tr", type=float, default=None)
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--restarts", type=int, default=None,
                   help="dictionary fits from random starts (on halves of the neurons) whose consensus "
                   f"is the dictionary (default {d['restarts'].default}); 1 = one SVD-started fit, no stability")
    a.add_argument("--min-stability", type=float, default=None,
                   help="atoms whose stability (median |r| of the restarts with the consensus) is lower "
                   f"are kept but not linked to networks (default {d['min_stability'].default})")

    a.add_argument("--dictionary-scope", choices=["model", "story"], default=None,
                   help="model (default): one dictionary per model and settings, learned once on all "
                   "stories of the dataset that have word timing, shared by every participant and "
                   "story; story: one dictionary per story (atom k of two stories unrelated)")
    a.add_argument("--dictionary-tasks", nargs="+", default=None, metavar="LABEL",
                   help="model scope: learn the dictionary on the stories of these tasks only (default: "
                   "every task); --participant-label, --session-label and --task-label never change it")

    e = p.add_argument_group("encoding")
    e.add_argument("--confounds-strategy", default=None)
    e.add_argument("--scrub", action="store_true", default=None)
    e.add_argument("--cv-folds", type=int, default=None)
    e.add_argument("--n-permutations", type=int, default=None)
    e.add_argument("--fdr-alpha", type=float, default=None)
    e.add_argument("--atom-model", choices=["marginal", "joint"], default=None,
                   help="atom maps: each atom alone (marginal, default) or all atoms in one model (joint)")
    e.add_argument("--baselines", nargs="+", default=None, metavar="NAME",
                   help="low-level baseline regressors: auto (default: word_rate always, phoneme_rate "
                   "when the alignment has phones, envelope when the story's WAV exists), none, or "
                   "names from word_rate phoneme_rate envelope")
    e.add_argument("--baseline-regressors", "--baseline_regressors", type=Path, default=None,
                   metavar="DIR", help="folder of <story>.tsv user baseline regressors (onset, "
                   "optional duration, numeric value columns; docs/usage.md)")

    n = p.add_argument_group("networks")
    n.add_argument("--fbn-atlas", nargs="+", default=None,
                   help="CA12, Yeo7, Yeo17, tpl:Schaefer2018:400Parcels7Networks, or a NIfTI path")
    n.add_argument("--map-threshold", type=float, default=None)
    n.add_argument("--map-rule", choices=["winner", "all"], default=None,
                   help="winner (default): a voxel counts for the atom with the largest |z| there only")
    n.add_argument("--n-spatial-null", type=int, default=None,
                   help="volume nulls: circular shifts per map (default: every valid shift)")
    n.add_argument("--fbn-null", choices=["auto", "spin", "volume", "shift"], default=None,
                   help="spatial null of the map -> network tests: auto (default: spin test on the fsLR "
                   "sphere for CA12/Yeo7/Yeo17, grey-matter-restricted shifts for volume atlases), "
                   "spin, volume, or shift (the first version's whole-mask shifts)")
    n.add_argument("--n-spins", type=int, default=None, help="rotations of the spin test (default 1000)")
    n.add_argument("--min-dice", type=float, default=None,
                   help="a link's minimum Dice overlap beside its FDR significance (default 0.1)")
    n.add_argument("--n-consistency-null", type=int, default=None,
                   help="random atom sets behind each network's consistency chance level (default 1000)")

    gr = p.add_argument_group("group level")
    gr.add_argument("--group-model", choices=["random", "fixed"], default=None,
                    help="group atom maps: random = one-sample test over participants (nilearn "
                    "SecondLevelModel; needs enough participants), fixed = Stouffer's z of the "
                    "participants' z maps (inference about these participants only)")
    gr.add_argument("--compare", type=Path, nargs="+", default=None,
                    help="other output folders (made with other models) to compare side by side")
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """argv -> Config: defaults < --config-file < command line."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config_file is not None:
        if not args.config_file.is_file():
            raise UsageError(f"--config-file {args.config_file}: no such file")
        try:
            from_file = load_config_file(args.config_file)
        except Exception as exc:  # noqa: BLE001 - any parse error is a usage error here
            raise UsageError(f"--config-file {args.config_file}: cannot read it ({exc})") from exc
        unknown = set(from_file) - config_field_names() - {"analysis_level", "bids_dir", "output_dir"}
        if unknown:
            raise UsageError(f"--config-file {args.config_file}: unknown options {sorted(unknown)}")
        values.update({k: v for k, v in from_file.items()
                       if k not in ("bids_dir", "output_dir", "analysis_level")})
    values.update({k: v for k, v in vars(args).items() if v is not None})
    for key in Config.PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = Path(values[key]).absolute()
    if "compare" in values:
        values["compare"] = [Path(p).absolute() for p in values["compare"]]
    if values["analysis_level"] not in LEVELS:
        raise UnknownLevelError(
            f"unknown analysis level {values['analysis_level']!r}: choose one of {', '.join(LEVELS)}")
    cfg = Config(**{k: v for k, v in values.items() if k in config_field_names()})
    return cfg


def setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * (verbose + 1)  # default INFO, -v DEBUG
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "bids", "h5py", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_thread_limits = None  # the threadpoolctl limiter, kept for the process lifetime


def set_resources(nprocs: Optional[int], mem_mb: Optional[int]) -> dict:
    """Apply ``--nprocs`` to every thread pool of the process and log what was set (and ``--mem-mb``).

    The BLAS and OpenMP runtimes of numpy, scipy and torch are loaded first, then limited through
    threadpoolctl (which also raises a pool above the value of an ``*_NUM_THREADS`` variable read at
    import), torch's intra-op pool through ``torch.set_num_threads``, and the variables are set for
    libraries loaded later. Returns ``{"torch": n, "<library>": n, ...}`` as logged.
    """
    global _thread_limits
    import numpy  # noqa: F401 - loads its BLAS
    import scipy.linalg  # noqa: F401 - loads scipy's BLAS
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    if nprocs:
        for var in THREAD_VARIABLES:
            os.environ[var] = str(nprocs)
        torch.set_num_threads(nprocs)
        _thread_limits = threadpool_limits(limits=nprocs)
    pools = {"torch": torch.get_num_threads()}
    for pool in threadpool_info():
        name = f"{pool['internal_api']} ({Path(pool['filepath']).name})"
        pools[name] = pool["num_threads"]
    log.info("threads (%s): %s", f"--nprocs {nprocs}" if nprocs else "library defaults, no --nprocs",
             ", ".join(f"{k} {v}" for k, v in pools.items()))
    if mem_mb:
        log.info("memory: --mem-mb %d sizes the encoding's voxel batches; it is not a hard limit "
                 "(the model, the neuron matrix and the dictionary are not bounded by it)", mem_mb)
    return pools


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console script; returns (and exits with) the exit code."""
    code = run(argv)
    sys.exit(code)


def run(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv).validate()  # every option checked before any data is read
    except BidsAppError as exc:
        print(f"bids_llm_encode: error: {exc}", file=sys.stderr)
        return exc.exit_code
    setup_logging(cfg.verbose)
    set_resources(cfg.nprocs, cfg.mem_mb)
    try:
        if cfg.analysis_level == "participant":
            from .workflows.participant import run_participant_level

            run_participant_level(cfg)
        else:
            from .workflows.group import run_group_level

            run_group_level(cfg)
    except BidsAppError as exc:  # one line on stderr, the same before and after logging is set up
        print(f"bids_llm_encode: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()

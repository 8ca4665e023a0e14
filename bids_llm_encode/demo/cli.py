"""``bids_llm_encode-demo``: the command line of the demo datasets (``generate`` and ``narratives``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UsageError
from . import generate, narratives

LAYOUTS = ("single", "narratives")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import Parser

    p = Parser(
        prog="bids_llm_encode-demo",
        description="Write a small synthetic naturalistic-listening BIDS dataset (raw + fMRIPrep-style "
                    "derivatives + Gentle alignment) with a known ground truth in code/demo_truth.json.")
    p.add_argument("out_dir", type=Path, help="folder to create (must be new or empty)")
    p.add_argument("--plant", choices=["model-atoms", "word-features"], default="model-atoms",
                   help="what drives the BOLD: atoms of the embedded language model (default) or "
                        "word features of the story (fast, needs no model)")
    p.add_argument("--layout", choices=LAYOUTS, default="single",
                   help="single (default): one story, every participant; narratives: three stories, a run "
                        "holding two, 8 participants with different stories, a session pair, multi-echo "
                        "and a 4D mask (Narratives' shapes)")
    p.add_argument("--participants", type=int, default=None,
                   help="number of participants (>= 2; default 3; single layout only)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache for the model work (model-atoms)")
    p.add_argument("--model", default=None, help="model-atoms: language model (default: the pipeline's default)")
    p.add_argument("--n-atoms", type=int, default=None, help="model-atoms: dictionary size K")
    p.add_argument("--sparsity", type=float, default=None, help="model-atoms: dictionary sparsity (lambda)")
    p.add_argument("--cifti", action="store_true",
                   help="also write fMRIPrep's CIFTI BOLD (space-fsLR_den-91k_bold.dtseries.nii) of every run, "
                        "from the same truth (for --space fsLR; single layout only)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    def make(args):
        options = {k: v for k, v in (("model", args.model), ("n_atoms", args.n_atoms),
                                     ("sparsity", args.sparsity)) if v is not None}
        common = dict(plant=args.plant, seed=args.seed, cache_dir=args.cache_dir, overwrite=args.overwrite,
                      model_options=options)
        if args.layout == "narratives":
            if args.participants is not None or args.cifti:
                raise UsageError("--layout narratives has its own 8 participants and no CIFTI twin; "
                                 "drop --participants and --cifti")
            return narratives.generate_demo(args.out_dir, **common)
        return generate.generate_demo(args.out_dir, n_subjects=3 if args.participants is None else args.participants,
                                      cifti=args.cifti, **common)

    return generate.dataset_main("bids_llm_encode-demo", build_parser(), make, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

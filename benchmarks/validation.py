"""Validation: null calibration and truth recovery on data the pipeline did not make.

Writes a dataset with ``bids_llm_encode-simulate`` (null participants:
smooth, AR(1) + 1/f noise and no signal; planted participants: known neuron
groups and word rate, HRF-convolved by nilearn, in known partial maps grown
from Yeo 17 networks), then runs the app's own participant stage on each
participant (``workflows.participant.Participant.process_story``: the maps,
p-values and links exactly as the app writes them), and compares with the
truth file.

    python benchmarks/validation.py            # 10 null + 4 planted, 4 mm, app defaults
    python benchmarks/validation.py --quick    # 2 null + 1 planted at 6 mm, 40 shifts (< 1 min, warm cache)

Planted participants (and every second null one) hear the story twice:
leave-one-run-out CV and the noise ceiling are checked too (for a planted
voxel the ceiling should be close to the true r of its plant).

Calibration (null participants): atom z false-positive rate at |z| > 3.1 and at
|z| > 1.96 beside their nominal two-sided rates, CV p < 0.05, FDR calls,
spatial-overlap p < 0.05 per atlas, participants with any link per atlas, and
in-sample R^2 beside its chance level.

Recovery (planted participants): atom -> network links against the truth
networks (precision, recall; rule below), the best-matching atom's AN
sub-group against each planted neuron group (precision, recall), and the
sensitivity of the CV test in planted voxels against an oracle (the true
latent signals fitted with the same CV and null).

The scoring (and the rule by which a link is true) is in
``bids_llm_encode/demo/validation.py``.

Last line: ``atom_z_fp_ratio=... cv_p05_rate=... null_link_participants=...
link_precision=... link_recall=... sensitivity_ratio=... unique_p05_rate=... wordrate_unique_share=...
subgroup_precision=... subgroup_recall=...`` (atom_z_fp_ratio:
observed / nominal rate at |z| > 3.1, pooled over null participants).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_llm_encode.config import Config  # noqa: E402
from bids_llm_encode.demo.simulate import simulate_dataset  # noqa: E402
from bids_llm_encode.demo.validation import Z_NOMINAL, evaluate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--null", type=int, default=None)
    ap.add_argument("--planted", type=int, default=None)
    ap.add_argument("--voxel-mm", type=float, default=None)
    ap.add_argument("--permutations", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the dataset and outputs here (kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n_null = args.null if args.null is not None else (2 if args.quick else 10)
    n_planted = args.planted if args.planted is not None else (1 if args.quick else 4)
    voxel_mm = args.voxel_mm or (6.0 if args.quick else 4.0)
    n_perm = args.permutations or (40 if args.quick else Config.n_permutations)
    t0 = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bids_llm_encode_validation."))
    simulate_dataset(work / "data", n_null=n_null, n_planted=n_planted, seed=args.seed, voxel_mm=voxel_mm,
                     overwrite=True)
    t_sim = time.perf_counter() - t0
    ev = evaluate(work / "data", work / "out", n_permutations=n_perm, seed=args.seed)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 40)
    atlases = ev["atlases"]
    print(f"validation: {n_null} null + {n_planted} planted participants, {voxel_mm:g} mm grid, "
          f"{n_perm} circular shifts, atlases {', '.join(atlases)}; simulation {t_sim:.0f} s, "
          f"participant stage {np.mean(ev['seconds']):.1f} s each, total {total:.0f} s")
    null_df, plant_df = ev["null"], ev["planted"]
    if len(null_df):
        zc = ev["z_counts"]
        table = [("atom |z| > 3.1", zc[3.1][0] / zc[3.1][1], Z_NOMINAL[3.1]),
                 ("atom |z| > 1.96 (p < 0.05)", zc[1.96][0] / zc[1.96][1], Z_NOMINAL[1.96]),
                 ("CV p < 0.05", null_df["cv_p05"].mean(), 0.05),
                 ("unique (beyond baselines) p < 0.05", null_df["unique_p05"].mean(), 0.05),
                 ("participants with a unique FDR call", float((null_df["unique_fdr_calls"] > 0).mean()), 0.05),
                 ("participants with an FDR call", float((null_df["fdr_calls"] > 0).mean()), 0.05)]
        for a in atlases:
            table.append((f"{a}: overlap p < 0.05", float(np.nanmean(null_df[f"{a}_p05"])), 0.05))
            table.append((f"{a}: participants with a link", float((null_df[f"{a}_links"] > 0).mean()), 0.05))
        print("\nCalibration on null participants (observed rate beside nominal)")
        print(f"{'statistic':<36}{'observed':>10}{'nominal':>10}")
        for name, obs, nom in table:
            print(f"{name:<36}{obs:>10.4f}{nom:>10.4f}")
        print(f"in-sample R^2 (median) {null_df['r2_insample'].median():.3f}, its chance level "
              f"{null_df['r2_chance'].median():.3f}")
        print(null_df.round(4).to_string(index=False))
    if len(plant_df):
        print("\nRecovery on planted participants")
        for a in atlases:
            n_true, n_links = ev["links"][a]
            rec, pairs = ev["recalled"][a]
            print(f"{a}: links {n_links}, true {n_true}, precision {n_true / max(n_links, 1):.3f}, "
                  f"recall {len(rec) / max(len(pairs), 1):.3f} ({len(rec)} of {len(pairs)} plant-network pairs)")
        print(plant_df.round(3).to_string(index=False))
        if len(ev["subgroups"]):
            print("\nAN sub-groups vs planted neuron groups: the atom that follows the plant's time course, "
                  "and the sub-group with the largest Jaccard overlap")
            print(ev["subgroups"].round(3).to_string(index=False))
    s = ev["summary"]
    print(" ".join(f"{k}={v:.4f}" if k.endswith("p05_rate") else f"{k}={v:.2f}" for k, v in s.items()))


if __name__ == "__main__":
    main()

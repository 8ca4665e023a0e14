"""Scoring the app's outputs against the simulator's truth (null calibration and recovery).

Used by ``benchmarks/validation.py`` (which prints the tables) and the tests.
:func:`evaluate` runs the app's own participant stage
(``workflows.participant.Participant.process_story``: maps, p-values and links
exactly as the app writes them) on every participant of a dataset written by
:mod:`bids_llm_encode.demo.simulate`, then compares with its truth file.

A link ``atom k -> network n (sign s)`` is true when some plant g has n among
its truth networks (>= 25 % of its map) and the atom's time course correlates
with g's latent at |r| >= ``LINK_R`` with sign(r) * sign(g) = s; a (plant,
network) pair is recalled when at least one true link names it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..bids.inputs import find_runs
from ..bids.outputs import DerivativesWriter
from ..cache import Cache, cache_root
from ..config import Config
from ..encoding.confounds import load_confounds
from ..encoding.fit import RunData, fit_encoding
from ..workflows import stimulus
from ..workflows.participant import Participant
from .simulate import PLANTS, TRUTH_FILE

Z_NOMINAL = {3.1: 0.001935, 1.96: 0.05}  # two-sided normal tail rates
LINK_R = 0.3
ATLASES = ("CA12", "Yeo7")


def _link_truth(links: pd.DataFrame, atom_r: dict, truth_nets: dict, atlas: str):
    """(n true links, recalled (plant, network) pairs, all truth pairs)."""
    sign_of = {p.name: p.sign for p in PLANTS}
    pairs = {(g, n) for g in truth_nets for n in truth_nets[g][atlas]}
    recalled, n_true = set(), 0
    for _, row in links.iterrows():
        k = int(row["atom"])
        s = 1.0 if row["sign"] == "activation" else -1.0
        ok = False
        for g, r in atom_r.items():
            if (g, row["network"]) in pairs and abs(r[k]) >= LINK_R and np.sign(r[k]) * sign_of[g] == s:
                recalled.add((g, row["network"]))
                ok = True
        n_true += ok
    return n_true, recalled, pairs


def _identifiability(X: np.ndarray, members: np.ndarray, layer: np.ndarray, seed: int) -> dict:
    """Whether a planted neuron group is a structure of the neurons' series at all.

    ``members_r``: mean pairwise |r| of the group's series; ``random_r``: the same
    for as many neurons drawn from the same layers; ``outsiders``: neurons
    outside the group whose series correlate with the group's mean at least as
    much as the median member does. A group that is not more coherent than a
    random one cannot be singled out by any method that sees only the neurons.
    """
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.isin(layer, np.unique(layer[members])))
    rand = rng.choice(pool, size=min(len(members), pool.size), replace=False)
    n = X.shape[0]

    def coherence(idx):
        C = X[:, idx].T @ X[:, idx] / n
        return float(np.abs(C[np.triu_indices(len(idx), 1)]).mean())

    mean = X[:, members].mean(1)
    r = X.T @ ((mean - mean.mean()) / mean.std()) / n
    inside = np.zeros(X.shape[1], bool)
    inside[members] = True
    return {"members_r": coherence(members), "random_r": coherence(rand),
            "outsiders": int((r[~inside] >= np.median(r[inside])).sum())}


def _bold(run, mask):
    return np.asarray(nib.load(run.bold).dataobj, dtype=np.float32)[mask].T


def evaluate(root: Path, out: Path, n_permutations: int = 100, seed: int = 0,
             atlases=ATLASES, oracle: bool = True) -> dict:
    """Run the participant stage on every participant of a simulated dataset and score it.

    Returns
    -------
    dict
        ``null`` and ``planted`` (DataFrames, one row per participant),
        ``subgroups`` (DataFrame: best-matching atom's sub-group per planted
        neuron group), ``z_counts`` ({threshold: [n above, n tests]}),
        ``links`` ({atlas: [n true, n links]}), ``recalled`` ({atlas: [recalled
        pairs, truth pairs]}), ``seconds`` (per participant) and ``summary``
        (the figures of the benchmark's last line).
    """
    root, out = Path(root), Path(out)
    truth = json.loads((root / TRUTH_FILE).read_text())
    truth_nets = truth["truth_networks"]
    kinds = {r["subject"]: r["kind"] for r in truth["runs"]}
    latent_files = {r["subject"]: r["latent_tsv"] for r in truth["runs"] if r["latent_tsv"]}
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="participant", skip_bids_validation=True,
                 n_permutations=n_permutations, fbn_atlas=list(atlases), seed=seed)
    cache = Cache(cache_root(cfg))
    writer = DerivativesWriter(out, cfg)
    by_sub: dict = {}
    for run in find_runs(cfg):
        by_sub.setdefault(run.subject, []).append(run)
    maps_all = np.asarray(nib.load(root / truth["maps"]).dataobj)

    null_rows, plant_rows, sub_rows, seconds = [], [], [], []
    z_counts = {thr: [0, 0] for thr in Z_NOMINAL}
    link_counts = {a: [0, 0] for a in atlases}
    recalled_all = {a: [set(), set()] for a in atlases}
    for sub in sorted(by_sub):
        runs = by_sub[sub]
        t = time.perf_counter()
        res = Participant(sub, runs, cfg, cache, writer).process_story(runs)
        seconds.append(time.perf_counter() - t)
        enc = res.encoding
        mask = np.asarray(res.mask_img.dataobj) > 0
        row = {"participant": sub, "runs": len(runs)}
        if kinds[sub] == "null":
            row["sd_z"] = float(enc.z.std())
            for thr in Z_NOMINAL:
                n = int((np.abs(enc.z) > thr).sum())
                z_counts[thr][0] += n
                z_counts[thr][1] += enc.z.size
                row[f"z>{thr}"] = n / enc.z.size
            row["cv_p05"] = float((enc.p < 0.05).mean())
            row["fdr_calls"] = int(enc.significant.sum())
            if enc.p_unique is not None:
                row["unique_p05"] = float((enc.p_unique < 0.05).mean())
                row["unique_fdr_calls"] = int(enc.significant_unique.sum())
            row["r2_insample"] = float(np.median(enc.in_sample_r2))
            row["r2_chance"] = float(np.median(enc.in_sample_r2_chance))
            if enc.noise_ceiling is not None:
                row["ceiling"] = float(np.median(enc.noise_ceiling))
            for a in atlases:
                corr = res.correspondence[a]
                tested = corr[corr["n_map_voxels"] > 0]
                row[f"{a}_p05"] = float((tested["p"] < 0.05).mean()) if len(tested) else float("nan")
                row[f"{a}_tests"] = len(tested)
                row[f"{a}_links"] = int(corr["linked"].sum())
            null_rows.append(row)
            continue
        lat = pd.read_csv(root / latent_files[sub], sep="\t")
        r0 = runs[0]
        design = stimulus.run_design(r0.frame_times - r0.story_onset, r0.story, res.activations,
                                     res.dictionary, cfg)
        atom_r = {p.name: np.array([np.corrcoef(design[:, k], lat[p.name])[0, 1]
                                    for k in range(design.shape[1])]) for p in PLANTS}
        for a in atlases:
            corr = res.correspondence[a]
            links = corr[corr["linked"].astype(bool)]
            n_true, recalled, pairs = _link_truth(links, atom_r, truth_nets, a)
            link_counts[a][0] += n_true
            link_counts[a][1] += len(links)
            recalled_all[a][0] |= {(sub,) + x for x in recalled}
            recalled_all[a][1] |= {(sub,) + x for x in pairs}
            row[f"{a}_links"] = len(links)
            row[f"{a}_true"] = n_true
            row[f"{a}_recall"] = len(recalled) / max(len(pairs), 1)
        true_r = maps_all[mask]  # (V, n_plants)
        planted = (true_r > 0).any(axis=1)
        row["planted_voxels"] = int(planted.sum())
        row["sens_atoms"] = float(enc.significant[planted].mean())
        row["cv_r_atoms"] = float(np.median(enc.cv_r[planted]))
        calls = int(enc.significant.sum())
        row["false_call_share"] = float((enc.significant & ~planted).sum() / max(calls, 1))
        if enc.significant_unique is not None:  # each plant's map: baselines vs the atoms' unique part
            for j, p_spec in enumerate(PLANTS):
                own = (true_r[:, j] > 0) & (np.delete(true_r, j, axis=1) == 0).all(axis=1)
                row[f"{p_spec.name}_unique_sig"] = float(enc.significant_unique[own].mean())
                row[f"{p_spec.name}_r2_baseline"] = float(np.median(enc.cv_r2_baseline[own]))
                row[f"{p_spec.name}_r2_unique"] = float(np.median(enc.cv_r2_unique[own]))
        if enc.noise_ceiling is not None:
            row["ceiling_planted"] = float(np.median(enc.noise_ceiling[planted]))
            row["true_r_planted"] = float(np.median(true_r.max(axis=1)[planted]))
        if oracle:  # the true latents, fitted with the same CV and null
            data = []
            for r in runs:
                conf, sm = load_confounds(r.bold, r.confounds, cfg.confounds_strategy, cfg.scrub)
                data.append(RunData(_bold(r, mask), lat[[p.name for p in PLANTS]].to_numpy(np.float32),
                                    conf, sm, repeat_group="story"))
            orc = fit_encoding(data, n_permutations=n_permutations, cv_folds=cfg.cv_folds,
                               fdr_alpha=cfg.fdr_alpha, seed=cfg.seed)
            row["sens_oracle"] = float(orc.significant[planted].mean())
            row["cv_r_oracle"] = float(np.median(orc.cv_r[planted]))
        plant_rows.append(row)
        loadings = res.dictionary.loadings.tocsr()
        X = stimulus.neuron_series(r0.story, res.activations, res.dictionary.frame_times, cfg).astype(np.float64)
        X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
        for p_spec, entry in zip(PLANTS, truth["plants"]):
            if entry["neurons"] is None:
                continue
            planted_n = set(entry["neurons"])
            ident = _identifiability(X, np.array(entry["neurons"]), res.activations.layer, seed)
            groups = [set(loadings[k].indices.tolist()) for k in range(loadings.shape[0])]
            jac = [len(planted_n & g) / max(len(planted_n | g), 1) for g in groups]
            # the atom whose time course follows the plant, and the sub-group that overlaps it most
            for match, k in (("time course", int(np.argmax(np.abs(atom_r[p_spec.name])))),
                             ("neurons", int(np.argmax(jac)))):
                inter = len(planted_n & groups[k])
                sub_rows.append({"participant": sub, "plant": p_spec.name, "match": match, "atom": k,
                                 "atom_r": float(atom_r[p_spec.name][k]), "subgroup_size": len(groups[k]),
                                 "precision": inter / max(len(groups[k]), 1),
                                 "recall": inter / len(planted_n), "jaccard": jac[k], **ident})

    null_df, plant_df, sub_df = pd.DataFrame(null_rows), pd.DataFrame(plant_rows), pd.DataFrame(sub_rows)
    best = sub_df[sub_df["match"] == "neurons"] if len(sub_df) else sub_df
    tp = sum(v[0] for v in link_counts.values())
    nl = sum(v[1] for v in link_counts.values())
    rec_n = sum(len(v[0]) for v in recalled_all.values())
    rec_d = sum(len(v[1]) for v in recalled_all.values())
    summary = {
        "atom_z_fp_ratio": (z_counts[3.1][0] / z_counts[3.1][1] / Z_NOMINAL[3.1]) if z_counts[3.1][1] else float("nan"),
        "cv_p05_rate": float(null_df["cv_p05"].mean()) if len(null_df) else float("nan"),
        "null_link_participants": (float(np.mean([sum(r[f"{a}_links"] for a in atlases) > 0 for r in null_rows]))
                                   if null_rows else float("nan")),
        "link_precision": tp / nl if nl else float("nan"),
        "link_recall": rec_n / rec_d if rec_d else float("nan"),
        "sensitivity_ratio": (float(plant_df["sens_atoms"].sum() / plant_df["sens_oracle"].sum())
                              if oracle and len(plant_df) and plant_df["sens_oracle"].sum() > 0 else float("nan")),
        "unique_p05_rate": (float(null_df["unique_p05"].mean()) if "unique_p05" in null_df else float("nan")),
        "wordrate_unique_share": (float(plant_df["word_rate_unique_sig"].mean())
                                  if "word_rate_unique_sig" in plant_df else float("nan")),
        "subgroup_precision": float(best["precision"].min()) if len(best) else float("nan"),
        "subgroup_recall": float(best["recall"].min()) if len(best) else float("nan"),
    }
    return {"null": null_df, "planted": plant_df, "subgroups": sub_df, "z_counts": z_counts,
            "links": link_counts, "recalled": recalled_all, "seconds": seconds, "summary": summary,
            "atlases": tuple(atlases)}

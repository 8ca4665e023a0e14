"""Fill the participant and group reports from the stages' results.

The report builder (``report/html.py``) and the figures (``report/figures.py``)
know nothing of the pipeline; this module maps results to sections.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..bids.images import unmask
from ..config import Config
from ..encoding.stats import MIN_CEILING, ceiling_fraction
from ..records import RunInputs
from ..report import figures as fig


def participant_inputs_section(report, summary: pd.DataFrame, runs: list[RunInputs]) -> None:
    sec = report.add_section("Inputs found", anchor="inputs")
    n_bold = len({r.bold for r in runs})
    several = f", {len(runs)} story segments (one row per story of a run)" if len(runs) > n_bold else ""
    sec.text(f"{n_bold} BOLD run(s) with fMRIPrep derivatives, confounds and word timing{several}.")
    timeline = summary.assign(
        run=[r.bold.name.split("_space-")[0] for r in runs],
        story_start=[r.story_onset + float(np.nanmin(r.story.starts)) for r in runs],
        story_end=[r.story_onset + float(np.nanmax(r.story.ends)) for r in runs])
    sec.figure(fig.runs_timeline(timeline), "Each run's scan (grey) and the span of the story in it "
               "(coloured), with its frames and words.")
    sec.table(summary, caption="Per-run summary (also written as *_desc-runs_summary.tsv).")
    unaligned = sum(r.story.n_unaligned for r in runs)
    if unaligned:
        sec.note(f"{unaligned} word(s) had no aligner time; their onsets were interpolated "
                 "between their neighbours.", kind="info")


def participant_story_sections(report, result, cfg: Config, writer) -> None:
    story, acts, dic, enc = result.story, result.activations, result.dictionary, result.encoding
    card = acts.card
    sec = report.add_section(f"Model on '{story.name}'", anchor=f"model-{story.name}")
    sec.keyvalues({k: card.get(k) for k in ("model", "class", "family", "site", "n_neurons",
                                            "n_tokens", "n_words", "n_windows", "window_tokens",
                                            "context_tokens", "seconds", "tokens_per_s", "device",
                                            "dtype") if k in card})
    from dataclasses import replace

    from ..networks.overlap import LINK_COLUMNS
    from .stimulus import neuron_series

    rng = np.random.default_rng(0)
    cols = np.sort(rng.choice(acts.values.shape[1], size=min(4, acts.values.shape[1]), replace=False))
    # 4 neurons only (centring is per neuron): no copy of all the word values
    X = neuron_series(story, replace(acts, values=acts.values[:, cols]), dic.frame_times, cfg)
    sec.figure(fig.neuron_timecourses(dic.frame_times, X, story.starts,
                                      [f"L{acts.layer[c]}:u{acts.unit[c]}" for c in cols]),
               "Four artificial neurons' responses (HRF-convolved, z-scored) against the word onsets "
               "(rug), in time from the start of the story audio.")

    sec = report.add_section(f"Atoms of '{story.name}'", anchor=f"atoms-{story.name}")
    sec.keyvalues({"atoms": dic.n_atoms, "dictionary R²": round(dic.r2, 3), "alpha": dic.alpha,
                   "neurons": acts.values.shape[1]})
    sec.figure(fig.atoms_figure(dic.frame_times, dic.atoms),
               "The first atoms' time courses (left) and the correlation between all atoms (right).")
    sec.figure(fig.subgroup_layers_figure(result.subgroups),
               "Each atom's neuron sub-group: how many of its neurons lie in each layer.")

    sec = report.add_section(f"Encoding of '{story.name}'", anchor=f"encoding-{story.name}")
    n_sig = int(enc.significant.sum())
    sec.keyvalues({"voxels": enc.cv_r.size, "median CV r": round(float(np.nanmedian(enc.cv_r)), 3),
                   "max CV r": round(float(np.nanmax(enc.cv_r)), 3),
                   f"significant (FDR {cfg.fdr_alpha})": n_sig,
                   "median in-sample R²": round(float(np.nanmedian(enc.in_sample_r2)), 3),
                   **({"its chance level (median)": round(float(np.nanmedian(enc.in_sample_r2_chance)), 3)}
                      if enc.in_sample_r2_chance is not None else {}),
                   **({"median noise ceiling (r)": round(float(np.nanmedian(enc.noise_ceiling)), 3),
                       f"median CV r / ceiling (ceiling >= {MIN_CEILING})":
                       round(float(np.nanmedian(ceiling_fraction(enc.cv_r, enc.noise_ceiling))), 3)}
                      if enc.noise_ceiling is not None else {})})
    sec.figure(fig.cv_r_histogram(enc.cv_r, enc.significant),
               "Cross-validated prediction accuracy over voxels; significant voxels highlighted.")
    sec.figure(fig.glass_brain(unmask(np.where(enc.significant, enc.cv_r, 0), result.mask_img),
                               "CV r (FDR-significant voxels)", threshold=1e-6),
               "Best-predicted voxels: cross-validated r where it is significant.")
    if enc.noise_ceiling is not None:
        sec.figure(fig.glass_brain(unmask(np.nan_to_num(ceiling_fraction(enc.cv_r, enc.noise_ceiling)),
                                          result.mask_img), "CV r / noise ceiling", threshold=1e-6),
                   f"Cross-validated r as a fraction of the single-run noise ceiling (where the ceiling "
                   f"is at least {MIN_CEILING}).")
    if enc.cv_r2_unique is not None:
        base = enc.info.get("baseline_names") or []
        n_u = int(enc.significant_unique.sum())
        sec.keyvalues({"baselines": ", ".join(base),
                       "median CV R² baselines / atoms / both (CV-significant voxels)": " / ".join(
                           f"{np.median(v[enc.significant]):.3f}" if n_sig else "n/a"
                           for v in (enc.cv_r2_baseline, enc.cv_r2, enc.cv_r2_joint)),
                       f"atoms' unique part significant (FDR {cfg.fdr_alpha})": n_u})
        sec.figure(fig.glass_brain(unmask(np.clip(enc.cv_r2_baseline, 0, None), result.mask_img),
                                   "CV R² of the baselines alone", threshold=0.01),
                   f"What the low-level baselines ({', '.join(base)}) predict on held-out data (R² > 0.01).")
        sec.figure(fig.glass_brain(unmask(np.where(enc.significant_unique, enc.cv_r2_unique, 0),
                                          result.mask_img), "atoms' unique CV R²", threshold=1e-6),
                   "What the atoms predict beyond the baselines (joint minus baselines), where that unique "
                   "part is FDR-significant. The atom z maps below have the baselines in their model.")
    strongest = np.argsort(-np.nanmax(np.abs(enc.z), axis=1))[:2]
    for k in strongest:
        sec.figure(fig.glass_brain(unmask(enc.z[k], result.mask_img), f"atom{k:02d} z",
                                   threshold=cfg.map_threshold),
                   f"z map of atom {k} (one of the two strongest), thresholded at ±{cfg.map_threshold}.")

    for atlas_name, corr in result.correspondence.items():
        summary, per_network = result.metrics[atlas_name]
        sec = report.add_section(f"Networks ({atlas_name}) for '{story.name}'",
                                 anchor=f"networks-{atlas_name}-{story.name}")
        sec.figure(fig.correspondence_heatmap(corr), fig.CAPTIONS["correspondence_heatmap"])
        sec.figure(fig.network_involvement_bars(per_network), fig.CAPTIONS["network_involvement_bars"])
        sec.figure(fig.consistency_figure(per_network), fig.CAPTIONS["consistency_figure"])
        sec.note(f"Spatial null: {corr.attrs.get('null_description', corr['null'].iloc[0])}; a link "
                 f"needs q < {cfg.fdr_alpha} and Dice >= {corr['min_dice'].iloc[0]:g}.", kind="info")
        links = corr[corr["linked"]]
        if len(links):
            sec.table(links[LINK_COLUMNS], caption="Links (null: the spatial null that served each)")
        else:
            sec.note("No atom's map overlaps a network beyond the spatial null.", kind="info")
        network_metrics_section(sec, summary, per_network)


def network_metrics_table(per_network: pd.DataFrame) -> pd.DataFrame:
    """The per-network metrics as the reports show them: each value beside its count and chance band."""
    def band(lo, hi):
        return "n/a" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{lo:.3f} to {hi:.3f}"

    return pd.DataFrame({
        "network": per_network["network"],
        "atoms activating": per_network["n_atoms_activate"],
        "atoms deactivating": per_network["n_atoms_deactivate"],
        "n (atoms linked)": per_network["consistency_n"],
        "consistency (mean |r|)": per_network["consistency_r"],
        "chance mean": per_network["consistency_chance_mean"],
        "chance 95 %": [band(lo, hi) for lo, hi in zip(per_network["consistency_chance_lo"].astype(float),
                                                       per_network["consistency_chance_hi"].astype(float))],
        "p": per_network["consistency_p"],
    })


def metrics_keyvalues(summary: dict) -> dict:
    """The summary metrics for a report: consistency and diversity each beside its chance level."""
    def num(key, fmt="{:.3f}"):
        v = summary.get(key)
        return "n/a" if v is None or not np.isfinite(v) else fmt.format(v)

    out = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))
           and not k.startswith(("consistency_", "diversity_"))}
    out["mean consistency over networks (mean |r|)"] = (
        f"{num('consistency_r')} over {summary.get('consistency_networks', 0)} network(s) with >= 2 "
        f"atoms ({num('consistency_n_mean', '{:.1f}')} atoms on average); chance "
        f"{num('consistency_chance_mean')}, 95 % {num('consistency_chance_lo')} to "
        f"{num('consistency_chance_hi')}, p = {num('consistency_p', '{:.3g}')} "
        f"({summary.get('consistency_null_sets')} random sets from {summary.get('consistency_pool_atoms')} "
        "atoms)")
    out["diversity (mean 1 - |r|)"] = (f"{num('diversity_1_minus_abs_r')}; chance "
                                       f"{num('diversity_chance_1_minus_abs_r')} (atoms learned from "
                                       "circularly shifted neurons)")
    return out


def network_metrics_section(sec, summary: dict, per_network: pd.DataFrame) -> None:
    """The per-network table (counts and chance bands) and the summary metrics of one atlas."""
    sec.table(network_metrics_table(per_network),
              caption="Per network: atoms linked, temporal consistency (mean |r|) beside its chance "
              "level for random sets of as many atoms (mean, 95 % range) and its permutation p")
    sec.keyvalues(metrics_keyvalues(summary))

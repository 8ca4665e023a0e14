"""Organization metrics of atom -> network links (method.md section 6).

From plain inputs (a links table, the atoms, the sub-group layer histograms,
the dictionary R^2 and the voxel-wise encoding R^2) compute what the paper
compares across models:

- per network: number of atoms that activate / deactivate it (fewer = more
  compact), within-network temporal consistency (mean pairwise Pearson r of
  the atoms linked to it, with their count; NaN when fewer than 2), and the
  summed layer histogram of the linked atoms' sub-groups;
- overall: diversity of the atoms (mean ``1 - |r|`` over all atom pairs), the
  entropy (bits) of the atom -> network assignment over *linked atoms only*
  (an atom linked to m networks gives 1/m to each, either sign), the
  dictionary R^2 and quantiles of the encoding R^2.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

SIGNS = ("activation", "deactivation")


def _mean_pairwise(r: np.ndarray, idx: Sequence[int]) -> float:
    idx = np.asarray(sorted(set(int(i) for i in idx)), dtype=int)
    if idx.size < 2:
        return float("nan")
    sub = r[np.ix_(idx, idx)]
    iu = np.triu_indices(idx.size, 1)
    return float(np.mean(sub[iu]))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def assignment_entropy(links: pd.DataFrame) -> float:
    """Entropy (bits) of the atom -> network assignment, over linked atoms only.

    Each linked atom carries weight 1, split equally among the distinct
    networks it is linked to (either sign); the entropy is that of the
    resulting distribution over networks. 0 when all atoms go to one network;
    ``log2(n)`` when they spread evenly over n networks; NaN with no link.

    Parameters
    ----------
    links : DataFrame
        Columns ``atom``, ``network``.
    """
    pairs = links[["atom", "network"]].drop_duplicates()
    if pairs.empty:
        return float("nan")
    w = 1.0 / pairs.groupby("atom")["network"].transform("count")
    p = w.groupby(pairs["network"]).sum().to_numpy()
    p = p / p.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() + 0.0)


def organization_metrics(
    links: pd.DataFrame,
    atoms: np.ndarray,
    subgroup_layers: pd.DataFrame,
    dictionary_r2: float,
    encoding_r2: np.ndarray,
    *,
    networks: Optional[Sequence[str]] = None,
) -> tuple[dict, pd.DataFrame]:
    """Organization metrics of one model's atoms linked to brain networks.

    Parameters
    ----------
    links : DataFrame
        Rows ``atom, network, sign`` (``sign`` in ``activation``/``deactivation``),
        e.g. :func:`~bids_llm_encode.networks.overlap.links_table`. A full
        correspondence table is accepted: only its ``linked`` rows are used.
        ``atom`` values are column indices of ``atoms``.
    atoms : ndarray, shape (n_frames, n_atoms)
        The dictionary's temporal patterns D.
    subgroup_layers : DataFrame
        One row per atom with column ``atom`` and ``layer_00``, ``layer_01``, ...
        (as produced by ``patterns.subgroups.subgroups``).
    dictionary_r2 : float
        Reconstruction R^2 of X by D A.
    encoding_r2 : ndarray, shape (n_voxels,)
        Voxel-wise encoding R^2 (NaNs are ignored).
    networks : sequence of str, optional
        All networks of the atlas, so that networks with no link get a row
        (default: the networks present in ``links``).

    Returns
    -------
    summary : dict
        JSON-serialisable (NaN -> None): ``n_atoms``, ``n_linked_atoms``,
        ``n_links``, ``diversity_1_minus_abs_r``, ``assignment_entropy_bits``,
        ``assignment_entropy_max_bits`` (log2 of the number of networks),
        ``dictionary_r2``, ``encoding_r2`` (``median``, ``q95``, ``max``,
        ``mean``, ``n_voxels``), ``per_network`` (the table as records).
    per_network : DataFrame
        One row per network: ``network, n_atoms_activate, n_atoms_deactivate,
        n_atoms_linked, consistency_r, consistency_n, consistency_r_activate,
        consistency_r_deactivate``, then the summed ``layer_XX`` histogram of
        the linked atoms' sub-groups (each atom counted once per network).
    """
    if "linked" in links.columns:
        links = links.loc[links["linked"].astype(bool)]
    missing = {"atom", "network", "sign"} - set(links.columns)
    if missing:
        raise DataError(f"links table lacks columns {sorted(missing)}")
    bad_sign = set(links["sign"]) - set(SIGNS)
    if bad_sign:
        raise DataError(f"links table has unknown signs {sorted(bad_sign)}; use {SIGNS}")
    D = np.asarray(atoms, dtype=np.float64)
    if D.ndim != 2:
        raise DataError(f"atoms must be (n_frames, n_atoms); got shape {D.shape}")
    K = D.shape[1]
    atom_ids = links["atom"].astype(int).to_numpy() if len(links) else np.zeros(0, int)
    if atom_ids.size and (atom_ids.min() < 0 or atom_ids.max() >= K):
        raise DataError(f"links name atoms outside 0..{K - 1}")
    layer_cols = sorted(c for c in subgroup_layers.columns if str(c).startswith("layer_"))
    if "atom" not in subgroup_layers.columns or not layer_cols:
        raise DataError("subgroup_layers needs an 'atom' column and layer_XX columns")
    hist = subgroup_layers.set_index(subgroup_layers["atom"].astype(int))[layer_cols]
    absent = sorted(set(atom_ids.tolist()) - set(hist.index))
    if absent:
        raise DataError(f"subgroup_layers has no row for linked atoms {absent[:10]}")

    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(D.T) if K > 1 else np.ones((1, 1))
    r = np.atleast_2d(r)

    nets = list(networks) if networks is not None else []
    for n in links["network"]:
        if n not in nets:
            nets.append(n)
    rows = []
    for net in nets:
        sel = links[links["network"] == net]
        act = sel.loc[sel["sign"] == "activation", "atom"].astype(int).unique()
        dea = sel.loc[sel["sign"] == "deactivation", "atom"].astype(int).unique()
        anyl = np.union1d(act, dea)
        row = {"network": net, "n_atoms_activate": int(act.size),
               "n_atoms_deactivate": int(dea.size), "n_atoms_linked": int(anyl.size),
               "consistency_r": _mean_pairwise(r, anyl), "consistency_n": int(anyl.size),
               "consistency_r_activate": _mean_pairwise(r, act),
               "consistency_r_deactivate": _mean_pairwise(r, dea)}
        summed = hist.loc[anyl].sum(axis=0) if anyl.size else pd.Series(0, index=layer_cols)
        row.update({c: int(summed[c]) for c in layer_cols})
        rows.append(row)
    per_network = pd.DataFrame(rows, columns=["network", "n_atoms_activate", "n_atoms_deactivate",
                                              "n_atoms_linked", "consistency_r", "consistency_n",
                                              "consistency_r_activate", "consistency_r_deactivate",
                                              *layer_cols])

    if K > 1:
        iu = np.triu_indices(K, 1)
        diversity = float(np.nanmean(1.0 - np.abs(r[iu])))
    else:
        diversity = float("nan")
    enc = np.asarray(encoding_r2, dtype=np.float64).ravel()
    enc = enc[np.isfinite(enc)]
    enc_summary = ({"median": float(np.median(enc)), "q95": float(np.quantile(enc, 0.95)),
                    "max": float(enc.max()), "mean": float(enc.mean()), "n_voxels": int(enc.size)}
                   if enc.size else {"median": None, "q95": None, "max": None, "mean": None,
                                     "n_voxels": 0})
    n_nets = len(nets)
    summary = {
        "n_atoms": int(K),
        "n_linked_atoms": int(np.unique(atom_ids).size),
        "n_links": int(len(links)),
        "diversity_1_minus_abs_r": diversity,
        "assignment_entropy_bits": assignment_entropy(links),
        "assignment_entropy_max_bits": float(np.log2(n_nets)) if n_nets else float("nan"),
        "assignment_entropy_over": "linked atoms only",
        "dictionary_r2": float(dictionary_r2),
        "encoding_r2": enc_summary,
        "per_network": per_network.to_dict(orient="records"),
    }
    return _jsonable(summary), per_network

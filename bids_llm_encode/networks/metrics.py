"""Organization metrics of atom -> network links (method.md section 6).

From plain inputs (a links table, the atoms, the sub-group layer histograms,
the dictionary R^2 and the voxel-wise encoding R^2) compute what the paper
compares across models:

- per network: number of atoms that activate / deactivate it (fewer = more
  compact), within-network temporal consistency (mean pairwise ``|r|`` of the
  time courses of the atoms linked to it, either sign; NaN when fewer than 2)
  beside its chance level: the same statistic for random sets of as many atoms
  drawn from the dictionary (mean, 95 % interval, permutation p, the count),
  and the summed layer histogram of the linked atoms' sub-groups;
- overall: the mean consistency over networks with its own chance level,
  diversity of the atoms (mean ``1 - |r|`` over all atom pairs, and the chance
  level given by the caller, see ``workflows/stimulus.diversity_chance``), the
  entropy (bits) of the atom -> network assignment over *linked atoms only*
  (an atom linked to m networks gives 1/m to each, either sign), the
  dictionary R^2 and quantiles of the encoding R^2.

Why ``|r|``: an atom's sign is arbitrary (``D A = (-D)(-A)``), so a signed r
between two atoms means nothing by itself, and an atom that activates a
network and one that deactivates it are consistent when they are
*anti*-correlated. ``|r|`` needs no sign, so random sets of atoms (which have
no link sign) are scored exactly as the linked set is, and the permutation p
is exact when the linked set is a random draw. Its price, an atom pair linked
with the same sign but anti-correlated counting as consistent, is rare: two
series that both correlate positively with one network's BOLD cannot be
strongly anti-correlated. Its chance level is above 0 (about 0.8 / sqrt(T)
for unrelated series, more for autocorrelated ones): read it against the
chance columns, never alone.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError

SIGNS = ("activation", "deactivation")

#: Random atom sets per network for the consistency's chance level (``--n-consistency-null``).
DEFAULT_N_NULL = 1000

#: What the consistency columns hold, for the TSV sidecars (the callers add these).
PER_NETWORK_COLUMNS = {
    "network": {"Description": "network of the atlas"},
    "n_atoms_activate": {"Description": "atoms linked to the network by activation (map z > threshold)"},
    "n_atoms_deactivate": {"Description": "atoms linked to it by deactivation (map z < -threshold)"},
    "n_atoms_linked": {"Description": "distinct atoms linked to it, either sign"},
    "consistency_r": {"Description": "temporal consistency: mean over pairs of linked atoms of |Pearson r| "
                      "between their time courses (sign-invariant); n/a with fewer than 2 atoms. "
                      "Compare with consistency_chance_*, not with 0"},
    "consistency_n": {"Description": "number of atoms consistency_r averages over (its chance level "
                      "depends on it)"},
    "consistency_chance_mean": {"Description": "mean consistency of random sets of consistency_n atoms "
                                "drawn without replacement from the eligible atoms of the same dictionary"},
    "consistency_chance_lo": {"Description": "2.5 % quantile of the random sets' consistency"},
    "consistency_chance_hi": {"Description": "97.5 % quantile of the random sets' consistency"},
    "consistency_p": {"Description": "permutation p of consistency_r against the random sets: "
                      "(1 + #{random >= observed}) / (1 + n), or the exact fraction over all sets when "
                      "there are no more of them than requested"},
    "consistency_null_sets": {"Description": "random sets drawn (all possible sets when fewer)"},
}


def _abs_r(atoms: np.ndarray) -> np.ndarray:
    """|Pearson r| between the atoms' time courses, diagonal 0; a constant atom correlates 0."""
    K = atoms.shape[1]
    if K < 2:
        return np.zeros((K, K))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.atleast_2d(np.corrcoef(atoms.T))
    a = np.abs(np.nan_to_num(r, nan=0.0))
    np.fill_diagonal(a, 0.0)
    return a


def _mean_pairwise(a: np.ndarray, idx: Sequence[int]) -> float:
    """Mean of ``a`` over the pairs of distinct indices in ``idx``; NaN for fewer than 2."""
    idx = np.asarray(sorted(set(int(i) for i in idx)), dtype=int)
    if idx.size < 2:
        return float("nan")
    sub = a[np.ix_(idx, idx)]
    iu = np.triu_indices(idx.size, 1)
    return float(np.mean(sub[iu]))


def set_consistency(a: np.ndarray, sets: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Mean pairwise value of ``a`` (zero diagonal) within each row of ``sets``.

    Parameters
    ----------
    a : ndarray, shape (m, m)
        Symmetric, zero diagonal (e.g. |r| between m atoms).
    sets : ndarray of int, shape (n_sets, n)
        Each row: n distinct indices into ``a`` (n >= 2).
    """
    sets = np.asarray(sets, dtype=int)
    n_sets, n = sets.shape
    out = np.empty(n_sets)
    for s in range(0, n_sets, chunk):
        rows = sets[s:s + chunk]
        ind = np.zeros((rows.shape[0], a.shape[0]))
        np.put_along_axis(ind, rows, 1.0, axis=1)
        out[s:s + chunk] = np.einsum("ij,ij->i", ind @ a, ind) / (n * (n - 1))
    return out


def random_sets(m: int, n: int, n_sets: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Sets of ``n`` distinct indices out of ``m``: every one when there are at most ``n_sets``.

    Returns
    -------
    sets : ndarray of int, shape (n_sets or C(m, n), n)
    exact : bool
        True when ``sets`` holds every subset (each once), else uniform random draws.
    """
    if math.comb(m, n) <= n_sets:
        return np.array(list(combinations(range(m), n)), dtype=int).reshape(-1, n), True
    # the n smallest of m iid uniforms: a uniform random n-subset (their order does not matter)
    return np.argpartition(rng.random((n_sets, m)), n - 1, axis=1)[:, :n], False


def consistency_null(a: np.ndarray, observed: float, n: int, n_sets: int,
                     rng: np.random.Generator) -> dict:
    """Chance level of a set's mean pairwise ``a`` for sets of ``n`` of the ``len(a)`` items.

    Returns ``chance_mean``, ``chance_lo``, ``chance_hi`` (2.5 / 97.5 % quantiles),
    ``p`` (``(1 + #{null >= observed}) / (1 + n_sets)``; with every subset
    enumerated, the exact fraction of subsets at least as consistent, the
    observed one among them), ``null_sets`` and ``null`` (the values, for the
    summary's null). NaN (and no null) when ``n < 2`` or there are fewer than
    ``n`` items.
    """
    m = a.shape[0]
    if n < 2 or n > m:
        nan = float("nan")
        return {"chance_mean": nan, "chance_lo": nan, "chance_hi": nan, "p": nan, "null_sets": 0,
                "null": None, "exact": False}
    sets, exact = random_sets(m, n, n_sets, rng)
    null = set_consistency(a, sets)
    ge = int(np.count_nonzero(null >= observed - 1e-12 * max(1.0, abs(observed))))
    p = ge / null.size if exact else (1 + ge) / (1 + null.size)
    return {"chance_mean": float(null.mean()), "chance_lo": float(np.quantile(null, 0.025)),
            "chance_hi": float(np.quantile(null, 0.975)), "p": float(p), "null_sets": int(null.size),
            "null": null, "exact": exact}


def linkable_atoms(corr: pd.DataFrame, n_atoms: int) -> Optional[np.ndarray]:
    """Atoms that could be linked at all: a non-empty thresholded map for some network and sign.

    From a full correspondence table (``n_map_voxels`` per atom x network x
    sign); None when the table lacks that column (then every atom is eligible).
    """
    if "n_map_voxels" not in corr.columns:
        return None
    out = np.zeros(n_atoms, dtype=bool)
    nonempty = corr.loc[pd.to_numeric(corr["n_map_voxels"], errors="coerce").fillna(0) > 0, "atom"]
    out[np.unique(nonempty.astype(int).to_numpy())] = True
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
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
    eligible: Optional[np.ndarray] = None,
    n_null: int = DEFAULT_N_NULL,
    seed: int = 0,
    diversity_chance: Optional[dict] = None,
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
    eligible : ndarray of bool, shape (n_atoms,), optional
        The atoms random sets are drawn from for the consistency's chance level
        (default: all); e.g. :func:`linkable_atoms`. Every linked atom must be
        eligible (the linked set must be one of the sets the null draws).
    n_null : int
        Random sets per network (all subsets when there are no more than this).
    seed : int
        Seeds the random sets: same seed and inputs, same numbers.
    diversity_chance : dict, optional
        The diversity's chance level (``workflows.stimulus.diversity_chance``):
        its ``diversity_1_minus_abs_r`` becomes ``diversity_chance_1_minus_abs_r``
        and the whole dict ``diversity_chance_info``; NaN / absent when None.

    Returns
    -------
    summary : dict
        JSON-serialisable (NaN -> None): ``n_atoms``, ``n_linked_atoms``,
        ``n_links``; ``consistency_r`` (mean over networks with >= 2 linked
        atoms), ``consistency_networks`` (their number), ``consistency_n_mean``
        (their mean count), ``consistency_chance_mean/lo/hi`` and
        ``consistency_p`` (the same mean when every network's set is a random
        one of its size), ``consistency_null_sets``, ``consistency_pool_atoms``,
        ``consistency_statistic``; ``diversity_1_minus_abs_r``,
        ``diversity_chance_1_minus_abs_r``, ``diversity_chance_info``;
        ``assignment_entropy_bits``, ``assignment_entropy_max_bits`` (log2 of
        the number of networks), ``dictionary_r2``, ``encoding_r2``
        (``median``, ``q95``, ``max``, ``mean``, ``n_voxels``), ``per_network``
        (the table as records).
    per_network : DataFrame
        One row per network: ``network, n_atoms_activate, n_atoms_deactivate,
        n_atoms_linked, consistency_r, consistency_n, consistency_chance_mean,
        consistency_chance_lo, consistency_chance_hi, consistency_p,
        consistency_null_sets`` (:data:`PER_NETWORK_COLUMNS`), then the summed
        ``layer_XX`` histogram of the linked atoms' sub-groups (each atom
        counted once per network).
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
    if eligible is None:
        eligible = np.ones(K, dtype=bool)
    eligible = np.asarray(eligible, dtype=bool)
    if eligible.shape != (K,):
        raise DataError(f"eligible must have one value per atom ({K}); got shape {eligible.shape}")
    outside = sorted(set(atom_ids.tolist()) - set(np.flatnonzero(eligible).tolist()))
    if outside:
        raise DataError(f"linked atoms {outside[:10]} are not eligible for the consistency's null")
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 1:
        raise DataError(f"n_null must be a positive integer; got {n_null!r}")

    absr = _abs_r(D)
    pool = np.flatnonzero(eligible)
    pos = np.full(K, -1)
    pos[pool] = np.arange(pool.size)
    a_pool = absr[np.ix_(pool, pool)]

    nets = list(networks) if networks is not None else []
    for n in links["network"]:
        if n not in nets:
            nets.append(n)
    rows, nulls = [], []
    for i, net in enumerate(nets):
        sel = links[links["network"] == net]
        act = sel.loc[sel["sign"] == "activation", "atom"].astype(int).unique()
        dea = sel.loc[sel["sign"] == "deactivation", "atom"].astype(int).unique()
        anyl = np.union1d(act, dea)
        c = _mean_pairwise(absr, anyl)
        # one stream per network (its place in the atlas): independent draws across networks
        chance = consistency_null(a_pool, c, int(anyl.size), int(n_null),
                                  np.random.default_rng([int(seed), i]))
        row = {"network": net, "n_atoms_activate": int(act.size),
               "n_atoms_deactivate": int(dea.size), "n_atoms_linked": int(anyl.size),
               "consistency_r": c, "consistency_n": int(anyl.size),
               "consistency_chance_mean": chance["chance_mean"],
               "consistency_chance_lo": chance["chance_lo"],
               "consistency_chance_hi": chance["chance_hi"], "consistency_p": chance["p"],
               "consistency_null_sets": chance["null_sets"]}
        summed = hist.loc[anyl].sum(axis=0) if anyl.size else pd.Series(0, index=layer_cols)
        row.update({c_: int(summed[c_]) for c_ in layer_cols})
        rows.append(row)
        if chance["null"] is not None and math.isfinite(c):
            nulls.append((int(anyl.size), c, chance))
    per_network = pd.DataFrame(rows, columns=[*PER_NETWORK_COLUMNS, *layer_cols])
    overall = _overall_consistency(nulls, int(n_null), int(seed))

    if K > 1:
        iu = np.triu_indices(K, 1)
        diversity = float(np.mean(1.0 - absr[iu]))
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
        **overall,
        "consistency_null_sets": int(n_null),
        "consistency_pool_atoms": int(pool.size),
        "consistency_statistic": "mean pairwise |r| of the linked atoms' time courses",
        "diversity_1_minus_abs_r": diversity,
        "diversity_chance_1_minus_abs_r": (float(diversity_chance["diversity_1_minus_abs_r"])
                                           if diversity_chance else float("nan")),
        "diversity_chance_info": dict(diversity_chance) if diversity_chance else None,
        "assignment_entropy_bits": assignment_entropy(links),
        "assignment_entropy_max_bits": float(np.log2(n_nets)) if n_nets else float("nan"),
        "assignment_entropy_over": "linked atoms only",
        "dictionary_r2": float(dictionary_r2),
        "encoding_r2": enc_summary,
        "per_network": per_network.to_dict(orient="records"),
    }
    return _jsonable(summary), per_network


def _overall_consistency(nulls: list, n_null: int, seed: int) -> dict:
    """Mean consistency over the networks that have one, with the chance level of that mean.

    Replicate b of the null gives each network one random set of its own size
    (its b-th draw; a network whose subsets were all enumerated gets a uniform
    draw among them), and averages over networks.
    """
    nan = float("nan")
    if not nulls:
        return {"consistency_r": nan, "consistency_networks": 0, "consistency_n_mean": nan,
                "consistency_chance_mean": nan, "consistency_chance_lo": nan,
                "consistency_chance_hi": nan, "consistency_p": nan}
    observed = float(np.mean([c for _, c, _ in nulls]))
    reps = np.zeros(n_null)
    rng = np.random.default_rng([seed, len(nulls), 2**31 - 1])
    for _, _, chance in nulls:
        null = chance["null"]
        reps += null[rng.integers(0, null.size, n_null)] if chance["exact"] else null[:n_null]
    reps /= len(nulls)
    ge = int(np.count_nonzero(reps >= observed - 1e-12 * max(1.0, abs(observed))))
    return {"consistency_r": observed, "consistency_networks": len(nulls),
            "consistency_n_mean": float(np.mean([n for n, _, _ in nulls])),
            "consistency_chance_mean": float(reps.mean()),
            "consistency_chance_lo": float(np.quantile(reps, 0.025)),
            "consistency_chance_hi": float(np.quantile(reps, 0.975)),
            "consistency_p": float((1 + ge) / (1 + n_null))}

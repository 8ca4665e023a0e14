"""Scoring links against the demo's planted truth (code/demo_truth.json), for the end-to-end tests.

Independent of the code under test: it reads only the truth file the demo wrote and
the links tables the app wrote.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def truth_links(truth) -> set:
    """(atom, network, sign) of every planted coupling."""
    atoms = {name: s["atom_index"] for name, s in truth["plant"]["signals"].items()}
    return {(atoms[c["signal"]], c["network"], c["sign"]) for c in truth["couplings"]}


def found_links(path: Path) -> set:
    """(atom, network, sign) of every row of a links table."""
    df = pd.read_csv(path, sep="\t")
    return {(int(a), n, s) for a, n, s in zip(df["atom"], df["network"], df["sign"])}


def precision_recall(found: set, truth: set) -> tuple[float, float]:
    hits = len(found & truth)
    return hits / max(len(found), 1), hits / len(truth)

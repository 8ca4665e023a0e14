"""Organization metrics on a hand-made case with known answers."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.errors import DataError
from bids_llm_encode.networks.metrics import assignment_entropy, organization_metrics


@pytest.fixture
def case():
    t = np.linspace(0, 6 * np.pi, 200)
    s, c = np.sin(t), np.cos(t)  # orthogonal over whole periods: r(s, c) ~ 0
    atoms = np.column_stack([s, s, -s, c])  # r01 = 1, r02 = r12 = -1, r.3 = 0
    links = pd.DataFrame({
        "atom": [0, 1, 2, 3, 3],
        "network": ["Auditory", "Auditory", "Auditory", "Visual", "Language"],
        "sign": ["activation", "activation", "deactivation", "activation", "activation"],
    })
    layers = pd.DataFrame({"atom": [0, 1, 2, 3], "size": [3, 2, 1, 4],
                           "layer_00": [1, 0, 1, 4], "layer_01": [2, 2, 0, 0]})
    enc = np.array([0.0, 0.01, 0.02, 0.03, np.nan, 0.1])
    return atoms, links, layers, enc


def test_known_answers(case):
    atoms, links, layers, enc = case
    summary, per = organization_metrics(links, atoms, layers, 0.55, enc,
                                        networks=["Auditory", "Visual", "Language", "Default"])
    per = per.set_index("network")
    aud = per.loc["Auditory"]
    assert (aud.n_atoms_activate, aud.n_atoms_deactivate, aud.n_atoms_linked) == (2, 1, 3)
    # pairs (0,1)=1, (0,2)=-1, (1,2)=-1 -> mean -1/3
    assert aud.consistency_r == pytest.approx(-1 / 3, abs=1e-6)
    assert aud.consistency_r_activate == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(aud.consistency_r_deactivate)
    assert (aud.layer_00, aud.layer_01) == (2, 4)
    assert math.isnan(per.loc["Visual", "consistency_r"]) and per.loc["Visual", "consistency_n"] == 1
    assert per.loc["Default", "n_atoms_linked"] == 0 and per.loc["Default", "layer_00"] == 0
    # diversity: pairs 01:0, 02:0, 03:1, 12:0, 13:1, 23:1 -> 1 - |r| mean = 0.5
    assert summary["diversity_1_minus_abs_r"] == pytest.approx(0.5, abs=1e-3)
    # assignment: atoms 0,1,2 -> Auditory (3); atom 3 -> 0.5 Visual, 0.5 Language
    p = np.array([3, 0.5, 0.5]) / 4
    assert summary["assignment_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert summary["assignment_entropy_max_bits"] == pytest.approx(2.0)
    assert summary["n_linked_atoms"] == 4 and summary["n_links"] == 5
    assert summary["encoding_r2"]["median"] == pytest.approx(0.02)
    assert summary["encoding_r2"]["max"] == pytest.approx(0.1)
    assert summary["encoding_r2"]["n_voxels"] == 5
    assert summary["dictionary_r2"] == 0.55
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became None


def test_full_correspondence_table_uses_linked_rows_only(case):
    atoms, links, layers, enc = case
    full = links.assign(linked=[True, True, True, True, False])
    s, per = organization_metrics(full, atoms, layers, 0.5, enc)
    assert "Language" not in set(per.network)
    assert s["assignment_entropy_bits"] == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))


def test_entropy_extremes():
    one = pd.DataFrame({"atom": [0, 1, 2], "network": ["A"] * 3})
    even = pd.DataFrame({"atom": [0, 1, 2, 3], "network": ["A", "B", "C", "D"]})
    assert assignment_entropy(one) == 0.0
    assert assignment_entropy(even) == pytest.approx(2.0)
    assert math.isnan(assignment_entropy(one.iloc[:0]))


def test_bad_inputs(case):
    atoms, links, layers, enc = case
    with pytest.raises(DataError, match="outside"):
        organization_metrics(links.assign(atom=[0, 1, 2, 9, 3]), atoms, layers, 0.5, enc)
    with pytest.raises(DataError, match="signs"):
        organization_metrics(links.assign(sign="up"), atoms, layers, 0.5, enc)
    with pytest.raises(DataError, match="layer"):
        organization_metrics(links, atoms, layers[["atom", "size"]], 0.5, enc)

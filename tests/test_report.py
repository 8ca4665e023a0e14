"""HTML report and figures: build a report with every figure kind from small
synthetic data, then open it in headless Chromium and check that it loads with
no console message and that every figure decodes.

Chromium is driven with ``--dump-dom`` (no new Python dependency): the page's
tiny inline self-check marks ``<body data-figures-ok>`` after the load event,
and console messages come from ``--enable-logging=stderr`` ("CONSOLE" lines).
A negative control (a page with a broken image and a script error) shows that
the harness does catch both.
"""

from __future__ import annotations

import base64
import io
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure

from bids_llm_encode.errors import DataError, MissingInputError
from bids_llm_encode.networks.metrics import organization_metrics
from bids_llm_encode.networks.overlap import SIGNS, link_agreement
from bids_llm_encode.patterns.subgroups import subgroups
from bids_llm_encode.report import figures
from bids_llm_encode.report.html import Report
from browser import body_attrs, load_in_chromium


# ------------------------------------------------------------ synthetic data
def synthetic_data() -> dict:
    """Small inputs for every figure kind (seeded)."""
    rng = np.random.default_rng(0)
    tr, n_frames, K, n_layers = 1.5, 120, 12, 6
    t = (np.arange(n_frames) + 0.5) * tr
    atoms = rng.standard_normal((n_frames, K)).cumsum(axis=0)
    atoms /= np.linalg.norm(atoms, axis=0)
    onsets = np.sort(rng.uniform(10, 170, 300))
    X = rng.standard_normal((n_frames, 5)).cumsum(axis=0)
    # the tables come from the project's own producers, as in a run
    n_neurons = 20 * n_layers
    loadings = sp.random(K, n_neurons, density=0.2, format="csr", random_state=0,
                         data_rvs=rng.standard_normal)
    subs = subgroups(loadings, np.repeat(np.arange(n_layers), 20))
    nets = ["Visual", "Somatomotor", "Language", "Auditory", "Default"]

    def correspondence_table():
        return pd.DataFrame([(k, n, sign, float(rng.uniform(0, 0.5)), float(rng.uniform()),
                              bool(rng.random() < 0.15))
                             for k in range(K) for n in nets for sign in SIGNS],
                            columns=["atom", "network", "sign", "dice", "p", "linked"])

    corr = correspondence_table()
    agree = link_agreement([corr] + [correspondence_table() for _ in range(5)])
    _, per_net = organization_metrics(corr, atoms, subs, 0.55, rng.uniform(0, 0.1, 50),
                                      networks=nets)
    models = pd.DataFrame({"model": ["minilm", "smollm2", "gemma3"],
                           "atoms_per_network": rng.uniform(2, 9, 3),
                           "consistency": rng.uniform(0, 0.5, 3),
                           "diversity": rng.uniform(0.5, 1, 3),
                           "dictionary_r2": rng.uniform(0.4, 0.6, 3),
                           "encoding_r2": rng.uniform(0, 0.1, 3),
                           "note": ["a", "b", "c"]})
    runs = pd.DataFrame({"run": ["task-pieman_run-1", "task-pieman_run-2"], "n_frames": [300, 300],
                         "tr": [1.5, 1.5], "story_start": [15.0, 15.0],
                         "story_end": [430.0, 430.0], "n_words": [957, 957],
                         "story": ["pieman", "pieman"]})
    # a z map in MNI space (4 mm grid, MNI152 origin), one positive and one negative blob
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-90, -126, -72]
    z = np.zeros((46, 55, 46), dtype=np.float32)
    z[12:17, 22:27, 22:27] = 5.0
    z[30:34, 22:27, 22:27] = -4.0
    zimg = nib.Nifti1Image(z, affine)
    cv_r = rng.normal(0.02, 0.05, 2000)
    return dict(t=t, atoms=atoms, onsets=onsets, X=X, subs=subs, corr=corr,
                per_net=per_net, agree=agree, models=models, runs=runs, zimg=zimg, cv_r=cv_r)


@pytest.fixture(scope="module")
def data():
    return synthetic_data()


def all_figures(d) -> dict[str, Figure]:
    """One figure of every kind, keyed by the function's name."""
    return {
        "runs_timeline": figures.runs_timeline(d["runs"]),
        "neuron_timecourses": figures.neuron_timecourses(d["t"], d["X"], d["onsets"],
                                              [f"L{i}:u{7 * i}" for i in range(5)]),
        "atoms_figure": figures.atoms_figure(d["t"], d["atoms"], max_atoms=8),
        "subgroup_layers_figure": figures.subgroup_layers_figure(d["subs"]),
        "cv_r_histogram": figures.cv_r_histogram(d["cv_r"], d["cv_r"] > 0.1),
        "glass_brain": figures.glass_brain(d["zimg"], "atom 0: z map", threshold=3.1),
        "correspondence_heatmap": figures.correspondence_heatmap(d["corr"]),
        "network_involvement_bars": figures.network_involvement_bars(d["per_net"]),
        "consistency_figure": figures.consistency_figure(d["per_net"]),
        "group_agreement_figure": figures.group_agreement_figure(d["agree"]),
        "model_comparison_figure": figures.model_comparison_figure(d["models"]),
    }


@pytest.fixture(scope="module")
def figs(data) -> dict[str, Figure]:
    return all_figures(data)


def build_report(d, figs: dict[str, Figure]) -> tuple[Report, int]:
    rep = Report("Participant sub-01", subtitle="task-pieman, model smollm2-135m")
    rep.summary({"Participant": "sub-01", "Runs": 2, "Atoms": d["atoms"].shape[1]})
    n = 0
    for name, fig in figs.items():
        sec = rep.add_section(name.replace("_", " ").capitalize())
        sec.text(f"About {name} <b>not bold</b>.")
        sec.figure(fig, figures.CAPTIONS[name])
        n += 1
    tab = rep.add_section("Tables")
    tab.table(d["corr"], caption="Atom-network overlaps", max_rows=10)
    tab.keyvalues({"lambda": 1.0, "R^2": 0.55})
    rep.add_section("Group level").note("The group stage did not run: only one participant.",
                                        kind="missing")
    return rep, n


# --------------------------------------------------------------------- tests
def test_every_figure_kind_returns_a_drawable_figure(figs):
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue().startswith(b"\x89PNG"), name
        # a real drawing, not the "nothing to show" placeholder
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        assert not any("Nothing to show" in t for t in texts), name


def test_every_figure_kind_has_a_default_caption(figs):
    assert set(figures.CAPTIONS) == set(figs)


def test_figures_draw_what_they_are_given(data):
    fig = figures.atoms_figure(data["t"], data["atoms"], max_atoms=4)
    heat = fig.axes[1].get_images()[0].get_array()
    np.testing.assert_allclose(heat, np.corrcoef(data["atoms"], rowvar=False), atol=1e-12)
    assert len(fig.axes[0].get_lines()) == 4
    # the sub-group table, its long form and a plain matrix give the same heatmap
    subs = data["subs"]
    layer_cols = [c for c in subs.columns if c.startswith("layer_")]
    long = subs.melt(id_vars="atom", value_vars=layer_cols, var_name="layer",
                     value_name="n_neurons").assign(layer=lambda d: d.layer.str[6:].astype(int))
    mats = [figures.subgroup_layers_figure(t).axes[0].get_images()[0].get_array()
            for t in (subs, long, subs.set_index("atom")[layer_cols])]
    np.testing.assert_array_equal(mats[0], subs[layer_cols].to_numpy())
    np.testing.assert_array_equal(mats[0], mats[1])
    np.testing.assert_array_equal(mats[0], mats[2])
    # involvement bars: activating to the right, deactivating to the left, one per network
    per_net = data["per_net"]
    widths = [p.get_width() for p in figures.network_involvement_bars(per_net).axes[0].patches]
    n = len(per_net)
    assert widths[:n] == per_net["n_atoms_activate"].tolist()
    assert widths[n:] == (-per_net["n_atoms_deactivate"]).tolist()
    # long and wide model tables give the same bars
    models = data["models"].drop(columns="note")
    melted = models.melt(id_vars="model", var_name="metric", value_name="value")
    heights = [[p.get_height() for p in ax.patches]
               for ax in figures.model_comparison_figure(models).axes if ax.patches]
    heights_long = [[p.get_height() for p in ax.patches]
                    for ax in figures.model_comparison_figure(melted).axes if ax.patches]
    assert heights == heights_long and len(heights) == models.shape[1] - 1
    # the histogram legend counts the significant voxels
    sig = data["cv_r"] > 0.1
    legend = [t.get_text() for t in figures.cv_r_histogram(data["cv_r"], sig).axes[0]
              .get_legend().get_texts()]
    assert any(f"significant (n = {int(sig.sum())}," in t for t in legend)


def test_consistency_and_comparison_show_counts_and_chance(data):
    nets = [*data["per_net"]["network"], "Limbic"]  # a network no atom is linked to
    _, per = organization_metrics(data["corr"], data["atoms"], data["subs"], 0.5, np.zeros(3), networks=nets)
    has = per["consistency_chance_lo"].notna()
    assert has.any() and (~has).any()  # networks with and without a consistency
    ax = figures.consistency_figure(per).axes[0]
    bands = [(p.get_x(), p.get_x() + p.get_width()) for p in ax.patches]
    np.testing.assert_allclose(bands, per.loc[has, ["consistency_chance_lo", "consistency_chance_hi"]])
    texts = [t.get_text() for t in ax.texts]
    assert [t.split(",")[0].split(":")[0].strip() for t in texts] == \
        [f"n = {n}" for n in per["consistency_n"]]
    # model comparison: the chance columns are drawn on their metric's panel, not as panels
    models = pd.DataFrame({"model": ["bert", "llama"], "consistency_r": [0.4, 0.5],
                           "consistency_chance_mean": [0.3, 0.32], "consistency_chance_lo": [0.2, 0.25],
                           "consistency_chance_hi": [0.45, 0.4], "consistency_networks": [3, 5],
                           "consistency_n_mean": [3.0, 4.2], "consistency_p": [0.2, 0.01],
                           "diversity_1_minus_abs_r": [0.85, 0.8],
                           "diversity_chance_1_minus_abs_r": [0.92, 0.9], "dictionary_r2": [0.5, 0.4]})
    fig = figures.model_comparison_figure(models)
    panels = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in panels] == ["consistency r", "diversity 1 minus abs r", "dictionary r2"]
    cons = panels[0]
    chance_bars = [(p.get_y(), p.get_y() + p.get_height()) for p in cons.patches
                   if p.get_x() + p.get_width() / 2 > round(p.get_x() + p.get_width() / 2)]  # right of tick
    np.testing.assert_allclose(chance_bars, [(0.2, 0.45), (0.25, 0.4)])
    labels = [t.get_text() for t in cons.get_xticklabels()]
    assert labels == ["bert\n3 nets, 3.0 atoms", "llama\n5 nets, 4.2 atoms"]
    # the reports' per-network table and summary: each value beside its count and chance level
    from bids_llm_encode.workflows.report import metrics_keyvalues, network_metrics_table

    table = network_metrics_table(per)
    assert table["n (atoms linked)"].tolist() == per["consistency_n"].tolist()
    assert table["chance 95 %"].iloc[-1] == "n/a" and " to " in table["chance 95 %"].iloc[0]
    summary, _ = organization_metrics(data["corr"], data["atoms"], data["subs"], 0.5, np.zeros(3),
                                      diversity_chance={"diversity_1_minus_abs_r": 0.9})
    kv = metrics_keyvalues(summary)
    assert "chance" in kv["mean consistency over networks (mean |r|)"]
    assert kv["diversity (mean 1 - |r|)"].endswith("chance 0.900 (atoms learned from circularly shifted neurons)")
    assert not any(k.startswith(("consistency_", "diversity_")) for k in kv)


def test_empty_inputs_give_a_nothing_to_show_figure():
    empty = pd.DataFrame()
    figs = [figures.runs_timeline(empty), figures.subgroup_layers_figure(empty),
            figures.correspondence_heatmap(empty), figures.network_involvement_bars(empty),
            figures.group_agreement_figure(empty), figures.model_comparison_figure(empty),
            figures.consistency_figure(empty),
            figures.neuron_timecourses([], np.zeros((0, 0)), [], []),
            figures.atoms_figure([], np.zeros((0, 0))),
            figures.cv_r_histogram([], []),
            figures.glass_brain(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)), "z")]
    for fig in figs:
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        assert any(t.startswith("Nothing to show") for t in texts)


def test_inconsistent_inputs_raise_dataerror(data):
    with pytest.raises(DataError, match="frame_times"):
        figures.atoms_figure(data["t"][:-1], data["atoms"])
    with pytest.raises(DataError, match="n_words"):
        figures.runs_timeline(data["runs"].drop(columns="n_words"))
    with pytest.raises(DataError, match="direction"):
        figures.correspondence_heatmap(data["corr"].assign(sign="sideways"))
    with pytest.raises(MissingInputError, match="nope.nii.gz"):
        figures.glass_brain("/nonexistent/nope.nii.gz", "z")
    with pytest.raises(DataError, match="3D"):
        figures.glass_brain(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), "z")
    with pytest.raises(DataError, match="significant"):
        figures.cv_r_histogram(data["cv_r"], data["cv_r"][:5] > 0)


def test_correspondence_signs_and_links(data):
    corr = pd.DataFrame({"atom": [0, 0, 1], "network": ["A", "A", "B"],
                         "direction": ["activation", "deactivation", "-"],
                         "dice": [0.2, 0.4, 0.3], "linked": [True, False, True]})
    atoms, nets, values, marks = figures._correspondence_matrix(corr, "t")
    assert atoms == [0, 1] and nets == ["A", "B"]
    assert values[0, 0] == pytest.approx(-0.4)  # the stronger (deactivation) wins
    assert values[1, 1] == pytest.approx(-0.3)
    assert marks[0, 0] == "+" and marks[1, 1] == "\u2212" and marks[0, 1] == ""


def test_figures_are_closed_and_report_is_self_contained(data, figs):
    import matplotlib.pyplot as plt

    rep, n = build_report(data, figs)
    fig = plt.figure()  # a pyplot figure must be closed after rendering
    rep.add_section("Pyplot").figure(fig, "A pyplot figure.")
    assert not plt.fignum_exists(fig.number)
    page = rep.to_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"https?://", page), "the report references a network resource"
    assert "@import" not in page and "url(" not in page
    assert page.count("<img ") == n + 1
    assert page.count('alt="') == n + 1
    # text is escaped, the summary comes first, sections have anchors in the navbar
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page
    assert page.index('id="summary"') < page.index('class="report-section"')
    for sec in rep.sections:
        assert f'href="#{sec.anchor}"' in page and f'id="{sec.anchor}"' in page
    # truncated table says so
    assert f"showing the first 10 of {len(data['corr'])} rows" in page


def test_missing_note_is_plain_and_flagged():
    rep = Report("sub-02")
    sec = rep.add_section("Encoding")
    sec.note("Encoding did not run: no BOLD run matched.", kind="missing")
    ok = rep.add_section("Atoms")
    ok.note("Computed once per story.", kind="info")
    page = rep.to_html()
    assert '<div class="note note-missing">Encoding did not run: no BOLD run matched.</div>' in page
    assert 'class="flag-missing">Encoding</a>' in page  # flagged in the navbar
    assert 'href="#atoms">Atoms</a>' in page  # an info note flags nothing
    summary = page[page.index('id="summary"'):page.index("</section>", page.index('id="summary"'))]
    assert "Encoding" in summary and "not available" in summary
    with pytest.raises(ValueError, match="kind"):
        sec.note("x", kind="error")


def test_anchors_unique_and_png_bytes_accepted():
    rep = Report("r")
    a, b = rep.add_section("Maps"), rep.add_section("Maps")
    assert a.anchor == "maps" and b.anchor == "maps-2"
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    a.figure(buf.getvalue(), "Raw PNG.")
    assert base64.b64encode(buf.getvalue()).decode() in rep.to_html()
    with pytest.raises(ValueError, match="PNG"):
        a.figure(b"GIF89a....", "not a png")


def test_report_loads_in_headless_chromium(data, figs, tmp_path, chromium):
    rep, n = build_report(data, figs)
    page = tmp_path / "sub-01.html"
    page.write_text(rep.to_html())
    dom, console = load_in_chromium(chromium, page, tmp_path / "profile")
    assert console == [], f"console messages: {console}"
    attrs = body_attrs(dom)
    assert attrs.get("data-figures-total") == str(n), attrs
    assert attrs.get("data-figures-loaded") == str(n), attrs
    assert attrs.get("data-figures-ok") == "true", attrs
    assert "The group stage did not run" in dom


def test_chromium_harness_catches_broken_pages(tmp_path, chromium):
    """Negative control: a broken image and a script error must both be seen."""
    html = Report("broken").to_html()
    bad = html.replace(
        "</main>",
        '<img src="data:image/png;base64,AAAA" alt="broken"><script>undefinedCall();</script></main>')
    page = tmp_path / "broken.html"
    page.write_text(bad, encoding="utf-8")
    dom, console = load_in_chromium(chromium, page, tmp_path / "profile")
    assert any("undefinedCall" in line for line in console), console
    attrs = body_attrs(dom)
    assert attrs.get("data-figures-ok") == "false" and attrs.get("data-figures-loaded") == "0"

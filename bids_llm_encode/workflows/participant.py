"""The participant level: one straight line of stages per participant.

    inputs (PyBIDS) -> per story: words -> neurons -> atoms [cached, shared]
                    -> per story: confounds + BOLD -> encoding maps
                    -> maps x network atlases -> links -> metrics
                    -> derivatives + sub-X.html

Only this module (and ``group.py``) knows the order of stages.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path  # noqa: F401

import nibabel as nib
import numpy as np
import pandas as pd

from ..bids.images import AFFINE_ATOL_MM, Grayordinates, check_mask, cifti_grid, load_bold, unmask
from ..bids.inputs import find_runs, find_runs_and_stories, run_summary
from ..bids.outputs import DerivativesWriter, label, model_label  # noqa: F401 - label: for importers
from ..bids.outputs import OutputFiles as ParticipantFiles
from ..bids.validate import validate_dataset
from ..cache import Cache, cache_root
from ..config import Config
from ..encoding.stats import MIN_CEILING, ceiling_fraction
from ..errors import DataError, UsageError
from ..networks.atlases import check_user_atlases
from ..records import Atlas, Dictionary, EncodingResult, RunInputs, Story, WordActivations
from . import stimulus

log = logging.getLogger(__name__)


def run_participant_level(config: Config) -> None:
    """Run every selected participant, one after the other; see the module docstring."""
    t0 = time.perf_counter()
    cache = Cache(cache_root(config))
    if config.skip_bids_validation:
        log.info("BIDS validation skipped (--skip-bids-validation)")
    else:
        validate_dataset(config.bids_dir)
        log.info("BIDS validation of %s: no errors", config.bids_dir)
    model_scope = config.dictionary_scope == "model"
    if model_scope:  # the dataset's stories, whatever the participant labels select (one dictionary)
        runs, stories = find_runs_and_stories(config)
    else:
        runs = find_runs(config)  # every run's images, confounds and events checked (exit 65 naming a file)
    check_user_atlases(config.fbn_atlas)  # a broken --fbn-atlas file: exit 65 before the model runs
    by_subject: dict[str, list[RunInputs]] = defaultdict(list)
    for run in runs:
        by_subject[run.subject].append(run)
    for subject_runs in by_subject.values():
        story_groups(subject_runs)  # output names distinct (exit 64), before the model runs
    log.info("found %d run(s) of %d participant(s): %s", len(runs), len(by_subject),
             ", ".join(f"sub-{s}" for s in sorted(by_subject)))
    writer = DerivativesWriter(config.output_dir, config)
    shared = model_level_dictionary(stories, config, cache, writer) if model_scope else None
    for i, subject in enumerate(sorted(by_subject), 1):
        log.info("[%d/%d] participant sub-%s", i, len(by_subject), subject)
        # first: no completion record while this participant's outputs are being (re)written
        ParticipantFiles(writer, config.space).completion(subject).unlink(missing_ok=True)
        writer.remove_temps(writer.subject_dir(subject))  # leftovers of a killed run of this participant
        writer.write_config(config.resolved(), "participant", subject)
        Participant(subject, by_subject[subject], config, cache, writer, shared).run()
    log.info("participant level done in %.0f s; outputs in %s", time.perf_counter() - t0,
             config.output_dir)


@dataclass
class SharedDictionary:
    """The model-level dictionary (``--dictionary-scope model``) and what goes with it, for every story."""

    stories: list  # of Story: what it was learned on
    dictionary: Dictionary  # atoms: every story's frames (info["stories"] says whose)
    diversity_chance: dict
    subgroups: pd.DataFrame
    key: str  # its cache key: names it in the completion records (the group level checks them)


def model_level_dictionary(stories: list[Story], config: Config, cache: Cache,
                           writer: DerivativesWriter) -> SharedDictionary:
    """Learn (or read from the cache) the model-level dictionary and write its files once.

    The first of several participant jobs started at once learns it; the others wait on the
    cache's lock and read it (``workflows.stimulus.model_dictionary``).
    """
    from ..patterns.subgroups import subgroups as subgroup_table

    dic = stimulus.model_dictionary(stories, config, cache)
    div = stimulus.model_diversity_chance(stories, config, cache)
    acts = stimulus.story_activations(stories[0], config, cache)  # the neurons' layers (the same for all)
    sub_df = subgroup_table(dic.loadings, acts.layer, mode=config.subgroup)
    key = stimulus.model_dictionary_key(stories, config, cache)
    write_model_outputs(writer, stories, acts, dic, sub_df, config, div, key)
    return SharedDictionary(stories, dic, div, sub_df, key)


def prepare_dictionary(config: Config) -> SharedDictionary:
    """The cluster's first step (``bids_llm_encode-slurm``): the model-level dictionary into the cache
    and its files into ``output_dir``, before the participant array starts."""
    from ..bids.inputs import dataset_stories

    cache = Cache(cache_root(config))
    return model_level_dictionary(dataset_stories(config), config, cache,
                                  DerivativesWriter(config.output_dir, config))


@dataclass
class StoryResult:
    """What one participant's encoding of one story produced (for the report)."""

    story: Story
    activations: WordActivations
    dictionary: Dictionary
    encoding: EncodingResult
    mask_img: object  # the brain mask (Nifti1Image), or Grayordinates for a CIFTI run
    correspondence: dict  # atlas name -> DataFrame
    metrics: dict  # atlas name -> (summary dict, per-network DataFrame)
    subgroups: pd.DataFrame


class Participant:
    """All stages for one participant; ``run()`` writes its derivatives and ``sub-X.html``."""

    def __init__(self, subject: str, runs: list[RunInputs], config: Config, cache: Cache,
                 writer: DerivativesWriter, shared: SharedDictionary | None = None):
        self.subject, self.runs, self.config, self.cache, self.writer = subject, runs, config, cache, writer
        self.shared = shared  # the model-level dictionary; None: one per story (--dictionary-scope story)
        self.files = ParticipantFiles(writer, config.space)

    def run(self) -> None:
        from ..report.html import Report

        cfg = self.config
        report = Report(f"Participant sub-{self.subject}",
                        subtitle=f"model {cfg.model} · dataset {cfg.bids_dir.name}")
        summary = self.write_summary()
        from .report import participant_inputs_section, participant_story_sections

        participant_inputs_section(report, summary, self.runs)
        groups = story_groups(self.runs)
        completed = []
        for (session, story_name), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            tasks = sorted({r.task for r in runs})
            log.info("sub-%s: story %s (task %s%s), %d run(s)", self.subject, story_name, ", ".join(tasks),
                     f", session {session}" if session else "", len(runs))
            result = self.process_story(runs)
            participant_story_sections(report, result, cfg, self.writer)
            completed.append({"story": story_name, "session": session, "tasks": tasks,
                              "entities": self.files.story_entities(self.subject, session, story_name),
                              "runs": [r.bold.name for r in runs]})
        report.summary({"participant": f"sub-{self.subject}", "runs": len({r.bold for r in self.runs}),
                        "stories": len(groups), "model": cfg.model})
        self.writer.write_text(report.to_html(), self.files.report(self.subject))
        self.write_completion(completed)

    def write_completion(self, completed: list[dict]) -> None:
        """The completion record, written last: the group level uses only participants that have one."""
        from .. import __version__

        cfg = self.config
        self.writer.write_json({
            "Description": "This participant's run finished: every output of the stories below is "
                           "written. Written last (atomically); removed first when the participant is "
                           "rerun. The group level uses only participants with this record.",
            "participant": self.subject, "bids_llm_encode": __version__, "model": cfg.model,
            "space": cfg.space, "n_atoms": cfg.n_atoms, "atom_model": cfg.atom_model,
            "dictionary_scope": cfg.dictionary_scope,
            "dictionary": self.shared.key if self.shared is not None else None,
            "fbn_atlas": list(cfg.fbn_atlas),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stories": completed,
        }, self.files.completion(self.subject), sources=[r.bold for r in self.runs])

    # ------------------------------------------------------------------ inputs
    def write_summary(self) -> pd.DataFrame:
        rows = [run_summary(r) for r in self.runs]
        df = pd.DataFrame(rows)
        path = self.files.summary(self.subject)
        self.writer.write_tsv(df, path, {
            "Description": "One row per BOLD run found: timing, frames, words and the story span.",
            "tr": {"Description": "repetition time", "Units": "s"},
            "story_onset": {"Description": "scan time at which the story audio starts", "Units": "s"},
            "n_unaligned": {"Description": "words the aligner could not place (times interpolated)"},
            "story_first_frame": {"Description": "first frame inside the story (0-based)"},
            "story_last_frame": {"Description": "last frame inside the story (0-based)"},
        }, sources=[r.bold for r in self.runs] + [r.events for r in self.runs])
        for r in self.runs:
            log.info("sub-%s %s: TR %.3g s, %d frames, %d words (%d unaligned), story onset %.2f s",
                     self.subject, r.bold.name, r.tr, r.n_frames, r.story.n_words,
                     r.story.n_unaligned, r.story_onset)
        return df

    # ------------------------------------------------------------------ stages
    def process_story(self, runs: list[RunInputs]) -> StoryResult:
        from ..encoding.confounds import load_confounds
        from ..encoding.fit import RunData, fit_encoding
        from ..patterns.subgroups import subgroups as subgroup_table

        cfg, writer = self.config, self.writer
        story = runs[0].story
        if self.shared is not None:  # the model-level dictionary: the same atoms for every story
            acts = stimulus.story_activations(story, cfg, self.cache)
            dic, div_chance, sub_df = self.shared.dictionary, self.shared.diversity_chance, self.shared.subgroups
            write_story_atoms(writer, story, acts, dic, cfg, self.shared.key)
        else:
            acts, dic = stimulus.story_dictionary(story, cfg, self.cache)
            div_chance = stimulus.diversity_chance(story, acts, cfg, self.cache)
            sub_df = subgroup_table(dic.loadings, acts.layer, mode=cfg.subgroup)
            write_stimulus_outputs(writer, story, acts, dic, sub_df, cfg, div_chance)

        mask_img = _common_mask(runs)
        mask = mask_img if isinstance(mask_img, Grayordinates) else np.asarray(mask_img.dataobj) > 0
        ent = self.files.story_entities(self.subject, runs[0].session, story.name)
        baselines = [stimulus.run_baselines(r, r.frame_times - r.story_onset, cfg) for r in runs]
        names = [n for n in baselines[0][1] if all(n in b[1] for b in baselines)]  # a column can drop in a run
        data = []
        for r, (B, bnames) in zip(runs, baselines):
            B = B[:, [bnames.index(n) for n in names]] if names else None
            Y = load_bold(r.bold, mask)  # (frames, voxels); a broken file is exit 65 naming it
            conf, sample_mask = load_confounds(r.bold, r.confounds, cfg.confounds_strategy, cfg.scrub)
            design = stimulus.run_design(r.frame_times - r.story_onset, story, acts, dic, cfg)
            writer.write_tsv(pd.DataFrame(design, columns=atom_names(dic.n_atoms)),
                             self.files.design(self.files.run_entities(r)),
                             {"Description": "Regressors of the encoding model: the atoms' time courses "
                              "at this run's frames (least-squares projection of the run's neuron "
                              "series on the story's fixed loadings), before confound regression.",
                              "RepetitionTime": r.tr, "StoryOnset": r.story_onset},
                             sources=[r.bold, r.events, story.source])
            if names:
                writer.write_tsv(pd.DataFrame(B, columns=names), self.files.design(self.files.run_entities(r), "baselines"),
                                 {"Description": "Low-level baseline regressors at this run's frames "
                                  "(HRF-convolved, z-scored; signal/baselines.py): the encoding's second "
                                  "feature space, also in the model of the atoms' effect maps.",
                                  "RepetitionTime": r.tr, "StoryOnset": r.story_onset},
                                 sources=[r.bold, r.events, story.source])
            data.append(RunData(Y=Y, design=design, confounds=conf, sample_mask=sample_mask,
                                repeat_group=story.name, name=r.bold.name,
                                story_frames=_story_frames(r), story_time=r.frame_times - r.story_onset,
                                story_end=float(np.nanmax(story.ends)), baseline=B))
        log.info("sub-%s story %s: baselines %s", self.subject, story.name, ", ".join(names) or "none")
        enc = fit_encoding(data, cv_folds=cfg.cv_folds, n_permutations=cfg.n_permutations,
                           n_targets_batch=voxel_batch(cfg.mem_mb, sum(d.Y.shape[0] for d in data)),
                           fdr_alpha=cfg.fdr_alpha, seed=cfg.seed, atom_model=cfg.atom_model,
                           backend="torch_cuda" if stimulus.torch_device(cfg.device) == "cuda" else "numpy")
        sources = [r.bold for r in runs] + [r.mask for r in runs if r.mask] + [r.confounds for r in runs]
        enc.info["baseline_names"] = names
        enc.info["TaskName"] = ", ".join(sorted({r.task for r in runs}))  # the BIDS task(s) of the story
        self.write_encoding_maps(enc, mask_img, ent, sources)

        corr, metrics = {}, {}
        for atlas in self.atlases(mask_img):
            corr[atlas.name], metrics[atlas.name] = self.networks(atlas, enc, dic, sub_df, mask_img,
                                                                  ent, sources, div_chance)
        view = story_view(dic, story, acts, cfg) if self.shared is not None else dic  # the report's atoms
        return StoryResult(story, acts, view, enc, mask_img, corr, metrics, sub_df)

    def write_encoding_maps(self, enc: EncodingResult, mask_img, ent: dict, sources) -> None:
        writer, cfg = self.writer, self.config
        info = {k: v for k, v in enc.info.items() if isinstance(v, (int, float, str, bool))}
        names = atom_names(enc.effect.shape[0])
        base = enc.info.get("baseline_names") or []
        with_base = f", with the baselines ({', '.join(base)}) in the model" if base else ""
        for k, name in enumerate(names):
            model = ("the regression of the voxel on this atom alone (slope = r)"
                     if cfg.atom_model == "marginal" else "all atoms in one OLS model") + with_base
            for stat, values, what in (("effect", enc.effect[k], "effect size (z-scored BOLD per "
                                        f"unit of the z-scored atom regressor; {model})"),
                                       ("variance", enc.variance[k], "variance of the effect (OLS "
                                        "variance calibrated by the circular-shift null)"),
                                       ("z", enc.z[k], "z statistic of the effect, calibrated on the "
                                        "circular-shift null of the design (docs/encoding.md)")):
                writer.write_image(unmask(values, mask_img, nan=None if stat == "variance" else 0.0),
                                   self.files.statmap(ent, name, stat),
                                   {"Description": f"Atom {k}: {what}.", "Atom": k, "Statistic": stat,
                                    "Model": cfg.model, **info}, sources)
        voxel_maps = [
            ("cv", "r", enc.cv_r, "Cross-validated Pearson r between held-out BOLD and the ridge "
             "prediction from the atoms."),
            ("cv", "rsquared", enc.cv_r2, "Cross-validated R^2 (1 - SSE/SST on held-out data)."),
            ("cv", "p", enc.p, "One-sided p-value of the CV r under the circular-shift null."),
            ("insample", "rsquared", enc.in_sample_r2, "In-sample R^2 of the OLS fit of all atoms. "
             "Not a result by itself: compare it with its chance level (desc-insamplechance)."),
        ]
        if enc.in_sample_r2_chance is not None:
            voxel_maps.append(("insamplechance", "rsquared", enc.in_sample_r2_chance, "Chance level of "
                               "the in-sample R^2: its mean when the design is circularly shifted."))
        if enc.noise_ceiling is not None:
            voxel_maps.append(("noiseceiling", "r", enc.noise_ceiling, "Ceiling of a single-run "
                               "prediction's r: sqrt of the correlation between presentations of the "
                               "story (story frames, aligned by story time)."))
            voxel_maps.append(("cvceiling", "fraction", ceiling_fraction(enc.cv_r, enc.noise_ceiling),
                               f"CV r as a fraction of the noise ceiling, where the ceiling is at least "
                               f"{MIN_CEILING} (0 elsewhere: not estimable)."))
        if enc.cv_r2_unique is not None:
            voxel_maps += [
                ("cvbaseline", "rsquared", enc.cv_r2_baseline, "Cross-validated R^2 of the low-level "
                 f"baselines alone ({', '.join(base)}; OLS)."),
                ("cvjoint", "rsquared", enc.cv_r2_joint, "Cross-validated R^2 of the baselines "
                 "(unpenalized) and the atoms (ridge) together."),
                ("cvunique", "rsquared", enc.cv_r2_unique, "The atoms' unique cross-validated R^2: "
                 "joint minus baselines alone."),
                ("cvunique", "r", enc.cv_r_unique, "Test statistic of the unique part: r between the "
                 "atoms' part of the joint prediction and the held-out BOLD less the baselines' "
                 "prediction (mean over folds)."),
                ("cvunique", "p", enc.p_unique, "One-sided p of the unique part under the circular-shift "
                 "null of the atoms, the baselines kept in place (docs/encoding.md)."),
            ]
        for desc, stat, values, text in voxel_maps:
            writer.write_image(unmask(values, mask_img, outside=1.0 if stat == "p" else 0.0),
                               self.files.statmap(ent, desc, stat),
                               {"Description": text, **info}, sources)
        writer.write_image(unmask(enc.significant.astype(np.uint8), mask_img, dtype=np.uint8),
                           self.files.fdr_mask(ent),
                           {"Description": f"Voxels whose CV r is significant at FDR "
                            f"{cfg.fdr_alpha} (Benjamini-Hochberg over the mask)."}, sources)
        if enc.significant_unique is not None:
            writer.write_image(unmask(enc.significant_unique.astype(np.uint8), mask_img, dtype=np.uint8),
                               self.files.fdr_mask(ent, "uniquefdr"),
                               {"Description": f"Voxels where the atoms' unique part (beyond the "
                                f"baselines) is significant at FDR {cfg.fdr_alpha}."}, sources)

    def atlases(self, mask_img) -> list[Atlas]:
        from ..networks.atlases import load_atlas

        return [load_atlas(spec, mask_img, cache=self.cache, space=self.config.space)
                for spec in self.config.fbn_atlas]

    def networks(self, atlas: Atlas, enc: EncodingResult, dic: Dictionary, sub_df: pd.DataFrame,
                 mask_img, ent: dict, sources, diversity_chance: dict | None = None):
        from ..networks.metrics import PER_NETWORK_COLUMNS, linkable_atoms, organization_metrics
        from ..networks.overlap import NULL_COLUMNS, correspondence, links_table, null_meta
        from ..patterns.consensus import linkable_atoms as stable_atoms

        cfg, writer = self.config, self.writer
        corr = correspondence(enc.z, mask_img, atlas, threshold=cfg.map_threshold, map_rule=cfg.map_rule,
                              null=cfg.fbn_null, n_null=cfg.n_spatial_null, n_spins=cfg.n_spins,
                              seed=cfg.seed, fdr_alpha=cfg.fdr_alpha, min_dice=cfg.min_dice,
                              stable=stable_atoms(dic, cfg.min_stability), cache=self.cache)
        atlas_meta = {"Atlas": atlas.name, "MapThreshold": cfg.map_threshold, "MapRule": cfg.map_rule,
                      "SpatialNulls": cfg.n_spatial_null, "FDRAlpha": cfg.fdr_alpha,
                      "MinStability": cfg.min_stability, **null_meta(corr)}
        writer.write_tsv(corr, self.files.table(ent, atlas.name, "overlap"),
                         {"Description": "Overlap of each atom's thresholded z map (activation: z > "
                          "threshold; deactivation: z < -threshold) with each network.", **atlas_meta,
                          "stable": {"Description": "the atom reproduces over the dictionary's restarts "
                                     "(stability >= MinStability); only stable atoms are linked, and q is "
                                     "the FDR over their tests (NaN for the others)"}, **NULL_COLUMNS},
                         sources)
        links = links_table(corr)
        writer.write_tsv(links, self.files.table(ent, atlas.name, "links"),
                         {"Description": "Atom -> network links (FDR-significant overlaps), and so "
                          "AN sub-group -> network.", **atlas_meta, **NULL_COLUMNS}, sources)
        summary, per_network = organization_metrics(
            corr, dic.atoms, sub_df, dic.r2, enc.cv_r2, networks=list(atlas.labels),
            eligible=linkable_atoms(corr, dic.n_atoms), n_null=cfg.n_consistency_null, seed=cfg.seed,
            diversity_chance=diversity_chance)
        writer.write_tsv(per_network, self.files.table(ent, atlas.name, "networks"),
                         {"Description": "Organization metrics per network (method.md section 6).",
                          **PER_NETWORK_COLUMNS, **atlas_meta,
                          "ConsistencyNullSets": cfg.n_consistency_null,
                          "ConsistencyPool": "linkable atoms (a non-empty thresholded map)"}, sources)
        writer.write_json(dict(summary, atlas=atlas.name, model=self.config.model),
                          self.files.table(ent, atlas.name, "metrics", ".json"), sources)
        log.info("sub-%s %s: %d atom -> network link(s)", self.subject, atlas.name, len(links))
        return corr, (summary, per_network)


def story_groups(runs: list[RunInputs]) -> dict[tuple, list[RunInputs]]:
    """(session, story) -> its runs: each story of a session is one analysis, with its own atoms.

    A run with two stories is in two groups (one segment each). Runs of one story must
    have distinct output names (``OutputFiles.run_entities``: sub, ses, story, run); two
    runs of the story under different tasks without run numbers would not: refused
    (exit 64) with the files named.
    """
    groups: dict[tuple, list[RunInputs]] = defaultdict(list)
    for run in runs:
        groups[(run.session, run.story.name)].append(run)
    named: dict[tuple, tuple] = {}
    for key, members in groups.items():
        seen: dict[tuple, RunInputs] = {}
        for r in members:
            ent = tuple(sorted(ParticipantFiles.run_entities(r).items()))
            if ent in seen:
                raise UsageError(f"{seen[ent].raw_bold} and {r.raw_bold}: two runs of story {r.story.name!r} "
                                 "would get the same output names (same session and run number under "
                                 "different tasks); select one with --task-label")
            seen[ent] = r
        out = tuple(sorted(ParticipantFiles.story_entities(members[0].subject, key[0], key[1]).items()))
        if out in named:
            raise UsageError(f"stories {named[out][1]!r} and {key[1]!r} have the same letters and digits, "
                             "which name their outputs; rename one (its alignment folder and stim_file)")
        named[out] = key
    return groups


def voxel_batch(mem_mb, n_frames: int) -> int:
    """Voxels encoded at once: 20,000 by default, or what ``--mem-mb`` allows.

    The encoding holds about 16 float32 arrays of (frames x batch) at a time.
    """
    if not mem_mb:
        return 20000
    return int(np.clip(mem_mb * 2**20 / (16 * 4 * max(n_frames, 1)), 1000, 200000))


def atom_names(n_atoms: int) -> list[str]:
    return [f"atom{k:02d}" for k in range(n_atoms)]


def write_stimulus_outputs(writer: DerivativesWriter, story: Story, acts: WordActivations,
                           dic: Dictionary, sub_df: pd.DataFrame, cfg: Config,
                           diversity_chance: dict | None = None) -> None:
    """The per-story, per-model files shared by all participants.

    Written once per settings: a rerun into the same folder with other
    dictionary settings rewrites them (and warns: earlier participants' maps
    belong to the old atoms).
    """

    from ..cache import digest
    from ..patterns.consensus import STABILITY_COLUMNS, stability_table
    from ..patterns.subgroups import loadings_table

    model, files = model_label(cfg), ParticipantFiles(writer, cfg.space)
    card_path = files.story(story.name, model, "modelcard")
    settings = digest(acts.card.get("cache_key"), dic.atoms.shape, dic.alpha, cfg.n_atoms, cfg.sparsity,
                      cfg.seed, cfg.atom_tr, cfg.hrf, cfg.subgroup, cfg.an_centering, cfg.restarts,
                      cfg.min_stability, "diversity-chance" if diversity_chance is not None else None)
    if _card_is_current(card_path, "settings_digest", settings, "the story's files",
                        "written with other settings"):
        return
    src = [story.source]
    names = atom_names(dic.n_atoms)
    atoms = pd.DataFrame(dic.atoms, columns=names)
    atoms.insert(0, "time", dic.frame_times)
    writer.write_tsv(atoms, files.story(story.name, model, "atoms"),
                     {"Description": "Atom time courses (dictionary D, unit-norm columns) on the story's "
                      "reference grid.", "time": {"Description": "time from the start of the story "
                      "audio", "Units": "s"}, "DictionaryR2": dic.r2, "Objective": dic.objective,
                      "Alpha": dic.alpha}, src)
    writer.write_npz(dic.loadings, files.story(story.name, model, "loadings"),
                     {"Description": "Sparse loadings A (atoms x neurons), scipy.sparse CSR "
                      "(scipy.sparse.load_npz)."}, src)
    writer.write_tsv(loadings_table(dic.loadings, acts.layer, acts.unit),
                     files.story(story.name, model, "loadings_table"),
                     {"Description": "Non-zero loadings, long format: atom, neuron (column of X), "
                      "layer, unit within layer, loading."}, src)
    writer.write_tsv(sub_df, files.story(story.name, model, "subgroups"),
                     {"Description": f"AN sub-group of each atom ({cfg.subgroup}): size, signs and "
                      "histogram over layers."}, src)
    table = stability_table(dic, cfg.min_stability)
    writer.write_tsv(table, files.story(story.name, model, "stability"),
                     {"Description": f"Stability of each atom over the {cfg.restarts} restarts of the consensus "
                      "dictionary (docs/patterns.md, 'Stable atoms'); atoms that are not linkable stay in "
                      "every output but are not linked to networks.",
                      **{k: {"Description": v} for k, v in STABILITY_COLUMNS.items()},
                      "Restarts": cfg.restarts, "MinStability": cfg.min_stability,
                      "NLinkable": int(table["linkable"].sum())}, src)
    X = stimulus.neuron_series(story, acts, dic.frame_times, cfg)
    writer.write_npy(X.astype(np.float16), files.story(story.name, model, "neurons"),
                     {"Description": "Neuron frame series X (frames x neurons, z-scored, float16) on "
                      "the reference grid of atoms.tsv; numpy.load. Columns follow loadings.tsv's "
                      "neuron index.", "FrameTimes": dic.frame_times.tolist()}, src)
    writer.write_json(dict(acts.card, dictionary_r2=dic.r2, n_atoms=dic.n_atoms, alpha=dic.alpha,
                           sparsity=cfg.sparsity, atom_tr=cfg.atom_tr, hrf=cfg.hrf, an_centering=cfg.an_centering,
                           subgroup=cfg.subgroup, restarts=cfg.restarts, min_stability=cfg.min_stability,
                           dictionary=_card_info(dic.info), diversity_chance=diversity_chance,
                           settings_digest=settings),
                      card_path, src)


#: Fields of a story's activations card that are not the model's (left out of the model-level card).
_STORY_CARD_FIELDS = ("story", "n_words", "n_tokens", "seconds", "cache_key", "n_windows", "stored_dtype",
                      "forward_tokens", "tokens_per_s", "forward_tokens_per_s", "batch_size")


def write_model_outputs(writer: DerivativesWriter, stories: list[Story], acts: WordActivations,
                        dic: Dictionary, sub_df: pd.DataFrame, cfg: Config, diversity_chance: dict,
                        key: str) -> None:
    """The model-level dictionary's files, ``stimuli/model-<model>/`` (``--dictionary-scope model``).

    Written once per dictionary: ``modelcard.json`` holds its cache key (which names the stories
    and the settings), and a later run with the same key writes nothing. A card of another key is
    replaced (warned: earlier participants' maps belong to the old atoms). ``acts``: any story's
    activations (the neurons' layers and units, the model's card).
    """
    from ..patterns.consensus import STABILITY_COLUMNS, stability_table
    from ..patterns.subgroups import loadings_table

    model, files = model_label(cfg), ParticipantFiles(writer, cfg.space)
    card_path = files.model(model, "modelcard")
    if _card_is_current(card_path, "dictionary_key", key, "the model-level files",
                        "another model-level dictionary (other stories or settings)"):
        return
    index = dic.info.get("stories", [])
    src = [s.source for s in stories]
    names = atom_names(dic.n_atoms)
    atoms = pd.DataFrame(dic.atoms, columns=names)
    atoms.insert(0, "time", dic.frame_times)
    atoms.insert(0, "story", np.repeat([i["story"] for i in index], [i["n_frames"] for i in index]))
    writer.write_tsv(atoms, files.model(model, "atoms"),
                     {"Description": "Atom time courses of the model-level dictionary (D, unit-norm columns): "
                      "every story's reference grid, the stories' rows one after the other (each story's "
                      "neuron series z-scored on its own grid, then concatenated along frames).",
                      "story": {"Description": "the story of the row"},
                      "time": {"Description": "time from the start of the story's audio", "Units": "s"},
                      "DictionaryR2": dic.r2, "Objective": dic.objective, "Alpha": dic.alpha}, src)
    writer.write_npz(dic.loadings, files.model(model, "loadings"),
                     {"Description": "Sparse loadings A (atoms x neurons) of the model-level dictionary, "
                      "scipy.sparse CSR (scipy.sparse.load_npz)."}, src)
    writer.write_tsv(loadings_table(dic.loadings, acts.layer, acts.unit), files.model(model, "loadings_table"),
                     {"Description": "Non-zero loadings, long format: atom, neuron (column of X), layer, unit "
                      "within layer, loading."}, src)
    writer.write_tsv(sub_df, files.model(model, "subgroups"),
                     {"Description": f"AN sub-group of each atom ({cfg.subgroup}): size, signs and histogram "
                      "over layers."}, src)
    table = stability_table(dic, cfg.min_stability)
    writer.write_tsv(table, files.model(model, "stability"),
                     {"Description": f"Stability of each atom over the {cfg.restarts} restarts of the consensus "
                      "dictionary (docs/patterns.md, 'Stable atoms').",
                      **{k: {"Description": v} for k, v in STABILITY_COLUMNS.items()},
                      "Restarts": cfg.restarts, "MinStability": cfg.min_stability,
                      "NLinkable": int(table["linkable"].sum())}, src)
    card = {k: v for k, v in acts.card.items() if k not in _STORY_CARD_FIELDS}
    writer.write_json(dict(card, dictionary_scope="model", stories=index, n_stories=len(index),
                           n_words=int(sum(i["n_words"] for i in index)), n_frames=int(dic.atoms.shape[0]),
                           dictionary_r2=dic.r2, n_atoms=dic.n_atoms, alpha=dic.alpha,
                           sparsity=cfg.sparsity, atom_tr=cfg.atom_tr, hrf=cfg.hrf, an_centering=cfg.an_centering,
                           subgroup=cfg.subgroup, restarts=cfg.restarts, min_stability=cfg.min_stability,
                           dictionary_tasks=list(cfg.dictionary_tasks),
                           dictionary=_card_info({k: v for k, v in dic.info.items() if k != "stories"}),
                           diversity_chance=diversity_chance, dictionary_key=key),
                      card_path, src)
    log.info("model-level dictionary written to %s", card_path.parent)


def story_view(dic: Dictionary, story: Story, acts: WordActivations, cfg: Config) -> Dictionary:
    """A model-level dictionary seen from one story: its rows of the atoms on its reference grid
    (``stimulus.story_part``), or, for a story the dictionary was not learned on
    (``--dictionary-tasks``), the projection of its neuron series on the loadings there."""
    part = stimulus.story_part(dic, story.name)
    if part is None:
        grid = stimulus.reference_frame_times(story, cfg.atom_tr)
        part = replace(dic, atoms=stimulus.run_design(grid, story, acts, dic, cfg), frame_times=grid)
    return part


def write_story_atoms(writer: DerivativesWriter, story: Story, acts: WordActivations, dic: Dictionary,
                      cfg: Config, key: str) -> None:
    """At model scope, per story: its rows of the model-level atoms (``atoms.tsv``) and its neuron
    series (``neurons.npy``) in ``stimuli/<story>/model-<model>/``; written once per dictionary."""
    from ..bids.tables import read_json

    model, files = model_label(cfg), ParticipantFiles(writer, cfg.space)
    part = story_view(dic, story, acts, cfg)
    where = ("its rows of the model-level atoms" if stimulus.story_part(dic, story.name) is not None else
             "not a story of the model-level dictionary (--dictionary-tasks): the projection of its "
             "neuron series on the loadings")
    path = files.story(story.name, model, "atoms")
    side = writer.sidecar_path(path)
    if path.exists() and side.exists():
        try:
            if read_json(side, "atoms sidecar").get("DictionaryKey") == key:
                return
        except DataError:
            pass
    src = [story.source]
    atoms = pd.DataFrame(part.atoms, columns=atom_names(dic.n_atoms))
    atoms.insert(0, "time", part.frame_times)
    writer.write_tsv(atoms, path, {"Description": f"Atom time courses of the model-level dictionary on "
                                   f"this story's reference grid ({where}).",
                                   "time": {"Description": "time from the start of the story audio",
                                            "Units": "s"},
                                   "DictionaryScope": "model", "DictionaryKey": key}, src)
    X = stimulus.neuron_series(story, acts, part.frame_times, cfg)
    writer.write_npy(X.astype(np.float16), files.story(story.name, model, "neurons"),
                     {"Description": "Neuron frame series X (frames x neurons, z-scored, float16) on the "
                      "reference grid of atoms.tsv; numpy.load. Columns follow the model-level loadings.tsv's "
                      "neuron index.", "FrameTimes": part.frame_times.tolist(), "DictionaryKey": key}, src)


def _card_is_current(card_path: Path, field: str, value: str, files: str, other: str) -> bool:
    """Whether the model card at ``card_path`` holds ``value`` in ``field`` (then its files stand).

    Otherwise (absent, unreadable, or of other settings) they are to be written again; a card
    of other settings is warned about: participants run before have maps of other atoms.
    """
    from ..bids.tables import read_json

    if not card_path.exists():
        return False
    try:
        old = read_json(card_path, "model card")
    except DataError as exc:  # not readable: written again, like a card of other settings
        log.warning("%s; rewriting %s", exc, files)
        return False
    if isinstance(old, dict) and old.get(field) == value:
        return True
    if old:
        log.warning("%s: %s; rewriting %s. Participants run before have maps of other atoms: rerun "
                    "them.", card_path, other, files)
    return False


def _card_info(info: dict) -> dict:
    """The dictionary's info for modelcard.json: the per-restart x per-atom tables are left to stability.tsv."""
    c = info.get("consensus")
    if not c:
        return info
    return dict(info, consensus={k: v for k, v in c.items() if k not in ("restart_r", "restart_jaccard")})


def _common_mask(runs: list[RunInputs]):
    """The intersection of the runs' brain masks (they must share a grid; each is on its BOLD's).

    CIFTI runs (no mask): the :class:`~bids_llm_encode.bids.images.Grayordinates` of the first
    run, which every other run must share (exit 65 naming the file).
    """
    if runs[0].mask is None:
        grid = cifti_grid(runs[0].bold)
        for r in runs[1:]:
            if cifti_grid(r.bold) != grid:
                raise DataError(f"{r.bold}: its grayordinates differ from those of {runs[0].bold}; runs of "
                                "one story must be on the same grayordinates")
        return grid
    first = check_mask(runs[0].mask, runs[0].bold)
    mask = np.asarray(first.dataobj) > 0
    for r in runs:
        img = check_mask(r.mask, r.bold)
        if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine,
                                                               atol=AFFINE_ATOL_MM, rtol=0):
            raise DataError(f"{r.mask}: brain mask grid differs from {runs[0].mask}; runs of one "
                            "story must be in the same space and resolution")
        mask &= np.asarray(img.dataobj) > 0
    if not mask.any():
        raise DataError(f"{runs[0].mask}: the brain mask is empty")
    return nib.Nifti1Image(mask.astype(np.uint8), first.affine)


def _story_frames(run: RunInputs) -> int:
    """Frames needed to cover the story: from its onset to the last word's end."""
    end = run.story_onset + float(np.nanmax(run.story.ends))
    return int(np.ceil(end / run.tr))

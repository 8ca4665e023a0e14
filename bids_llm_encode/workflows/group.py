"""The group level: aggregate what the participant level wrote, per story.

    participant derivatives -> per story and atom: one-sample maps (nilearn SecondLevelModel)
                            -> group maps x atlases -> group links
                            -> participants' agreement on each link, Dice between their maps
                            -> organization metrics; with --compare, the same side by side
                               across output folders made with other models
                            -> group/ + group.html
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ..bids.outputs import DerivativesWriter, OutputFiles, label, model_label
from ..cache import Cache, cache_root
from ..config import Config, normalize_labels
from ..encoding.stats import MIN_CEILING, ceiling_fraction
from ..errors import DataError, MissingInputError, NoMatchError
from ..bids.images import check_image, grid_volume, load_cifti_map, load_image, load_mask, unmask
from ..bids.tables import read_json, read_tsv

log = logging.getLogger(__name__)


def _participant_stories(writer: DerivativesWriter, config: Config, dictionary_key: str | None = None
                         ) -> tuple[dict[str, list[dict]], list[str]]:
    """story -> entities (sub, [ses,] task-<story>) of every complete participant output, and the skipped.

    A participant counts only with its completion record (``sub-X/sub-X_completion.json``,
    written last by a participant run that finished) made with this ``--model`` and
    ``--dictionary-scope`` (at model scope: with the model-level dictionary whose cache key is
    ``dictionary_key``, the one ``stimuli/model-<model>/modelcard.json`` names); the others are
    listed, each with why, in the second value (and logged).
    """
    out: dict[str, list[dict]] = defaultdict(list)
    skipped: list[str] = []
    wanted = set(normalize_labels(config.participant_label, "sub"))  # labels or a file of labels
    files = OutputFiles(writer, config.space)
    for folder in sorted(writer.output_dir.glob("sub-*")):
        if not folder.is_dir():
            continue
        sub = folder.name[4:]
        if wanted and sub not in wanted:
            continue
        record = files.completion(sub)
        why = None
        if not record.exists():
            why = (f"no completion record ({record.name}): its participant run did not finish (or "
                   "failed, or is still running); rerun the participant level for it")
        else:
            try:
                data = read_json(record, "completion record")
                stories = data["stories"] if isinstance(data, dict) else None
                if not isinstance(stories, list):
                    raise DataError(f"{record}: no 'stories' list")
            except (DataError, KeyError) as exc:
                why = f"unreadable completion record ({exc}); rerun the participant level for it"
            else:
                scope = data.get("dictionary_scope", "story")  # records before the option: per story
                if data.get("model") != config.model:
                    why = (f"made with --model {data.get('model')}, not {config.model}; give the model "
                           "the participant level used")
                elif scope != config.dictionary_scope:
                    why = (f"made with --dictionary-scope {scope}, not {config.dictionary_scope}; give the "
                           "scope the participant level used (or rerun it)")
                elif dictionary_key is not None and data.get("dictionary") != dictionary_key:
                    why = ("its maps are of another model-level dictionary (other stories or settings) "
                           f"than {files.model(model_label(config), 'modelcard')}; rerun the participant "
                           "level for it")
        if why:
            skipped.append(f"sub-{sub}: {why}")
            log.warning("group: sub-%s skipped: %s", sub, why)
            continue
        for entry in stories:
            story = entry.get("story") if isinstance(entry, dict) else None
            if not story:
                continue
            ent = OutputFiles.story_entities(sub, entry.get("session"), story)
            if ent not in out[story]:
                out[story].append(ent)
    return out, skipped


def run_group_level(config: Config) -> None:
    t0 = time.perf_counter()
    if not (config.output_dir / "dataset_description.json").exists():
        raise MissingInputError(
            f"{config.output_dir}: no participant-level outputs (dataset_description.json is "
            "missing). Run the participant level into this folder first.")
    from ..networks.atlases import check_user_atlases

    check_user_atlases(config.fbn_atlas)  # a broken --fbn-atlas file: exit 65 before any work
    cache = Cache(cache_root(config))
    writer = DerivativesWriter(config.output_dir, config)
    writer.remove_temps(writer.output_dir / "group")  # leftovers of a killed group run
    writer.write_config(config.resolved(), "group")
    model_scope = config.dictionary_scope == "model"
    key = None
    if model_scope:
        card = OutputFiles(writer, config.space).model(model_label(config), "modelcard")
        if not card.exists():
            raise MissingInputError(f"{card}: the model-level dictionary is missing (no participant run "
                                    f"with --model {config.model} and --dictionary-scope model finished "
                                    "here); run the participant level into this folder first, or give "
                                    "the --dictionary-scope it used")
        key = read_json(card, "model card").get("dictionary_key")
    stories, incomplete = _participant_stories(writer, config, key)
    if not stories and incomplete:
        raise MissingInputError(f"{config.output_dir}: no participant is complete; skipped:\n  "
                                + "\n  ".join(incomplete))
    if not stories:
        raise NoMatchError(f"{config.output_dir}: no participant outputs found"
                           + (f" for {config.participant_label}" if config.participant_label else ""))
    if incomplete:
        log.warning("group: %d participant(s) skipped (incomplete):\n  %s", len(incomplete),
                    "\n  ".join(incomplete))
    from ..report.html import Report

    report = Report("Group report", subtitle=f"model {config.model} · {len(stories)} story(ies)")
    if incomplete:
        report.add_section("Participants skipped", anchor="skipped").note(
            "Not in the group results (no complete participant run): " + "; ".join(incomplete), kind="warning")
    all_metrics = {}
    skipped = []
    if model_scope:  # the dataset level first: every participant once, all its stories and sessions
        everything = [e for _, ents in sorted(stories.items()) for e in ents]
        log.info("group: dataset level, %d participant(s), %d participant-story output(s)",
                 len({e["sub"] for e in everything}), len(everything))
        dataset = GroupStory(None, everything, config, cache, writer, report).run()
    for story, entities in sorted(stories.items()):
        n_subs = len({e["sub"] for e in entities})
        if model_scope and n_subs < MIN_STORY_PARTICIPANTS:
            log.info("group: story %s: %d participant(s); per-story group outputs need %d (its maps are in "
                     "the dataset level)", story, n_subs, MIN_STORY_PARTICIPANTS)
            continue
        log.info("group: story %s, %d participant output(s)", story, len(entities))
        try:
            all_metrics[story] = GroupStory(story, entities, config, cache, writer, report).run()
        except MissingInputError as exc:  # e.g. every participant of the story was interrupted
            if len(stories) == 1 and not model_scope:
                raise
            log.warning("group: story %s skipped: %s", story, exc)
            skipped.append(f"{story}: {exc}")
    if model_scope:  # links, agreement, metrics and --compare: the dataset level's
        all_metrics = {DATASET_LABEL: dataset}
    if not all_metrics:
        raise MissingInputError("no story has complete participant outputs:\n  " + "\n  ".join(skipped))
    comparison = compare_models(config, writer, report, all_metrics)
    report.summary({"stories": len(stories), "participants": len({e["sub"] for v in stories.values()
                                                                  for e in v}),
                    "model": config.model, "models compared": len(comparison) if comparison is not None
                    else 1})
    html = writer.write_text(report.to_html(), OutputFiles(writer, config.space).group_report())
    log.info("group level done in %.0f s: %s", time.perf_counter() - t0, html)


#: Participants a story needs for its own group outputs at --dictionary-scope model.
MIN_STORY_PARTICIPANTS = 3
#: The ``story`` of the dataset level in metrics and the model comparison.
DATASET_LABEL = "all"


class GroupStory:
    """The group level of one story (``story``), or of the dataset (``story`` None: every
    participant's stories, runs and sessions combined by fixed effects, then random effects
    over participants; ``--dictionary-scope model`` only)."""

    def __init__(self, story, entities, config, cache, writer, report):
        self.story, self.entities, self.config = story, entities, config
        self.cache, self.writer, self.report = cache, writer, report
        self.files = OutputFiles(writer, config.space)
        self.title = f"story {story}" if story is not None else "dataset level (all stories)"
        #: CIFTI participant maps (--space fsLR): their Grayordinates once the first is read. The
        #: statistics run on (n, 1, 1) "volumes" of the grayordinates (``bids.images.grid_volume``),
        #: the maps are written back as dscalar (:meth:`_out`) and the networks use the grid (:meth:`_space`).
        self.grid = None

    def _dictionary_file(self, kind: str) -> Path:
        """A file of the dictionary the maps were made with: the model level's (model scope), else the story's."""
        model = model_label(self.config)
        if self.config.dictionary_scope == "model":
            return self.files.model(model, kind)
        return self.files.story(self.story, model, kind)

    def _out(self, img):
        """A map to write or draw: the image itself, or for CIFTI its grayordinates' dscalar map."""
        if not self.files.cifti:
            return img
        return self.grid.image(np.asarray(img.dataobj, np.float32).reshape(-1))

    def _space(self, brain):
        """What the atlases and the correspondence take: the group mask, or the grayordinates."""
        return self.grid if self.files.cifti else brain

    def _check(self, path: Path, ent: dict) -> None:
        if self.files.cifti:
            self.grid, _ = load_cifti_map(path, "participant map", self._hint(ent), self.grid)
        else:
            check_image(path, "participant map", (3,), self._hint(ent))

    def _map(self, ent: dict, desc: str, stat: str) -> Path:
        return self.files.statmap(ent, desc, stat)

    def run(self) -> dict:
        from nilearn.glm.second_level import SecondLevelModel

        from ..networks.atlases import load_atlas
        from ..networks.metrics import PER_NETWORK_COLUMNS, linkable_atoms, organization_metrics
        from ..networks.overlap import (NULL_COLUMNS, correspondence, link_agreement, links_table, null_meta,
                                         pairwise_dice)
        from ..report import figures as fig
        from .report import network_metrics_section

        cfg, writer, story, title = self.config, self.writer, self.story, self.title
        atoms_tsv = self._dictionary_file("atoms")
        for f in (atoms_tsv, self._dictionary_file("modelcard"), self._dictionary_file("subgroups")):
            if not f.exists():
                raise MissingInputError(f"{f}: the atoms are missing (a participant run with "
                                        f"--model {cfg.model} was interrupted, or none ran); run the "
                                        "participant level into this folder first")
        head = read_tsv(atoms_tsv, "atoms table", quoted=True, nrows=0)  # model level: a 'story' column
        names = [c for c in head.columns if c.startswith("atom")]
        atoms = read_tsv(atoms_tsv, "atoms table", numeric="all" if cfg.dictionary_scope == "story" else
                         ["time", *names], quoted=True)[names].to_numpy(dtype=float)
        card = read_json(self._dictionary_file("modelcard"), "model card")
        sub_df = read_tsv(self._dictionary_file("subgroups"), "sub-group table", quoted=True)
        stab_path = self._dictionary_file("stability")
        stable = None  # atoms below --min-stability are not linked at the group level either
        if stab_path.exists():
            stab = read_tsv(stab_path, "stability table", required=("atom", "linkable"), quoted=True)
            stable = stab["linkable"].astype(str).str.lower().isin(["true", "1"]).to_numpy()

        ents = []
        for e in self.entities:  # a participant killed while writing its maps has only some of them
            absent = [f for f in self._needed(e, names) if not f.exists()]
            if absent:
                log.warning("%s: sub-%s skipped: its outputs are incomplete (%d missing, e.g. %s); "
                            "rerun the participant level for it", title, e["sub"], len(absent), absent[0])
            else:
                ents.append(e)
        for e in ents:  # every map's header and completeness, before the first is used (exit 65)
            for f in self._needed(e, names):
                self._check(f, e)
        if not ents:
            raise MissingInputError(f"{title}: no participant has complete atom maps in "
                                    f"{writer.output_dir}; run (or rerun) the participant level first")
        # The participant is the unit: its sessions' maps of the story are combined first (fixed effects)
        units: dict[str, list[dict]] = defaultdict(list)
        for e in ents:
            units[e["sub"]].append(e)
        self.units = dict(sorted(units.items()))
        subs = list(self.units)
        brain = self._group_mask(ents)
        mask = np.asarray(brain.dataobj) > 0
        n = len(subs)
        if n < len(ents):
            log.info("%s: %d participant(s) with %d story/session output(s); each participant's outputs "
                     "combined by fixed effects first (nilearn compute_fixed_effects)", title, n, len(ents))
        sources = [self._map(e, desc=names[0], stat="effect") for e in ents]

        z_by_atom: list = [None] * len(names)  # atoms x (participants, voxels), filled atom by atom below

        # Group maps per atom: random effects (one-sample over participants) or fixed effects.
        group_z = np.zeros((len(names), int(mask.sum())), dtype=np.float32)
        design = pd.DataFrame({"intercept": np.ones(n)})
        random_fx = cfg.group_model == "random" and n >= 2
        if cfg.group_model == "random" and n < 2:
            log.warning("%s: one participant: no random-effects test; the group maps are "
                        "that participant's (fixed effects)", title)
        elif cfg.group_model == "random" and n < 3:
            log.warning("%s: %d participants: a random-effects test has %d degree(s) of "
                        "freedom; consider --group-model fixed", title, n, n - 1)
        for k, name in enumerate(names):
            effects = [self._map(e, desc=name, stat="effect") for e in ents]
            unit_effects, z_by_atom[k] = self._unit_maps(name, brain, mask)  # one atom's images at a time
            if random_fx:
                slm = SecondLevelModel(mask_img=brain, smoothing_fwhm=None).fit(
                    unit_effects, design_matrix=design)
                maps = slm.compute_contrast("intercept", output_type="all")
                z_img, eff_img = maps["z_score"], maps["effect_size"]
                how = (f"one-sample test over {n} participants (nilearn SecondLevelModel, "
                       "intercept): random effects")
            else:
                zs = z_by_atom[k]
                effs = np.stack([np.asarray(img.dataobj)[mask] for img in unit_effects])
                z_img = unmask(zs.sum(0) / np.sqrt(n), brain)
                eff_img = unmask(effs.mean(0), brain)
                how = (f"Stouffer's z over {n} participants' z maps (sum / sqrt(n)) and the mean "
                       "effect: fixed effects, inference about these participants only")
            group_z[k] = np.asarray(z_img.dataobj)[mask]
            for stat, img in (("z", z_img), ("effect", eff_img)):
                writer.write_image(self._out(img), self.files.group_statmap(story, name, stat),
                    {"Description": f"Group {stat} map of atom {k}: {how}.", "GroupModel":
                     "random" if random_fx else "fixed", "Participants": subs,
                     "SessionsCombined": "fixed effects (nilearn compute_fixed_effects, precision-weighted) "
                     "within a participant, before the group model",
                     **({} if story is not None else {"StoriesCombined": "each participant's stories, runs "
                        "and sessions: fixed effects, as its sessions", "Stories": sorted(
                            {e["task"] for e in ents})})}, effects)

        cv_r2 = self._unit_mean(lambda e: self._load(self._map(e, desc="cv", stat="rsquared"), e)[1][mask])
        mean_r2 = cv_r2.mean(axis=0)
        sig_frac = self._unit_mean(lambda e: self._load(self.files.fdr_mask(e), e)[1][mask] > 0).mean(axis=0)
        writer.write_image(self._out(unmask(sig_frac, brain)), self.files.group_statmap(story, "cvfdr", "fraction"),
            {"Description": "Fraction of participants whose CV r is FDR-significant in each voxel."},
            [self.files.fdr_mask(e) for e in ents])

        isc = self._isc_ceiling(ents, brain, mask)
        ceiling_info = {}
        if isc is not None:
            cv_r = self._unit_mean(lambda e: self._load(self._map(e, desc="cv", stat="r"), e)[1][mask]
                                   ).mean(axis=0)
            frac = ceiling_fraction(cv_r, isc)
            for desc, stat, values, text in (
                    ("isc", "r", isc, "Group noise ceiling: leave-one-participant-out inter-subject "
                     "correlation on story frames (mean over participants of r with the others' mean)."),
                    ("cvisc", "fraction", frac, f"Participants' mean CV r as a fraction of the ISC "
                     f"ceiling, where the ceiling is at least {MIN_CEILING} (0 elsewhere).")):
                writer.write_image(self._out(unmask(np.nan_to_num(values), brain)),
                                   self.files.group_statmap(story, desc, stat),
                                   {"Description": text, "Participants": subs}, sources)
            ceiling_info = {"median ISC ceiling": round(float(np.median(isc)), 3),
                            f"median CV r / ISC (ISC >= {MIN_CEILING})": round(float(np.nanmedian(frac)), 3)}

        sec = self.report.add_section(f"Story '{story}'" if story is not None else "All stories (dataset level)",
                                      anchor=f"story-{story}" if story is not None else "dataset")
        sec.keyvalues({"participants": n, "atoms": len(names), "dictionary R²": card.get("dictionary_r2"),
                       "mean CV R² (max voxel)": round(float(mean_r2.max()), 3), **ceiling_info})
        if isc is not None:
            sec.figure(fig.glass_brain(self._out(unmask(np.nan_to_num(frac), brain)), "mean CV r / ISC ceiling",
                                       threshold=1e-6),
                       "The participants' mean cross-validated r as a fraction of the group noise "
                       "ceiling (leave-one-out inter-subject correlation).")
        sec.figure(fig.glass_brain(self._out(unmask(sig_frac, brain)), "fraction of participants with "
                                   "significant CV r", threshold=1e-6),
                   "Where the atoms predict BOLD: the fraction of participants whose cross-validated r "
                   "is FDR-significant.")
        metrics_out = {}
        for spec in cfg.fbn_atlas:
            atlas = load_atlas(spec, self._space(brain), cache=self.cache, space=cfg.space)
            desc = label(atlas.name)
            corr = correspondence(group_z, self._space(brain), atlas, threshold=cfg.map_threshold, map_rule=cfg.map_rule,
                                  null=cfg.fbn_null, n_null=cfg.n_spatial_null, n_spins=cfg.n_spins,
                                  seed=cfg.seed, fdr_alpha=cfg.fdr_alpha, min_dice=cfg.min_dice,
                                  stable=stable, cache=self.cache)
            links = links_table(corr)
            tables = self._unit_tables(atlas.name)
            agreement = link_agreement(tables) if tables else pd.DataFrame()
            if len(agreement):
                agreement = agreement.merge(corr[["atom", "network", "sign", "linked"]].rename(
                    columns={"linked": "group_linked"}), on=["atom", "network", "sign"], how="left")
                dice_of = {(a, s): self._participant_dice(z_by_atom[int(a)], s, pairwise_dice)
                           for a, s in set(zip(agreement["atom"], agreement["sign"]))}
                agreement["participant_map_dice"] = [dice_of[a, s] for a, s in
                                                     zip(agreement["atom"], agreement["sign"])]
            summary, per_network = organization_metrics(
                corr, atoms, sub_df, float(card["dictionary_r2"]), mean_r2, networks=list(atlas.labels),
                eligible=linkable_atoms(corr, atoms.shape[1]), n_null=cfg.n_consistency_null,
                seed=cfg.seed, diversity_chance=card.get("diversity_chance"))
            summary = dict(summary, atlas=atlas.name, model=cfg.model,
                           story=story if story is not None else DATASET_LABEL, participants=n)
            meta = {"Atlas": atlas.name, "MapThreshold": cfg.map_threshold, "MapRule": cfg.map_rule,
                    "Participants": n, **null_meta(corr)}
            writer.write_tsv(corr, self.files.group_table(story, atlas.name, "overlap"),
                             {"Description": "Overlap of each group atom z map with each network.", **meta,
                              **NULL_COLUMNS},
                             sources)
            writer.write_tsv(links, self.files.group_table(story, atlas.name, "links"),
                             {"Description": "Group atom -> network links.", **meta, **NULL_COLUMNS},
                             sources)
            writer.write_tsv(agreement, self.files.group_table(story, atlas.name, "agreement"),
                             {"Description": "Per atom x network x sign: how many participants show the "
                              "link, and how alike their thresholded maps are (mean pairwise Dice).",
                              **meta}, sources)
            writer.write_tsv(per_network, self.files.group_table(story, atlas.name, "networks"),
                             {"Description": "Organization metrics per network (group links; the "
                              "consistency's chance level from random sets of the story's atoms).",
                              **PER_NETWORK_COLUMNS, **meta,
                              "ConsistencyNullSets": cfg.n_consistency_null,
                              "ConsistencyPool": "linkable atoms (a non-empty thresholded group map)"},
                             sources)
            writer.write_json(summary, self.files.group_table(story, atlas.name, "metrics", ".json"), sources)
            metrics_out[atlas.name] = summary
            log.info("group %s %s: %d link(s)", title, atlas.name, len(links))

            sec = self.report.add_section(f"Networks ({atlas.name}), " + (f"'{story}'" if story is not None
                                                                          else "all stories"),
                                          anchor=f"networks-{desc}-{story if story is not None else 'dataset'}")
            sec.note(f"Spatial null: {corr.attrs.get('null_description')}; a link needs q < "
                     f"{cfg.fdr_alpha} and Dice >= {cfg.min_dice}.", kind="info")
            sec.figure(fig.correspondence_heatmap(corr), "Group atom maps. "
                       + fig.CAPTIONS["correspondence_heatmap"])
            sec.figure(fig.network_involvement_bars(per_network), "Group links. "
                       + fig.CAPTIONS["network_involvement_bars"])
            sec.figure(fig.consistency_figure(per_network), "Group links. "
                       + fig.CAPTIONS["consistency_figure"])
            if len(agreement):
                sec.figure(fig.group_agreement_figure(agreement), fig.CAPTIONS["group_agreement_figure"])
            if len(links):
                sec.table(links, caption="Group links")
            else:
                sec.note("No group atom map overlaps a network beyond the spatial null.", kind="info")
            network_metrics_section(sec, summary, per_network)
        return metrics_out

    def _sessions(self, ent: dict) -> int:
        return sum(e["sub"] == ent["sub"] for e in self.entities)

    def _hint(self, ent: dict) -> str:
        return f"Rerun the participant level for sub-{ent['sub']} into {self.writer.output_dir}."

    def _load(self, path: Path, ent: dict) -> tuple[nib.Nifti1Image, np.ndarray]:
        """A participant map through the checked reader (a read error is exit 65 naming it).

        A CIFTI map comes as its (n, 1, 1) grayordinate "volume" (``bids.images.grid_volume``).
        """
        if self.files.cifti:
            self.grid, values = load_cifti_map(path, "participant map", self._hint(ent), self.grid)
            img = grid_volume(values)
            return img, np.asarray(img.dataobj)
        return load_image(path, "participant map", (3,), self._hint(ent))

    def _unit_maps(self, name: str, brain, mask: np.ndarray) -> tuple[list, np.ndarray]:
        """Per participant, atom ``name``'s effect image and z (voxels of ``mask``).

        One session: its maps. Several: fixed effects over them (nilearn
        ``compute_fixed_effects``, precision-weighted by the variance maps), so that
        each participant contributes one map (no pseudo-replication in the group test).
        """
        from nilearn.glm import compute_fixed_effects

        effects, zs = [], []
        for members in self.units.values():
            if len(members) == 1:
                e = members[0]
                img, data = self._load(self._map(e, desc=name, stat="effect"), e)
                effects.append(nib.Nifti1Image(np.asarray(data, dtype=np.float32), img.affine))
                zs.append(self._load(self._map(e, desc=name, stat="z"), e)[1][mask])
                continue
            con = [self._load(self._map(e, desc=name, stat="effect"), e)[0] for e in members]
            var = [self._load(self._map(e, desc=name, stat="variance"), e)[0] for e in members]
            eff_img, _, _, z_img = compute_fixed_effects(con, var, mask=brain, precision_weighted=True)
            effects.append(unmask(np.asarray(eff_img.dataobj)[mask], brain))
            zs.append(np.nan_to_num(np.asarray(z_img.dataobj)[mask]))
        return effects, np.stack(zs)

    def _unit_mean(self, read) -> np.ndarray:
        """(participants, voxels): ``read(entities)`` averaged over each participant's sessions."""
        return np.stack([np.mean([read(e) for e in members], axis=0) for members in self.units.values()])

    def _unit_tables(self, atlas: str) -> list[pd.DataFrame]:
        """One overlap table per participant; several sessions' combined: dice mean, p median, and
        linked when linked in more than half of them."""
        out = []
        for members in self.units.values():
            tables = [read_tsv(f, "overlap table", quoted=True) for f in
                      (self.files.table(e, atlas, "overlap") for e in members) if f.exists()]
            if len(tables) == 1:
                out.append(tables[0])
            elif tables:
                both = pd.concat(tables, ignore_index=True)
                both["linked"] = both["linked"].astype(str).str.lower().isin(["true", "1"])
                out.append(both.groupby(["atom", "network", "sign"], sort=False).agg(
                    dice=("dice", "mean"), p=("p", "median"),
                    linked=("linked", lambda v: bool(v.mean() > 0.5))).reset_index())
        return out

    def _needed(self, ent: dict, names: list[str]) -> list[Path]:
        """Every participant file the group level reads for this story (variance: for fixed effects)."""
        stats = ("effect", "z") if self._sessions(ent) == 1 else ("effect", "z", "variance")
        out = [self._map(ent, desc=name, stat=stat) for name in names for stat in stats]
        out += [self._map(ent, desc="cv", stat="r"), self._map(ent, desc="cv", stat="rsquared"),
                self.files.fdr_mask(ent)]
        return out

    def _isc_ceiling(self, ents, brain, mask):
        """The leave-one-out ISC ceiling of the story (>= 3 participants), or None (logged)."""
        from ..bids.inputs import find_runs
        from ..encoding.ceiling import isc_ceiling

        subs = sorted({e["sub"] for e in ents})
        if self.story is None:
            log.info("dataset level: no ISC ceiling (it is of one story: see the per-story outputs)")
            return None
        if len(subs) < 3:
            log.info("story %s: %d participant(s): no ISC ceiling (needs 3)", self.story, len(subs))
            return None
        cfg = self.config
        sel = replace(cfg, participant_label=subs)
        runs = [r for r in find_runs(sel) if r.story.name == self.story]
        first = {}
        for r in runs:  # one presentation per participant
            first.setdefault(r.subject, r)
        if self.files.cifti:  # one grid: every run's grayordinates were checked at the participant level
            return isc_ceiling(list(first.values()), self.grid, cfg.confounds_strategy, cfg.scrub)
        masks = [load_mask(r.mask) for r in first.values()]  # the checked reader (exit 65)
        grids = {(m.shape[:3], tuple(np.round(m.affine, 3).ravel())) for m in masks}
        if len(grids) > 1 or next(iter(grids))[0] != mask.shape:
            log.warning("story %s: participants' BOLD are on different grids; no ISC ceiling", self.story)
            return None
        return isc_ceiling(list(first.values()), mask, cfg.confounds_strategy, cfg.scrub)

    def _group_mask(self, ents) -> nib.Nifti1Image:
        if self.files.cifti:  # every grayordinate is in (as at the participant level)
            self._load(self._map(ents[0], desc="cv", stat="r"), ents[0])
            return nib.Nifti1Image(np.ones((self.grid.size, 1, 1), np.uint8), np.eye(4))
        loaded = [self._load(self._map(e, desc="cv", stat="r"), e) for e in ents]
        inside = np.all([data != 0 for _, data in loaded], axis=0)
        return nib.Nifti1Image(inside.astype(np.uint8), loaded[0][0].affine)

    def _participant_dice(self, z: np.ndarray, sign: str, pairwise_dice) -> float:
        """Mean pairwise Dice of the participants' thresholded maps (z: participants x voxels)."""
        t = self.config.map_threshold
        return pairwise_dice(z > t if sign == "activation" else z < -t)


def compare_models(config: Config, writer: DerivativesWriter, report, own: dict):
    """With --compare: the group metrics of several output folders (one model each) side by side."""
    if not config.compare:
        return None
    from ..report import figures as fig

    rows = []
    for story, per_atlas in own.items():
        for atlas, summary in per_atlas.items():
            rows.append(dict(summary, output_dir=str(config.output_dir)))
    model_scope = config.dictionary_scope == "model"  # the dataset level's metrics, group/*_metrics.json
    pattern = "group/*_metrics.json" if model_scope else "group/*/*_metrics.json"
    for other in config.compare:
        found = sorted(Path(other).glob(pattern))
        if not found:
            raise MissingInputError(f"--compare {other}: no group metrics ({pattern}); run the group level "
                                    f"there first (with --dictionary-scope {config.dictionary_scope})")
        for f in found:
            rows.append(dict(read_json(f, "group metrics"), output_dir=str(other)))
    table = pd.DataFrame([{k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                          for row in rows])
    writer.write_tsv(table, OutputFiles(writer, config.space).model_comparison(),
                     {"Description": "Organization metrics of each model (one row per output folder, "
                      "story and atlas), side by side. consistency_r is the mean over networks with "
                      ">= 2 linked atoms (consistency_networks of them, consistency_n_mean atoms on "
                      "average) of their mean |r|; consistency_chance_* and consistency_p: the same "
                      "mean for random sets of the same sizes; diversity_chance_1_minus_abs_r: the "
                      "diversity of atoms learned from circularly shifted neurons."},
                     [Path(p) for p in config.compare])
    sec = report.add_section("Model comparison", anchor="model-comparison")
    numeric = table.select_dtypes("number").columns.tolist()
    shown = table.assign(model=_comparison_labels(table))
    sec.figure(fig.model_comparison_figure(shown[["model", *numeric]]),
               "Organization metrics side by side (the paper's BERT-versus-Llama comparison). "
               + fig.CAPTIONS["model_comparison_figure"])
    cons = [c for c in ("consistency_r", "consistency_networks", "consistency_n_mean",
                        "consistency_chance_mean", "consistency_chance_lo", "consistency_chance_hi",
                        "consistency_p", "diversity_1_minus_abs_r", "diversity_chance_1_minus_abs_r")
            if c in table.columns]
    if cons:
        sec.table(table[["model", "story", "atlas", *cons]],
                  caption="Consistency (mean over networks of the mean |r|) with the number of networks "
                  "and atoms behind it and its chance level (random sets of the same sizes), and the "
                  "diversity beside its chance level, per model")
    sec.table(table[["model", "story", "atlas", *[c for c in numeric if c not in cons]]],
              caption="Other metrics per model")
    return table


def _comparison_labels(table: pd.DataFrame) -> list[str]:
    """Model names, with the story and atlas added where one model has several rows."""
    parts = ["model"] + [c for c in ("story", "atlas") if c in table.columns and table[c].nunique() > 1]
    labels = [" / ".join(str(v) for v in row) for row in table[parts].itertuples(index=False)]
    if len(set(labels)) < len(labels) and "output_dir" in table.columns:  # one model, two folders
        labels = [f"{lab} ({Path(d).name})" for lab, d in zip(labels, table["output_dir"])]
    return labels

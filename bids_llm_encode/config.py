"""One configuration object for the whole run.

Every command-line option is a field here; ``--config-file`` (JSON or TOML)
can set any of them, and the command line wins. The resolved configuration,
with software versions, is written next to the outputs by ``bids/outputs.py``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional

from . import __version__
from .errors import UsageError

#: Choices of the options that take one of a few words (the parser and the
#: ``--config-file`` values are both checked against these in :meth:`Config.validate`).
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "float16", "bfloat16"),
    "neurons": ("mlp-out", "mlp-hidden", "residual"),
    "word_pooling": ("last", "mean"),
    "hrf": ("spm", "glover"),
    "an_centering": ("mean", "none"),
    "group_model": ("random", "fixed"),
    "dictionary_scope": ("model", "story"),
    "atom_model": ("marginal", "joint"),
    "map_rule": ("winner", "all"),
    # the same tuple as networks.overlap.NULLS (tests/test_config.py checks that they agree)
    "fbn_null": ("auto", "spin", "volume", "shift"),
    # the same tuple as encoding.confounds.STRATEGIES (kept here so that checking options
    # imports no nilearn; tests/test_config.py checks that they agree)
    "confounds_strategy": ("narratives", "simple", "compcor", "scrubbing"),
}

#: The atlases defined on the fsLR cortex (networks.atlases.list_builtin_atlases): the spin test's.
SURFACE_ATLASES = ("CA12", "Yeo7", "Yeo17")
#: ``--space`` values whose BOLD is fMRIPrep's CIFTI output (grayordinates, ``den-91k``), not a volume.
CIFTI_SPACES = ("fsLR",)

#: The built-in low-level baseline regressors (``--baselines``; signal/baselines.py makes them).
BASELINES = ("word_rate", "phoneme_rate", "envelope")

#: The smallest number of circular shifts the encoding's normal null accepts (0 = no null).
MIN_PERMUTATIONS = 20

#: The fewest random atom sets behind a consistency's chance level (its 95 % interval needs them).
MIN_CONSISTENCY_NULL = 100

_LABEL = re.compile(r"^[A-Za-z0-9]+$")


@dataclass
class Config:
    # positionals
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    # selection
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    task_label: list[str] = field(default_factory=list)
    bids_filter_file: Optional[Path] = None
    bids_database_dir: Optional[Path] = None  # PyBIDS index saved once, reused by every process
    derivatives: Optional[Path] = None
    space: str = "MNI152NLin2009cAsym"
    skip_bids_validation: bool = False
    # resources
    work_dir: Optional[Path] = None
    cache_dir: Optional[Path] = None
    nprocs: Optional[int] = None
    mem_mb: Optional[int] = None
    verbose: int = 0
    config_file: Optional[Path] = None
    # language model (method.md section 2)
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "float32"
    layers: Optional[list[int]] = None
    neurons: str = "mlp-out"  # mlp-out | mlp-hidden | residual
    context_tokens: int = 256
    window_tokens: int = 1024
    word_pooling: str = "last"  # last | mean
    hrf: str = "spm"  # spm | glover
    an_centering: str = "mean"  # mean: each AN's mean over the story's words removed | none (docs/patterns.md)
    # patterns (section 3)
    n_atoms: int = 64
    sparsity: float = 0.15  # relative lambda: R^2 ~0.55 on MiniLM (BERT), docs/patterns.md
    subgroup: str = "nonzero"  # nonzero | top-<q>
    atom_tr: float = 1.5
    seed: int = 0
    restarts: int = 24  # consensus of 24 restarts (1 = the old single SVD-started fit), docs/patterns.md
    min_stability: float = 0.6  # atoms below it are kept but not linked to networks, docs/patterns.md
    # model: one dictionary per model over the dataset's stories | story: one per story (docs/patterns.md)
    dictionary_scope: str = "model"
    dictionary_tasks: list[str] = field(default_factory=list)  # model scope: only these tasks' stories
    # encoding (section 4)
    confounds_strategy: str = "narratives"  # narratives | simple | compcor | scrubbing (nilearn presets)
    scrub: bool = False
    cv_folds: int = 5
    n_permutations: int = 100  # circular shifts; p from a normal fitted to them (docs/encoding.md)
    fdr_alpha: float = 0.05
    atom_model: str = "marginal"  # marginal | joint: what each atom's z map is (docs/encoding.md)
    # low-level baselines beside the atoms (signal/baselines.py, docs/method.md section 4)
    baselines: list[str] = field(default_factory=lambda: ["auto"])  # auto | none | names of BASELINES
    baseline_regressors: Optional[Path] = None  # folder of <story>.tsv user regressors
    # networks (section 5)
    fbn_atlas: list[str] = field(default_factory=lambda: ["CA12", "Yeo7"])
    map_threshold: float = 3.1
    map_rule: str = "winner"  # winner: each voxel counts for its preferred atom only | all
    n_spatial_null: Optional[int] = None  # None: every valid shift of the map (finest p-values)
    fbn_null: str = "auto"  # auto: spin test for CA12/Yeo7/Yeo17, grey-matter shifts for others (docs/networks.md)
    n_spins: int = 1000  # rotations of the spin test
    min_dice: float = 0.1  # a link's overlap floor (docs/networks.md)
    n_consistency_null: int = 1000  # random atom sets: chance level of each network's consistency
    # group (section 7)
    group_model: str = "random"  # random: one-sample t over participants; fixed: Stouffer z
    compare: list[Path] = field(default_factory=list)

    PATH_FIELDS = ("bids_dir", "output_dir", "bids_filter_file", "bids_database_dir", "derivatives", "work_dir",
                   "cache_dir", "config_file", "baseline_regressors")

    def validate(self) -> "Config":
        """Check every option once, before any data is read (as nilearn checks its parameters).

        Types (a ``--config-file`` can hold anything), ranges, choices and
        combinations; the output folder's place relative to the input dataset
        (:func:`check_output_location`). Nothing is read but the label files of
        ``--participant-label`` & co., nothing is written.

        Returns
        -------
        Config
            ``self``, unchanged.

        Raises
        ------
        UsageError (64)
            The first bad option, by its command-line name, with the allowed values.
        """
        def bad(name: str, value, rule: str):
            opt = "--" + name.replace("_", "-")
            raise UsageError(f"{opt} {value!r}: {rule}. Fix the option (or the {name!r} key of "
                             "--config-file).")

        def integer(name, lo=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, v, "must be an integer")
            if lo is not None and v < lo:
                bad(name, v, f"must be >= {lo}")

        def number(name, lo=None, hi=None, lo_open=True, hi_open=True):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, v, "must be a finite number")
            if lo is not None and (v <= lo if lo_open else v < lo):
                bad(name, v, f"must be {'>' if lo_open else '>='} {lo}"
                    + (f" and {'<' if hi_open else '<='} {hi}" if hi is not None else ""))
            if hi is not None and (v >= hi if hi_open else v > hi):
                bad(name, v, f"must be {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi}")

        def strings(name, allow_empty=True):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [v]
                setattr(self, name, v)
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                bad(name, v, "must be a list of strings")
            if not allow_empty and not v:
                bad(name, v, "needs at least one value")

        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                bad(name, getattr(self, name), f"choose one of {', '.join(choices)}")
        for name in ("model", "space", "subgroup"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, getattr(self, name), "must be a non-empty string")
        integer("n_atoms", 1)
        number("sparsity", 0)
        _check_subgroup(self.subgroup)
        number("atom_tr", 0)
        integer("seed", 0)
        integer("restarts", 1)
        number("min_stability", 0, 1, lo_open=False, hi_open=False)
        integer("context_tokens", 0)
        integer("window_tokens", 1)
        if self.context_tokens >= self.window_tokens:
            raise UsageError(f"--context-tokens {self.context_tokens} must be smaller than "
                             f"--window-tokens {self.window_tokens} (each window needs new tokens)")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers):
                bad("layers", self.layers, "must be 0-based layer numbers (integers >= 0)")
        integer("cv_folds", 2)
        integer("n_permutations", 0)
        if 0 < self.n_permutations < MIN_PERMUTATIONS:
            bad("n_permutations", self.n_permutations,
                f"must be 0 (no null, no p-values) or >= {MIN_PERMUTATIONS} (the normal fitted to "
                "the circular shifts needs them)")
        number("fdr_alpha", 0, 1)
        number("map_threshold", 0)
        integer("n_spatial_null", 1, optional=True)
        integer("n_spins", 1)
        number("min_dice", 0, 1, lo_open=False, hi_open=False)
        integer("n_consistency_null", MIN_CONSISTENCY_NULL)
        integer("nprocs", 1, optional=True)
        integer("mem_mb", 1, optional=True)
        integer("verbose", 0)
        for name in ("scrub", "skip_bids_validation"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "must be true or false")
        strings("fbn_atlas", allow_empty=False)
        dlabel = [a for a in self.fbn_atlas if a.strip().lower().endswith(".dlabel.nii")]
        if self.space in CIFTI_SPACES:  # grayordinates: surface atlases and the spin test only
            volume = [a for a in self.fbn_atlas if a.strip().lower() not in {x.lower() for x in SURFACE_ATLASES}
                      and a not in dlabel]
            if volume:
                bad("fbn_atlas", ", ".join(volume), f"--space {self.space} (CIFTI grayordinates) takes "
                    f"{', '.join(SURFACE_ATLASES)} or a .dlabel.nii file; these are volume atlases")
            if self.fbn_null not in ("auto", "spin"):
                bad("fbn_null", self.fbn_null, f"--space {self.space} (CIFTI grayordinates) is tested with "
                    "the spin test: use auto or spin")
        elif dlabel:
            bad("fbn_atlas", ", ".join(dlabel), "a .dlabel.nii atlas is on grayordinates: it needs CIFTI "
                f"inputs (--space {CIFTI_SPACES[0]})")
        if self.fbn_null == "spin":
            volume = [a for a in self.fbn_atlas if a.strip().lower() not in {x.lower() for x in SURFACE_ATLASES}
                      and a not in dlabel]
            if volume:
                bad("fbn_null", self.fbn_null, f"the spin test needs atlases on the fsLR cortex "
                    f"({', '.join(SURFACE_ATLASES)}); {', '.join(volume)} are volume atlases: use auto "
                    "(spin where it applies, grey-matter shifts elsewhere) or volume")
        strings("baselines", allow_empty=False)
        self.baselines = normalize_baselines(self.baselines)
        if self.baseline_regressors is not None:
            if not isinstance(self.baseline_regressors, (str, Path)):
                bad("baseline_regressors", self.baseline_regressors, "must be the path of a folder")
            self.baseline_regressors = Path(self.baseline_regressors)
            if not self.baseline_regressors.is_dir():
                bad("baseline_regressors", str(self.baseline_regressors),
                    "no such folder (it must hold one <story>.tsv per story, docs/usage.md)")
        for name in ("participant_label", "session_label", "task_label", "dictionary_tasks"):
            strings(name)
        normalize_labels(self.participant_label, "sub")
        normalize_labels(self.session_label, "ses")
        normalize_labels(self.task_label, "task")
        normalize_labels(self.dictionary_tasks, "task")
        if self.dictionary_tasks and self.dictionary_scope != "model":
            bad("dictionary_tasks", self.dictionary_tasks, "selects the stories of the model-level "
                "dictionary; it needs --dictionary-scope model (the default)")
        check_output_location(self.output_dir, self.bids_dir, self.derivatives)
        if self.bids_database_dir is not None:
            if not isinstance(self.bids_database_dir, (str, Path)):
                bad("bids_database_dir", self.bids_database_dir, "must be the path of a folder")
            self.bids_database_dir = Path(self.bids_database_dir)
            db, inputs = _real(self.bids_database_dir), [self.bids_dir, self.derivatives]
            for inp in (_real(i) for i in inputs if i is not None):
                if db == inp or inp in db.parents:
                    bad("bids_database_dir", str(self.bids_database_dir),
                        f"lies inside the input {inp}, which is read only (and would be indexed); give a "
                        "folder elsewhere, e.g. in --work-dir")
        return self

    def resolved(self) -> dict:
        """The configuration as JSON-ready data, with software versions."""
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        data["compare"] = [str(p) for p in self.compare]
        return {"bids_llm_encode": __version__, "python": platform.python_version(),
                "software": software_versions(), "config": data}


def config_field_names() -> set[str]:
    return {f.name for f in fields(Config)}


def software_versions() -> dict:
    """Versions of the libraries whose behaviour shapes the results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("numpy", "scipy", "torch", "transformers", "nibabel", "nilearn", "pybids",
                "himalaya", "scikit-learn", "templateflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def load_config_file(path: Path) -> dict:
    """Read a JSON or TOML file of option values (keys as the long option names, - or _)."""
    text = Path(path).read_text()
    if Path(path).suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    data = data.get("config", data)  # accept a resolved-config file written by a run
    return {k.replace("-", "_"): v for k, v in data.items()}


def normalize_baselines(values) -> list[str]:
    """``--baselines`` values -> ``["auto"]``, ``["none"]`` or unique names of :data:`BASELINES`.

    Names may use ``-`` for ``_`` and be comma separated (``word-rate,envelope``).

    Raises
    ------
    UsageError (64)
        An unknown name, or ``auto`` / ``none`` given with other names.
    """
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for item in re.split(r"[\s,]+", str(value).strip()):
            if item:
                item = item.lower().replace("-", "_")
                if item not in out:
                    out.append(item)
    rule = f"choose auto, none, or one or more of {', '.join(BASELINES)}"
    if not out:
        raise UsageError(f"--baselines {values!r}: {rule}")
    unknown = [v for v in out if v not in BASELINES + ("auto", "none")]
    if unknown:
        raise UsageError(f"--baselines {unknown[0]!r}: unknown baseline; {rule}. Fix the option (or "
                         "the 'baselines' key of --config-file).")
    if len(out) > 1 and ("auto" in out or "none" in out):
        raise UsageError(f"--baselines {' '.join(out)}: 'auto' and 'none' stand alone; {rule}")
    return out


def _check_subgroup(mode) -> None:
    """``nonzero``, ``top-<fraction in (0, 1)>`` or ``top-<count >= 1>`` (patterns/subgroups.py)."""
    if mode == "nonzero":
        return
    text = mode[4:] if isinstance(mode, str) and mode.startswith("top-") else ""
    try:
        q = float(text)
    except ValueError:
        q = float("nan")
    if 0 < q < 1 or (q >= 1 and q.is_integer() and "." not in text):
        return
    raise UsageError(f"--subgroup {mode!r}: choose 'nonzero', 'top-<fraction in (0, 1)>' (e.g. "
                     "top-0.1) or 'top-<count>' (e.g. top-100)")


def normalize_labels(values: Optional[Iterable[str] | str], prefix: str) -> list[str]:
    """Labels without their BIDS prefix, read from files where a value is a file path.

    Parameters
    ----------
    values : str or iterable of str or None
        Labels (``"01"``, ``"sub-01"``), or paths to text files with one label per
        line (blank lines and ``#`` comments skipped). Whitespace/comma separated
        labels in one string are split.
    prefix : str
        ``"sub"``, ``"ses"``, ``"task"`` (with or without the ``-``).

    Returns
    -------
    list of str
        Unique labels in the given order.

    Raises
    ------
    UsageError
        A label that is not alphanumeric after removing the prefix. A bad line of
        a label file is named by its number only: the file's content is never
        echoed (``--participant-label /etc/passwd`` must not print a password line).
    """
    if values is None:
        return []
    if isinstance(values, (str, Path)):
        values = [values]
    pre = prefix if prefix.endswith("-") else prefix + "-"
    opt = {"sub-": "--participant-label", "ses-": "--session-label", "task-": "--task-label"}.get(
        pre, f"--{pre[:-1]}-label")
    rule = f"labels are letters and digits, with an optional '{pre}' prefix"
    out: list[str] = []
    for value in values:
        value = str(value).strip()
        if not value:
            continue
        path = Path(value).expanduser()
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"{opt} {path}: cannot read it as a text file of labels "
                                 f"({type(exc).__name__}); give labels or a file with one per line") from None
            items = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                for item in re.split(r"[\s,]+", line) if line else []:
                    label = item[len(pre):] if item.startswith(pre) else item
                    if not _LABEL.match(label):
                        raise UsageError(f"{opt} {path}, line {lineno}: not a {pre[:-1]} label ({rule}; "
                                         "the file must hold one label per line). Is it the right file?")
                    items.append(label)
        else:
            items = []
            for item in re.split(r"[\s,]+", value):
                if not item:
                    continue
                label = item[len(pre):] if item.startswith(pre) else item
                if not _LABEL.match(label):
                    raise UsageError(f"invalid {pre[:-1]} label {item!r} ({opt}): {rule}, or the path of "
                                     "an existing file with one label per line")
                items.append(label)
        for label in items:
            if label not in out:
                out.append(label)
    return out


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_output_location(output_dir, bids_dir, derivatives=None) -> None:
    """Refuse an output folder that would write into the input (symbolic links followed).

    The input is read only: ``output_dir`` must not be ``bids_dir``, contain it,
    or lie inside it anywhere but under ``bids_dir/derivatives/``; nor may it be,
    contain or lie inside the fMRIPrep folder (``derivatives``, default
    ``bids_dir/derivatives/fmriprep``). Checked on resolved paths before anything
    is written (the output folder need not exist).

    Raises
    ------
    UsageError (64)
    """
    if output_dir is None or bids_dir is None:
        return
    out, raw = _real(output_dir), _real(bids_dir)
    shown = f"the output folder {output_dir}" + (f" (= {out})" if str(out) != os.path.abspath(output_dir) else "")
    hint = f"Give another output folder, e.g. {Path(bids_dir) / 'derivatives' / 'bids_llm_encode'}."
    if out == raw:
        raise UsageError(f"{shown} is the input BIDS dataset {bids_dir}; the input is read only. {hint}")
    if raw in out.parents and not (raw / "derivatives") in (out, *out.parents):
        raise UsageError(f"{shown} lies inside the input BIDS dataset {bids_dir} but not under its "
                         f"derivatives/ folder; the input is read only. {hint}")
    if out == raw / "derivatives":
        raise UsageError(f"{shown} is the input dataset's derivatives/ folder itself. {hint}")
    if out in raw.parents:
        raise UsageError(f"{shown} contains the input BIDS dataset {bids_dir}; outputs would mix "
                         f"with the input. {hint}")
    fmriprep = _real(derivatives) if derivatives is not None else raw / "derivatives" / "fmriprep"
    if out == fmriprep or fmriprep in out.parents or out in fmriprep.parents:
        raise UsageError(f"{shown} is, contains or lies inside the fMRIPrep derivatives {fmriprep}, an "
                         f"input of this run. {hint}")

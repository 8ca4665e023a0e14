"""The one writer of every output: BIDS-Derivatives names, sidecars, atomic writes.

Only this module knows where outputs go and what they are called. Stages hand
it arrays, images and tables; it returns the paths it wrote.

Layout of ``output_dir``::

    dataset_description.json          # DatasetType "derivative", GeneratedBy, SourceDatasets, DatasetLinks
    .bidsignore                        # the non-standard names below, so the validator passes
    sub-<X>.html                       # participant report           (report_path)
    group.html                         # group report                 (group_report_path)
    sub-<X>/[ses-<Y>/]func/sub-<X>_..._<suffix>.<ext>  (+ .json sidecar)   (path)
    stimuli/<story>/model-<model>/<name>               (+ .json sidecar)   (story_path)
    stimuli/model-<model>/<name>                       (+ .json sidecar)   (model_path: the model-level dictionary)
    group/[<story>/]<name>                             (+ .json sidecar)   (group_path; no story: the dataset level)
    logs/config_<level>[_sub-<X>].json                 # resolved configuration (write_config)

Several participant-level processes may write into the same ``output_dir`` at
once. Every file is written under a temporary name in its final folder and
renamed into place (``os.replace``), so no reader ever sees half a file; the two
files that all processes share (``dataset_description.json`` and ``.bidsignore``)
are read, merged and rewritten while holding an exclusive ``fcntl`` lock on
``output_dir/.bids_llm_encode.lock``.

Containers: set ``BIDS_LLM_ENCODE_CONTAINER`` to ``docker[:<image tag>]`` or
``singularity[:<image>]`` (the Dockerfile and singularity.def do so); without it
no ``Container`` is recorded (see :func:`detect_container`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np

from .. import __version__
from ..cache import file_lock
from ..cache import umask as _umask
from ..config import Config, check_output_location
from ..errors import CantCreateError, DataError, IOFailure, UsageError

log = logging.getLogger(__name__)

CODE_URL = "https://github.com/bids-llm-encode/bids_llm_encode"  # as ``url`` in setup.cfg
BIDS_VERSION = "1.10.0"
PIPELINE_NAME = "bids_llm_encode"
LOCK_NAME = ".bids_llm_encode.lock"

#: BIDS entities in the order they appear in a file name, with the long names
#: (PyBIDS's) that are accepted as aliases. ``stat`` comes from draft BEP041.
ENTITY_ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sub", ("subject",)),
    ("ses", ("session",)),
    ("task", ()),
    ("acq", ("acquisition",)),
    ("ce", ("ceagent",)),
    ("rec", ("reconstruction",)),
    ("dir", ("direction",)),
    ("run", ()),
    ("echo", ()),
    ("space", ()),
    ("res", ("resolution",)),
    ("den", ("density",)),
    ("label", ()),
    ("desc", ("description",)),
    ("stat", ()),
)
_INDEX_ENTITIES = {"run", "echo"}
_ALIASES = {alias: short for short, aliases in ENTITY_ORDER for alias in (short, *aliases)}

#: Suffixes that BIDS(-Derivatives) knows and the validator checks; any other
#: suffix given to :meth:`DerivativesWriter.path` is listed in ``.bidsignore``.
STANDARD_SUFFIXES = frozenset({"bold", "boldref", "mask", "dseg", "probseg", "T1w"})

#: Always in ``.bidsignore``: our folders and reports, and the suffixes we write.
#: (Checked with bids-validator-deno 2.x: ``group/`` leaves ``/group/`` flagged as
#: NOT_INCLUDED, the anchored ``/group`` does not; a derivative needs no
#: participants.tsv and no sidecars.)
BIDSIGNORE_PATTERNS: tuple[str, ...] = (
    "/stimuli",  # a folder pattern with a trailing "/" still flags the folder itself
    "/group",
    "/logs",
    "*.html",
    "*_statmap.*",
    "*_summary.*",
    "*_design.*",
    "*_links.*",
    "*_overlap.*",
    "*_metrics.*",
    "*_timeseries.*",
)

_LABEL_RE = re.compile(r"^[0-9a-zA-Z]+$")
_INDEX_RE = re.compile(r"^[0-9]+$")
_SUFFIX_RE = re.compile(r"^[0-9a-zA-Z]+$")
_NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]*$")

PathLike = Union[str, os.PathLike]
Sources = Optional[Iterable[Union[PathLike, str]]]


# --------------------------------------------------------------------------- helpers


def _json_default(obj: Any) -> Any:
    """Make numpy values, paths and sets JSON-serialisable (for ``json.dumps``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"


def _os_error(exc: OSError, path: Path, what: str) -> Exception:
    """Map an ``OSError`` to the exit-coded error: 73 for permissions/space/layout, else 74."""
    cant_create = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                   errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}
    msg = (f"cannot {what} {path}: {exc.strerror or exc}. Check that the output folder is "
           "writable, has free space, and that no file stands where a folder is needed.")
    return CantCreateError(msg) if exc.errno in cant_create else IOFailure(msg)


#: Temporary files are ``.<final name>.<pid>.<random>.tmp[.<ext>]`` in the final folder:
#: a rerun of the participant (its ``sub-X/`` folder) and the group level (``group/``)
#: remove all of them, and any run removes those older than :data:`STALE_TEMP_AGE_S`
#: elsewhere in ``output_dir`` (``stimuli/``, ``logs/``, shared by concurrent runs).
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9.]+)?$")

#: Age (s) after which a temporary file in a shared folder is a leftover of a killed run: 24 h.
STALE_TEMP_AGE_S = 24 * 3600


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this writer's temporary names (:data:`TEMP_RE`)."""
    return TEMP_RE.match(name) is not None


def remove_stale_temps(folder: PathLike, older_than_s: Optional[float] = None) -> list[Path]:
    """Remove this writer's temporary files under ``folder`` (recursively); returns what was removed.

    ``older_than_s=None`` removes every one (a folder no other process writes
    to); else only those whose modification time is older than that many seconds.
    """
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for p in sorted(folder.rglob(".*.tmp*")):
        if not p.is_file() or p.is_symlink() or not is_temp_name(p.name):
            continue
        try:
            if older_than_s is not None and now - p.stat().st_mtime < older_than_s:
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove the leftover temporary file %s: %s", p, exc.strerror or exc)
            continue
        removed.append(p)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted run in %s (e.g. %s)",
                    len(removed), folder, removed[0].name)
    return removed


def _mkstemp(path: Path, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return tmp


def _atomic_write(path: Path, write: Callable[[str], None], suffix: str = ".tmp",
                  companion: Optional[tuple[Path, bytes]] = None) -> None:
    """Call ``write(tmp_name)`` for a temporary file in ``path``'s folder, then rename it to ``path``.

    The temporary file is removed when ``write`` fails, so a failed write leaves
    neither a partial file nor a temporary one, and an older ``path`` intact.
    The final file gets the usual permissions (0666 less the umask), not the
    0600 of ``mkstemp``, so that other users (the group level) can read it.

    ``companion``: ``(sidecar_path, bytes)`` written first under a temporary name
    too; both are complete before either is renamed, the sidecar first, so a
    kill never leaves a new data file without its sidecar.
    """
    tmps: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if companion is not None:
            tmps.append(_mkstemp(companion[0], ".tmp"))
        tmps.append(_mkstemp(path, suffix))
    except OSError as exc:
        for t in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        raise _os_error(exc, path, "create") from exc
    try:
        if companion is not None:
            _write_bytes_to(companion[1])(tmps[0])
        write(tmps[-1])
        for t in tmps:
            os.chmod(t, 0o666 & ~_umask())
        if companion is not None:
            os.replace(tmps[0], companion[0])
        os.replace(tmps[-1], path)
    except BaseException as exc:
        for t in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        if isinstance(exc, OSError):
            raise _os_error(exc, path, "write") from exc
        raise


def _write_bytes_to(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return write


def _normalise_doi(doi: str) -> str:
    """``10.x/y``, ``doi:10.x/y`` or ``https://doi.org/10.x/y`` -> ``doi:10.x/y``."""
    doi = doi.strip()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/",
                   "http://dx.doi.org/", "doi:", "DOI:"):
        if doi.startswith(prefix):
            doi = doi[len(prefix):]
            break
    return f"doi:{doi}"


def detect_container() -> Optional[dict]:
    """The ``Container`` object of ``GeneratedBy`` when running in this app's image, else None.

    Only ``$BIDS_LLM_ENCODE_CONTAINER`` (``docker[:tag]`` or ``singularity[:tag]``,
    set by the project's Dockerfile and singularity.def) counts: ``/.dockerenv``
    or ``$SINGULARITY_CONTAINER`` only say that *some* container runs, which may
    hold a pip-installed copy, so the record would name an image that was not used.

    Returns
    -------
    dict or None
        ``{"Type": "docker"|"singularity", "Tag": str}`` (``Tag`` when known).
    """
    env = os.environ.get("BIDS_LLM_ENCODE_CONTAINER", "").strip()
    if env:
        kind, _, tag = env.partition(":")
        out = {"Type": kind.lower()}
        if tag:
            out["Tag"] = tag
        return out
    return None


def _check_name(value: str, what: str) -> str:
    """A single path component made of letters, digits, ``._+-`` (no separators, no ``..``)."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} is not a plain file or folder name "
                         "(letters, digits, '.', '_', '+', '-'; no '/' and no '..')")
    return value


def _strip_prefix(value: str, prefix: str) -> str:
    return value[len(prefix) + 1:] if value.startswith(prefix + "-") else value


# --------------------------------------------------------------------------- the writer


class DerivativesWriter:
    """Writes every output file of a run into a BIDS-Derivatives folder.

    Parameters
    ----------
    output_dir : Path
        The derivatives folder; created when absent.
    config : Config
        The run's configuration: ``bids_dir`` and ``derivatives`` (the fMRIPrep
        folder; default ``bids_dir/derivatives/fmriprep`` when it exists) give
        the roots of ``bids:raw:`` and ``bids:fmriprep:`` source URIs.
    source_dataset : Path or None
        The raw BIDS dataset (default ``config.bids_dir``). Its
        ``dataset_description.json`` gives the ``DatasetDOI`` for ``SourceDatasets``.

    Raises
    ------
    CantCreateError
        ``output_dir`` cannot be created or written (read-only, a file in the way).
    UsageError
        ``output_dir`` is the raw dataset, or holds a raw (non-derivative) dataset.
    DataError
        ``output_dir/dataset_description.json`` or the raw one is not a JSON object.

    Notes
    -----
    Creating a writer writes (or merges into) ``dataset_description.json`` and
    ``.bidsignore`` under a file lock, so several participant-level processes may
    create writers on the same ``output_dir`` at once.
    """

    def __init__(self, output_dir: PathLike, config: Config, source_dataset: Optional[PathLike] = None):
        self.config = config
        self.output_dir = Path(os.path.abspath(output_dir))
        src = source_dataset if source_dataset is not None else getattr(config, "bids_dir", None)
        self.source_dataset = Path(os.path.abspath(src)) if src is not None else None
        deriv = getattr(config, "derivatives", None)
        if deriv is None and self.source_dataset is not None:
            candidate = self.source_dataset / "derivatives" / "fmriprep"
            deriv = candidate if candidate.is_dir() else None
        self.derivatives_dir = Path(os.path.abspath(deriv)) if deriv is not None else None
        # resolved paths (symbolic links followed), before anything is created: the input is read only
        check_output_location(self.output_dir, self.source_dataset, getattr(config, "derivatives", None))
        self._ignored: set[str] = set()
        self._make_output_dir()
        self._update_dataset_description()
        self.add_bidsignore(BIDSIGNORE_PATTERNS)
        self.remove_shared_temps()

    def remove_shared_temps(self) -> list[Path]:
        """Temporary files older than :data:`STALE_TEMP_AGE_S` in the folders runs share.

        ``output_dir`` itself, ``stimuli/`` and ``logs/``: other runs may be writing
        there right now, so only old leftovers go. ``sub-X/`` and ``group/`` are
        cleaned in full by :meth:`remove_temps` when their level starts.
        """
        import time

        removed = []
        for p in self.output_dir.iterdir():
            if p.is_file() and is_temp_name(p.name):
                with contextlib.suppress(OSError):
                    if time.time() - p.stat().st_mtime >= STALE_TEMP_AGE_S:
                        p.unlink()
                        removed.append(p)
        for sub in ("stimuli", "logs"):
            removed += remove_stale_temps(self.output_dir / sub, STALE_TEMP_AGE_S)
        return removed

    def remove_temps(self, folder: PathLike) -> list[Path]:
        """Every temporary file under ``folder`` (a participant's ``sub-X/`` at its start, ``group/``)."""
        folder = Path(os.path.abspath(folder))
        if self.output_dir not in folder.parents:
            raise ValueError(f"{folder} is not inside the output folder {self.output_dir}")
        return remove_stale_temps(folder, None)

    def subject_dir(self, subject: str) -> Path:
        """``output_dir/sub-<X>``: the folder only that participant's run writes into."""
        label = _strip_prefix(str(subject), "sub")
        if not _LABEL_RE.match(label):
            raise ValueError(f"subject {subject!r} must be letters and digits only")
        return self.output_dir / f"sub-{label}"

    # ------------------------------------------------------------------ set-up

    def _make_output_dir(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise CantCreateError(f"cannot create the output folder {self.output_dir}: a file with "
                                  "that name is in the way. Remove it or give another output folder.") from exc
        except OSError as exc:
            raise CantCreateError(f"cannot create the output folder {self.output_dir}: "
                                  f"{exc.strerror or exc}. Give a writable output folder.") from exc
        if not self.output_dir.is_dir():
            raise CantCreateError(f"the output folder {self.output_dir} is not a folder. "
                                  "Give another output folder.")
        probe = self.output_dir / LOCK_NAME
        try:
            with open(probe, "a"):
                pass
        except OSError as exc:
            raise CantCreateError(f"cannot write into the output folder {self.output_dir}: "
                                  f"{exc.strerror or exc}. Give a writable output folder.") from exc

    @contextlib.contextmanager
    def _locked(self):
        try:
            with file_lock(self.output_dir / LOCK_NAME,
                           advice="Give an output folder on a file system with flock (local disk, "
                           "NFSv4, GPFS, Lustre mounted with flock)."):
                yield
        except OSError as exc:
            raise _os_error(exc, self.output_dir / LOCK_NAME, "lock") from exc

    def _read_json_object(self, path: Path, what: str) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{what} {path} is not valid JSON ({exc}). Fix or remove it.") from exc
        if not isinstance(data, dict):
            raise DataError(f"{what} {path} must hold a JSON object, not {type(data).__name__}. "
                            "Fix or remove it.")
        return data

    def _source_entry(self) -> Optional[dict]:
        if self.source_dataset is None:
            return None
        desc_path = self.source_dataset / "dataset_description.json"
        entry: dict = {}
        if desc_path.is_file():
            raw = self._read_json_object(desc_path, "the input dataset description")
            doi = raw.get("DatasetDOI")
            if isinstance(doi, str) and doi.strip():
                entry["DOI"] = _normalise_doi(doi)
        else:
            log.warning("no dataset_description.json in the input dataset %s", self.source_dataset)
        entry["URL"] = self.source_dataset.as_uri()
        return entry

    def _description(self, old: dict) -> dict:
        generated: dict = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
        container = detect_container()
        if container:
            generated["Container"] = container
        desc = dict(old)
        desc.setdefault("Name", f"{PIPELINE_NAME} outputs")
        desc["BIDSVersion"] = BIDS_VERSION
        desc["DatasetType"] = "derivative"
        others = []
        for g in old.get("GeneratedBy", []) or []:
            if isinstance(g, dict) and g.get("Name") == PIPELINE_NAME:
                if g.get("Version") != __version__:
                    log.warning("%s holds outputs of %s %s; this run (%s) adds to them",
                                self.output_dir, PIPELINE_NAME, g.get("Version"), __version__)
            else:
                others.append(g)
        if others:
            log.warning("%s also holds outputs of %s", self.output_dir,
                        ", ".join(str(g.get("Name")) if isinstance(g, dict) else str(g) for g in others))
        desc["GeneratedBy"] = [generated, *others]
        sources = [s for s in old.get("SourceDatasets", []) or [] if isinstance(s, dict)]
        entry = self._source_entry()
        if entry is not None:
            sources = [s for s in sources if s.get("URL") != entry["URL"]
                       and ("DOI" not in entry or s.get("DOI") != entry["DOI"])]
            sources.insert(0, entry)
        if sources:
            desc["SourceDatasets"] = sources
        links = dict(old.get("DatasetLinks", {}) or {})
        if self.source_dataset is not None:
            links["raw"] = self.source_dataset.as_uri()
        if self.derivatives_dir is not None:
            links["fmriprep"] = self.derivatives_dir.as_uri()
        if links:
            desc["DatasetLinks"] = links
        return desc

    def _update_dataset_description(self) -> None:
        path = self.output_dir / "dataset_description.json"
        with self._locked():
            old: dict = {}
            if path.exists():
                old = self._read_json_object(path, "the output dataset description")
                if old.get("DatasetType", "raw") != "derivative":
                    raise UsageError(f"{path} describes a raw BIDS dataset (DatasetType is not "
                                     "'derivative'): the output folder must not be a raw dataset. "
                                     "Give another output folder.")
            desc = self._description(old)
            if desc != old:
                _atomic_write(path, _write_bytes_to(_dumps(desc).encode("utf-8")))
                log.info("wrote %s", path)

    def add_bidsignore(self, patterns: Iterable[str]) -> None:
        """Add ``patterns`` (``.gitignore`` style) to ``output_dir/.bidsignore``, keeping what is there.

        Parameters
        ----------
        patterns : iterable of str
            One pattern each, e.g. ``"*_statmap.*"`` or ``"stimuli/"``.
        """
        new = [p for p in patterns if p not in self._ignored]
        if not new:
            return
        for p in new:
            if not p or "\n" in p:
                raise ValueError(f"bad .bidsignore pattern {p!r}")
        path = self.output_dir / ".bidsignore"
        with self._locked():
            lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
            missing = [p for p in dict.fromkeys(new) if p not in lines]
            if missing:
                text = "\n".join([*lines, *missing]) + "\n"
                _atomic_write(path, _write_bytes_to(text.encode("utf-8")))
        self._ignored.update(new)

    # ------------------------------------------------------------------ names

    def path(self, entities: Mapping[str, Any], suffix: str, extension: str,
             datatype: Optional[str] = "func") -> Path:
        """The path of a participant-level output, named by BIDS entities.

        Parameters
        ----------
        entities : mapping
            Entity values by short (``sub``, ``desc``) or PyBIDS long name
            (``subject``, ``description``); ``sub`` is required; None values are
            dropped. Labels are alphanumeric (a ``sub-``/``ses-`` prefix is
            stripped); ``run`` and ``echo`` are written as given (``1`` or ``"01"``).
        suffix : str
            E.g. ``"statmap"``, ``"summary"``. A suffix BIDS does not define is
            added to ``.bidsignore``.
        extension : str
            With or without the leading dot: ``".nii.gz"``, ``"tsv"``.
        datatype : str or None
            The folder under ``sub-X[/ses-Y]`` (default ``"func"``); None for none.

        Returns
        -------
        Path
            ``output_dir/sub-X[/ses-Y]/func/sub-X[_ses-Y]_task-..._<suffix><extension>``,
            entities in the order sub, ses, task, acq, ce, rec, dir, run, echo,
            space, res, den, label, desc, stat.
        """
        values: dict[str, str] = {}
        for key, value in entities.items():
            short = _ALIASES.get(key)
            if short is None:
                raise ValueError(f"unknown BIDS entity {key!r}; known: {[e for e, _ in ENTITY_ORDER]}")
            if value is None:
                continue
            if short in values:
                raise ValueError(f"entity {short!r} given twice (as {key!r} and another name)")
            if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
                raise ValueError(f"entity {key}={value!r} must be a string or an integer")
            text = str(value)
            if short in _INDEX_ENTITIES:
                if not _INDEX_RE.match(text):
                    raise ValueError(f"entity {key}={value!r} must be a non-negative integer")
            else:
                text = _strip_prefix(text, short)
                if not _LABEL_RE.match(text):
                    raise ValueError(f"entity {key}={value!r} must be letters and digits only")
            values[short] = text
        if "sub" not in values:
            raise ValueError("a participant-level output needs the 'sub' (subject) entity")
        if not _SUFFIX_RE.match(suffix or ""):
            raise ValueError(f"suffix {suffix!r} must be letters and digits only")
        ext = extension if extension.startswith(".") else f".{extension}"
        if not re.match(r"^(\.[0-9A-Za-z]+)+$", ext):
            raise ValueError(f"extension {extension!r} is not like '.nii.gz' or '.tsv'")
        name = "_".join(f"{k}-{values[k]}" for k, _ in ENTITY_ORDER if k in values)
        folder = self.output_dir / f"sub-{values['sub']}"
        if "ses" in values:
            folder = folder / f"ses-{values['ses']}"
        if datatype is not None:
            folder = folder / _check_name(datatype, "datatype")
        if suffix not in STANDARD_SUFFIXES:
            self.add_bidsignore([f"*_{suffix}.*"])
        return folder / f"{name}_{suffix}{ext}"

    def story_path(self, story: str, model: str, name: str) -> Path:
        """Path of a stimulus-level file shared by all participants.

        Returns ``output_dir/stimuli/<story>/model-<model>/<name>`` (e.g. ``atoms.tsv``).
        """
        return (self.output_dir / "stimuli" / _check_name(story, "story")
                / f"model-{_check_name(model, 'model')}" / _check_name(name, "file name"))

    def model_path(self, model: str, name: str) -> Path:
        """Path of a file of the model-level dictionary (``--dictionary-scope model``), shared by all
        stories and participants: ``output_dir/stimuli/model-<model>/<name>``."""
        return self.output_dir / "stimuli" / f"model-{_check_name(model, 'model')}" / _check_name(name, "file name")

    def group_path(self, name: str, story: Optional[str] = None) -> Path:
        """Path of a group-level file: ``output_dir/group/[<story>/]<name>``."""
        folder = self.output_dir / "group"
        if story is not None:
            folder = folder / _check_name(story, "story")
        return folder / _check_name(name, "file name")

    def report_path(self, subject: str) -> Path:
        """The participant's HTML report: ``output_dir/sub-<X>.html`` (fMRIPrep's place)."""
        label = _strip_prefix(str(subject), "sub")
        if not _LABEL_RE.match(label):
            raise ValueError(f"subject {subject!r} must be letters and digits only")
        return self.output_dir / f"sub-{label}.html"

    def group_report_path(self) -> Path:
        """The group HTML report: ``output_dir/group.html``."""
        return self.output_dir / "group.html"

    def config_path(self, level: str, subject: Optional[str] = None) -> Path:
        """``output_dir/logs/config_<level>[_sub-<X>].json`` (``logs/`` is in ``.bidsignore``)."""
        name = f"config_{_check_name(level, 'analysis level')}"
        if subject is not None:
            label = _strip_prefix(str(subject), "sub")
            if not _LABEL_RE.match(label):
                raise ValueError(f"subject {subject!r} must be letters and digits only")
            name += f"_sub-{label}"
        return self.output_dir / "logs" / f"{name}.json"

    # ------------------------------------------------------------------ sources

    def source_uri(self, source: Union[PathLike, str]) -> str:
        """A BIDS URI for an input file.

        ``bids:raw:<rel>`` under the raw dataset, ``bids:fmriprep:<rel>`` under the
        fMRIPrep derivatives, ``bids::<rel>`` inside ``output_dir``, the most
        specific (deepest) folder winning; strings that are already URIs
        (``bids:``, ``doi:``, ``http(s)://``, ``file://``) are kept; any other
        path is given as an absolute path.
        """
        if isinstance(source, str) and re.match(r"^(bids:|doi:|[a-zA-Z][a-zA-Z0-9+.-]*://)", source):
            return source
        raw = os.path.abspath(os.fspath(source))
        roots = [("", self.output_dir), ("fmriprep", self.derivatives_dir), ("raw", self.source_dataset)]
        for candidate in (raw, os.path.realpath(raw)):
            best: Optional[tuple[int, str, str]] = None
            for name, root in roots:
                if root is None:
                    continue
                for r in {os.fspath(root), os.path.realpath(root)}:
                    if candidate == r or candidate.startswith(r.rstrip(os.sep) + os.sep):
                        rel = os.path.relpath(candidate, r).replace(os.sep, "/")
                        if best is None or len(r) > best[0]:
                            best = (len(r), name, rel)
            if best is not None:
                return f"bids:{best[1]}:{best[2]}"
        return raw

    def source_uris(self, sources: Sources) -> list[str]:
        """:meth:`source_uri` of each source (an empty list for None)."""
        if sources is None:
            return []
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        return [self.source_uri(s) for s in sources]

    # ------------------------------------------------------------------ writers

    def _check_inside(self, path: PathLike) -> Path:
        p = Path(os.path.abspath(path))
        real_out = Path(os.path.realpath(self.output_dir))
        real_parent = Path(os.path.realpath(p.parent))
        inside = self.output_dir in p.parents and (real_parent == real_out or real_out in real_parent.parents)
        if not inside:  # also catches a symbolic link inside output_dir that points elsewhere
            raise ValueError(f"refusing to write {p}: it is outside the output folder {self.output_dir}")
        return p

    @staticmethod
    def sidecar_path(path: PathLike) -> Path:
        """``x.nii.gz`` / ``x.tsv`` / ``x.npz`` -> ``x.json`` (all extensions replaced)."""
        p = Path(path)
        stem = p.name.split(".", 1)[0]
        return p.with_name(f"{stem}.json")

    def _sidecar_bytes(self, path: Path, sidecar: Mapping[str, Any], sources: Sources) -> tuple[Path, bytes]:
        if not isinstance(sidecar, Mapping) or not str(sidecar.get("Description", "")).strip():
            raise ValueError(f"the sidecar of {path} needs a non-empty 'Description'")
        data = dict(sidecar)
        uris = self.source_uris(sources)
        if uris or "Sources" not in data:
            data["Sources"] = list(dict.fromkeys([*data.get("Sources", []), *uris]))
        side = self.sidecar_path(path)
        if side == path:
            raise ValueError(f"{path} is a JSON file: use write_json, which writes no sidecar")
        return side, _dumps(data).encode("utf-8")

    def _write_with_sidecar(self, path: Path, write: Callable[[str], None], suffix: str,
                            sidecar: Mapping[str, Any], sources: Sources) -> None:
        """The data file and its sidecar land together (:func:`_atomic_write` with a companion)."""
        _atomic_write(path, write, suffix=suffix, companion=self._sidecar_bytes(path, sidecar, sources))

    def _prepare(self, path: PathLike, sidecar: Optional[Mapping[str, Any]]) -> Path:
        p = self._check_inside(path)
        if sidecar is not None and (not isinstance(sidecar, Mapping)
                                    or not str(sidecar.get("Description", "")).strip()):
            raise ValueError(f"the sidecar of {p} needs a non-empty 'Description'")
        return p

    def write_nifti(self, img, path: PathLike, sidecar: Mapping[str, Any], sources: Sources = None) -> Path:
        """Write a NIfTI image and its JSON sidecar.

        Parameters
        ----------
        img : nibabel.Nifti1Image or nibabel.Nifti2Image
            A map, shape (x, y, z) or (x, y, z, t). Unset spatial/time units are
            written as mm / s.
        path : Path
            From :meth:`path`, ending in ``.nii.gz`` or ``.nii``.
        sidecar : mapping
            ``{"Description": ..., **metadata}``.
        sources : iterable of paths or URIs, optional
            The inputs, written as ``Sources`` URIs.

        Returns
        -------
        Path
            The final path.
        """
        import nibabel as nib

        p = self._prepare(path, sidecar)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"{p}: expected a nibabel Nifti1Image/Nifti2Image, got {type(img).__name__}")
        ext = ".nii.gz" if p.name.endswith(".nii.gz") else ".nii" if p.name.endswith(".nii") else None
        if ext is None:
            raise ValueError(f"{p}: a NIfTI file name must end in .nii.gz or .nii")
        out = img.__class__(img.dataobj, img.affine, img.header.copy())
        xyz, t = out.header.get_xyzt_units()
        if xyz == "unknown" or (out.ndim > 3 and t == "unknown"):
            out.header.set_xyzt_units("mm" if xyz == "unknown" else xyz,
                                      "sec" if t == "unknown" else t)
        self._write_with_sidecar(p, lambda tmp: nib.save(out, tmp), f".tmp{ext}", sidecar, sources)
        log.debug("wrote %s", p)
        return p

    def write_cifti(self, img, path: PathLike, sidecar: Mapping[str, Any], sources: Sources = None) -> Path:
        """Write a CIFTI-2 image (a map over grayordinates) and its JSON sidecar.

        Parameters
        ----------
        img : nibabel.Cifti2Image or bids.images.GrayordinateMap
            A map over grayordinates (``bids.images.unmask`` of a CIFTI run's values).
        path : Path
            From :meth:`path`, ending in ``.dscalar.nii`` (or ``.dtseries.nii`` / ``.dlabel.nii``).
        """
        import nibabel as nib

        from .images import GrayordinateMap

        p = self._prepare(path, sidecar)
        if not isinstance(img, (nib.Cifti2Image, GrayordinateMap)):
            raise ValueError(f"{p}: expected a nibabel Cifti2Image or a GrayordinateMap, got {type(img).__name__}")
        ext = next((e for e in (".dscalar.nii", ".dtseries.nii", ".dlabel.nii") if p.name.endswith(e)), None)
        if ext is None:
            raise ValueError(f"{p}: a CIFTI file name must end in .dscalar.nii, .dtseries.nii or .dlabel.nii")
        if isinstance(img, GrayordinateMap):  # the grid's cached header bytes + the values (fast)
            write = _write_bytes_to(img.to_bytes())
        else:
            def write(tmp: str) -> None:
                nib.save(img, tmp)
        self._write_with_sidecar(p, write, f".tmp{ext}", sidecar, sources)
        log.debug("wrote %s", p)
        return p

    def write_image(self, img, path: PathLike, sidecar: Mapping[str, Any], sources: Sources = None) -> Path:
        """Write a map: :meth:`write_nifti` for a volume image, :meth:`write_cifti` for grayordinates.

        The one way maps are written (``bids.images.unmask`` gives either, from the
        run's mask image or its ``Grayordinates``); ``OutputFiles`` names them with
        the matching extension.
        """
        import nibabel as nib

        from .images import GrayordinateMap

        if isinstance(img, (nib.Cifti2Image, GrayordinateMap)):
            return self.write_cifti(img, path, sidecar, sources)
        return self.write_nifti(img, path, sidecar, sources)

    def write_tsv(self, df, path: PathLike, sidecar: Mapping[str, Any], sources: Sources = None) -> Path:
        """Write a table as BIDS TSV (tab-separated, ``n/a`` for missing, no index) and its sidecar.

        Parameters
        ----------
        df : pandas.DataFrame
            Shape (n_rows, n_columns); column names unique strings. Keep the
            index as a column (``df.reset_index()``) if it matters: it is not written.
        path : Path
            Ending in ``.tsv``.
        sidecar : mapping
            ``{"Description": ..., "<column>": {"Description": ..., "Units": ...}, ...}``
            (column keys must name columns of ``df``).
        sources : iterable of paths or URIs, optional

        Returns
        -------
        Path
        """
        import pandas as pd

        p = self._prepare(path, sidecar)
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"{p}: expected a pandas DataFrame, got {type(df).__name__}")
        if not p.name.endswith(".tsv"):
            raise ValueError(f"{p}: a table's file name must end in .tsv")
        cols = [str(c) for c in df.columns]
        if len(set(cols)) != len(cols):
            raise ValueError(f"{p}: column names must be unique, got {cols}")
        for key, value in sidecar.items():
            if isinstance(value, Mapping) and key not in cols:
                raise ValueError(f"{p}: the sidecar describes column {key!r}, which the table lacks")
        for c in df.columns:
            if df[c].dtype == object:
                bad = df[c].map(lambda v: isinstance(v, str) and any(ch in v for ch in "\t\n\r")).any()
                if bad:
                    raise ValueError(f"{p}: column {c!r} has a tab or newline inside a value")
        text = df.to_csv(sep="\t", na_rep="n/a", index=False, lineterminator="\n")
        self._write_with_sidecar(p, _write_bytes_to(text.encode("utf-8")), ".tmp", sidecar, sources)
        log.debug("wrote %s", p)
        return p

    def write_json(self, data: Any, path: PathLike, sources: Sources = None) -> Path:
        """Write JSON data (no sidecar); ``sources`` go into ``data["Sources"]`` (a dict then).

        NaN/inf are refused (not valid JSON); numpy values and paths are converted.
        """
        p = self._prepare(path, None)
        if not p.name.endswith(".json"):
            raise ValueError(f"{p}: a JSON file name must end in .json")
        uris = self.source_uris(sources)
        if uris:
            if not isinstance(data, Mapping):
                raise ValueError(f"{p}: sources can only be added to a JSON object")
            data = dict(data)
            data["Sources"] = list(dict.fromkeys([*data.get("Sources", []), *uris]))
        text = _dumps(data)  # fails before any file is made
        _atomic_write(p, _write_bytes_to(text.encode("utf-8")))
        log.debug("wrote %s", p)
        return p

    def write_npz(self, arrays_or_sparse, path: PathLike, sidecar: Mapping[str, Any],
                  sources: Sources = None) -> Path:
        """Write arrays (``np.savez_compressed``) or one scipy.sparse matrix (``save_npz``) and a sidecar.

        Parameters
        ----------
        arrays_or_sparse : mapping of str to ndarray, or scipy.sparse matrix/array
            E.g. ``{"D": (n_frames, K), "A": (K, n_neurons)}`` or a sparse
            loadings matrix (K, n_neurons).
        path : Path
            Ending in ``.npz``.
        """
        import scipy.sparse as sp

        p = self._prepare(path, sidecar)
        if not p.name.endswith(".npz"):
            raise ValueError(f"{p}: file name must end in .npz")
        if sp.issparse(arrays_or_sparse):
            mat = arrays_or_sparse

            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    sp.save_npz(fh, mat, compressed=True)
        elif isinstance(arrays_or_sparse, Mapping):
            arrays = {}
            for k, v in arrays_or_sparse.items():
                a = np.asarray(v)
                if a.dtype == object:
                    raise ValueError(f"{p}: array {k!r} has dtype object, which cannot be saved without pickle")
                arrays[str(k)] = a

            def write(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **arrays)
        else:
            raise ValueError(f"{p}: expected a mapping of arrays or a scipy.sparse matrix, "
                             f"got {type(arrays_or_sparse).__name__}")
        self._write_with_sidecar(p, write, ".tmp.npz", sidecar, sources)
        log.debug("wrote %s", p)
        return p

    def write_npy(self, array, path: PathLike, sidecar: Mapping[str, Any], sources: Sources = None) -> Path:
        """Write one array (``np.save``, no pickle) and its sidecar.

        Parameters
        ----------
        array : ndarray, any shape (not dtype object)
        path : Path
            Ending in ``.npy``.
        """
        p = self._prepare(path, sidecar)
        if not p.name.endswith(".npy"):
            raise ValueError(f"{p}: file name must end in .npy")
        a = np.asarray(array)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, a, allow_pickle=False)

        self._write_with_sidecar(p, write, ".tmp.npy", sidecar, sources)
        log.debug("wrote %s", p)
        return p

    def write_text(self, text: str, path: PathLike) -> Path:
        """Write text as UTF-8 (HTML reports), no sidecar."""
        p = self._prepare(path, None)
        if not isinstance(text, str):
            raise ValueError(f"{p}: expected text (str), got {type(text).__name__}")
        _atomic_write(p, _write_bytes_to(text.encode("utf-8")))
        log.debug("wrote %s", p)
        return p

    def write_config(self, resolved: Mapping[str, Any], level: str, subject: Optional[str] = None) -> Path:
        """Write the resolved configuration (``Config.resolved()``) to :meth:`config_path`.

        A later run of the same level and participant replaces the file.
        """
        if not isinstance(resolved, Mapping):
            raise ValueError(f"the resolved configuration must be a mapping, got {type(resolved).__name__}")
        return self.write_json(dict(resolved), self.config_path(level, subject))


# --------------------------------------------------------------------------- names of every output


def label(text: str) -> str:
    """A BIDS label (letters and digits) from a free name: ``smollm2-135m`` -> ``smollm2135m``."""
    return re.sub(r"[^0-9A-Za-z]", "", text)


def model_label(config: Config) -> str:
    """The model's name in file and folder names (a path's stem for local models)."""
    name = Path(config.model).name if ("/" in config.model or config.model.endswith(".gguf")) \
        else config.model
    name = re.sub(r"\.gguf$", "", name)
    return re.sub(r"[^0-9A-Za-z.-]", "-", name)


class OutputFiles:
    """The name of every output, participant, stimulus and group level (the one place).

    ``ent`` is a story's entities without space (sub, ses, task); maps add the
    space. The participant level writes and the group level reads through the
    same methods; the writer (:meth:`DerivativesWriter.path`, ``story_path``,
    ``group_path``) turns them into paths inside ``output_dir``.
    (``workflows.participant.ParticipantFiles`` is this class.)
    """

    def __init__(self, writer: DerivativesWriter, space: str):
        from .images import CIFTI_DENSITY, is_cifti_space

        self.writer, self.space = writer, space
        #: maps over grayordinates (``--space fsLR``): ``space-fsLR_den-91k_..dscalar.nii``
        self.cifti = is_cifti_space(space)
        self._grid = {"space": space, "den": CIFTI_DENSITY} if self.cifti else {"space": space}
        self.map_ext = ".dscalar.nii" if self.cifti else ".nii.gz"

    # entities: the story names a participant's per-story outputs
    @staticmethod
    def story_entities(subject: str, session: Optional[str], story: str) -> dict:
        """Entities of one participant's outputs of one story: sub, [ses,] ``task-<story>``.

        The ``task`` entity holds the **story** (letters and digits of its name), not the
        BIDS task label: a run may hold several stories (Narratives' task-schema) and a
        task may hold several, each analysed with its own atoms; the story is the unit
        that names the files, as at the group level. The tasks are in the sidecars.
        """
        ent = {"sub": subject, "task": label(story)}
        if session:
            ent["ses"] = session
        if not ent["task"]:
            raise ValueError(f"story {story!r} has no letters or digits to name its outputs")
        return ent

    @classmethod
    def run_entities(cls, run) -> dict:
        """Entities of one run's per-story outputs (the design tables): :meth:`story_entities` + run."""
        ent = cls.story_entities(run.subject, run.session, run.story.name)
        if run.run is not None:
            ent["run"] = run.run
        return ent

    # participant level: output_dir/sub-X/[ses-Y/]func/
    def summary(self, subject: str) -> Path:
        return self.writer.path({"sub": subject, "desc": "runs"}, "summary", ".tsv")

    def completion(self, subject: str) -> Path:
        """``sub-X/sub-X_completion.json``: written last by a participant run that finished."""
        return self.writer.path({"sub": subject}, "completion", ".json", datatype=None)

    def design(self, run_entities: dict, desc: str = "atoms") -> Path:
        """``desc`` atoms (the atoms' time courses) or baselines (the low-level regressors)."""
        return self.writer.path(dict(run_entities, desc=desc), "design", ".tsv")

    def statmap(self, ent: dict, desc: str, stat: str) -> Path:
        """A map: ``.nii.gz`` in a volume space, ``den-91k_...statmap.dscalar.nii`` on grayordinates."""
        return self.writer.path(dict(ent, **self._grid, desc=desc, stat=stat), "statmap", self.map_ext)

    def fdr_mask(self, ent: dict, desc: str = "cvfdr") -> Path:
        """``desc`` cvfdr (CV r significant) or uniquefdr (the atoms' unique part significant).

        On grayordinates ``..._mask.dscalar.nii``: BIDS knows ``mask`` for volumes only, so
        the pattern goes into ``.bidsignore`` (the validator refuses it otherwise).
        """
        if self.cifti:
            self.writer.add_bidsignore([f"*den-{self._grid['den']}*_mask.*"])  # (a leading '_' there fails to match)
        return self.writer.path(dict(ent, **self._grid, desc=desc), "mask", self.map_ext)

    def table(self, ent: dict, atlas: str, suffix: str, extension: str = ".tsv") -> Path:
        return self.writer.path(dict(ent, desc=label(atlas)), suffix, extension)

    # stimulus level: output_dir/stimuli/<story>/model-<model>/
    STORY_FILES = {"modelcard": "modelcard.json", "atoms": "atoms.tsv", "loadings": "loadings.npz",
                   "loadings_table": "loadings.tsv", "subgroups": "subgroups.tsv", "stability": "stability.tsv",
                   "neurons": "neurons.npy"}

    def story(self, story: str, model: str, kind: str) -> Path:
        """``kind`` one of :attr:`STORY_FILES` (``atoms``, ``modelcard``, ...)."""
        if kind not in self.STORY_FILES:
            raise ValueError(f"unknown stimulus file {kind!r}; known: {sorted(self.STORY_FILES)}")
        return self.writer.story_path(story, model, self.STORY_FILES[kind])

    # the model-level dictionary (--dictionary-scope model): output_dir/stimuli/model-<model>/
    MODEL_FILES = {"modelcard": "modelcard.json", "atoms": "atoms.tsv", "loadings": "loadings.npz",
                   "loadings_table": "loadings.tsv", "subgroups": "subgroups.tsv", "stability": "stability.tsv"}

    def model(self, model: str, kind: str) -> Path:
        """``kind`` one of :attr:`MODEL_FILES`: the one dictionary of the model over the dataset's stories."""
        if kind not in self.MODEL_FILES:
            raise ValueError(f"unknown model-level file {kind!r}; known: {sorted(self.MODEL_FILES)}")
        return self.writer.model_path(model, self.MODEL_FILES[kind])

    def dictionary_files(self, scope: str, story: str, model: str, kind: str) -> Path:
        """Where the dictionary's ``kind`` file of ``story`` is: its own folder (``story`` scope), or
        the model level's (``model`` scope), except ``atoms`` and ``neurons``, which are per story
        at both scopes (at model scope: the story's rows of the model-level atoms)."""
        if scope == "model" and kind in self.MODEL_FILES and kind != "atoms":
            return self.model(model, kind)
        return self.story(story, model, kind)

    # reports: output_dir/sub-X.html, output_dir/group.html
    def report(self, subject: str) -> Path:
        return self.writer.report_path(subject)

    def group_report(self) -> Path:
        return self.writer.group_report_path()

    # group level: output_dir/group/<story>/, and output_dir/group/ for the dataset level
    # (story None): no task entity, as a BIDS file that applies to every task omits it
    # (inheritance principle), and no made-up story label ("task-all") that a real story
    # named "all" would collide with.
    @staticmethod
    def _task(story: Optional[str]) -> str:
        return "" if story is None else f"task-{label(story)}_"

    def group_statmap(self, story: Optional[str], desc: str, stat: str) -> Path:
        """``group/<story>/task-<story>_space-..._statmap.nii.gz``; story None: ``group/space-...``."""
        den = f"_den-{self._grid['den']}" if self.cifti else ""
        return self.writer.group_path(
            f"{self._task(story)}space-{label(self.space)}{den}_desc-{label(desc)}_stat-{label(stat)}"
            f"_statmap{self.map_ext}", story)

    def group_table(self, story: Optional[str], atlas: str, suffix: str, extension: str = ".tsv") -> Path:
        """``group/<story>/task-<story>_desc-<atlas>_<suffix>``; story None: ``group/desc-<atlas>_<suffix>``."""
        return self.writer.group_path(f"{self._task(story)}desc-{label(atlas)}_{label(suffix)}{extension}",
                                      story)

    def model_comparison(self) -> Path:
        return self.writer.group_path("model_comparison.tsv")


__all__ = ["DerivativesWriter", "OutputFiles", "label", "model_label", "detect_container", "remove_stale_temps", "is_temp_name", "TEMP_RE",
           "STALE_TEMP_AGE_S", "ENTITY_ORDER", "BIDSIGNORE_PATTERNS",
           "STANDARD_SUFFIXES", "BIDS_VERSION", "CODE_URL"]

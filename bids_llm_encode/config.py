"""One configuration object for the whole run.

Every command-line option is a field here; ``--config-file`` (JSON or TOML)
can set any of them, and the command line wins. The resolved configuration,
with software versions, is written next to the outputs by ``bids/outputs.py``.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from . import __version__


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
    # patterns (section 3)
    n_atoms: int = 64
    sparsity: float = 0.15  # relative lambda: R^2 ~0.55 on MiniLM (BERT), docs/patterns.md
    subgroup: str = "nonzero"  # nonzero | top-<q>
    atom_tr: float = 1.5
    seed: int = 0
    # encoding (section 4)
    confounds_strategy: str = "narratives"  # narratives | simple | compcor | scrubbing (nilearn presets)
    scrub: bool = False
    cv_folds: int = 5
    n_permutations: int = 100  # circular shifts; p from a normal fitted to them (docs/encoding.md)
    fdr_alpha: float = 0.05
    atom_model: str = "marginal"  # marginal | joint: what each atom's z map is (docs/encoding.md)
    # networks (section 5)
    fbn_atlas: list[str] = field(default_factory=lambda: ["CA12", "Yeo7"])
    map_threshold: float = 3.1
    map_rule: str = "winner"  # winner: each voxel counts for its preferred atom only | all
    n_spatial_null: Optional[int] = None  # None: every valid shift of the map (finest p-values)
    # group (section 7)
    group_model: str = "random"  # random: one-sample t over participants; fixed: Stouffer z
    compare: list[Path] = field(default_factory=list)

    PATH_FIELDS = ("bids_dir", "output_dir", "bids_filter_file", "derivatives", "work_dir",
                   "cache_dir", "config_file")

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

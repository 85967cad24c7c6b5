"""Training the small sentencepiece BPE tokenizer of the embedded default pipeline (``train_sentencepiece``), on
texts or on the records of data files (``train_tokenizer_on_files``, sized from the corpus by ``auto_vocab_size``).
The result is a ``ramjax.tokenizer.Tokenizer`` written as ``tokenizer.model`` + ``tokenizer_config.json`` (also
loadable by transformers). ``ramjax.tokenizer`` re-exports the three functions.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence

from ramjax.tokenizer import SENTENCEPIECE_MODEL, Tokenizer, TokenizerError
from ramjax.tokenizer_formats import SentencePieceBackend

logger = logging.getLogger(__name__)

__all__ = ["train_sentencepiece", "auto_vocab_size", "train_tokenizer_on_files"]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *, seed: int = 0,
                        user_defined_symbols: Sequence[str] = ()) -> Tokenizer:
    """Trains a small sentencepiece BPE tokenizer on ``texts`` and writes it to ``out_dir``.

    Deterministic for the same texts, size and seed (single-threaded training). Choices for short arithmetic and
    string tasks: digits are always single tokens (``split_digits``), every byte is representable
    (``byte_fallback``, so nothing is ever ``<unk>``), text is not normalised, runs of spaces are kept
    (identity normalisation, whitespace-only pieces allowed) and no dummy ``▁`` is prepended, so
    ``decode(encode(s)) == s`` for every string and a text encodes the same at the start of a prompt as after it
    (``encode(a + b) == encode(a) + encode(b)`` whenever ``b`` starts with a space or digit). Ids: ``<unk>`` 0, ``<s>``
    1, ``</s>`` 2, ``<pad>`` 3, then ``user_defined_symbols`` (always single tokens), the 256 byte pieces and the
    merges. ``vocab_size`` must leave room for those plus the distinct characters of ``texts``; with little text
    the vocabulary may come out smaller than asked (logged). Writes ``tokenizer.model`` + ``tokenizer_config.json``
    (``LlamaTokenizer`` with BOS added, also loadable by transformers) and returns the loaded tokenizer.
    """
    import sentencepiece as spm

    lines = []
    for t in texts:
        if not isinstance(t, str):
            raise TokenizerError(f"train_sentencepiece expects strings, got {type(t).__name__}")
        if t:
            lines.append(t)
    if not lines:
        raise TokenizerError("train_sentencepiece got no non-empty text to train on")
    symbols = [str(s) for s in user_defined_symbols]
    minimum = 4 + 256 + len(symbols)
    if vocab_size <= minimum:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: 4 special ids, 256 byte pieces and "
                             f"{len(symbols)} user symbols already take {minimum}; ask for more")
    max_len = max(len(t.encode("utf-8")) for t in lines)
    buf = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
            vocab_size=int(vocab_size), hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=symbols,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            pad_piece="<pad>", num_threads=1, shuffle_input_sentence=False,
            max_sentence_length=max(4192, max_len + 1), minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece training failed (vocab_size={vocab_size}, {len(lines)} texts): {e}") from e
    backend = SentencePieceBackend(buf.getvalue(), "never")
    if backend.size() < vocab_size:
        logger.info("sentencepiece vocabulary has %d pieces (asked for %d): the training text supports no more",
                    backend.size(), vocab_size)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    out_dir = os.fspath(out_dir)
    tok = Tokenizer(backend, special_tokens=special, config=config, source=os.path.join(out_dir, SENTENCEPIECE_MODEL))
    tok.save(out_dir)
    return tok


def auto_vocab_size(texts: Sequence[str]) -> int:
    """A sentencepiece size that follows the corpus: 4 special ids + 256 bytes + its distinct characters + about
    ``sqrt(characters) / 4`` merges (≈ 350 merges for 2M characters, ≈ 800 for 10M), clamped to [64, 32000]."""
    n_chars = sum(len(t) for t in texts)
    distinct = len(set().union(*map(set, texts))) if texts else 0
    return 260 + distinct + int(min(32000, max(64, round(n_chars ** 0.5 / 4))))


def train_tokenizer_on_files(paths: Sequence[str], out_dir: str | os.PathLike, *, vocab_size: int = 0, seed: int = 0,
                             format: str = "auto") -> Tokenizer:
    """Trains :func:`train_sentencepiece` on the records of JSONL files in any ``ramjax.data`` format (each record
    as ``ramjax.data.record_text``: text as is, prompts in the plain dialogue template + the response).
    vocab_size 0 = :func:`auto_vocab_size` of the texts."""
    from ramjax import data as data_lib

    texts = [data_lib.record_text(r) for p in paths for r in data_lib.read_jsonl(p, format)]
    size = vocab_size or auto_vocab_size(texts)
    logger.info("training a %d-piece sentencepiece tokenizer on %d records of %s", size, len(texts), list(paths))
    return train_sentencepiece(texts, size, out_dir, seed=seed)

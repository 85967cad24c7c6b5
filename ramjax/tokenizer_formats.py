"""The two tokenizer file formats behind one small interface: a Hugging Face ``tokenizer.json`` (run by the
``tokenizers`` library, with transformers 5's rebuilt pipelines for ``Qwen2Tokenizer`` and non-byte-level
``LlamaTokenizer``) and a sentencepiece ``.model`` (run by ``sentencepiece`` with transformers' non-legacy
``LlamaTokenizer`` conventions). ``ramjax.tokenizer.Tokenizer`` wraps one backend with its special tokens and chat
template; this module only encodes, decodes, lists the vocabulary and registers added tokens.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Qwen2Tokenizer's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py).
_QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

_SPM_NORMAL, _SPM_UNKNOWN, _SPM_CONTROL, _SPM_USER_DEFINED, _SPM_UNUSED, _SPM_BYTE = 1, 2, 3, 4, 5, 6
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or unsupported, or a tokenizer was used wrongly."""


@dataclasses.dataclass(frozen=True)
class AddedTokenSpec:
    """A token matched verbatim in the text before the model tokenises the rest (transformers' ``AddedToken``)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def to_json(self) -> dict:
        return {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
                "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}


# ---------------------------------------------------------------------------------------------------------------
# Backends: the two file formats behind one small interface.


class HFBackend:
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> list[str]:
        out = [""] * self.size()
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if 0 <= i < len(out):
                out[i] = token
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def added_tokens(self) -> list[AddedTokenSpec]:
        return [AddedTokenSpec(t.content, i, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word)
                for i, t in sorted(self.tok.get_added_tokens_decoder().items())]

    def add_token(self, spec: AddedTokenSpec) -> int:
        """Registers ``spec`` unless it already is an added token (then it is left as it is, as in transformers);
        a token of the model's own vocabulary keeps its id."""
        from tokenizers import AddedToken

        for existing in self.tok.get_added_tokens_decoder().values():
            if existing.content == spec.content:
                return self.tok.token_to_id(spec.content)
        token = AddedToken(spec.content, special=spec.special, lstrip=spec.lstrip, rstrip=spec.rstrip,
                           normalized=spec.normalized, single_word=spec.single_word)
        (self.tok.add_special_tokens if spec.special else self.tok.add_tokens)([token])
        return self.tok.token_to_id(spec.content)

    def save(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, TOKENIZER_JSON))


class SentencePieceBackend:
    """A sentencepiece model proto, encoded the way transformers' non-legacy ``LlamaTokenizer`` does.

    prepend_scheme: ``"first"`` (a ``▁`` before the first text segment unless it starts with a space),
    ``"always"`` (before every segment between added tokens, legacy Llama) or ``"never"``.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, prepend_scheme: str = "first"):
        import sentencepiece as spm

        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as e:  # protobuf comes with orbax-checkpoint; say what is missing if it does not
            raise TokenizerError(f"reading a sentencepiece model needs the protobuf package ({e})") from e
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_proto)
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece/protobuf raise assorted types for corrupt files
            raise TokenizerError(f"not a valid sentencepiece model ({type(e).__name__}: {e})") from e
        self.model_proto = model_proto
        if not proto.normalizer_spec.add_dummy_prefix:
            prepend_scheme = "never"
        if prepend_scheme not in ("first", "always", "never"):
            raise TokenizerError(f"unknown prepend scheme {prepend_scheme!r}; expected first, always or never")
        self.prepend_scheme = prepend_scheme
        # A second processor without the dummy prefix encodes the segments that must not get a leading "▁".
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.pieces = [p.piece for p in proto.pieces]
        self.piece_types = [p.type for p in proto.pieces]
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}
        self.trainer_spec = proto.trainer_spec
        self._added: dict[int, AddedTokenSpec] = {}
        # transformers' SentencePieceExtractor: control pieces are special added tokens, user-defined ones are
        # plain added tokens; both are matched in the text before sentencepiece runs.
        for i, (piece, kind) in enumerate(zip(self.pieces, self.piece_types)):
            if kind in (_SPM_CONTROL, _SPM_USER_DEFINED):
                self._added[i] = AddedTokenSpec(piece, i, special=kind == _SPM_CONTROL)
        self._split_re: re.Pattern | None = None

    # -- added tokens
    def added_tokens(self) -> list[AddedTokenSpec]:
        return [self._added[i] for i in sorted(self._added)]

    def add_token(self, spec: AddedTokenSpec) -> int:
        """Registers ``spec`` unless it already is an added token (left as it is, as in transformers); a piece
        of the model keeps its id, a new token gets the next free id."""
        i = self.token_to_id(spec.content)
        if i is not None and i in self._added:
            return i
        if i is None:
            i = self.size()
        self._added[i] = dataclasses.replace(spec, id=i)
        self._split_re = None
        return i

    def _splitter(self) -> re.Pattern | None:
        if self._split_re is None and self._added:
            # Longest first, so the leftmost match is also the longest (tokenizers' leftmost-longest matching).
            alternatives = []
            for spec in sorted(self._added.values(), key=lambda s: -len(s.content)):
                alt = re.escape(spec.content)
                if spec.lstrip:
                    alt = r"\s*" + alt
                if spec.rstrip:
                    alt = alt + r"\s*"
                alternatives.append(f"(?:{alt})")
            self._split_re = re.compile("|".join(alternatives))
        return self._split_re

    def _match_id(self, matched: str) -> int:
        stripped = matched.strip()
        for text in (matched, stripped):
            i = self.token_to_id(text)
            if i is not None and i in self._added:
                return i
        raise AssertionError(f"added token {matched!r} not found")  # unreachable: the regex only matches these

    # -- encode / decode
    def _encode_segment(self, text: str, start: int) -> list[int]:
        prefix = (self.prepend_scheme == "always" or (self.prepend_scheme == "first" and start == 0))
        if text.startswith((" ", "\u2581")):
            prefix = False  # tokenizers' Metaspace never doubles an existing leading space
        return (self.sp if prefix else self.sp_no_prefix).encode(text)

    def encode(self, text: str) -> list[int]:
        splitter = self._splitter()
        if splitter is None:
            return self._encode_segment(text, 0) if text else []
        ids: list[int] = []
        pos = 0
        for m in splitter.finditer(text):
            if m.start() > pos:
                ids.extend(self._encode_segment(text[pos:m.start()], pos))
            ids.append(self._match_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_segment(text[pos:], pos))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # transformers' LlamaTokenizer decoder chain: "▁" -> " ", byte-fallback pieces fused into UTF-8 (an invalid
        # byte run becomes one U+FFFD per byte), concatenation, then one leading space stripped.
        special = self.special_ids() if skip_special_tokens else frozenset()
        parts: list[str] = []
        pending = bytearray()
        n_pending = 0

        def flush():
            nonlocal n_pending
            if n_pending:
                try:
                    parts.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * n_pending)
                pending.clear()
                n_pending = 0

        for i in ids:
            if i in special:
                continue
            piece = self.id_to_token(i)
            if i < len(self.pieces) and self.piece_types[i] == _SPM_BYTE:
                m = BYTE_PIECE.fullmatch(piece)
                if m:
                    pending.append(int(m.group(1), 16))
                    n_pending += 1
                    continue
            flush()
            parts.append(piece.replace("\u2581", " "))
        flush()
        text = "".join(parts)
        if self.prepend_scheme != "never" and text.startswith(" "):
            text = text[1:]
        return text

    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, s in self._added.items() if s.special)

    # -- vocabulary
    def size(self) -> int:
        return max(len(self.pieces), max(self._added, default=-1) + 1)

    def vocab(self) -> list[str]:
        out = list(self.pieces) + [""] * (self.size() - len(self.pieces))
        for i, spec in self._added.items():
            out[i] = spec.content
        return out

    def id_to_token(self, i: int) -> str:
        spec = self._added.get(i)
        if spec is not None:
            return spec.content
        return self.pieces[i] if i < len(self.pieces) else ""

    def token_to_id(self, token: str) -> int | None:
        i = self.piece_ids.get(token)
        if i is not None:
            return i
        for j, spec in self._added.items():
            if spec.content == token:
                return j
        return None

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, SENTENCEPIECE_MODEL), "wb") as f:
            f.write(self.model_proto)


def load_hf_backend(path: str, config: Mapping[str, Any]) -> HFBackend:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        tok = _Tok.from_str(raw)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"cannot read {path!r} as a Hugging Face tokenizer.json: {e}") from e
    cls = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    # transformers 5 rebuilds these classes' pipelines from its own code rather than the file; do the same so ids
    # match it (for the files the model families ship with, the rebuild equals the file).
    if cls == "Qwen2Tokenizer":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space") or False),
                                     use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
    elif cls == "LlamaTokenizer" and '"ByteLevel"' not in raw:
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
    return HFBackend(tok)


def load_sentencepiece_backend(path: str, config: Mapping[str, Any]) -> SentencePieceBackend:
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read sentencepiece model {path!r}: {e}") from e
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    try:
        return SentencePieceBackend(proto, scheme)
    except TokenizerError as e:
        raise TokenizerError(f"{path!r}: {e}") from e

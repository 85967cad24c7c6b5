"""Tokenizers: one interface over a sentencepiece ``.model`` and a Hugging Face ``tokenizer.json``.

``load_tokenizer(path)`` reads a checkpoint directory the way ``transformers.AutoTokenizer`` does and returns a
``Tokenizer`` whose ids equal transformers' ``tokenizer(text, add_special_tokens=False)`` for the same files:

* ``tokenizer.json`` is run by the ``tokenizers`` library. transformers 5 rebuilds the normaliser/pre-tokeniser of
  two classes from their own code instead of the file (``Qwen2Tokenizer``; ``LlamaTokenizer`` when the file is not
  byte-level); the same rebuild is applied here so ids keep matching for such files.
* A sentencepiece ``.model`` is run by the ``sentencepiece`` library, with transformers' (non-legacy
  ``LlamaTokenizer``) conventions on top: special and user-defined tokens written in the text are matched first,
  and the dummy-prefix ``▁`` is added only at the very start of the text and not before an existing space.
* Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``generation_config.json``;
  the chat template from ``chat_template.jinja`` or ``tokenizer_config.json``, rendered with jinja2 in the same
  sandboxed environment as transformers.

The two file formats' backends are in ``ramjax.tokenizer_formats``, the chat-template sandbox in
``ramjax.chat_template``; this module holds the ``Tokenizer`` over them, loading, token bytes and the
proposal/aligner check; training is ``ramjax.tokenizer_training``.

``check_vocab_compatible`` guards a proposal/aligner pair: the residual aligner only makes sense over the
proposal's vocabulary, id for id. ``train_sentencepiece`` (``ramjax.tokenizer_training``, re-exported) trains the
small tokenizer of the embedded default pipeline. transformers is never imported here.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ramjax import chat_template, files
from ramjax import tokenizer_formats as formats
from ramjax.chat_template import TEMPLATE_MAX_OUTPUT, TEMPLATE_MAX_RANGE_ITEMS, TEMPLATE_MAX_SECONDS, ChatTemplateError
from ramjax.tokenizer_formats import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG,
    SENTENCEPIECE_MODEL,
    SPECIAL_TOKENS_MAP,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
    AddedTokenSpec,
    TokenizerError,
)

# the errors, file names and template limits of the two modules below the tokenizer are part of its interface
__all__ = [
    "Tokenizer", "load_tokenizer", "has_tokenizer", "token_bytes", "check_vocab_compatible", "PLAIN_TEMPLATE",
    "SPECIAL_TOKEN_ATTRIBUTES", "AddedTokenSpec", "TokenizerError", "ChatTemplateError", "VocabMismatchError",
    "TOKENIZER_JSON", "SENTENCEPIECE_MODEL", "TOKENIZER_CONFIG", "SPECIAL_TOKENS_MAP", "GENERATION_CONFIG",
    "CHAT_TEMPLATE_FILE", "CHAT_TEMPLATE_DIR", "TEMPLATE_MAX_OUTPUT", "TEMPLATE_MAX_RANGE_ITEMS",
    "TEMPLATE_MAX_SECONDS",
]

logger = logging.getLogger(__name__)

PLAIN_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: "
"""The RAM authors' prompt template; ``{prompt}`` is replaced by the user's text."""
# transformers' named special-token attributes (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES); the chat
# template sees each one that is set as a variable of the same name.
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                            "mask_token")

# Turn terminators of common chat formats. One that the chat template writes literally is a stop id: a model that
# continues a rendered chat ends its turn with it, even where generation_config.json lists only the base EOS.
_CHAT_TERMINATORS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                     "<end_of_turn>", "<|end|>", "</s>")


class VocabMismatchError(ValueError):
    """The proposal and aligner vocabularies differ, or an embedding has fewer rows than its tokenizer's ids."""


# ---------------------------------------------------------------------------------------------------------------
# The public tokenizer.


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"cannot read a special token from {value!r}; expected a string or "
                         f"{{'content': ...}}")


class Tokenizer:
    """A tokenizer with its special tokens, stop ids and chat template.

    Build one with ``load_tokenizer`` or ``train_sentencepiece``. Ids are plain Python ints; ``vocab_size`` counts
    every id including added tokens (transformers' ``len(tokenizer)``), which may be fewer than a model's
    embedding rows.
    """

    def __init__(self, backend: formats.HFBackend | formats.SentencePieceBackend, *,
                 special_tokens: Mapping[str, str | None],
                 chat_templates: Mapping[str, str] | None = None, extra_eos_ids: Iterable[int] = (),
                 config: Mapping[str, Any] | None = None, source: str = ""):
        self._backend = backend
        self._config = dict(config or {})
        self.source = source
        self._special = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKEN_ATTRIBUTES}
        self._chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, Any] = {}
        self._vocab_cache: list[str] | None = None
        # Every named special token exists as a (special) token, added after the vocabulary if the files lack it,
        # exactly as transformers does when it loads the same files.
        for name, content in self._special.items():
            if content is not None:
                self._backend.add_token(AddedTokenSpec(content, -1, special=True))
        n = self.vocab_size
        self._extra_eos_ids = frozenset(int(i) for i in extra_eos_ids if 0 <= int(i) < n)

    # -- identity
    @property
    def kind(self) -> str:
        """``"hf"`` (tokenizer.json) or ``"sentencepiece"`` (.model)."""
        return self._backend.kind

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self._special.get('bos_token')!r}, "
                f"eos={self._special.get('eos_token')!r}, source={self.source!r})")

    def __len__(self) -> int:
        return self.vocab_size

    # -- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are ``0 .. vocab_size-1``)."""
        return self._backend.size()

    def get_vocab(self) -> list[str]:
        """Token strings by id, length ``vocab_size`` (an id without a token, if any, maps to ``""``)."""
        if self._vocab_cache is None or len(self._vocab_cache) != self.vocab_size:
            self._vocab_cache = self._backend.vocab()
        return list(self._vocab_cache)

    def id_to_token(self, i: int) -> str:
        """The token string of id ``i`` (byte-level BPE tokens in their byte-to-unicode form, e.g. ``Ġthe``)."""
        i = self._check_id(i)
        if self._vocab_cache is not None and len(self._vocab_cache) == self.vocab_size:
            return self._vocab_cache[i]
        if self.kind == "hf":
            return self._backend.tok.id_to_token(i) or ""
        return self._backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of token string ``token``, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def _check_id(self, i) -> int:
        try:
            i = int(i)
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"token id {i!r} is not an integer") from e
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self.vocab_size} ids; ids at or "
                                 f"beyond vocab_size are padded embedding rows and must be masked before sampling")
        return i

    # -- special tokens
    def _special_id(self, name: str) -> int | None:
        content = self._special.get(name)
        return None if content is None else self._backend.token_to_id(content)

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens that are set, e.g. ``{"eos_token": "<|im_end|>", "pad_token": ...}``."""
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None for tokenizers without one (e.g. Qwen2)."""
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int:
        """The primary end-of-sequence id (``eos_token`` of tokenizer_config.json)."""
        i = self._special_id("eos_token")
        if i is None:
            if self._extra_eos_ids:
                return min(self._extra_eos_ids)
            raise TokenizerError(f"tokenizer from {self.source!r} defines no EOS token; set eos_token in "
                                 f"{TOKENIZER_CONFIG} or eos_token_id in {GENERATION_CONFIG}")
        return i

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation: EOS, generation_config.json's ``eos_token_id`` list, and the turn
        terminators the chat template writes (e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
        ids = set(self._extra_eos_ids)
        i = self._special_id("eos_token")
        if i is not None:
            ids.add(i)
        if not ids:
            self.eos_id  # raises the named error  # noqa: B018
        return frozenset(ids)

    @property
    def pad_id(self) -> int:
        """Padding id: ``pad_token`` if set, else the EOS id."""
        i = self._special_id("pad_token")
        return self.eos_id if i is None else i

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        if self.kind == "hf":
            return frozenset(a.id for a in self._backend.added_tokens() if a.special)
        return self._backend.special_ids()

    # -- encode / decode
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (transformers' ``tokenizer(text, add_special_tokens=False)["input_ids"]``).

        Special tokens written in the text (``<|im_start|>``, ``<s>`` ...) become their ids. ``add_bos=True``
        prepends the BOS id; it is a no-op for tokenizers without BOS, as transformers' ``add_special_tokens=True``
        is for them. A rendered chat template usually already starts with BOS: encode it with ``add_bos=False``.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        bos = self.bos_id if add_bos else None
        return ([bos] + ids) if bos is not None else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of token ids (transformers' ``tokenizer.decode``); special tokens dropped unless asked."""
        ids = [self._check_id(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        return self._backend.decode(ids, skip_special_tokens)

    # -- prompts
    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None."""
        if not self._chat_templates:
            return None
        return self._chat_templates.get("default", next(iter(self._chat_templates.values())))

    @property
    def chat_templates(self) -> dict[str, str]:
        """All named chat templates (``"default"``, ``"tool_use"`` ...)."""
        return dict(self._chat_templates)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Renders ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the tokenizer's chat template.

        Same output as transformers' ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``:
        sandboxed jinja2 with trim_blocks/lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``, and the
        named special tokens (``bos_token``, ``eos_token`` ...) as variables. Extra keyword arguments become
        template variables (e.g. ``tools=[...]``, ``enable_thinking=False``).
        """
        import jinja2

        if not self._chat_templates:
            raise ChatTemplateError(f"tokenizer from {self.source!r} has no chat template (looked for "
                                    f"{CHAT_TEMPLATE_FILE} and 'chat_template' in {TOKENIZER_CONFIG}); use "
                                    f"render_prompt(prompt, 'plain') or add a chat template")
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or len(messages) == 0:
            raise ChatTemplateError("apply_chat_template needs a non-empty list of messages")
        name = "default" if "default" in self._chat_templates else next(iter(self._chat_templates))
        if template_kwargs.get("tools") and "tool_use" in self._chat_templates:
            name = "tool_use"
        if name not in self._compiled:
            try:
                self._compiled[name] = chat_template.compile_template(self._chat_templates[name])
            except ChatTemplateError as e:
                raise ChatTemplateError(f"chat template {name!r} of the tokenizer from {self.source!r}: {e}") from None
        variables = {"tools": None, "documents": None, **self.special_tokens,
                     **chat_template.plain_data(dict(template_kwargs))}
        variables.update(messages=chat_template.prepare_messages(messages), add_generation_prompt=add_generation_prompt)
        where = f"chat template {name!r} of the tokenizer from {self.source!r}"
        try:
            return chat_template.render_bounded(self._compiled[name], variables)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{where} rejected the conversation: {e}") from e
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, RecursionError) as e:
            raise ChatTemplateError(f"{where} failed while rendering ({type(e).__name__}: {e}); fix the template "
                                    f"(tokenizer_config.json 'chat_template' or {CHAT_TEMPLATE_FILE})") from e

    def render_prompt(self, prompt: str, template: str = "plain") -> str:
        """The text a model is prompted with for one user ``prompt``.

        template: ``"plain"`` — the RAM authors' ``"\\n\\nHuman: {prompt}\\n\\nAssistant: "``; ``"chat"`` — the
        chat template with a single user message and the generation prompt; any other string containing
        ``{prompt}`` — that format, with ``{prompt}`` replaced (no other braces are interpreted).
        """
        if not isinstance(prompt, str):
            raise TokenizerError(f"prompt must be a str, got {type(prompt).__name__}")
        if template == "plain":
            return PLAIN_TEMPLATE.replace("{prompt}", prompt)
        if template == "chat":
            return self.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if "{prompt}" in template:
            return template.replace("{prompt}", prompt)
        raise TokenizerError(f"unknown prompt template {template!r}; use 'plain', 'chat', or a format string "
                             f"containing '{{prompt}}'")

    def encode_prompt(self, prompt: str, template: str = "plain") -> list[int]:
        """Token ids a model is prompted with: ``render_prompt`` then ``encode``, with BOS exactly once.

        A chat template writes its own BOS (as transformers' ``apply_chat_template(tokenize=True)`` assumes);
        other templates get the BOS id prepended, as transformers' ``add_special_tokens=True`` does.
        """
        ids = self.encode(self.render_prompt(prompt, template))
        bos = self.bos_id
        if template != "chat" and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    # -- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer into ``directory`` so that ``load_tokenizer`` (and, for both kinds,
        ``transformers.AutoTokenizer``) reloads the same ids, special tokens, stop ids and chat template.

        Files: ``tokenizer.json`` or ``tokenizer.model``; ``tokenizer_config.json``; ``generation_config.json``
        only when there are stop ids beyond EOS and the directory has none yet (a model's own is never replaced).
        """
        directory = os.fspath(directory)
        if self.kind == "sentencepiece" and os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
            # load_tokenizer prefers tokenizer.json, so the saved model would never be read back.
            raise TokenizerError(f"{directory!r} already holds a {TOKENIZER_JSON}, which would shadow the "
                                 f"sentencepiece model; save into an empty directory or remove that file first")
        os.makedirs(directory, exist_ok=True)
        self._backend.save(directory)
        config = copy.deepcopy(self._config)
        for key in ("auto_map", "name_or_path", "vocab_file", "tokenizer_file", "merges_file", "chat_template",
                    "added_tokens_decoder", "additional_special_tokens", "extra_special_tokens"):
            config.pop(key, None)
        if self.kind == "hf":
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        else:
            config.setdefault("tokenizer_class", "LlamaTokenizer")
            config.setdefault("add_bos_token", self.bos_id is not None)
            config.setdefault("add_eos_token", False)
            config["legacy"] = self._backend.prepend_scheme == "always"
            config["add_prefix_space"] = self._backend.prepend_scheme != "never"
        for name in SPECIAL_TOKEN_ATTRIBUTES:
            if name in self._special or name in config:
                config[name] = self._special.get(name)
        config["added_tokens_decoder"] = {str(a.id): a.to_json() for a in self._backend.added_tokens()}
        if self._chat_templates:
            if set(self._chat_templates) == {"default"}:
                config["chat_template"] = self._chat_templates["default"]
            else:
                config["chat_template"] = [{"name": k, "template": v} for k, v in self._chat_templates.items()]
        _write_json(os.path.join(directory, TOKENIZER_CONFIG), config)
        gen_path = os.path.join(directory, GENERATION_CONFIG)
        extra = sorted(self.eos_ids - {self.eos_id})
        if extra and not os.path.exists(gen_path):
            gen = {"eos_token_id": [self.eos_id] + extra}
            if self.bos_id is not None:
                gen["bos_token_id"] = self.bos_id
            gen["pad_token_id"] = self.pad_id
            _write_json(gen_path, gen)
        # Files an earlier tokenizer left here would take priority over tokenizer_config.json on reload (in
        # transformers too): rewrite them with this tokenizer's values instead.
        jinja_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):
            if self.chat_template is None:
                os.remove(jinja_path)
            else:
                files.atomic_write(jinja_path, self.chat_template)
        map_path = os.path.join(directory, SPECIAL_TOKENS_MAP)
        if os.path.isfile(map_path):
            _write_json(map_path, self.special_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Loading.


# ------------------------------------------------------------------------------------------------------------
# Token bytes: what each id contributes to decoded text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_LEVEL_INV = {c: b for b, c in _bytes_to_unicode().items()}
_TOKEN_BYTES_CACHE: "weakref.WeakKeyDictionary[Any, list[bytes]]" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any, vocab: int | None = None) -> list[bytes]:
    """The UTF-8 bytes each token id contributes to decoded text, for ids ``0 .. vocab-1``.

    A token's text is taken in context (decoded after an anchor token, so sentencepiece's leading-space rule and
    ``▁`` handling apply as in a longer text); a token that is only part of a UTF-8 character (byte-level BPE,
    sentencepiece byte fallback) gets its raw byte(s). Special tokens, which decoding skips, contribute nothing.
    Cached per tokenizer object. Used by the sampler's on-device stop-string matching.
    """
    vocab = tokenizer.vocab_size if vocab is None else vocab
    cached = _TOKEN_BYTES_CACHE.get(tokenizer)
    if cached is not None and len(cached) >= vocab:
        return cached[:vocab]
    special = tokenizer.special_ids
    pieces = tokenizer.get_vocab()
    anchor = tokenizer.encode("a")
    base = tokenizer.decode(anchor, skip_special_tokens=True)
    out: list[bytes] = []
    for i in range(vocab):
        if i in special:
            out.append(b"")
            continue
        text = tokenizer.decode(anchor + [i], skip_special_tokens=True)
        tail = text[len(base):] if text.startswith(base) else None
        if tail is not None and "\ufffd" not in tail:
            out.append(tail.encode("utf-8"))
            continue
        piece = pieces[i] if i < len(pieces) else ""
        m = formats.BYTE_PIECE.fullmatch(piece)
        if m:
            out.append(bytes([int(m.group(1), 16)]))
        elif piece and all(c in _BYTE_LEVEL_INV for c in piece):
            out.append(bytes(_BYTE_LEVEL_INV[c] for c in piece))
        else:
            out.append((tail if tail is not None else piece).encode("utf-8"))
    _TOKEN_BYTES_CACHE[tokenizer] = out
    return out



def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {path!r}: {e}") from e
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path!r} must hold a JSON object, found {type(obj).__name__}")
    return obj


def _write_json(path: str, obj: Any) -> None:
    files.atomic_write_json(path, obj)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``tokenizer.json`` or a sentencepiece ``*.model`` file."""
    directory = os.fspath(directory)
    return os.path.isdir(directory) and (os.path.isfile(os.path.join(directory, TOKENIZER_JSON))
                                         or bool(_model_files(directory)))


def _model_files(directory: str) -> list[str]:
    preferred = os.path.join(directory, SENTENCEPIECE_MODEL)
    if os.path.isfile(preferred):
        return [preferred]
    return sorted(p for p in glob.glob(os.path.join(glob.escape(directory), "*.model")) if os.path.isfile(p))


def _chat_templates(directory: str, config: Mapping[str, Any]) -> dict[str, str]:
    """chat_template.jinja and additional_chat_templates/*.jinja win over tokenizer_config's entry (transformers)."""
    templates: dict[str, str] = {}
    entry = config.get("chat_template")
    if isinstance(entry, str):
        templates["default"] = entry
    elif isinstance(entry, list):
        for item in entry:
            if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise TokenizerError(f"chat_template list entries in {TOKENIZER_CONFIG} must be "
                                     f"{{'name': str, 'template': str}}, found {item!r}")
            templates[item["name"]] = item["template"]
    elif entry is not None:
        raise TokenizerError(f"chat_template in {TOKENIZER_CONFIG} must be a string or a list, found "
                             f"{type(entry).__name__}")
    files: dict[str, str] = {}
    path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            files["default"] = f.read()
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), CHAT_TEMPLATE_DIR, "*.jinja"))):
        with open(path, encoding="utf-8") as f:
            files[os.path.basename(path)[: -len(".jinja")]] = f.read()
    return files or templates


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise TokenizerError(f"expected an id or a list of ids in {GENERATION_CONFIG}, found {value!r}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a checkpoint directory or a tokenizer file.

    A directory uses ``tokenizer.json`` if present, else ``tokenizer.model`` (or the only ``*.model``), with the
    special tokens and chat template of ``tokenizer_config.json``/``special_tokens_map.json``/``chat_template.jinja``
    and the stop ids of ``generation_config.json`` beside it. A file path (``*.json`` or ``*.model``) uses that file
    and the configuration files in its directory. Raises ``TokenizerError`` naming the path and what was expected.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory = path
        candidate = os.path.join(path, TOKENIZER_JSON)
        if os.path.isfile(candidate):
            file = candidate
        else:
            models = _model_files(path)
            if not models:
                present = sorted(os.listdir(path))[:20]
                raise TokenizerError(f"no tokenizer in {path!r}: expected {TOKENIZER_JSON} (Hugging Face) or "
                                     f"{SENTENCEPIECE_MODEL} / *.model (sentencepiece); found {present}")
            if len(models) > 1:
                names = [os.path.basename(m) for m in models]
                raise TokenizerError(f"several sentencepiece models in {path!r} ({names}); pass the file to "
                                     f"load_tokenizer or name it {SENTENCEPIECE_MODEL}")
            file = models[0]
    elif os.path.isfile(path):
        directory, file = os.path.dirname(path) or ".", path
    else:
        raise TokenizerError(f"tokenizer path {path!r} does not exist; pass a model directory or a tokenizer.json "
                             f"/ *.model file")

    def optional_json(name: str) -> dict:
        p = os.path.join(directory, name)
        return _read_json(p) if os.path.isfile(p) else {}

    config = optional_json(TOKENIZER_CONFIG)
    special_map = optional_json(SPECIAL_TOKENS_MAP)
    gen = optional_json(GENERATION_CONFIG)

    if file.endswith(".json"):
        backend: formats.HFBackend | formats.SentencePieceBackend = formats.load_hf_backend(file, config)
    elif file.endswith(".model"):
        backend = formats.load_sentencepiece_backend(file, config)
    else:
        raise TokenizerError(f"unsupported tokenizer file {file!r}: expected a Hugging Face tokenizer.json or a "
                             f"sentencepiece .model file")

    # Named special tokens: tokenizer_config.json (an explicit null counts), then special_tokens_map.json, then
    # the sentencepiece model's own unk/bos/eos pieces, then generation_config.json's ids.
    special: dict[str, str | None] = {}
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        if name in config:
            special[name] = _token_content(config[name])
        elif name in special_map:
            special[name] = _token_content(special_map[name])
    if isinstance(backend, formats.SentencePieceBackend):
        spec = backend.trainer_spec
        for name, idx in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id)):
            if name not in special and 0 <= idx < len(backend.pieces):
                special[name] = backend.pieces[idx]
    gen_eos = _as_id_list(gen.get("eos_token_id"))
    for name, ids in (("bos_token", _as_id_list(gen.get("bos_token_id"))), ("eos_token", gen_eos)):
        if name not in special and ids and 0 <= ids[0] < backend.size():
            special[name] = backend.vocab()[ids[0]]

    # Added tokens the config declares (transformers adds any the vocabulary lacks).
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
        raise TokenizerError(f"added_tokens_decoder in {TOKENIZER_CONFIG} must be an object")
    for idx, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        entry = {"content": entry} if isinstance(entry, str) else dict(entry)
        spec = AddedTokenSpec(content=entry["content"], id=int(idx), special=bool(entry.get("special", True)),
                              lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                              normalized=bool(entry.get("normalized", False)),
                              single_word=bool(entry.get("single_word", False)))
        got = backend.add_token(spec)
        if got != spec.id:
            logger.warning("added token %r is id %d in %s but %d in the tokenizer file; using %d",
                           spec.content, spec.id, TOKENIZER_CONFIG, got, got)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or special_map.get(key) or []
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        for token in extra:
            content = _token_content(token)
            if content is not None:
                backend.add_token(AddedTokenSpec(content, -1, special=True))

    templates = _chat_templates(directory, config)
    tok = Tokenizer(backend, special_tokens=special, chat_templates=templates, extra_eos_ids=gen_eos,
                    config=config, source=file)
    # Turn terminators the chat template writes literally also end generation.
    text = "\n".join(templates.values())
    terminators = [tok.token_to_id(t) for t in _CHAT_TERMINATORS if t in text]
    tok._extra_eos_ids = tok._extra_eos_ids | {i for i in terminators if i is not None}
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Proposal/aligner compatibility.

_PROBES = ("Hello world!", "  two  spaces", "12345 + 678 = 13023", "line\nbreak\ttab", "Café 日本語 😀")


def check_vocab_compatible(proposal: Tokenizer, aligner: Tokenizer, *, proposal_rows: int | None = None,
                           aligner_rows: int | None = None) -> None:
    """Raises ``VocabMismatchError`` unless the aligner shares the proposal's vocabulary id for id.

    Compares the token strings of ids ``0 .. vocab_size-1`` of both tokenizers. Embedding rows beyond a
    tokenizer's ``vocab_size`` (e.g. Qwen2.5's 151936 vs 152064 rows for the same 151665 tokens) are padding and
    are ignored; ``proposal_rows``/``aligner_rows``, when given, must be at least the tokenizer's ``vocab_size``.
    Tokenisation rules that differ over an identical vocabulary only log a warning.
    """
    for role, tok, rows in (("proposal", proposal, proposal_rows), ("aligner", aligner, aligner_rows)):
        if rows is not None and rows < tok.vocab_size:
            raise VocabMismatchError(
                f"the {role} embedding has {rows} rows but its tokenizer has {tok.vocab_size} ids: the checkpoint "
                f"and tokenizer ({tok.source!r}) do not belong together; load the {role} from one directory")
    pv, av = proposal.get_vocab(), aligner.get_vocab()
    common = min(len(pv), len(av))
    diffs = [i for i in range(common) if pv[i] != av[i]]
    if diffs or len(pv) != len(av):
        if diffs:
            shown = ", ".join(f"id {i}: proposal {pv[i]!r} vs aligner {av[i]!r}" for i in diffs[:5])
            first = f"first differing ids: {shown}" + (f" ({len(diffs)} differ in all)" if len(diffs) > 5 else "")
        else:
            longer, role = (pv, "proposal") if len(pv) > len(av) else (av, "aligner")
            first = (f"ids {common}.. exist only in the {role} (first: id {common} = {longer[common]!r})")
        raise VocabMismatchError(
            f"proposal and aligner vocabularies differ: {first}; sizes: proposal {len(pv)} ids "
            f"({proposal.source!r}), aligner {len(av)} ids ({aligner.source!r}). The residual aligner scores the "
            f"proposal's token ids, so it must use the same tokenizer: pick an aligner from the same tokenizer "
            f"family (e.g. Qwen2.5 with Qwen2.5, Llama-3.x with Llama-3.x) or train it with the proposal's tokenizer")
    for text in _PROBES:
        a, b = proposal.encode(text), aligner.encode(text)
        if a != b:
            logger.warning("proposal and aligner share a vocabulary but tokenise %r differently (%s vs %s); "
                           "prompts are encoded with the proposal's tokenizer", text, a, b)
            break


_TRAINING = ("train_sentencepiece", "auto_vocab_size", "train_tokenizer_on_files")


def __getattr__(name: str):
    # The training functions live in ramjax.tokenizer_training, which builds a Tokenizer from this module; they are
    # re-exported lazily (PEP 562) so that ``ramjax.tokenizer.train_sentencepiece`` works without an import cycle.
    if name in _TRAINING:
        from ramjax import tokenizer_training

        return getattr(tokenizer_training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Training data: readers, tokenization with loss masks, fixed-shape padded or packed batches, host sharding and
resumable deterministic iteration.

Formats (one JSON object per line, or rows read through Hugging Face ``datasets`` with ``source: hf``;
``format: auto`` detects per file from the first record's fields, and fields that fit two readings are an error):

    proposal_samples  {"prompt", "response", "proposal", ...}   written by sample.py: ``proposal`` is P_M's one-time
                      sample for the prompt (optionally ``proposal_token_ids``, the sampled ids, used as-is); the
                      rest of the line is any sft/chat/preference record, whose response (``chosen`` for pairs)
                      is y_data
    preference        {"prompt", "chosen", "rejected"}, in any of these shapes:
                      - strings (TRL standard);
                      - message lists ``[{"role", "content"}]`` (TRL conversational): the prompt is the
                        ``prompt`` messages, or when ``chosen``/``rejected`` repeat it (UltraFeedback-binarized,
                        whose ``prompt`` is a string and extra fields such as ``score_chosen`` are ignored) or
                        there is no ``prompt`` (implicit prompt), the messages the two lists share; what follows
                        must be one assistant message in each;
                      - HH-RLHF: no ``prompt``, ``chosen``/``rejected`` whole dialogues of ``"\\n\\nHuman: …"`` /
                        ``"\\n\\nAssistant: …"`` turns: the prompt is their longest shared prefix ending with
                        ``"\\n\\nAssistant:"``, parsed into user/assistant messages, and the responses are the rest
    chat              {"messages": [{"role", "content"}, ...]}  loss on assistant turns only
    sft               {"prompt", "response"} or TRL's {"prompt", "completion"}; each a string or a message list
                      (a completion list is one assistant message); Alpaca's {"instruction", "input", "output"}
    text              {"text"}                 pretraining: loss on every token; long documents are split into
                                               chunks of ``max_len`` that overlap by one token, so no target is lost

A prompt given as messages is rendered turn by turn: with the plain template each user turn as
``"\\n\\nHuman: {content}\\n\\nAssistant: "`` and each earlier assistant turn as its text; with the chat template by
the tokenizer's template. Only the response tokens (and EOS) are trained on.

A malformed line (bad JSON, missing field, wrong type) is a ``DataError`` naming ``file:line`` and the field.

Sequences. A prompt is rendered with the ``plain`` template (``"\\n\\nHuman: {prompt}\\n\\nAssistant: "``) or the
tokenizer's chat template and tokenized with BOS (when the tokenizer uses one); the response is tokenized
separately (as it is generated after the prompt at sampling time) and EOS is appended. Chat conversations are
rendered by the template as a whole and split at the assistant turns, whose tokens carry the loss; EOS is appended
after the last assistant turn unless the template's turn already contains it. Prompts longer than
``max_prompt_len`` are cut from the left (BOS kept); responses are cut to fit ``max_len``; an example left with no
response token is skipped. All of it is counted in ``DataStats``.

Batches (numpy, fixed shapes, ``T = max_len``):

    tokens       [B, T] int32    the input tokens (padding: pad id)
    targets      [B, T] int32    the next token within the same sequence (pad id where there is none)
    loss_mask    [B, T] float32  1 where ``targets`` is a response token (EOS included), else 0
    segment_ids  [B, T] int32    1, 2, ... numbering the sequences packed in a row; 0 on padding
    positions    [B, T] int32    position within its sequence (restarts at 0 per segment; 0 on padding)
    example_index [B]   int32    padding mode only: index of the row's example in the dataset (−1: empty row)

Pair data (stage ``dpo``, and ``ram``: y_data vs the negative y_neg) carries the five arrays twice, as ``chosen_*``
(the data / chosen response) and ``rejected_*`` (the rejected response, or P_M's sample), with identical prompt
tokens; when packing, segment ``s`` of row ``r`` is the same example in both.

Order. Each epoch is a permutation of the kept examples drawn from ``(seed, epoch)``; rows are formed from it
globally (one example per row, or greedy first-fit packing), and host ``h`` of ``n`` takes rows ``h, h+n, ...``,
so hosts see disjoint data and global batch ``b`` is rows ``b·B … (b+1)·B − 1`` of the epoch whatever the number
of hosts. Every host reads and tokenizes all files (the global shuffle needs them) and keeps only its rows. The
iterator state is ``{"epoch", "position"}``; restoring it reproduces exactly the batches that followed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterator, Literal, Mapping, Protocol, Sequence

import numpy as np

from ramjax import files

log = logging.getLogger(__name__)

FORMATS = ("sft", "chat", "preference", "text", "proposal_samples")
_LM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class DataError(ValueError):
    """Training data cannot be read or used as configured (names the file:line and field where it can)."""


class TokenizerLike(Protocol):
    """The part of ``ramjax.tokenizer.Tokenizer`` this module uses."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def render_prompt(self, prompt: str, template: str) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str: ...


# ------------------------------------------------------------------------------------------------------------
# Records: parsing and validation


@dataclasses.dataclass
class Record:
    """One parsed example. ``where`` is ``file:line`` (or ``tfds:name/split:i``); ``data`` keeps every original
    field (renamed by ``field_map``), with the format's fields checked."""

    where: str
    format: str
    data: dict[str, Any]


def detect_format(obj: Mapping[str, Any]) -> str | None:
    """The format a record's fields indicate (see the module docstring), or None.

    Raises ``DataError`` when the fields fit two readings (e.g. both ``response`` and ``completion``, or
    ``messages`` next to a prompt/response pair), since guessing would train on the wrong text.
    """
    if "proposal" in obj:
        return "proposal_samples"
    if "chosen" in obj and "rejected" in obj:
        return "preference"  # UltraFeedback-binarized also carries ``messages`` (= chosen): the pair wins
    if ("chosen" in obj) != ("rejected" in obj) and not any(k in obj for k in ("response", "completion",
                                                                                "messages", "output")):
        have, miss = ("chosen", "rejected") if "chosen" in obj else ("rejected", "chosen")
        raise DataError(f"field {have!r} is present but {miss!r} is missing: preference pairs need both")
    if "response" in obj and "completion" in obj:
        raise DataError("the record has both 'response' and 'completion', so the response is ambiguous; drop one "
                        "or rename it with data.field_map")
    single = "prompt" in obj and ("response" in obj or "completion" in obj)
    if "messages" in obj:
        if single:
            raise DataError("the record has both 'messages' and a prompt/response pair, so the training text is "
                            "ambiguous; set data.format=chat or data.format=sft (or rename with data.field_map)")
        return "chat"
    if single or ("instruction" in obj and "output" in obj):
        return "sft"
    if "text" in obj:
        return "text"
    return None


def _field(obj: Mapping[str, Any], name: str, where: str, fmt: str, kind: type = str) -> Any:
    if name not in obj:
        raise DataError(f"{where}: field {name!r} is missing (format {fmt}; the line has fields "
                        f"{', '.join(map(repr, obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _check_messages(msgs: Any, where: str, fmt: str, name: str = "messages") -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        f = f"{name}[{i}]"
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: field {f!r} must be an object with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {f + '.' + key!r} is missing (format {fmt})")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field {f + '.' + key!r} must be a str, got {type(m[key]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _str_or_messages(obj: Mapping[str, Any], name: str, where: str, fmt: str) -> str | list[dict[str, str]]:
    """Field ``name`` as a string or a checked conversational message list (TRL's two shapes)."""
    if name not in obj:
        raise DataError(f"{where}: field {name!r} is missing (format {fmt}; the line has fields "
                        f"{', '.join(map(repr, obj)) or 'none'})")
    value = obj[name]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, where, fmt, name)
    raise DataError(f"{where}: field {name!r} must be a str, got {type(value).__name__} (or a list of "
                    f"{{role, content}} messages)")


def _context(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """A prompt as the conversation before the response: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _one_assistant_message(msgs: list[dict[str, str]], where: str, name: str) -> str:
    """The content of the single assistant message that a response given as a message list must be."""
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = [m["role"] for m in msgs]
        raise DataError(f"{where}: after the prompt, field {name!r} must be one assistant message, got the roles "
                        f"{roles}; keep multi-turn conversations in a 'messages' (chat) file instead")
    return msgs[0]["content"]


def _check_context(context: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not context or context[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt must end with a user (or system) turn before the response, got the "
                        f"roles {[m['role'] for m in context]}")
    return context


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def split_hh_dialogue(chosen: str, rejected: str, where: str = "record") -> tuple[list[dict[str, str]], str, str]:
    """Splits an HH-RLHF pair (two whole dialogues in ``"\\n\\nHuman: …\\n\\nAssistant: …"`` turns, no prompt field)
    into (prompt messages, chosen response, rejected response).

    The prompt is the longest shared prefix of the two dialogues that ends with ``"\\n\\nAssistant:"``, parsed into
    user/assistant turns (contents stripped); the responses are what follows it, without the leading space. When
    the dialogues part before their last assistant turn, the responses keep the remaining turns as text.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field 'prompt' is missing, and 'chosen' and 'rejected' do not share a dialogue "
                        f"ending with '\\n\\nAssistant:' (the HH-RLHF layout), so the prompt cannot be split off; "
                        f"add a 'prompt' field or rename fields with data.field_map")
    cut += len(_HH_ASSISTANT)
    parts = _HH_TURN.split(chosen[:cut])
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    messages = messages[:-1]  # the final, empty "Assistant:" is where the responses start
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: the dialogue shared by 'chosen' and 'rejected' has no '\\n\\nHuman:' turn before "
                        f"the responses (HH-RLHF layout expected)")
    return _check_context(messages, where), chosen[cut:].lstrip(), rejected[cut:].lstrip()


def _canonical_pair(obj: dict[str, Any], where: str, fmt: str) -> None:
    """Rewrites ``prompt``/``chosen``/``rejected`` in place to (str or message-list prompt, str, str).

    Accepted: strings with a prompt (TRL standard); strings without one (HH-RLHF, ``split_hh_dialogue``); message
    lists (TRL conversational, with an explicit ``prompt`` or an implicit one; UltraFeedback-binarized, whose
    ``chosen``/``rejected`` repeat the prompt): the prompt is the ``prompt`` messages or else the messages the two
    lists share, and what follows must be one assistant message in each.
    """
    chosen = _str_or_messages(obj, "chosen", where, fmt)
    rejected = _str_or_messages(obj, "rejected", where, fmt)
    prompt = _str_or_messages(obj, "prompt", where, fmt) if "prompt" in obj else None
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    if isinstance(chosen, str):
        if prompt is None:
            obj["prompt"], obj["chosen"], obj["rejected"] = split_hh_dialogue(chosen, rejected, where)
        return
    if isinstance(prompt, list) and chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
        prompt = None  # the lists repeat the prompt: it is their shared prefix, found below
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n > 0 and not isinstance(prompt, list):
        context = chosen[:n]  # the lists hold the whole conversation (UltraFeedback: a string prompt repeated)
    elif prompt is None:
        raise DataError(f"{where}: field 'prompt' is missing and 'chosen'/'rejected' share no messages, so there "
                        f"is no prompt; add a 'prompt' field")
    else:
        context = _context(prompt) + chosen[:n]
    obj["prompt"] = _check_context(context, where)
    obj["chosen"] = _one_assistant_message(chosen[n:], where, "chosen")
    obj["rejected"] = _one_assistant_message(rejected[n:], where, "rejected")


def _canonical_single(obj: dict[str, Any], where: str, fmt: str) -> None:
    """Rewrites ``prompt``/``response`` in place to (str or message-list prompt, str). The response may be given
    as ``response`` or TRL's ``completion``, each a string or (completion) one assistant message, optionally
    after a copy of the prompt messages."""
    prompt = _str_or_messages(obj, "prompt", where, fmt)
    name = "completion" if "response" not in obj and "completion" in obj else "response"
    response = _str_or_messages(obj, name, where, fmt)
    if isinstance(response, list):
        if isinstance(prompt, list) and response[:len(prompt)] == prompt:
            response = response[len(prompt):]
        response = _one_assistant_message(response, where, name)
    obj["prompt"] = prompt if isinstance(prompt, str) else _check_context(prompt, where)
    obj["response"] = response


def _normalize(obj: Any, where: str, fmt: str, field_map: Mapping[str, str] | None) -> Record:
    """Checks one decoded record against ``fmt`` (or detects it) and returns it as a ``Record`` whose fields are
    canonical: ``prompt`` a string or a message list ending with a user/system turn; ``response``, ``chosen``,
    ``rejected`` strings (see ``_canonical_pair`` / ``_canonical_single`` for the accepted shapes)."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    obj = dict(obj)
    for src, dst in (field_map or {}).items():
        if src in obj:
            obj[dst] = obj.pop(src)
    if fmt == "auto":
        try:
            fmt = detect_format(obj)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if fmt is None:
            raise DataError(f"{where}: cannot tell the format from the fields {sorted(obj)}; expected one of: "
                            f"prompt+response or prompt+completion (sft), messages (chat), prompt+chosen+rejected "
                            f"or HH-RLHF chosen+rejected dialogues (preference), text, or a sample.py file with "
                            f"proposal; or set data.field_map to rename fields")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS} or auto")
    if fmt in ("sft", "proposal_samples") and "prompt" not in obj and "messages" not in obj and "instruction" in obj:
        # Alpaca: instruction (+ input) -> prompt, output -> response
        inst = _field(obj, "instruction", where, fmt)
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a str, got {type(extra).__name__}")
        obj["prompt"] = inst + ("\n\n" + extra if extra else "")
        if "response" not in obj and "output" in obj:
            obj["response"] = obj["output"]
    if fmt == "text":
        _field(obj, "text", where, fmt)
    elif fmt == "sft":
        _canonical_single(obj, where, fmt)
    elif fmt == "chat":
        _field(obj, "messages", where, fmt, list)
        msgs = _check_messages(obj["messages"], where, fmt)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages' has no assistant turn, so there is nothing to train on")
        obj["messages"] = msgs
    elif fmt == "preference":
        _canonical_pair(obj, where, fmt)
    elif fmt == "proposal_samples":
        prop = obj.get("proposal")
        if isinstance(prop, list) and prop and all(isinstance(p, str) for p in prop):
            obj["proposal"] = prop[0]  # several samples per prompt: RAM uses one y_PM per prompt
        _field(obj, "proposal", where, fmt)
        if "proposal_token_ids" in obj:
            ids = obj["proposal_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataError(f"{where}: field 'proposal_token_ids' must be a list of ints")
        if "chosen" in obj and "rejected" in obj:  # sampled from preference data: y_data is the chosen response
            _canonical_pair(obj, where, fmt)
            obj.setdefault("response", obj["chosen"])
        elif "messages" in obj and "prompt" not in obj:
            msgs = _check_messages(obj["messages"], where, fmt)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages' must end with the assistant turn (y_data) in a proposal "
                                f"samples file")
            obj["messages"] = msgs
        else:
            if "response" not in obj and "completion" not in obj and "chosen" in obj:
                obj["response"] = obj["chosen"]
            _canonical_single(obj, where, fmt)
    return Record(where, fmt, obj)


def record_prompt(obj: Mapping[str, Any], where: str = "record", field_map: Mapping[str, str] | None = None
                  ) -> str | list[dict[str, str]]:
    """The prompt that training renders for one raw record of any supported format (a string, or messages ending
    with a user/system turn): sample.py draws the one-time proposal samples for exactly this prompt."""
    rec = _normalize(obj, where, "auto", field_map)
    if rec.format == "text":
        raise DataError(f"{where}: a text record has no prompt")
    d = rec.data
    if "prompt" in d:
        return d["prompt"]
    msgs = d["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def read_jsonl(path: str, format: str = "auto", field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Parses a JSONL file; the format is detected from its first record when ``format="auto"`` and every other
    line must then fit it. Blank lines are skipped. Raises ``DataError`` naming ``path:line`` and the field."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} not found")
    records: list[Record] = []
    fmt = format
    for lineno, obj in files.iter_jsonl(path, error=DataError):
        rec = _normalize(obj, f"{path}:{lineno}", fmt, field_map)
        fmt = rec.format
        records.append(rec)
    if not records:
        raise DataError(f"data file {path!r} has no records")
    return records


def _decode_bytes(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _decode_bytes(x.tolist())
    if isinstance(x, np.generic):
        return _decode_bytes(x.item())
    if isinstance(x, Mapping):
        return {k: _decode_bytes(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_decode_bytes(v) for v in x]
    return x


def read_tfds(name: str, split: str = "train", data_dir: str | None = None, format: str = "auto",
              field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Reads a prepared TensorFlow Datasets dataset (no download); byte strings are decoded as UTF-8 and the
    records parsed like JSONL lines. Needs the optional ``tensorflow-datasets`` package."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("data.source=tfds needs the optional packages tensorflow and tensorflow-datasets "
                          "(pip install tensorflow-datasets tensorflow); or convert the data to JSONL and use "
                          "data.source=jsonl") from e
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    records: list[Record] = []
    fmt = format
    for i, ex in enumerate(tfds.as_numpy(ds)):
        rec = _normalize(_decode_bytes(ex), f"tfds:{name}/{split}:{i}", fmt, field_map)
        fmt = rec.format
        records.append(rec)
    if not records:
        raise DataError(f"tfds dataset {name}/{split} is empty")
    return records


def read_grain(paths: Sequence[str], format: str = "auto", field_map: Mapping[str, str] | None = None) -> list[Record]:
    """Reads ArrayRecord files whose records are UTF-8 JSON objects (the JSONL formats) through grain's
    ``ArrayRecordDataSource``. Needs the optional ``grain`` package (and ``array_record``)."""
    try:
        import grain.python as pygrain
        source_cls = pygrain.ArrayRecordDataSource
    except (ImportError, AttributeError):
        try:
            import grain
            source_cls = grain.sources.ArrayRecordDataSource
        except (ImportError, AttributeError) as e:
            raise ImportError("data.source=grain needs the optional package grain with array_record "
                              "(pip install grain array_record); or use data.source=jsonl") from e
    source = source_cls(list(paths))
    records: list[Record] = []
    fmt = format
    for i in range(len(source)):
        where = f"grain:{','.join(paths)}[{i}]"
        raw = source[i]
        try:
            obj = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: record is not UTF-8 JSON ({e})") from None
        rec = _normalize(obj, where, fmt, field_map)
        fmt = rec.format
        records.append(rec)
    if not records:
        raise DataError(f"grain source {list(paths)} is empty")
    return records


_HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def read_hf(files: Sequence[str] = (), *, path: str | None = None, name: str | None = None, split: str = "train",
            format: str = "auto", field_map: Mapping[str, str] | None = None,
            cache_dir: str | None = None) -> list[Record]:
    """Reads records through Hugging Face ``datasets`` (an optional dependency), parsed like JSONL lines.

    Either local ``files`` (parquet, JSON/JSONL, CSV or Arrow; the builder follows the extension, all files one
    kind) or ``path``: a dataset directory or a Hub dataset id already in the local cache (``name`` is its
    configuration, ``split`` the split; ``files`` then narrows it as ``data_files``). Fields that are None (a JSON
    row without a field other rows have) are dropped before parsing.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("data.source=hf needs the optional package datasets (pip install datasets, or "
                          "pip install 'ramjax[data]'); or convert the data to JSONL and use data.source=jsonl") from e
    files = list(files)
    for f in files:
        if not os.path.exists(f):
            raise DataError(f"data file {f!r} not found")
    if path is None:
        if not files:
            raise DataError("data.source=hf needs data.train_files (parquet/JSON/JSONL/CSV files) or data.hf_path")
        kinds = {_HF_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"data.source=hf reads files ending in {sorted(_HF_BUILDERS)}, all of one kind; got "
                            f"{files}; or set data.hf_path to a dataset directory")
        builder, label, split = kinds.pop(), ",".join(files), "train"  # data_files land in the "train" split
        ds = datasets.load_dataset(builder, data_files=files, split=split, cache_dir=cache_dir)
    else:
        label = path
        try:
            ds = datasets.load_dataset(path, name, data_files=files or None, split=split, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise DataError(f"data.hf_path={path!r} (split {split!r}) cannot be loaded: {e}. It must be a local "
                            f"dataset directory or a Hub dataset already in the cache (nothing is downloaded "
                            f"offline)") from e
    records: list[Record] = []
    fmt = format
    for i, row in enumerate(ds):
        row = {k: v for k, v in row.items() if v is not None}
        rec = _normalize(row, f"hf:{label}/{split}:{i}", fmt, field_map)
        fmt = rec.format
        records.append(rec)
    if not records:
        raise DataError(f"dataset {label} ({split}) has no records")
    return records


def read_records(files: Sequence[str], format: str = "auto", field_map: Mapping[str, str] | None = None,
                 source: str = "jsonl", tfds_name: str | None = None, split: str = "train",
                 tfds_data_dir: str | None = None, hf_path: str | None = None,
                 hf_name: str | None = None) -> list[Record]:
    """All records of a data source, in file order (each JSONL file detects its own format)."""
    if source == "jsonl":
        if not files:
            raise DataError("no data files given; set data.train_files=[a.jsonl,...]")
        return [r for path in files for r in read_jsonl(path, format, field_map)]
    if source == "hf":
        return read_hf(files, path=hf_path, name=hf_name, split=split, format=format, field_map=field_map)
    if source == "tfds":
        if not tfds_name:
            raise DataError("data.source=tfds needs data.tfds_name")
        return read_tfds(tfds_name, split, tfds_data_dir, format, field_map)
    if source == "grain":
        if not files:
            raise DataError("data.source=grain needs data.train_files (ArrayRecord paths)")
        return read_grain(files, format, field_map)
    raise DataError(f"unknown data source {source!r}; expected jsonl, hf, tfds or grain")


def prompt_response(rec: Record) -> tuple[str | list[dict[str, str]], str]:
    """A single-response record's prompt (a string when it is one user turn, else the message list before the
    response) and its data response (preference records: the chosen one)."""
    if rec.format == "text":
        raise DataError(f"{rec.where}: a text record has no prompt and response")
    if rec.format == "preference":
        context, resp = _context(rec.data["prompt"]), rec.data["chosen"]
    else:
        context, resp = _prompt_and_messages(rec)
        if resp is None:
            resp = rec.data["response"]
    if not isinstance(resp, str):  # TRL conversational shapes: the response as one assistant message
        resp = _one_assistant_message(list(resp), rec.where, "response")
    if len(context) == 1 and context[0]["role"] in ("user", "human"):
        return context[0]["content"], resp
    return context, resp


def record_text(rec: Record) -> str:
    """A record as one plain text, what a tokenizer trains on: a text record as is; otherwise every user turn in
    the plain dialogue template (``"\n\nHuman: {prompt}\n\nAssistant: "``) followed by the response."""
    if rec.format == "text":
        return rec.data["text"]
    prompt, resp = prompt_response(rec)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = "".join(PLAIN_PROMPT.replace("{prompt}", m["content"]) if m["role"] in ("user", "human") else m["content"]
                   for m in turns)
    return text + resp


# The plain dialogue template (as ``ramjax.tokenizer.PLAIN_TEMPLATE``; repeated here so that data needs no tokenizer).
PLAIN_PROMPT = "\n\nHuman: {prompt}\n\nAssistant: "


# ------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclasses.dataclass
class DataStats:
    """Counts from tokenization. ``truncated_responses`` counts sequences (a pair can add two);
    ``skipped_empty`` counts examples left with no response token after truncation (never trained on);
    ``split_documents`` counts text documents split into several chunks (each chunk is one kept example)."""

    read: int = 0
    kept: int = 0
    skipped_empty: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    split_documents: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Seq:
    """One token sequence: ``tokens [L]`` int32 and ``target [L]`` bool, True where the token is trained on
    (predicted from the token before it; the first token's flag is never used)."""

    tokens: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass
class TokenizedData:
    """Kept examples, each one ``Seq`` (``kind="single"``) or a ``(chosen, rejected)`` pair of ``Seq``
    (``kind="pair"``); ``where[i]`` locates example i in the source."""

    kind: Literal["single", "pair"]
    examples: list
    where: list[str]
    stats: DataStats
    max_len: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.examples)


def _encode(tok: TokenizerLike, text: str, first: bool, template: str = "plain") -> list[int]:
    """Encodes one piece of a sequence. The first piece gets BOS (when the tokenizer has one) unless it already
    starts with it; a chat template's rendering is taken as is, since templates write their own BOS (the rule of
    ``Tokenizer.encode_prompt`` and of transformers' ``apply_chat_template(tokenize=True)``)."""
    ids = list(tok.encode(text))
    bos = getattr(tok, "bos_id", None)
    if first and template != "chat" and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def _plain_context(tok: TokenizerLike, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
    """A conversation in the plain template as (text, is_assistant) pieces: system text, then per user turn
    ``render_prompt(content, "plain")`` and per assistant turn its content."""
    pieces = []
    for m in messages:
        if m["role"] == "assistant":
            pieces.append((m["content"], True))
        elif m["role"] in ("user", "human"):
            pieces.append((tok.render_prompt(m["content"], "plain"), False))
        else:
            pieces.append((m["content"], False))  # system (and other roles): context text
    return pieces


def _chat_pieces(tok: TokenizerLike, messages: Sequence[Mapping[str, str]], where: str) -> list[tuple[str, bool]]:
    """Splits the chat-template rendering of ``messages`` into (text, is_assistant_turn) pieces.

    Assistant turn i spans ``render(messages[:i], generation prompt)`` … ``render(messages[:i+1])`` in the full
    rendering; templates that do not render conversations incrementally are rejected.
    """
    full = tok.apply_chat_template(list(messages), add_generation_prompt=False)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(list(messages[:i]), add_generation_prompt=True)
        upto = tok.apply_chat_template(list(messages[:i + 1]), add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (turn {i} "
                            f"changes earlier text), so assistant tokens cannot be located; use data.template=plain")
        pieces.append((full[pos:len(before)], False))
        pieces.append((full[len(before):len(upto)], True))
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(t, a) for t, a in pieces if t]


def _stop_ids(tok: TokenizerLike) -> set[int]:
    """Ids that end a response: EOS and, when the tokenizer lists them, turn terminators such as ``<|im_end|>``."""
    return set(getattr(tok, "eos_ids", ())) | {tok.eos_id}


def _dialog_seq(tok: TokenizerLike, messages: Sequence[Mapping[str, str]], template: str, where: str,
                train_all: bool) -> tuple[list[int], list[bool]]:
    """Tokens and target flags of a whole conversation; EOS closes the last assistant turn."""
    pieces = _chat_pieces(tok, messages, where) if template == "chat" else _plain_context(tok, messages)
    ids: list[int] = []
    tgt: list[bool] = []
    last_assistant = max(i for i, (_, a) in enumerate(pieces) if a)
    stops = _stop_ids(tok)
    for i, (text, is_asst) in enumerate(pieces):
        piece = _encode(tok, text, first=not ids, template=template)
        if i == last_assistant and not stops.intersection(piece):
            piece = piece + [tok.eos_id]
        ids += piece
        tgt += [is_asst or train_all] * len(piece)
    return ids, tgt


def encode_prompt(tokenizer: TokenizerLike, prompt: str | Sequence[Mapping[str, str]],
                  template: str = "plain") -> list[int]:
    """Token ids of a prompt as the model sees it before its response (BOS, template, generation prompt).

    ``prompt`` is a string or a list of ``{role, content}`` messages ending with a user turn. Training renders
    every prompt through this function; for a string it equals ``Tokenizer.encode_prompt(prompt, template)``, so
    sampling sees the same prompt tokens as training.
    """
    if template not in ("plain", "chat"):
        raise DataError(f"unknown template {template!r}; expected 'plain' or 'chat'")
    if isinstance(prompt, str):
        if template == "plain":
            return _encode(tokenizer, tokenizer.render_prompt(prompt, "plain"), first=True)
        prompt = [{"role": "user", "content": prompt}]
    if template == "chat":
        return _encode(tokenizer, tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True), first=True,
                       template="chat")
    ids: list[int] = []
    for text, _ in _plain_context(tokenizer, prompt):
        ids += _encode(tokenizer, text, first=not ids)
    return ids


def _response_ids(tok: TokenizerLike, text: str, token_ids: Sequence[int] | None = None) -> list[int]:
    ids = list(token_ids) if token_ids is not None else _encode(tok, text, first=False)
    if tok.eos_id is not None and (not ids or ids[-1] != tok.eos_id):
        ids.append(tok.eos_id)
    return ids


def _cut_prompt(prompt: list[int], max_prompt_len: int, bos: int | None) -> tuple[list[int], bool]:
    if len(prompt) <= max_prompt_len:
        return prompt, False
    if bos is not None and prompt and prompt[0] == bos:
        return [bos] + prompt[len(prompt) - (max_prompt_len - 1):], True
    return prompt[len(prompt) - max_prompt_len:], True


def _prompt_and_messages(rec: Record) -> tuple[list[dict[str, str]], str | None]:
    """Context messages (ending with a user turn) and the data response of a single-response record."""
    d = rec.data
    if "messages" in d and "prompt" not in d:
        msgs = d["messages"]
        return list(msgs[:-1]), msgs[-1]["content"]
    return _context(d["prompt"]), None


class _Tokenizer:
    """Turns records into ``Seq`` objects under one set of options, counting into ``stats``."""

    def __init__(self, tok: TokenizerLike, template: str, max_len: int, max_prompt_len: int, train_on_prompt: bool):
        if template not in ("plain", "chat"):
            raise DataError(f"unknown template {template!r}; expected 'plain' or 'chat'")
        if not 0 < max_prompt_len <= max_len:
            raise DataError(f"max_prompt_len={max_prompt_len} must be in [1, max_len={max_len}]")
        self.tok, self.template, self.max_len, self.max_prompt_len = tok, template, max_len, max_prompt_len
        self.train_on_prompt = train_on_prompt
        self.stats = DataStats()

    def _split(self, ids: list[int], tgt: list[bool]) -> tuple[list[int], list[int], list[bool]]:
        """(prompt, response tokens, response flags): the prompt is everything before the first trained token."""
        first = next((i for i, t in enumerate(tgt) if t and i > 0), len(ids))
        return ids[:first], ids[first:], tgt[first:]

    def _finish(self, prompt: list[int], responses: list[tuple[list[int], list[bool]]]) -> list[Seq] | None:
        """Applies prompt and response truncation to one example; None when a response ends up empty."""
        prompt, cut = _cut_prompt(prompt, self.max_prompt_len, getattr(self.tok, "bos_id", None))
        self.stats.truncated_prompts += cut
        room = self.max_len - len(prompt)
        seqs, empty = [], False
        for resp, flags in responses:
            if len(resp) > room:
                resp, flags = resp[:room], flags[:room]
                self.stats.truncated_responses += 1
            empty |= not any(flags)
            tokens = np.asarray(prompt + resp, np.int32)
            target = np.asarray([self.train_on_prompt] * len(prompt) + list(flags), bool)
            target[0] = False
            seqs.append(Seq(tokens, target))
        return None if empty else seqs

    def single(self, rec: Record) -> list[Seq]:
        """Zero (skipped), one, or (split text documents) several sequences for one record."""
        d, tok = rec.data, self.tok
        if rec.format == "text":
            ids = _response_ids(tok, "", _encode(tok, d["text"], first=True))
            if len(ids) < 2:
                self.stats.skipped_empty += 1
                return []
            step = self.max_len - 1  # consecutive chunks share one token so every token stays a target
            chunks = [ids[s:s + self.max_len] for s in range(0, max(len(ids) - 1, 1), step)]
            self.stats.split_documents += len(chunks) > 1
            return [Seq(np.asarray(c, np.int32), np.asarray([False] + [True] * (len(c) - 1), bool)) for c in chunks]
        if rec.format == "chat":
            ids, tgt = _dialog_seq(tok, d["messages"], self.template, rec.where, self.train_on_prompt)
        else:
            context, resp_text = _prompt_and_messages(rec)
            if resp_text is None:
                resp_text = d["chosen"] if rec.format == "preference" else d["response"]
            ids, tgt = _dialog_seq(tok, context + [{"role": "assistant", "content": resp_text}], self.template,
                                   rec.where, self.train_on_prompt)
        if self.train_on_prompt:
            prompt, resp, flags = [], ids, [True] * len(ids)
        else:
            prompt, resp, flags = self._split(ids, tgt)
        out = self._finish(prompt, [(resp, flags)])
        if out is None:
            self.stats.skipped_empty += 1
            return []
        return out

    def pair(self, rec: Record, negatives: str) -> list[tuple[Seq, Seq]]:
        """The (chosen / y_data, rejected / y_neg) pair of a record, sharing the prompt tokens."""
        d = rec.data
        if negatives == "proposal":
            if rec.format != "proposal_samples":
                raise DataError(f"{rec.where}: negatives from the proposal need the field 'proposal' (a file written "
                                f"by sample.py in proposal mode), but this is a {rec.format} file"
                                + ("; for preference data set ram.negatives=rejected" if rec.format == "preference"
                                   else ""))
            context, data_resp = _prompt_and_messages(rec)
            a = data_resp if data_resp is not None else d["response"]
            b, b_ids = d["proposal"], d.get("proposal_token_ids")
        elif negatives == "rejected":
            if "rejected" not in d or not isinstance(d.get("rejected"), str):
                raise DataError(f"{rec.where}: field 'rejected' is missing (preference pairs need prompt, chosen, "
                                f"rejected; this is a {rec.format} file)")
            if "chosen" not in d and rec.format != "proposal_samples":
                raise DataError(f"{rec.where}: field 'chosen' is missing")
            if "prompt" not in d:
                raise DataError(f"{rec.where}: field 'prompt' is missing")
            context = _context(d["prompt"])
            a = d["chosen"] if "chosen" in d else d["response"]
            b, b_ids = d["rejected"], None
        else:
            raise DataError(f"unknown negatives {negatives!r}; expected 'proposal' or 'rejected'")
        prompt = encode_prompt(self.tok, context, self.template)
        resp_a = self._response(context, prompt, a, None, rec.where)
        resp_b = self._response(context, prompt, b, b_ids, rec.where)
        out = self._finish(prompt, [(r, [True] * len(r)) for r in (resp_a, resp_b)])
        if out is None:
            self.stats.skipped_empty += 1
            return []
        return [(out[0], out[1])]

    def _response(self, context, prompt: list[int], text: str, ids: Sequence[int] | None, where: str) -> list[int]:
        if ids is not None:
            n = getattr(self.tok, "vocab_size", None)
            bad = [i for i in ids if i < 0 or (n is not None and i >= n)]
            if bad:  # an out-of-range id would index past the embedding (NaN loss, or silently wrong rows)
                raise DataError(f"{where}: field 'proposal_token_ids' holds ids outside the tokenizer's vocabulary "
                                f"[0, {n}): {bad[:5]}; the samples were drawn with another tokenizer: resample them "
                                f"with this proposal, or drop the field to train on the re-encoded 'proposal' text")
        if ids is not None or self.template == "plain":
            return _response_ids(self.tok, text, ids)
        # chat: the assistant turn as the template writes it (end-of-turn tokens included), after the prompt
        full, tgt = _dialog_seq(self.tok, list(context) + [{"role": "assistant", "content": text}], "chat", where,
                                False)
        if full[:len(prompt)] != prompt:
            raise DataError(f"{where}: the chat template's rendering of the prompt differs inside the conversation; "
                            f"use data.template=plain")
        last = max(i for i, t in enumerate(tgt) if t) + 1  # drop template text after the assistant turn
        return full[len(prompt):last]


def stage_kind(stage: str) -> Literal["single", "pair"]:
    """``pair`` for the stages that compare two responses per prompt (dpo, ram), else ``single``."""
    return "pair" if stage in ("dpo", "ram") else "single"


def tokenize_records(records: Sequence[Record], tokenizer: TokenizerLike, *, kind: Literal["single", "pair"] = "single",
                     template: str = "plain", max_len: int = 512, max_prompt_len: int = 256,
                     negatives: Literal["proposal", "rejected"] = "rejected",
                     train_on_prompt: bool = False) -> TokenizedData:
    """Tokenizes, masks and truncates records (see the module docstring); examples left empty are skipped.

    kind="pair" builds (chosen, rejected) pairs: with ``negatives="rejected"`` from preference records, with
    ``negatives="proposal"`` (data response, proposal sample) from sample.py files. ``train_on_prompt`` puts every
    token in the loss (pretraining on prompt/response records).
    """
    if kind not in ("single", "pair"):
        raise DataError(f"unknown kind {kind!r}; expected 'single' or 'pair'")
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token, which every response needs; use a tokenizer with one")
    t = _Tokenizer(tokenizer, template, max_len, max_prompt_len, train_on_prompt)
    examples: list = []
    where: list[str] = []
    for rec in records:
        t.stats.read += 1
        try:
            out = t.single(rec) if kind == "single" else t.pair(rec, negatives)
        except DataError:
            raise
        except ValueError as e:  # e.g. a chat template rejecting the conversation: name the record
            raise DataError(f"{rec.where}: {e}") from e
        examples.extend(out)
        where.extend([rec.where] * len(out))
    st = t.stats
    st.kept = len(examples)
    seqs = [s for e in examples for s in ((e,) if kind == "single" else e)]
    st.tokens = int(sum(len(s) for s in seqs))
    st.loss_tokens = int(sum(int(s.target[1:].sum()) for s in seqs))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    log.info("data: %d records -> %d examples (%d skipped with an empty response, %d prompts and %d responses "
             "truncated, %d documents split), %d tokens", st.read, st.kept, st.skipped_empty, st.truncated_prompts,
             st.truncated_responses, st.split_documents, st.tokens)
    if not examples:
        raise DataError(f"no usable examples: all {st.read} records were empty after truncation to max_len={max_len} "
                        f"(max_prompt_len={max_prompt_len}); raise data.max_len")
    return TokenizedData(kind, examples, where, st, max_len, int(pad))


# ------------------------------------------------------------------------------------------------------------
# Rows and batches


def _pack_rows(order: np.ndarray, lengths: np.ndarray, max_len: int, window: int) -> list[list[int]]:
    """Greedy first-fit packing of examples (in ``order``) into rows of ``max_len`` tokens.

    ``lengths`` is ``[N]`` (single) or ``[N, 2]`` (pairs: both sequences must fit their row). At most ``window``
    rows stay open; opening one more closes the oldest. Rows come out in the order they close.
    """
    needs = [tuple(n) for n in np.asarray(lengths).reshape(len(lengths), -1).tolist()]  # python ints: fast loop
    done: list[list[int]] = []
    open_items: list[list[int]] = []
    open_free: list[list[int]] = []
    for i in order.tolist():
        need = needs[i]
        for r, free in enumerate(open_free):
            if all(n <= f for n, f in zip(need, free)):
                open_items[r].append(i)
                for j, n in enumerate(need):
                    free[j] -= n
                if min(free) < 2:  # no sequence (>= 2 tokens) fits any more
                    done.append(open_items.pop(r))
                    open_free.pop(r)
                break
        else:
            open_items.append([i])
            open_free.append([max_len - n for n in need])
            if min(open_free[-1]) < 2:
                done.append(open_items.pop())
                open_free.pop()
            elif len(open_items) > window:
                done.append(open_items.pop(0))
                open_free.pop(0)
    done.extend(open_items)
    return done


def fill_rows(rows: Sequence[Sequence[int]], seqs: Sequence[Seq], T: int, pad: int) -> dict[str, np.ndarray]:
    """The five ``[len(rows), T]`` arrays for rows of sequence indices (see the module docstring)."""
    B = len(rows)
    tokens = np.full((B, T), pad, np.int32)
    targets = np.full((B, T), pad, np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for r, items in enumerate(rows):
        off = 0
        for s, i in enumerate(items, 1):
            seq = seqs[i]
            L = len(seq)
            tokens[r, off:off + L] = seq.tokens
            targets[r, off:off + L - 1] = seq.tokens[1:]
            loss_mask[r, off:off + L - 1] = seq.target[1:]
            segment_ids[r, off:off + L] = s
            positions[r, off:off + L] = np.arange(L)
            off += L
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions}


class BatchIterator:
    """Endless (or ``num_epochs``-long) iterator of fixed-shape numpy batches for this host.

    batch_size is the *global* number of rows per step; this host yields ``batch_size / process_count`` rows (its
    share, see the module docstring). ``drop_remainder`` drops an epoch's last incomplete global batch (training);
    without it the last batch is completed with empty rows (all padding, ``example_index`` −1; evaluation).
    """

    def __init__(self, data: TokenizedData, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 packing: bool = False, drop_remainder: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, pack_window: int = 128):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size <= 0 or batch_size % process_count:
            raise DataError(f"the global batch size {batch_size} must be a positive multiple of the number of "
                            f"processes ({process_count}); each process loads batch_size / process_count rows")
        self.data = data
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed, self.shuffle, self.packing = int(seed), shuffle, packing
        self.drop_remainder, self.num_epochs = drop_remainder, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.pack_window = pack_window
        self.epoch = 0
        self.position = 0
        self._plan_epoch: int | None = None
        self._plan: list[list[int]] = []
        self._plan_batches = 0
        if data.kind == "single":
            self._lengths = np.asarray([len(s) for s in data.examples], np.int64)
        else:
            self._lengths = np.asarray([[len(a), len(b)] for a, b in data.examples], np.int64)
        if self.batches_per_epoch(0) == 0:
            unit = "packed rows" if packing else "examples"
            raise DataError(f"the data gives {len(self._rows(0))} {unit}, fewer than one global batch of "
                            f"{batch_size}; lower data.batch_size or add data")

    @property
    def stats(self) -> DataStats:
        return self.data.stats

    def _rows(self, epoch: int) -> list[list[int]]:
        """All rows of an epoch (every host computes the same list)."""
        n = len(self.data)
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        if self.packing:
            return _pack_rows(order, self._lengths, self.data.max_len, self.pack_window)
        return [[int(i)] for i in order]

    def _ensure_plan(self, epoch: int) -> None:
        if self._plan_epoch == epoch:
            return
        rows = self._rows(epoch)
        G = self.batch_size
        nb = len(rows) // G if self.drop_remainder else -(-len(rows) // G)
        rows = rows[:nb * G] + [[] for _ in range(nb * G - min(len(rows), nb * G))]
        self._plan = rows[self.process_index::self.process_count]
        self._plan_batches = nb
        self._plan_epoch = epoch

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """Global batches in ``epoch`` (default: the current one); with packing it varies slightly by epoch."""
        self._ensure_plan(self.epoch if epoch is None else epoch)
        return self._plan_batches

    def state(self) -> dict[str, int]:
        """``{"epoch", "position"}``: the epoch and the number of its batches already yielded."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from a ``state()``; the following batches are exactly those that followed it."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data iterator state must be {{'epoch': int, 'position': int}}, got {state!r}") from None
        if epoch < 0 or position < 0 or position > self.batches_per_epoch(epoch):
            raise DataError(f"data iterator state {dict(state)} is out of range for this data "
                            f"({self.batches_per_epoch(epoch)} batches in epoch {epoch}); the data or batch size "
                            f"changed since the checkpoint")
        self.epoch, self.position = epoch, position

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self.position < self.batches_per_epoch(self.epoch):
                break
            self.epoch += 1
            self.position = 0
        Lb = self.local_batch_size
        rows = self._plan[self.position * Lb:(self.position + 1) * Lb]
        self.position += 1
        return self._make_batch(rows)

    def _make_batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        T, pad = self.data.max_len, self.data.pad_id
        if self.data.kind == "single":
            batch = fill_rows(rows, self.data.examples, T, pad)
        else:
            batch = {}
            for j, name in enumerate(("chosen", "rejected")):
                part = fill_rows(rows, [e[j] for e in self.data.examples], T, pad)
                batch.update({f"{name}_{k}": v for k, v in part.items()})
        if not self.packing:
            batch["example_index"] = np.asarray([r[0] if r else -1 for r in rows], np.int32)
        return batch


# ------------------------------------------------------------------------------------------------------------
# From a TrainConfig


def load_data(cfg: Any, tokenizer: TokenizerLike, *, split: Literal["train", "eval"] = "train") -> TokenizedData:
    """Reads and tokenizes ``cfg.data.train_files`` (or ``eval_files``) for ``cfg.stage`` (a ``TrainConfig``)."""
    d = cfg.data
    files = d.train_files if split == "train" else d.eval_files
    source = "jsonl" if split == "eval" and d.source == "tfds" else d.source  # tfds eval data: JSONL eval_files
    hf_path = d.hf_path if split == "train" else None  # hf eval data: the eval_files themselves
    records = read_records(files, d.format, d.field_map, source, d.tfds_name, d.split, d.tfds_data_dir, hf_path,
                           d.hf_name)
    negatives = cfg.ram.negatives if cfg.stage == "ram" else "rejected"
    return tokenize_records(records, tokenizer, kind=stage_kind(cfg.stage), template=d.template, max_len=d.max_len,
                            max_prompt_len=d.max_prompt_len, negatives=negatives,
                            train_on_prompt=cfg.stage == "pretrain")


def train_iterator(cfg: Any, tokenizer: TokenizerLike, *, process_index: int | None = None,
                   process_count: int | None = None) -> BatchIterator:
    """The training ``BatchIterator`` of a ``TrainConfig``: shuffled per epoch from ``cfg.seed``, endless,
    incomplete last batches dropped."""
    data = load_data(cfg, tokenizer, split="train")
    return BatchIterator(data, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         packing=cfg.data.packing, drop_remainder=True, num_epochs=None,
                         process_index=process_index, process_count=process_count)


def eval_iterator(cfg: Any, tokenizer: TokenizerLike, *, batch_size: int | None = None,
                  process_index: int | None = None, process_count: int | None = None) -> BatchIterator | None:
    """One ordered pass over ``cfg.data.eval_files`` (every example once; the last batch completed with empty
    rows), or None when there are no eval files."""
    if not cfg.data.eval_files:
        return None
    data = load_data(cfg, tokenizer, split="eval")
    return BatchIterator(data, batch_size or cfg.data.batch_size, seed=cfg.seed, shuffle=False,
                         packing=cfg.data.packing, drop_remainder=False, num_epochs=1,
                         process_index=process_index, process_count=process_count)

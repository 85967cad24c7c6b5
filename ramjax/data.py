"""Training data: records (read by ``ramjax.formats``) tokenized with loss masks into fixed-shape padded or packed
batches, with host sharding and resumable deterministic iteration.

Formats: see ``ramjax.formats`` (the readers and the five record formats; its names are re-exported here).

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
import logging
from typing import Any, Iterator, Literal, Mapping, Protocol, Sequence

import numpy as np

from ramjax import formats
from ramjax.formats import (
    FORMATS,
    PLAIN_PROMPT,
    DataError,
    Record,
    detect_format,
    parse_record,
    prompt_response,
    read_grain,
    read_hf,
    read_jsonl,
    read_records,
    read_tfds,
    record_prompt,
    record_text,
    split_hh_dialogue,
)

# the readers of ramjax.formats are re-exported: ``ramjax.data`` is where training data is read and batched
__all__ = [
    "FORMATS", "PLAIN_PROMPT", "DataError", "Record", "detect_format", "parse_record", "prompt_response",
    "read_grain", "read_hf", "read_jsonl", "read_records", "read_tfds", "record_prompt", "record_text",
    "split_hh_dialogue",
    "TokenizerLike", "DataStats", "Seq", "TokenizedData", "encode_prompt", "stage_kind", "tokenize_records",
    "fill_rows", "BatchIterator", "load_data", "train_iterator", "eval_iterator",
]

log = logging.getLogger(__name__)

_LM_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class TokenizerLike(Protocol):
    """The part of ``ramjax.tokenizer.Tokenizer`` this module uses."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def render_prompt(self, prompt: str, template: str) -> str: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str: ...


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
            context, resp_text = formats.context_and_response(rec)
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
            context, data_resp = formats.context_and_response(rec)
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
            context = formats.prompt_messages(d["prompt"])
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


_ROW_MULTIPLE = 8  # padding="longest" rounds rows up to this: fewer distinct shapes, aligned for TPU tiles


def stage_kind(stage: str) -> Literal["single", "pair"]:
    """``pair`` for the stages that compare two responses per prompt (dpo, ram), else ``single``."""
    return "pair" if stage in ("dpo", "ram") else "single"


def tokenize_records(records: Sequence[Record], tokenizer: TokenizerLike, *, kind: Literal["single", "pair"] = "single",
                     template: str = "plain", max_len: int = 512, max_prompt_len: int = 256,
                     negatives: Literal["proposal", "rejected"] = "rejected",
                     train_on_prompt: bool = False, padding: Literal["max_len", "longest"] = "max_len"
                     ) -> TokenizedData:
    """Tokenizes, masks and truncates records (see the module docstring); examples left empty are skipped.

    kind="pair" builds (chosen, rejected) pairs: with ``negatives="rejected"`` from preference records, with
    ``negatives="proposal"`` (data response, proposal sample) from sample.py files. ``train_on_prompt`` puts every
    token in the loss (pretraining on prompt/response records). ``padding="longest"`` makes the rows (the returned
    ``max_len``) as long as the longest kept sequence rounded up to a multiple of 8, at most ``max_len``: right
    padding past it is computed and thrown away.
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
    row_len = max_len
    if padding == "longest":
        longest = max(len(s) for s in seqs)
        row_len = min(max_len, -(-longest // _ROW_MULTIPLE) * _ROW_MULTIPLE)
        log.info("data: rows of %d tokens (the longest sequence has %d; data.max_len=%d)", row_len, longest, max_len)
    elif padding != "max_len":
        raise DataError(f"unknown padding {padding!r}; expected 'max_len' or 'longest'")
    return TokenizedData(kind, examples, where, st, row_len, int(pad))


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
                            train_on_prompt=cfg.stage == "pretrain", padding=d.padding)


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

"""Tiny tokenizer fixtures built in the tests: nothing is downloaded.

* ``make_hf_tokenizer(dir, kind="qwen")``: a byte-level BPE ``tokenizer.json`` trained with the ``tokenizers``
  library on a few KB of text, laid out like a Qwen2.5-Instruct checkpoint (NFC normaliser, Qwen's split regex,
  ChatML special tokens appended after the BPE vocabulary, ``Qwen2Tokenizer`` class, ChatML chat template,
  ``generation_config.json`` with two stop ids).
* ``make_hf_tokenizer(dir, kind="llama")``: the same kind of BPE laid out like Llama-3.1-Instruct (Llama-3 split
  regex, ``<|begin_of_text|>`` added by the post-processor, ``PreTrainedTokenizerFast`` class, header/eot chat
  template that uses ``strftime_now`` and ``raise_exception``).
* ``make_sentencepiece(dir)``: a sentencepiece BPE ``tokenizer.model`` trained with Llama-2's options (identity
  normalisation, byte fallback, split digits, whitespace kept) plus a ``LlamaTokenizer`` ``tokenizer_config.json``
  with an ``[INST]`` chat template.

Every directory loads with ``transformers.AutoTokenizer.from_pretrained`` and ``ramjax.tokenizer.load_tokenizer``.
Each call takes well under a second. The vocabularies are deterministic, so a test may build the same fixture twice
(e.g. a proposal and an aligner directory) and get identical tokenizers; use ``load_tokenizer(dir).vocab_size`` for
the number of ids a model's embedding needs.
"""
from __future__ import annotations

import io
import json
import os
import random

# ---------------------------------------------------------------------------------------------------------------
# Training text: a few KB mixing English, digits/arithmetic, code, accents, CJK, emoji and chat-role words, so
# every fixture has merges for the strings the tests use and byte fallback for the rest.

_WORDS = (
    "the quick brown fox jumps over lazy dog alignment residual model proposal aligner token sample weight "
    "importance human assistant system user question answer number string reverse sort add subtract multiply "
    "copy upper lower count letters hello world python jax you are a helpful harmless honest what is of to and"
).split()

_EXTRA_LINES = [
    "Café naïve résumé façade über straße ÅÉÎÕÜ ñ ç",
    "日本語のテキストです。中文文本测试。你好，世界！",
    "한국어 문장입니다",
    "emoji 😀🎉👍 fin 🚀",
    "def f(x):\n    return x * 2\n",
    "\tindented\twith tabs\n",
    "Human: what is 2+2?\n\nAssistant: 4",
    "<html><body>tags & entities</body></html>",
    "Don't you think it's fine? I'm sure we'll see, they've said so.",
]


def corpus_lines() -> list[str]:
    """About 6 KB of deterministic training text, one sentence per item."""
    rng = random.Random(0)
    lines = []
    for i in range(160):
        s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        if i % 5 == 0:
            s = s.capitalize() + "."
        if i % 7 == 0:
            s += f" {rng.randint(0, 99999)} + {rng.randint(0, 999)} = {rng.randint(0, 100999)}"
        if i % 11 == 0:
            s += "?"
        lines.append(s)
    return lines + _EXTRA_LINES * 3


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face byte-level BPE fixtures.

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX) and Llama-3's.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
LLAMA3_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]

# Qwen2.5-Instruct's ChatML template (tool-call branches shortened, default system prompt kept).
QWEN_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' }}
            {{- tool_call.function | tojson }}
            {{- '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3.1-Instruct's template, shortened: BOS, dated system header, strict role alternation, generation prompt.
LLAMA3_CHAT_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- generation %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endgeneration %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Llama-2-chat's [INST] template (uses bos_token/eos_token and raise_exception).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _added_tokens_decoder(tokenizer) -> dict[str, dict]:
    """tokenizer_config.json's ``added_tokens_decoder`` entry for every added token of a ``tokenizers.Tokenizer``."""
    out = {}
    for idx, tok in sorted(tokenizer.get_added_tokens_decoder().items()):
        out[str(idx)] = {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                         "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}
    return out


def _train_byte_level_bpe(split_regex: str, *, nfc: bool, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


def make_hf_tokenizer(directory: str | os.PathLike, kind: str = "qwen", *, generation_config: bool = True) -> None:
    """Writes ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``generation_config.json``) into ``directory``.

    kind: ``"qwen"`` (ChatML, no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``) or ``"llama"`` (BOS
    ``<|begin_of_text|>`` added by the post-processor, eos ``<|eot_id|>``). With ``generation_config=False`` the
    caller writes its own ``generation_config.json`` (e.g. a model's ``save_pretrained``).
    """
    from tokenizers import AddedToken, processors

    os.makedirs(directory, exist_ok=True)
    if kind == "qwen":
        tok = _train_byte_level_bpe(QWEN_SPLIT_REGEX, nfc=True, vocab_size=600)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
        config = {
            "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
            "clean_up_tokenization_spaces": False, "split_special_tokens": False, "model_max_length": 32768,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "chat_template": QWEN_CHAT_TEMPLATE,
        }
        endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        gen = {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}
    elif kind == "llama":
        tok = _train_byte_level_bpe(LLAMA3_SPLIT_REGEX, nfc=False, vocab_size=620)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                          pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)]),
        ])
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
            "chat_template": LLAMA3_CHAT_TEMPLATE,
        }
        ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
        gen = {"bos_token_id": bos, "eos_token_id": ids}
    else:
        raise ValueError(f"unknown fixture kind {kind!r}; expected 'qwen' or 'llama'")
    config["added_tokens_decoder"] = _added_tokens_decoder(tok)
    tok.save(os.path.join(directory, "tokenizer.json"))
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    if generation_config:
        _write_json(os.path.join(directory, "generation_config.json"), gen)


# ---------------------------------------------------------------------------------------------------------------
# Sentencepiece fixture.

SENTENCEPIECE_USER_SYMBOLS = ("<|sep|>",)


def make_sentencepiece(directory: str | os.PathLike, *, vocab_size: int = 420, chat_template: bool = True) -> None:
    """Writes a Llama-2-style sentencepiece BPE ``tokenizer.model`` + ``tokenizer_config.json`` into ``directory``.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, user symbol ``<|sep|>`` 3, then 256 byte pieces and the merges. No pad
    piece (as Llama-2), so the pad id falls back to EOS.
    """
    import sentencepiece as spm

    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(SENTENCEPIECE_USER_SYMBOLS), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")

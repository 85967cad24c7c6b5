"""Chat templates compiled and rendered the way ``transformers.utils.chat_template_utils`` does: jinja2's immutable
sandbox, transformers' globals (``raise_exception``, ``strftime_now``, ``tojson`` without HTML escaping, underscore-
safe ``namespace``) and message normalisation, plus bounds on one rendering (output size, ``range`` items, ``*``
and ``**``, wall time) so a hostile or broken template is a ``ChatTemplateError``, not a hang.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ramjax.tokenizer_formats import TokenizerError


class ChatTemplateError(TokenizerError):
    """The chat template is missing, does not compile, or rejected the conversation (``raise_exception``)."""



def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja's tojson: no HTML escaping, and json.dumps' options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002 - the name templates call
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` inside templates, without attribute access to the real class."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


# Rendering one prompt is bounded: a template that loops or multiplies its way past these limits (a hang or an
# out-of-memory in the making) is a ChatTemplateError naming the template, not a stuck process.
TEMPLATE_MAX_OUTPUT = 1 << 22     # characters of rendered text
TEMPLATE_MAX_RANGE_ITEMS = 1 << 20  # items produced by range() over one rendering
TEMPLATE_MAX_SECONDS = 10.0       # wall time of one rendering


class _RenderBudget:
    """The limits of one ``render``: ``range`` items handed out, output size and wall time."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        import time

        self.items = 0
        self.deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def check_time(self) -> None:
        import time

        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"rendering took longer than {TEMPLATE_MAX_SECONDS:.0f} s (nested loops?)")

    def range(self, *args):
        r = range(*args)
        self.items += len(r)
        if self.items > TEMPLATE_MAX_RANGE_ITEMS:
            raise ChatTemplateError(f"the template's range() calls produce more than {TEMPLATE_MAX_RANGE_ITEMS} "
                                    f"items in one rendering (nested loops?)")
        self.check_time()
        return r


def compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # ``*`` and ``**`` are intercepted so that "x" * 10**9 or 10**10**10 cannot exhaust memory or time
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * n > TEMPLATE_MAX_OUTPUT:
                        raise ChatTemplateError(f"the template builds a sequence of {len(seq) * n} items with "
                                                f"'*' (limit {TEMPLATE_MAX_OUTPUT})")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise ChatTemplateError(f"the template raises to the power {right} (limit 1024)")
            return super().call_binop(context, operator, left, right)

    def no_include(name):
        raise ChatTemplateError(f"chat templates cannot load other templates ({{% include/import/extends "
                                f"{name!r} %}}); inline that template's text instead")

    class GenerationTag(jinja2.ext.Extension):
        # ``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in transformers; the
        # rendered string is the body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces that refuse underscore attributes, as in transformers' sandbox.
        def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.FunctionLoader(no_include),
                             extensions=[GenerationTag, jinja2.ext.loopcontrols])
    budget = _RenderBudget()
    env.globals["range"] = budget.range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from e
    template.ramjax_budget = budget
    return template


def render_bounded(template: Any, variables: Mapping[str, Any]) -> str:
    """``template.render(**variables)`` streamed, stopping with ``ChatTemplateError`` past the output, range and
    time limits of ``_RenderBudget``."""
    budget = getattr(template, "ramjax_budget", None) or _RenderBudget()
    budget.reset()
    out, size = [], 0
    for chunk in template.generate(**variables):
        out.append(chunk)
        size += len(chunk)
        if size > TEMPLATE_MAX_OUTPUT:
            raise ChatTemplateError(f"the rendered prompt exceeds {TEMPLATE_MAX_OUTPUT} characters")
        budget.check_time()
    return "".join(out)


def plain_data(value: Any) -> Any:
    """A copy of ``value`` made of JSON types only, so the sandboxed template never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / jax scalars
        return plain_data(value.item())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """transformers' message normalisation: drop None values, copy to plain data, alias reasoning fields."""
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = plain_data({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out

"""Render Hugging Face Jinja chat templates as `transformers`' `apply_chat_template` does, and
find which characters of the result belong to the assistant.

The environment matches the one `transformers` builds: a sandbox, `trim_blocks`, `lstrip_blocks`,
the `loopcontrols` extension, a `tojson` that keeps non-ASCII text, and the `raise_exception` and
`strftime_now` globals; the template sees `messages`, `add_generation_prompt` and the tokenizer's
special tokens (`bos_token`, `eos_token`, ...) as strings. Outputs are checked against
`transformers` by fixtures that `tools/make_tokenizer_fixtures.py` writes.

Assistant spans (which characters the loss trains on) come from one of two methods:

* `"generation"`: the template's `{% generation %}...{% endgeneration %}` blocks, as
  `transformers`' `return_assistant_tokens_mask` reads them (few templates have them);
* `"prefix"`: for assistant message `i`, render `messages[:i]` with the generation prompt and
  `messages[:i + 1]` without; what the second adds to the first is the assistant's turn (its
  content and the end-of-turn marker, trailing whitespace excluded). This needs no markers, and
  it is exactly what the model has to produce at inference after the generation prompt. It needs
  a template that renders a conversation's beginning the same whether or not more turns follow;
  when one does not (some templates rewrite earlier turns), it is an error naming the message.

`"auto"` uses the markers when the template has them and the prefix method otherwise.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar

MASK_METHODS = ("auto", "generation", "prefix")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The chat template failed, or cannot say which tokens are the assistant's."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    spans_var: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
        "jaxpost_generation_spans", default=None
    )

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body and, while a render is
        being tracked, records the body's character span in the output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_track")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            tracked = spans_var.get()
            if tracked is not None:
                chunks, spans = tracked
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template does not parse (line {e.lineno}): {e.message}"
        ) from None
    return template, spans_var


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("empty chat template")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))

    def _context(self, messages, add_generation_prompt: bool, extra: Mapping | None):
        msgs = [
            dict(m) if isinstance(m, Mapping) else {"role": m[0], "content": m[1]} for m in messages
        ]
        # As transformers: tools and documents are defined (None) unless given.
        return {
            **self.special_tokens,
            "tools": None,
            "documents": None,
            **(extra or {}),
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
        }

    def render(
        self,
        messages: Sequence,
        *,
        add_generation_prompt: bool = False,
        extra: Mapping | None = None,
    ) -> str:
        """The template's text for `messages` (dicts with role/content, or (role, content))."""
        return self.render_tracked(
            messages, add_generation_prompt=add_generation_prompt, extra=extra
        )[0]

    def render_tracked(
        self,
        messages: Sequence,
        *,
        add_generation_prompt: bool = False,
        extra: Mapping | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """`(text, spans)`: the rendering and the character spans of its generation blocks."""
        import jinja2

        template, spans_var = _compile(self.source)
        chunks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = spans_var.set((chunks, spans))
        try:
            for chunk in template.generate(**self._context(messages, add_generation_prompt, extra)):
                chunks.append(chunk)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"chat template raised: {e}") from None
        finally:
            spans_var.reset(token)
        return "".join(chunks), spans

    def _before_first(self, message, upto: str, extra) -> str | None:
        """What precedes an opening assistant message: the template's rendering of no messages
        with the generation prompt if it has one, else everything before the message's text."""
        try:
            before = self.render([], add_generation_prompt=True, extra=extra)
        except (TemplateError, IndexError, TypeError):
            before = None
        if before is not None and upto.startswith(before):
            return before
        content = message["content"] if isinstance(message, Mapping) else message[1]
        if not isinstance(content, str) or not content.strip():
            return None
        at = upto.find(content.strip())
        return upto[:at] if at >= 0 else None

    def assistant_spans(
        self,
        messages: Sequence,
        *,
        first: int = 0,
        method: str = "auto",
        extra: Mapping | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """`(text, spans)`: the whole conversation's rendering and the character spans of its
        assistant turns with message index >= `first` (see the module docstring for methods)."""
        if method not in MASK_METHODS:
            raise ValueError(f"mask method {method!r} is not one of {MASK_METHODS}")
        roles = [m["role"] if isinstance(m, Mapping) else m[0] for m in messages]
        if method == "generation" or (method == "auto" and self.has_generation_markers):
            if not self.has_generation_markers:
                raise TemplateError("chat template has no {% generation %} markers")
            text, spans = self.render_tracked(messages, extra=extra)
            # Generation blocks appear once per assistant message, in order.
            assistant = [i for i, r in enumerate(roles) if r == "assistant"]
            if len(spans) != len(assistant):
                raise TemplateError(
                    f"chat template marked {len(spans)} generation blocks for {len(assistant)} "
                    "assistant messages; cannot tell which tokens are whose"
                )
            return text, [s for s, i in zip(spans, assistant, strict=True) if i >= first]
        text = self.render(messages, extra=extra)
        spans = []
        for i, role in enumerate(roles):
            if role != "assistant" or i < first:
                continue
            upto = self.render(messages[: i + 1], extra=extra)
            before = self._before_first(messages[0], upto, extra) if i == 0 else None
            if before is None:
                before = self.render(messages[:i], add_generation_prompt=True, extra=extra)
            if not upto.startswith(before) or not text.startswith(upto):
                raise TemplateError(
                    f"chat template renders messages 0..{i} differently when more messages follow "
                    "(or renders the generation prompt differently from an assistant turn), so "
                    f"assistant message {i}'s tokens cannot be found by prefix; use a template "
                    "with {% generation %} markers (data.assistant_mask=generation)"
                )
            end = len(upto.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return text, spans


def char_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range `[start, end)` overlaps one of `spans`."""
    out = []
    for start, end in offsets:
        hit = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        out.append(int(hit))
    return out

"""Prompt frame (instruction, context, question, answer prefix; chat template or not) and length fitting:
:func:`_fit` finds the longest context a task's plan can make within the target, :func:`_assemble` makes the
:class:`TaskSample`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from kvpolicy.eval.tasks.names import MAX_NEW_TOKENS, SCORERS
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.text import encode, token_span, tokenize

_PLACEHOLDER = "<<<KVPOLICY_CONTEXT>>>"


@dataclass(frozen=True)
class _Frame:
    before: str  # text up to the context (template markup included)
    after: str  # text after it: question, template end, answer prefix
    question: tuple[int, int]  # char span of the question inside ``after``
    chat: bool  # chat template used
    special: bool  # add_special_tokens when tokenizing (False under a chat template: it holds BOS as text)


def _use_chat(tokenizer: Any, use_chat_template: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if use_chat_template is None else bool(use_chat_template)
    if chat and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    return chat


def _make_frame(tokenizer: Any, chat: bool, instruction: str, question: str, answer_prefix: str) -> _Frame:
    if not chat:
        after = "\n\n" + question + (" " + answer_prefix if answer_prefix else "")
        return _Frame(instruction + "\n\n", after, (2, 2 + len(question)), False, True)
    content = f"{instruction}\n\n{_PLACEHOLDER}\n\n{question}"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str) or rendered.count(_PLACEHOLDER) != 1:
        raise ValueError("the tokenizer's chat template did not keep the user message verbatim")
    before, after = rendered.split(_PLACEHOLDER)
    q = after.find(question)
    if q < 0:
        raise ValueError("the tokenizer's chat template did not keep the question verbatim")
    return _Frame(before, after + answer_prefix, (q, q + len(question)), True, False)


@dataclass
class _Context:
    """A rendered context: its text and the char spans (relative to its start) of the needles / gold docs."""

    text: str
    marks: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)
    depths: list[float] = field(default_factory=list)  # achieved depth of each mark (haystack tasks)


@dataclass
class _Built:
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    text: str
    context: _Context
    frame: _Frame

    def span(self, tokenizer: Any, start: int, end: int) -> tuple[int, int]:
        """Token range covering chars [start, end) of the prompt."""
        return token_span(tokenizer, self.text, self.frame.special, self.offsets, start, end)


class _Plan:
    """How a task fills a token budget: ``select`` picks units for an estimated context budget (None when
    nothing fits), ``estimate`` gives a selection's estimated tokens, ``render`` builds its text."""

    def select(self, budget: int) -> Hashable | None:
        raise NotImplementedError

    def estimate(self, sel: Any) -> int:
        raise NotImplementedError

    def render(self, sel: Any) -> _Context:
        raise NotImplementedError


def _fit(tokenizer: Any, frame: _Frame, plan: _Plan, target: int, task: str) -> _Built:
    """The longest prompt of at most ``target`` tokens the plan can make (within one unit of the target).

    The context is estimated from cached piece counts; each round tokenizes the real prompt once, measures
    the estimate's error and re-selects with the budget corrected by it (usually 1-2 rounds: a round that
    selects what an earlier one did ends the search).
    """
    base = len(encode(tokenizer, frame.before + frame.after, frame.special))  # frame tokens (approximate)
    budget = target - base
    best: _Built | None = None
    tried: set[Hashable] = set()
    for _ in range(10):
        sel = plan.select(budget)
        if sel is None:
            break
        if sel in tried:
            break
        tried.add(sel)
        ctx = plan.render(sel)
        text = frame.before + ctx.text + frame.after
        ids, offsets = tokenize(tokenizer, text, frame.special)
        if len(ids) <= target and (best is None or len(ids) > len(best.ids)):
            best = _Built(ids, offsets, text, ctx, frame)
        budget = target - base - (len(ids) - base - plan.estimate(sel))  # corrected by the estimate's error
    if best is None:
        raise ValueError(
            f"target_tokens={target} is too small for task {task!r}: the instruction and question alone take "
            f"~{base} tokens, and the task needs more context than the remaining {max(0, target - base)}"
        )
    return best


def _assemble(
    task: str,
    tokenizer: Any,
    built: _Built,
    *,
    sample_id: str,
    answers: list[str],
    target: int,
    depth: float | None,
    meta: dict[str, Any],
    marks_key: str | None = None,
    depths_key: str | None = None,
    max_new_tokens: int | None = None,
) -> TaskSample:
    frame, ctx = built.frame, built.context
    c0 = len(frame.before)  # context start in the prompt (chars)
    q0 = c0 + len(ctx.text)  # start of ``frame.after``
    context_span = built.span(tokenizer, c0, q0) if ctx.text else (0, 0)
    question_span = built.span(tokenizer, q0 + frame.question[0], q0 + frame.question[1])
    extra: dict[str, Any] = {}
    if marks_key:
        extra[marks_key] = [built.span(tokenizer, c0 + s, c0 + e) for s, e in ctx.marks]
    if depths_key:
        extra[depths_key] = ctx.depths
    return TaskSample(
        task=task,
        id=sample_id,
        prompt_ids=built.ids,
        answers=answers,
        context_tokens=len(built.ids),
        target_tokens=target,
        depth=depth,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else MAX_NEW_TOKENS.get(task, 32),
        question_span=question_span,
        meta={
            "scorer": SCORERS.get(task, "part"),
            "chat_template": frame.chat,
            "context_span": context_span,
            **extra,
            **ctx.meta,
            **meta,
        },
    )

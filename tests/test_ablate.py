"""``kvpolicy ablate``: capture, metrics, rows, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.cli import main
from kvpolicy.eval.ablate import REQUIRED_KEYS, ablation_rows, parse_length, selection_metrics, write_jsonl
from kvpolicy.eval.capture import capture_qkv
from kvpolicy.types import PageLayout, Selection


class _Tok:
    """Maps text to ids of the tiny random model's vocabulary (shape tests only)."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[ord(c) % 128 for c in text]])
        return type("Enc", (), {"input_ids": ids})()


def test_parse_length():
    assert parse_length("4k") == 4096 and parse_length("8K") == 8192 and parse_length("3000") == 3000
    assert parse_length("1m") == 1048576 and parse_length("0.5M") == 524288
    with pytest.raises(ValueError, match="number of tokens"):
        parse_length("long")


def test_capture_shapes_and_restores_attention(tiny_llama):
    ids = torch.randint(0, 128, (1, 40))
    before = tiny_llama.config._attn_implementation
    out = capture_qkv(tiny_llama, ids)
    assert sorted(out) == [0, 1, 2]
    assert out[1].q.shape == (1, 4, 40, 16) and out[1].k.shape == (1, 2, 40, 16) and out[1].v.shape == (1, 2, 40, 16)
    assert out[1].scaling == pytest.approx(16**-0.5)
    assert tiny_llama.config._attn_implementation == before


def test_metrics_of_selecting_everything_and_nothing():
    g = torch.Generator().manual_seed(0)
    B, H, G, L, D, S = 1, 2, 2, 80, 8, 16
    k, v, q = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g), torch.randn(B, H * G, D)
    n_sink, n_mid = 16, 48  # 3 pages of 16, then a 16-token window
    tids = torch.arange(n_mid).view(3, S).expand(B, H, 3, S)
    lay = PageLayout(page_ids=torch.arange(3).expand(B, H, 3), token_ids=tids, lengths=torch.full((B, H, 3), S),
                     num_pages=torch.full((B, H), 3), num_tokens=n_mid)
    every = selection_metrics(q, k, v, 1.0, n_sink, lay, Selection(page_ids=torch.arange(3).expand(B, H, 3)))
    assert every["rel_out_error"] < 1e-5 and every["mass_recall"] == pytest.approx(1.0)
    one = selection_metrics(q, k, v, 1.0, n_sink, lay, Selection(page_ids=torch.zeros(B, H, 1, dtype=torch.long)))
    assert 0 < one["mass_recall"] <= 1.0 and one["rel_out_error"] > 1e-3


def test_rows_exact_and_oracle(tiny_llama, tmp_path):
    kw = dict(budgets=[64], lengths=[300], n_queries=3, model_name="tiny", progress=False)
    rows = ablation_rows(tiny_llama, _Tok(), indexes=["exact", "dci_tree"], **kw)
    assert [r["index"] for r in rows] == ["exact", "dci_tree"]
    exact = rows[0]
    assert exact["recall_at_k"] == 1.0 and 0 < exact["mass_recall"] <= 1.0
    assert all(set(REQUIRED_KEYS) <= set(r) for r in rows) and len(exact["per_layer"]) == 3
    oracle = ablation_rows(tiny_llama, _Tok(), indexes=["exact"], selector="oracle", **kw)[0]
    assert oracle["mass_recall"] == pytest.approx(1.0, abs=1e-5)
    path = tmp_path / "out.jsonl"
    write_jsonl(rows, path)
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == ["exact", "dci_tree"]


def test_budget_larger_than_length_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="larger than the context"):
        ablation_rows(tiny_llama, _Tok(), indexes=["exact"], budgets=[512], lengths=[300], progress=False)


def test_cli_unknown_names_exit_2(capsys):
    assert main(["ablate", "--index", "exact,dci_tre"]) == 2
    assert "dci_tree" in capsys.readouterr().err
    assert main(["ablate", "--selector", "nope"]) == 2


@pytest.mark.slow
def test_smollm2_dci_tree_recall(tmp_path):
    """On real SmolLM2 keys and queries over essays (1k tokens, 4 layers), dci_tree finds the exact pages of its
    own layout: recall@k >= 0.95 declared (1.0 measured at 1k on layers 3, 10, 20)."""
    out = tmp_path / "a.jsonl"
    rc = main(["ablate", "--model", "smollm2-135m", "--index", "exact,dci_tree", "--budget", "128", "--length", "1k",
               "--queries", "4", "--layers", "3,10,20,27", "--json", str(out)])
    assert rc == 0
    rows = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["exact"]["recall_at_k"] == 1.0
    assert rows["dci_tree"]["recall_at_k"] >= 0.95
    assert rows["dci_tree"]["mass_recall"] > 0.5


def test_rows_for_several_selectors_and_variants(tiny_llama):
    rows = ablation_rows(tiny_llama, _Tok(), indexes=["exact"], selector=["quest", "arkvale:sphere", "snapkv"],
                         selector_args={"arkvale:sphere": {"digest": "sphere_max"}}, budgets=[64], lengths=[300],
                         n_queries=2, progress=False)
    assert [r["selector"] for r in rows] == ["quest", "arkvale:sphere", "snapkv"]
    assert rows[1]["policy"]["selector"] == {"name": "arkvale", "digest": "sphere_max"}
    assert rows[0]["selector_bytes_per_token"] > 0  # digests are reported
    with pytest.raises(ValueError, match="reuses another layer"):
        ablation_rows(tiny_llama, _Tok(), indexes=["exact"], selector="omnikv", budgets=[64], lengths=[300],
                      selector_args={"omnikv": {"filter_layers": (0,)}}, n_queries=2, layers=[2], progress=False)


def test_git_sha_can_be_named_by_the_environment(monkeypatch):
    from kvpolicy.eval.ablate import _git_sha

    monkeypatch.setenv("KVPOLICY_GIT_SHA", "abc1234")
    assert _git_sha() == "abc1234"
    monkeypatch.setenv("KVPOLICY_GIT_SHA", "  ")
    assert _git_sha() != "  "  # blank: read from git (or None outside a checkout)


def test_page_size_rule_and_policy_args_apply_to_the_grid(tiny_llama):
    rows = ablation_rows(tiny_llama, _Tok(), indexes=["dci_tree"], selector=["icecache", "icecache:mass"],
                         selector_args={"icecache:mass": {"gqa_merge": "max", "head_budget": "mass"}},
                         budgets=[64, 128], lengths=[300], n_queries=2, page_size="auto",
                         policy_args={"split_tokens": {64: [8, 8]}}, progress=False)
    pols = {(r["selector"], r["budget_tokens"]): r["policy"] for r in rows}
    assert pols[("icecache", 64)]["page_size"] == "auto" and pols[("icecache", 64)]["split_tokens"] == {64: [8, 8]}
    assert pols[("icecache:mass", 128)]["selector"]["head_budget"] == "mass"
    assert [r["k"] for r in rows if r["selector"] == "icecache"] == [12, 8]  # (64 - 16) / 4 and (128 - 64) / 8


def test_cli_page_size_and_policy_arg_are_parsed():
    from kvpolicy.cli import _policy_args, build_parser

    args = build_parser().parse_args(["ablate", "--page-size", "auto", "--policy-arg", "split_tokens={64: [8, 8]}"])
    assert args.page_size == "auto" and _policy_args(args.policy_arg) == {"split_tokens": {64: [8, 8]}}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "--page-size", "big"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _policy_args(["split_tokens"])

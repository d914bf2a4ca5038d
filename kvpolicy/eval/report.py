"""``kvpolicy report``: markdown tables and PNG plots from ``kvpolicy eval`` rows.

Rows are per (sample, policy, budget); a cell's score is the mean over its samples, ``n`` their count. Tables:
score per task x policy x budget (one table per length), the average over tasks with its 95% bootstrap interval
(``kvpolicy.eval.stats``: samples resampled within each task, fixed seed), and the average relative to ``full``
(the dense cache) of the same model and length; ``comparison_markdown`` pairs two policies sample by sample;
``split_markdown`` splits the gap from ``full`` to a policy with the oracles (budget, pages, search). Plots (with the intervals as error bars): accuracy vs
budget per policy (one panel per length), accuracy vs length per policy (at each budget), and, where rows carry ``per_layer_head`` fidelity
matrices (``kvpolicy eval --fidelity``), a heatmap per policy. Long-generation rows (``kvpolicy eval --task longgen``)
get a table of their means and, per (model, length, generated tokens, budget), one figure of top-1 agreement and KL
against the full cache over the generated position, one curve per policy (a 95% bootstrap band over samples
where there are several).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from kvpolicy.eval.stats import Interval, bootstrap_mean, chain_split, paired_comparison, row_score

__all__ = ["aggregate", "cell_interval", "common_tasks", "comparison_markdown", "markdown_report", "page_oracle",
           "plot_report", "split_markdown"]

FULL = "full"
TOKEN_ORACLE = "oracle-token"


def _budget_label(b: int | None) -> str:
    return "all" if b is None else str(b)


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[tuple, tuple[float, int]]:
    """(model, length, task, policy, budget) -> (mean score, samples)."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if "score" not in r:
            continue
        acc[(r["model"], r["length"], r["task"], r["policy"], r["budget_tokens"])].append(row_score(r))
    return {k: (mean(v), len(v)) for k, v in acc.items()}


def _samples(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[float]]:
    """(model, length, task, policy, budget) -> the scores of its samples."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if "score" in r:
            acc[(r["model"], r["length"], r["task"], r["policy"], r["budget_tokens"])].append(row_score(r))
    return acc


def cell_interval(samples: dict[tuple, list[float]], model, length, policy, budget,
                  tasks: Sequence[str] | None = None) -> Interval | None:
    """Mean over ``tasks`` (default: every task the cell scored) with its 95% bootstrap interval; None if empty."""
    per_task = {k[2]: v for k, v in samples.items()
                if k[0] == model and k[1] == length and k[3] == policy and k[4] == budget
                and (tasks is None or k[2] in tasks)}
    return bootstrap_mean(per_task) if per_task else None


def _ci(iv: Interval | None) -> str:
    if iv is None:
        return "-"
    return f"[{100 * iv.lo:.1f}, {100 * iv.hi:.1f}]" if iv.n > 1 else "n/a"


def common_tasks(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[tuple, list[str]]]:
    """Keep, per (model, length), only the tasks that every (policy, budget) cell scored, so averages and plot
    points compare the same tasks (a grid cut short otherwise leaves cells averaged over fewer tasks). Returns
    the kept rows and, per (model, length), the tasks dropped."""
    tasks: dict[tuple, set] = defaultdict(set)  # (model, length) -> every task seen
    per_cell: dict[tuple, set] = defaultdict(set)  # (model, length, policy, budget) -> tasks scored
    for r in rows:
        if "score" in r:
            tasks[(r["model"], r["length"])].add(r["task"])
            per_cell[(r["model"], r["length"], r["policy"], r["budget_tokens"])].add(r["task"])
    keep = {key: set.intersection(*[t for c, t in per_cell.items() if c[:2] == key]) for key in tasks}
    dropped = {key: sorted(tasks[key] - keep[key]) for key in tasks if tasks[key] - keep[key]}
    kept = [r for r in rows if "score" not in r or r["task"] in keep.get((r["model"], r["length"]), set())]
    return kept, dropped


def _policies(cells) -> list[str]:
    names = list(dict.fromkeys(k[3] for k in cells))
    return ([FULL] if FULL in names else []) + [n for n in names if n != FULL]


def markdown_report(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per (model, length) a task x (policy, budget) table with the average and the ratio to ``full``."""
    cells = aggregate(rows)
    samples = _samples(rows)
    if not cells:
        return "\n".join(["_no rows with a task score_\n", *_fidelity_markdown(rows), *_longgen_markdown(rows)])
    out: list[str] = []
    for model, length in sorted({(k[0], k[1]) for k in cells}, key=lambda x: (x[0], x[1])):
        mine = {k: v for k, v in cells.items() if k[0] == model and k[1] == length}
        tasks = list(dict.fromkeys(k[2] for k in mine))
        budgets = sorted({k[4] for k in mine if k[4] is not None})
        out.append(f"### {model}, {length} tokens\n")
        out.append("| policy | budget | " + " | ".join(tasks) + " | average | 95% CI | vs full | n |")
        out.append("| --- | ---: |" + " ---: |" * (len(tasks) + 4))
        full_avg = None
        fk = [mine.get((model, length, t, FULL, None)) for t in tasks]
        if all(fk):
            full_avg = mean(v[0] for v in fk)
        for pol in _policies(mine):
            for b in [None] if any(k[3] == pol and k[4] is None for k in mine) else budgets:
                vals = [mine.get((model, length, t, pol, b)) for t in tasks]
                if not any(vals):
                    continue
                scores = [f"{100 * v[0]:.1f}" if v else "-" for v in vals]
                have = [v[0] for v in vals if v]
                avg = mean(have)
                complete = all(vals)
                rel = f"{100 * avg / full_avg:.0f}%" if full_avg and complete else ("n/a" if complete else "-")
                n = min(v[1] for v in vals if v)
                ci = _ci(cell_interval(samples, model, length, pol, b, tasks))
                out.append(f"| {pol} | {_budget_label(b)} | " + " | ".join(scores)
                           + f" | {100 * avg:.1f}{'' if complete else '*'} | {ci} | {rel} | {n} |")
        out.append("")
    out.append("Scores are percentages (RULER string match); `n` is the smallest number of samples of a cell; "
               "`*` marks an average over fewer tasks than the table has. 95% CI: percentile bootstrap of the "
               "average (samples resampled within each task, 2,000 resamples, seed 0); n/a for one sample.\n")
    out += _fidelity_markdown(rows)
    out += _longgen_markdown(rows)
    return "\n".join(out)


def comparison_markdown(rows: Sequence[dict[str, Any]], a: str, b: str) -> str:
    """Markdown: ``a`` vs ``b`` per (model, length, budget) on the samples both scored (wins, ties, losses and
    the 95% bootstrap interval of the mean difference, in points). Raises ValueError for a policy absent."""
    res = paired_comparison(rows, a, b)
    out = [f"### Paired comparison: {a} vs {b}\n",
           "| model | length | budget | pairs | wins | ties | losses | mean difference | 95% CI |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (model, length, budget), p in res.items():
        out.append(f"| {model} | {length} | {_budget_label(budget)} | {p.pairs} | {p.wins} | {p.ties} | {p.losses} "
                   f"| {100 * p.diff.mean:+.1f} | [{100 * p.diff.lo:+.1f}, {100 * p.diff.hi:+.1f}] |")
    out.append(f"\nPairs are the same (task, sample) scored by both at that budget (a policy with only unlimited rows, "
               f"such as full, is paired with every budget); wins count samples where {a} scored higher. The "
               f"difference ({a} - {b}) is in points, averaged over tasks; its interval resamples the pairs within "
               f"each task. An interval that excludes 0 supports a difference.\n")
    return "\n".join(out)


def page_oracle(rows: Sequence[dict[str, Any]], policy: str, budget: int | None) -> str | None:
    """The page-level oracle whose pages match ``policy``'s at ``budget``: ``oracle-p{S}`` for its page size ``S``
    (``policy_config.page_size``, ``"auto"`` resolved at the budget), or ``oracle`` for 16-token pages when only
    that is in the rows; None if the rows hold neither."""
    from kvpolicy.policy import auto_page_size

    sizes = {r.get("policy_config", {}).get("page_size", 16) for r in rows
             if r.get("policy") == policy and r.get("budget_tokens") == budget and "score" in r}
    sizes = {auto_page_size(budget) if v == "auto" else int(v) for v in sizes}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    have = {r.get("policy") for r in rows if "score" in r}
    for name in (f"oracle-p{size}", *(["oracle"] if size == 16 else [])):
        if name in have:
            return name
    return None


def _iv(iv: Interval, signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    m = f.format(100 * iv.mean)
    if iv.n < 2:
        return f"{m} (n/a)"
    return f"{m} [{f.format(100 * iv.lo)}, {f.format(100 * iv.hi)}]"


def split_markdown(rows: Sequence[dict[str, Any]], policies: Sequence[str], *, full: str = FULL,
                   token: str = TOKEN_ORACLE) -> str:
    """Markdown: per (model, length, budget) and policy, the gap from ``full`` to the policy split along the chain
    full -> token oracle -> page oracle (``page_oracle``: the policy's page size) -> policy, on the samples all
    four scored. full - token oracle is what the budget itself costs (no selection of that many tokens does
    better), token - page oracle what pages cost, page oracle - policy what the policy's search misses (with the
    difference between its pages and positional ones). Raises ValueError when the rows lack a policy or an
    oracle."""
    out = ["### Loss split: budget, pages, search\n",
           "| model | length | budget | policy | page oracle | pairs | full | token oracle | page oracle | policy "
           "| budget: full - token | pages: token - page | search: page - policy | total: full - policy |",
           "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    found = []
    for pol in policies:
        budgets = sorted({r["budget_tokens"] for r in rows if r.get("policy") == pol and "score" in r
                          and r["budget_tokens"] is not None})
        if not budgets:
            present = ", ".join(dict.fromkeys(r["policy"] for r in rows if "score" in r)) or "none"
            raise ValueError(f"--split: policy {pol!r} has no scored rows at a limited budget; policies in the "
                             f"rows: {present}")
        for b in budgets:
            page = page_oracle(rows, pol, b)
            if page is None:
                raise ValueError(f"--split: no page-level oracle for {pol!r} at {b} tokens (run oracle-p4/p8/p16 "
                                 "at its page size, e.g. kvpolicy eval --policy oracle-p16)")
            for (model, length, budget), sp in chain_split(rows, [full, token, page, pol], budgets=[b]).items():
                found.append(((model, length, budget, pol), page, sp))
    for (model, length, budget, pol), page, sp in sorted(found, key=lambda x: (x[0][0], x[0][1], x[0][2],
                                                                                 policies.index(x[0][3]))):
        out.append(f"| {model} | {length} | {budget} | {pol} | {page} | {sp.pairs} | "
                   + " | ".join(f"{100 * iv.mean:.1f}" for iv in sp.scores) + " | "
                   + " | ".join(_iv(iv, True) for iv in (*sp.steps, sp.total)) + " |")
    out.append("\nScores (%) are means over the (task, sample) pairs that all four policies scored; each difference "
               "is in points with its 95% bootstrap interval (pairs resampled within each task, 2,000 resamples, "
               "seed 0). The three steps add up to the total. A negative step means the later policy scored higher "
               "on these samples: the page oracle ranks positional pages by attention mass, so a policy with other "
               "pages (IceCache's semantic ones) can beat it, and attention mass is not the task's objective. An "
               "interval that excludes 0 supports the step.\n")
    return "\n".join(out)


def _fidelity_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    fid = [r for r in rows if r.get("task") == "fidelity" and "mass_recall" in r]
    if not fid:
        return []
    out = ["### Attention fidelity and perplexity (essays)\n",
           "| model | length | policy | budget | page size | mass recall (own layout) | mass captured | output error "
           "| ppl | ppl / full |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in fid:
        cap = f"{r['mass_captured']:.3f}" if "mass_captured" in r else "-"
        out.append(f"| {r['model']} | {r['length']} | {r['policy']} | {_budget_label(r['budget_tokens'])} | "
                   f"{r.get('page_size', '-')} | {r['mass_recall']:.3f} | {cap} | {r['rel_out_error']:.3f} | "
                   f"{r['ppl']:.2f} | {r['ppl'] / r['ppl_full']:.3f} |")
    out.append("\nMeans over layers, KV heads and decode-position queries (dense layers count as exact); perplexity "
               "is teacher-forced over the tokens after the prompt. Mass recall is relative to the best pages of the "
               "policy's own layout, so it only compares policies of the same page size (token-level policies, page "
               "size 1, are ranked against the best single tokens); mass captured (share of the full attention mass "
               "on the attended tokens) and output error compare across page sizes.\n")
    return out


def _longgen_groups(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """(model, length, generated tokens, policy, budget) -> its long-generation rows (one per sample)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") == "longgen" and "agreement" in r:
            groups[(r["model"], r["length"], r["generated_tokens"], r["policy"], r["budget_tokens"])].append(r)
    return groups


def _distinct(rs: list[dict[str, Any]]) -> str:
    have = [r["reference_distinct_4grams"] for r in rs if "reference_distinct_4grams" in r]
    if not have:
        return "- |"
    return f"{mean(have):.2f}{'' if len(have) == len(rs) else f' ({len(have)} of {len(rs)})'} |"


def _longgen_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    groups = _longgen_groups(rows)
    if not groups:
        return []
    out = ["### Long generation: agreement with the full cache\n",
           "| model | length | generated | policy | budget | n | top-1 agreement | 95% CI | last quarter | KL | "
           "KL last quarter | distinct 4-grams |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != FULL, k[4] or 0, k[3]))
    for key in order:
        rs = groups[key]
        model, length, n_gen, pol, b = key
        iv = bootstrap_mean([r["agreement"] for r in rs])
        out.append(f"| {model} | {length} | {n_gen} | {pol} | {_budget_label(b)} | {len(rs)} | {100 * iv.mean:.1f} | "
                   f"{_ci(iv)} | {100 * mean(r['agreement_last_quarter'] for r in rs):.1f} | "
                   f"{mean(r['kl'] for r in rs):.4f} | {mean(r['kl_last_quarter'] for r in rs):.4f} | "
                   + _distinct(rs))
    out.append("\nTeacher forcing on the full cache's greedy continuation of an essay prompt: top-1 agreement (%) "
               "is how often the policy's greedy token is the full cache's, KL is KL(full || policy) of the next-token "
               "distributions in nats, both averaged over the generated positions (last quarter: the last 25% of "
               "them) and over samples. The first position comes from the dense prefill for every policy. Distinct 4-grams: "
               "the share of distinct token 4-grams in the full cache's continuation (low: the text loops, and the "
               "recent window alone predicts it).\n")
    return out


def _legend(axes) -> None:
    """One legend (in the last panel) naming every policy drawn in any panel."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    axes[-1].legend(list(seen.values()), list(seen), fontsize=7, loc="best")


def plot_report(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = aggregate(rows)
    samples = _samples(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for model in sorted({k[0] for k in cells}):
        mine = {k: v for k, v in cells.items() if k[0] == model}
        lengths = sorted({k[1] for k in mine})
        budgets = sorted({k[4] for k in mine if k[4] is not None})
        pols = _policies(mine)
        color = {pol: "k" if pol == FULL else plt.cm.tab20(i % 20) for i, pol in enumerate(pols)}  # one per policy

        def avg(length, pol, b, mine=mine, model=model) -> Interval | None:
            tasks = {k[2] for k in mine if k[1] == length}
            vals = [mine.get((model, length, t, pol, b)) for t in tasks]
            return cell_interval(samples, model, length, pol, b, sorted(tasks)) if vals and all(vals) else None

        dodge = {pol: 2 ** (0.03 * (i - (len(pols) - 1) / 2)) for i, pol in enumerate(pols)}

        def bars(pts, pol, dodge=dodge):  # x (spread a little per policy so bars do not overlap), y, error bars
            return ([p[0] * dodge[pol] for p in pts], [100 * p[1].mean for p in pts],
                    [[100 * (p[1].mean - p[1].lo) for p in pts], [100 * (p[1].hi - p[1].mean) for p in pts]])

        # accuracy vs budget, one panel per length
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.6), squeeze=False, sharey=True)
        for ax, length in zip(axes[0], lengths):
            for pol in pols:
                if pol == FULL or any(k[3] == pol and k[4] is None for k in mine):
                    y = avg(length, pol, None)
                    if y is not None:
                        ax.axhline(100 * y.mean, ls="--", lw=1, color=color[pol], label=f"{pol} (all)")
                        if y.hi > y.lo:
                            ax.axhspan(100 * y.lo, 100 * y.hi, color=color[pol], alpha=0.1, lw=0)
                    continue
                pts = [(b, avg(length, pol, b)) for b in budgets]
                pts = [(b, y) for b, y in pts if y is not None]
                if pts:
                    x, y, err = bars(pts, pol)
                    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=pol, color=color[pol])
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(f"{length} tokens")
            ax.set_xlabel("budget (tokens)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("average score (%)")
        _legend(axes[0])
        fig.suptitle(f"{model}: accuracy vs budget")
        fig.tight_layout()
        p = out_dir / f"{model}_accuracy_vs_budget.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

        if len(lengths) > 1:  # accuracy vs length, one panel per budget
            fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.6), squeeze=False, sharey=True)
            for ax, b in zip(axes[0], budgets):
                for pol in pols:
                    bb = None if pol == FULL or any(k[3] == pol and k[4] is None for k in mine) else b
                    pts = [(L, avg(L, pol, bb)) for L in lengths]
                    pts = [(L, y) for L, y in pts if y is not None]
                    if pts:
                        x, y, err = bars(pts, pol)
                        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=pol,
                                    ls="--" if bb is None else "-", color=color[pol])
                ax.set_xscale("log", base=2)
                ax.set_xticks(lengths, [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths])
                ax.set_title(f"budget {b}")
                ax.set_xlabel("context (tokens)")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("average score (%)")
            _legend(axes[0])
            fig.suptitle(f"{model}: accuracy vs context length")
            fig.tight_layout()
            p = out_dir / f"{model}_accuracy_vs_length.png"
            fig.savefig(p, dpi=120)
            plt.close(fig)
            written.append(p)
    written += _fidelity_heatmaps(rows, out_dir, plt)
    written += _longgen_plots(rows, out_dir, plt)
    return written


def _curve(rs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """Mean of the samples' curves per point, and its 95% bootstrap band (no width for one sample)."""
    pts = [bootstrap_mean([r[key][k] for r in rs]) for k in range(min(len(r[key]) for r in rs))]
    return [p.mean for p in pts], [p.lo for p in pts], [p.hi for p in pts]


def _longgen_plots(rows, out_dir: Path, plt) -> list[Path]:
    """One figure per (model, length, generated tokens, budget): top-1 agreement and KL against the full cache over
    the generated position, a curve per policy of that budget (policies with an unlimited budget dashed, ``full``
    left out: it is the reference)."""
    groups = _longgen_groups(rows)
    figures = sorted({(k[0], k[1], k[2], k[4]) for k in groups if k[4] is not None})
    written = []
    for model, length, n_gen, b in figures:
        mine = {k: v for k, v in groups.items() if k[:3] == (model, length, n_gen) and k[3] != FULL
                and k[4] in (b, None)}
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for i, ((*_, pol, pb), rs) in enumerate(sorted(mine.items(), key=lambda kv: kv[0][3])):
            width = rs[0]["curve_bin"]
            for ax, key, scale in ((top, "agreement_curve", 100), (bottom, "kl_curve", 1)):
                m, lo, hi = _curve(rs, key)
                x = [min(k * width + width / 2, (k * width + n_gen) / 2) for k in range(len(m))]  # bin centres
                style = dict(color=plt.cm.tab10(i % 10), ls="--" if pb is None else "-")
                ax.plot(x, [scale * v for v in m], label=pol + (" (all)" if pb is None else ""), **style)
                if len(rs) > 1:
                    ax.fill_between(x, [scale * v for v in lo], [scale * v for v in hi], alpha=0.15, lw=0,
                                    color=style["color"])
        n = max((len(v) for v in mine.values()), default=0)
        top.set_ylabel("top-1 agreement (%)")
        top.set_ylim(-2, 102)
        bottom.set_ylabel("KL(full || policy), nats")
        bottom.set_xlabel(f"generated position (bins of {next(iter(mine.values()))[0]['curve_bin'] if mine else 0})")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if mine:
            top.legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{model}: long generation, {length}-token prompt, budget {b} ({n} sample{'s' * (n != 1)})")
        fig.tight_layout()
        p = out_dir / f"{model}_longgen_{length}_{n_gen}_budget{b}.png".replace(":", "-").replace("/", "-")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


def _fidelity_heatmaps(rows, out_dir: Path, plt) -> list[Path]:
    """One heatmap per (model, policy, budget) of rows with ``per_layer_head`` mass recall [layers x heads]."""
    import numpy as np

    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if "per_layer_head" in r:
            groups[(r["model"], r["policy"], r["budget_tokens"], r.get("metric", "mass_recall"))].append(r)
    written = []
    for (model, pol, b, metric), rs in groups.items():
        mats = np.array([r["per_layer_head"] for r in rs], dtype=float)  # [n, layers, heads]
        m = mats.mean(0)
        fig, ax = plt.subplots(figsize=(1.0 + 0.5 * m.shape[1], 0.8 + 0.25 * m.shape[0]))
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1 if metric == "mass_recall" else None)
        layers = rs[0].get("layers", list(range(m.shape[0])))
        ax.set_yticks(range(m.shape[0]), [str(x) for x in layers])
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"{pol} @ {_budget_label(b)}: {metric}", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / f"{model}_{metric}_{pol}_{_budget_label(b)}.png".replace(":", "-").replace("/", "-")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written

"""A judge's figures on the probe set, recomputed from its recorded verdicts (the stage and the plugin
call the same function), and the plot beside them.

Every pair is judged in both orders. A verdict counts only when both orders pick the same
output (MT-Bench's conservative rule); otherwise the pair is a tie. Per pair kind and overall:

- ``consistency``: consistent pairs / pairs;
- ``position_bias``: verdicts choosing position A / verdicts (both orders; exact ties left out);
- ``agreement``: consistent verdicts for the objective winner / consistent verdicts (None when there
  are none); ``agreement_all``: the same / all pairs (objective kinds: code, tool calls, exact answers);
- ``length_preference``: consistent verdicts for the longer of two correct answers / consistent
  verdicts on the length probe (None when there are none);
- ``spearman``, ``kendall``: scipy's rank correlations (Kendall's tau-b, which handles the metric's
  ties) of pointwise scores with the objective metric over every graded output, and per source.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from kdtrain.errors import ArtifactError
from kdtrain.judge.base import PairwiseVerdict
from kdtrain.judge.probes import GRADED_SOURCES, OBJECTIVE_KINDS, PAIR_KINDS, ProbeSet


def _share(count: int, total: int) -> float | None:
    return count / total if total else None


def _chosen(probes: ProbeSet, pairwise: Sequence[Mapping]) -> dict[str, tuple[int | None, int | None, list[str | None]]]:
    """Per pair: the output chosen with output 0 in position A, with output 1 there, and the positions chosen."""
    verdicts = {(r["pair"], r["first"]): PairwiseVerdict(r["logprob_a"], r["logprob_b"]).choice for r in pairwise}
    found = {}
    for pair in probes.pairs:
        missing = [first for first in (0, 1) if (pair.id, first) not in verdicts]
        if missing:
            raise ArtifactError(f"judge report: expected a verdict on pair {pair.id} with output {missing[0]} in position A, found none")
        positions = [verdicts[(pair.id, 0)], verdicts[(pair.id, 1)]]
        outputs = [None if positions[0] is None else (0 if positions[0] == "A" else 1),
                   None if positions[1] is None else (1 if positions[1] == "A" else 0)]
        found[pair.id] = (*outputs, positions)
    return found


def _rates(pairs, chosen) -> dict:
    consistent = [p for p in pairs if chosen[p.id][0] is not None and chosen[p.id][0] == chosen[p.id][1]]
    positions = [pos for p in pairs for pos in chosen[p.id][2] if pos is not None]
    right = [p for p in consistent if p.better is not None and chosen[p.id][0] == p.better]
    objective = [p for p in pairs if p.better is not None]
    consistent_objective = [p for p in consistent if p.better is not None]
    length = [p for p in pairs if p.better is None]
    consistent_length = [p for p in consistent if p.better is None]
    longer = [p for p in consistent_length if chosen[p.id][0] == p.longer]
    return {
        "pairs": len(pairs), "consistent": len(consistent), "consistency": _share(len(consistent), len(pairs)),
        "verdicts": len(positions), "position_bias": _share(positions.count("A"), len(positions)),
        "objective_pairs": len(objective), "consistent_objective": len(consistent_objective),
        "agreement": _share(len(right), len(consistent_objective)), "agreement_all": _share(len(right), len(objective)),
        "length_pairs": len(length), "consistent_length": len(consistent_length),
        "length_preference": _share(len(longer), len(consistent_length)),
    }


def rank_correlation(scores: Sequence[float], metric: Sequence[float]) -> dict:
    """Spearman's rho and Kendall's tau-b with their p-values; None where undefined (constant input, < 3 points)."""
    from scipy.stats import kendalltau, spearmanr

    def finite(x) -> float | None:
        return None if x is None or x != x else round(float(x), 6)

    if len(scores) < 3:
        return {"n": len(scores), "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN: reported as undefined
        rho, tau = spearmanr(scores, metric), kendalltau(scores, metric)
    return {"n": len(scores), "spearman": finite(rho.statistic), "spearman_p": finite(rho.pvalue),
            "kendall": finite(tau.statistic), "kendall_p": finite(tau.pvalue)}


def judge_metrics(probes: ProbeSet, pairwise: Sequence[Mapping], pointwise: Sequence[Mapping]) -> dict:
    """``pairwise``: one record per pair and order (``pair``, ``first``: the output in position A, ``logprob_a``,
    ``logprob_b``); ``pointwise``: one per graded output (``item``, ``output``, ``score``)."""
    chosen = _chosen(probes, pairwise)
    kinds = {kind: _rates([p for p in probes.pairs if p.kind == kind], chosen) for kind in PAIR_KINDS}
    overall = _rates(list(probes.pairs), chosen)
    scores = {(r["item"], r["output"]): float(r["score"]) for r in pointwise}
    graded: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for item in probes.graded:
        for index, output in enumerate(item.outputs):
            if (item.id, index) not in scores:
                raise ArtifactError(f"judge report: expected a pointwise score of output {index} of {item.id}, found none")
            for key in (item.source, "all"):
                graded[key][0].append(scores[(item.id, index)])
                graded[key][1].append(output.metric)
    correlations = {key: rank_correlation(*graded[key]) for key in (*GRADED_SOURCES, "all") if key in graded}
    overall |= {"spearman": correlations.get("all", {}).get("spearman"), "kendall": correlations.get("all", {}).get("kendall"),
                "graded_outputs": correlations.get("all", {}).get("n", 0)}
    return {"overall": overall, "kinds": kinds, "graded": correlations}


def support(metrics: Mapping) -> dict[str, str]:
    """What each overall figure counts, for the items' messages."""
    o = metrics["overall"]
    return {"consistency": f"{o['pairs']} pairs", "position_bias": f"{o['verdicts']} verdicts",
            "agreement": f"{o['consistent_objective']} consistent verdicts of {o['objective_pairs']} {'/'.join(OBJECTIVE_KINDS)} pairs",
            "agreement_all": f"{o['objective_pairs']} {'/'.join(OBJECTIVE_KINDS)} pairs",
            "spearman": f"{o['graded_outputs']} graded outputs", "kendall": f"{o['graded_outputs']} graded outputs",
            "length_preference": f"{o['consistent_length']} consistent verdicts of {o['length_pairs']} length pairs"}


def plot_judges(probes: ProbeSet, results: Mapping[str, Mapping], path: Path) -> Path:
    """Per judge: consistency, agreement (all pairs) and the rate of choosing A per pair kind; pointwise
    score against the objective metric on the graded items."""
    import numpy as np

    from kdtrain.plots import pyplot, save_png

    fig, axes = pyplot().subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    for (name, result), (bars, scatter) in zip(results.items(), axes):
        kinds = result["metrics"]["kinds"]
        x = np.arange(len(PAIR_KINDS))
        shown = (("consistency", "consistency"), ("agreement_all", "agrees with objective winner"), ("position_bias", "chose position A"))
        for i, (key, label) in enumerate(shown):
            values = [kinds[k][key] if kinds[k][key] is not None else 0.0 for k in PAIR_KINDS]
            bars.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
        bars.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        bars.set_xticks(x, [f"{k}\n({kinds[k]['pairs']} pairs)" for k in PAIR_KINDS], fontsize=8)
        bars.set_ylim(0, 1.05)
        bars.set_title(f"judge {name}: verdicts in both orders per pair kind", fontsize=10)
        bars.legend(fontsize=7)
        scores = {(r["item"], r["output"]): r["score"] for r in result["pointwise"]}
        for source, marker in zip(GRADED_SOURCES, "os"):
            points = [(o.metric, scores[(g.id, i)]) for g in probes.graded if g.source == source for i, o in enumerate(g.outputs)]
            if points:
                metric, score = np.array(points).T
                scatter.scatter(metric + rng.uniform(-0.02, 0.02, len(metric)), score, marker=marker, alpha=0.7, label=source)
        corr = result["metrics"]["graded"].get("all", {})
        scatter.set_xlabel("objective metric (fraction of tests passed / required arguments given)")
        scatter.set_ylabel('pointwise score P("Yes")')
        shown = {k: "undefined" if corr.get(k) is None else f"{corr[k]:.2f}" for k in ("spearman", "kendall")}
        scatter.set_title(f"Spearman {shown['spearman']}, Kendall {shown['kendall']} (n={corr.get('n')})", fontsize=10)
        scatter.legend(fontsize=7)
    return save_png(fig, Path(path))

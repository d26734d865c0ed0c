"""The zoo's table: ``benchmarks/results/zoo.json`` (every cell) and ``docs/zoo.md`` (a summary,
the misses with their likely causes, every cell and the models)."""

from __future__ import annotations

import math
from collections import Counter

from benchmarks.zoo.registry import REGISTRY

VERDICTS = ("ok", "miss (warned)", "SILENT MISS", "unscored")


def _f(v, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt) if math.isfinite(v) else str(v)


def _gap(c: dict) -> str:
    """The verdict's gap; a held-out one (``heldout``) with the fixed-noise gap beside it."""
    if c.get("fixed_gap") is None:
        return _f(c.get("gap"))
    return f"{_f(c.get('gap'))} held-out ({_f(c['fixed_gap'])} fixed)"


def cause(c: dict) -> str:
    """A one-line likely cause of a miss, read off the cell's record."""
    if c.get("error"):
        return c["error"].split(". ")[0][:160]
    if c.get("assess_error") == "non-finite parameters":
        return "the averaged parameters are not finite"
    entry = REGISTRY.get(c["model"])
    local = entry is not None and entry.kind in ("mixture", "BNN")
    if c.get("converged"):
        why = (
            "; a local optimum of the multimodal ELBO (the start decides the basin)"
            if local
            else ""
        )
        return f"reported converged at step {c['steps']} while {_f(c['gap'])} nat off{why}"
    said = "; ".join(c.get("warnings") or [])
    if said:  # the engine's own reading: the warning's first sentence after its category
        said = said.split(": ", 1)[-1].split(". ")[0][:140]
        return f"ran {c['steps']} steps ({c['rejected']} rejected), {_f(c['gap'])} nat off: {said}"
    return (
        f"ran {c['steps']} steps ({c['rejected']} rejected), ended {_f(c['gap'])} nat off, "
        "converged=False but no warning"
    )


def summary(cells: list[dict]) -> dict:
    counts = Counter(c["verdict"] for c in cells)
    return {"cells": len(cells), **{v: counts.get(v, 0) for v in VERDICTS}}


def markdown(cells: list[dict], meta: dict, refs: dict, optima: dict) -> str:
    s = summary(cells)
    scored = s["cells"] - s["unscored"]
    lines = [
        "# The model zoo: every default fit, judged",
        "",
        "Written by `python benchmarks/zoo.py` (do not edit by hand). Each of the zoo's models "
        "(`benchmarks/zoo/`) is fitted with every ngvi guide that applies, with "
        "`ngvi.NGVI(model, Guide(model)).run(key, num_steps, *args, **kwargs)` and nothing else, "
        "in float32 and float64, and judged in float64 against its family optimum (a fixed-noise "
        "ELBO maximised by L-BFGS, `benchmarks/zoo/optima.json`) and a NUTS reference "
        "(`benchmarks/zoo/references.json`).",
        "",
        "Regenerate: `python benchmarks/zoo/make_references.py` (NUTS, float64, about an hour on "
        "two busy cores), `python benchmarks/zoo/make_optima.py` (L-BFGS family optima), then "
        "`python benchmarks/zoo.py` (this table; `--quick` for a 7-model subset at 300 steps, "
        "`--only NAME`, `--guides`, `--dtypes`, `--steps`, `--resume`, `--table-only`).",
        "",
        f"- run: {meta.get('date', '')}, {meta.get('platform', '')}, jax {meta.get('jax', '')}, "
        f"ngvi at `{meta.get('commit', '')}`; num_steps = {meta.get('num_steps')}"
        + (f"; note: {meta['note']}" if meta.get("note") else ""),
        f"- **{s['ok']} of {scored} scored cells ok** (within 0.1 nat of the family optimum), "
        f"{s['miss (warned)']} missed with a warning or error, **{s['SILENT MISS']} silent "
        f"misses**, {s['unscored']} unscored (no family optimum).",
        "",
        "Verdict: `ok` = gap <= 0.1 nat; `miss (warned)` = gap > 0.1 nat, converged=False and a "
        "warning or FitError; `SILENT MISS` = gap > 0.1 nat with converged=True or no warning. "
        "gap: family optimum minus the fit's ELBO on the same fixed noise (nats; K-FAC: against "
        "the mean-field optimum, its family has no computed optimum); the family optimum is the "
        "better of L-BFGS's and the best cell of that family (Models table: where a fit beat "
        "L-BFGS). A gap from 0.1 to 1 nat against an L-BFGS optimum is rechecked on five other "
        "draw sets (`benchmarks/zoo/heldout.py`: the optimum was fit to the fixed draws and "
        "overfits them), and the held-out mean gap decides. mean err: max over latent "
        "coordinates of |E_q - E_NUTS| / sd_NUTS (constrained space; '-' where the NUTS run is "
        "flagged). k-hat: PSIS (Yao et al. 2018). seconds include set-up and compilation.",
        "",
        "## Misses",
        "",
        "| model | guide | dtype | verdict | gap | likely cause |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        if c["verdict"] in ("miss (warned)", "SILENT MISS"):
            lines.append(
                f"| {c['model']} | {c['guide']} | {c['dtype']} | {c['verdict']} | "
                f"{_gap(c)} | {cause(c)} |"
            )
    lines += [
        "",
        "## Every cell",
        "",
        "| model | guide | dtype | verdict | converged | steps | rejected | seconds | gap "
        "| mean err (sd) | k-hat | warnings / error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        said = "; ".join(c.get("warnings") or []) or (c.get("error") or "")
        lines.append(
            f"| {c['model']} | {c['guide']} | {c['dtype']} | {c['verdict']} | "
            f"{c.get('converged')} | {c.get('steps')} | {c.get('rejected')} | "
            f"{_f(c.get('seconds'), '.1f')} | {_gap(c)} | {_f(c.get('mean_error'))} | "
            f"{_f(c.get('khat'), '.2f')} | {said[:120]} |"
        )
    lines += ["", "## Models", "", _models_table(refs, optima), ""]
    return "\n".join(lines)


def _models_table(refs: dict, optima: dict) -> str:
    rows = [
        "| model | kind | d | guides | NUTS s | NUTS reference | MF optimum mean err (sd) "
        "| references beaten by a fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in REGISTRY.items():
        r = refs.get(name, {})
        nuts = r.get("nuts", {})
        status = "missing" if not r else ("ok" if r["reliable"] else "; ".join(r["flags"]))
        if r.get("source", "nuts") != "nuts":
            status = f"{r['source']} ({status})"
        err = optima.get(name, {}).get("meanfield", {}).get("mean_error")
        beaten = [
            f"{f} by {v['beaten_by']} ({v['elbo'] - v['lbfgs_elbo']:.3g} nat)"
            for f, v in optima.get(name, {}).items()
            if isinstance(v, dict) and "beaten_by" in v
        ]
        rows.append(
            f"| {name} | {e.kind} | {e.dim} | {', '.join(e.guides)} | "
            f"{_f(nuts.get('seconds'), '.0f')} | {status} | {_f(err)} | {'; '.join(beaten)} |"
        )
    return "\n".join(rows)

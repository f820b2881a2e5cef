"""The progress plot: validation bits-per-byte over experiments, as in the original analysis.

    autoresearch report                      # writes <lab>/progress.png
    from autoresearch_kit.plots import progress_plot, save_progress
    save_progress("lab/results.tsv", "lab/progress.png")
    fig = progress_plot(lab.history())       # the notebook panel reuses the same figure

What is drawn (the original autoresearch `analysis.ipynb` is the reference):

- kept experiments as green dots, each labelled with its description;
- the running best of the kept line as a green step line;
- discarded experiments as faint grey dots; undecided ones as hollow grey circles;
- failed runs (crash, timeout, diverged, invalid, aborted) as red crosses pinned to the
  top edge of the axes, since they have no val_bpb to place them by.

Accepts the ledger's history DataFrame or a results.tsv (path or DataFrame with the
original's columns `commit val_bpb memory_gb status description`). matplotlib is
imported where used, with the Agg backend when no display is available.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

FAILED = ("crash", "timeout", "diverged", "invalid", "aborted")
_GREEN, _DARK_GREEN, _GREY, _RED = "#2ecc71", "#1a7a3a", "#b0b0b0", "#d62728"


def _pyplot():
    """matplotlib.pyplot, switched to Agg first when there is no display (CLI, CI, ssh)."""
    import matplotlib

    headless = os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
    in_kernel = "inline" in str(matplotlib.get_backend()).lower() or "ipykernel" in str(matplotlib.get_backend())
    if headless and not in_kernel:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_results(data: Any):
    """Normalise experiment records into a DataFrame with columns
    `label, val_bpb, outcome, description`, one row per run, in run order.

    `outcome` is one of keep, discard, pending (ran ok, undecided) or crash (any failed
    run). Rejected proposals (never run) are dropped: they have no point to plot; so are
    the noise and confirmation reruns of ledger records (kind `noise` / `rerun`), which
    repeat an experiment rather than try a new one.

    Parameters
    ----------
    data : str, Path, pandas.DataFrame or list of dict
        A results.tsv path, the ledger's history DataFrame / records, or a results.tsv
        DataFrame.

    Returns
    -------
    pandas.DataFrame
    """
    import pandas as pd

    if isinstance(data, (str, Path)):
        df = pd.read_csv(data, sep="\t", dtype={"commit": str})
    elif isinstance(data, pd.DataFrame):
        df = data.copy()
    else:
        df = pd.DataFrame(list(data))
    if df.empty:
        return pd.DataFrame(columns=["label", "val_bpb", "outcome", "description"])

    df = df.reset_index(drop=True)
    status = df["status"].astype(str).str.strip().str.lower() if "status" in df else pd.Series("ok", index=df.index)
    decision = (df["decision"].astype(object).where(df["decision"].notna(), "").astype(str).str.lower()
                if "decision" in df else pd.Series("", index=df.index))
    repeat = (df["kind"].astype(str).isin(["noise", "rerun", "calibration"]) if "kind" in df
              else pd.Series(False, index=df.index))
    df = df[~status.isin(["rejected", "running"]) & ~repeat].copy()
    status, decision = status[df.index], decision[df.index]

    def outcome(s: str, d: str) -> str:
        if s in FAILED:
            return "crash"
        if s in ("keep", "discard", "crash"):   # results.tsv statuses
            return s
        return d if d in ("keep", "discard") else "pending"

    out = pd.DataFrame({
        "label": (df["id"] if "id" in df else df["exp_id"] if "exp_id" in df else df["commit"] if "commit" in df else pd.Series(df.index, index=df.index)).astype(str),
        "val_bpb": pd.to_numeric(df.get("val_bpb"), errors="coerce"),
        "outcome": [outcome(s, d) for s, d in zip(status, decision)],
        "description": df["description"].fillna("").astype(str) if "description" in df else "",
    })
    # results.tsv writes 0.0 for crashes (as the original does): not a real score
    out.loc[out["outcome"] == "crash", "val_bpb"] = float("nan")
    return out.reset_index(drop=True)


def progress_plot(data: Any, ax=None, *, title: str | None = None, max_label: int = 45):
    """Draw val_bpb over experiments: kept (labelled), running best, discarded, crashes.

    Parameters
    ----------
    data : path, DataFrame or records
        See `load_results`.
    ax : matplotlib Axes, optional
        Draw into this axes (the panel passes its own); a new figure otherwise.
    title : str, optional
        Defaults to "autoresearch progress: N experiments, K kept".
    max_label : int
        Descriptions longer than this are shortened with "...".

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = load_results(data)
    plt = _pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(12, 6))
    else:
        fig = ax.figure
    x = range(len(df))
    ok = df[df["val_bpb"].notna()]
    kept = ok[ok["outcome"] == "keep"]
    disc = ok[ok["outcome"] == "discard"]
    pend = ok[ok["outcome"] == "pending"]
    crash = df[df["outcome"] == "crash"]

    if len(disc):
        ax.scatter(disc.index, disc["val_bpb"], c=_GREY, s=14, alpha=0.7, zorder=2, label="discarded")
    if len(pend):
        ax.scatter(pend.index, pend["val_bpb"], facecolors="none", edgecolors=_GREY, s=30, zorder=2,
                   label="undecided")
    if len(kept):
        ax.scatter(kept.index, kept["val_bpb"], c=_GREEN, s=50, zorder=4, edgecolors="black",
                   linewidths=0.5, label="kept")
        # the running best of the kept line, carried to the last experiment
        best = kept["val_bpb"].cummin()
        xs = list(kept.index) + [len(df) - 1]
        ys = list(best) + [best.iloc[-1]]
        ax.step(xs, ys, where="post", color=_DARK_GREEN, linewidth=2, alpha=0.7, zorder=3, label="running best")
        for i, row in kept.iterrows():
            text = row["description"].strip() or row["label"]
            if len(text) > max_label:
                text = text[: max_label - 3] + "..."
            ax.annotate(text, (i, row["val_bpb"]), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        color=_DARK_GREEN, rotation=30, ha="left", va="bottom")

    # y-range from the scored runs; failed runs sit on the top edge (no score to place them)
    if len(ok):
        lo, hi = float(ok["val_bpb"].min()), float(ok["val_bpb"].max())
        pad = (hi - lo) * 0.12 or max(abs(hi) * 0.01, 1e-3)
        ax.set_ylim(lo - pad, hi + pad * (2.5 if len(crash) else 1))
    if len(crash):
        top = ax.get_ylim()[1]
        ax.scatter(crash.index, [top] * len(crash), marker="x", c=_RED, s=40, zorder=5, clip_on=False,
                   label="failed or aborted (no score)")
    n_kept = int((df["outcome"] == "keep").sum())
    ax.set_title(title or f"autoresearch progress: {len(df)} experiments, {n_kept} kept")
    # ledger ids ("0003") read as they are; results.tsv only has commits, so say so
    by_commit = len(df) and not df["label"].str.fullmatch(r"\d+").all()
    ax.set_xlabel("experiment (commit)" if by_commit else "experiment")
    ax.set_ylabel("validation bits per byte (lower is better)")
    if len(df):
        ax.set_xlim(-0.5, max(len(df) - 0.5, 1))
        # integer ticks labelled with experiment ids where there are few enough to read
        if len(df) <= 25:
            ax.set_xticks(list(x))
            ax.set_xticklabels(df["label"], rotation=90 if len(df) > 12 else 0, fontsize=8)
    ax.grid(True, alpha=0.2)
    handles, names = ax.get_legend_handles_labels()
    if handles and own:
        # below the axes, in a band of its own: labels rise up and to the right of their points,
        # so inside the axes (upper right, as before) the last one ran into the legend
        fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        if handles:
            ax.legend(loc="best", fontsize=9)
        fig.tight_layout()
    return fig


def save_progress(data: Any, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write the progress plot to `path` (PNG) and return the path."""
    fig = progress_plot(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def summary(data: Any) -> dict:
    """Counts and the best score: {experiments, kept, discarded, failed, baseline, best, best_label}."""
    df = load_results(data)
    kept = df[(df["outcome"] == "keep") & df["val_bpb"].notna()]
    best = kept.loc[kept["val_bpb"].idxmin()] if len(kept) else None
    first = df["val_bpb"].dropna()
    return {
        "experiments": len(df),
        "kept": int((df["outcome"] == "keep").sum()),
        "discarded": int((df["outcome"] == "discard").sum()),
        "failed": int((df["outcome"] == "crash").sum()),
        "baseline": float(first.iloc[0]) if len(first) else math.nan,
        "best": float(best["val_bpb"]) if best is not None else math.nan,
        "best_label": str(best["label"]) if best is not None else "",
    }

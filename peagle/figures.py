"""Paper Figures 3 and 4, drawn from the package's own mask and partition functions.

* Fig. 3 -- the cross-depth mask over the whole (position, depth) grid, for a short and a long
  sequence side by side. Ordered position-major (element ``(a, d)`` at index ``a*K + d``), the
  short sequence's mask is exactly the top-left block of the long one's: the rule depends only
  on relative positions, which is why one precomputed mask serves every length (§3.1). Both
  masks come from :class:`peagle.masks.AmortizedMask` and are checked against
  :func:`peagle.masks.reference_mask` and against each other before anything is drawn.
* Fig. 4 -- sequence partitioning (§3.2): the elements of a COD sample on a positions x depths
  grid, coloured by the segment :func:`peagle.partition.segment_of` assigns them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from peagle.cod import Layout, cod_sample  # noqa: E402
from peagle.config import Config  # noqa: E402
from peagle.masks import AmortizedMask, reference_mask  # noqa: E402

# Sizes of the drawn examples (readability, not results).
FIG3_SHORT, FIG3_LONG, FIG3_K = 5, 10, 4
FIG4_ROWS, FIG4_K, FIG4_RETENTION, FIG4_SEED = 32, 5, 0.8, 0


def position_major_grid(n: int, k: int) -> Layout:
    """Every (anchor, depth) cell of an n x k grid, element ``a*k + d`` = (a, d): [n*k] each."""
    anchor = torch.arange(n).repeat_interleave(k)
    depth = torch.arange(k).repeat(n)
    return Layout(anchor, depth, torch.zeros(n * k, dtype=torch.int64))


def mask_classes(layout: Layout, mask: torch.Tensor) -> np.ndarray:
    """0 = blocked, 1 = context key (depth 0), 2 = own-chain key (depth >= 1): int [L, L]."""
    key_depth0 = (layout.depth == 0)[None, :]
    cls = torch.zeros(mask.shape, dtype=torch.int64)
    cls[mask & key_depth0] = 1
    cls[mask & ~key_depth0] = 2
    return cls.numpy()


def fig3_masks(n_short: int = FIG3_SHORT, n_long: int = FIG3_LONG, k: int = FIG3_K):
    """(short layout, short mask, long layout, long mask), verified position-invariant."""
    # One precomputed grid serves both lengths; cells (a, d) of the whole grid reach position
    # n_long - 1 + k - 1.
    amort = AmortizedMask(n_long + k - 1, k)
    short_lay, long_lay = position_major_grid(n_short, k), position_major_grid(n_long, k)
    short, long = amort.get(short_lay), amort.get(long_lay)
    assert torch.equal(short, reference_mask(short_lay)) and torch.equal(long, reference_mask(long_lay))
    m = n_short * k
    # Position invariance: the short sequence's mask is the long one's top-left block.
    assert torch.equal(long[:m, :m], short), "short mask != top-left block of the long mask"
    return short_lay, short, long_lay, long


def _grid_ticks(ax, n: int, k: int) -> None:
    """Tick every anchor (k elements each), with light lines between anchors."""
    centers = [a * k + k / 2 for a in range(n)]
    ax.set_xticks(centers, [str(a) for a in range(n)], rotation=0)
    ax.set_yticks(centers, [str(a) for a in range(n)], rotation=0)
    for a in range(1, n):
        ax.axhline(a * k, color="0.85", lw=0.5)
        ax.axvline(a * k, color="0.85", lw=0.5)


def plot_fig3(out_base: Path) -> list[Path]:
    short_lay, short, long_lay, long = fig3_masks()
    k = FIG3_K
    cmap = ListedColormap(["#ffffff", "#3b6ea8", "#e08a2c"])
    sns.set_theme(style="white", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2))
    size = FIG3_LONG * k
    for ax, lay, m, n, title in ((axes[0], short_lay, short, FIG3_SHORT, f"short sequence: {FIG3_SHORT} anchors"),
                                 (axes[1], long_lay, long, FIG3_LONG, f"long sequence: {FIG3_LONG} anchors")):
        sns.heatmap(mask_classes(lay, m), ax=ax, cmap=cmap, vmin=0, vmax=2, cbar=False, square=True,
                    linewidths=0, xticklabels=False, yticklabels=False)
        # Same scale in both panels: the short mask occupies the top-left corner of the long extent.
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.set_aspect("equal")
        _grid_ticks(ax, n, k)
        ax.set_title(f"{title} x K = {k} depths")
        ax.set_xlabel("key anchor a (each spans depths 0..K-1)")
        ax.set_ylabel("query anchor a (each spans depths 0..K-1)")
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(True)
    s = FIG3_SHORT * k
    axes[0].add_patch(Rectangle((s, 0), size - s, size, color="0.92", lw=0))
    axes[0].add_patch(Rectangle((0, s), s, size - s, color="0.92", lw=0))
    axes[0].text(size * 0.75, size * 0.75, "not part of\nthe short sequence", ha="center", va="center", color="0.4")
    axes[1].add_patch(Rectangle((0, 0), s, s, fill=False, ec="crimson", lw=2, ls="--"))
    axes[1].text(s + 0.7, 1.0, "top-left block =\nthe short mask\n(position invariance)", color="crimson",
                 fontsize=9, va="top")
    fig.legend(handles=[Patch(color="#3b6ea8", label="context key: depth 0, key anchor <= query anchor"),
                        Patch(color="#e08a2c", label="own chain: same anchor, key depth <= query depth"),
                        Patch(facecolor="#ffffff", edgecolor="0.5", label="blocked")],
               loc="lower center", ncol=3, frameon=False)
    fig.suptitle("Cross-depth attention mask over the (anchor, depth) grid, element (a, d) at a*K + d; "
                 "one precomputed mask serves every length", y=0.98)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _save(fig, out_base)


def _segment_of(layout: Layout, n: int, partitions: int) -> torch.Tensor:
    # The package's own segment assignment (peagle.partition, paper Algorithm 1).
    from peagle.partition import segment_of

    return segment_of(layout, n, partitions)


def fig4_grid(n: int = FIG4_ROWS, k: int = FIG4_K, partitions: int = 4, retention: float = FIG4_RETENTION,
              seed: int = FIG4_SEED) -> tuple[np.ndarray, Layout, torch.Tensor]:
    """Segment per (depth, position) cell of one COD sample: float [k, n], NaN = no element."""
    layout = cod_sample(n, k, retention, generator=torch.Generator().manual_seed(seed))
    seg = _segment_of(layout, n, partitions)
    grid = np.full((k, n), np.nan)
    pos = (layout.anchor + layout.depth).numpy()
    grid[layout.depth.numpy(), pos] = seg.numpy()
    # A chain never changes segment above depth 1 (Algorithm 1's inheritance).
    for a, d, s in zip(layout.anchor.tolist(), layout.depth.tolist(), seg.tolist()):
        if d >= 2:
            assert grid[1, a + 1] == s
    return grid, layout, seg


def plot_fig4(out_base: Path, partitions: int) -> list[Path]:
    n, k = FIG4_ROWS, FIG4_K
    grid, layout, seg = fig4_grid(n, k, partitions)
    colors = sns.color_palette("Set2", partitions)
    sns.set_theme(style="white", context="paper")
    fig, ax = plt.subplots(figsize=(12, 3.6))
    sns.heatmap(grid, ax=ax, cmap=ListedColormap(colors), vmin=-0.5, vmax=partitions - 0.5, cbar=False,
                linewidths=0.6, linecolor="white", mask=np.isnan(grid), annot=False)
    ax.set_facecolor("0.93")  # dropped by COD
    # Chains: depth-1 element of anchor a sits at position a+1, deeper ones continue diagonally.
    for a in torch.unique(layout.anchor[layout.depth >= 1]).tolist():
        dmax = int(layout.depth[layout.anchor == a].max())
        ax.plot([a + 0.5 + d for d in range(dmax + 1)], [d + 0.5 for d in range(dmax + 1)],
                color="0.25", lw=0.6, alpha=0.6)
    bounds = [int(np.ceil(s * n / partitions)) for s in range(1, partitions)]
    for b in bounds:
        ax.axvline(b, color="0.2", lw=1.2, ls="--")
    ax.set_xticks(np.arange(n) + 0.5, [str(p) for p in range(n)], fontsize=7)
    ax.set_yticks(np.arange(k) + 0.5, [str(d) for d in range(k)], rotation=0)
    ax.set_xlabel("position (anchor + depth)")
    ax.set_ylabel("depth")
    ax.set_title(f"Sequence partitioning, S = {partitions}: COD sample of {n} rows, K = {k}, r = {FIG4_RETENTION}; "
                 "grey = dropped by COD, lines = chains")
    ax.legend(handles=[Patch(color=colors[s], label=f"segment {s}") for s in range(partitions)],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, out_base)


def _save(fig, out_base: Path) -> list[Path]:
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_base.with_suffix(f".{ext}")
        tmp = path.with_name(path.stem + ".tmp." + ext)  # keeps the format inferable
        fig.savefig(tmp, dpi=200, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def write_figures(cfg: Config, out_dir: str | Path) -> list[Path]:
    """Write fig3_mask.{png,pdf} and fig4_partition.{png,pdf} into ``out_dir``."""
    out = Path(out_dir)
    return plot_fig3(out / "fig3_mask") + plot_fig4(out / "fig4_partition", cfg.scaling.fig4_segments)


# --------------------------------------------------------------------------- Figure 1

FIG1_STATS = ("n", "mean", "median", "p90", "p99", "max")


def read_sequence_lengths(responses: str | Path) -> np.ndarray:
    """Prompt + response length of every regenerated training sequence, in target tokens: int64 [N].

    ``responses`` is the respond stage's JSONL (``{"id", "prompt_ids", "response_ids"}`` per line);
    a line without both id lists is an error naming the file and line.
    """
    import json

    lengths = []
    with open(responses) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                lengths.append(len(rec["prompt_ids"]) + len(rec["response_ids"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{responses}:{i}: not a responses record with prompt_ids and response_ids "
                                 f"({type(err).__name__}: {err})") from None
    if not lengths:
        raise ValueError(f"{responses}: no sequences")
    return np.asarray(lengths, dtype=np.int64)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """n, mean, median, p90, p99, max of ``lengths`` (percentiles: numpy's linear interpolation)."""
    x = np.asarray(lengths, dtype=np.float64)
    med, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(med), "p90": float(p90),
            "p99": float(p99), "max": float(x.max())}


def plot_fig1(responses: str | Path, out_base: str | Path, label: str | None = None,
              contexts: list[int] | tuple[int, ...] = ()) -> list[Path]:
    """Figure 1: histogram of prompt + response lengths with median, P90 and P99 marked.

    Writes ``out_base``.png/.pdf and ``out_base``.csv (one row: label, responses file, then
    :data:`FIG1_STATS`, then ``share_over_<c>`` = fraction of sequences longer than each training
    context ``c`` in ``contexts``, which are also drawn as dotted lines). Returns the three paths.
    """
    import pandas as pd

    from peagle.io import atomic_path, atomic_write_text

    out_base = Path(out_base)
    lengths = read_sequence_lengths(responses)
    stats = length_stats(lengths)
    row = {"target": label or "", "responses": str(responses), **stats,
           **{f"share_over_{c}": float((lengths > c).mean()) for c in contexts}}

    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bins = min(60, max(10, int(np.sqrt(lengths.size))))
    ax.hist(lengths, bins=bins, color="#8fb3d9", edgecolor="white")
    for key, name, color, ls in (("median", "median", "#1b4f8a", "-"), ("p90", "P90", "#e08a2c", "--"),
                                 ("p99", "P99", "crimson", ":")):
        ax.axvline(stats[key], color=color, ls=ls, lw=1.8, label=f"{name} = {stats[key]:.0f}")
    for c in contexts:
        ax.axvline(c, color="0.45", ls=(0, (1, 3)), lw=1)
        ax.text(c, ax.get_ylim()[1] * 0.97, f" ctx {c}", rotation=90, va="top", ha="right", fontsize=7, color="0.35")
    ax.set_xlabel("prompt + response length (target tokens)")
    ax.set_ylabel("sequences")
    ax.set_title(f"Regenerated training data{f' of {label}' if label else ''}: {stats['n']} sequences, "
                 f"mean {stats['mean']:.0f}, max {stats['max']:.0f}")
    ax.legend(frameon=False)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        path = out_base.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:  # temp name has no extension: give the format explicitly
            fig.savefig(tmp, format=ext, dpi=200, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    csv_path = out_base.with_suffix(".csv")
    atomic_write_text(csv_path, pd.DataFrame([row]).to_csv(index=False))
    return paths + [csv_path]


# --------------------------------------------------------------------------- Figure B


def plot_fig_alpha(run_dirs: list[str | Path], out_base: str | Path, paper_final: float | None = None) -> list[Path]:
    """Figure B: the regularized design's learnable scale ``ntp_alpha`` over optimizer steps.

    ``run_dirs``: training runs of ``drafter.hidden_variant: regularized_ntp`` (one per seed), read
    from their ``metrics.jsonl``. Writes ``out_base``.png/.pdf and ``out_base``.csv (run, step,
    ntp_alpha); ``paper_final``: the paper's end value, drawn as a dotted line. Returns the paths.
    """
    import json

    import pandas as pd

    from peagle.drafters import ALPHA_INIT
    from peagle.io import atomic_write_text

    out_base = Path(out_base)
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; re-run the train rule for this run")
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not metrics or "ntp_alpha" not in metrics[0]:
            raise ValueError(f"{path}: no ntp_alpha in the metrics; Figure B needs a drafter.hidden_variant: "
                             "regularized_ntp run")
        rows += [{"run": Path(d).name, "step": 0, "ntp_alpha": ALPHA_INIT}]
        rows += [{"run": Path(d).name, "step": m["step"], "ntp_alpha": m["ntp_alpha"]} for m in metrics]
    df = pd.DataFrame(rows)
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for run, part in df.groupby("run", sort=False):
        ax.plot(part["step"], part["ntp_alpha"], lw=1.6, label=f"{run}: {part['ntp_alpha'].iloc[-1]:.3f} at the end")
    if paper_final is not None:
        ax.axhline(paper_final, color="0.4", ls=":", lw=1.2, label=f"paper: {ALPHA_INIT} -> {paper_final} (GPT-OSS-20B)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(r"$\alpha$ (h_shared + $\alpha$ h_NTP)")
    ax.set_title("Figure B: the regularized NTP hidden state's learnable scale")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    paths = _save(fig, out_base)
    csv_path = out_base.with_suffix(".csv")
    atomic_write_text(csv_path, df.to_csv(index=False))
    return paths + [csv_path]

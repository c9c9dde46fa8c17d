"""Plots: 2-D samples and densities, trajectories, curves and image grids (matplotlib).

Every function returns the matplotlib ``Figure`` and, when ``path`` is given, also saves it
(and, outside notebooks, closes it so that scripts do not accumulate open figures).
"""

from __future__ import annotations

import os
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from genflow._checks import check_int

__all__ = ["scatter", "density", "trajectories", "curves", "image_grid", "save"]


def save(fig, path: str | None, dpi: int = 120):
    """Save ``fig`` to ``path`` (if given) and return it. The format follows ``path``'s extension
    (a path without one is written as PNG, at ``path`` itself). Outside notebooks the figure is
    then closed, also when the write fails."""
    if path is not None:
        # (matplotlib wrote "out" to "out.png", and a failed write left the figure open)
        try:
            named = isinstance(path, (str, os.PathLike))  # (or a file object: matplotlib's default format)
            fmt = "png" if named and not os.path.splitext(os.fspath(path))[1] else None
            fig.savefig(path, dpi=dpi, bbox_inches="tight", format=fmt)
        finally:
            if "inline" not in matplotlib.get_backend():
                plt.close(fig)
    return fig


def _lims(*arrays, pad=0.1):
    pts = np.concatenate([np.asarray(a).reshape(-1, 2) for a in arrays if a is not None])
    pts = pts[np.all(np.isfinite(pts), axis=1)]  # a diverged sample (nan / inf) must not hide the rest
    if not len(pts):
        return np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    # (in float64, clipped to +-1e300: hi - lo of float32 points near +-2e38 overflowed to inf, and
    # matplotlib refused the limits, leaving the figure open)
    pts = np.clip(pts.astype(np.float64), -1e300, 1e300)
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    # one point (or coinciding points): a unit span, not the identical limits matplotlib warns about
    span = np.where(hi > lo, hi - lo, 1.0 / pad)
    return lo - pad * span, hi + pad * span


def _check_lims(lims):
    try:
        (x0, x1), (y0, y1) = lims
        ok = bool(x0 < x1 and y0 < y1)
    except (TypeError, ValueError):  # (lims=(0, 1): "cannot unpack non-iterable int")
        ok = False
    if not ok:
        raise ValueError(f"lims must be ((x0, x1), (y0, y1)) with x0 < x1 and y0 < y1; got {lims}")
    return (x0, x1), (y0, y1)


def scatter(samples, reference=None, title: str | None = None, path: str | None = None, s: float = 2.0,
            lims=None):
    """Side-by-side scatter of ``reference`` (if given) and ``samples``, both ``[N, 2]``.

    ``lims``: ``((x0, x1), (y0, y1))`` as in :func:`density` (default: the 0.5-99.5 percentiles
    of the finite points, padded by 10%)."""
    for name, a in (("samples", samples), ("reference", reference)):
        if a is not None and (np.ndim(a) != 2 or np.shape(a)[1] != 2):
            raise ValueError(f"{name} must be points [N, 2]; got shape {np.shape(a)}")
    panels = [("data", reference), ("samples", samples)] if reference is not None else [("samples", samples)]
    if lims is not None:
        (x0, x1), (y0, y1) = _check_lims(lims)
        lo, hi = np.array([x0, y0], float), np.array([x1, y1], float)
    else:
        lo, hi = _lims(samples, reference)
    # panels of equal aspect: the figure's height follows the data's (no empty bands around wide data)
    aspect = float(np.clip((hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-12), 0.3, 1.5))
    height = 4 * aspect + (1.0 if title else 0.6)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), height), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=s, alpha=0.5, lw=0)
        ax.set_xlim(lo[0], hi[0]); ax.set_ylim(lo[1], hi[1]); ax.set_aspect("equal"); ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def density(log_density_fn=None, samples=None, lims=None, n: int = 200, title: str | None = None,
            path: str | None = None):
    """Heat map of ``exp(log_density_fn(grid))`` (``[M, 2] -> [M]``) or a 2-D histogram of
    ``samples: [N, 2]`` (one of the two).

    ``lims``: ``((x0, x1), (y0, y1))``; default: for samples, their 0.5-99.5 percentiles padded
    by 10% (as in :func:`scatter`: outliers beyond them are not drawn), for a log-density
    ``((-4, 4), (-4, 4))``. Samples outside given limits are not drawn (a warning says how many,
    above 1%). The log-density need not be
    normalised: the heat map (which has no colour bar) is ``exp(log_density - its maximum)``."""
    if (log_density_fn is None) == (samples is None):
        # (with both, the samples were ignored without a word)
        raise ValueError("density needs exactly one of log_density_fn and samples; got "
                         + ("neither" if samples is None else "both"))
    if log_density_fn is None and (np.ndim(samples) != 2 or np.shape(samples)[1] != 2):
        raise ValueError(f"samples must be points [N, 2]; got shape {np.shape(samples)}")
    explicit = lims is not None
    if not explicit:
        # (a fixed +-4 window drew an empty histogram of samples around 100, without a word)
        lo, hi = _lims(samples) if samples is not None else ((-4.0, -4.0), (4.0, 4.0))
        lims = ((lo[0], hi[0]), (lo[1], hi[1]))
    (x0, x1), (y0, y1) = _check_lims(lims)
    n = check_int("n", n, low=2)  # (n = 1: numpy's "`bins[0]` must be positive" with the figure left open)
    if log_density_fn is not None:  # (evaluated before the figure exists: an error leaks no figure)
        xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
        grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)
        ld = np.asarray(log_density_fn(grid), np.float64)
        if ld.shape not in ((n * n,), (n * n, 1)):
            raise ValueError(f"log_density_fn must map points [M, 2] to log-densities [M]; got shape {ld.shape} "
                             f"for M = {n * n}")
        finite = ld[np.isfinite(ld)]
        # (exp of an unnormalised log-density overflowed to inf or underflowed to 0: a blank image)
        z = np.exp(ld - (finite.max() if finite.size else 0.0)).reshape(n, n)
    else:
        pts = np.asarray(samples)
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        outside = np.mean((pts[:, 0] < x0) | (pts[:, 0] > x1) | (pts[:, 1] < y0) | (pts[:, 1] > y1)) if len(pts) else 0
        if explicit and outside > 0.01:
            warnings.warn(f"density: {100 * outside:.1f}% of the samples lie outside lims={lims} and are not drawn",
                          stacklevel=2)
    fig, ax = plt.subplots(figsize=(4, 4))
    if log_density_fn is not None:
        ax.imshow(z, origin="lower", extent=(x0, x1, y0, y1), cmap="magma", aspect="equal")
    else:
        ax.hist2d(pts[:, 0], pts[:, 1], bins=n // 2, range=[[x0, x1], [y0, y1]], cmap="magma")
        ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save(fig, path)


def trajectories(traj, n_paths: int = 200, title: str | None = None, path: str | None = None):
    """Sampling trajectories ``traj: [T, N, 2]`` (noise at index 0, data at -1)."""
    if np.ndim(traj) != 3 or np.shape(traj)[-1] != 2:
        raise ValueError(f"traj must be [T, N, 2]; got shape {np.shape(traj)}")
    if np.shape(traj)[0] == 0:  # (an IndexError after the figure was opened, which stayed open)
        raise ValueError(f"traj must hold at least one time (T >= 1); got shape {np.shape(traj)}")
    n_paths = check_int("n_paths", n_paths)  # (-1 plotted N - 1 paths)
    traj = np.asarray(traj)[:, :n_paths]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(traj[:, :, 0], traj[:, :, 1], color="0.3", alpha=0.25, lw=0.6)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=4, c="tab:blue", label="t=1 (noise)", zorder=3)
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=4, c="tab:red", label="t=0 (data)", zorder=3)
    ax.set_aspect("equal"); ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save(fig, path)


def curves(series: dict, xlabel: str = "step", ylabel: str = "", logx: bool = False, logy: bool = False,
           title: str | None = None, path: str | None = None, smooth: int = 1):
    """Line plot of ``{label: y}`` or ``{label: (x, y)}`` (``x, y: [T]``); ``smooth`` is a
    moving-average window (1: none)."""
    smooth = check_int("smooth", smooth)  # (0 or -3 turned smoothing off without a word)
    lines = []  # checked before the figure exists: a bad series leaks no figure
    for label, v in series.items():
        x, y = v if isinstance(v, tuple) and len(v) == 2 else (None, v)
        y = np.asarray(y, np.float64)
        x = np.arange(len(y)) if x is None else np.asarray(x)
        # (a list [x, y] or a [T, k] array plotted T lines of 2 (or k) points, and a length mismatch
        # raised matplotlib's error with the figure left open)
        if isinstance(v, tuple) and len(v) != 2 or y.ndim != 1 or x.shape != y.shape:
            raise ValueError(f"series[{label!r}] must be y: [T] or a tuple (x: [T], y: [T]); got "
                             + (f"a tuple of {len(v)}" if isinstance(v, tuple) and len(v) != 2
                                else f"x: {x.shape}, y: {y.shape}"))
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        lines.append((label, x, y))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, x, y in lines:
        ax.plot(x, y, label=label, marker="o" if len(y) < 20 else None)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel); ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save(fig, path)


def image_grid(images, nrow: int | None = None, title: str | None = None, path: str | None = None,
               vmin: float = -1.0, vmax: float = 1.0, row_labels: list[str] | None = None):
    """Grid of images ``[N, H, W]`` or ``[N, H, W, C]`` in ``[vmin, vmax]``, ``nrow`` per row,
    with optional labels to the left of the rows."""
    imgs = np.asarray(images, np.float32)
    if not (imgs.ndim == 3 or (imgs.ndim == 4 and imgs.shape[-1] in (1, 3, 4))) or imgs.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C] with C in (1, 3, 4) and N >= 1; got shape {imgs.shape}")
    if not vmax > vmin:
        raise ValueError(f"vmax must be greater than vmin; got vmin={vmin}, vmax={vmax}")
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    n = imgs.shape[0]
    # (nrow=2.0 was matplotlib's error with the figure left open)
    nrow = int(np.ceil(np.sqrt(n))) if nrow is None else check_int("nrow", nrow)
    ncol = int(np.ceil(n / nrow))
    head = 0.4 if title else 0.0  # inches kept free above the grid for the title
    fig, axes = plt.subplots(ncol, nrow, figsize=(nrow * 0.8, ncol * 0.8 + head), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = np.clip((imgs[i] - vmin) / (vmax - vmin), 0, 1)
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None, vmin=0, vmax=1)
    for r, label in enumerate(row_labels or []):
        if r < axes.shape[0]:
            axes[r, 0].text(-0.15, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.1, rect=(0.0, 0.0, 1.0, 1.0 - head / fig.get_figheight()))
    if title:
        fig.suptitle(title, y=1.0 - 0.1 / fig.get_figheight(), va="top", fontsize=10)
    return save(fig, path)

import os
import warnings

import jax
import numpy as np
import pytest
from PIL import Image
import matplotlib.pyplot as plt

import genflow as gf


def test_plots_are_written(tmp_path):
    pts = np.asarray(gf.data.moons(jax.random.key(0), 500))
    traj = np.stack([pts * s for s in np.linspace(0.2, 1.0, 6)])
    outs = {
        "scatter.png": lambda p: gf.viz.scatter(pts, pts + 0.1, title="x", path=p),
        "density.png": lambda p: gf.viz.density(samples=pts, path=p),
        "logdensity.png": lambda p: gf.viz.density(lambda g: -0.5 * (g**2).sum(-1), path=p),
        "traj.png": lambda p: gf.viz.trajectories(traj, path=p),
        "curves.png": lambda p: gf.viz.curves({"a": np.arange(50.0), "b": (np.arange(5), np.ones(5))}, logy=True, path=p),
        "grid.png": lambda p: gf.viz.image_grid(gf.data.load_digits("test")[0][:16], path=p),
    }
    for name, make in outs.items():
        p = os.path.join(tmp_path, name)
        fig = make(p)
        assert fig is not None
        w, h = Image.open(p).size
        assert w > 100 and h > 100, name


def test_scatter_with_a_diverged_sample_and_bad_shapes(tmp_path):
    pts = np.random.default_rng(0).standard_normal((256, 2))
    pts[3] = np.nan  # one sample diverged: the others are still plotted (the limits used to be nan)
    gf.viz.scatter(pts, path=str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").exists()
    with pytest.raises(ValueError, match=r"samples must be points \[N, 2\]"):
        gf.viz.scatter(np.zeros((5, 3)))


def test_scatter_of_huge_finite_samples_draws_and_closes_its_figure(tmp_path):
    """Finite samples near float32's largest value (a diverged sampler's) made hi - lo overflow to
    inf: matplotlib refused the limits, and the figure stayed open."""
    open_before = len(plt.get_fignums())
    for pts in (np.array([[2e38, -2e38], [-2e38, 2e38]], np.float32), np.array([[1e308, -1e308], [-1e308, 1e308]])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (matplotlib's own overflow warnings at 1e308)
            gf.viz.scatter(pts, path=str(tmp_path / "s.png"))
        lo, hi = gf.viz._lims(pts)
        assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < -1e38) and np.all(hi > 1e38)
    assert len(plt.get_fignums()) == open_before


def test_scatter_limits_read_like_density_and_edge_inputs_are_named():
    # scatter read lims as ((xlo, ylo), (xhi, yhi)), density as ((x0, x1), (y0, y1))
    pts = np.random.default_rng(0).normal(size=(50, 2))
    fig = gf.viz.scatter(pts, lims=((-4, 4), (-3, 3)))
    assert fig.axes[0].get_xlim() == (-4, 4) and fig.axes[0].get_ylim() == (-3, 3)
    plt.close(fig)
    with pytest.raises(ValueError, match="lims must be"):
        gf.viz.scatter(pts, lims=((4, -4), (-3, 3)))
    with pytest.raises(ValueError, match="needs exactly one of log_density_fn and samples"):
        gf.viz.density()
    with pytest.raises(ValueError, match=r"samples must be points \[N, 2\]"):
        gf.viz.density(samples=np.zeros((10, 3)))
    with pytest.raises(ValueError, match="images must be"):
        gf.viz.image_grid(np.zeros((0, 8, 8)))
    with pytest.raises(ValueError, match="images must be"):
        gf.viz.image_grid(np.zeros((4, 64)))
    with pytest.raises(ValueError, match="vmax must be greater than vmin"):
        gf.viz.image_grid(np.zeros((4, 8, 8)), vmin=0.0, vmax=0.0)


def test_viz_bad_inputs_are_named_and_leak_no_figure():
    plt.close("all")
    with pytest.raises(ValueError, match="lims must be"):
        gf.viz.density(samples=np.zeros((4, 2)), lims=((4, -4), (-4, 4)))  # matplotlib's error before
    with pytest.raises(ValueError, match=r"traj must be \[T, N, 2\]"):
        gf.viz.trajectories(np.zeros((3, 4)))  # IndexError before
    with pytest.raises(ValueError, match=r"at least one time \(T >= 1\)"):
        gf.viz.trajectories(np.zeros((0, 3, 2)))  # IndexError before, after opening the figure
    with pytest.raises(ZeroDivisionError):
        gf.viz.density(lambda g: 1 / 0)
    assert plt.get_fignums() == []  # each of them left an open figure


def test_scatter_of_a_single_point_has_proper_limits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Attempting to set identical low and high xlims"
        fig = gf.viz.scatter(np.array([[0.5, 0.2]]))
    lo, hi = fig.axes[0].get_xlim()
    assert lo < 0.5 < hi
    plt.close(fig)


def test_save_writes_the_figure_at_dpi_and_closes_it(tmp_path):
    """save(fig, path) writes a PNG of the figure at the requested dpi (pixel size proportional to
    dpi) and closes it (no figure leaks in a non-inline backend); path=None keeps it open; it
    returns fig either way."""
    sizes = {}
    for dpi in (50, 100):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([0, 1], [0, 1])
        p = str(tmp_path / f"f{dpi}.png")
        assert gf.viz.save(fig, p, dpi=dpi) is fig
        assert not plt.fignum_exists(fig.number)
        with Image.open(p) as im:
            sizes[dpi] = im.size
            arr = np.asarray(im.convert("L"))
        assert arr.min() < 128 < arr.max()  # something was drawn on a light background
    ratio = np.array(sizes[100]) / np.array(sizes[50])
    np.testing.assert_allclose(ratio, 2.0, rtol=0.1)
    fig = plt.figure()
    try:
        assert gf.viz.save(fig, None) is fig and plt.fignum_exists(fig.number)
    finally:
        plt.close(fig)


def test_curves_and_density_check_their_series_and_leak_no_figure():
    plt.close("all")
    bad = {"a list [x, y]": [np.arange(5.0), np.ones(5)],  # plotted five 2-point lines, silently
           "a [T, k] array": np.ones((10, 3)),
           "x/y of unequal length": (np.arange(5), np.ones(4)),  # matplotlib's error, figure left open
           "a tuple of 3": (np.arange(5), np.ones(5), np.ones(5))}
    for name, v in bad.items():
        with pytest.raises(ValueError, match=r"series\['s'\] must be y: \[T\] or a tuple"):
            gf.viz.curves({"s": v})
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        gf.viz.density(samples=np.zeros((4, 2)), n=1)  # numpy's "`bins[0]` must be positive"
    assert plt.get_fignums() == []
    fig = gf.viz.curves({"a": np.arange(30.0), "b": (np.arange(30) * 2, np.ones(30))}, smooth=5)
    (xa, ya), (xb, yb) = (ln.get_data() for ln in fig.axes[0].lines)
    np.testing.assert_allclose(ya, np.arange(2.0, 28.0))
    np.testing.assert_array_equal(xa, np.arange(4, 30))
    np.testing.assert_array_equal(xb, np.arange(4, 30) * 2)
    plt.close(fig)


def test_density_limits_follow_the_samples_and_unnormalised_log_densities_show():
    """density drew samples around 100 as an empty heat map (a fixed +-4 window), and exp of a
    log-density offset by +-1000 as a blank image (inf / 0 everywhere)."""
    pts = np.random.default_rng(0).normal(size=(300, 2))
    fig = gf.viz.density(samples=pts + 100)
    assert fig.axes[0].collections[0].get_array().sum() >= 0.98 * 300  # (0 of 300 before)
    plt.close(fig)
    with pytest.warns(UserWarning, match=r"lie outside lims"):
        plt.close(gf.viz.density(samples=pts * 10, lims=((-4, 4), (-4, 4))))
    shapes = []
    for offset in (1000.0, -1000.0, 0.0):
        im = gf.viz.density(lambda g, o=offset: o - 0.5 * (g**2).sum(-1), n=50).axes[0].images[0]
        z = np.asarray(im.get_array())
        assert np.all(np.isfinite(z)) and z.max() == 1.0
        shapes.append(z)
        plt.close("all")
    for z in shapes[:2]:  # (the offset is applied in float32 by the lambda: equal to rounding)
        np.testing.assert_allclose(z, shapes[2], rtol=1e-3, atol=1e-9)


def test_viz_arguments_are_checked_before_a_figure_exists(tmp_path):
    plt.close("all")
    pts = np.zeros((4, 2))
    with pytest.raises(ValueError, match="exactly one of log_density_fn and samples"):
        gf.viz.density(lambda g: -(g**2).sum(-1), samples=pts)  # (samples were ignored)
    with pytest.raises(ValueError, match=r"log_density_fn must map points \[M, 2\]"):
        gf.viz.density(lambda g: g)  # ("cannot reshape array of size 80000")
    with pytest.raises(ValueError, match="lims must be"):
        gf.viz.density(samples=pts, lims=(0, 1))  # ("cannot unpack non-iterable int")
    with pytest.raises(ValueError, match="nrow must be a positive int"):
        gf.viz.image_grid(np.zeros((4, 8, 8)), nrow=2.0)
    with pytest.raises(ValueError, match="n_paths must be a positive int"):
        gf.viz.trajectories(np.zeros((3, 5, 2)), n_paths=-1)  # (plotted N - 1 paths)
    with pytest.raises(ValueError, match="smooth must be a positive int"):
        gf.viz.curves({"a": np.arange(10.0)}, smooth=0)
    with pytest.raises(FileNotFoundError):
        gf.viz.scatter(pts, path=str(tmp_path / "missing" / "x.png"))
    assert plt.get_fignums() == []  # (the failed write left its figure open)
    gf.viz.scatter(pts, path=str(tmp_path / "noext"))  # (written to noext.png before)
    assert (tmp_path / "noext").exists() and not (tmp_path / "noext.png").exists()
    with Image.open(tmp_path / "noext") as im:
        assert im.format == "PNG"


def test_save_writes_to_a_file_object():
    import io

    buf = io.BytesIO()
    gf.viz.scatter(np.zeros((4, 2)), path=buf)  # (os.fspath failed on it after the extension fix)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_grid_draws_each_image_in_its_own_cell():
    """image_grid: cell i (row-major) shows image i mapped from [vmin, vmax] to [0, 1] and clipped
    (grey for one channel, colour for three); cells past N stay empty (only a figure was checked:
    every cell showing image 0 passed)."""
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1.5, 1.5, size=(5, 4, 6, 1)).astype(np.float32)
    fig = gf.viz.image_grid(imgs, nrow=3, vmin=-1.0, vmax=1.0)
    axes = fig.axes
    assert len(axes) == 6
    for i, ax in enumerate(axes):
        if i < 5:
            assert len(ax.images) == 1 and ax.images[0].get_cmap().name == "gray"
            np.testing.assert_allclose(np.asarray(ax.images[0].get_array()),
                                       np.clip((imgs[i, ..., 0] + 1.0) / 2.0, 0, 1), rtol=1e-6)
        else:
            assert not ax.images
    plt.close(fig)
    rgb = rng.uniform(0.0, 4.0, size=(2, 3, 3, 3)).astype(np.float32)
    fig = gf.viz.image_grid(rgb, vmin=0.0, vmax=4.0)
    for i, ax in enumerate(fig.axes[:2]):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), rgb[i] / 4.0, rtol=1e-6)
    plt.close(fig)


def test_trajectories_draw_the_paths_and_mark_noise_and_data_ends():
    """trajectories(traj: [T, N, 2]): one line per path through its T points, the first n_paths
    of them; the noise marker at traj[0] and the data marker at traj[-1] (swapped markers passed
    a test that only checked a figure was returned)."""
    rng = np.random.default_rng(1)
    traj = np.cumsum(rng.normal(size=(5, 7, 2)), axis=0)
    fig = gf.viz.trajectories(traj, n_paths=4)
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    for i, line in enumerate(ax.lines):
        np.testing.assert_allclose(np.column_stack(line.get_data()), traj[:, i])
    marks = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
    assert set(marks) == {"t=1 (noise)", "t=0 (data)"}
    np.testing.assert_allclose(marks["t=1 (noise)"], traj[0, :4])
    np.testing.assert_allclose(marks["t=0 (data)"], traj[-1, :4])
    plt.close(fig)


def test_scatter_panels_show_reference_as_data_and_samples_as_samples_in_x_y_order():
    """scatter(samples, reference): the 'data' panel draws reference, the 'samples' panel draws
    samples, each point at (x, y) = (a[:, 0], a[:, 1]) (swapped panels or axes passed before)."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(30, 2)) * [1.0, 0.2] + [2.0, -1.0]
    ref = rng.normal(size=(40, 2)) * [0.3, 1.0] + [-1.0, 0.5]
    fig = gf.viz.scatter(samples, ref)
    panels = {ax.get_title(): np.asarray(ax.collections[0].get_offsets()) for ax in fig.axes}
    plt.close(fig)
    np.testing.assert_allclose(panels["data"], ref)
    np.testing.assert_allclose(panels["samples"], samples)


def _value_at(ax, artist, x, y):
    """The value an image shows at data point (x, y) (via matplotlib's own cursor lookup)."""
    import types

    ax.figure.canvas.draw()
    px, py = ax.transData.transform((x, y))
    return float(artist.get_cursor_data(types.SimpleNamespace(x=px, y=py, xdata=x, ydata=y, inaxes=ax)))


def test_density_heat_map_puts_the_mode_at_its_data_coordinates():
    """A log-density peaked at (2, -3) on non-square limits shows its maximum at (2, -3), not at
    the mirrored (2, 3) (origin='upper') nor at the transposed point (swapped grid axes)."""
    fn = lambda g: -8.0 * ((g[:, 0] - 2.0) ** 2 + (g[:, 1] + 3.0) ** 2)  # noqa: E731
    fig = gf.viz.density(fn, lims=((-4.0, 4.0), (-5.0, 5.0)), n=81)
    ax = fig.axes[0]
    im = ax.images[0]
    peak, mirrored, transposed = (_value_at(ax, im, *p) for p in ((2.0, -3.0), (2.0, 3.0), (-3.0, 2.0)))
    plt.close(fig)
    assert peak > 0.8 and mirrored < 1e-3 and transposed < 1e-3, (peak, mirrored, transposed)


def test_density_histogram_counts_points_at_their_data_coordinates():
    """density(samples=...): the fullest histogram cell is where the points are (x, y), not (y, x)."""
    pts = np.random.default_rng(0).normal(size=(500, 2)) * 0.1 + [2.0, -3.0]
    fig = gf.viz.density(samples=pts, lims=((-4.0, 4.0), (-4.0, 4.0)), n=40)
    mesh = fig.axes[0].collections[0]
    counts = np.asarray(mesh.get_array()).reshape(20, 20)  # hist2d: rows along y, columns along x
    verts = mesh.get_coordinates()  # [ny + 1, nx + 1, 2]
    plt.close(fig)
    i, j = np.unravel_index(np.argmax(counts), counts.shape)
    centre = verts[i:i + 2, j:j + 2].reshape(-1, 2).mean(0)
    np.testing.assert_allclose(centre, [2.0, -3.0], atol=0.45)


def test_density_warns_when_more_than_one_percent_of_samples_lie_outside_lims():
    """The docstring: a warning above 1% outside the given limits (about 4.5% here)."""
    pts = np.random.default_rng(0).normal(size=(4000, 2))
    with pytest.warns(UserWarning, match="lie outside lims"):
        plt.close(gf.viz.density(samples=pts, lims=((-1.7, 10.0), (-10.0, 10.0))))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # none at about 0.1 %
        plt.close(gf.viz.density(samples=pts, lims=((-3.1, 10.0), (-10.0, 10.0))))

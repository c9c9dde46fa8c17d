"""Image datasets: scikit-learn's bundled 8x8 digits (offline) and tensorflow-datasets by name
through ``tfds.data_source`` + grain.

Every image source yields records ``{"x": float32 [H, W, C] in [-1, 1], "y": int32}`` (``y`` only
where the dataset has labels). :func:`image_loader` turns one into an infinite, shuffled, batched,
per-host-sharded grain iterator whose position (``get_state()``/``set_state()``) is part of a
:class:`genflow.train.Checkpointer` checkpoint, so a resumed run sees exactly the batches it would
have seen. No TensorFlow is needed: ``tfds.data_source`` reads ArrayRecord files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from genflow._checks import check_int, check_real_in

__all__ = ["load_digits", "image_dataset", "image_loader", "DIGITS"]

DIGITS = "digits"


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0,
                channels_last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits, scaled from {0..16} to [-1, 1].

    Args:
      split: ``"train"``, ``"test"`` or ``"all"``; the split is a fixed stratified shuffle.
      test_fraction: fraction of each class held out for ``"test"``.
      seed: seed of the split permutation.
      channels_last: images ``[N, 8, 8, 1]`` (else ``[N, 64]``).
    Returns:
      ``(images float32, labels int32 [N])``.
    """
    from sklearn.datasets import load_digits as _load

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    seed = check_int("seed", seed, 0)  # (-1 / 1.5 failed in NumPy without naming seed)
    # ("0.2" was a TypeError from '<=', True a silent 1.0: an empty train split)
    check_real_in("test_fraction", test_fraction, 0.0, 1.0)
    d = _load()
    x = (d.data.astype(np.float32) / 16.0) * 2.0 - 1.0
    y = d.target.astype(np.int32)
    if split != "all":
        rng = np.random.default_rng(seed)
        test = np.zeros(len(y), bool)
        for c in range(10):
            idx = np.flatnonzero(y == c)
            idx = rng.permutation(idx)
            # (rounded first: 0.55 * 180 = 99.00000000000001 held out 100)
            test[idx[: int(math.ceil(round(test_fraction * len(idx), 9)))]] = True
        keep = test if split == "test" else ~test
        x, y = x[keep], y[keep]
    if channels_last:
        x = x.reshape(-1, 8, 8, 1)
    return x, y


def _to_float(image: np.ndarray) -> np.ndarray:
    """Unsigned-integer ``[H, W, C]`` (or ``[H, W]``) in ``{0..max}`` (uint8: 255, uint16: 65535)
    -> float32 ``[H, W, C]`` in [-1, 1]."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.unsignedinteger):
        # (a uint16 image was divided by 127.5 too: values up to 512; a float one has no known range)
        raise ValueError(f"image features must hold unsigned integers (uint8, uint16, ...); got dtype {image.dtype} "
                         f"(image_key names the feature)")
    if image.ndim == 2:
        image = image[..., None]
    half = np.iinfo(image.dtype).max / 2.0
    return (image.astype(np.float64 if image.itemsize > 2 else np.float32) / half - 1.0).astype(np.float32)


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Central square crop, then area (box) resampling to ``size x size`` (PIL)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top:top + s, left:left + s]
    squeeze = crop.ndim == 3 and crop.shape[-1] == 1
    pil = Image.fromarray(crop[..., 0] if squeeze else crop)
    out = np.asarray(pil.resize((size, size), Image.BOX))
    return out[..., None] if out.ndim == 2 else out


class _Records:
    """A random-access source of ``{"x", "y"}`` records over a tfds data source (decoded lazily)."""

    def __init__(self, source, image_key: str, label_key: str | None, image_size: int | None):
        self.source, self.image_key, self.label_key, self.image_size = source, image_key, label_key, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        ex = self.source[i]
        if self.image_key not in ex:
            raise KeyError(f"records have no {self.image_key!r} feature; they have {sorted(ex)}")
        img = np.asarray(ex[self.image_key])
        if self.image_size is not None:
            img = _center_crop_resize(img, self.image_size)
        out = {"x": _to_float(img)}
        if self.label_key is not None:
            if self.label_key not in ex:  # (silently unlabelled: a conditional net trained on the null label)
                raise KeyError(f"records have no {self.label_key!r} feature (label_key); they have {sorted(ex)}; "
                               f"pass label_key=None for an unlabelled dataset")
            label = np.asarray(ex[self.label_key])
            # (an array feature named as the label -- label_key="image" -- became an int32 array of
            # "labels" without complaint, and failed far away in whatever used them)
            if label.ndim != 0 or not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
                raise ValueError(f"feature {self.label_key!r} (label_key) is not a scalar integer: it has dtype "
                                 f"{label.dtype} and shape {label.shape}")
            out["y"] = np.int32(label)
        return out


class _Arrays:
    """A random-access source of ``{"x", "y"}`` records over in-memory arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"x": self.x[i]} if self.y is None else {"x": self.x[i], "y": self.y[i]}


def image_dataset(name: str, split: str = "train", *, data_dir: str | None = None, image_key: str = "image",
                  label_key: str | None = "label", image_size: int | None = None):
    """A ``grain.MapDataset`` of records ``{"x": float32 [H, W, C] in [-1, 1], "y": int32}``.

    Args:
      name: ``"digits"`` (bundled, offline; splits ``"train"``/``"test"``/``"all"``) or a
        tensorflow-datasets name (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"celeb_a"``,
        ...), read with ``tfds.data_source`` from ``data_dir`` (prepared beforehand with
        ``tfds.data_source(..., download=True)`` / ``tfds build``; ``split`` in tfds syntax,
        e.g. ``"train[:90%]"``).
      image_key, label_key: feature names in the tfds records (``label_key=None``: unlabelled; the
        bundled digits take the defaults or ``label_key=None``).
      image_size: central square crop resized to ``image_size`` (e.g. 64 for ``celeb_a``).
    """
    import grain

    if image_size is not None:  # (0, -3 or 14.5 failed in PIL at the first batch, unnamed)
        image_size = check_int("image_size", image_size)
    if name == DIGITS:
        x, y = load_digits(split)
        if image_size is not None and image_size != 8:
            raise ValueError(f"the bundled digits are 8x8; got image_size={image_size}")
        if image_key != "image" or label_key not in ("label", None):  # (they were ignored silently)
            raise ValueError(f"the bundled digits have the fields 'image' and 'label' only: image_key must be "
                             f"'image' and label_key 'label' or None; got image_key={image_key!r}, "
                             f"label_key={label_key!r}")
        return grain.MapDataset.source(_Arrays(x, y if label_key is not None else None))
    import tensorflow_datasets as tfds

    try:  # (download=True by default: an unprepared name started a download, which failed deep inside tfds)
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.DatasetNotFoundError:
        raise
    except Exception as e:
        if "unknown split" in str(e).lower():  # (a prepared dataset without that split read as "not downloaded")
            raise ValueError(f"split {split!r} is not a split of tfds dataset {name!r}: {e}") from e
        raise ValueError(f"tfds dataset {name!r} (split {split!r}) cannot be read from "
                         f"{data_dir or 'the default tfds data_dir'} without downloading: prepare it first (`tfds build "
                         f"{name.split(':')[0]}`, or tfds.data_source({name!r}, download=True) where there is internet); "
                         f"tfds says: {e}") from e
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if image_size is None and features is not None and image_key in features:
        shape = getattr(features[image_key], "shape", None) or ()
        if any(d is None for d in shape[:2]):  # (grain's batching failed: "Expected all input elements to have the same structure")
            raise ValueError(f"the {name!r} images ({image_key!r}) have variable sizes {tuple(shape)}; pass "
                             f"image_size (a central square crop resized to image_size x image_size) to batch them")
    return grain.MapDataset.source(_Records(source, image_key, label_key, image_size))


def image_loader(dataset: Any, batch_size: int, *, split: str | None = None, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                 workers: int = 0, **dataset_kwargs: Any):
    """An iterator of batches ``{"x": [batch_size, H, W, C], "y": [batch_size]}`` (numpy).

    Deterministic given ``seed``: the order is a fresh permutation of this host's shard every epoch
    (grain's index shuffle, no buffer). The iterator has ``get_state()`` / ``set_state(state)``
    (a small JSON-able dict), saved by :func:`genflow.train.fit` in every checkpoint.

    Args:
      dataset: a name for :func:`image_dataset` or a ``grain.MapDataset`` of records.
      split: the split of a named dataset (``"train"``, ``"test"``, ...; default ``"train"``);
        refused with a given dataset, which is read as it is.
      seed: the shuffling seed (each host's order is drawn from it and its shard index).
      shuffle: a fresh permutation every epoch (``False``: the shard's order, every epoch).
      batch_size: examples per batch on this host (the global batch is ``batch_size`` times the
        number of hosts); incomplete batches at the end of the stream are dropped.
      num_epochs: ``None`` repeats forever.
      shard_index, shard_count: this host's shard of the examples (default
        ``jax.process_index()`` of ``jax.process_count()``): host ``i`` reads examples
        ``i, i + count, ...`` of the dataset's first ``count * (len // count)`` (equal shards).
      workers: grain worker processes for decoding (``0``: in this process).
    """
    import grain
    import jax

    batch_size = check_int("batch_size", batch_size)
    seed = check_int("seed", seed, low=0)  # (grain's own error named no argument)
    if num_epochs is not None:  # (1.5 and "2" gave unnamed TypeErrors, True one epoch)
        num_epochs = check_int("num_epochs", num_epochs)
    workers = check_int("workers", workers, low=0)  # (-1: grain's "num_threads must be non-negative")
    if not isinstance(dataset, str) and dataset_kwargs:  # (image_size=16 was silently ignored)
        raise ValueError(f"{sorted(dataset_kwargs)} apply to a dataset name, not to a given dataset")
    if not isinstance(dataset, str) and split is not None:  # (split="test" read the given records)
        raise ValueError(f"split={split!r} applies to a dataset name, not to a given dataset (read as it is)")
    ds = image_dataset(dataset, split or "train", **dataset_kwargs) if isinstance(dataset, str) else dataset
    index = jax.process_index() if shard_index is None else check_int("shard_index", shard_index, low=0)
    count = jax.process_count() if shard_count is None else check_int("shard_count", shard_count)
    if not 0 <= index < count:
        raise ValueError(f"need 0 <= shard_index < shard_count; got {index} and {count}")
    # every host gets the same number of examples (the remainder is dropped, as grain's
    # ShardByJaxProcess(drop_remainder=True) does): unequal shards would give hosts different
    # numbers of batches, and a multi-host step would wait forever
    ds = ds[: len(ds) // count * count][index::count]
    if len(ds) < batch_size:
        raise ValueError(f"this host's shard has {len(ds)} examples, fewer than batch_size={batch_size}")
    # one seed per host: with the same seed, host h's j-th example was always host 0's j-th + h (a
    # global batch of B blocks of neighbouring records); a single host keeps seed itself
    ds = ds.seed(seed if count == 1 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True)
    it = ds.to_iter_dataset()
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain <= 0.2.18 reads an absl flag in its workers (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return _Loader(iter(it), workers)


class _Loader:
    """``image_loader``'s iterator: grain's, with a ``set_state`` that names a state saved by a
    loader of the other kind (with and without worker processes, grain's states differ, and
    resuming with only ``workers`` changed failed with grain's ``KeyError: 'exhausted'``)."""

    def __init__(self, it, workers: int):
        self._it, self._workers = it, workers

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> dict:
        return self._it.get_state()

    def close(self) -> None:
        """Stop the worker processes (with ``workers > 0``; left to interpreter exit, grain's
        destructors printed tracebacks there). Also ``with image_loader(...) as it:``."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_state(self, state: dict) -> None:
        saved_with_workers = isinstance(state, dict) and "iterators_in_use_states" in state
        if isinstance(state, dict) and saved_with_workers != bool(self._workers):
            raise ValueError(f"this iterator state was saved by an image_loader with "
                             f"{'workers > 0' if saved_with_workers else 'workers=0'}, and this loader has "
                             f"workers={self._workers}: grain's states differ between the two; build the loader "
                             f"with the {'same number of workers' if saved_with_workers else 'workers=0'} to resume")
        self._it.set_state(state)

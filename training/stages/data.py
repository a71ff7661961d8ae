"""Data for a run: generated splits made when missing, dataset nodes built and checked,
the shard checksums of the training sets verified (once per dataset version), class pixel
counts from the cards, and T-10 screening of the training sets."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from core.config import ConfigError, instantiate_checked, plain
from core.paths import generated_root, split_randomization
from simulation.taxonomy import Taxonomy

log = logging.getLogger(__name__)


def generated_roots(
    gen: Mapping[str, Any], image: Mapping[str, int], taxonomy_cfg: Any
) -> dict[str, Path]:
    """The folder of each split of ``data.generate``: ``<root>/<split>-<key>``, keyed by a
    hash of what makes it (:func:`core.paths.generated_root`), the folders that
    ``${generated:<split>}`` in ``data.datasets`` resolves to."""
    return {split: generated_root(gen, split, image, taxonomy_cfg) for split in gen["splits"]}


def ensure_procedural_datasets(
    gen: Mapping[str, Any], image: Mapping[str, int], taxonomy_cfg: Any, progress: bool = False
) -> dict[str, Path]:
    """Generate the procedural splits of ``data.generate`` (``gen``: ``root``,
    ``randomization`` -- the randomization node, not a preset name --, ``shard_size``,
    ``splits``), where not complete yet; returns each split's folder."""
    from omegaconf import OmegaConf

    from simulation.generation import run_generate

    roots = generated_roots(gen, image, taxonomy_cfg)
    gen, image, taxonomy = plain(gen), plain(image), plain(taxonomy_cfg)
    for split, spec in gen["splits"].items():
        root = roots[split]
        # the folder is named by its generation config; run_generate still compares the
        # folder's generation.json with this config, so a finished split costs nothing
        log.info("dataset %s (%s, %d frames): %s", split, spec["style"], spec["num_frames"], root)
        cfg = OmegaConf.create(
            {
                "name": split,
                "seed": spec["seed"],
                "num_frames": spec["num_frames"],
                "shard_size": gen["shard_size"],
                "image": {"height": image["height"], "width": image["width"]},
                "domain": None,
                "output_dir": str(root),
                "overwrite": False,
                "progress": progress,
                "parallel": {"index": 0, "count": 1, "servers": []},
                "backend": {
                    "_target_": "simulation.procedural.ProceduralBackend",
                    "style": spec["style"],
                    "batch_size": 64,
                    "compile": False,
                },
                "taxonomy": taxonomy,
                "randomization": split_randomization(gen, split),
            }
        )
        run_generate(cfg)
    return roots


def wait_for_datasets(
    gen: Mapping[str, Any],
    image: Mapping[str, int],
    taxonomy_cfg: Any,
    timeout_s: float = 6 * 3600,
) -> dict[str, Path]:
    """What ranks other than zero do while rank zero runs :func:`ensure_procedural_datasets`:
    wait until every split's card exists; returns each split's folder."""
    roots = generated_roots(gen, image, taxonomy_cfg)
    deadline = time.monotonic() + timeout_s
    while not all((root / "card.json").exists() for root in roots.values()):
        if time.monotonic() > deadline:
            raise ConfigError(f"data.generate: rank zero did not finish {gen['root']} in time")
        time.sleep(2.0)
    return roots


def build_datasets(nodes: Mapping[str, Any], taxonomy: Taxonomy) -> dict[str, Any]:
    """Instantiate the dataset nodes, giving each the taxonomy (readers) or the expected
    taxonomy hash (generated datasets), so a mismatched dataset stops the run here."""
    out: dict[str, Any] = {}
    for role, node in nodes.items():
        if node is None:
            out[role] = None
            continue
        factory = instantiate_checked(node, _partial_=True)
        params = inspect.signature(factory).parameters
        kwargs: dict[str, Any] = {}
        if "taxonomy" in params:
            kwargs["taxonomy"] = taxonomy
        if "expected_taxonomy_hash" in params:
            kwargs["expected_taxonomy_hash"] = taxonomy.hash
        try:
            out[role] = factory(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"data.datasets.{role}: {exc}") from exc
    return out


#: Every dataset role a stage reads; the generated ones' checksums are verified before
#: training: a damaged training set would train silently, a damaged evaluation split would
#: report figures of data nobody generated (T-07).
VERIFIED_ROLES = ("sim_train", "sim_val", "real_train", "real_val", "real_test", "real_unlabeled")


def verify_datasets(
    datasets: Mapping[str, Any], roles: Iterable[str] = VERIFIED_ROLES
) -> dict[str, bool]:
    """Recompute the shard checksums of the generated datasets of ``roles``, so a corrupted
    shard stops the run before any training instead of training or testing silently.

    Only :class:`~simulation.dataset.GeneratedDataset` values have checksums (real readers
    and ``None`` are skipped). A dataset is hashed once per version:
    :meth:`~simulation.dataset.GeneratedDataset.verify_cached` records a pass in a marker
    file inside the dataset folder, named by the card's sha256 and the shard checksums, and
    reruns only compare file sizes and modification times; a folder used under two roles
    is hashed once.

    Returns ``{role: hashed now}`` for the roles checked. Raises :class:`ConfigError`
    ``data.datasets.<role>: <file> (corrupted ...)`` naming every bad file.
    """
    from simulation.dataset import DatasetError, GeneratedDataset

    checked: dict[tuple[str, str], bool] = {}
    out: dict[str, bool] = {}
    for role in roles:
        ds = datasets.get(role)
        if not isinstance(ds, GeneratedDataset):
            continue
        key = (str(ds.root.resolve()), ds.card_digest)
        if key in checked:
            out[role] = False
            continue
        start = time.perf_counter()
        try:
            hashed = ds.verify_cached()
        except DatasetError as exc:
            raise ConfigError(
                f"data.datasets.{role}: {exc}. The dataset is damaged: regenerate it (delete "
                "the bad shard folders and card.json, then rerun the generate command, which "
                "renders the missing shards again) or copy it again"
            ) from None
        if hashed:
            log.info(
                "data.datasets.%s: shard checksums of %s verified in %.1f s",
                role,
                ds.root,
                time.perf_counter() - start,
            )
        checked[key] = out[role] = hashed
    return out


def labelled_classes(dataset: Any) -> list[int] | None:
    """The taxonomy classes ``dataset`` labels (a reader's ``labelled_classes``, looked up
    through subsets and screened wrappers); None: every class (generated data)."""
    while dataset is not None:
        if hasattr(dataset, "labelled_classes"):
            return dataset.labelled_classes
        dataset = getattr(dataset, "dataset", None)
    return None


#: Labelled real frames read to count a stage's real class histogram (an even sample).
HISTOGRAM_FRAMES = 512


def class_pixel_counts(
    sim_train: Any,
    real_labelled: Any,
    sim_ratio: float,
    class_names: list[str],
    frames: int = HISTOGRAM_FRAMES,
) -> np.ndarray:
    """``(C,)`` class shares of the labels a stage trains on, each domain weighted by its
    share of the batch: ``sim_ratio * p_sim + (1 - sim_ratio) * p_real``.

    One rule for every stage of a comparison (sim only, real only, the 90/10 mix), so no
    stage trains with weights another never sees. ``p_sim`` comes from the sim set's card
    (every frame), else from counting; ``p_real`` is always counted on the labelled real
    frames the stage draws from (up to ``frames`` of them, evenly spaced): a real reader
    has no card, and a generated real set's card would count labels the stage never sees.
    Uniform when neither side has a labelled pixel.
    """
    num_classes = len(class_names)
    shares = np.zeros(num_classes)
    for dataset, weight in ((sim_train, sim_ratio), (real_labelled, 1.0 - sim_ratio)):
        if dataset is None or weight <= 0 or len(dataset) == 0:
            continue
        counts = _card_histogram(dataset, class_names)
        if counts is None or dataset is real_labelled:
            counts = _count_labels(dataset, num_classes, frames)
        if counts.sum() > 0:
            shares += weight * counts / counts.sum()
    return shares if shares.sum() > 0 else np.ones(num_classes)


def _card_histogram(dataset: Any, class_names: list[str]) -> np.ndarray | None:
    card = getattr(dataset, "card", None)
    if isinstance(card, Mapping) and "class_pixel_histogram" in card:
        hist = card["class_pixel_histogram"]
        return np.asarray([hist.get(c, 0) for c in class_names], dtype=np.float64)
    return None


def _count_labels(dataset: Any, num_classes: int, frames: int) -> np.ndarray:
    """Pixel counts per class over an even sample of ``frames`` items (255 ignored)."""
    n = len(dataset)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, frames)).round().astype(int))
    counts = np.zeros(num_classes)
    for i in picks:
        mask = np.asarray(dataset[int(i)]["mask"]).ravel()
        mask = mask[mask < num_classes]
        counts += np.bincount(mask, minlength=num_classes)[:num_classes]
    return counts


class Screening:
    """T-10, once per training set, and only for stages that actually train."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._done: dict[int, tuple[Any, dict[str, float]]] = {}

    def apply(self, datasets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        out, figures = dict(datasets), {}
        if not self.enabled:
            return out, figures
        for role in ("sim_train", "real_train"):
            ds = datasets.get(role)
            if ds is None:
                continue
            if id(ds) not in self._done:
                self._done[id(ds)] = screen_training_set(role, ds)
            out[role], found = self._done[id(ds)]
            figures.update(found)
        return out, figures


def screen_training_set(role: str, dataset: Any) -> tuple[Any, dict[str, float]]:
    """T-10: screen one training set; a set that loses frames is wrapped so training never
    sees them. Returns the set and its ``risk/T-10/<role>/<reason>`` counts."""
    from training.risk.screening import ScreenedDataset

    screened = ScreenedDataset(dataset)
    figures = {
        key: float(value)
        for key, value in screened.result.metrics(prefix=f"risk/T-10/{role}/").items()
    }
    dropped = len(dataset) - len(screened)
    if not dropped:
        return dataset, figures
    if not len(screened):
        root = getattr(dataset, "root", role)
        made_by = ((getattr(dataset, "card", None) or {}).get("translation") or {}).get(
            "generator_run"
        )
        hint = f" (a translated set: its generator, run {made_by}, needs more training)"
        raise ConfigError(
            f"data.datasets.{role}: T-10 screening dropped every frame of {root} "
            f"({screened.result.counts}); the set cannot be trained on"
            + (hint if made_by is not None else "")
        )
    log.warning(
        "T-10: %d of %d %s frames dropped by screening: %s",
        dropped,
        len(dataset),
        role,
        screened.result.counts,
    )
    return screened, figures

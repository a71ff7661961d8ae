"""Champion/challenger on MLflow's Model Registry: A/B comparison, promotion, rollback (T-01).

Risk T-01 of ``risk-matrix.md`` (model accuracy degradation) is mitigated by retraining, an
A/B test before a new model replaces the deployed one, and a registry that keeps every old
version so the deployed model can be rolled back in one step. This module is that registry:

- every trained model is :meth:`ModelRegistry.register`-ed as a new version of one registered
  model and becomes the ``challenger`` alias (the very first version becomes ``champion``);
- :meth:`ModelRegistry.compare` evaluates champion and challenger on the *same* real
  images and puts a paired-bootstrap confidence interval on the mean per-image difference;
- :meth:`ModelRegistry.promote` moves ``champion`` to the challenger only when the challenger
  wins (lower CI bound above the margin), and records every decision as version tags;
- :meth:`ModelRegistry.rollback` moves ``champion`` back to the previous champion.

Deployment code only ever loads ``models:/<name>@champion``, so promotion and rollback are
alias moves: no artifact is copied or deleted, and every version stays loadable.

MLflow 3 notes (checked on 3.17): ``mlflow.pytorch.log_model(model, name="model")`` creates a
*logged model* (``models:/m-<id>``) linked to the run rather than a ``model/`` folder among the
run's artifacts; ``runs:/<run_id>/model`` still registers it because MLflow looks the logged
model up by name and source run. We do that lookup ourselves
(:meth:`MlflowClient.search_logged_models`) so that nothing depends on the process-wide
tracking URI. The model is exported with ``torch.export``, and the loaded module is a
``GraphModule`` specialised to the input example's shape (``(1, 3, H, W)`` from
:func:`training.tracking.log_model`) whose ``eval()`` raises ``NotImplementedError`` (the mode
is baked in at export time), which is why :func:`per_image_scores` feeds one image at a time.

Loading never unpickles (risk: a tampered registry model running code). ``mlflow.pytorch.
load_model`` loads a ``data/model.pth`` with the full unpickler (MLflow allows pickles by
default), and ``torch.export.load`` itself unpickles pickled records, ``eval`` s shape
expressions and ``exec`` s guards of a crafted ``.pt2``. :meth:`ModelRegistry.load` (the only
way :meth:`ModelRegistry.compare`, ``scripts/monitor.py`` and the retraining trigger get a
model) goes through :func:`load_exported_model`: ``data/model.pt2`` only, no pickle in the
folder, every archive record raw tensors, JSON or plain-tensor sample inputs
(:func:`check_exported_archive`), or :class:`UnsafeModelError` naming model, version and file.

The stored state is plain MLflow metadata, readable in the UI:

- aliases ``champion`` and ``challenger`` on the registered model;
- registered-model tag ``champion_history``: JSON list, oldest first, of
  ``{"version", "previous", "at", "reason"}`` - one entry per champion change, popped by
  :meth:`ModelRegistry.rollback`;
- version tags: ``registered_at``, the source run's ``stage``/``git_commit``/... tags and
  real-domain summary metrics, and per decision ``decision``, ``decision_at``,
  ``compare.diff``, ``compare.ci_low``, ``compare.ci_high``, ``compare.margin``, ...,
  ``previous_champion``, ``superseded_by``, ``rolled_back_at``, ``rollback_reason``.

Concurrent writers are not coordinated (MLflow has no transactions across calls): run
promotion and rollback from one place (one CI job, one operator) at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickletools
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Registered-model tag holding the champion history (JSON list, oldest first).
HISTORY_TAG = "champion_history"
#: The run tags written by ``training.stages`` that are copied onto a new version.
RUN_TAGS = ("stage", "experiment", "config_hash", "git_commit", "sweep_id")
#: Summary metrics of the source run copied onto a new version (``metric.val/real/miou``).
RUN_METRICS = ("miou", "pixel_acc", "macro_f1")
# A registered-model tag holds at most 100 000 characters; ~100 bytes an entry.
_MAX_HISTORY = 200


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed (no challenger, no previous champion...)."""


class UnsafeModelError(RegistryError):
    """A registered model whose artifacts could run code when loaded (a pickle, a missing or
    tampered exported program): refused before anything is deserialized."""


@dataclass(frozen=True)
class Comparison:
    """The outcome of an A/B comparison of two registered versions on the same images.

    Scores are per image (higher is better, e.g. mIoU or pixel accuracy in [0, 1]);
    ``diff`` = mean(challenger - champion) over the ``n`` images scored by both, and
    ``[ci_low, ci_high]`` its two-sided paired-bootstrap interval at ``confidence``.

    ``wins`` is ``ci_low > margin``: the challenger must beat the champion by *more* than
    ``margin`` with the stated confidence (one-sided, the lower bound alone is at
    ``(1 + confidence) / 2``). A challenger that is merely not worse, or better by less than
    the noise of the validation set, does not win - replacing a deployed model has a cost.
    """

    champion_version: str | None
    challenger_version: str | None
    champion_mean: float
    challenger_mean: float
    diff: float
    ci_low: float
    ci_high: float
    margin: float
    confidence: float
    n: int
    n_boot: int
    seed: int

    @property
    def wins(self) -> bool:
        """``True`` when the challenger beats the champion by more than ``margin``."""
        return bool(self.ci_low > self.margin)

    def as_tags(self) -> dict[str, str]:
        """The comparison as ``compare.<field>`` tag values (for a model version)."""
        out = {f"compare.{k}": str(v) for k, v in asdict(self).items()}
        out["compare.wins"] = str(self.wins)
        return out


def paired_bootstrap_ci(
    diffs: np.ndarray, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences.

    Images are resampled with replacement ``n_boot`` times (the pairs stay together, so
    the per-image difficulty shared by both models cancels out); the interval is the
    central ``confidence`` quantile range of the resampled means.

    Args:
        diffs: ``(N,)`` per-image differences (challenger - champion), no NaN.
        confidence: coverage in (0, 1), e.g. 0.95.
        n_boot: number of bootstrap resamples.
        seed: seed of numpy's ``default_rng``: the same inputs give the same interval.

    Returns:
        ``(low, high)``.

    Example:
        >>> paired_bootstrap_ci(np.full(10, 0.2))  # no spread, no uncertainty
        (0.2, 0.2)
    """
    diffs = np.asarray(diffs, dtype=np.float64).reshape(-1)
    if diffs.size < 2:
        raise ValueError(f"diffs: need at least 2 paired scores, got {diffs.size}")
    if not np.isfinite(diffs).all():
        raise ValueError("diffs: expected finite values (drop unscored images first)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = diffs.size
    means = np.empty(n_boot)
    # Chunks bound the (chunk, N) index matrix for large validation sets.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diffs[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def compare_scores(
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    margin: float = 0.01,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    champion_version: str | None = None,
    challenger_version: str | None = None,
) -> Comparison:
    """A :class:`Comparison` from per-image scores of two models on the same images.

    Args:
        champion_scores, challenger_scores: ``(N,)`` per-image scores, image ``i`` the same
            in both. Images where either score is NaN (no labelled pixel) are left out.
        margin: how much better (in score units) the challenger must be to win.
        confidence, n_boot, seed: as for :func:`paired_bootstrap_ci`.
        champion_version, challenger_version: recorded in the result, checked by
            :meth:`ModelRegistry.promote`.
    """
    a = np.asarray(champion_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(challenger_scores, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(
            f"scores: champion and challenger must score the same images, got {a.size} and "
            f"{b.size} scores"
        )
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    diffs = b - a
    low, high = paired_bootstrap_ci(diffs, confidence, n_boot, seed)
    return Comparison(
        champion_version=champion_version,
        challenger_version=challenger_version,
        champion_mean=float(a.mean()),
        challenger_mean=float(b.mean()),
        diff=float(diffs.mean()),
        ci_low=low,
        ci_high=high,
        margin=float(margin),
        confidence=float(confidence),
        n=int(a.size),
        n_boot=int(n_boot),
        seed=int(seed),
    )


def per_image_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int,
    metric: Literal["miou", "pixel_acc"] = "miou",
    device: str | torch.device = "cpu",
    batch_forward: bool = False,
) -> np.ndarray:
    """One score per image, in iteration order, for :meth:`ModelRegistry.compare`.

    Args:
        model: ``(B, 3, H, W) -> (B, C, H, W)`` logits (an ``nn.Module`` or a module loaded
            from the registry).
        batches: Sample dict batches (a DataLoader): ``image`` ``(B, 3, H, W)`` float in
            [0, 1], ``mask`` ``(B, H, W)`` int64 with 255 = ignore.
        num_classes: ``C``.
        metric: ``"miou"`` (mean IoU over the classes present in the image's truth or
            prediction) or ``"pixel_acc"``, from :class:`training.metrics.SegmentationMetrics`.
        device: where the forward pass runs.
        batch_forward: forward whole batches. Off by default because models loaded from the
            registry are ``torch.export`` graphs specialised to batch size 1.

    Returns:
        ``(N,)`` float64; NaN for an image without any labelled pixel.
    """
    if metric not in ("miou", "pixel_acc"):
        raise ValueError(f"metric: expected 'miou' or 'pixel_acc', got {metric!r}")
    # Exported graphs froze their mode (eval) at export time and refuse eval().
    with contextlib.suppress(NotImplementedError):
        model.eval()
    model.to(device)
    from training.metrics import IGNORE_INDEX, SegmentationMetrics  # torchmetrics: seconds

    scores = SegmentationMetrics(num_classes, [f"c{i}" for i in range(num_classes)], IGNORE_INDEX)
    scores.to(device)
    out: list[float] = []
    with torch.no_grad():
        for batch in batches:
            images: Tensor = batch["image"].to(device)
            masks: Tensor = batch["mask"].to(device)
            if batch_forward:
                logits = model(images)
            else:
                logits = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
            for i in range(images.shape[0]):
                scores.reset()
                scores.update(logits[i : i + 1], masks[i : i + 1])
                out.append(scores.compute()[metric])
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------- safe loading
#: The exported program MLflow 3 logs for our models (``training.tracking.log_model``),
#: relative to the downloaded model folder.
EXPORTED_PROGRAM = "data/model.pt2"
#: Files that are (or usually are) pickles: their presence means a tampered or foreign model.
PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".joblib", ".dill", ".ckpt")
# Records of a .pt2 archive (paths below its root folder) that torch reads as plain text.
_PT2_TEXT = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
)
# Globals a torch.save of plain tensors names (the sample inputs of the program).
_SAFE_PICKLE_GLOBALS = re.compile(
    r"torch\._utils _rebuild_tensor_v2|torch\._utils _rebuild_parameter|"
    r"collections OrderedDict|torch [A-Z][A-Za-z0-9]*Storage|torch device|"
    r"torch (?:float|bfloat|int|uint|bool|complex)[0-9a-z_]*"
)
# torch.export's deserializer hands every shape expression to sympy.sympify, which eval()s
# it: only symbols, numbers, operators and these function names may appear.
_SYMPY_NAMES = frozenset(
    {"Symbol", "Integer", "Rational", "Float", "True", "False", "oo", "positive", "integer"}
    | {"nonnegative", "negative", "real", "finite", "Max", "Min", "Abs", "Eq", "Ne", "Lt"}
    | {"Le", "Gt", "Ge", "And", "Or", "Not", "Pow", "Mul", "Add"}
)
_SYM_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<str>'[a-z]+\d+')"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=]))"
)
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")


def _sympy_function_names() -> frozenset[str]:
    import torch.utils._sympy.functions as functions

    return _SYMPY_NAMES | frozenset(getattr(functions, "__all__", ()))


def _safe_expression(expr: str, names: frozenset[str]) -> bool:
    """Whether ``expr`` is a shape expression (symbols, numbers, arithmetic, sympy's and
    torch's shape functions) and nothing that sympify's eval could turn into a call."""
    pos = 0
    while pos < len(expr):
        match = _SYM_TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            return expr[pos:].strip() == ""
        name = match.group("name")
        if name is not None and name not in names and not _SYMBOL_NAME.fullmatch(name):
            return False
        pos = match.end()
    return True


def _unsafe_json(node: Any, names: frozenset[str], path: str = "") -> str | None:
    """The JSON path of the first shape expression or guard that would run code, or None."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "guards_code" and value:
                return where  # exec()ed as Python by ExportedProgram.module()
            if key == "expr_str" and not (
                isinstance(value, str) and _safe_expression(value, names)
            ):
                return where
            found = _unsafe_json(value, names, where)
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _unsafe_json(value, names, f"{path}[{i}]")
            if found:
                return found
    return None


def _check_plain_tensor_pickle(content: bytes) -> str | None:
    """Why a ``torch.save`` archive is not plain tensors (None when it is): every pickle in
    it may name only tensor-rebuilding globals, and ``torch.load(weights_only=True)`` must
    accept it -- so torch's own load of it never falls back to the full unpickler."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as inner:
            pickles = [n for n in inner.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            if len(pickles) != 1:
                return "not a torch.save archive with one data.pkl"
            for op, arg, _ in pickletools.genops(inner.read(pickles[0])):
                if op.name in ("STACK_GLOBAL", "INST", "OBJ"):
                    return f"pickle opcode {op.name}"
                if op.name == "GLOBAL" and not _SAFE_PICKLE_GLOBALS.fullmatch(str(arg)):
                    return f"pickle global {arg!r}"
        torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as err:  # a bad zip, a bad pickle, refused by weights_only
        return f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return None


def check_exported_archive(data: bytes, where: str) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load(...).module()`` could not load
    without running code from it.

    ``torch.export.load`` unpickles pickled weights, constants and the sample inputs with
    the full unpickler, ``pickle.loads`` opaque constants, ``dlopen`` s AOTInductor
    libraries, ``sympify`` s (``eval``) every shape expression, and ``.module()``
    ``exec`` s the program's guards. What :func:`training.tracking.log_model` writes has
    none of that: raw tensor bytes, JSON, and sample inputs that are plain tensors. So every
    record must be one of those; anything else is refused by name.

    Args:
        data: the archive's bytes (checked and loaded from the same bytes: no file can be
            swapped in between).
        where: what the archive is, for the message (``model 'x' version 3: data/model.pt2``).

    Raises:
        UnsafeModelError: naming the offending record.
    """

    def refuse(record: str, why: str) -> UnsafeModelError:
        return UnsafeModelError(
            f"{where}: refusing to load the exported program: record '{record}' {why}. "
            "Registered models are loaded only from an archive of raw tensors and JSON, as "
            "training.tracking.log_model writes it; this one was altered or made otherwise."
        )

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnsafeModelError(
            f"{where}: refusing to load: not a torch.export archive (not a zip file)"
        ) from None
    with archive:
        files = [i.filename for i in archive.infolist() if not i.is_dir()]
        roots = {name.split("/", 1)[0] for name in files}
        if len(roots) != 1 or any("/" not in name for name in files):
            raise UnsafeModelError(f"{where}: refusing to load: not a torch.export archive")
        root = roots.pop() + "/"
        records = {name[len(root) :]: name for name in files}
        if "archive_format" not in records:
            raise refuse("archive_format", "is missing")
        if archive.read(records["archive_format"]).strip() != b"pt2":
            raise refuse("archive_format", "is not 'pt2'")
        allowed = set(_PT2_TEXT)
        names = _sympy_function_names()
        for rel, full in records.items():
            kind, _, leaf = rel.rpartition("/")
            is_config = kind in ("data/weights", "data/constants") and leaf.endswith("_config.json")
            if (kind == "models" and leaf.endswith(".json")) or is_config:
                try:
                    parsed = json.loads(archive.read(full))
                except ValueError:
                    raise refuse(rel, "is not JSON") from None
                allowed.add(rel)
                if kind == "models":
                    bad = _unsafe_json(parsed, names)
                    if bad:
                        raise refuse(rel, f"holds code at '{bad}' (a guard or shape expression)")
                    allowed.add(f"data/sample_inputs/{leaf[: -len('.json')]}.pt")
                    continue
                config = parsed.get("config") if isinstance(parsed, Mapping) else None
                if not isinstance(config, Mapping):
                    raise refuse(rel, "is not a payload config")
                prefix = "weight_" if kind == "data/weights" else "tensor_"
                for fqn, meta in config.items():
                    path_name = meta.get("path_name") if isinstance(meta, Mapping) else None
                    if not isinstance(meta, Mapping) or meta.get("use_pickle") is not False:
                        raise refuse(rel, f"stores '{fqn}' as a pickle")
                    if not (
                        isinstance(path_name, str)
                        and path_name.startswith(prefix)
                        and "/" not in path_name
                    ):
                        raise refuse(rel, f"stores '{fqn}' as {path_name!r}, not a raw tensor")
                    allowed.add(f"{kind}/{path_name}")
        for rel, full in records.items():
            if rel not in allowed:
                raise refuse(rel, "is not part of a plain exported program (code or pickle)")
            if rel.startswith("data/sample_inputs/"):
                why = _check_plain_tensor_pickle(archive.read(full))
                if why:
                    raise refuse(rel, f"is not plain tensors ({why})")


def load_exported_model(path: str | os.PathLike[str], where: str) -> nn.Module:
    """The module of a downloaded MLflow model folder, from its exported program only.

    ``mlflow.pytorch.load_model`` would load a ``data/model.pth`` with the full unpickler
    (MLflow allows pickles by default), and ``torch.export.load`` alone runs pickles and
    code that a crafted ``.pt2`` carries. Here the folder must hold ``data/model.pt2`` and no
    pickle; the archive is checked by :func:`check_exported_archive` and only then loaded
    with ``torch.export.load(...).module()`` from the very bytes that were checked.

    Args:
        path: the downloaded model folder (with ``MLmodel`` and ``data/``).
        where: what it is, for messages, e.g. ``"model 'sim2real-segmenter' version 3"``.

    Raises:
        UnsafeModelError: a pickle in the folder, no ``data/model.pt2``, or an archive that
            would run code; the message names ``where`` and the file.
        RegistryError: the archive passed the checks but torch could not load it.
    """
    root = Path(path)
    pickles = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise UnsafeModelError(
            f"{where}: refusing to load {', '.join(pickles)}: a pickle can run arbitrary code "
            f"when loaded. Registered models are loaded only from the exported program "
            f"{EXPORTED_PROGRAM} (torch.export); re-log the model with "
            "training.tracking.log_model and register it again."
        )
    program = root / EXPORTED_PROGRAM
    if not program.is_file():
        present = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        raise UnsafeModelError(
            f"{where}: {EXPORTED_PROGRAM} not found (the model holds: "
            f"{', '.join(present) or 'nothing'}). Registered models are loaded only from the "
            "exported program that training.tracking.log_model writes."
        )
    data = program.read_bytes()
    check_exported_archive(data, f"{where}: {EXPORTED_PROGRAM}")
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as err:
        raise RegistryError(
            f"{where}: {EXPORTED_PROGRAM} is not a loadable exported program: "
            f"{type(err).__name__}: {err}"
        ) from err


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelRegistry:
    """Champion/challenger versions of one registered segmentation model.

    Args:
        tracking_uri: the MLflow tracking URI (also used as the registry URI), e.g.
            ``sqlite:////abs/path/mlflow.db`` or ``http://server:5000``.
        name: the registered model's name.

    Example:
        >>> reg = ModelRegistry("sqlite:////tmp/mlflow.db")  # doctest: +SKIP
        >>> reg.register(result.run_id)  # doctest: +SKIP
        >>> cmp = reg.compare(lambda m: per_image_scores(m, real_val, 11))  # doctest: +SKIP
        >>> reg.promote(cmp)  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str, name: str = "sim2real-segmenter") -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # ------------------------------------------------------------------ reading state
    def aliases(self) -> dict[str, str]:
        """``{alias: version}`` of the registered model (empty before the first version)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in model.aliases.items()}

    def version_of(self, alias_or_version: str | int) -> str:
        """The version number behind an alias (``"champion"``) or a version (``3``, ``"3"``)."""
        ref = str(alias_or_version)
        if ref.isdigit():
            self.client.get_model_version(self.name, ref)  # raises if it does not exist
            return ref
        aliases = self.aliases()
        if ref not in aliases:
            raise RegistryError(
                f"model '{self.name}' has no alias '{ref}' (aliases: {aliases or 'none'})"
            )
        return aliases[ref]

    def history(self) -> list[dict[str, Any]]:
        """Champion changes, oldest first: ``{"version", "previous", "at", "reason"}``."""
        model = self.client.get_registered_model(self.name)
        return json.loads(model.tags.get(HISTORY_TAG, "[]"))

    def describe(self) -> dict[str, Any]:
        """Versions (with run, source, tags, aliases), aliases and history, for logging."""
        aliases = self.aliases()
        if not aliases and not self._exists():
            return {"name": self.name, "versions": [], "aliases": {}, "history": []}
        versions = self.client.search_model_versions(f"name = '{self.name}'")
        return {
            "name": self.name,
            "versions": [
                {
                    "version": str(v.version),
                    "run_id": v.run_id,
                    "source": v.source,
                    "aliases": sorted(a for a, ver in aliases.items() if ver == str(v.version)),
                    "tags": dict(v.tags),
                }
                for v in sorted(versions, key=lambda v: int(v.version))
            ],
            "aliases": aliases,
            "history": self.history(),
        }

    # ------------------------------------------------------------------ writing state
    def register(
        self, run_id: str, artifact_path: str = "model", tags: Mapping[str, Any] | None = None
    ) -> str:
        """Register the model logged by run ``run_id`` as a new version; return its number.

        The new version becomes ``challenger`` (replacing any previous challenger, which
        keeps its version); the first version ever becomes ``champion`` directly, since
        there is nothing to compare it with.

        Args:
            run_id: the MLflow run that logged the model (``StageResult.run_id``).
            artifact_path: the logged model's name (``name=`` of ``log_model``).
            tags: extra version tags; the run's ``stage``/``git_commit``/... tags and its
                ``<split>/real/{miou, pixel_acc, macro_f1}`` metrics are added automatically.
        """
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(run_id)
        model_id = self._logged_model_id(run, artifact_path)
        try:
            self.client.create_registered_model(
                self.name, description="Semantic segmenter (sim2real-drive), risk T-01."
            )
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version_tags = {k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags}
        for key, value in run.data.metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == "real" and parts[2] in RUN_METRICS:
                version_tags[f"metric.{key}"] = repr(float(value))
        version_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        version_tags["registered_at"] = _now()
        from training.tracking import scoped_tracking_uri

        # the store resolves ``models:/<id>`` through MLflow's process-wide URI
        with scoped_tracking_uri(self.tracking_uri):
            mv = self.client.create_model_version(
                self.name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=version_tags,
                model_id=model_id,
            )
        version = str(mv.version)
        if CHAMPION not in self.aliases():
            self.client.set_registered_model_alias(self.name, CHAMPION, version)
            self._append_history(version, None, "first registered version")
            self._tag(version, {"decision": "first_champion", "decision_at": _now()})
        else:
            self.client.set_registered_model_alias(self.name, CHALLENGER, version)
        return version

    def promote(self, comparison: Comparison | None = None, force: bool = False) -> bool:
        """Make the challenger the champion if it won ``comparison`` (or if ``force``).

        On promotion ``champion`` moves to the challenger's version, ``challenger`` is
        removed, the new champion gets ``previous_champion`` and the old one
        ``superseded_by``, and the change is appended to the ``champion_history`` tag. Without
        a win nothing moves. Either way the decision is written to the challenger's tags.

        Args:
            comparison: the result of :meth:`compare` for the *current* champion and
                challenger (a stale comparison is refused).
            force: promote regardless of the comparison (recorded as ``forced``).

        Returns:
            ``True`` if the challenger became champion.
        """
        aliases = self.aliases()
        challenger = aliases.get(CHALLENGER)
        champion = aliases.get(CHAMPION)
        if challenger is None:
            raise RegistryError(f"model '{self.name}' has no '{CHALLENGER}' to promote")
        if comparison is None and not force:
            raise ValueError("promote: pass the Comparison from compare(), or force=True")
        decision: dict[str, str] = {"decision_at": _now()}
        if comparison is not None:
            stale = (comparison.challenger_version, comparison.champion_version) != (
                challenger,
                champion,
            )
            if stale:
                raise RegistryError(
                    f"promote: the comparison is of challenger {comparison.challenger_version} "
                    f"vs champion {comparison.champion_version}, but the registry now holds "
                    f"challenger {challenger} and champion {champion}; compare again"
                )
            decision.update(comparison.as_tags())
        if not (force or (comparison is not None and comparison.wins)):
            decision["decision"] = "rejected"
            self._tag(challenger, decision)
            return False
        won = comparison is not None and comparison.wins
        decision["decision"] = "promoted" if won else "forced"
        if champion is not None:
            decision["previous_champion"] = champion
        self._tag(challenger, decision)
        self.client.set_registered_model_alias(self.name, CHAMPION, challenger)
        self.client.delete_registered_model_alias(self.name, CHALLENGER)
        if champion is not None:
            self._tag(champion, {"superseded_by": challenger, "superseded_at": _now()})
        reason = "won A/B comparison" if won else "forced promotion"
        if comparison is not None:
            reason += (
                f" (diff {comparison.diff:+.4f}, CI [{comparison.ci_low:+.4f}, "
                f"{comparison.ci_high:+.4f}], margin {comparison.margin})"
            )
        self._append_history(challenger, champion, reason)
        return True

    def withdraw(self, version: str, decision: str, reason: str) -> list[str]:
        """Take ``version`` out of service: tag it ``decision`` (``rejected``,
        ``not_deployable``), ``decision_at`` and ``decision_reason``, and remove every alias
        that points at it. A champion withdrawn this way is also dropped from the champion
        history, so a later :meth:`rollback` never lands on it (only a champion nothing was
        promoted over yet, i.e. the first version, can be withdrawn). The version keeps its
        artifacts. Returns the aliases removed."""
        version = str(version)
        aliases = self.aliases()
        held = sorted(alias for alias, v in aliases.items() if v == version)
        history = self.history()
        if CHAMPION in held and len(history) > 1:
            raise RegistryError(
                f"withdraw: version {version} of '{self.name}' is the champion with a "
                "predecessor; roll back instead"
            )
        self._tag(version, {"decision": decision, "decision_at": _now(), "decision_reason": reason})
        for alias in held:
            self.client.delete_registered_model_alias(self.name, alias)
        if CHAMPION in held:
            self._write_history([h for h in history if h["version"] != version])
        return held

    def rollback(self, reason: str = "manual rollback") -> str:
        """Move ``champion`` back to the previous champion in one call; return its version.

        The rolled-back version gets ``decision=rolled_back``, ``rolled_back_at`` and
        ``rollback_reason`` tags (it keeps its artifacts and can be promoted again later);
        its entry is popped from ``champion_history``, so repeated calls walk further back.

        Raises:
            RegistryError: there is no previous champion, or the ``champion`` alias was moved
                outside this class so the history no longer describes it.
        """
        history = self.history()
        current = self.aliases().get(CHAMPION)
        if len(history) < 2:
            raise RegistryError(
                f"rollback: model '{self.name}' has no previous champion to roll back to "
                f"(champion history: {[h['version'] for h in history]})"
            )
        if history[-1]["version"] != current:
            raise RegistryError(
                f"rollback: champion is version {current} but the champion history ends with "
                f"version {history[-1]['version']}; the alias was moved by hand - set it "
                "explicitly instead"
            )
        history.pop()
        previous = history[-1]["version"]
        self.client.set_registered_model_alias(self.name, CHAMPION, previous)
        self._tag(
            current,
            {"decision": "rolled_back", "rolled_back_at": _now(), "rollback_reason": reason},
        )
        self._tag(previous, {"restored_at": _now(), "restored_reason": reason})
        self._write_history(history)
        return previous

    # ------------------------------------------------------------------ models
    def load(self, alias_or_version: str | int = CHAMPION) -> nn.Module:
        """The PyTorch model of an alias (``"champion"``) or a version number.

        The artifacts are downloaded through this registry's tracking URI (not the
        process-wide one) into a private temporary folder, and the model is built only from
        the exported program ``data/model.pt2`` by :func:`load_exported_model`: never through
        ``mlflow.pytorch.load_model``, which unpickles a ``model.pth`` in full.

        Raises:
            UnsafeModelError: the version's artifacts hold a pickle (``.pth``, ``.pkl``...),
                lack ``data/model.pt2``, or the archive holds anything that would run code
                on load; the message names the model, the version and the file.
        """
        import mlflow

        version = self.version_of(alias_or_version)
        uri = self.client.get_model_version_download_uri(self.name, version)
        with tempfile.TemporaryDirectory(prefix="registry-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=self.tracking_uri
            )
            return load_exported_model(local, f"model '{self.name}' version {version}")

    def compare(
        self,
        evaluate_fn: Callable[[nn.Module], np.ndarray],
        champion: str | int = CHAMPION,
        challenger: str | int = CHALLENGER,
        margin: float = 0.01,
        confidence: float = 0.95,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> Comparison:
        """A/B-compare two versions on the same data.

        Args:
            evaluate_fn: ``model -> (N,)`` per-image scores, higher is better, on the SAME
                images in the same order for both models (e.g. :func:`per_image_scores` on
                the real validation set).
            champion, challenger: aliases or version numbers.
            margin, confidence, n_boot, seed: see :class:`Comparison` and
                :func:`paired_bootstrap_ci`.
        """
        a_version, b_version = self.version_of(champion), self.version_of(challenger)
        a_scores = np.asarray(evaluate_fn(self.load(a_version)))
        b_scores = np.asarray(evaluate_fn(self.load(b_version)))
        return compare_scores(
            a_scores,
            b_scores,
            margin,
            confidence,
            n_boot,
            seed,
            champion_version=a_version,
            challenger_version=b_version,
        )

    # ------------------------------------------------------------------ internals
    def _exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            return False
        return True

    def _logged_model_id(self, run: Any, artifact_path: str) -> str:
        """The id of the logged model ``artifact_path`` of ``run`` (the latest if several)."""
        models = self.client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{artifact_path}'",
        )
        if not models:
            raise RegistryError(
                f"register: run {run.info.run_id} has no logged model named '{artifact_path}' "
                "(log it with training.tracking.log_model first)"
            )
        return max(models, key=lambda m: m.creation_timestamp).model_id

    def _tag(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)

    def _append_history(self, version: str, previous: str | None, reason: str) -> None:
        history = self.history()
        history.append({"version": version, "previous": previous, "at": _now(), "reason": reason})
        self._write_history(history)

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        self.client.set_registered_model_tag(
            self.name, HISTORY_TAG, json.dumps(history[-_MAX_HISTORY:])
        )


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Comparison",
    "ModelRegistry",
    "RegistryError",
    "UnsafeModelError",
    "check_exported_archive",
    "compare_scores",
    "load_exported_model",
    "paired_bootstrap_ci",
    "per_image_scores",
]

"""MLflow plumbing: where runs go, what describes them, dataset lineage, the model.

The embedded default is a SQLite tracking store (and an artifact folder) inside the
project's output folder; ``MLFLOW_TRACKING_URI`` points everything at a server instead.
Credentials (``MLFLOW_TRACKING_PASSWORD``, tokens, ...) are read by MLflow from the
environment and never logged: parameters come from the resolved config only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

# MLflow's limits on a parameter's key and value.
_MAX_KEY, _MAX_VALUE = 250, 6000


def tracking_uri(
    output_dir: str | os.PathLike[str], configured: str | None = None, create: bool = True
) -> str:
    """``configured`` (``tracking.uri``) if given, else ``MLFLOW_TRACKING_URI`` if set, else
    SQLite in ``output_dir`` (created unless not ``create``): an explicit setting beats the
    environment."""
    if configured:
        return str(configured)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(output_dir).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def existing_store_uri(output_dir: str | os.PathLike[str], configured: str | None = None) -> str:
    """:func:`tracking_uri` of a store that must already exist (the scripts that read what
    training wrote); a :class:`~core.config.ConfigError` naming ``paths.output`` when it
    would be a local SQLite store that is not there."""
    from core.config import ConfigError

    store = Path(output_dir) / "mlflow.db"
    if not (configured or os.environ.get("MLFLOW_TRACKING_URI") or store.exists()):
        raise ConfigError(
            f"paths.output: no MLflow store at {store}: run the main job first (python "
            "scripts/pipeline.py), or pass the paths.output it wrote to"
        )
    return tracking_uri(output_dir, configured, create=False)


#: Where the lock that serializes creating a local SQLite store lies, next to the database.
STORE_LOCK = Path("locks") / "mlflow-store.lock"


def sqlite_path(uri: str) -> Path | None:
    """The database file of ``sqlite:///relative.db`` / ``sqlite:////absolute.db``; None for
    an in-memory database or another scheme."""
    scheme, sep, rest = str(uri).partition(":")
    if not sep or scheme.lower() != "sqlite" or not rest.startswith("//"):
        return None
    path = unquote(rest[2:].split("?", 1)[0])
    path = path[1:] if path.startswith("/") else path  # sqlite:/// + the path
    if not path or path == ":memory:":
        return None
    return Path(path)


def store_lock(uri: str) -> Path | None:
    """The lock file of :func:`create_store` for ``uri``: ``locks/mlflow-store.lock`` in the
    database's folder (``<paths.output>/locks/`` for the default store); None when ``uri``
    is no SQLite file."""
    path = sqlite_path(uri)
    return None if path is None else path.resolve().parent / STORE_LOCK


def create_store(uri: str) -> Path | None:
    """Create and migrate the local SQLite store of ``uri`` once, under a lock.

    MLflow creates a store's tables (and runs its schema migrations) in whichever process
    opens an empty database first, with no lock of its own: two runs (or the jobs of a
    parallel sweep) that start on a fresh output folder at once both migrate it and one fails
    with ``sqlite3.OperationalError: table _alembic_tmp_experiments already exists`` (or
    ``duplicate column name``). Here the first caller creates the store while holding
    :data:`STORE_LOCK` (:func:`core.locks.exclusive`); the others wait, then find it complete.
    Call it before anything else opens the store (an ``MlflowClient``, Lightning's
    ``MLFlowLogger``). Other schemes (a server, another database) are left alone. Returns the
    lock file, or None when there was nothing to create.
    """
    lock = store_lock(uri)
    if lock is None:
        return None
    from core.locks import exclusive

    with exclusive(lock, "the MLflow tracking store"):
        open_store(uri)
    return lock


def open_store(uri: str) -> None:
    """Open the store of ``uri`` the way training does (creating and migrating an empty
    SQLite database), without a lock: :func:`create_store` is the call to make."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments(max_results=1)


def artifact_location(output_dir: str | os.PathLike[str], uri: str) -> str | None:
    """Artifacts next to a local SQLite store (MLflow's default would be ``./mlruns`` of
    whatever folder the command ran in); a server decides for itself."""
    if uri.startswith("sqlite:///") or uri.startswith("file:"):
        return (Path(output_dir).resolve() / "mlartifacts").as_uri()
    return None


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The checked-out commit (``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


#: The userinfo of a URI (``user:password@`` or ``token@``): after ``scheme://``, up to the
#: last ``@`` before the path, query or fragment (a password may contain an ``@``).
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")


def redact_uri(text: str, mask: str = "") -> str:
    """``text`` with the userinfo of every URI in it replaced by ``mask``: the project's one
    redaction of URIs (configs, messages, the URIs MLflow reports). With the default
    ``mask`` the credentials go entirely (``http://host``); ``mask="***@"`` keeps a trace
    that there were some (``http://***@host``)."""
    return _USERINFO.sub(mask, text)


def uri_has_userinfo(uri: str) -> bool:
    """Whether ``uri`` (or any URI in the text) carries ``user[:password]@``."""
    return bool(_USERINFO.search(str(uri)))


def redact(config: Any) -> Any:
    """A copy of a plain config with ``user:password@`` removed from every URI in it, so
    a tracking server's credentials never reach MLflow parameters or ``config.yaml``."""
    if isinstance(config, Mapping):
        return {k: redact(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [redact(v) for v in config]
    if isinstance(config, str):
        return redact_uri(config)
    return config


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` within MLflow's parameter limits."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            out[name[:_MAX_KEY]] = text[:_MAX_VALUE]
    return out


def dataset_digest(dataset: Any) -> str:
    """A content digest: from a generated dataset's card (its shard checksums), else from
    the sample ids of a real dataset reader."""
    card = getattr(dataset, "card", None)
    if isinstance(card, Mapping) and "shards" in card:
        blob = json.dumps(
            [card.get("taxonomy_hash"), [s.get("files") for s in card["shards"]]], sort_keys=True
        )
    else:
        ids = getattr(dataset, "ids", None) or [str(i) for i in range(len(dataset))]
        blob = json.dumps(list(ids))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_source(dataset: Any) -> str:
    root = getattr(dataset, "root", None)
    if root is None and hasattr(dataset, "dataset"):  # a Subset
        root = getattr(dataset.dataset, "root", None)
    return Path(root).resolve().as_uri() if root is not None else "unknown"


def log_dataset_inputs(client: Any, run_id: str, datasets: Mapping[str, Any]) -> None:
    """Record each dataset as an MLflow dataset input (name, source folder, digest) with
    its role (``sim_train``, ``real_val`` ...) as the context."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for role, ds in datasets.items():
        if ds is None:
            continue
        source = resolve_dataset_source(dataset_source(ds))
        meta = MetaDataset(
            source, name=f"{role}:{getattr(ds, 'name', role)}", digest=dataset_digest(ds)
        )
        inputs.append(
            DatasetInput(meta._to_mlflow_entity(), [InputTag("mlflow.data.context", role)])
        )
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def log_model(
    run_id: str, model: Any, height: int, width: int, uri: str | None = None, name: str = "model"
) -> None:
    """Log a model under artifact ``name`` with its signature: ``(B, 3, H, W) float32 ->``
    its output (the task model: ``(B, C, H, W)`` logits; a generator: ``(B, 3, H, W)``).

    The export fixes H and W (and leaves the batch free): one registered model serves one
    input size.
    """
    import copy

    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).eval().cpu().to(memory_format=torch.contiguous_format)
    # batch 2: MLflow exports with torch.export, which would pin a batch of 1 as a constant
    example = torch.rand(2, 3, height, width)
    with torch.no_grad():
        out = model(example)
    signature = infer_signature(example.numpy(), out.numpy().astype(np.float32))
    with scoped_tracking_uri(uri):
        _log_model(run_id, model, signature, example, name)


@contextlib.contextmanager
def scoped_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block (calls such as
    ``mlflow.start_run`` and the registry's ``models:/`` lookups read it; ``set_tracking_uri``
    also exports it to ``MLFLOW_TRACKING_URI``), then put both back as they were."""
    import mlflow

    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri()
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _log_model(run_id: str, model: Any, signature: Any, example: Any, name: str) -> None:
    import mlflow
    import torch

    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model,
            name=name,
            signature=signature,
            input_example=example.numpy(),  # MLflow 3 exports the model (torch.export)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


def browse_hint(uri: str) -> str:
    """How to look at the runs of ``uri``: a server's address, else the ``mlflow ui``
    command for a local store (credentials removed)."""
    shown = redact(uri)
    if shown.startswith(("http://", "https://")):
        return f"browse the runs at {shown}"
    return f"browse the runs with:  mlflow ui --backend-store-uri {shown}"

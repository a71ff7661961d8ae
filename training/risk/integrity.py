"""Risk T-07 (data corruption or loss): which datasets a stage read, and whether their
checksums were verified, when, under which card.

Generated datasets carry a sha256 per shard file and a card that checksums itself; the
run verifies them before any stage trains (:func:`training.stages.data.verify_datasets`).
This module reports what that check covered, per dataset role:

* ``risk/T-07/datasets``: the datasets the stage read;
* ``risk/T-07/checksummed``: those with checksums (generated sets; a real reader has none);
* ``risk/T-07/verified``, ``risk/T-07/unverified``: checksummed ones whose files were, or
  were not, found to match their card (an unverified one fires ``data_integrity_unverified``);
* ``risk/T-07/verified_share``: verified / checksummed;
* ``risk/T-07/oldest_verification_h``: hours since the oldest of those verifications.

Each dataset's row (role, name, kind, card digest, files, verified, when) goes to the
stage's dashboard and to the MLflow table ``risk/T-07_datasets.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

__all__ = ["dataset_rows", "integrity_figures"]


def _generated(dataset: Any) -> Any:
    """The :class:`~simulation.dataset.GeneratedDataset` under subsets and screened
    wrappers, or None (a reader without checksums)."""
    from simulation.dataset import GeneratedDataset

    seen = 0
    while dataset is not None and seen < 16:
        if isinstance(dataset, GeneratedDataset):
            return dataset
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None


def dataset_rows(datasets: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per dataset role of ``datasets`` (``None`` values skipped), in role order:
    ``role``, ``name``, ``kind`` (``generated`` or the reader's class), ``card_sha256``
    (the card file's sha256, empty for a reader), ``files`` (checksummed files),
    ``verified`` (bool, None for a reader) and ``verified_at`` (ISO 8601 UTC or None)."""
    rows = []
    for role, dataset in datasets.items():
        if dataset is None:
            continue
        generated = _generated(dataset)
        if generated is None:
            rows.append(
                {
                    "role": role,
                    "name": str(getattr(dataset, "name", "") or type(dataset).__name__),
                    "kind": type(dataset).__name__,
                    "card_sha256": "",
                    "files": 0,
                    "verified": None,
                    "verified_at": None,
                }
            )
            continue
        state = generated.verification()
        rows.append(
            {
                "role": role,
                "name": generated.name,
                "kind": "generated",
                "card_sha256": generated.card_digest,
                "files": int(state["files"]),
                "verified": bool(state["verified"]),
                "verified_at": state["verified_at"],
            }
        )
    return rows


def _age_hours(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (now - when).total_seconds() / 3600.0)


def integrity_figures(
    rows: list[dict[str, Any]], now: datetime | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """``risk/T-07/*`` figures and a one-line summary tag from :func:`dataset_rows`."""
    if not rows:
        return {}, {}
    now = now or datetime.now(timezone.utc)
    checked = [r for r in rows if r["verified"] is not None]
    verified = [r for r in checked if r["verified"]]
    figures = {
        "risk/T-07/datasets": float(len(rows)),
        "risk/T-07/checksummed": float(len(checked)),
        "risk/T-07/verified": float(len(verified)),
        "risk/T-07/unverified": float(len(checked) - len(verified)),
    }
    if checked:
        figures["risk/T-07/verified_share"] = len(verified) / len(checked)
    ages = [a for a in (_age_hours(r["verified_at"], now) for r in verified) if a is not None]
    if ages:
        figures["risk/T-07/oldest_verification_h"] = max(ages)
    readers = [f"{r['role']} ({r['kind']})" for r in rows if r["verified"] is None]
    missing = [r["role"] for r in checked if not r["verified"]]
    text = f"{len(verified)} of {len(checked)} checksummed datasets verified (sha256 of every file)"
    if missing:
        text += "; NOT verified: " + ", ".join(missing)
    if readers:
        text += "; without checksums: " + ", ".join(readers)
    return figures, {"risk/T-07/summary": text}

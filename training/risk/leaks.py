"""Risks S-01 (data leakage) and S-02 (unauthorized access): a scan of what a run logged
for credentials.

Credentials reach this project only through the environment, and the known paths are
redacted (:func:`training.tracking.redact_uri`, the notifiers' own redaction). The scan
catches the regressions: it reads the run's params, its tags, its text artifacts (and
the text files of the stage folder) and looks for

* a URL carrying a password (``scheme://user:password@host``);
* webhook URLs (Slack, Discord, Microsoft Teams / Office 365);
* tokens with a recognisable form (GitHub, Slack, AWS access keys, ``Bearer ...``,
  private-key blocks) and ``password=`` / ``token=`` / ``secret=`` / ``api_key=`` values;
* the literal value of any environment variable whose name says it holds a secret
  (``*PASSWORD*``, ``*TOKEN*``, ``*SECRET*``, ``*WEBHOOK*``, ``*API_KEY*``, ...).

A finding names where it was (``param:<key>``, ``tag:<key>``, ``artifact:<path>``) and
the kind of credential, never the credential. Figures: ``risk/S-01/leaks_found`` and
``risk/S-02/leaks_found`` (a logged credential is both a leak and an open door; the alert
rules ``credential_leak`` and ``credential_exposed`` fail both rows),
``risk/S-01/items_scanned``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LeakScan", "Finding", "redact_secrets", "scan_run", "scan_text"]

#: (kind, pattern) of the credential forms looked for; group ``secret`` (when present) is
#: the part that must be non-trivial for the match to count.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("url_password", re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#\s:@]+:(?P<secret>[^/?#\s@]+)@")),
    ("slack_webhook", re.compile(r"hooks\.slack\.com/(?:services|workflows|triggers)/[\w/-]{8,}")),
    ("discord_webhook", re.compile(r"discord(?:app)?\.com/api/webhooks/\d+/[\w-]{8,}")),
    (
        "teams_webhook",
        re.compile(r"\.webhook\.office\.com/[\w@/.-]{8,}|outlook\.office\.com/webhook/"),
    ),
    ("github_token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("bearer_token", re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)")),
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    (
        "secret_assignment",
        re.compile(
            r"(?i)\b(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)\b"
            r"[\"']?\s*[=:]\s*[\"']?(?P<secret>[^\s\"'&,;}{)(\]\[]{6,})"
        ),
    ),
)
#: Values that are placeholders, not secrets (``password: ***``, ``token=${TOKEN}``).
_PLACEHOLDER = re.compile(
    r"^(?:\*+|<[^>]*>|\$\{[^}]*\}|\$[A-Z_]+|x+|null|none|redacted|changeme)$", re.I
)
#: Environment variable names that hold secrets; their values must appear nowhere.
SECRET_ENV = re.compile(
    r"PASSWORD|PASSWD|TOKEN|SECRET|WEBHOOK|API_KEY|APIKEY|CREDENTIAL|PRIVATE_KEY"
)
#: Text artifacts read by the scan (larger ones are read up to this many bytes).
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".html", ".md", ".log", ".csv", ".jsonl", ".cfg")
MAX_BYTES = 2_000_000


@dataclass(frozen=True)
class Finding:
    """A credential found: where (``param:<key>``, ``tag:<key>``, ``artifact:<path>``,
    ``file:<path>``) and its kind; the credential itself is never kept."""

    where: str
    kind: str


@dataclass
class LeakScan:
    """What :func:`scan_run` found and how much it read."""

    findings: list[Finding] = field(default_factory=list)
    items: int = 0

    def figures(self) -> dict[str, float]:
        n = float(len(self.findings))
        return {
            "risk/S-01/leaks_found": n,
            "risk/S-02/leaks_found": n,
            "risk/S-01/items_scanned": float(self.items),
        }

    def tags(self) -> dict[str, str]:
        if not self.findings:
            return {"risk/S-01/leak_scan": f"clean: {self.items} params, tags and text files"}
        listed = "; ".join(f"{f.kind} in {f.where}" for f in self.findings[:20])
        more = f" (+{len(self.findings) - 20} more)" if len(self.findings) > 20 else ""
        return {"risk/S-01/leak_scan": f"{len(self.findings)} credential(s): {listed}{more}"}


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names say they hold secrets (8+ chars,
    longest first, so a redaction replaces a whole secret before any part of it)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_ENV.search(k.upper()) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def _matches(text: str, secrets: Iterable[str]) -> Iterable[tuple[str, int, int]]:
    for kind, pattern in PATTERNS:
        for m in pattern.finditer(text):
            if "secret" in pattern.groupindex:
                value = m.group("secret")
                if _PLACEHOLDER.match(value) or value.startswith(("${", "$")):
                    continue
                yield kind, m.start("secret"), m.end("secret")
            else:
                yield kind, m.start(), m.end()
    for value in secrets:
        start = text.find(value)
        while start >= 0:
            yield "environment_secret", start, start + len(value)
            start = text.find(value, start + len(value))


def scan_text(text: str, secrets: Iterable[str] = ()) -> list[str]:
    """The kinds of credential found in ``text`` (one entry per kind, sorted)."""
    return sorted({kind for kind, _, _ in _matches(text, list(secrets))})


def redact_secrets(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every credential :func:`scan_text` finds replaced by ``***``
    (``secrets`` default: :func:`secret_values` of this process)."""
    known = secret_values() if secrets is None else list(secrets)
    spans = sorted((start, end) for _, start, end in _matches(text, known))
    out, last = [], 0
    for start, end in spans:
        if start < last:  # overlapping matches: extend the current cut
            if end > last:
                last = end
            continue
        out.append(text[last:start] + "***")
        last = end
    out.append(text[last:])
    return "".join(out)


def _text_of(path: Path) -> str | None:
    if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None


def _artifact_files(repo: Any, folder: str | None = None) -> list[str]:
    paths = []
    for info in repo.list_artifacts(folder):
        if info.is_dir:
            paths.extend(_artifact_files(repo, info.path))
        elif Path(info.path).suffix.lower() in TEXT_SUFFIXES and (info.file_size or 0) <= MAX_BYTES:
            paths.append(info.path)
    return paths


def scan_run(
    client: Any,
    run_id: str,
    pending_tags: Mapping[str, str] | None = None,
    folders: Iterable[str | os.PathLike[str]] = (),
    secrets: Iterable[str] | None = None,
) -> LeakScan:
    """Scan run ``run_id``'s params, tags and text artifacts, ``pending_tags`` (about to be
    set) and the text files under ``folders`` (the stage folder) for credentials.

    ``secrets`` default: :func:`secret_values` of this process's environment."""
    known = secret_values() if secrets is None else list(secrets)
    scan = LeakScan()

    def check(where: str, text: str) -> None:
        scan.items += 1
        scan.findings.extend(Finding(where, kind) for kind in scan_text(text, known))

    run = client.get_run(run_id)
    for key, value in sorted(run.data.params.items()):
        check(f"param:{key}", f"{key}={value}")
    for key, value in sorted({**run.data.tags, **dict(pending_tags or {})}.items()):
        check(f"tag:{key}", f"{key}={value}")
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(run.info.artifact_uri)  # one lookup, not one per file
    with tempfile.TemporaryDirectory(prefix="leak-scan-") as tmp:
        for path in _artifact_files(repo):
            local = Path(repo.download_artifacts(path, tmp))
            text = _text_of(local)
            if text is not None:
                check(f"artifact:{path}", text)
    for folder in folders:
        root = Path(folder)
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            text = _text_of(path)
            if text is not None:
                check(f"file:{path.relative_to(root).as_posix()}", text)
    return scan

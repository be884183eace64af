"""Local paths or Hugging Face Hub ids -> local files, through huggingface_hub and its cache.

A local path always wins. Anything else that looks like ``owner/name`` is a hub repository,
downloaded into the standard Hugging Face cache (``HF_HUB_CACHE``) when online; offline
(``offline=True``, ``--offline`` or ``HF_HUB_OFFLINE=1``) it is read from that cache only. A single
file inside a repository is written ``hf://owner/name/path/in/repo`` (``owner/name@revision/...`` for
a branch, tag or commit). Both environment variables are read when a path is resolved, not when
this module is imported, so setting them late (a test, a notebook) works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HF_URL = re.compile(r"hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^/]+))?/(?P<path>.+)")


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` when given, else the ``HF_HUB_OFFLINE`` environment variable (1/true/yes/on)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def _local(spec: str | Path, relative_to: Path | None) -> Path | None:
    """The local path ``spec`` names, trying ``relative_to`` first (references saved in a directory)."""
    candidates = (
        [(Path(relative_to) / spec).resolve()] if relative_to is not None and not Path(spec).is_absolute() else []
    )
    candidates.append(Path(spec).expanduser())
    return next((p for p in candidates if p.exists()), None)


def _hub_error(what: str, err: Exception, offline: bool) -> FileNotFoundError:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError):
        where = _cache_dir() or "the default Hugging Face cache"
        mode = "offline mode is on" if offline else "the Hub could not be reached"
        return FileNotFoundError(
            f"{what} is not a local path and not in the Hugging Face cache ({where}), and {mode}: "
            "download it once online (without --offline / HF_HUB_OFFLINE), or pass a local path"
        )
    return FileNotFoundError(f"{what}: not a local path, and the Hugging Face Hub says: {str(err).splitlines()[0]}")


def resolve_dir(
    path_or_id: str | Path,
    offline: bool | None = None,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    relative_to: Path | None = None,
) -> Path:
    """A local directory for ``path_or_id``: the directory itself, or the cached hub snapshot."""
    local = _local(path_or_id, relative_to)
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(f"{local} is a file; expected a model directory")
        return local
    spec = str(path_or_id)
    if not _REPO_ID.fullmatch(spec):
        raise FileNotFoundError(f"no directory {spec} (and it is not a Hugging Face Hub id owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = is_offline(offline)
    try:
        return Path(
            snapshot_download(
                spec,
                revision=revision,
                cache_dir=_cache_dir(),
                local_files_only=offline,
                allow_patterns=allow_patterns,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise _hub_error(spec, err, offline) from None


def resolve_file(spec: str | Path, offline: bool | None = None, relative_to: Path | None = None) -> Path:
    """A local file for ``spec``: the file itself, or ``hf://owner/name[@revision]/path`` from the cache."""
    local = _local(spec, relative_to)
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"{local} is a directory; expected a checkpoint file")
        return local
    match = _HF_URL.fullmatch(str(spec))
    if match is None:
        raise FileNotFoundError(f"no file {spec} (a file on the Hub is written hf://owner/name/path/in/repo)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = is_offline(offline)
    try:
        return Path(
            hf_hub_download(
                match["repo"],
                match["path"],
                revision=match["revision"],
                cache_dir=_cache_dir(),
                local_files_only=offline,
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise _hub_error(str(spec), err, offline) from None


__all__ = ["is_offline", "resolve_dir", "resolve_file"]

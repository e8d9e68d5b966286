"""Reaching the Hugging Face Hub for a model named by id: one quick request says whether it answers, so that an
offline machine reads the local cache only and gets one line at once, not a minute of huggingface_hub's retries.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PROBE_TIMEOUT_S = 5.0


def is_local(ident: str) -> bool:
    """Whether `ident` names something on disk (a folder, or a path-shaped name) rather than a Hub repo id."""
    try:
        on_disk = Path(ident).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no file, and no repo id
        return True
    return on_disk or ident.startswith((".", "/", "~")) or ident.count("/") > 1


def reachable() -> bool:
    """Whether the Hub answers: False when the user set HF_HUB_OFFLINE (huggingface_hub then reads the cache only,
    and so do we), else one probe per process."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _probe(constants.ENDPOINT)


@lru_cache(maxsize=4)
def _probe(endpoint: str) -> bool:
    """One HEAD request to `endpoint` (HF_ENDPOINT), no retries; any HTTP answer counts."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception:  # any transport failure (DNS, refused, timeout, proxy): the Hub cannot be reached
        return False
    return True


def cache_only(ident: str) -> bool:
    """True when `ident` is a Hub id and the Hub cannot be reached: load it with `local_files_only=True`."""
    return not is_local(ident) and not reachable()


def unreachable_hint(ident: str) -> str:
    """The end of the one line for a Hub id that could not be loaded from the cache while offline."""
    return (f"'{ident}' is not a local folder, not in the Hugging Face cache, and the Hub "
            "cannot be reached (offline?)")

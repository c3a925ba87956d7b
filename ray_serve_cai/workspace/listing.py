"""List semantics shared by every `list_*` endpoint: search_filter, sort and pagination.

* `search_filter` is a JSON object string; each key (dotted keys reach nested objects, e.g.
  `creator.name`) must match, string values by case-sensitive substring, other values by equality.
* `sort` is a comma-separated list of `+key` / `-key` (a bare key sorts ascending).
* `page_size` defaults to 10; `next_page_token` is opaque and `""` on the last page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from ray_serve_cai.workspace.errors import invalid_argument

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
_MISSING = object()


def lookup_dotted(item: dict[str, Any], dotted_key: str) -> Any:
    """The value at `a.b.c` in nested dicts, or a private sentinel when absent."""
    value: Any = item
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def parse_search_filter(raw: str | None) -> dict[str, Any]:
    if raw is None or raw.strip() == "":
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid_argument(f"search_filter must be a JSON object: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise invalid_argument("search_filter must be a JSON object")
    return parsed


def _matches(item: dict[str, Any], criteria: dict[str, Any]) -> bool:
    for key, wanted in criteria.items():
        actual = lookup_dotted(item, key)
        if actual is _MISSING or actual is None:
            return False
        if isinstance(wanted, str):
            if isinstance(actual, bool):
                if wanted.lower() != str(actual).lower():
                    return False
            elif wanted not in str(actual):
                return False
        elif actual != wanted:
            return False
    return True


def parse_sort(raw: str | None) -> list[tuple[str, bool]]:
    """`"-created_at,+name"` → `[("created_at", True), ("name", False)]` (key, descending)."""
    if raw is None or raw.strip() == "":
        return []
    keys: list[tuple[str, bool]] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        descending = part.startswith("-")
        key = part[1:] if part[0] in "+-" else part
        if not key:
            raise invalid_argument(f"invalid sort key {part!r}")
        keys.append((key, descending))
    return keys


def _sort_value(item: dict[str, Any], key: str) -> tuple[int, Any]:
    value = lookup_dotted(item, key)
    if value is _MISSING or value is None:
        return (0, "")
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, str(value))


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode().rstrip("=")


def decode_page_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        offset = json.loads(base64.urlsafe_b64decode(padded.encode()))["offset"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise invalid_argument("invalid page_token") from None
    if not isinstance(offset, int) or offset < 0:
        raise invalid_argument("invalid page_token")
    return offset


def parse_page_size(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_PAGE_SIZE
    try:
        size = int(raw)
    except ValueError:
        raise invalid_argument("page_size must be an integer") from None
    if size < 0:
        raise invalid_argument("page_size must not be negative")
    if size == 0:
        return DEFAULT_PAGE_SIZE
    return min(size, MAX_PAGE_SIZE)


def list_page(
    items: Sequence[dict[str, Any]],
    list_key: str,
    *,
    search_filter: str | None,
    sort: str | None,
    page_size: str | None,
    page_token: str | None,
) -> dict[str, Any]:
    """Filter, sort and cut one page of API objects (already rendered as dicts, in creation order)."""
    criteria = parse_search_filter(search_filter)
    sort_keys = parse_sort(sort)
    size = parse_page_size(page_size)
    offset = decode_page_token(page_token)
    selected = [item for item in items if _matches(item, criteria)]
    # Python's sort is stable: sort by the least significant key first.
    for key, descending in reversed(sort_keys):
        selected.sort(key=lambda item, key=key: _sort_value(item, key), reverse=descending)
    page = selected[offset : offset + size]
    next_offset = offset + size
    next_token = encode_page_token(next_offset) if next_offset < len(selected) else ""
    return {list_key: page, "next_page_token": next_token}

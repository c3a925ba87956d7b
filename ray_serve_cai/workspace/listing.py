"""List semantics shared by every `list_*` endpoint: search_filter, sort and pagination.

* `search_filter` is a JSON object string; each key (dotted keys reach nested objects, e.g.
  `creator.name`) must match, string values by case-sensitive substring, other values by equality.
  `status` takes the spec's lower-case values (`{"status": "running"}` matches `APPLICATION_RUNNING`
  and `ENGINE_RUNNING`, equality after the prefix); the full enum value works too. Only the keys the
  spec documents for the operation are accepted (`*_FILTER_KEYS`); another key is a 400 naming them.
* `sort` is a comma-separated list of `+key` / `-key` (a bare key sorts ascending), keys as the spec
  documents them (`*_SORT_KEYS`).
* `page_size` defaults to 10; `next_page_token` is opaque and `""` on the last page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ray_serve_cai.workspace.errors import invalid_argument

# The search_filter and sort keys the spec documents per list operation.
_CREATOR = frozenset({"creator.email", "creator.name", "creator.username"})
PROJECT_FILTER_KEYS = _CREATOR | {"description", "name", "owner.email", "owner.name", "owner.username"}
PROJECT_SORT_KEYS = PROJECT_FILTER_KEYS | {"created_at", "updated_at"}
JOB_FILTER_KEYS = _CREATOR | {"description", "kernel", "name", "paused", "script", "type"}
JOB_SORT_KEYS = JOB_FILTER_KEYS | {"created_at", "updated_at"}
# ListJobRuns lists the job keys, then "status" (its values) and "id" in its example.
RUN_FILTER_KEYS = JOB_FILTER_KEYS | {"status", "id"}
RUN_SORT_KEYS = JOB_SORT_KEYS
APP_FILTER_KEYS = _CREATOR | {"bypass_authentication", "description", "kernel", "name", "script", "status",
                              "subdomain"}  # fmt: skip
APP_SORT_KEYS = _CREATOR | {"created_at", "description", "kernel", "name", "script", "status", "updated_at"}
RUNTIME_KEYS = frozenset({"image_identifier", "editor", "kernel", "edition", "description", "full_version"})
EXECUTION_FILTER_KEYS = frozenset({"status"})
EXECUTION_SORT_KEYS = frozenset({"start_time", "end_time", "status"})
NAME_KEYS = frozenset({"name"})
COLLABORATOR_KEYS = frozenset({"username", "permission"})

# `ListWorkloadStatus`: the status values of workload executions (`ExecutionDetails.status`).
WORKLOAD_STATUSES = ("scheduling", "starting", "running", "stopping", "stopped", "succeeded", "failed",
                     "timedout", "skipped", "unknown")  # fmt: skip

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


def _status_matches(actual: Any, wanted: str) -> bool:
    """`running` matches `APPLICATION_RUNNING` / `ENGINE_RUNNING` (the spec's filter values)."""
    text = str(actual)
    return text == wanted or text.split("_", 1)[-1].lower() == wanted.lower()


def _matches(item: dict[str, Any], criteria: dict[str, Any]) -> bool:
    for key, wanted in criteria.items():
        actual = lookup_dotted(item, key)
        if actual is _MISSING or actual is None:
            return False
        if key == "status" and isinstance(wanted, str):
            if not _status_matches(actual, wanted):
                return False
        elif isinstance(wanted, str):
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


def _check_keys(what: str, used: Sequence[str], allowed: frozenset[str] | None) -> None:
    unknown = [key for key in used if allowed is not None and key not in allowed]
    if unknown:
        raise invalid_argument(
            f"{what} key {unknown[0]!r} is not supported; supported keys: {', '.join(sorted(allowed or ()))}"
        )


def list_page(
    items: Sequence[dict[str, Any]],
    list_key: str,
    *,
    search_filter: str | None,
    sort: str | None,
    page_size: str | None,
    page_token: str | None,
    filter_keys: frozenset[str] | None = None,
    sort_keys: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Filter, sort and cut one page of API objects (already rendered as dicts, in creation order).
    `filter_keys` / `sort_keys`: the keys the operation accepts (None: any)."""
    criteria = parse_search_filter(search_filter)
    _check_keys("search_filter", list(criteria), filter_keys)
    sort_keys_given = parse_sort(sort)
    _check_keys("sort", [key for key, _ in sort_keys_given], sort_keys)
    sort_keys_used = sort_keys_given
    size = parse_page_size(page_size)
    offset = decode_page_token(page_token)
    selected = [item for item in items if _matches(item, criteria)]
    # Python's sort is stable: sort by the least significant key first.
    for key, descending in reversed(sort_keys_used):
        selected.sort(key=lambda item, key=key: _sort_value(item, key), reverse=descending)
    page = selected[offset : offset + size]
    next_offset = offset + size
    next_token = encode_page_token(next_offset) if next_offset < len(selected) else ""
    return {list_key: page, "next_page_token": next_token}


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_argument(f"invalid timestamp {value!r} (RFC 3339 expected)") from None


def filter_executions(
    executions: list[dict[str, Any]], multi_column: str | None, time_range: str | None
) -> list[dict[str, Any]]:
    """`ListWorkloadExecutions`' extra filters: `multi_column_search_filter` (`workload_crn`, by
    substring) and `time_range_search_filter` (`start_time`/`end_time`, each `{"min", "max"}`)."""
    columns = parse_search_filter(multi_column)
    _check_keys("multi_column_search_filter", list(columns), frozenset({"workload_crn"}))
    ranges = parse_search_filter(time_range)
    _check_keys("time_range_search_filter", list(ranges), frozenset({"start_time", "end_time"}))
    selected = [e for e in executions if all(str(v) in str(e.get(k, "")) for k, v in columns.items())]
    for key, bounds in ranges.items():
        if not isinstance(bounds, dict):
            raise invalid_argument(f"time_range_search_filter.{key} must be an object with min and/or max")
        low, high = _moment(bounds.get("min")), _moment(bounds.get("max"))
        selected = [
            e for e in selected
            if (moment := _moment(e.get(key))) is not None
            and (low is None or moment >= low) and (high is None or moment <= high)
        ]  # fmt: skip
    return selected

"""Observe before you repeat: create something whose create answer may have been lost.

A create that failed after reaching CML (a 5xx, a broken connection, a 409 after an earlier attempt
went through) may have happened. Callers pass how to create and how to find the result; the
create is repeated only when looking finds nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import CMLAPIError, CMLError

if TYPE_CHECKING:
    from ._client import CMLClient
    from ._models import Application

log = logging.getLogger("ray_serve_cai.cml")

T = TypeVar("T")

# Refusals that will be repeated: bad input, authentication, permission, missing parent object.
PERMANENT_STATUSES = frozenset({400, 401, 403, 404})


def is_permanent(err: CMLError) -> bool:
    return isinstance(err, CMLAPIError) and err.status_code in PERMANENT_STATUSES


def create_or_find(
    create: Callable[[], T],
    find: Callable[[], T | None],
    *,
    what: str,
    attempts: int = 4,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`create()`; when it fails in a way that may hide success, `find()` first, then try again."""
    for attempt in range(1, attempts + 1):
        try:
            return create()
        except CMLError as err:
            if is_permanent(err):
                raise
            found = find()
            if found is not None:
                log.info("%s: created after all (found by looking after: %s)", what, err)
                return found
            if attempt == attempts:
                raise
            log.info("%s: create failed (%s); nothing found, trying again", what, err)
            sleep(min(2.0, 0.25 * 2**attempt))
    raise AssertionError("unreachable")


def create_application_or_find(
    client: CMLClient,
    project_id: str,
    fields: Mapping[str, Any],
    *,
    owner: tuple[str, str],
    attempts: int = 4,
) -> Application:
    """Create the application `fields` describe (its name is `fields["subdomain"]`); after a create
    whose outcome is unknown, look for it by that name before trying again. One found with that
    name whose environment lacks `owner` (a key and its value) belongs to someone else: CMLError."""
    name = fields["subdomain"]
    key, value = owner

    def find() -> Application | None:
        apps = client.list_applications(project_id)
        found = next((a for a in apps if a.key == name), None)
        if found is not None and (found.environment or {}).get(key) != value:
            raise CMLError(f"application {name!r} is taken by an app this cluster does not own")
        return found

    return create_or_find(
        lambda: client.create_application(project_id, **fields),
        find,
        what=f"application {name}",
        attempts=attempts,
    )

"""The CML API v2 client: typed objects, pagination, errors, retries, redaction of secrets.

```python
from ray_serve_cai.cml import CMLClient, CMLSettings

with CMLClient(CMLSettings.from_env()) as client:
    project = client.find_project_by_name("ray-demo")
    apps = client.list_applications(project.id)
```
"""

from ._client import PAGE_SIZE, CMLClient
from ._errors import (
    AmbiguousName,
    BadRequest,
    CMLAPIError,
    CMLConnectionError,
    CMLError,
    CMLSettingsError,
    Conflict,
    CreateOutcomeUnknown,
    Forbidden,
    NotFound,
    RateLimited,
    RefusedField,
    ServerError,
    Unauthorized,
)
from ._models import (
    ACTIVE_RUN_STATUSES,
    APPLICATION_FAILED,
    APPLICATION_RUNNING,
    APPLICATION_STARTING,
    APPLICATION_STOPPED,
    APPLICATION_STOPPING,
    ENGINE_FAILED,
    ENGINE_RUNNING,
    ENGINE_SCHEDULING,
    ENGINE_SKIPPED,
    ENGINE_STARTING,
    ENGINE_STOPPED,
    ENGINE_STOPPING,
    ENGINE_SUCCEEDED,
    ENGINE_TIMEDOUT,
    ENGINE_UNKNOWN,
    PROJECT_TEMPLATES,
    TERMINAL_RUN_STATUSES,
    Application,
    CreateApplication,
    CreateJob,
    FileInfo,
    Job,
    JobRun,
    Project,
    Runtime,
    parse_timestamp,
)
from ._observe import create_application_or_find, create_or_find, is_permanent
from ._retry import RetryPolicy
from ._settings import CMLSettings
from ._transport import application_url, http_client, ssl_context

__all__ = [
    "ACTIVE_RUN_STATUSES",
    "APPLICATION_FAILED",
    "APPLICATION_RUNNING",
    "APPLICATION_STARTING",
    "APPLICATION_STOPPED",
    "APPLICATION_STOPPING",
    "ENGINE_FAILED",
    "ENGINE_RUNNING",
    "ENGINE_SCHEDULING",
    "ENGINE_SKIPPED",
    "ENGINE_STARTING",
    "ENGINE_STOPPED",
    "ENGINE_STOPPING",
    "ENGINE_SUCCEEDED",
    "ENGINE_TIMEDOUT",
    "ENGINE_UNKNOWN",
    "PAGE_SIZE",
    "PROJECT_TEMPLATES",
    "TERMINAL_RUN_STATUSES",
    "AmbiguousName",
    "Application",
    "BadRequest",
    "CMLAPIError",
    "CMLClient",
    "CMLConnectionError",
    "CMLError",
    "CMLSettings",
    "CMLSettingsError",
    "Conflict",
    "CreateApplication",
    "CreateJob",
    "CreateOutcomeUnknown",
    "FileInfo",
    "Forbidden",
    "Job",
    "JobRun",
    "NotFound",
    "Project",
    "RateLimited",
    "RefusedField",
    "RetryPolicy",
    "Runtime",
    "ServerError",
    "Unauthorized",
    "application_url",
    "create_application_or_find",
    "create_or_find",
    "http_client",
    "is_permanent",
    "parse_timestamp",
    "ssl_context",
]

"""Conformance to CML's own API spec: every `/api/v2` answer of the workspace, and every request body
our client sends, checked against `cml-api-v2.swagger.json` while it happens.

Off unless the server is started with `RAY_CAI_WORKSPACE_SPEC=<path to the swagger file>` (the test
suite does; `tests/support/conformance.py`). Violations are appended, one JSON object a line, to
`RAY_CAI_WORKSPACE_CONFORMANCE_LOG` (default `<home>/conformance.jsonl`) before the answer's last byte
leaves, so a test that got its answer can already see what was wrong with it; `GET
/_workspace/conformance` lists them too.

What is checked (JSON Schema draft 4 over the spec's definitions, with `jsonschema`):
* **answers**: a 2xx against the operation's `200` schema, anything else against `runtimeError`; an
  answer the spec does not know (no operation for that method and path) is itself a violation. Objects
  are closed: a field the spec does not define is a violation, except the workspace's few documented
  extensions (`WORKSPACE_EXTENSIONS`). Formats: `date-time` (RFC 3339) and `int64` strings.
* **requests** from our own client (User-Agent `ray-serve-cai…`; tests send off-spec bodies on purpose
  with other clients): the body against the operation's body definition, closed as above, plus no
  `readOnly` field and no field the spec calls deprecated; query parameters the operation does not
  take; `search_filter` keys the operation does not document.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

SPEC_ENV = "RAY_CAI_WORKSPACE_SPEC"
LOG_ENV = "RAY_CAI_WORKSPACE_CONFORMANCE_LOG"
API_PREFIX = "/api/v2"
OWN_CLIENT_AGENT = "ray-serve-cai"
SPEC_URI = "urn:cml-api-v2"

# Fields the workspace adds to CML's objects, each documented where it is rendered (model.py).
WORKSPACE_EXTENSIONS: dict[str, dict[str, Any]] = {
    "Application": {"url": {"type": "string"}, "log_path": {"type": "string"}},
    "JobRun": {
        "log_path": {"type": "string"},
        "failure_reason": {"type": "string"},
        "exit_code": {"type": "integer"},
    },
    "Project": {"error_message": {"type": "string"}},
}


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    template: str
    pattern: re.Pattern[str]
    spec: dict[str, Any] = field(repr=False, hash=False, compare=False)

    def body_schema(self) -> dict[str, Any] | None:
        for parameter in self.spec.get("parameters", []):
            if parameter.get("in") == "body":
                return dict(parameter["schema"])
        return None

    def query_parameters(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.spec.get("parameters", []) if p.get("in") == "query"}

    def takes_multipart(self) -> bool:
        return any(p.get("in") == "formData" for p in self.spec.get("parameters", []))

    def response_schema(self, status: int) -> dict[str, Any] | None:
        responses = self.spec.get("responses", {})
        chosen = responses.get(str(status)) or (responses.get("200") if 200 <= status < 300 else None)
        if chosen is None or not 200 <= status < 300:
            chosen = responses.get("default", {})
        return chosen.get("schema")


def _path_pattern(template: str) -> re.Pattern[str]:
    """`/api/v2/projects/{project_id}/files/{path}:download` → a regex over the raw (encoded) path:
    a parameter is one segment, as in grpc-gateway."""
    pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
    return re.compile(f"^{pattern}$")


def _documented_filter_keys(description: str) -> set[str] | None:
    """The `search_filter` keys a parameter's description documents (None: it lists none)."""
    keys: set[str] = set()
    listed = re.search(r"[Ss]upported search filter keys are:\s*\[([^\]]*)\]", description)
    if listed:
        keys |= {k.strip().strip("\"'") for k in re.split(r"[\s,]+", listed.group(1)) if k.strip()}
    keys |= set(re.findall(r'where "(\w+)" can be one of', description))
    for example in re.findall(r"search_filter\s*=\s*(\{[^}]*\})", description):
        with contextlib.suppress(ValueError):
            keys |= set(json.loads(example))
    return keys or None


def _closed(definitions: dict[str, Any]) -> dict[str, Any]:
    """The definitions with every object closed (`additionalProperties: false`) and the workspace's
    extensions declared."""
    closed = copy.deepcopy(definitions)
    for name, schema in closed.items():
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema.setdefault("properties", {})
            schema["additionalProperties"] = False
        schema.get("properties", {}).update(copy.deepcopy(WORKSPACE_EXTENSIONS.get(name, {})))
    return closed


def _deprecated(schema: dict[str, Any]) -> bool:
    text = f"{schema.get('title', '')} {schema.get('description', '')}".lower()
    return "deprecated" in text


class SpecChecker:
    """The spec's operations and schemas, ready to check one exchange at a time (thread-safe)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from jsonschema import Draft4Validator, FormatChecker
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4

        self.definitions: dict[str, Any] = spec["definitions"]
        document = {**spec, "definitions": _closed(self.definitions)}
        self._registry = Registry().with_resource(SPEC_URI, Resource(contents=document, specification=DRAFT4))
        formats = FormatChecker()

        @formats.checks("int64")
        def _int64(value: object) -> bool:
            return not isinstance(value, str) or re.fullmatch(r"-?\d+", value) is not None

        self._formats = formats
        self._validator_class = Draft4Validator
        self.operations = [
            Operation(op["operationId"], method.upper(), path, _path_pattern(path), op)
            for path, item in spec["paths"].items()
            for method, op in item.items()
            if method != "parameters" and path.startswith(API_PREFIX)
        ]
        # Literal segments before parameters: `/runtimes:update` wins over `/runtimes/{id}`-like templates.
        self.operations.sort(key=lambda op: op.template.count("{"))

    @classmethod
    def from_file(cls, path: Path) -> SpecChecker:
        return cls(json.loads(path.read_text()))

    def match(self, method: str, raw_path: str) -> Operation | None:
        return next(
            (op for op in self.operations if op.method == method and op.pattern.match(raw_path)), None
        )

    def _errors(self, schema: dict[str, Any], instance: Any) -> list[str]:
        resolved = {"$ref": f"{SPEC_URI}{schema['$ref']}"} if "$ref" in schema else schema
        validator = self._validator_class(resolved, registry=self._registry, format_checker=self._formats)
        found = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [f"{_where(error.absolute_path)}: {error.message}" for error in found]

    # ------------------------------------------------------------ the two sides of an exchange

    def check_response(
        self, op: Operation | None, method: str, path: str, status: int, body: bytes
    ) -> list[str]:
        if op is None:
            if 200 <= status < 300:
                return [f"{method} {path}: answered {status} but the spec has no such operation"]
            schema: dict[str, Any] | None = {"$ref": "#/definitions/runtimeError"}
        else:
            schema = op.response_schema(status)
        if schema is None:
            return []
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            return [f"answer {status} is not JSON"]
        return [f"answer {status} {message}" for message in self._errors(schema, payload)]

    def check_request(
        self, op: Operation | None, method: str, path: str, query: str, content_type: str, body: bytes
    ) -> list[str]:
        if op is None:
            return [f"{method} {path}: the spec has no such operation"]
        problems: list[str] = []
        parameters = op.query_parameters()
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in parameters:
                problems.append(f"query parameter {name!r} is not a parameter of {op.operation_id}")
            elif name == "search_filter" and value:
                problems += self._check_filter(parameters[name], value)
        if op.takes_multipart():
            if not content_type.startswith("multipart/form-data"):
                problems.append(f"request body must be multipart/form-data, not {content_type or 'empty'}")
            return problems
        schema = op.body_schema()
        if schema is None:
            if body.strip() not in (b"", b"{}"):
                problems.append("request has a body but the operation takes none")
            return problems
        try:
            payload = json.loads(body) if body.strip() else {}
        except ValueError:
            return [*problems, "request body is not JSON"]
        problems += [f"request {message}" for message in self._errors(schema, payload)]
        problems += self._writable_only(schema, payload)
        return problems

    def _check_filter(self, parameter: dict[str, Any], value: str) -> list[str]:
        documented = _documented_filter_keys(parameter.get("description", ""))
        try:
            criteria = json.loads(value)
        except ValueError:
            return ["search_filter is not JSON"]
        if not isinstance(criteria, dict):
            return ["search_filter is not a JSON object"]
        if documented is None:
            return []
        return [
            f"search_filter key {key!r} is not documented (documented: {', '.join(sorted(documented))})"
            for key in criteria
            if key not in documented
        ]

    def _writable_only(self, schema: dict[str, Any], payload: Any) -> list[str]:
        if "$ref" not in schema or not isinstance(payload, dict):
            return []
        definition = self.definitions.get(schema["$ref"].rsplit("/", 1)[-1], {})
        problems = []
        for name in payload:
            prop = definition.get("properties", {}).get(name, {})
            if prop.get("readOnly"):
                problems.append(f"request field {name!r} is read-only (CML ignores it)")
            elif _deprecated(prop):
                problems.append(f"request field {name!r} is deprecated in the spec")
        return problems


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return "field " + ".".join(parts) if parts else "body"


# ---------------------------------------------------------------- recording


class ViolationLog:
    """Where violations go: a JSON-lines file (appended whole lines) and memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, operation: str, method: str, path: str, problems: list[str]) -> None:
        entry = {"time": time.time(), "operation": operation, "method": method, "path": path,
                 "problems": problems}  # fmt: skip
        line = (json.dumps(entry) + "\n").encode()
        with self._lock:
            self.recorded.append(entry)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line)
            finally:
                os.close(descriptor)
        logger.warning("spec violation in %s %s (%s): %s", method, path, operation, problems[0])


class ConformanceMiddleware:
    """ASGI middleware around the API: checks each `/api/v2` exchange (`SpecChecker`), records what
    deviates (`ViolationLog`) before the answer's last chunk is sent on."""

    def __init__(self, app: ASGIApp, checker: SpecChecker, log: ViolationLog) -> None:
        self.app = app
        self.checker = checker
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?", 1)[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        own_client = headers.get("user-agent", "").startswith(OWN_CLIENT_AGENT)
        op = self.checker.match(method, raw_path)
        request_body = bytearray()
        status = 0
        answer = bytearray()

        async def capturing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_body.extend(message.get("body", b""))
            return message

        async def checking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                answer.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._check(op, method, raw_path, scope, headers, own_client, bytes(request_body),
                                status, bytes(answer))  # fmt: skip
            await send(message)

        await self.app(scope, capturing_receive, checking_send)

    def _check(
        self,
        op: Operation | None,
        method: str,
        raw_path: str,
        scope: Scope,
        headers: dict[str, str],
        own_client: bool,
        request_body: bytes,
        status: int,
        answer: bytes,
    ) -> None:
        try:
            problems = self.checker.check_response(op, method, raw_path, status, answer)
            if own_client:
                query = scope.get("query_string", b"").decode("latin-1")
                content_type = headers.get("content-type", "")
                problems = (
                    self.checker.check_request(op, method, raw_path, query, content_type, request_body)
                    + problems
                )
        except Exception as exc:  # a bug in the checker must not take the API down
            logger.exception("conformance check failed")
            problems = [f"the conformance check itself failed: {type(exc).__name__}: {exc}"]
        if problems:
            self.log.record(op.operation_id if op else "(no such operation)", method, raw_path, problems)


def conformance_from_env(home: Path) -> tuple[SpecChecker, ViolationLog] | None:
    """The checker and log the environment asks for (`RAY_CAI_WORKSPACE_SPEC`), or None."""
    spec = os.environ.get(SPEC_ENV)
    if not spec:
        return None
    log = Path(os.environ.get(LOG_ENV) or home / "conformance.jsonl")
    return SpecChecker.from_file(Path(spec)), ViolationLog(log)

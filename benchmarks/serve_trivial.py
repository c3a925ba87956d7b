"""The trivial Serve deployment `bench_serve.py` measures: answers `ok` at once."""

from ray import serve
from starlette.requests import Request


@serve.deployment
class Hello:
    async def __call__(self, request: Request) -> str:
        return "ok"


app = Hello.bind()

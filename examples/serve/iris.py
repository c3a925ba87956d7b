"""An iris classifier on Ray Serve: scikit-learn trained at start on the data set it ships (no downloads).

- `POST /predict` `{"features": [5.1, 3.5, 1.4, 0.2]}` → `{"species": "setosa", "probability": ...,
  "batch_size": n}`: concurrent requests are classified together (`@serve.batch`); `batch_size` says
  how many were.
- `POST /stream` (same body) streams the answer word by word, like an LLM's tokens.
- WebSocket `/ws`: send `{"features": [...]}`, receive the prediction, as often as you like.

`serve_config.yaml` beside this file deploys it (two replicas); `ray_cluster.serve.config` names it.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from ray import serve

api = FastAPI(title="iris")


class Sample(BaseModel):
    features: list[float] = Field(min_length=4, max_length=4, description="sepal/petal length and width, cm")


@serve.deployment
@serve.ingress(api)
class IrisClassifier:
    def __init__(self) -> None:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        data = load_iris()
        self.species = [str(name) for name in data.target_names]
        self.model = LogisticRegression(max_iter=1000).fit(data.data, data.target)
        self.token_delay_s = 0.05

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` of the Serve config: changed in place, without restarting the replica."""
        self.token_delay_s = float(user_config.get("token_delay_s", self.token_delay_s))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def classify(self, samples: list[list[float]]) -> list[dict[str, Any]]:
        probabilities = self.model.predict_proba(np.array(samples))
        return [
            {
                "species": self.species[int(row.argmax())],
                "probability": round(float(row.max()), 4),
                "batch_size": len(samples),
            }
            for row in probabilities
        ]

    @api.post("/predict")
    async def predict(self, sample: Sample) -> dict[str, Any]:
        return await self.classify(sample.features)

    @api.post("/stream")
    async def stream(self, sample: Sample) -> StreamingResponse:
        result = await self.classify(sample.features)
        words = f"This flower is most likely {result['species']} (p={result['probability']:.2f}).".split()

        async def tokens() -> AsyncIterator[str]:
            for word in words:
                yield word + " "
                await asyncio.sleep(self.token_delay_s)

        return StreamingResponse(tokens(), media_type="text/plain")

    @api.websocket("/ws")
    async def predict_ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive_json()
                await websocket.send_json(await self.classify(Sample(**message).features))
        except WebSocketDisconnect:
            pass


app = IrisClassifier.bind()

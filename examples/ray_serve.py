"""Online scoring with Ray Serve: stateless requests from many clients, batched by @serve.batch.

    pip install "lstm_engine[ray]" "ray[serve]"
    python examples/ray_serve.py [MODEL.safetensors] [--port 8000]

Starts Ray and Serve on this machine, deploys MODEL (a small random LSTM when none is given), sends 32
concurrent requests of different lengths through a handle and one over HTTP, checks each answer against
``model.forward`` run alone, and shuts down. Over HTTP a request is JSON: ``{"x": [[f, f, ...], ...]}``
(steps x features), answered with ``{"y": ...}``:

    curl -X POST http://127.0.0.1:8000/ -d '{"x": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]}'
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import urllib.request

# A demo on this machine: Ray's own servers on 127.0.0.1 only, which Ray decides when it is imported
# (lstm_engine.ray.init_local below checks it). Drop this line and init_local to run on a cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

import lstm_engine as le  # noqa: E402
from lstm_engine.ray import Predictor, init_local  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 1}, num_replicas=2)
class Scorer:
    def __init__(self, path: str) -> None:
        # One load per replica; threads follow the replica's num_cpus (Ray sets OMP_NUM_THREADS).
        self.predict = Predictor(path)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        # The requests that arrived together run as one batch, padded to the longest.
        return list(self.predict({"x": sequences})["y"])

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        y = await self.score(np.asarray(body["x"], dtype=np.float32))
        return {"y": y.tolist()}


def demo_model(path: str) -> None:
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.3  # noqa: E731
    le.save(le.Model([le.LSTM(r(128, 4), r(128, 32), r(128), r(128)), le.Dense(r(2, 32), r(2))]), path)


async def clients(handle, requests: list[np.ndarray]) -> list[np.ndarray]:
    return await asyncio.gather(*(handle.score.remote(x) for x in requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model file (default: a small random LSTM)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    args = parser.parse_args()
    path = args.model or tempfile.mkdtemp() + "/demo.safetensors"
    if args.model is None:
        demo_model(path)
    model = le.load(path)
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((int(rng.integers(1, 50)), model.input_size)).astype(np.float32)
                for _ in range(32)]

    init_local(2)  # on a cluster: ray.init(address="auto")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        handle = serve.run(Scorer.bind(path), route_prefix="/")
        answers = asyncio.run(clients(handle, requests))
        for x, y in zip(requests, answers):
            np.testing.assert_allclose(y, model.forward(x[None])[0][0], rtol=1e-5, atol=1e-6)
        print(f"{len(requests)} requests through the handle: answers match model.forward")

        post = urllib.request.Request(f"http://127.0.0.1:{args.port}/", data=json.dumps({"x": requests[0].tolist()}).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=30) as reply:
            y = np.array(json.load(reply)["y"], dtype=np.float32)
        np.testing.assert_allclose(y, model.forward(requests[0][None])[0][0], rtol=1e-5, atol=1e-6)
        print(f"HTTP: {requests[0].shape} in, {y.shape} out, matches model.forward")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

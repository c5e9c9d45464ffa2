"""Nothing wedges silently: a failure anywhere in a batcher's loop fails only the batch in hand (a 500
naming the model) and later requests are served; a loop that ends anyway marks its version not ready
(/readyz 503, /models says why) until it is restarted, and then it serves again.

Before this, an exception outside the session call (concatenating, delivering rows) ended the loop
and every later request for that version waited forever while /readyz said 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import pytest
import uvicorn
from fastapi import FastAPI
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry
from service_helpers import free_port, publish_model, running_server, solid_png, wait_until

from service.app import create_app
from service.batcher import Batcher
from service.errors import InferenceError
from service.metrics import Metrics
from service.settings import Settings

SIZE = 8


def build_shape_shifting_graph(size: int = SIZE) -> bytes:
    """score = mean brightness, but anomaly_map is [N, N + 1, size]: its row length depends on the
    batch, so a request split over two batches cannot be put back together (a failure in delivery,
    after session.run succeeded). One-frame requests are fine."""
    frames = helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", size, size, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    anomaly_map = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", "M", size])
    nodes = [
        helper.make_node("Cast", ["frames"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["grey"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Div", ["grey", "scale"], ["score"]),
        helper.make_node("Shape", ["frames"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
        helper.make_node("Add", ["n", "one"], ["n_plus_one"]),
        helper.make_node("Concat", ["n", "n_plus_one", "width"], ["map_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["map_shape"],
            ["anomaly_map"],
            value=helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.0]),
        ),
    ]
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("width", TensorProto.INT64, [1], [size]),
    ]
    graph = helper.make_graph(nodes, "shape-shifting", [frames], [score, anomaly_map], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def frames_body(count: int, value: int = 30) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"f{i}.png", solid_png(value), "image/png")) for i in range(count)]


def test_a_failure_after_the_session_ran_fails_that_batch_and_the_next_requests_are_served(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1, graph=build_shape_shifting_graph())
    with (
        running_server(repo, {"max_batch_size": 2}, log_dir=tmp_path) as server,
        server.client(timeout=20) as client,
    ):
        # Three frames with batches of two: rows come back in two batches that do not fit together.
        failed = client.post("/score", files=frames_body(3))
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"] == "inference_failed"
        assert "model bright version 1" in failed.json()["detail"]
        for _ in range(3):  # the loop is alive: one-frame requests are scored as before
            served = client.post("/score", files=frames_body(1))
            assert served.status_code == 200, served.text
        assert client.get("/readyz").status_code == 200
    assert "a batch failed" in server.log()


def test_in_process_a_failure_while_taking_a_batch_fails_only_that_request() -> None:
    calls = {"n": 0}

    def score(frames: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.float32]]:
        return {"score": frames[:, 0, 0, 0].astype(np.float32)}

    async def scenario() -> tuple[str, list[float]]:
        batcher = Batcher(
            score, name="m", version=4, max_queue_delay_ms=0, metrics=Metrics(CollectorRegistry())
        )
        take = batcher._take_batch

        def take_once_broken(parts: list[object]) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("bookkeeping bug")
            take(parts)  # type: ignore[arg-type]

        batcher._take_batch = take_once_broken  # type: ignore[method-assign]
        batcher.start()
        frame = np.full((1, 2, 2, 3), 9, np.uint8)
        with pytest.raises(InferenceError) as caught:
            await asyncio.wait_for(batcher.submit(frame), 10)
        served = await asyncio.wait_for(batcher.submit(frame), 10)
        await batcher.close()
        return caught.value.detail, served["score"].tolist()

    detail, served = asyncio.run(scenario())
    assert "model m version 4" in detail and "bookkeeping bug" in detail
    assert served == [9.0]


class Halt(BaseException):
    """Not an Exception: what the loop's catch-all cannot catch, so the loop ends."""


@contextlib.contextmanager
def in_process_server(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server on loopback, run in a thread of this process so the test can reach the
    app's pool (to break a batcher from outside, which a subprocess would not allow)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http="h11", loop="asyncio", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: server.started, timeout=60), "server did not start"
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_batcher_loop_that_ends_makes_the_version_not_ready_then_it_is_restarted(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish_model(repo, "bright", 1)
    settings = Settings(
        repo=repo,
        flagged_dir=tmp_path / "flagged",
        reload_poll_s=0,
        intra_op_threads=1,
        batcher_restart_s=6.0,  # the not-ready window the test observes
        batcher_restart_max_s=6.0,
    )
    app = create_app(settings)
    png = {"content": solid_png(20), "headers": {"Content-Type": "image/png"}}
    with in_process_server(app) as url, httpx.Client(base_url=url, timeout=20) as client:
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout=60)
        assert client.post("/score", **png).status_code == 200
        broken = app.state.pool.serving()["bright"].batcher

        def halt(parts: list[object]) -> None:
            raise Halt("the collector died")

        broken._take_batch = halt  # the next batch ends the loop itself

        in_hand = client.post("/score", **png)  # answered (not left waiting): retry later
        assert in_hand.status_code == 503, in_hand.text
        assert "bright/1" in in_hand.json()["detail"] or "bright version 1" in in_hand.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "Halt" in ready.json()["detail"]
        model = client.get("/models").json()["models"][0]
        assert "Halt" in model["not_ready"]
        refused = client.post("/score", **png)
        assert refused.status_code == 503 and "Retry-After" in refused.headers

        # Restarted with a fresh batcher on the same session: ready and serving again.
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30)
        assert app.state.pool.serving()["bright"].batcher is not broken
        assert client.post("/score", **png).status_code == 200
        assert client.get("/models").json()["models"][0]["not_ready"] is None

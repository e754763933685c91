"""The request path: images decoded, resized and normalised in the server's preparing threads (off the
event loop, beside the forwards), answering as a forward that prepares them itself."""

from __future__ import annotations

import threading

from tests.conftest import assert_nested_close


def test_images_are_prepared_off_the_event_loop_and_answer_as_unprepared(served_runs, class_folder, monkeypatch):
    from fastapi.testclient import TestClient

    from visionlora.data.images import load_rgb
    from visionlora.serving import app as app_module
    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore

    images = sorted((class_folder / "val").rglob("*.png"))[:3]
    store = ModelStore("cpu")
    served = store.add("ants", served_runs["ants"])
    threads: dict[str, list[str]] = {"decode": [], "inputs": []}
    decode, inputs = app_module.decoded_images, type(served.task.prediction).predict_inputs

    def decoded_images(*args):
        threads["decode"].append(threading.current_thread().name)
        return decode(*args)

    def predict_inputs(*args):
        threads["inputs"].append(threading.current_thread().name)
        return inputs(*args)

    monkeypatch.setattr(app_module, "decoded_images", decoded_images)
    monkeypatch.setattr(type(served.task.prediction), "predict_inputs", predict_inputs)
    with TestClient(create_app(store, ServeSettings(max_wait_ms=1))) as client:
        answer = client.post("/v1/models/ants/predict",
                             files=[("file", (path.name, path.read_bytes())) for path in images])
    assert answer.status_code == 200, answer.text
    assert len(threads["decode"]) == 1 and len(threads["inputs"]) == len(images)
    assert all(name.startswith("visionlora-prepare") for name in threads["decode"] + threads["inputs"]), threads
    monkeypatch.undo()
    unprepared = served.predict([load_rgb(path) for path in images])  # the forward prepares them itself
    assert_nested_close([{k: v for k, v in p.items() if k != "image"} for p in answer.json()["predictions"]],
                        unprepared, where="served against unprepared")

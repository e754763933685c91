"""The server, started for real on a free loopback port and stopped by its process id."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

import visionlora
from tests.browser import Chromium, free_port
from tests.conftest import assert_nested_close

TOKEN = "test-token"


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with ``file`` parts and plain fields."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """A ``visionlora serve`` process on loopback, once ready (its runs loaded); ``key``: the API key it
    is given (by the environment variable), sent with every request unless ``headers`` say otherwise."""

    def __init__(self, runs: list[str], log: Path, *extra: str, key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = log.open("w")
        command = [sys.executable, "-m", "visionlora", "serve", *runs, "--port", str(self.port), *extra]
        environment = {**os.environ, **({"VISIONLORA_API_KEY": key} if key else {})}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not get ready within 120 s")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        sent = {**({"Authorization": f"Bearer {self.key}"} if self.key else {}), **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=60) as answer:
                return answer.status, answer.read(), answer.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("content-type", "")

    def post_files(self, path: str, files, fields=None, headers=None):
        body, content_type = multipart(files, fields)
        return self.request("POST", path, body, {"Content-Type": content_type, **(headers or {})})

    def stop(self) -> int:
        os.kill(self.process.pid, signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


SERVED = ("ants", "bees", "wasps", "boxes", "pose", "regions")


@pytest.fixture(scope="module")
def server(served_runs):
    runs = [f"{name}={served_runs[name]}" for name in SERVED]
    running = Server(runs, served_runs["root"] / "server.log", "--admin-token", TOKEN, "--max-upload-mb", "1",
                     "--precision", "fp32")
    yield running
    # uvicorn finishes in-flight requests on SIGTERM, then ends by that signal
    assert running.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in (served_runs["root"] / "server.log").read_text()


def _post_early_answer(server: Server, path: str, files) -> tuple[int, bytes, str]:
    """POST over a raw socket, reading the answer even when the server answers (413) and closes
    before the whole body is sent, as servers do with oversized uploads."""
    body, content_type = multipart(files)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        try:
            connection.sendall(head + body)
        except OSError:
            pass  # the server stopped reading: its answer is already on the way
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    header, _, payload = answer.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    content = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type:")), "")
    return int(lines[0].split()[1]), payload, content


def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_models_are_listed_and_adapters_share_their_base(server):
    status, body, _ = server.request("GET", "/v1/models")
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert status == 200 and set(models) == set(SERVED)
    # LoRA and DoRA adapters share one peft model; peft holds one adapter type per model, so LoHa has its own
    assert models["ants"]["shares_base_with"] == ["bees"] and models["bees"]["shares_base_with"] == ["ants"]
    assert models["wasps"]["shares_base_with"] == []
    # LoRA adapters share forwards with the other LoRA adapters of their base; DoRA and LoHa ones run alone
    assert models["ants"]["mixes"] and not models["bees"]["mixes"] and not models["wasps"]["mixes"]
    assert "DoRA" in models["bees"]["mixing"] and "LOHA" in models["wasps"]["mixing"]
    assert models["boxes"]["task"] == "detection" and models["pose"]["options"] == ["boxes"]


def test_concurrent_requests_equal_visionlora_predict(server, served_runs, class_folder):
    images = sorted((class_folder / "val").rglob("*.png"))[:6]
    scenes = sorted((served_runs["root"] / "boxes-data" / "val" / "images").glob("*.png"))
    frames = sorted((served_runs["root"] / "pose-data" / "labeled-data").rglob("*.png"))[:2]
    jobs = [(name, p, {}) for name in ("ants", "bees", "wasps") for p in images]
    jobs += ([("boxes", p, {"threshold": "0.0"}) for p in scenes]
             + [("pose", p, {"boxes": "[[2, 3, 60, 70]]"}) for p in frames])
    jobs = jobs[::2] + jobs[1::2]  # interleave the models

    def ask(job):
        name, path, fields = job
        status, body, _ = server.post_files(f"/v1/models/{name}/predict", [(path.name, _png(path))], fields)
        assert status == 200, body
        return json.loads(body)["predictions"][0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, jobs))
    loaded = {name: visionlora.load(served_runs[name]) for name in SERVED}
    for (name, path, _fields), answer in zip(jobs, answers):
        options = {"threshold": 0.0} if name == "boxes" else {"boxes": [[[2, 3, 60, 70]]]} if name == "pose" else {}
        expected = loaded[name].predict([path], **options)[0]
        assert answer["image"] == path.name
        assert_nested_close({key: answer.get(key) for key in expected}, expected)
    scores = {loaded[name].predict(images)[0]["score"] for name in ("ants", "bees", "wasps")}
    assert len(scores) == 3


def test_pose_with_a_served_detector_gives_one_instance_per_box(server, served_runs):
    frame = sorted((served_runs["root"] / "pose-data" / "labeled-data").rglob("*.png"))[0]
    fields = {"detector": "boxes", "detector_threshold": "0.0"}
    status, body, _ = server.post_files("/v1/models/pose/predict", [(frame.name, _png(frame))], fields)
    assert status == 200, body
    instances = json.loads(body)["predictions"][0]["instances"]
    boxes = visionlora.load(served_runs["boxes"]).predict([frame], threshold=0.0)[0]["boxes"]
    assert len(instances) == len(boxes) > 1
    expected = visionlora.load(served_runs["pose"]).predict([frame], boxes=[[b["box"] for b in boxes]],
                                                            box_scores=[[b["score"] for b in boxes]])[0]
    assert_nested_close(instances, expected["instances"])
    status, body, _ = server.post_files("/v1/models/pose/predict", [(frame.name, _png(frame))],
                                        {**fields, "max_instances": "1"})
    assert status == 200, body
    best = max(boxes, key=lambda box: box["score"])["box"]
    assert [i["box"] for i in json.loads(body)["predictions"][0]["instances"]] == [pytest.approx(best, abs=0.01)]


def test_segmentation_answers_with_class_areas_and_the_mask(server, served_runs):
    image = sorted((served_runs["root"] / "regions-data" / "val" / "images").glob("*.png"))[0]
    status, body, _ = server.post_files("/v1/models/regions/predict", [(image.name, _png(image))])
    assert status == 200, body
    answer = json.loads(body)["predictions"][0]
    assert answer == {"image": image.name, **visionlora.load(served_runs["regions"]).predict([image])[0]}
    mask = Image.open(io.BytesIO(base64.b64decode(answer["mask"])))
    assert mask.mode == "P" and mask.size == Image.open(image).size
    assert sum(answer["areas"].values()) == mask.size[0] * mask.size[1]


def test_draw_returns_a_png(server, class_folder):
    path = next((class_folder / "val").rglob("*.png"))
    status, body, content_type = server.post_files("/v1/models/ants/draw", [(path.name, _png(path))])
    assert status == 200 and content_type == "image/png"
    assert Image.open(io.BytesIO(body)).size == Image.open(path).size


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case, expected_status, message", [
    ("not an image", 400, "not a readable image"),
    ("truncated", 400, "cannot decode"),
    ("bomb", 400, "pixel limit"),
    ("too large", 413, "larger than the server's limit"),
    ("unknown model", 404, "no model named 'nope'"),
    ("no file", 400, "no 'file' field"),
    ("malformed", 400, "malformed multipart body"),
    ("bad threshold", 400, "threshold must be"),
    ("bad boxes", 400, "boxes"),
    ("option of another task", 400, "take no option 'threshold'"),
    ("not multipart", 400, "expected a multipart/form-data upload"),
    ("detector not a detection model", 400, "detector 'ants' is a classification model, not a detection model"),
    ("detector for a classification model", 400, "take no option 'detector'"),
    ("unknown detector label", 400, "finds no label 'cat'"),
])
def test_bad_requests_get_a_clear_4xx(server, class_folder, case, expected_status, message):
    good = _png(next((class_folder / "val").rglob("*.png")))
    if case == "not an image":
        answer = server.post_files("/v1/models/ants/predict", [("notes.png", b"plain text")])
    elif case == "truncated":
        answer = server.post_files("/v1/models/ants/predict", [("cut.png", good[: len(good) // 2])])
    elif case == "bomb":
        answer = server.post_files("/v1/models/ants/predict", [("bomb.png", _bomb())])
    elif case == "too large":
        answer = _post_early_answer(server, "/v1/models/ants/predict", [("big.png", good + b"\0" * (2 << 20))])
    elif case == "unknown model":
        answer = server.post_files("/v1/models/nope/predict", [("a.png", good)])
    elif case == "no file":
        answer = server.post_files("/v1/models/ants/predict", [], {"other": "1"})
    elif case == "malformed":
        answer = server.request("POST", "/v1/models/ants/predict", b"--x\r\nbroken",
                                {"Content-Type": "multipart/form-data; boundary=zzz"})
    elif case == "bad threshold":
        answer = server.post_files("/v1/models/boxes/predict", [("a.png", good)], {"threshold": "high"})
    elif case == "bad boxes":
        answer = server.post_files("/v1/models/pose/predict", [("a.png", good)], {"boxes": "[[1, 2]]"})
    elif case == "detector not a detection model":
        answer = server.post_files("/v1/models/pose/predict", [("a.png", good)], {"detector": "ants"})
    elif case == "detector for a classification model":
        answer = server.post_files("/v1/models/ants/predict", [("a.png", good)], {"detector": "boxes"})
    elif case == "unknown detector label":
        answer = server.post_files("/v1/models/pose/predict", [("a.png", good)],
                                   {"detector": "boxes", "detector_label": "cat"})
    elif case == "option of another task":
        answer = server.post_files("/v1/models/ants/predict", [("a.png", good)], {"threshold": "0.5"})
    else:
        answer = server.request("POST", "/v1/models/ants/predict", b"{}", {"Content-Type": "application/json"})
    status, body, content_type = answer
    assert status == expected_status, body
    assert content_type.startswith("application/json")
    assert message in json.loads(body)["error"]
    assert server.request("GET", "/health")[0] == 200  # still serving


def test_an_adapter_with_only_pickled_weights_is_refused_on_a_shared_base(served_runs, tmp_path):
    """The pickle refusal holds for a second adapter joining a base already in memory, too."""
    import torch
    from safetensors.torch import load_file

    from visionlora.serving.models import ModelStore

    pickled = tmp_path / "pickled"
    shutil.copytree(served_runs["bees"], pickled)  # a DoRA adapter: peft type LORA, sharing ants' base
    adapter = pickled / "trained_model_lora" / "adapter_model.safetensors"
    torch.save(load_file(adapter), adapter.with_name("adapter_model.bin"))
    adapter.unlink()
    store = ModelStore("cpu")
    store.add("ants", served_runs["ants"])
    with pytest.raises(visionlora.VisionLoraError, match="only pickled weights"):
        store.add("pickled", pickled)
    assert set(store.models) == {"ants"}


def test_admin_loads_and_unloads_runs_only_with_the_token(server, served_runs):
    payload = json.dumps({"name": "ants-again", "path": str(served_runs["ants"])}).encode()
    json_type = {"Content-Type": "application/json"}
    assert server.request("POST", "/v1/models", payload, json_type)[0] == 401
    assert server.request("POST", "/v1/models", payload, {**json_type, "Authorization": "Bearer wrong"})[0] == 401
    status, body, _ = server.request("POST", "/v1/models", payload, {**json_type, "Authorization": f"Bearer {TOKEN}"})
    assert status == 201 and "ants" in json.loads(body)["shares_base_with"]
    names = [m["name"] for m in json.loads(server.request("GET", "/v1/models")[1])["models"]]
    assert "ants-again" in names
    assert server.request("DELETE", "/v1/models/ants-again")[0] == 401
    assert server.request("DELETE", "/v1/models/ants-again", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    names = [m["name"] for m in json.loads(server.request("GET", "/v1/models")[1])["models"]]
    assert "ants-again" not in names


def test_metrics_count_requests_and_batches(server, class_folder):
    path = next((class_folder / "val").rglob("*.png"))
    server.post_files("/v1/models/bees/predict", [(path.name, _png(path))])
    status, body, _ = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'visionlora_requests_total{endpoint="predict",model="bees",status="200"}' in text
    assert "visionlora_request_seconds_bucket" in text and 'visionlora_batch_images_count{model="bees"}' in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_shows_a_drawn_prediction_in_chromium(server, class_folder, tmp_path):
    """A person's path: open the page, pick a model, choose an image, press Predict, see the drawing."""
    image = next((class_folder / "val").rglob("*.png"))
    browser = Chromium(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for(f"document.querySelectorAll('#model option').length === {len(SERVED)}")
        browser.evaluate("document.getElementById('model').value = 'bees'")
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        browser.evaluate("document.querySelector('#try button').click()")
        size = browser.wait_for("(() => { const i = document.getElementById('drawn');"
                                " return !i.hidden && i.complete && i.naturalWidth"
                                " ? [i.naturalWidth, i.naturalHeight] : null })()")
        shown = json.loads(browser.evaluate("document.getElementById('json').textContent"))
        table = browser.evaluate("Array.from(document.querySelectorAll('#models tbody tr'), "
                                 "r => Array.from(r.cells, c => c.textContent))")
    finally:
        browser.close()
    assert size == list(Image.open(image).size)
    rows = {cells[0]: cells for cells in table}
    assert set(rows) == set(SERVED) and rows["bees"][2] == "loaded, kept" and "DoRA" in rows["bees"][4]
    assert shown["predictions"][0]["image"] == image.name and "label" in shown["predictions"][0]


def test_sigterm_lets_an_in_flight_request_finish(served_runs, class_folder):
    """A request waiting in a long batching window still gets its answer when the server is told to stop."""
    path = next((class_folder / "val").rglob("*.png"))
    running = Server([f"ants={served_runs['ants']}"], served_runs["root"] / "server-sigterm.log",
                     "--max-wait-ms", "3000", "--max-batch-size", "4", "--precision", "bf16")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(running.post_files, "/v1/models/ants/predict", [(path.name, _png(path))])
        time.sleep(1.0)
        assert not pending.done()
        code = running.stop()
        status, body, _ = pending.result(timeout=60)
    assert status == 200 and json.loads(body)["predictions"][0]["image"] == path.name
    assert code in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def runs_folder(served_runs, tmp_path_factory):
    """A folder of runs to serve with ``--runs-dir``: a mixing LoRA adapter, a DoRA one on its base, a detector."""
    folder = tmp_path_factory.mktemp("runs-folder")
    for name in ("ants", "bees", "boxes"):
        shutil.copytree(served_runs[name], folder / name)
    return folder


def _ask_in_process(client, name: str, image: Path):
    return client.post(f"/v1/models/{name}/predict", files={"file": (image.name, image.read_bytes())})


def _groups_of_loaded_runs(store) -> set[tuple]:
    return {served.batch_group(True) for served in store.models.values()}


def test_an_evicted_runs_batcher_is_dropped_and_a_new_request_loads_it_again(runs_folder, class_folder):
    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore

    image = next((class_folder / "val").rglob("*.png"))
    store = ModelStore("cpu", runs_folder, max_loaded=1)
    app = create_app(store, ServeSettings(max_wait_ms=1))
    server, groups, first = app.state.server, {}, {}
    with TestClient(app) as client:
        for name, evicted in (("ants", None), ("boxes", "ants"), ("bees", "boxes"), ("ants", "bees")):
            answer = _ask_in_process(client, name, image)
            assert answer.status_code == 200, answer.text
            first.setdefault(name, answer.json())
            groups[name] = store.models[name].batch_group(True)
            assert set(store.models) == {name}
            assert set(server.batchers) == _groups_of_loaded_runs(store) == {groups[name]}
            if evicted is not None:
                assert groups[evicted] not in server.batchers, f"{evicted}'s batcher outlived its run"
        assert_nested_close(answer.json(), first["ants"], where="ants loaded again")
        metrics = client.get("/metrics").text
    assert groups["ants"][0] == "base" and groups["bees"] == ("run", "bees")
    assert "visionlora_adapter_evictions_total 3.0" in metrics


def test_an_admin_unload_drops_the_batchers_only_that_run_used(served_runs, class_folder):
    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore

    image = next((class_folder / "val").rglob("*.png"))
    store = ModelStore("cpu")
    for name, run in (("ants", "ants"), ("ants-again", "ants"), ("bees", "bees")):
        store.add(name, served_runs[run])
    app = create_app(store, ServeSettings(max_wait_ms=1, admin_token=TOKEN))
    server, admin = app.state.server, {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        assert all(_ask_in_process(client, name, image).status_code == 200 for name in list(store.models))
        mixing = store.models["ants"].batch_group(True)
        assert set(server.batchers) == {mixing, ("run", "bees")}
        steps = (("bees", {mixing}), ("ants-again", {mixing}), ("ants", set()))
        for name, batchers_left in steps:  # the base's batcher goes with the last run on the base
            assert client.delete(f"/v1/models/{name}", headers=admin).status_code == 200
            assert set(server.batchers) == batchers_left, name
        assert _ask_in_process(client, "ants", image).status_code == 404


def test_the_lifespan_starts_the_pools_and_its_end_shuts_them_down(runs_folder, class_folder):
    import threading

    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, create_app
    from visionlora.serving.models import ModelStore

    image = next((class_folder / "val").rglob("*.png"))
    app = create_app(ModelStore("cpu", runs_folder), ServeSettings(max_wait_ms=1))
    server = app.state.server
    assert server.forward_pool is None and server.load_pool is None
    with TestClient(app) as client:
        pools = [server.forward_pool, server.load_pool]
        assert _ask_in_process(client, "ants", image).status_code == 200  # a load, then a forward
        assert client.get("/v1/models").status_code == 200
        threads = [t for t in threading.enumerate() if t.name.startswith(("visionlora-forward", "visionlora-load"))]
        (batcher,) = server.batchers.values()
    assert {t.name.split("_")[0] for t in threads} == {"visionlora-forward", "visionlora-load"}
    assert not any(thread.is_alive() for thread in threads)
    for pool in pools:
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(print)
    assert server.forward_pool is None and server.batchers == {} and batcher.stopped
    answer = TestClient(app).get("/v1/models")  # no lifespan (e.g. a mounted app): the pools start on first need
    assert answer.status_code == 200 and server.forward_pool is not None
    server.stop()


def test_a_stopped_batcher_fails_the_jobs_it_holds_and_those_waiting():
    import asyncio

    from visionlora.serving.batching import Batcher, BatcherStopped, Job

    def slow_predict(images, models, **options):
        time.sleep(0.3)
        return [{} for _ in images]

    async def scenario():
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(slow_predict, pool, max_batch_size=1, max_wait_ms=0)
            requests = [asyncio.create_task(batcher.submit(Job([None], {}, ()))) for _ in range(3)]
            await asyncio.sleep(0.1)  # the first job is in its forward, the others wait
            batcher.stop()
            results = await asyncio.gather(*requests, return_exceptions=True)
            with pytest.raises(BatcherStopped):
                await batcher.submit(Job([None], {}, ()))
        return results, batcher.worker

    results, worker = asyncio.run(scenario())
    assert [type(result) for result in results] == [BatcherStopped] * 3
    assert worker.done()

"""The server for clients no one here wrote: Hugging Face's InferenceClient, raw and base64 bodies,
TorchServe's and the Open Inference Protocol's routes; its API key, hostile and odd images,
readiness, a bounded queue and deadlines."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visionlora
from tests.conftest import assert_nested_close
from tests.test_serve import Server
from visionlora.cli import main
from visionlora.data.images import UnreadableImage, load_rgb

KEY = "client-key-7f3a"
CLIENT_RUNS = ("ants", "boxes", "regions", "pose")
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def keyed(served_runs):
    """A server with an API key (given by the environment variable) and a 1-megapixel image limit."""
    runs = [f"{name}={served_runs[name]}" for name in CLIENT_RUNS]
    log = served_runs["root"] / "server-clients.log"
    running = Server(runs, log, "--max-pixels", str(MAX_PIXELS), "--precision", "fp32", key=KEY)
    yield running
    running.stop()
    text = log.read_text()
    assert "Traceback" not in text and KEY not in text  # the key is never logged


@pytest.fixture(scope="module")
def loaded(served_runs):
    return {name: visionlora.load(served_runs[name]) for name in CLIENT_RUNS}


def _image(served_runs, name: str) -> Path:
    """The first validation image of the ``boxes`` or ``regions`` run's data."""
    return sorted((served_runs["root"] / f"{name}-data" / "val" / "images").glob("*.png"))[0]


def _error(answer) -> str:
    status, body, content_type = answer
    assert content_type.startswith("application/json"), (status, body)
    message = json.loads(body)["error"]
    assert "\n" not in message
    return message


# -- Hugging Face's client, raw bodies, base64 JSON, TorchServe ------------------------------------------

def test_hugging_face_inference_client_classifies_detects_and_segments_as_predict(keyed, loaded, served_runs,
                                                                                  class_folder, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's offline mode; the client asks loopback only

    photo = sorted((class_folder / "val").rglob("*.png"))[0]
    client = InferenceClient(model=f"{keyed.url}/hf/models/ants", api_key=KEY)
    expected = loaded["ants"].predict([photo])[0]["top_k"]
    assert [(c.label, c.score) for c in client.image_classification(photo)] == \
        [(e["label"], pytest.approx(e["score"], abs=1e-5)) for e in expected]
    expected = loaded["ants"].predict([photo], top_k=2, function_to_apply="sigmoid")[0]["top_k"]
    answer = client.image_classification(photo, top_k=2, function_to_apply="sigmoid")
    assert len(answer) == 2 and [(c.label, c.score) for c in answer] == \
        [(e["label"], pytest.approx(e["score"], abs=1e-5)) for e in expected]
    assert expected != loaded["ants"].predict([photo], top_k=2)[0]["top_k"]  # sigmoid scores are not softmax ones

    scene = _image(served_runs, "boxes")
    found = InferenceClient(model=f"{keyed.url}/hf/models/boxes", api_key=KEY).object_detection(scene, threshold=0.0)
    boxes = loaded["boxes"].predict([scene], threshold=0.0)[0]["boxes"]
    assert len(found) == len(boxes) > 0
    for item, box in zip(found, boxes):
        assert item.label == box["label"] and item.score == pytest.approx(box["score"], abs=1e-5)
        assert [item.box.xmin, item.box.ymin, item.box.xmax, item.box.ymax] == [round(v) for v in box["box"]]

    shapes = _image(served_runs, "regions")
    masks = InferenceClient(model=f"{keyed.url}/hf/models/regions", api_key=KEY).image_segmentation(shapes)
    expected = loaded["regions"].predict([shapes])[0]
    classes = np.asarray(Image.open(io.BytesIO(base64.b64decode(expected["mask"]))))
    assert [m.label for m in masks] == list(expected["areas"])
    for mask in masks:
        index = loaded["regions"].info.labels.index(mask.label)
        assert mask.mask.mode == "L" and np.array_equal(np.asarray(mask.mask) == 255, classes == index)


def test_raw_base64_and_torchserve_bodies_answer_as_predict(keyed, loaded, served_runs, class_folder):
    photo = sorted((class_folder / "val").rglob("*.png"))[1]
    expected = loaded["ants"].predict([photo])[0]
    raw = keyed.request("POST", "/v1/models/ants/predict", photo.read_bytes(), {"Content-Type": "image/png"})
    assert raw[0] == 200, raw
    assert_nested_close(json.loads(raw[1])["predictions"][0], {"image": "image", **expected})
    torchserve = keyed.request("POST", "/predictions/ants", photo.read_bytes(), {"Content-Type": "image/png"})
    assert torchserve[0] == 200 and json.loads(torchserve[1])["label"] == expected["label"]

    scene = _image(served_runs, "boxes")
    payload = {"inputs": base64.b64encode(scene.read_bytes()).decode(), "parameters": {"threshold": 0.0}}
    answer = keyed.request("POST", "/v1/models/boxes/predict", json.dumps(payload).encode(),
                           {"Content-Type": "application/json"})
    assert answer[0] == 200, answer
    assert_nested_close(json.loads(answer[1])["predictions"][0]["boxes"],
                        loaded["boxes"].predict([scene], threshold=0.0)[0]["boxes"])
    frame = next((served_runs["root"] / "pose-data" / "labeled-data").rglob("*.png"))
    payload = {"inputs": "data:image/png;base64," + base64.b64encode(frame.read_bytes()).decode(),
               "parameters": {"boxes": [[2, 3, 60, 70]]}}
    answer = keyed.request("POST", "/hf/models/pose", json.dumps(payload).encode())  # urllib's default type: sniffed
    assert answer[0] == 200, answer
    instance = json.loads(answer[1])[0]
    expected = loaded["pose"].predict([frame], boxes=[[[2, 3, 60, 70]]])[0]["instances"][0]
    assert instance["box"] == {"xmin": 2, "ymin": 3, "xmax": 60, "ymax": 70}
    assert [k["label"] for k in instance["keypoints"]] == [k["name"] for k in expected["keypoints"]]
    # the server's threads may pick other kernels than this process: coordinates agree within a rounding step
    assert_nested_close([[k["x"], k["y"]] for k in instance["keypoints"]],
                        [[k["x"], k["y"]] for k in expected["keypoints"]], tolerance=0.011)


# -- the API key -----------------------------------------------------------------------------------------

GUARDED = [("GET", "/"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v2/health/ready"),
           ("GET", "/v2/models/ants/ready"), ("POST", "/v1/models/ants/predict"), ("POST", "/v1/models/ants/draw"),
           ("POST", "/hf/models/ants"), ("POST", "/predictions/ants"), ("GET", "/no/such/route")]


def test_the_api_key_guards_every_route_but_liveness(keyed, class_folder):
    photo = sorted((class_folder / "val").rglob("*.png"))[0].read_bytes()
    for method, path in GUARDED:
        body = photo if method == "POST" else None
        for header in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = keyed.request(method, path, body, {"Content-Type": "image/png", **header})
            assert answer[0] == 401, (method, path, header)
            assert "Authorization: Bearer" in _error(answer)
        assert keyed.request(method, path, body, {"Content-Type": "image/png"})[0] != 401, path
    for path in ("/health", "/v2/health/live"):
        assert keyed.request("GET", path, headers={"Authorization": ""})[0] == 200
    metrics = keyed.request("GET", "/metrics")[1].decode()
    assert f'visionlora_refusals_total{{cause="unauthorized"}} {3.0 * len(GUARDED)}' in metrics


def test_a_bind_beyond_loopback_needs_a_key_or_allow_unauthenticated(served_runs, monkeypatch, capsys):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(kwargs["host"]))
    monkeypatch.delenv("VISIONLORA_API_KEY", raising=False)
    run = str(served_runs["ants"])
    assert main(["serve", run, "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--host 0.0.0.0 listens beyond this machine: give an API key" in error and len(error.splitlines()) == 1
    assert main(["serve", run, "--host", "0.0.0.0", "--allow-unauthenticated"]) == 0
    assert main(["serve", run, "--host", "::1"]) == 0
    monkeypatch.setenv("VISIONLORA_API_KEY", KEY)
    assert main(["serve", run, "--host", "10.1.2.3"]) == 0
    assert started == ["0.0.0.0", "::1", "10.1.2.3"]
    assert KEY not in capsys.readouterr().out


# -- hostile and odd images ---------------------------------------------------------------------------

def _encoded(image: Image.Image, form: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=form, **options)
    return buffer.getvalue()


def _claiming(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header claims ``width`` x ``height`` pixels."""
    return _encoded(Image.new("1", (width, height)), "PNG")


def test_the_pixel_limit_is_checked_before_decoding():
    tracemalloc.start()
    with pytest.raises(UnreadableImage, match="over the pixel limit of 1000000"):
        load_rgb(_claiming(5000, 5000), max_pixels=MAX_PIXELS)  # 25 MP: 25 MB as greyscale once decoded
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000


@pytest.mark.parametrize("case, content_type, expected_status, message", [
    ("over the pixel limit", "image/png", 400, "over the pixel limit of 1000000"),
    ("truncated png", "image/png", 400, "cannot decode"),
    ("truncated jpeg", "image/jpeg", 400, "cannot decode"),
    ("not an image", "image/png", 400, "not a readable image"),
    ("empty body", "image/png", 400, "empty body"),
    ("wrong content type", "text/plain", 415, "content type 'text/plain' is not taken"),
    ("not base64", "application/json", 400, "not base64"),
    ("json without inputs", "application/json", 400, "the JSON body has no image"),
])
def test_hostile_images_get_a_one_line_4xx_and_the_server_serves_on(keyed, class_folder, case, content_type,
                                                                     expected_status, message):
    good = Image.open(sorted((class_folder / "val").rglob("*.png"))[0]).convert("RGB")
    png, jpeg = _encoded(good, "PNG"), _encoded(good, "JPEG")
    body = {"over the pixel limit": _claiming(2000, 1000), "truncated png": png[: len(png) // 2],
            "truncated jpeg": jpeg[: len(jpeg) // 2], "not an image": b"plain text", "empty body": b"",
            "wrong content type": png, "not base64": b'{"inputs": "%%%"}',
            "json without inputs": b'{"image": "x"}'}[case]
    for path in ("/v1/models/ants/predict", "/hf/models/ants"):
        answer = keyed.request("POST", path, body, {"Content-Type": content_type})
        assert answer[0] == expected_status, answer
        assert message in _error(answer)
    assert keyed.request("POST", "/hf/models/ants", png, {"Content-Type": "image/png"})[0] == 200  # still serving


def _odd_images(base: Image.Image) -> dict[str, bytes]:
    """Valid images that decode unusually, each of ``base``."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the viewer turns it 90 degrees clockwise
    wide = base.resize((48, 24))
    frames = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    return {
        "exif-rotated.jpg": _encoded(wide, "JPEG", exif=exif.tobytes()),
        "cmyk.jpg": _encoded(base.convert("CMYK"), "JPEG"),
        "16-bit.png": _encoded(Image.fromarray(grey), "PNG"),
        "palette-alpha.png": _encoded(base.convert("P"), "PNG", transparency=0),
        "grey-alpha.png": _encoded(base.convert("LA"), "PNG"),
        "animated.gif": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        "animated.webp": _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
    }


def test_odd_valid_images_answer_as_visionlora_predict(keyed, loaded, class_folder, tmp_path):
    base = Image.open(sorted((class_folder / "val").rglob("*.png"))[2]).convert("RGB")
    odd = _odd_images(base)
    assert load_rgb(odd["exif-rotated.jpg"]).size == (24, 48)  # the EXIF orientation is applied
    assert Image.open(io.BytesIO(odd["animated.webp"])).n_frames == 2
    assert Image.open(io.BytesIO(odd["16-bit.png"])).mode.startswith("I")
    files = []
    for name, data in odd.items():
        (tmp_path / name).write_bytes(data)
        files.append(tmp_path / name)
    expected = loaded["ants"].predict(files)
    for path, wanted in zip(files, expected):
        answer = keyed.request("POST", "/v1/models/ants/predict", path.read_bytes(), {"Content-Type": "image/*"})
        assert answer[0] == 200, (path.name, answer)
        assert_nested_close(json.loads(answer[1])["predictions"][0]["top_k"], wanted["top_k"], where=path.name)


# -- readiness, the queue bound and the deadline (in process, with a forward held back) ------------------

def _in_process(served_runs, preload: bool, **settings):
    """(a store, a server over it) with ``ants`` loaded at start (``preload``) or now."""
    from visionlora.serving.app import ServeSettings, VisionServer
    from visionlora.serving.models import ModelStore

    store = ModelStore("cpu")
    if not preload:
        store.add("ants", served_runs["ants"])
    runs = [("ants", str(served_runs["ants"]))] if preload else []
    return store, VisionServer(store, ServeSettings(**settings), preload=runs)


def test_readiness_follows_the_loading_of_the_runs_named_at_start(served_runs, monkeypatch):
    import threading

    from fastapi.testclient import TestClient

    store, server = _in_process(served_runs, preload=True)
    release, add = threading.Event(), store.add
    monkeypatch.setattr(store, "add", lambda *args: (release.wait(30), add(*args))[1])
    with TestClient(server.app()) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        answer = client.get("/v2/health/ready")
        assert answer.status_code == 503 and answer.json() == {"ready": False, "loading": ["ants"]}
        assert client.get("/v2/models/ants/ready").status_code == 503
        assert client.get("/v2/models/nope/ready").status_code == 404
        early = client.post("/v1/models/ants/predict", content=_claiming(8, 8), headers={"Content-Type": "image/png"})
        assert early.status_code == 503 and "still loading" in early.json()["error"] and early.headers["Retry-After"]
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2/models/ants/ready").json() == {"name": "ants", "ready": True, "loaded": True}


async def _burst(server, count: int, image: bytes, linger_s: float = 0.0) -> list[tuple]:
    """``count`` requests at once to ``server``'s app: (answer, seconds to it) each; the event loop runs on
    ``linger_s`` after the last answer (for the batcher to finish what it holds)."""
    import httpx

    transport = httpx.ASGITransport(app=server.app())
    started = time.monotonic()

    async def ask(client):
        answer = await client.post("/v1/models/ants/predict", content=image, headers={"Content-Type": "image/png"})
        return answer, time.monotonic() - started

    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        answers = list(await asyncio.gather(*(ask(client) for _ in range(count))))
        await asyncio.sleep(linger_s)
    return answers


def _slowed(server, seconds: float) -> list[int]:
    """Hold every forward of ``server`` back ``seconds``; the list counts the images forwarded."""
    forwarded: list[int] = []
    forward = server._forward

    def slow(images, models, **options):
        forwarded.append(len(images))
        time.sleep(seconds)
        return forward(images, models, **options)

    server._forward = slow
    return forwarded


def test_past_max_queue_requests_get_503_with_retry_after_at_once(served_runs, class_folder):
    store, server = _in_process(served_runs, preload=False, max_queue=2, max_batch_size=1, max_wait_ms=0)
    forwarded = _slowed(server, 1.0)
    image = sorted((class_folder / "val").rglob("*.png"))[0].read_bytes()
    answers = asyncio.run(_burst(server, 6, image))
    statuses = sorted(answer.status_code for answer, _ in answers)
    assert statuses == [200, 200, 503, 503, 503, 503] and sum(forwarded) == 2
    refused = [(answer, seconds) for answer, seconds in answers if answer.status_code == 503]
    assert all(a.headers["Retry-After"] == "1" and "--max-queue" in a.json()["error"] for a, _ in refused)
    served = [seconds for answer, seconds in answers if answer.status_code == 200]
    assert max(seconds for _, seconds in refused) < min(served)  # at once, not after a forward (held 1 s)
    server.stop()
    text = _metrics(server)
    assert 'visionlora_refusals_total{cause="queue_full"} 4.0' in text


def test_past_timeout_s_a_request_gets_504_and_its_waiting_work_is_dropped(served_runs, class_folder):
    store, server = _in_process(served_runs, preload=False, timeout_s=0.3, max_batch_size=1, max_wait_ms=0)
    forwarded = _slowed(server, 1.0)
    image = sorted((class_folder / "val").rglob("*.png"))[0].read_bytes()
    # the loop runs on past the forward that had started, so the batcher meets the two images waiting behind it
    answers = asyncio.run(_burst(server, 3, image, linger_s=1.2))
    assert [answer.status_code for answer, _ in answers] == [504, 504, 504]
    assert max(seconds for _, seconds in answers) < 0.9
    assert "deadline of 0.3 s (--timeout-s)" in answers[0][0].json()["error"]
    assert forwarded == [1]  # they were dropped, never forwarded
    server.stop()
    text = _metrics(server)
    assert 'visionlora_refusals_total{cause="timeout"} 3.0' in text and "visionlora_dropped_images_total 2.0" in text


def _metrics(server) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.metrics.registry).decode()


def test_a_job_whose_deadline_would_pass_during_the_forward_is_dropped_unrun():
    """Once forwards take 0.3 s, a job with 0.1 s left fails at once, and one with 2 s left is run."""
    from concurrent.futures import ThreadPoolExecutor

    from visionlora.serving.batching import Batcher, DeadlineMissed, Job

    forwarded: list[int] = []
    dropped: list[int] = []

    def slow_predict(images, models, **options):
        forwarded.append(len(images))
        time.sleep(0.3)
        return [{} for _ in images]

    async def scenario():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(slow_predict, pool, max_batch_size=4, max_wait_ms=0, on_drop=dropped.append)
            await batcher.submit(Job([None], {}, ()))  # the forwards' time is learnt
            started = loop.time()
            late = await asyncio.gather(batcher.submit(Job([None, None], {}, (), None, loop.time() + 0.1)),
                                        return_exceptions=True)
            waited = loop.time() - started
            in_time = await batcher.submit(Job([None], {}, (), None, loop.time() + 2.0))
        return late[0], waited, in_time

    late, waited, in_time = asyncio.run(scenario())
    assert isinstance(late, DeadlineMissed) and waited < 0.1  # at once, not at its deadline
    assert in_time == [{}] and forwarded == [1, 1] and dropped == [2]


def test_public_metrics_leaves_only_metrics_and_liveness_open():
    from fastapi.testclient import TestClient

    from visionlora.serving.app import ServeSettings, VisionServer
    from visionlora.serving.models import ModelStore

    server = VisionServer(ModelStore("cpu"), ServeSettings(api_key=KEY, public_metrics=True, admin_token="admin"))
    with TestClient(server.app()) as client:
        assert client.get("/metrics").status_code == 200 and client.get("/v2/health/live").status_code == 200
        assert client.get("/").status_code == 401 and client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # the admin routes take their own token, not the key
        assert client.delete("/v1/models/x", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        assert client.delete("/v1/models/x", headers={"Authorization": "Bearer admin"}).status_code == 404
    assert KEY not in repr(server.settings)

"""Ray: the Serve deployment and batch prediction with Ray Data, on a real local Ray cluster that the
test starts on loopback (4 CPUs: two half-CPU replicas, two one-CPU actors and decoding fit at once)
and stops by its process id."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'visionlora[ray]')")

import visionlora  # noqa: E402
from tests.browser import free_port  # noqa: E402
from tests.conftest import assert_nested_close, tiny_config  # noqa: E402
from tests.test_serve import Server  # noqa: E402
from tests.test_serve_runs_dir import _variant  # noqa: E402
from visionlora.examples.synthetic import make_classification_folder  # noqa: E402
from visionlora.training.engine import train  # noqa: E402

CLUSTER_CPUS = 4
RAY = str(Path(sys.executable).with_name("ray"))  # the command beside this Python, venv or not
RAY_KEY = "ray-deployment-key"  # the deployment's API key, given by the environment variable


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on loopback in the foreground (``--block``): stopping its process stops the cluster."""
    root = tmp_path_factory.mktemp("ray")
    port = free_port()
    # a loopback cluster of the test's own: no token authentication (``ray start`` turns it on by default)
    # and nothing to drain at the end: the tests have stopped their work by then
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                   "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # Ray's socket paths must stay under 107 bytes, which pytest's temporary folders can exceed
    with tempfile.TemporaryDirectory(prefix="vlray-", ignore_cleanup_errors=True) as sessions, \
            (root / "head.log").open("w") as log:
        head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
                                 str(port), "--num-cpus", str(CLUSTER_CPUS), "--include-dashboard", "false",
                                 "--disable-usage-stats", "--temp-dir", sessions],
                                stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        address = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while subprocess.run([RAY, "status", "--address", address], capture_output=True).returncode != 0:
                assert head.poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()[-2000:]
                time.sleep(1)
            yield address
        finally:
            head.terminate()  # the head drains and stops its processes (a signal to the whole group takes a minute)
            try:
                head.wait(timeout=60)
            finally:
                _kill_group(head.pid)


def _kill_group(pid: int) -> None:
    """Whatever the cluster left in its process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def runs(class_folder, tmp_path_factory):
    """Two LoRA runs of one base in one folder."""
    root = tmp_path_factory.mktemp("ray-runs")
    first = train(tiny_config("classification", class_folder, root / "runs" / "ants", epochs=1)).paths.root
    _variant(first, root / "runs" / "bees", seed=1)
    return root


@pytest.fixture(scope="module")
def ray_server(cluster, runs):
    server = Server([], runs / "ray-serve.log", "--ray", "--ray-address", cluster, "--runs-dir",
                    str(runs / "runs"), "--replicas", "2", "--replica-cpus", "0.5", "--max-wait-ms", "20",
                    "--precision", "fp32", key=RAY_KEY)
    yield server
    assert server.stop() in (0, -signal.SIGTERM)
    assert RAY_KEY not in (runs / "ray-serve.log").read_text()


def test_the_deployment_takes_the_api_key_and_the_hugging_face_route(ray_server, runs, class_folder):
    """Every replica checks the key the gateway passes on; /hf/models/{name} is routed by model."""
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/hf/models/ants")):
        body = image.read_bytes() if method == "POST" else None
        assert ray_server.request(method, path, body, {"Authorization": "Bearer wrong"})[0] == 401, path
    assert ray_server.request("GET", "/v2/health/live", headers={"Authorization": ""})[0] == 200
    status, body, _ = ray_server.request("POST", "/hf/models/ants", image.read_bytes(), {"Content-Type": "image/png"})
    assert status == 200, body
    expected = visionlora.load(runs / "runs" / "ants").predict([image])[0]["top_k"]
    assert_nested_close(json.loads(body), [{"label": e["label"], "score": e["score"]} for e in expected])


def _ask(server: Server, name: str, image: Path, retries: int = 0) -> tuple[int, dict, int]:
    """(status, answer, retries used): a failed connection or a 5xx is retried up to ``retries`` times."""
    for attempt in range(retries + 1):
        try:
            status, body, _ = server.post_files(f"/v1/models/{name}/predict", [(image.name, image.read_bytes())])
        except OSError:
            status, body = 599, b'{"error": "connection failed"}'
        if status < 500 or attempt == retries:
            return status, json.loads(body), attempt
    raise AssertionError("unreachable")


def test_the_deployment_answers_interleaved_adapters_as_predict(ray_server, runs, class_folder):
    images = sorted((class_folder / "val").rglob("*.png"))[:4]
    jobs = [(name, image) for image in images for name in ("ants", "bees")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: _ask(ray_server, *job), jobs))
    expected = {name: visionlora.load(runs / "runs" / name).predict(images) for name in ("ants", "bees")}
    for (name, image), (status, answer, _) in zip(jobs, answers):
        assert status == 200, answer
        prediction = answer["predictions"][0]
        assert_nested_close({k: prediction[k] for k in expected[name][0]}, expected[name][images.index(image)])
    assert expected["ants"] != expected["bees"]


@pytest.mark.parametrize("name, fields, files, status, message", [
    ("nope", {}, [("a.png", None)], 404, "no model named 'nope'"),
    ("ants", {}, [], 400, "no 'file' field"),
    ("ants", {}, [("a.txt", b"not an image")], 400, "file 'a.txt'"),
    ("ants", {"threshold": "0.5"}, [("a.png", None)], 400, "no option 'threshold'"),
])
def test_bad_requests_get_the_same_answers_as_visionlora_serve(ray_server, class_folder, name, fields, files,
                                                               status, message):
    image = sorted((class_folder / "val").rglob("*.png"))[0].read_bytes()
    files = [(filename, data if data is not None else image) for filename, data in files]
    got, body, _ = ray_server.post_files(f"/v1/models/{name}/predict", files, fields)
    assert got == status and message in json.loads(body)["error"]


def test_killing_a_replica_loses_no_request_retried_once_and_the_deployment_recovers(ray_server, class_folder):
    """Four clients send requests for 1 s, a replica's process is killed, and each client goes on
    until it has sent 5 more (at most 400 requests and 90 s in all); a failed request is retried once."""
    image = sorted((class_folder / "val").rglob("*.png"))[0]
    replicas = _replica_pids(ray_server, 2)
    kill_at = time.monotonic() + 1.0
    give_up_at, budget = kill_at + 90.0, iter(range(400))

    def client(number: int) -> list[tuple[int, dict, int, float]]:
        answers = []
        while sum(sent >= kill_at for *_, sent in answers) < 5 and time.monotonic() < give_up_at:
            if next(budget, None) is None:
                break
            sent = time.monotonic()
            answers.append((*_ask(ray_server, ("ants", "bees")[number % 2], image, retries=1), sent))
        return answers

    with ThreadPoolExecutor(max_workers=4) as pool:
        clients = [pool.submit(client, number) for number in range(4)]
        time.sleep(max(0.0, kill_at - time.monotonic()))
        os.kill(replicas[0], signal.SIGKILL)
        answers = [answer for future in clients for answer in future.result(timeout=120)]
    assert all(status == 200 for status, _, _, _ in answers), [a for a in answers if a[0] != 200][:2]
    after_kill = sum(sent >= kill_at for _, _, _, sent in answers)
    assert after_kill >= 20, f"only {after_kill} requests were sent after the kill"
    retried = sum(used for _, _, used, _ in answers)
    print(f"{len(answers)} requests, {after_kill} sent after the kill, {retried} needed their one retry")
    recovered = _replica_pids(ray_server, 2, seconds=120)
    assert replicas[0] not in recovered


def _replica_pids(server: Server, count: int, seconds: float = 60) -> list[int]:
    """The pids of ``count`` live replicas, asking /health (answered by any replica) until that many answer."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            status, body, _ = server.request("GET", "/health")
        except OSError:
            status = 0
        if status == 200:
            pid = json.loads(body)["replica_pid"]
            if _alive(pid):
                seen[pid] = time.monotonic()
        live = [pid for pid in seen if _alive(pid)]
        if len(live) >= count:
            return live
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} replicas answered within {seconds} s: {sorted(seen)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """A few hundred generated images in one folder, one of them damaged."""
    folder = make_classification_folder(tmp_path_factory.mktemp("many"), per_class_train=50, per_class_val=0)
    images = folder / "train"
    (images / "red_disc" / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return images


def _predict_with_ray(cluster: str, runs: Path, images: Path, output: Path, *extra: str):
    command = [sys.executable, "-m", "visionlora", "predict", str(runs / "runs" / "ants"), str(images), "--engine",
               "ray", "--ray-address", cluster, "--output", str(output), "--actors", "2", "--batch-size", "32",
               *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def ray_rows(cluster, runs, many_images, tmp_path_factory):
    """Both runs over the generated folder with Ray Data: the output file and the command's last line."""
    output = tmp_path_factory.mktemp("ray-data") / "results.jsonl"
    summary = _predict_with_ray(cluster, runs, many_images, output, "--runs", str(runs / "runs" / "bees"))
    return output, summary


def test_ray_data_prediction_equals_local_predict_row_for_row(ray_rows, runs, many_images):
    output, summary = ray_rows
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    files = sorted(p for p in many_images.rglob("*.png"))
    assert len(files) >= 200 and len(rows) == 2 * len(files)
    assert summary.endswith("(0 already there, 2 unreadable images as rows with an error)")
    errors = [row for row in rows if "error" in row]
    assert {(Path(row["image"]).name, row["run"]) for row in errors} == {("damaged.png", "ants"),
                                                                          ("damaged.png", "bees")}
    for name in ("ants", "bees"):
        local, skipped = visionlora.load(runs / "runs" / name).predict_files(files)
        assert [s["file"] for s in skipped] == [str(many_images / "red_disc" / "damaged.png")]
        by_image = {row["image"]: row for row in rows if row["run"] == name and "error" not in row}
        assert len(by_image) == len(local)
        for expected in local:
            got = by_image[expected["image"]]
            assert_nested_close({k: got[k] for k in expected}, expected, where=expected["image"])


def test_a_stopped_job_started_again_predicts_only_what_is_missing(ray_rows, cluster, runs, many_images, tmp_path):
    """A Parquet job stopped after 100 rows, its last line cut short, is started again twice; the rows
    equal the first job's."""
    full, _ = ray_rows
    lines = full.read_text().splitlines()
    parquet = tmp_path / "results.parquet"
    (tmp_path / "results.parquet.partial.jsonl").write_text("\n".join(lines[:100]) + "\n" + lines[100][:20])
    bees = ("--runs", str(runs / "runs" / "bees"))
    # decoding in CPU tasks of their own, as for actors on GPUs (the first job decoded in the actors)
    summary = _predict_with_ray(cluster, runs, many_images, parquet, *bees, "--decode", "tasks")
    assert summary.startswith(f"wrote {len(lines) - 100} rows") and "(100 already there" in summary
    assert not (tmp_path / "results.parquet.partial.jsonl").exists()
    written = parquet.read_bytes()
    summary = _predict_with_ray(cluster, runs, many_images, parquet, *bees)
    assert summary.startswith("wrote 0 rows") and parquet.read_bytes() == written
    import pyarrow.parquet as pq

    table = {(row["image"], row["run"]): row for row in pq.read_table(parquet).to_pylist()}
    expected = {(row["image"], row["run"]): row for row in map(json.loads, lines)}
    assert table.keys() == expected.keys() and len(table) == len(lines)
    for key, row in expected.items():
        assert table[key]["error"] == row.get("error") and table[key]["label"] == row.get("label"), key


def test_a_list_file_names_the_run_for_each_image_and_a_wrong_name_is_one_line(tmp_path, monkeypatch):
    from visionlora.errors import VisionLoraError
    from visionlora.serving.ray_batch import plan_job

    monkeypatch.chdir(tmp_path)  # relative paths in a list are taken from here, and the rows' paths are absolute

    ants, bees = tmp_path / "runs" / "ants" / "lora", tmp_path / "runs" / "bees" / "lora"
    listing = tmp_path / "list.csv"
    listing.write_text("image,run\na.png,ants/lora\nb.png,\nc.png,bees/lora\n")
    job = plan_job([str(ants), str(bees)], [str(listing)], tmp_path / "out.jsonl", {})
    assert job.runs == {"ants/lora": str(ants), "bees/lora": str(bees)}
    assert job.items == [(str(tmp_path / "a.png"), "ants/lora"), (str(tmp_path / "b.png"), "ants/lora"),
                         (str(tmp_path / "b.png"), "bees/lora"), (str(tmp_path / "c.png"), "bees/lora")]
    listing.write_text("image,run\na.png,wasps\n")
    with pytest.raises(VisionLoraError, match=r"list.csv, line 2: run 'wasps' is not one of the runs given "
                                              r"\(ants/lora, bees/lora\)"):
        plan_job([str(ants), str(bees)], [str(listing)], tmp_path / "out.jsonl", {})
    with pytest.raises(VisionLoraError, match="writes .jsonl or .parquet"):
        plan_job([str(ants)], [str(listing)], tmp_path / "out.csv", {})


@pytest.mark.parametrize("command, message", [
    (["serve", "--ray", "RUN"], "--ray serves --runs-dir DIR"),
    (["serve", "--ray", "--runs-dir", "RUNS", "--autoscaling", '{"max_replica": 4}'],
     "max_replica is not a field of Ray Serve's autoscaling_config"),
    (["serve", "--ray", "--runs-dir", "RUNS", "--autoscaling", '{"min_replicas": 3, "max_replicas": 2}'],
     "max_replicas (2) must be greater than or equal to min_replicas (3)"),
    (["serve", "--ray", "--runs-dir", "RUNS", "--replicas", "0"], "--replicas, --max-loaded-adapters"),
    (["predict", "RUN", "IMAGES", "--engine", "ray"], "--engine ray needs --output FILE.jsonl or FILE.parquet"),
    (["predict", "RUN", "IMAGES", "--engine", "ray", "--output", "x.csv"], "writes .jsonl or .parquet"),
    (["predict", "RUN", "IMAGES", "--engine", "ray", "--output", "x.jsonl", "--actors", "0"], "--actors"),
    (["predict", "RUN", "IMAGES", "--runs", "RUN"], "--runs takes effect with --engine ray"),
])
def test_ray_commands_refuse_bad_settings_in_one_line(runs, class_folder, tmp_path, capsys, command, message):
    from visionlora.cli import main

    places = {"RUN": str(runs / "runs" / "ants"), "RUNS": str(runs / "runs"), "IMAGES": str(class_folder / "val"),
              "x.csv": str(tmp_path / "x.csv"), "x.jsonl": str(tmp_path / "x.jsonl")}
    assert main([places.get(word, word) for word in command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_serve_run_arguments_are_typed_and_unknown_ones_named(tmp_path, monkeypatch):
    """``serve run visionlora.serving.ray:app key=value ...`` hands the builder strings."""
    from visionlora.serving.ray import RaySettings, app

    monkeypatch.chdir(tmp_path)
    settings = RaySettings.from_args({"runs_dir": "runs", "replicas": "2", "replica_cpus": "0.5",
                                      "max_batch_size": "8", "mixed_batches": "false",
                                      "autoscaling": '{"min_replicas": 1, "max_replicas": 3}'})
    assert settings.runs_dir == str(tmp_path / "runs") and settings.replicas == 2 and settings.replica_cpus == 0.5
    assert settings.serve == {"max_batch_size": 8, "mixed_batches": False}
    assert settings.autoscaling == {"min_replicas": 1, "max_replicas": 3}
    with pytest.raises(ValueError, match="got replica, runs_dir"):
        app({"runs_dir": "runs", "replica": "2"})


def test_a_replica_runs_its_server_until_ray_serve_shuts_it_down(tmp_path):
    """No lifespan runs behind the replica's ASGI transport: the replica starts its server, and Ray
    Serve's shutdown call (``__del__``) stops its pools."""
    import asyncio

    from visionlora.serving.ray import Replica

    (tmp_path / "runs").mkdir()
    replica = Replica.func_or_class({"runs_dir": str(tmp_path / "runs"), "max_loaded": 2})
    server = replica.server
    pool = server.load_pool

    async def listed_then_shut_down():
        answer = await replica.client.get("/v1/models")  # listed in the load thread
        replica.__del__()
        return answer

    answer = asyncio.run(listed_then_shut_down())
    assert answer.status_code == 200 and answer.json() == {"models": []}
    assert server.load_pool is None and server.forward_pool is None
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_train_many_spreads_its_jobs_over_the_cluster_each_worker_packing_its_share(cluster, tmp_path):
    each = tmp_path / "each"
    for index in range(4):
        make_classification_folder(each / f"job{index}", per_class_train=3, per_class_val=2, seed=index)
    output = tmp_path / "runs"
    finished = subprocess.run(
        [sys.executable, "-m", "visionlora", "train-many", "--data-each", str(each), "--output", str(output),
         "--model", "tiny-pretrained", "--epochs", "1", "--mixed-precision", "no", "--no-progress",
         "--ray-address", cluster, "--ray-workers", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "4 jobs in 2 shares" in finished.stderr
    rows = list(csv.DictReader((output / "jobs.csv").open()))
    assert [(row["job"], row["status"], row["packed"]) for row in rows] == [
        (f"job{index}", "done", "yes") for index in range(4)]
    for index in range(4):
        assert (output / f"job{index}" / "training_results_lora" / "training_summary.json").is_file()


def test_tune_spreads_each_rung_over_the_cluster(cluster, tmp_path):
    data = make_classification_folder(tmp_path / "data", per_class_train=3, per_class_val=2, seed=7)
    output = tmp_path / "tune"
    finished = subprocess.run(
        [sys.executable, "-m", "visionlora", "tune", "--data", str(data), "--output", str(output), "--trials", "4",
         "--eta", "2", "--epochs", "2", "--model", "tiny-pretrained", "--mixed-precision", "no", "--no-progress",
         "--ray-address", cluster, "--ray-workers", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "4 jobs in 2 shares" in finished.stderr and "2 jobs in 2 shares" in finished.stderr
    rows = list(csv.DictReader((output / "leaderboard.csv").open()))
    assert len(rows) == 4 and sum(row["status"] == "best" for row in rows) == 1
    assert (output / "best" / "training_results_lora" / "training_summary.json").is_file()

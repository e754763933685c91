"""Make the getting-started page's images with the project's own commands on the built-in example.

    .venv/bin/python docs/make_images.py [--demo runs/demo]

It runs ``visionlora demo`` (unless ``--demo`` names a finished one), then writes to docs/images/:
the LoRA classification run's training curves, each task's validation predictions beside the
truth (``predictions.png`` of its LoRA run), a screenshot of the classification run's
``report.html``, one of ``visionlora serve``'s page after predicting an image, and one of
``visionlora check --label-errors``'s ``check.html`` on a generated set with planted problems, all in
headless Chromium.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.browser import Chromium, free_port  # noqa: E402

IMAGES = ROOT / "docs" / "images"
TASKS = ("classification", "detection", "pose", "segmentation")
WIDTH = 900  # pixels: the widest image kept


def shrunk(source: Path, target: Path) -> None:
    """``source`` at most WIDTH wide, as PNG or (photo-like grids) JPEG by ``target``'s suffix."""
    image = Image.open(source).convert("RGB")
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.save(target, optimize=True, **({"quality": 85} if target.suffix == ".jpg" else {}))


def screenshot(browser: Chromium, url: str, target: Path, width: int = 1100, height: int = 900) -> None:
    import base64

    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    browser.call("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete'")
    time.sleep(0.5)
    data = browser.call("Page.captureScreenshot", format="png")["data"]
    target.write_bytes(base64.b64decode(data))


def serving_page(browser: Chromium, run: Path, image: Path, target: Path) -> None:
    """``visionlora serve RUN`` on loopback; the page after predicting ``image``."""
    import base64

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "visionlora", "serve", f"colours={run}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        browser.call("Emulation.setDeviceMetricsOverride", width=1100, height=1000, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        browser.wait_for("document.querySelectorAll('#model option').length === 1")
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        browser.evaluate("document.querySelector('#try button').click()")
        browser.wait_for("(() => { const i = document.getElementById('drawn');"
                         " return !i.hidden && i.complete && i.naturalWidth })()")
        time.sleep(0.3)
        target.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        server.terminate()
        server.wait(timeout=30)


def planted_set(root: Path) -> Path:
    """A generated classification set with a leak, a broken file, a rotated JPEG and 10% of its labels flipped."""
    import shutil

    from tests.test_check import flip_labels
    from visionlora.examples.synthetic import make_classification_folder

    data = make_classification_folder(root, per_class_train=20, per_class_val=5)
    flip_labels(data, 0.1, seed=0)
    shutil.copy(data / "train" / "red_disc" / "red_disc_000.png", data / "val" / "red_disc" / "copied.png")
    (data / "train" / "blue_disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    turned = Image.open(data / "train" / "green_disc" / "green_disc_001.png").resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.save(data / "train" / "green_disc" / "turned.jpg", exif=exif)
    return data


def check_page(browser: Chromium, target: Path) -> None:
    """``visionlora check --label-errors`` on ``planted_set``; its check.html."""
    with tempfile.TemporaryDirectory() as tmp:
        data = planted_set(Path(tmp) / "data")
        (Path(tmp) / "folds.yaml").write_text("lr: 3.0e-3\nbatch_size: 8\n")
        subprocess.run([sys.executable, "-m", "visionlora", "check", str(data), "--model", "tiny-pretrained",
                        "--label-errors", "--folds", "4", "--epochs", "6", "--config", str(Path(tmp) / "folds.yaml"),
                        "--output", str(Path(tmp) / "check"), "--no-progress"], check=False)
        screenshot(browser, (Path(tmp) / "check" / "check.html").resolve().as_uri(), target, 1200, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="a finished `visionlora demo --output` folder")
    args = parser.parse_args()
    demo = args.demo
    if demo is None:
        demo = Path(tempfile.mkdtemp(prefix="visionlora-demo-"))
        subprocess.run([sys.executable, "-m", "visionlora", "demo", "--output", str(demo)], check=True)
    IMAGES.mkdir(parents=True, exist_ok=True)
    results = demo / "classification-lora" / "training_results_lora"
    shrunk(results / "loss.png", IMAGES / "loss.png")
    shrunk(results / "metrics.png", IMAGES / "metrics.png")
    for task in TASKS:
        shrunk(demo / f"{task}-lora" / "training_results_lora" / "predictions.png", IMAGES / f"predictions-{task}.jpg")
    image = next((demo / "data" / "classification" / "val").rglob("*.png"))
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(Path(profile))
        try:
            browser.call("Page.enable")
            screenshot(browser, (results / "report.html").resolve().as_uri(), IMAGES / "report.png")
            serving_page(browser, demo / "classification-lora", image, IMAGES / "serving.png")
            check_page(browser, IMAGES / "check.png")
        finally:
            browser.close()
    for path in sorted(IMAGES.glob("*.*")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

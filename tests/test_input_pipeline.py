"""The training input pipeline: uint8 batches normalised on the device, worker processes that
hand batches over in reused shared memory, and the loader each device gets by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from visionlora.config import TrainConfig
from visionlora.data.batches import PooledCollate, batch_buffer, stacked
from visionlora.data.cache import CachePlan
from visionlora.data.transforms import Normalizer
from visionlora.errors import VisionLoraError
from visionlora.tasks import get_task
from visionlora.training.engine import train
from visionlora.training.loading import MAX_WORKERS, plan_loading, usable_cores


class Images(torch.utils.data.Dataset):
    """Random uint8 images and float targets (large enough per batch to be pooled) and small fields
    (sent by value), the same for an index every time."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=generator),
                "target": torch.rand(5, 64, 64, generator=generator), "labels": index % 3, "index": index}


def collate(items):
    return {key: stacked([torch.as_tensor(item[key]) for item in items], key) for key in items[0]}


def test_worker_batches_equal_in_process_ones_even_when_every_batch_is_held():
    """Batches kept alive past the slots a worker has must not be overwritten: their slots stay
    claimed until the main process drops them, and the worker falls back to fresh memory."""
    dataset = Images()
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate))
    pooled = PooledCollate(collate, workers=2, slots=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=pooled, num_workers=2,
                                         persistent_workers=True, prefetch_factor=2)
    for _ in range(2):  # a second epoch reuses the slots the first one released
        held = list(loader)  # 10 batches alive at once, 2 workers x 3 slots
        assert len(held) == len(expected)
        for got, want in zip(held, expected):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key
        assert int((pooled.claims != 0).sum()) == 6  # every slot claimed while the batches are held
        del held, got
    assert int((pooled.claims != 0).sum()) == 0  # all handed back once dropped


class Sizes(torch.utils.data.Dataset):
    """Images whose size changes with the batch, so workers replace their buffers by larger and smaller ones."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, index: int):
        side = 40 + 37 * ((index // 4) * 7 % 11)
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator),
                "index": index}


def padded(items):
    side = max(item["pixel_values"].shape[-1] for item in items)
    out = batch_buffer("pixel_values", (len(items), 3, side, side), torch.uint8)
    for row, item in enumerate(items):
        out[row, :, : item["pixel_values"].shape[1], : item["pixel_values"].shape[2]] = item["pixel_values"]
    return {"pixel_values": out, "index": torch.tensor([item["index"] for item in items])}


def test_buffers_replaced_by_larger_ones_never_deliver_old_contents():
    """Each buffer has an id of its own (an address may be reused), and a replaced one's descriptor is closed."""
    from visionlora.data.batches import _descriptors

    dataset = Sizes()
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=padded))
    pooled = PooledCollate(padded, 1, 3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=pooled, num_workers=1,
                                         persistent_workers=True)
    for _ in range(2):
        for got, want in zip(loader, expected):
            assert torch.equal(got["pixel_values"], want["pixel_values"]), int(want["index"][0])
    still_open = [key for key in _descriptors if key[0] == pooled.key]
    assert still_open, "the main process keeps the descriptors of the buffers in use"
    assert len(still_open) <= pooled.slots, still_open  # replaced buffers' descriptors were closed


def test_a_slot_is_kept_while_any_field_of_its_batch_is_in_use():
    """As a training step does: the pixels replaced (normalised), the next batch fetched, then the target read."""
    import time

    dataset = Images()
    expected = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PooledCollate(collate, 1, 1),
                                         num_workers=1, persistent_workers=True, prefetch_factor=1)
    batches = iter(loader)
    current = next(batches)
    for index in range(1, len(expected)):
        current["pixel_values"] = current["pixel_values"].float()
        upcoming = next(batches)  # asks the worker for the batch after it, which wants the one slot
        time.sleep(0.2)  # time to make it
        assert torch.equal(current["target"], expected[index - 1]["target"]), index - 1
        current = upcoming


def test_a_batch_normalised_on_the_device_equals_its_images_normalised_one_by_one():
    processor = type("Processor", (), {"rescale_factor": 1 / 255, "image_mean": [0.5, 0.4, 0.3],
                                       "image_std": [0.2, 0.25, 0.3]})()
    normalizer = Normalizer(processor)
    images = torch.randint(0, 256, (4, 3, 16, 12), dtype=torch.uint8)
    assert torch.equal(normalizer(images), torch.stack([normalizer(image) for image in images]))


def test_detection_pads_uint8_batches_to_exactly_what_predict_feeds():
    """Padding is 0 after normalisation, as when predict pads normalised images; the mask widens to int64."""
    task = get_task("detection")
    processor = type("Processor", (), {"rescale_factor": 1 / 255, "image_mean": [0.485, 0.456, 0.406],
                                       "image_std": [0.229, 0.224, 0.225]})()
    normalizer = Normalizer(processor)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((20, 30), (26, 18), (20, 18))]
    items = [{"pixel_values": image, "labels": {}, "index": i} for i, image in enumerate(images)]
    trained = task.steps.device_batch(task.steps.collate(items), normalizer)
    predicted = task.prediction.model_inputs([normalizer(image) for image in images])
    assert torch.equal(trained["pixel_values"], predicted["pixel_values"])
    assert trained["pixel_mask"].dtype == torch.long
    assert torch.equal(trained["pixel_mask"], predicted["pixel_mask"])


def test_training_with_workers_repeats_training_in_process_exactly(class_folder, tmp_path):
    """Persistent workers see each epoch's augmentation seed; the summary records the loader."""
    in_process = train(tiny_config("classification", class_folder, tmp_path / "a", num_workers="0"))
    workers = train(tiny_config("classification", class_folder, tmp_path / "b", num_workers="2"))
    assert workers.summary["metrics"] == in_process.summary["metrics"]
    assert workers.paths.history.read_text().split("seconds")[0] == in_process.paths.history.read_text().split(
        "seconds")[0]
    a, b = in_process.model.state_dict(), workers.model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    loading = workers.summary["training"]["data_loading"]
    assert (loading["workers"], loading["persistent_workers"], loading["pin_memory"]) == (2, True, False)
    assert in_process.summary["training"]["data_loading"]["workers"] == 0


def test_auto_workers_fit_the_device():
    cpu = plan_loading("auto", torch.device("cpu"))
    assert (cpu.workers, cpu.pin_memory) == (0, False)
    cuda = plan_loading("auto", torch.device("cuda"))
    assert cuda.workers == max(1, min(MAX_WORKERS, usable_cores() - 1))
    assert cuda.pin_memory and cuda.non_blocking and cuda.prefetch_factor >= 2
    assert "pinned memory, non-blocking copies" in cuda.describe()
    two_processes = plan_loading("auto", torch.device("cuda"), processes_here=usable_cores())
    assert two_processes.workers == 1
    assert plan_loading("3", torch.device("cuda")).workers == 3


@pytest.mark.parametrize("value", ["many", "-1", "1.5"])
def test_a_bad_worker_count_is_one_clear_line(value):
    with pytest.raises(VisionLoraError, match="--num-workers must be auto or a number of processes"):
        TrainConfig(data="x", num_workers=value).validate()


def test_cached_images_are_not_changed_by_augmentation(tmp_path):
    """Augmentation reads the uint8 cache in place (no copy on the way in) and must never write to it."""
    from visionlora.examples.synthetic import make_detection_dataset

    data = make_detection_dataset(tmp_path / "data", n_train=4, n_val=2)
    task = get_task("detection")
    cfg = TrainConfig(task="detection", data=str(data), model="tiny", epochs=1).validate()
    source = task.data.read_data(cfg)
    _, processor, info = task.model.build_model("tiny", source.labels, None, "lora")
    dataset, _ = task.data.train_dataset(source, processor, info, cfg, CachePlan())
    before = [np.array(dataset.images[i]["pixels"]) for i in range(len(dataset))]
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            assert dataset[index]["pixel_values"].dtype == torch.uint8
    assert all(np.array_equal(before[i], dataset.images[i]["pixels"]) for i in range(len(dataset)))
    assert Image.fromarray(before[0]).size == tuple(reversed(before[0].shape[:2]))

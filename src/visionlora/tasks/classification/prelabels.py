"""Classification pre-labels: a Label Studio choice and a CVAT tag per image, scored."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from PIL import Image

from visionlora.core.labelling import (
    LabelSource,
    LabelStudioShape,
    cvat_format,
    cvat_shape,
    label_studio_format,
    region,
)


def _choice(prediction: dict, image: Image.Image, source: LabelSource) -> list[dict]:
    return [region(CHOICES, image, {"choices": [prediction["label"]]}, prediction["score"])]


CHOICES = LabelStudioShape("Choices", "choice", _choice, child="Choice")


def _tag(element: ET.Element, prediction: dict, image: Image.Image, source: LabelSource) -> None:
    cvat_shape(element, "tag", prediction["label"], prediction["score"])


def _score(prediction: dict) -> float:
    return float(prediction["score"])


LABEL_FORMATS = (label_studio_format(CHOICES, _score), cvat_format(_tag, "tag"))

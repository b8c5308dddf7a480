"""Label sets in InstructERC's order and spelling, and the maps from each dataset's raw names.

This module is the single source of truth for labels: the readers, the prompt templates, the
serving engine and the training code all import from here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

#: InstructERC's label sets (``label_set`` in the official ``data_process.py``), order included:
#: the order is part of the prompt text, so it is part of what a model is trained on.
LABEL_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "meld": ("neutral", "surprise", "fear", "sad", "joyful", "disgust", "angry"),
        "iemocap": ("happy", "sad", "neutral", "angry", "excited", "frustrated"),
        "emorynlp": ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared"),
    }
)

#: Speaker label sets of the speaker-identification task (``speaker_label_text_set`` upstream).
SPEAKER_LABEL_SETS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "meld": tuple(f"Speaker_{i}" for i in range(9)),
        "iemocap": ("Speaker_0", "Speaker_1"),
        "emorynlp": tuple(f"Speaker_{i}" for i in range(9)),
    }
)

#: Raw label names as they appear in each dataset's files -> InstructERC label.
RAW_LABEL_MAPS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        # MELD CSVs use Ekman names.
        "meld": MappingProxyType(
            {
                "neutral": "neutral",
                "surprise": "surprise",
                "fear": "fear",
                "sadness": "sad",
                "joy": "joyful",
                "disgust": "disgust",
                "anger": "angry",
            }
        ),
        # The COSMIC pickle of IEMOCAP already uses InstructERC's names.
        "iemocap": MappingProxyType({name: name for name in LABEL_SETS["iemocap"]}),
        # EmoryNLP CSV and JSON files already use InstructERC's names.
        "emorynlp": MappingProxyType({name: name for name in LABEL_SETS["emorynlp"]}),
        # DailyDialog is evaluated out of domain with a MELD model: its 7 labels map one to one.
        "dailydialog": MappingProxyType(
            {
                "neutral": "neutral",
                "happiness": "joyful",
                "surprise": "surprise",
                "sadness": "sad",
                "anger": "angry",
                "fear": "fear",
                "disgust": "disgust",
            }
        ),
    }
)

#: The label set each dataset's (mapped) labels belong to.
DATASET_LABEL_SET: Mapping[str, str] = MappingProxyType(
    {"meld": "meld", "iemocap": "iemocap", "emorynlp": "emorynlp", "dailydialog": "meld"}
)


class UnknownLabelError(ValueError):
    """A raw label that the dataset's map does not know."""


def label_set(name: str) -> tuple[str, ...]:
    """Return the labels of the label set ``name`` (``meld``, ``iemocap`` or ``emorynlp``)."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise KeyError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


def map_label(dataset: str, raw: str) -> str:
    """Map a raw label of ``dataset`` onto its InstructERC label.

    Raises:
        UnknownLabelError: ``raw`` is not one of the dataset's label names.
    """
    mapping = RAW_LABEL_MAPS[dataset]
    try:
        return mapping[raw.strip()]
    except KeyError:
        raise UnknownLabelError(f"unknown {dataset} label {raw!r}; expected one of {', '.join(mapping)}") from None

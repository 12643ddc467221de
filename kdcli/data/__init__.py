"""Opening datasets for kdcli: built-ins, local folders and files, and the Hugging Face Hub.

``open_data(spec, ...)`` returns a :class:`DataBundle` describing the dataset (classes, channels, size,
splits) that hands out torch datasets of ``{"image", "label", "index"}`` items for training and evaluation.
Batch them with ``collate_fn=bundle.collate`` (a :class:`SkipCollate`): unreadable examples are dropped and
named under ``batch["skipped"]``; count them with a :class:`SkipTracker`.
"""

from kdcli.data.builtin import BUILTIN_HELP
from kdcli.data.bundle import DataBundle, ImageClassificationDataset, open_data
from kdcli.data.skips import DEFAULT_MAX_BAD_FRACTION, SkipCollate, SkipTracker, skipped_line
from kdcli.data.transforms import AUGMENTS, INTERPOLATIONS, RECIPES

__all__ = [
    "AUGMENTS",
    "BUILTIN_HELP",
    "DEFAULT_MAX_BAD_FRACTION",
    "DataBundle",
    "INTERPOLATIONS",
    "ImageClassificationDataset",
    "RECIPES",
    "SkipCollate",
    "SkipTracker",
    "open_data",
    "skipped_line",
]

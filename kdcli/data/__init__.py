"""Opening datasets for kdcli: built-ins, local folders and files, and the Hugging Face Hub.

``open_data(spec, ...)`` returns a :class:`DataBundle` describing the dataset (classes, channels, size,
splits) that hands out torch datasets of ``{"image", "label", "index"}`` items for training and evaluation.
"""

from kdcli.data.builtin import BUILTIN_HELP
from kdcli.data.bundle import DataBundle, ImageClassificationDataset, open_data
from kdcli.data.transforms import AUGMENTS

__all__ = ["AUGMENTS", "BUILTIN_HELP", "DataBundle", "ImageClassificationDataset", "open_data"]

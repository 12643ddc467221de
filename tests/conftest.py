"""Test-wide setup: never touch the network for Hugging Face models or data sets."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

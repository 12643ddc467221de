"""Test-wide setup: never touch the network for Hugging Face models or data sets, nor the user's caches."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# what load_dataset caches for the tests' throwaway folders (this process and the kdcli processes it starts)
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="kdcli-tests-hf-datasets-")
# the tests' own dataset writes print no progress bars (they would land in what a test reads from stderr)
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"

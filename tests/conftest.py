"""Test-wide setup: never touch the network for Hugging Face models or data sets, nor the user's caches."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# what load_dataset caches for the tests' throwaway folders (this process and the kdcli processes it starts)
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="kdcli-tests-hf-datasets-")
# the resident data path's decoded splits (kdcli.data.resident), never in the user's ~/.cache
os.environ["KDCLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdcli-tests-cache-")
# the tests' own dataset writes print no progress bars (they would land in what a test reads from stderr)
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"

# under pytest-xdist (make test runs one worker per core) each worker gets its share of the cores, so workers and
# the processes they start do not oversubscribe them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = str(max(1, _cores // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

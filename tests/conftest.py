import os

# One intra-op thread unless the caller chose otherwise (children the tests start inherit it). The tests' shapes are
# tiny, so threads buy nothing and cost a lot on a shared machine: tests/test_generation.py + test_models.py took
# 3 min 12 s with torch's default threads and 1 min 0 s with one thread (2-core machine, load average 2.6-4 from
# other jobs).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

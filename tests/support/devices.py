"""The devices a device test runs on: the CPU always, CUDA where a GPU is present."""

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no GPU: CUDA is not available"))]

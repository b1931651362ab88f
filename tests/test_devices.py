"""A device that this machine does not have is a typed error before anything is read or built."""
import pytest
import torch

from infinitetalk.devices import resolve_device
from infinitetalk.errors import InputError
from infinitetalk.weights.dit_loader import load_dit

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@no_cuda
def test_load_dit_on_cuda_without_cuda_is_a_clean_error(tmp_path):
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        load_dit(tmp_path / "Wan2.1-I2V-14B-480P", tmp_path / "infinitetalk.safetensors", device="cuda")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="Unknown device"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="not supported"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device(torch.device("cuda", 0))

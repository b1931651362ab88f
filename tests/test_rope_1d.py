"""The 1-D RoPE of the two-speaker audio attention: the math, and that a compiled block
computes its cos/sin table once per token instead of once per head and channel."""
import re

import pytest
import torch

from infinitetalk.models.attention import ROPE_THETA, rope_1d, rope_1d_table


def _rope_complex(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(x0 + i x1) * exp(i p theta^(-2j/D)) in float64."""
    d = x.shape[-1]
    freqs = ROPE_THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double().reshape(*positions.shape[-2:] if positions.dim() == 2 else (1, -1), 1, 1) * freqs
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize("batched_positions", [False, True])
def test_rope_1d_rotates_pairs_by_position(batched_positions):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 3, 16, generator=g)
    positions = torch.rand(2, 40, generator=g) * 24 if batched_positions else torch.rand(40, generator=g) * 24
    out = rope_1d(x, positions)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _rope_complex(x, positions), atol=2e-5, rtol=1e-5)


def test_rope_1d_table_shape_and_values():
    positions = torch.tensor([[0.0, 2.0, 12.0, 22.0]])
    table = rope_1d_table(positions, 8)
    assert table.shape == (1, 4, 4, 2) and table.dtype == torch.float32
    freqs = ROPE_THETA ** (-torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(table[0, 1, :, 0], torch.cos(2.0 * freqs))
    torch.testing.assert_close(table[0, 3, :, 1], torch.sin(22.0 * freqs))


def test_compiled_rope_1d_writes_the_table_once():
    from torch._inductor.utils import run_and_get_code

    def rotate_projection(x, w, positions):
        return rope_1d((x @ w).view(1, -1, 4, 32), positions)

    g = torch.Generator().manual_seed(1)
    x, w, positions = torch.randn(1, 64, 128, generator=g), torch.randn(128, 128, generator=g), torch.rand(1, 64, generator=g)
    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(rotate_projection, fullgraph=True), x, w, positions)
    torch.testing.assert_close(out, rotate_projection(x, w, positions), atol=1e-5, rtol=1e-5)
    code = "\n".join(codes)
    assert "rope_1d_table" in code
    kernels = re.findall(r"(\w*fused\w*) = async_compile", code)
    assert kernels and not any("cos" in k or "sin" in k for k in kernels), kernels

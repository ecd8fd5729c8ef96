"""Decode strategies against a plain `vae.decode`, on the tiny VAE and on the full-size DC-AE config.

Strips and patch-conv are exact methods (fp32, CPU). On the full-size DC-AE config a strip decode
equals a full decode bit for bit (torch.equal), and that test allows nothing: a halo two rows short
of the tail's receptive field differs there by only ~5e-7, which any tolerance would let through.
On the tiny VAE some strip heights make the CPU's convolution kernels sum in another order (~5e-7
apart), so the tiny-VAE tests keep a float tolerance and the halo is judged on the full-size one. Tiled
decoding is not exact by design (tiles see part of the attention context and are blended), so it
is only checked for shape and for being exact when one tile covers the image.
"""

from __future__ import annotations


import pytest
import torch
from diffusers import AutoencoderDC

from sana_cli.engine import vae as decode

from .conftest import full_size_dcae, run_python

REASSOCIATION = 1e-5  # the tiny VAE only: float sums in another order, never a missing row of context


@pytest.fixture(scope="module")
def tiny_vae(tiny_dir):
    return AutoencoderDC.from_pretrained(str(tiny_dir / "vae")).eval()


@pytest.fixture(scope="module")
def full_size_vae():
    return full_size_dcae()


def plain(vae, z):
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]


@pytest.mark.parametrize("shape", [(1, 4, 24, 16), (2, 4, 17, 9)])
@pytest.mark.parametrize("rows", [2, 3, 5, 64])
def test_strips_equal_a_full_decode_on_the_tiny_vae(tiny_vae, shape, rows):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    full = plain(tiny_vae, z)
    strips = decode.strip_decode(tiny_vae, z, rows)
    assert strips.shape == full.shape
    assert (strips - full).abs().max().item() <= REASSOCIATION


def test_strips_equal_a_full_decode_on_the_full_size_dcae(full_size_vae):
    assert decode.tail_halo(full_size_vae) == 8 and decode._tail_scale(full_size_vae) == 8
    z = torch.randn(1, 32, 6, 6, generator=torch.Generator().manual_seed(2))
    full = plain(full_size_vae, z)
    strips = decode.strip_decode(full_size_vae, z, 7)  # tail input is 24 rows: 4 strips, one partial
    assert strips.shape == (1, 3, 192, 192)
    assert torch.equal(strips, full), (strips - full).abs().max().item()


def test_patch_conv_equals_full_and_is_undone_afterwards(tiny_vae):
    from patch_conv import PatchConv2d

    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    result = decode.decode(tiny_vae, z, "patch-conv")
    assert result.strategy == "patch-conv:32"
    assert (result.image - plain(tiny_vae, z)).abs().max().item() == 0.0
    assert not any(isinstance(m, PatchConv2d) for m in tiny_vae.modules())


def test_patch_conv_splits_always_divide_the_decoder_heights():
    for latent_height in (128, 72, 96, 45, 7):
        splits = decode.patch_conv_splits(latent_height)
        assert 1 <= splits <= 32 and latent_height % splits == 0
    assert decode.patch_conv_splits(128) == 32 and decode.patch_conv_splits(72) == 24


def test_tiled_is_exact_when_one_tile_covers_the_image_and_shaped_right_otherwise(tiny_vae):
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    full = plain(tiny_vae, z)
    one_tile = decode.decode(tiny_vae, z, "tiled", tile_size=128)
    assert one_tile.strategy == "tiled:128" and torch.equal(one_tile.image, full)
    tiled = decode.decode(tiny_vae, z, "tiled", tile_size=64)
    assert tiled.image.shape == full.shape
    assert not tiny_vae.use_tiling  # restored


def test_auto_picks_full_when_it_fits_and_strips_sized_to_memory_otherwise(full_size_vae):
    assert decode.choose(full_size_vae, 1024, 1024, free_bytes=64 * 2**30) == ("full", None)
    strategy, rows = decode.choose(full_size_vae, 4096, 4096, free_bytes=8 * 2**30)
    assert strategy == "strips" and 2 <= rows < 512
    _, fewer = decode.choose(full_size_vae, 4096, 4096, free_bytes=4 * 2**30)
    assert fewer < rows


def test_out_of_memory_detection():
    assert decode.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert decode.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert decode.is_out_of_memory(UnboundLocalError("cannot access local variable 'image'"))
    assert not decode.is_out_of_memory(RuntimeError("shape mismatch"))


OOM_SCRIPT = """
import resource, sys, torch
from diffusers import AutoencoderDC
from sana_cli.engine import vae as decode
vae = AutoencoderDC.from_pretrained(sys.argv[1]).eval()
z = torch.randn(1, 4, 512, 512, generator=torch.Generator().manual_seed(5))
reference = torch.load(sys.argv[2])
size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
limit = size + 600 * 2**20          # room for a strip decode (~350 MB), not a full one (~750 MB)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
with torch.no_grad():
    result = decode.decode(vae, z, "full")
print(result.strategy, ",".join(result.fallbacks), (result.image[:, :, :64] - reference).abs().max().item())
"""


def test_a_real_out_of_memory_falls_back_to_strips(tiny_dir, tmp_path):
    """Not a mock: the address-space limit makes the CPU allocator fail the full decode."""
    vae = AutoencoderDC.from_pretrained(str(tiny_dir / "vae")).eval()
    z = torch.randn(1, 4, 512, 512, generator=torch.Generator().manual_seed(5))
    top = decode.strip_decode(vae, z, 16)[:, :, :64].clone()
    torch.save(top, tmp_path / "top.pt")
    out = run_python(OOM_SCRIPT, tiny_dir / "vae", tmp_path / "top.pt")
    assert out.returncode == 0, out.stderr[-2000:]
    strategy, fallbacks, diff = out.stdout.split()
    assert strategy.startswith("strips:") and fallbacks.split(",")[0] == "full"
    assert float(diff) <= REASSOCIATION

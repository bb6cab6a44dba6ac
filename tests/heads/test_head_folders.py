"""Heads on disk beyond distill's checkpoints: a head distilled for a float32 model loads for
its float16 / bfloat16 copies (and a compiled one) but not for other weights, and a head
saved as a folder (save_pretrained) loads with from_pretrained and gk.load_head."""

import copy
import json

import pytest
import torch

import genie_kernels as gk
from genie_kernels.checkpoint import CheckpointError
from genie_kernels.heads.storage import identity_matches, model_identity

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A head distilled (2 steps) for a float32 tiny UNet, and its checkpoint."""
    unet = tiny_unet()
    model = gk.UNet2DAdapter(unet)
    torch.manual_seed(1)
    head = gk.ConvHead(1, feature_channels=8, temb_channels=32, nf=8, num_blocks=1, groups=4)
    data = torch.rand(16, 1, 8, 8) * 2 - 1
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    result = gk.distill(model, head, data, steps=2, batch_size=4, val_size=0, progress=False, out=path)
    return unet, result.head, path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_head_loads_for_a_copy_of_its_model_in_another_precision(distilled, dtype):
    unet, _, path = distilled
    copy_model = gk.UNet2DAdapter(copy.deepcopy(unet).to(dtype))
    head = gk.load_head(path, model=copy_model)
    assert isinstance(head, gk.ConvHead)


def test_a_head_is_refused_for_other_weights_in_any_precision(distilled):
    _, _, path = distilled
    for dtype in (torch.float32, torch.float16):
        with pytest.raises(CheckpointError, match="distilled for the model"):
            gk.load_head(path, model=gk.UNet2DAdapter(tiny_unet(seed=5).to(dtype)))
    nudged = copy.deepcopy(distilled[0])
    with torch.no_grad():
        nudged.conv_in.weight[0, 0, 0, 0] += 0.01  # one weight moved by more than half precision's rounding
    assert not identity_matches(model_identity(gk.UNet2DAdapter(distilled[0])), model_identity(gk.UNet2DAdapter(nudged)))


def test_an_identity_from_before_the_rounded_digests_still_matches_exactly(distilled):
    unet = distilled[0]
    old = {key: value for key, value in model_identity(gk.UNet2DAdapter(unet)).items()
           if key not in ("sha256_float16", "sha256_bfloat16")}
    assert identity_matches(old, model_identity(gk.UNet2DAdapter(unet)))
    assert not identity_matches(old, model_identity(gk.UNet2DAdapter(copy.deepcopy(unet).half())))


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the feature hooks break the graph
def test_the_adapter_takes_a_compiled_unet(distilled):
    unet = distilled[0]
    compiled = torch.compile(unet, backend="eager")  # cheap: no code generation
    plain, wrapped = gk.UNet2DAdapter(unet), gk.UNet2DAdapter(compiled)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected, got = plain.forward_features(x, t), wrapped.forward_features(x, t)
    for name in ("eps", "features", "temb"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name))
    assert model_identity(wrapped) == model_identity(plain)
    gk.load_head(distilled[2], model=wrapped)
    head = gk.load_head(distilled[2])
    with torch.no_grad():
        torch.testing.assert_close(gk.sample(wrapped, x, 3, solver="genie", head=head),
                                   gk.sample(plain, x, 3, solver="genie", head=head))


def test_save_pretrained_and_from_pretrained_round_trip(distilled, tmp_path):
    unet, head, path = distilled
    folder = head.save_pretrained(tmp_path / "my-head")
    assert sorted(p.name for p in folder.iterdir()) == ["head.json", "head.safetensors"]
    config = json.loads((folder / "head.json").read_text())
    assert config["head"] == head.config() and config["dtype"] == "float32"
    for loaded in (gk.ConvHead.from_pretrained(folder), gk.load_head(folder),
                   gk.ConvHead.from_pretrained(folder, model=gk.UNet2DAdapter(copy.deepcopy(unet).half()))):
        assert loaded.cost == head.cost
        for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="distilled for the model"):
        gk.ConvHead.from_pretrained(folder, model=gk.UNet2DAdapter(tiny_unet(seed=5)))
    with pytest.raises(CheckpointError, match="'conv' head, not 'mlp'"):
        gk.MLPHead.from_pretrained(folder)
    half = gk.load_head(path).half()
    assert gk.load_head(half.save_pretrained(tmp_path / "half")).dtype == torch.float16
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        head.save_pretrained(tmp_path / "a-file")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        gk.ConvHead.from_pretrained(tmp_path / "missing")


def test_checkpoints_from_before_the_rounded_digests_still_load_and_resume(tmp_path):
    from genie_kernels.checkpoint import load_checkpoint, save_checkpoint

    mixture = gk.image_mixture((1, 4, 4), components=3, seed=3)
    torch.manual_seed(0)
    path = tmp_path / "head.safetensors"
    settings = dict(batch_size=8, lr=3e-3, val_size=0, progress=False, out=path)
    gk.distill(mixture, gk.ConvHead(1, nf=8, num_blocks=1, groups=4), mixture, steps=2, **settings)
    tensors, config = load_checkpoint(path)
    for key in ("sha256_float16", "sha256_bfloat16"):
        del config["base_model"][key]  # the identity as heads distilled before recorded it
    save_checkpoint(path, tensors, config)
    gk.load_head(path, model=mixture)
    torch.manual_seed(0)
    result = gk.distill(mixture, gk.ConvHead(1, nf=8, num_blocks=1, groups=4), mixture, steps=4, resume=True, **settings)
    assert len(result.losses) == 4

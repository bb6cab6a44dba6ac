"""One adapter, many threads: ``HookedModel`` keeps what its hooks catch per call, so
concurrent ``sample()`` calls (plain and guided, whose calls have a doubled batch) give
exactly the serial results."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import genie_kernels as gk
from genie_kernels.models.adapters import HookedModel

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic kernels: serial and threaded runs agree bit for bit

CALLS = 20


class LabelNet(nn.Module):
    """A small ε-network with a time MLP, an optional label embedding and a last feature map."""

    def __init__(self, classes=4):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 16))
        self.label = nn.Embedding(classes, 16)
        self.body = nn.Conv2d(1, 8, 3, padding=1)
        self.proj = nn.Linear(16, 8)
        self.norm = nn.GroupNorm(4, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t, labels=None):
        temb = self.time_mlp(torch.stack([t.sin(), t.cos()], dim=1))
        if labels is not None:
            temb = temb + self.label(labels)
        h = torch.tanh(self.body(x) + self.proj(temb)[:, :, None, None])
        for _ in range(4):  # some work, so that the threads interleave
            h = torch.tanh(h + 0.1 * h.roll(1, dims=2))
        return self.out(self.norm(h))


def setup(conditional):
    torch.manual_seed(0)
    net = LabelNet().double().eval()
    model = HookedModel(net, feature_layer="norm", temb_layer="time_mlp", cond_arg="labels" if conditional else None,
                        null_cond=torch.tensor(3) if conditional else None)
    head = gk.ConvHead(1, feature_channels=8, temb_channels=16, nf=8, groups=4).double()
    with torch.no_grad():
        for p in head.parameters():  # the last conv starts at zero; the head must read the features
            p.normal_(0, 0.1)
    noises = [torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
              for i in range(CALLS)]
    return model, head, noises


@pytest.mark.parametrize("conditional", [False, True])
def test_concurrent_sample_calls_equal_serial_ones(conditional):
    model, head, noises = setup(conditional)
    extra = {"cond": torch.tensor([0, 2]), "guidance_scale": 3.0} if conditional else {}

    def run(noise):
        return gk.sample(model, noise, 6, solver="genie", head=head, **extra)

    serial = [run(noise) for noise in noises]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(run, noises))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))
    assert model._captures == {}  # nothing left behind


def test_a_network_that_doubles_its_batch_is_refused_clearly():
    torch.manual_seed(0)
    net = LabelNet().double().eval()

    class DoublingNet(nn.Module):  # a hand-written guidance wrapper inside the network
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x, t):
            eps = self.inner(torch.cat([x, x]), torch.cat([t, t]))
            return eps[: x.shape[0]]

    model = HookedModel(DoublingNet(), feature_layer="inner.norm", temb_layer="inner.time_mlp")
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hooked features have batch 4 for x of batch 2.*guidance_scale"):
        model.forward_features(x, t)

"""BatchGenerator: the seed contract's draws, with and without drawing ahead."""

import pytest
import torch as th

from conftest import draw, tiny_model
from improved_diffusion.sampling.random_util import BatchGenerator
from improved_diffusion.guidance.sag import SelfAttentionGuidance


def _calls(gen):
    """A fixed mix of draws: normal tensors of two shapes, labels in between."""
    out = [gen.randn((3, 2, 4, 4)), gen.randn((3, 2, 4, 4)), gen.randint(10)]
    out += [gen.randn((3, 2, 4, 4)), gen.randn((3, 5)), gen.randn((3, 2, 4, 4))]
    out += [gen.randn((3, 2, 4, 4)), gen.randint(7), gen.randn((3, 2, 4, 4))]
    return out


def test_each_sample_has_its_own_stream():
    a = BatchGenerator([5, 6, 7]).randn((3, 4))
    b = BatchGenerator([6]).randn((1, 4))
    assert th.equal(a[1:2], b)
    assert not th.equal(a[0], a[1])
    with pytest.raises(AssertionError, match="generators"):
        BatchGenerator([1, 2]).randn((3, 4))


def test_drawing_ahead_gives_the_same_numbers():
    plain = _calls(BatchGenerator([0, 1, 2], prefetch=False))
    ahead_gen = BatchGenerator([0, 1, 2], prefetch=True)
    ahead = _calls(ahead_gen)
    assert ahead_gen._executor is not None  # it really drew ahead
    assert len(plain) == len(ahead)
    for p, a in zip(plain, ahead):
        assert p.dtype == a.dtype and th.equal(p, a)
    # The generators end where the plain ones end, too.
    rest_plain = BatchGenerator([0, 1, 2], prefetch=False)
    _calls(rest_plain)
    assert th.equal(ahead_gen.randn((3, 3)), rest_plain.randn((3, 3)))


def test_default_draws_ahead_on_cuda_only():
    gen = BatchGenerator([0, 1])
    gen.randn((2, 3), device="cpu")
    assert gen._pending is None and gen._executor is None


@pytest.mark.parametrize("ddim", [False, True])
def test_sampling_with_drawing_ahead_is_identical(ddim):
    model, diffusion = tiny_model()
    sag = SelfAttentionGuidance(model, scale=1.5, depth=0, num_heads=2, blur_sigma=1.0)
    want = draw(diffusion, model, sag=sag, ddim=ddim, eta=1.0, seeds=(3, 4), prefetch=False)
    got = draw(diffusion, model, sag=sag, ddim=ddim, eta=1.0, seeds=(3, 4), prefetch=True)
    assert th.equal(got, want)

"""dptq.corruptions: every corruption grows with its degree, keeps shape, dtype and [0, 1], is
reproducible from its seed and leaves torch's global RNG alone."""
import pytest
import torch

from dptq import corruptions, data

torch.set_num_threads(1)
# torchvision 0.29 deprecates its JPEG coder (used by v2.JPEG) in favour of torchcodec
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def images():
    """Smooth structured images (upsampled 4x4 noise), where every corruption has a visible effect."""
    coarse = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse, size=(24, 24), mode="bilinear", align_corners=False)


def distance(images, name, degree, seed=3):
    """Mean |network input corrupted - network input clean|: covers the normalisation shift too."""
    out, normalize = corruptions.corrupt(images, name, degree, seed)
    return (normalize(out) - data.normalize(images)).abs().mean().item()


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_severity_grows_with_the_degree(images, name):
    d = [distance(images, name, degree) for degree in range(corruptions.DEGREES + 1)]
    assert d[0] == 0.0
    assert all(a < b for a, b in zip(d, d[1:])), d


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_shape_dtype_range_and_reproducibility(images, name):
    state = torch.get_rng_state()
    out, normalize = corruptions.corrupt(images, name, 4, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    again, normalize_again = corruptions.corrupt(images, name, 4, seed=11)
    assert torch.equal(out, again) and torch.equal(normalize(out), normalize_again(again))


@pytest.mark.parametrize("name", sorted(set(corruptions.NAMES) - corruptions.SEEDLESS))
def test_the_seed_matters_for_random_corruptions(images, name):
    assert distance(images, name, 3, seed=1) != distance(images, name, 3, seed=2)


@pytest.mark.parametrize("name", sorted(corruptions.SEEDLESS))
def test_seedless_corruptions_ignore_the_seed(images, name):
    """The analysis measures them at seed 0 only and repeats the result for the other seeds."""
    for degree in range(1, corruptions.DEGREES + 1):
        assert torch.equal(corruptions.corrupt(images, name, degree, seed=0)[0], corruptions.corrupt(images, name, degree, seed=7)[0])


def test_random_corruptions_draw_per_image(images):
    # one shared draw would rotate the two copies identically
    twins = images[:1].repeat(2, 1, 1, 1)
    out, _ = corruptions.corrupt(twins, "rotation", 5, seed=0)
    assert not torch.equal(out[0], out[1])


def test_only_distribution_shift_changes_the_normalisation(images):
    for name in corruptions.NAMES:
        out, normalize = corruptions.corrupt(images, name, 2, seed=0)
        if name == "distribution_shift":
            assert torch.equal(out, images) and not torch.equal(normalize(images), data.normalize(images))
        else:
            assert normalize is data.normalize


@pytest.mark.parametrize("name,degree", [("fog", 1), ("jpeg", 6), ("jpeg", -1)])
def test_bad_arguments_are_refused(images, name, degree):
    with pytest.raises(ValueError, match="corruption"):
        corruptions.corrupt(images, name, degree, seed=0)


def test_the_severity_table_covers_every_name_and_degree():
    assert set(corruptions.SEVERITY) == set(corruptions.NAMES)
    assert all(len(levels) == corruptions.DEGREES for levels in corruptions.SEVERITY.values())

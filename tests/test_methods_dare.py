"""Tests for hf_sta.methods.dare: properties of the random drop, and equality with PEFT given the same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from hf_sta.methods import selection
from hf_sta.methods.dare import KeepDraws, dare_drop, dare_keep_mask, dare_linear, dare_ties

pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def restore_global_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def peft_given_our_masks(monkeypatch, peft_kernel, task_tensors, *args, density, seed):
    """``peft_kernel(list(task_tensors), *args)`` with ``torch.bernoulli`` returning the masks our kernels draw from
    ``seeded(seed)`` (task after task), so that PEFT and we drop the same entries."""
    generator = seeded(seed)
    numel = task_tensors[0].numel()
    masks = iter(
        [
            dare_keep_mask(numel, density, generator=generator).view(task_tensors.shape[1:]).float()
            for _ in task_tensors
        ]
    )
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", lambda probabilities: next(masks))
        return peft_kernel(list(task_tensors), *args)


@pytest.mark.parametrize("block_size", [None, 97])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(3, 500), (2, 20, 30)])
def test_dare_linear_matches_peft_given_the_same_masks(monkeypatch, density, shape, block_size):
    if block_size is not None:  # masks expanded block by block, blocks not aligned with the tensor or the bytes
        monkeypatch.setattr(selection, "BLOCK_SIZE", block_size)
    task_tensors = torch.randn(shape, generator=seeded(0))
    weights = torch.tensor([1.0, -0.5, 2.0][: shape[0]])
    expected = peft_given_our_masks(
        monkeypatch, merge_utils.dare_linear, task_tensors, weights, density, density=density, seed=123
    )
    out = dare_linear(task_tensors, weights, generator=seeded(123), density=density)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block_size", [None, 97])
@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.3, 0.5, 1.0])
def test_dare_ties_matches_peft_given_the_same_masks(monkeypatch, majority_sign_method, density, block_size):
    if block_size is not None:  # the blocked election and mean, blocks not aligned with the tensor
        monkeypatch.setattr(selection, "BLOCK_SIZE", block_size)
    task_tensors = torch.randn(3, 40, 25, generator=seeded(1))
    weights = torch.tensor([0.5, 1.0, 1.5])
    expected = peft_given_our_masks(
        monkeypatch,
        merge_utils.dare_ties,
        task_tensors,
        weights,
        density,
        majority_sign_method,
        density=density,
        seed=7,
    )
    out = dare_ties(
        task_tensors, weights, generator=seeded(7), density=density, majority_sign_method=majority_sign_method
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def _reference_keep_mask(numel: int, density: float, bits: int, seed: int) -> torch.Tensor:
    """Independent oracle: unpack the little-endian bit stream of the same int64 words with NumPy, read ``bits`` bits
    per entry as an unsigned integer and keep it below ``round(density * 65536) / 2**(16 - bits)``."""
    words_needed = -(-numel * bits // 64)
    words = torch.empty(words_needed, dtype=torch.int64).random_(-(2**63), None, generator=seeded(seed))
    stream = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[: numel * bits]
    values = stream.reshape(numel, bits).astype(np.int64) @ (1 << np.arange(bits))
    levels = round(density * 65536)
    if bits == 16:  # compared as signed int16 against levels - 2**15: the same as unsigned (v ^ 0x8000) < levels
        return torch.from_numpy((values ^ 0x8000) < levels)
    return torch.from_numpy(values < levels >> (16 - bits))


@pytest.mark.parametrize(
    ("density", "bits"),
    [(0.5, 1), (0.25, 2), (0.75, 2), (0.625, 4), (0.8125, 4), (0.3828125, 8), (0.1, 16), (0.77, 16), (0.3, 16)],
)
def test_keep_mask_reads_as_few_bits_as_the_density_needs(density, bits):
    numel = 1001  # not a multiple of the entries per word: the last word is partly unused
    assert torch.equal(
        dare_keep_mask(numel, density, generator=seeded(3)), _reference_keep_mask(numel, density, bits, 3)
    )
    # The generator advanced by exactly the words drawn.
    generator = seeded(3)
    dare_keep_mask(numel, density, generator=generator)
    expected_state = seeded(3)
    torch.empty(-(-numel * bits // 64), dtype=torch.int64).random_(-(2**63), None, generator=expected_state)
    assert torch.equal(generator.get_state(), expected_state.get_state())


@pytest.mark.parametrize("density", [0.5, 0.25, 0.625, 0.3828125, 0.3])
def test_keep_draws_expand_any_range_of_the_mask(density):
    # Kernels expand the mask block by block from bits drawn once: any range, aligned to the bytes or not.
    numel = 1001
    draws = KeepDraws.draw(numel, density, generator=seeded(3))
    expected = _reference_keep_mask(numel, density, draws.bits, 3)
    for start, stop in ((0, numel), (0, 1), (1, 2), (3, 97), (97, 194), (500, 1001), (1000, 1001), (7, 7)):
        out = torch.empty(stop - start, dtype=torch.bool)
        assert draws.mask(start, stop, out=out) is out and torch.equal(out, expected[start:stop])
        # The torch expansion (used off CPU) gives the same mask as the NumPy one (CPU).
        assert torch.equal(draws._mask_torch(start, stop, torch.empty_like(out)), expected[start:stop])


@pytest.mark.parametrize("density", [0.5, 0.25, 0.625, 0.3828125])
def test_keep_probability_with_few_bits_is_exact(density):
    numel = 1 << 20
    fraction = dare_keep_mask(numel, density, generator=seeded(5)).float().mean().item()
    assert abs(fraction - density) < 5 * (density * (1 - density) / numel) ** 0.5


def test_keep_probability_is_resolved_to_one_in_65536():
    numel = 1 << 20
    # density 1e-9 rounds to 0 levels but keeps 1/65536 (never nothing), 1 - 1e-9 drops 1/65536 (never nothing)
    kept_rarely = int(dare_keep_mask(numel, 1e-9, generator=seeded(0)).sum())
    dropped_rarely = numel - int(dare_keep_mask(numel, 1 - 1e-9, generator=seeded(1)).sum())
    for count in (kept_rarely, dropped_rarely):
        assert 16 - 5 * 4 < count < 16 + 5 * 4  # Poisson(16): 2**20 / 2**16
    # 0.3 is resolved to round(0.3 * 65536) / 65536 = 19661 / 65536
    fraction = dare_keep_mask(numel, 0.3, generator=seeded(2)).float().mean().item()
    assert abs(fraction - 19661 / 65536) < 5 * (0.3 * 0.7 / numel) ** 0.5


def test_kept_fraction_and_exact_rescale():
    tau = torch.randn(2, 200_000, generator=seeded(3))
    for density in (0.1, 0.5, 0.9):
        dropped = dare_drop(tau, density, generator=seeded(4))
        kept = dropped != 0
        for task in range(2):
            fraction = kept[task].float().mean().item()
            assert abs(fraction - density) < 5 * (density * (1 - density) / 200_000) ** 0.5
        assert torch.equal(dropped[kept], tau[kept] / density)  # exactly tau / density on kept entries
        unscaled = dare_drop(tau, density, rescale=False, generator=seeded(4))
        assert torch.equal(unscaled != 0, kept) and torch.equal(unscaled[kept], tau[kept])


def test_expectation_over_many_draws():
    tau = torch.randn(1, 64, generator=seeded(5))
    density, draws = 0.3, 4000
    generator = seeded(6)
    total = torch.zeros(64)
    for _ in range(draws):
        total += dare_linear(tau, torch.ones(1), generator=generator, density=density)
    mean = total / draws
    std_of_mean = tau[0].abs() * ((1 - density) / density / draws) ** 0.5
    assert ((mean - tau[0]).abs() <= 5 * std_of_mean + 1e-6).all()


def test_determinism_and_generator_use(restore_global_rng):
    task_tensors = torch.randn(3, 1000, generator=seeded(7))
    weights = torch.ones(3)
    for kernel in (dare_linear, dare_ties):
        first = kernel(task_tensors, weights, generator=seeded(11), density=0.5)
        assert torch.equal(first, kernel(task_tensors, weights, generator=seeded(11), density=0.5))
        assert not torch.equal(first, kernel(task_tensors, weights, generator=seeded(12), density=0.5))
        # generator=None uses (and advances) the global generator.
        torch.manual_seed(11)
        assert torch.equal(first, kernel(task_tensors, weights, density=0.5))


def test_density_one_is_deterministic_and_draws_nothing():
    task_tensors = torch.randn(2, 50, generator=seeded(8))
    generator = seeded(9)
    state = generator.get_state()
    out = dare_linear(task_tensors, torch.tensor([1.0, 3.0]), generator=generator, density=1.0)
    assert torch.equal(generator.get_state(), state)
    torch.testing.assert_close(out, task_tensors[0] + 3 * task_tensors[1])


def test_inputs_unchanged_and_bad_density():
    task_tensors = torch.randn(3, 100)
    before = task_tensors.clone()
    dare_ties(task_tensors, torch.ones(3), generator=seeded(0), density=0.5)
    dare_linear(task_tensors, torch.ones(3), generator=seeded(0), density=0.5)
    assert torch.equal(task_tensors, before)
    for density in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            dare_linear(task_tensors, torch.ones(3), density=density)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            dare_ties(task_tensors, torch.ones(3), density=density)

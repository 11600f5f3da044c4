"""The TransformTestMixin on nflows' own transforms, and on broken transforms it must catch."""

from __future__ import annotations

import pytest
import torch
from nflows.transforms import MaskedAffineAutoregressiveTransform, Transform

from pyro_ext.testing import TransformTestMixin


class TestMaskedAffineAutoregressive(TransformTestMixin):
    def make_transform(self) -> Transform:
        return MaskedAffineAutoregressiveTransform(features=4, hidden_features=8)

    def make_inputs(self) -> torch.Tensor:
        return torch.randn(5, 4)


class TestConditionalMaskedAffineAutoregressive(TransformTestMixin):
    def make_transform(self) -> Transform:
        return MaskedAffineAutoregressiveTransform(features=3, hidden_features=8, context_features=2)

    def make_inputs(self) -> torch.Tensor:
        return torch.randn(4, 3)

    def make_context(self) -> torch.Tensor:
        return torch.randn(4, 2)


class _WrongLogdet(Transform):
    """y = 2x, but reports log|det| of y = 3x."""

    def forward(self, inputs, context=None):
        return 2.0 * inputs, inputs.new_full(inputs.shape[:1], inputs.shape[1] * torch.log(torch.tensor(3.0)))

    def inverse(self, inputs, context=None):
        return inputs / 2.0, inputs.new_full(
            inputs.shape[:1], -inputs.shape[1] * torch.log(torch.tensor(2.0))
        )


class _BadInverse(Transform):
    """y = x + 1 with an inverse that forgets the shift."""

    def forward(self, inputs, context=None):
        return inputs + 1.0, inputs.new_zeros(inputs.shape[0])

    def inverse(self, inputs, context=None):
        return inputs, inputs.new_zeros(inputs.shape[0])


class _BatchCoupled(Transform):
    """Subtracts the batch mean: correct per batch, but rows depend on each other."""

    def forward(self, inputs, context=None):
        return inputs - inputs.mean(0, keepdim=True).detach(), inputs.new_zeros(inputs.shape[0])

    def inverse(self, inputs, context=None):
        return inputs, inputs.new_zeros(inputs.shape[0])


class _ForgetsParameter(Transform):
    """A buffer that is not saved in the state dict (a plain attribute)."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(3))
        self.scale = torch.randn(3).exp()  # not a buffer: lost by state_dict

    def forward(self, inputs, context=None):
        return (inputs - self.shift) / self.scale, -self.scale.log().sum().expand(inputs.shape[0])

    def inverse(self, inputs, context=None):
        return inputs * self.scale + self.shift, self.scale.log().sum().expand(inputs.shape[0])


@pytest.mark.parametrize(
    "broken, check",
    [
        (_WrongLogdet, "test_forward_logabsdet_matches_autograd_jacobian"),
        (_WrongLogdet, "test_round_trip_data_to_noise_to_data"),
        (_BadInverse, "test_round_trip_data_to_noise_to_data"),
        (_BadInverse, "test_round_trip_noise_to_data_to_noise"),
        (_BatchCoupled, "test_batch_rows_match_unbatched"),
        (_ForgetsParameter, "test_state_dict_round_trip"),
    ],
)
def test_mixin_catches_broken_transforms(broken: type, check: str) -> None:
    class Case(TransformTestMixin):
        def make_transform(self):
            return broken()

        def make_inputs(self):
            return torch.randn(4, 3)

    with pytest.raises(AssertionError):
        getattr(Case(), check)()

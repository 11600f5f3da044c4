"""Structured layers built from a Pyro model: the model's generative program as an nflows ``Transform``.

A Pyro model whose latent sites are continuous defines a triangular bijection between standard-normal
noise and its latent values: each site ``x_j ~ p_j(. | parents)`` is the image
``x_j = f_j(eps_j; parents)`` of its own noise under the site's exact noise-to-value map
(:func:`~pyro_ext.flows.site_bijectors.site_bijector`).
:class:`StructuredTransform` traces the model once, lays the latent sites out side by side and runs
that bijection in nflows' direction (``forward`` = data -> noise, ``inverse`` = noise -> data).
With a :class:`~nflows.distributions.normal.StandardNormal` base, the layer *is* the model's joint
density; inside a flow it carries the model's inductive bias (continuity, smoothness, hierarchy,
multimodality). :class:`GatedStructuredTransform` mixes each site's map with the identity through a
learned gate, so that training can switch the prior off where the data disagree with it.

References: Silvestri, Fertig, Moore, Ambrogioni, *Embedded-model flows: Combining the inductive biases
of model-free deep learning and explicit probabilistic modeling*, arXiv:2110.06021 (ICLR 2022).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from nflows.transforms.base import Transform
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from torch.distributions import biject_to, constraints, transform_to
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_ext.flows.roots import fixed_root_iterations, implicit_step, monotone_root
from pyro_ext.flows.site_bijectors import site_bijector

__all__ = ["GatedStructuredTransform", "SiteInfo", "StructuredTransform", "to_torch_transform"]

Coordinates = Literal["value", "unconstrained"]
Approximate = str | Mapping[str, str] | None

#: kinds of (unconstrained, leaf) site maps the gated layer has a closed form or a root scheme for.
_GATEABLE_KINDS = ("affine_diag", "affine_tril", "elementwise")
_PARAMETER_DICT_ATTRIBUTES = frozenset(dir(nn.ParameterDict()))


# ----------------------------------------------------------------------------------------- helpers


def _escape(name: str) -> str:
    """A module-attribute-safe key for a Pyro name ('.' is not allowed in parameter names)."""
    key = name.replace(".", "__dot__")
    if not key or key in _PARAMETER_DICT_ATTRIBUTES:
        key = "site_" + key
    return key


def _is_factor(fn: Any) -> bool:
    """Whether ``fn`` is (a wrapper of) the ``Unit`` distribution ``pyro.factor`` scores with."""
    while fn is not None:
        if isinstance(fn, dist.Unit):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _is_identity(transform: torch.distributions.Transform) -> bool:
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


def _sum_rows(term: Tensor, value_shape: torch.Size, summed_dims: int, batched: bool) -> Tensor:
    """Sum a per-element (or per-event) term to one number per row.

    ``term`` is broadcastable to ``value_shape`` with its ``summed_dims`` rightmost dims already summed
    out; with ``batched`` the first dim of ``value_shape`` is the batch and the result is ``[B]``.
    """
    target = tuple(value_shape[: len(value_shape) - summed_dims])
    if term.dim() > len(target):
        raise RuntimeError(f"a term of shape {tuple(term.shape)} does not broadcast to {target}")
    shape = (1,) * (len(target) - term.dim()) + tuple(term.shape)
    if any(size not in (1, wanted) for size, wanted in zip(shape, target)):
        raise RuntimeError(f"a term of shape {tuple(term.shape)} does not broadcast to {target}")
    # Sum what the term holds and count the copies broadcasting would make, instead of materialising them.
    first = 1 if batched else 0
    copies = math.prod(wanted for size, wanted in zip(shape[first:], target[first:]) if size == 1)
    if not batched:
        return term.sum() * copies if copies != 1 else term.sum()
    rows = term.reshape(shape).reshape(shape[0], -1).sum(-1)
    rows = rows * copies if copies != 1 else rows
    return rows.expand(target[0]) if shape[0] == 1 else rows


def _support_transform(fn: torch.distributions.Distribution) -> torch.distributions.Transform | None:
    """``biject_to(fn.support)``, or ``None`` where it is the identity."""
    transform = biject_to(_bijectable_support(fn.support))
    return None if _is_identity(transform) else transform


def _bijectable_support(support: constraints.Constraint) -> constraints.Constraint:
    """``support`` with torch's mixture wrapper removed at any depth: torch registers no bijection for
    ``MixtureSameFamilyConstraint``, and the set it describes is its components' support."""
    mixture = getattr(constraints, "MixtureSameFamilyConstraint", None)
    if mixture is not None and isinstance(support, mixture):
        return _bijectable_support(support.base_constraint)
    if isinstance(support, constraints.independent):
        base = _bijectable_support(support.base_constraint)
        if base is not support.base_constraint:
            return constraints.independent(base, support.reinterpreted_batch_ndims)
    return support


@dataclasses.dataclass(frozen=True)
class SiteInfo:
    """What tracing recorded about one latent sample site.

    :param str name: the site's name.
    :param torch.Size shape: its value's shape in an unbatched run (``batch_shape + event_shape``).
    :param torch.Size batch_shape: the distribution's batch shape (plates and broadcasting).
    :param torch.Size event_shape: the distribution's event shape.
    :param int offset: first column of the site in the packed ``[B, D]`` layout.
    :param int numel: number of columns the site occupies.
    :param int pad: singleton dims inserted after the batch dim so that the site's batch dims line up
        with ``max_plate_nesting``.
    :param tuple plates: names of the plates the site sits in, outermost first.
    :param str distribution: the class name of its distribution.
    :param kind: the site map's kind (``None`` for a :class:`~pyro_ext.flows.emf.ModelDistribution`).
    :param exact: whether that map pushes N(0, I) exactly onto the site's conditional.
    :param numerical: the direction of the site map that solves a root (``"to_value"``), if any.
    """

    name: str
    shape: torch.Size
    batch_shape: torch.Size
    event_shape: torch.Size
    offset: int
    numel: int
    pad: int
    plates: tuple[str, ...]
    distribution: str
    kind: str | None = None
    exact: bool | None = None
    numerical: str | None = None

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


# ----------------------------------------------------------------------------------------- messengers


class _ParamLifter(Messenger):
    """Replaces ``pyro.param`` statements by the layer's own (lifted) parameters."""

    def __init__(
        self, program: _ModelProgram, discover: bool, outer_store: Mapping[str, Tensor] | None = None
    ):
        super().__init__()
        self.program = program
        self.discover = discover
        self.outer_store = outer_store or {}
        self.owned = {id(tensor) for tensor in program.parameters()}

    def _pyro_param(self, msg: dict) -> None:
        name = msg["name"]
        store = pyro.get_param_store()
        # Only genuine pyro.param statements read the store; PyroModule's module-local statements carry
        # their own value and are left alone (the module is a submodule of the layer).
        if not self.program._lift_params or getattr(msg["fn"], "__self__", None) is not store:
            return
        if name in self.program._param_keys:
            msg["value"] = self.program.model_param(name)
            return
        # The pass runs in a fresh, private param-store scope: a name already there was put there during
        # this pass by a PyroModule, and a parameter the layer owns is a module's (PyroModule, or
        # pyro.module on a module the layer holds). Both are the layer's parameters already.
        init = msg["args"][1] if len(msg["args"]) > 1 else None
        if name in store or (isinstance(init, Tensor) and id(init) in self.owned):
            return
        if "$$$" in name:
            raise ValueError(
                f"the model calls pyro.module (parameter {name!r}) on a module the layer does not hold, "
                "which a structured layer does not support: pass the nn.Module as (part of) the model, "
                "use a PyroModule, or pass the module as a model argument"
            )
        if not self.discover:
            raise ValueError(
                f"pyro.param {name!r} was not seen when the layer was built (its existence depends on "
                "the inputs or the context); structured layers need the same parameters on every run"
            )
        self.program._lift_param(name, msg, self.outer_store)
        msg["value"] = self.program.model_param(name)


class _SitePass(Messenger):
    """Calls ``visit(site, fn)`` at each latent site and uses its result as the site's value."""

    def __init__(self, program: _ModelProgram, visit: Callable[[SiteInfo, Any], Tensor]) -> None:
        super().__init__()
        self.program = program
        self.visit = visit
        self.seen: list[str] = []

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        name = msg["name"]
        info = self.program._site_index.get(name)
        if info is None:
            raise ValueError(
                f"the model sampled a latent site {name!r} that was not present when the layer was built; "
                "structured layers need the same latent sites on every run (no value-dependent control flow)"
            )
        msg["value"] = self.visit(info, msg["fn"])
        self.seen.append(name)

    def check_complete(self) -> None:
        if len(self.seen) != len(self.program._sites) or set(self.seen) != set(self.program._site_index):
            missing = sorted(set(self.program._site_index) - set(self.seen))
            raise ValueError(
                f"the model did not visit the latent sites {missing} in this run, or visited a site twice; "
                "structured layers need the same latent sites on every run"
            )


# ----------------------------------------------------------------------------------------- program


class _ModelProgram(nn.Module):
    """Tracing, layout, lifted parameters and model runs shared by the layers and ``ModelDistribution``."""

    def _build_program(
        self,
        model: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        lift_params: bool,
        context_to_kwargs: Callable[[Tensor], Mapping[str, Any]] | None,
        max_plate_nesting: int | None,
        ignore_factors: bool,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if context_to_kwargs is not None and not callable(context_to_kwargs):
            raise TypeError("context_to_kwargs must be a callable mapping a context tensor to model kwargs")
        if max_plate_nesting is not None and (
            not isinstance(max_plate_nesting, int) or max_plate_nesting < 0
        ):
            raise ValueError(
                f"max_plate_nesting must be a non-negative int or None, got {max_plate_nesting!r}"
            )
        self.model = model
        self.context_to_kwargs = context_to_kwargs
        self._lift_params = bool(lift_params)
        self.unconstrained_params = nn.ParameterDict()
        self._param_keys: dict[str, str] = {}
        self._param_constraints: dict[str, constraints.Constraint] = {}
        self._argument_modules = nn.ModuleDict()
        self._arg_spec = [self._store_argument(f"arg{i}", a) for i, a in enumerate(args)]
        self._kwarg_spec = {k: self._store_argument(f"kwarg_{k}", v) for k, v in kwargs.items()}
        trace = self._trace_prototype()
        self._read_layout(trace, max_plate_nesting, ignore_factors)

    # -- arguments ------------------------------------------------------------------------------

    def _store_argument(self, key: str, value: Any) -> tuple[str, Any]:
        # Tensors become (non-persistent) buffers so that .to(device/dtype) moves them with the layer;
        # modules become submodules so that their parameters train with the layer.
        if isinstance(value, Tensor) and not value.requires_grad:
            self.register_buffer("_model_" + key, value, persistent=False)
            return ("buffer", "_model_" + key)
        if isinstance(value, nn.Module):
            self._argument_modules[key] = value
            return ("module", key)
        return ("value", value)

    def _load_argument(self, spec: tuple[str, Any]) -> Any:
        kind, ref = spec
        if kind == "buffer":
            return getattr(self, ref)
        if kind == "module":
            return self._argument_modules[ref]
        return ref

    def _model_arguments(self, context: Tensor | None) -> tuple[list[Any], dict[str, Any]]:
        args = [self._load_argument(spec) for spec in self._arg_spec]
        kwargs = {k: self._load_argument(spec) for k, spec in self._kwarg_spec.items()}
        if context is not None and self.context_to_kwargs is not None:
            kwargs.update(self.context_to_kwargs(context))
        return args, kwargs

    # -- parameters -----------------------------------------------------------------------------

    def _lift_param(self, name: str, msg: dict, outer_store: Mapping[str, Tensor]) -> None:
        constraint = msg["kwargs"].get("constraint") or constraints.real
        if name in outer_store:
            # A value the user already trained is the natural starting point; the store is only read.
            init = outer_store[name]
        else:
            init = msg["args"][1] if len(msg["args"]) > 1 else msg["kwargs"].get("init_tensor")
            if init is None:
                raise ValueError(f"pyro.param {name!r} has no initial value and is not in the param store")
            if callable(init) and not isinstance(init, Tensor):
                init = init()
        init = torch.as_tensor(init)
        if not init.is_floating_point():
            init = init.to(torch.get_default_dtype())
        key = _escape(name)
        if key in self.unconstrained_params:
            raise ValueError(f"pyro.param names {name!r} and another name map to the same key {key!r}")
        with torch.no_grad():
            unconstrained = transform_to(constraint).inv(init.detach()).clone()
        self.unconstrained_params[key] = nn.Parameter(unconstrained)
        self._param_keys[name] = key
        self._param_constraints[name] = constraint

    def model_param(self, name: str) -> Tensor:
        """The constrained value of the lifted ``pyro.param`` called ``name`` (differentiable)."""
        if name not in self._param_keys:
            raise KeyError(f"no lifted pyro.param called {name!r}; known: {sorted(self._param_keys)}")
        return transform_to(self._param_constraints[name])(self.unconstrained_params[self._param_keys[name]])

    def named_model_params(self) -> Iterator[tuple[str, Tensor]]:
        """``(pyro name, constrained value)`` for every lifted ``pyro.param``."""
        for name in self._param_keys:
            yield name, self.model_param(name)

    # -- tracing --------------------------------------------------------------------------------

    def _param_scope(self) -> Any:
        # With lifted parameters every run happens in a fresh, private param-store scope, so that neither
        # the model's pyro.param statements nor a PyroModule's syncing touch the user's param store.
        if self._lift_params:
            return pyro.get_param_store().scope()
        return contextlib.nullcontext()

    def _trace_prototype(self) -> poutine.Trace:
        args, kwargs = self._model_arguments(None)
        store = pyro.get_param_store()
        outer_store = {name: store[name].detach().clone() for name in store.keys()}
        with self._param_scope(), poutine.block(), _ParamLifter(self, True, outer_store):
            return poutine.trace(self.model).get_trace(*args, **kwargs)

    def _inspect_site(self, name: str, fn: Any) -> tuple[str | None, bool | None, str | None]:
        return None, None, None

    def _check_site_options(self, names: tuple[str, ...]) -> None:
        pass

    def _read_layout(self, trace: poutine.Trace, max_plate_nesting: int | None, ignore_factors: bool) -> None:
        latent: list[tuple[str, dict]] = []
        nesting = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size != frame.full_size:
                    raise ValueError(
                        f"site {name!r} sits in the subsampled plate {frame.name!r} (size {frame.full_size}, "
                        f"subsample {frame.size}); a structured layer needs every plate at full size"
                    )
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
            if site["is_observed"]:
                if _is_factor(site["fn"]) and not ignore_factors:
                    raise ValueError(
                        f"the model has a pyro.factor site {name!r}: a factor changes the joint density "
                        "but has no noise<->value map, so the layer would not be the model; remove it, or "
                        "pass ignore_factors=True to build the layer from the sample sites alone"
                    )
                continue
            fn = site["fn"]
            if fn.support.is_discrete:
                raise TypeError(
                    f"site {name!r} has the discrete distribution {type(fn).__name__}; a structured layer "
                    "needs continuous latents: enumerate or marginalise the site out, or condition on it"
                )
            nesting = max(nesting, len(fn.batch_shape))
            latent.append((name, site))
        if max_plate_nesting is not None:
            if max_plate_nesting < nesting:
                raise ValueError(
                    f"max_plate_nesting={max_plate_nesting} is smaller than the model's {nesting} batch dims"
                )
            nesting = max_plate_nesting
        if not latent:
            raise ValueError("the model has no latent sample sites, so there is nothing to transform")
        self._check_site_options(tuple(name for name, _ in latent))
        sites, offset = [], 0
        for name, site in latent:
            fn = site["fn"]
            shape = site["value"].shape
            kind, exact, numerical = self._inspect_site(name, fn)
            numel = int(math.prod(shape))
            sites.append(
                SiteInfo(
                    name=name,
                    shape=shape,
                    batch_shape=fn.batch_shape,
                    event_shape=fn.event_shape,
                    offset=offset,
                    numel=numel,
                    pad=nesting - len(fn.batch_shape),
                    plates=tuple(f.name for f in reversed(site["cond_indep_stack"])),
                    distribution=type(fn).__name__,
                    kind=kind,
                    exact=exact,
                    numerical=numerical,
                )
            )
            offset += numel
        self._sites = tuple(sites)
        self._site_index = {s.name: s for s in self._sites}
        self.features = offset
        self.max_plate_nesting = nesting

    @property
    def sites(self) -> tuple[SiteInfo, ...]:
        """The latent sites in program order (the packed layout's order)."""
        return self._sites

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._sites)

    # -- layout ---------------------------------------------------------------------------------

    def _check_width(self, inputs: Any, argument: str = "inputs") -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{argument} must be a tensor, got {type(inputs).__name__}")
        if inputs.dim() != 2 or inputs.shape[-1] != self.features:
            raise ValueError(
                f"{argument} must have shape [batch, D] with D = {self.features} (the packed width of the "
                f"latent sites {list(self.site_names)}), got {tuple(inputs.shape)}"
            )

    def _check_finite(self, inputs: Tensor, argument: str = "inputs") -> None:
        if not torch.isfinite(inputs).all():
            raise ValueError(f"{argument} contains non-finite values (NaN or inf)")

    def _site_shape(self, info: SiteInfo, batch: int | None) -> torch.Size:
        if batch is None:
            return info.shape
        return torch.Size([batch, *([1] * info.pad), *info.shape])

    def unpack(self, inputs: Tensor) -> dict[str, Tensor]:
        """Split a packed ``[B, D]`` tensor (or one ``[D]`` row) into a dict of site values.

        Batched values have shape ``[B] + [1] * pad + site.shape``: the batch dim sits left of all
        ``max_plate_nesting`` plate dims, so the values can condition the model directly, as in
        ``poutine.condition(model, S.unpack(x))``.
        """
        if not isinstance(inputs, Tensor) or inputs.dim() not in (1, 2) or inputs.shape[-1] != self.features:
            raise ValueError(
                f"inputs must have shape [batch, D] or [D] with D = {self.features}, "
                f"got {getattr(inputs, 'shape', type(inputs).__name__)}"
            )
        batch = inputs.shape[0] if inputs.dim() == 2 else None
        return {s.name: inputs[..., s.columns].reshape(self._site_shape(s, batch)) for s in self._sites}

    def pack(self, values: Mapping[str, Tensor]) -> Tensor:
        """Concatenate site values (each ``[B, ...] + site.shape`` or ``site.shape``) into ``[B, D]``
        (or ``[D]`` when no value has a batch dim), in program order and row-major within a site."""
        unknown = set(values) - set(self._site_index)
        missing = set(self._site_index) - set(values)
        if unknown or missing:
            raise ValueError(
                f"values must hold exactly the latent sites {list(self.site_names)}; "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        unbatched = all(values[s.name].shape == s.shape for s in self._sites)
        pieces = []
        for s in self._sites:
            value = values[s.name]
            if unbatched:
                pieces.append(value.reshape(-1))
                continue
            if value.numel() % s.numel:
                raise ValueError(
                    f"value of site {s.name!r} has shape {tuple(value.shape)}, not [B, ...] + {s.shape}"
                )
            pieces.append(value.reshape(-1, s.numel))
        return torch.cat(pieces, dim=-1)

    # -- running the model ------------------------------------------------------------------------

    def _run_pass(self, visit: Callable[[SiteInfo, Any], Tensor], context: Tensor | None) -> None:
        args, kwargs = self._model_arguments(context)
        handler = _SitePass(self, visit)
        with self._param_scope(), poutine.block(), _ParamLifter(self, discover=False), handler:
            self.model(*args, **kwargs)
        handler.check_complete()

    def model_log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """Per-row log joint density of the latent sites at ``unpack(inputs)`` (Pyro's own ``log_prob``).

        :param torch.Tensor inputs: ``[B, D]`` latent values in the packed layout.
        :param context: optional ``[B, ...]`` context (see ``context_to_kwargs``).
        :return: ``[B]``.
        """
        self._check_width(inputs)
        values = self.unpack(inputs)
        batch = inputs.shape[0]
        total = inputs.new_zeros(batch)
        unconstrained = getattr(self, "coordinates", "value") == "unconstrained"

        def visit(info: SiteInfo, fn: Any) -> Tensor:
            nonlocal total
            value = values[info.name]
            if unconstrained:
                transform = _support_transform(fn)
                if transform is not None:
                    x = transform(value)
                    ladj = transform.log_abs_det_jacobian(value, x)
                    total = total + _sum_rows(ladj, value.shape, transform.codomain.event_dim, True)
                    value = x
            total = total + _sum_rows(fn.log_prob(value), value.shape, len(fn.event_shape), True)
            return value

        self._run_pass(visit, context)
        return total

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_captured"] = {}  # compiled graphs are process-local
        return state


# ----------------------------------------------------------------------------------------- layer


class StructuredTransform(_ModelProgram, Transform):
    r"""A Pyro model as an nflows ``Transform``: ``forward`` maps latent values to noise, ``inverse``
    maps noise to latent values by running the model's generative program.

    The model is traced once. Each latent site :math:`x_j \sim p_j(\cdot \mid \pi_j)` with parents
    :math:`\pi_j` gets the exact noise-to-value map :math:`x_j = f_j(\epsilon_j; \pi_j)` of its conditional
    (:func:`~pyro_ext.flows.site_bijectors.site_bijector`). The Jacobian is block-triangular in program
    order, so with :math:`\ell_j = \log|\det \partial f_j/\partial\epsilon_j|`

    .. math::

        \log \mathcal N(\epsilon; 0, I) - \sum_j \ell_j = \sum_j \log p_j(x_j \mid \pi_j),

    i.e. ``Flow(S, StandardNormal([D]))`` has exactly the model's joint density over its latent sites.

    *Passes.* ``forward`` conditions every latent site on its slice of the inputs (parents are read from
    the inputs, so every site is transformed at once) and returns the packed noise and
    :math:`-\sum_j \ell_j`; ``inverse`` sets each site to :math:`f_j(\epsilon_j)` so that later sites see
    the produced values. Each pass runs the model once, under ``poutine.block`` (nothing leaks into an
    enclosing trace). Observed and deterministic sites are constants of the layer.

    *Layout.* Sites are concatenated in program order, each row-major: ``S.features`` columns.
    ``S.pack`` / ``S.unpack`` convert between ``[B, D]`` and a dict of site values.

    *Batch.* A batch of ``B`` rows runs as one model call: a site of shape ``batch_shape + event_shape``
    gets the value shape ``[B] + [1] * pad + batch_shape + event_shape`` with the batch dim left of all
    ``max_plate_nesting`` plate dims. The model must broadcast over that leading dim (the contract of
    Pyro's ``vectorize_particles``); construction checks a batch of two against two single runs and
    raises a ``ValueError`` suggesting ``vectorize=False`` (a row loop) if they differ.

    *Parameters.* Each ``pyro.param`` of the model becomes an ``nn.Parameter`` of the layer (its
    unconstrained value, in ``S.unconstrained_params``; ``S.model_param(name)`` is the constrained
    value). The global param store is only read (a stored value is the initial value) and never
    written. An ``nn.Module`` / ``PyroModule`` model is the submodule ``S.model``; tensor arguments of
    the model are buffers, module arguments submodules.

    :param model: a Pyro model (function, ``nn.Module`` or ``PyroModule``) with continuous latents.
    :param args: positional arguments of the model, fixed for the layer.
    :param str coordinates: ``"value"``: the layer's data are the sites' values; ``"unconstrained"``:
        their images under ``biject_to(support)^{-1}`` (each site then lives on all of R^n).
    :param bool lift_params: make the model's ``pyro.param`` statements module parameters (default);
        ``False`` reads the global param store live.
    :param context_to_kwargs: ``context -> dict`` of model keyword arguments, making the layer
        conditional. It receives the ``[B, ...]`` context of a batched call and must return values that
        broadcast like the batched site values (leading ``B``, then ``max_plate_nesting`` plate dims);
        with ``vectorize=False`` it receives one row. Without it a context is ignored, as in nflows'
        unconditional layers.
    :param max_plate_nesting: number of plate dims to reserve; inferred from the trace by default.
    :param approximate: an approximate site map (see ``site_bijector``) for every site that needs one,
        or a dict ``{site name: method}``.
    :param bool ignore_factors: build the layer from the sample sites even if the model has
        ``pyro.factor`` sites (the layer then ignores the factors' density).
    :param bool vectorize: run a batch as one model call (default) or, with ``False``, row by row.
    :param compile: ``"auto"`` (default, same as ``True``) captures each batched pass once per input
        shape, dtype, device and grad mode: ``make_fx`` records it as aten operations with that shape baked
        in, and ``torch.jit.trace`` runs the recording (Pyro's JIT ELBOs trace too; root finders then run a
        fixed number of iterations). The graph is checked against an eager run on other inputs; where
        capture fails or they differ (value-dependent Python control flow) the layer stays eager with a
        warning. On CPU this removes the Python cost of the model and the effect handlers (about 6x on a
        30-step loop-written random walk). Layers with root-solved sites (mixtures, gated non-affine
        sites) run eagerly under ``"auto"``: their graphs would unroll the root finder's fixed iteration
        count. ``"inductor"`` compiles the recording with ``torch.compile`` instead: seconds to tens of
        seconds per shape once, then close to a hand-written layer, for long training runs. ``False``
        always runs eagerly. Models holding a ``PyroModule`` run eagerly unless Pyro's
        ``module_local_params`` is on.
    :param kwargs: keyword arguments of the model, fixed for the layer.

    Example::

        def random_walk(T=30):
            scale = pyro.param("scale", torch.tensor(0.5), constraint=constraints.positive)
            x = pyro.sample("x_0", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            for t in range(1, T):
                x = pyro.sample(f"x_{t}", dist.Normal(x, scale).to_event(1))

        layer = StructuredTransform(random_walk)            # D = 90
        flow = Flow(layer, StandardNormal([layer.features]))  # the model's own density
        x = flow.sample(100)

    References: arXiv:2110.06021 (embedded-model flows).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *args: Any,
        coordinates: Coordinates = "value",
        lift_params: bool = True,
        context_to_kwargs: Callable[[Tensor], Mapping[str, Any]] | None = None,
        max_plate_nesting: int | None = None,
        approximate: Approximate = None,
        ignore_factors: bool = False,
        vectorize: bool = True,
        compile: bool | Literal["auto", "inductor"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._initialise(
            model,
            args,
            kwargs,
            coordinates=coordinates,
            lift_params=lift_params,
            context_to_kwargs=context_to_kwargs,
            max_plate_nesting=max_plate_nesting,
            approximate=approximate,
            ignore_factors=ignore_factors,
            vectorize=vectorize,
            compile=compile,
        )

    def _initialise(
        self,
        model: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        coordinates: Coordinates,
        lift_params: bool,
        context_to_kwargs: Callable[[Tensor], Mapping[str, Any]] | None,
        max_plate_nesting: int | None,
        approximate: Approximate,
        ignore_factors: bool,
        vectorize: bool,
        compile: bool | Literal["auto", "inductor"],
    ) -> None:
        if coordinates not in ("value", "unconstrained"):
            raise ValueError(f"coordinates must be 'value' or 'unconstrained', got {coordinates!r}")
        if compile not in ("auto", "inductor", True, False):
            raise ValueError(f"compile must be 'auto', 'inductor', True or False, got {compile!r}")
        if approximate is not None and not isinstance(approximate, (str, Mapping)):
            raise TypeError("approximate must be None, a method name, or a dict {site name: method name}")
        self.coordinates = coordinates
        self.approximate = approximate
        self.vectorize = bool(vectorize)
        self.compile = "auto" if compile is True else compile
        self._captured: dict[tuple, Any] = {}
        self._build_program(
            model,
            args,
            kwargs,
            lift_params=lift_params,
            context_to_kwargs=context_to_kwargs,
            max_plate_nesting=max_plate_nesting,
            ignore_factors=ignore_factors,
        )
        self._setup_gates()
        if self.vectorize:
            self._check_broadcasting()

    def _setup_gates(self) -> None:
        pass

    def _check_site_options(self, names: tuple[str, ...]) -> None:
        if isinstance(self.approximate, Mapping):
            unknown = set(self.approximate) - set(names)
            if unknown:
                raise ValueError(f"approximate names unknown sites {sorted(unknown)}; sites: {list(names)}")

    def _approximate_for(self, name: str) -> str | None:
        if isinstance(self.approximate, Mapping):
            return self.approximate.get(name)
        return self.approximate

    def _bijector(self, info_name: str, fn: Any, coordinates: str) -> Any:
        return site_bijector(
            fn, coordinates=coordinates, approximate=self._approximate_for(info_name), name=info_name
        )

    def _inspect_site(self, name: str, fn: Any) -> tuple[str | None, bool | None, str | None]:
        bijector = self._bijector(name, fn, self.coordinates)
        return bijector.kind, bool(bijector.exact), bijector.numerical

    def _solves_roots(self) -> bool:
        """Whether a pass runs a root finder (mixture sites, gated elementwise sites)."""
        return any(site.numerical is not None for site in self._sites)

    # -- per-site maps (overridden by the gated layer) ----------------------------------------------

    def _site_to_noise(
        self, info: SiteInfo, fn: Any, value: Tensor, batched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        bijector = self._bijector(info.name, fn, self.coordinates)
        noise, ladj = bijector.to_noise(value)
        model_value = value
        if self.coordinates == "unconstrained":
            transform = _support_transform(fn)
            model_value = value if transform is None else transform(value)
        return noise, _sum_rows(ladj, value.shape, bijector.event_dim, batched), model_value

    def _site_to_value(
        self, info: SiteInfo, fn: Any, noise: Tensor, batched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        bijector = self._bijector(info.name, fn, self.coordinates)
        value, ladj = bijector.to_value(noise)
        model_value = value
        if self.coordinates == "unconstrained":
            transform = _support_transform(fn)
            model_value = value if transform is None else transform(value)
        return value, _sum_rows(ladj, noise.shape, bijector.event_dim, batched), model_value

    # -- passes -----------------------------------------------------------------------------------

    def _pass(
        self, direction: str, inputs: Tensor, context: Tensor | None, batched: bool
    ) -> tuple[Tensor, Tensor]:
        """One model run mapping ``inputs`` (``[B, D]`` if ``batched`` else ``[D]``) in ``direction``."""
        batch = inputs.shape[0] if batched else None
        given = {s.name: inputs[..., s.columns].reshape(self._site_shape(s, batch)) for s in self._sites}
        produced: dict[str, Tensor] = {}
        terms: list[Tensor] = []
        site_map = self._site_to_noise if direction == "forward" else self._site_to_value

        def visit(info: SiteInfo, fn: Any) -> Tensor:
            source = given[info.name]
            try:
                output, ladj, model_value = site_map(info, fn, source, batched)
                output = output.expand(source.shape)
            except RuntimeError as error:
                if not batched:
                    raise
                raise ValueError(
                    f"site {info.name!r}: its distribution (batch shape {tuple(fn.batch_shape)}) does not "
                    f"broadcast with the batched value of shape {tuple(source.shape)} ({error}); the model "
                    "must broadcast over a leading batch dim, or build the layer with vectorize=False"
                ) from error
            produced[info.name] = output
            terms.append(ladj)
            return model_value

        self._run_pass(visit, context)
        if batched:
            outputs = torch.cat([produced[s.name].reshape(batch, s.numel) for s in self._sites], dim=-1)
        else:
            outputs = torch.cat([produced[s.name].reshape(-1) for s in self._sites], dim=-1)
        logabsdet = torch.stack(terms).sum(0) if terms else inputs.new_zeros(batch or ())
        return outputs.to(inputs.dtype), logabsdet.to(inputs.dtype)

    def _rows(self, direction: str, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        results = [
            self._pass(direction, inputs[i], None if context is None else context[i], batched=False)
            for i in range(inputs.shape[0])
        ]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

    def _transform(self, direction: str, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_width(inputs)
        self._check_finite(inputs)
        if context is not None and (not isinstance(context, Tensor) or context.shape[0] != inputs.shape[0]):
            raise ValueError("context must be a tensor with one row per row of inputs")
        if not self.vectorize:
            return self._rows(direction, inputs, context)
        if self.compile is False or (self.compile == "auto" and self._solves_roots()):
            # A captured graph must unroll the root finders' fixed iteration count, which costs far more
            # than the Python overhead it saves: layers with root-solved sites run eagerly under "auto".
            return self._pass(direction, inputs, context, batched=True)
        return self._captured_pass(direction, inputs, context)

    # -- capture (compile) ------------------------------------------------------------------------

    def _functional_state(self) -> tuple[list[str], list[Tensor]]:
        named = list(self.named_parameters()) + list(self.named_buffers())
        return [name for name, _ in named], [tensor for _, tensor in named]

    @contextlib.contextmanager
    def _swapped_state(self, names: Sequence[str], tensors: Sequence[Tensor]) -> Iterator[None]:
        """Temporarily make ``tensors`` the layer's parameters and buffers (for capturing a pass as a
        function of them, so that the captured graph is differentiable with respect to them)."""
        saved = []
        try:
            for name, tensor in zip(names, tensors):
                path, _, attribute = name.rpartition(".")
                module = self.get_submodule(path) if path else self
                table = module._parameters if attribute in module._parameters else module._buffers
                saved.append((table, attribute, table[attribute]))
                table[attribute] = tensor
            yield
        finally:
            for table, attribute, original in reversed(saved):
                table[attribute] = original

    def _captured_pass(self, direction: str, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        key = (
            direction,
            tuple(inputs.shape),
            inputs.dtype,
            inputs.device,
            None if context is None else (tuple(context.shape), context.dtype),
            torch.is_grad_enabled(),
        )
        if key not in self._captured:
            self._captured[key] = self._capture(direction, inputs, context)
        captured = self._captured[key]
        if captured is None:
            return self._pass(direction, inputs, context, batched=True)
        _, tensors = self._functional_state()
        extra = [] if context is None else [context]
        return captured(inputs, *extra, *tensors)

    def _capture(self, direction: str, inputs: Tensor, context: Tensor | None) -> Callable[..., Any] | None:
        """Capture one batched pass as a graph of tensor operations, then check it against an eager run
        on other inputs of the same shape; ``None`` (stay eager) where capture fails or they differ."""
        if any(isinstance(m, PyroModule) for m in self.modules()) and not pyro.settings.get(
            "module_local_params"
        ):
            # A PyroModule in Pyro's default (global) parameter mode re-wraps its parameters through the
            # param store on every access, which would cut a captured graph off from the layer's tensors.
            return None
        names, tensors = self._functional_state()
        has_context = context is not None

        def function(inputs: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
            run_context = rest[0] if has_context else None
            with self._swapped_state(names, rest[1:] if has_context else rest):
                return self._pass(direction, inputs, run_context, batched=True)

        example = (inputs.detach(), *([context] if has_context else []), *(t.detach() for t in tensors))
        try:
            with warnings.catch_warnings(), pyro.validation_enabled(False), fixed_root_iterations():
                # Tracer warnings (Python values read off tensors) are what the probe below checks for.
                warnings.simplefilter("ignore")
                # make_fx records the pass as aten operations with the shapes of this key baked in (the
                # captured graph is keyed on the input shape); tracing the Python pass directly would
                # instead record every shape computation, which outnumbers the arithmetic ~3 to 1.
                graph = make_fx(function)(*example)
                graph.graph.eliminate_dead_code()  # e.g. the gates a site's map does not use
                graph.recompile()
                if self.compile == "inductor":
                    captured = torch.compile(graph, fullgraph=True, dynamic=False)
                else:
                    captured = torch.jit.trace(graph, example, check_trace=False)
            with torch.no_grad():
                probe = self._probe_inputs(direction, inputs, context)
                expected = self._pass(direction, probe, context, batched=True)
                actual = captured(probe, *example[1:])
            tolerance = 1e-4 if inputs.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
            agree = all(
                torch.allclose(a, e, rtol=tolerance, atol=tolerance) for a, e in zip(actual, expected)
            )
        except Exception as error:  # any failure to capture means: run eagerly
            warnings.warn(
                f"compile={self.compile!r}: capturing the {direction} pass failed ({type(error).__name__}: "
                f"{error}); this layer runs it eagerly for inputs of shape {tuple(inputs.shape)}",
                UserWarning,
                stacklevel=4,
            )
            return None
        if not agree:
            warnings.warn(
                f"compile={self.compile!r}: the captured {direction} pass differs from the eager pass on "
                "fresh inputs (value-dependent control flow in the model?); this layer runs it eagerly "
                f"for inputs of shape {tuple(inputs.shape)}",
                UserWarning,
                stacklevel=4,
            )
            return None
        return captured

    def _probe_inputs(self, direction: str, inputs: Tensor, context: Tensor | None) -> Tensor:
        """Valid inputs of the same shape as ``inputs`` but other values: shifted noise, or the data
        that shifted noise maps to (so that probe data stay in the support)."""
        noise = inputs if direction == "inverse" else self._pass("forward", inputs, context, batched=True)[0]
        shifted = 0.9 * noise.flip(0) + 0.1
        if direction == "inverse":
            return shifted
        return self._pass("inverse", shifted, context, batched=True)[0]

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data -> noise: ``(noise [B, D], log|det d noise / d inputs| [B])``."""
        return self._transform("forward", inputs, context)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise -> data (the model's generative direction):
        ``(data [B, D], log|det d data / d noise| [B])``."""
        return self._transform("inverse", inputs, context)

    # -- construction-time check ----------------------------------------------------------------------

    def _reference_tensor(self) -> Tensor:
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor
        for tensor in self.buffers():
            if tensor.is_floating_point():
                return tensor
        return torch.empty(0)

    def _check_broadcasting(self) -> None:
        reference = self._reference_tensor()
        generator = torch.Generator().manual_seed(0)
        noise = 0.5 * torch.randn(2, self.features, generator=generator, dtype=reference.dtype)
        noise = noise.to(reference.device)
        advice = (
            "the model does not broadcast over a leading batch dim (the batch dim sits left of "
            f"max_plate_nesting={self.max_plate_nesting} plate dims; write the model as for Pyro's "
            "vectorize_particles, or pass max_plate_nesting), or build the layer with vectorize=False "
            "(a slower row-by-row loop)"
        )
        with torch.no_grad():
            try:
                data, inverse_ladj = self._pass("inverse", noise, None, batched=True)
                back, forward_ladj = self._pass("forward", data, None, batched=True)
            except (RuntimeError, ValueError, IndexError) as error:
                raise ValueError(f"{advice}: a batch of two failed with {error}") from error
            for i in range(2):
                row_data, row_inverse = self._pass("inverse", noise[i], None, batched=False)
                row_back, row_forward = self._pass("forward", data[i], None, batched=False)
                pairs = [
                    (data[i], row_data),
                    (inverse_ladj[i], row_inverse),
                    (back[i], row_back),
                    (forward_ladj[i], row_forward),
                ]
                for batched_result, row_result in pairs:
                    if not torch.allclose(batched_result, row_result, rtol=1e-5, atol=1e-6):
                        raise ValueError(f"{advice}: a batch of two differs from two single runs")

    def extra_repr(self) -> str:
        return f"features={self.features}, sites={len(self._sites)}, coordinates={self.coordinates!r}"


class GatedStructuredTransform(StructuredTransform):
    r"""A :class:`StructuredTransform` whose site maps are mixed with the identity through learned gates.

    Each gated site maps its noise through

    .. math::

        u_j = \lambda_j \tilde f_j(\epsilon_j; \pi_j) + (1 - \lambda_j)\,\epsilon_j, \qquad
        x_j = T_j(u_j), \qquad \lambda_j = \operatorname{sigmoid}(\tau w_j),

    where :math:`\tilde f_j = T_j^{-1} \circ f_j` is the site map in unconstrained coordinates and
    :math:`T_j` = ``biject_to(support_j)``. :math:`\lambda \to 1` recovers the ungated layer,
    :math:`\lambda \to 0` gives :math:`x_j = T_j(\epsilon_j)` (the identity on real sites), and outputs
    never leave the support. The map is invertible because :math:`\tilde f_j` is elementwise increasing
    (:math:`\partial u/\partial\epsilon = \lambda \tilde f' + 1 - \lambda > 0`) or affine with a
    positive-diagonal triangular part. Log-dets compute :math:`\log(\lambda \tilde f' + 1 - \lambda)` as
    ``logaddexp(logsigmoid(tau w) + log f', logsigmoid(-tau w))``.

    - *affine_diag* (Normal, LogNormal, ...):
      :math:`\epsilon = (u - \lambda\mu)/(\lambda\sigma + 1 - \lambda)`.
    - *affine_tril* (MultivariateNormal): :math:`A = \mathrm{diag}(\lambda) L + \mathrm{diag}(1-\lambda)`,
      :math:`\epsilon = A^{-1}(u - \lambda\odot\mu)` by a triangular solve.
    - *elementwise with an explicit* :math:`\tilde f` (Uniform, icdf maps): ``forward`` solves
      :math:`\lambda(\tilde f(\epsilon) - u) + (1-\lambda)(\epsilon - u) = 0`, bracketed by
      :math:`\tilde f^{-1}(u)` and :math:`u`.
    - *elementwise with an explicit* :math:`\tilde f^{-1}` (mixtures): ``inverse`` solves once for
      :math:`y = \tilde f(\epsilon)`; ``forward`` solves :math:`\lambda y + (1-\lambda)\tilde f^{-1}(y) = u`
      in :math:`y`. Root solves are never nested; gradients come from one implicit-function step.

    The gate parameters are ``G.gate_logits[key]`` (``w``; one scalar per site with ``gate="site"``,
    one per element with ``gate="element"``), initialised at ``logit(gate_init) / gate_temperature``.
    ``G.gate_values()`` returns the :math:`\lambda`'s by site name.

    :param model: see :class:`StructuredTransform`.
    :param str gate: ``"site"`` (one gate per site, as in the original) or ``"element"``.
    :param float gate_init: initial :math:`\lambda`, in (0, 1).
    :param float gate_temperature: :math:`\tau > 0`.
    :param ungated_sites: names of sites to leave ungated; a site whose unconstrained map is neither
        elementwise-monotone nor triangular-affine must be listed here.
    :param options: every other option of :class:`StructuredTransform` (``coordinates`` is the
        coordinate system of the layer's *data*; the gating itself always happens in unconstrained
        coordinates).

    Example::

        layer = GatedStructuredTransform(random_walk, gate="element")
        flow = Flow(CompositeTransform([layer, MaskedAffineAutoregressiveTransform(90, 512)]),
                    StandardNormal([90]))

    References: arXiv:2110.06021 (gated embedded-model flows, GEMF).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *args: Any,
        gate: Literal["site", "element"] = "site",
        gate_init: float = 0.999,
        gate_temperature: float = 100.0,
        ungated_sites: Sequence[str] = (),
        coordinates: Coordinates = "value",
        lift_params: bool = True,
        context_to_kwargs: Callable[[Tensor], Mapping[str, Any]] | None = None,
        max_plate_nesting: int | None = None,
        approximate: Approximate = None,
        ignore_factors: bool = False,
        vectorize: bool = True,
        compile: bool | Literal["auto", "inductor"] = "auto",
        **kwargs: Any,
    ) -> None:
        super(StructuredTransform, self).__init__()
        if gate not in ("site", "element"):
            raise ValueError(f"gate must be 'site' or 'element', got {gate!r}")
        if not 0.0 < float(gate_init) < 1.0:
            raise ValueError(f"gate_init must lie in (0, 1), got {gate_init!r}")
        if not float(gate_temperature) > 0.0:
            raise ValueError(f"gate_temperature must be positive, got {gate_temperature!r}")
        if isinstance(ungated_sites, str):
            ungated_sites = (ungated_sites,)
        self.gate = gate
        self.gate_init = float(gate_init)
        self.gate_temperature = float(gate_temperature)
        self.ungated_sites = frozenset(ungated_sites)
        self._initialise(
            model,
            args,
            kwargs,
            coordinates=coordinates,
            lift_params=lift_params,
            context_to_kwargs=context_to_kwargs,
            max_plate_nesting=max_plate_nesting,
            approximate=approximate,
            ignore_factors=ignore_factors,
            vectorize=vectorize,
            compile=compile,
        )

    def _inspect_site(self, name: str, fn: Any) -> tuple[str | None, bool | None, str | None]:
        bijector = self._bijector(name, fn, "unconstrained")
        return bijector.leaf.kind, bool(bijector.exact), bijector.numerical

    def _solves_roots(self) -> bool:
        return super()._solves_roots() or any(
            site.kind == "elementwise" and site.name not in self.ungated_sites for site in self._sites
        )

    def _setup_gates(self) -> None:
        unknown = self.ungated_sites - set(self._site_index)
        if unknown:
            raise ValueError(
                f"ungated_sites names unknown sites {sorted(unknown)}; sites: {list(self.site_names)}"
            )
        self.gate_logits = nn.ParameterDict()
        self._gate_keys: dict[str, str] = {}
        initial = math.log(self.gate_init / (1.0 - self.gate_init)) / self.gate_temperature
        reference = self._reference_tensor()
        for info in self._sites:
            if info.name in self.ungated_sites:
                continue
            if info.kind not in _GATEABLE_KINDS:
                raise TypeError(
                    f"site {info.name!r} ({info.distribution}) has a site map of kind {info.kind!r} in "
                    f"unconstrained coordinates; gates need one of {_GATEABLE_KINDS}; list the site in "
                    "ungated_sites to leave it ungated"
                )
            shape = () if self.gate == "site" else tuple(info.shape)
            key = _escape(info.name)
            self.gate_logits[key] = nn.Parameter(
                torch.full(shape, initial, dtype=reference.dtype, device=reference.device)
            )
            self._gate_keys[info.name] = key

    def gate_values(self) -> dict[str, Tensor]:
        """:math:`\\lambda = \\operatorname{sigmoid}(\\tau w)` of every gated site, by site name."""
        return {
            name: torch.sigmoid(self.gate_temperature * self.gate_logits[key])
            for name, key in self._gate_keys.items()
        }

    def _log_gates(self, name: str) -> _Gates:
        cache = self.__dict__.get("_gate_cache")
        if cache is not None:
            return cache[name]
        return _Gates.from_logits(self.gate_temperature * self.gate_logits[self._gate_keys[name]])

    def _all_log_gates(self) -> dict[str, _Gates]:
        """The gates of every gated site, computed in one vectorised step (a captured graph then has a few
        gate operations per pass instead of several per site)."""
        names = list(self._gate_keys)
        if not names:
            return {}
        logits = [self.gate_logits[self._gate_keys[name]] for name in names]
        if all(logit.dim() == 0 for logit in logits):  # one gate per site: unbind gives them as they are
            gates = _Gates.from_logits(self.gate_temperature * torch.stack(logits))
            return {name: _Gates(*parts) for name, parts in zip(names, zip(*(g.unbind() for g in gates)))}
        gates = _Gates.from_logits(self.gate_temperature * torch.cat([logit.reshape(-1) for logit in logits]))
        sizes = [logit.numel() for logit in logits]
        pieces = zip(*(part.split(sizes) for part in gates))
        return {
            name: _Gates(*(part.reshape(logit.shape) for part in parts))
            for name, logit, parts in zip(names, logits, pieces)
        }

    def _pass(
        self, direction: str, inputs: Tensor, context: Tensor | None, batched: bool
    ) -> tuple[Tensor, Tensor]:
        self.__dict__["_gate_cache"] = self._all_log_gates()
        try:
            return super()._pass(direction, inputs, context, batched)
        finally:
            self.__dict__["_gate_cache"] = None

    def _site_to_noise(
        self, info: SiteInfo, fn: Any, value: Tensor, batched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        if info.name in self.ungated_sites:
            return super()._site_to_noise(info, fn, value, batched)
        transform = _support_transform(fn)
        ladj_rows = 0.0
        if self.coordinates == "value":
            model_value = value
            if transform is None:
                unconstrained = value
            else:
                unconstrained = transform.inv(value)
                ladj = -transform.log_abs_det_jacobian(unconstrained, value)
                ladj_rows = _sum_rows(ladj, value.shape, transform.codomain.event_dim, batched)
        else:
            unconstrained = value
            model_value = value if transform is None else transform(value)
        leaf = self._bijector(info.name, fn, "unconstrained").leaf
        noise, ladj, summed = _gated_to_noise(leaf, unconstrained, self._log_gates(info.name))
        return noise, ladj_rows + _sum_rows(ladj, value.shape, summed, batched), model_value

    def _site_to_value(
        self, info: SiteInfo, fn: Any, noise: Tensor, batched: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        if info.name in self.ungated_sites:
            return super()._site_to_value(info, fn, noise, batched)
        leaf = self._bijector(info.name, fn, "unconstrained").leaf
        unconstrained, ladj, summed = _gated_to_value(leaf, noise, self._log_gates(info.name))
        ladj_rows = _sum_rows(ladj, noise.shape, summed, batched)
        transform = _support_transform(fn)
        model_value = unconstrained if transform is None else transform(unconstrained)
        if self.coordinates == "unconstrained":
            return unconstrained, ladj_rows, model_value
        if transform is not None:
            ladj = transform.log_abs_det_jacobian(unconstrained, model_value)
            ladj_rows = ladj_rows + _sum_rows(ladj, noise.shape, transform.codomain.event_dim, batched)
        return model_value, ladj_rows, model_value


# ----------------------------------------------------------------------------------------- gated maps


class _Gates(NamedTuple):
    r"""A site's gate :math:`\lambda = \mathrm{sigmoid}(\tau w)` as ``(log lambda, log(1 - lambda), lambda,
    1 - lambda)``: log forms for the log-determinants, linear ones for the maps."""

    log: Tensor
    log_complement: Tensor
    value: Tensor
    complement: Tensor

    @classmethod
    def from_logits(cls, scaled: Tensor) -> _Gates:
        # log(1 - lambda) = logsigmoid(-tau w) stays accurate when lambda rounds to 1
        log_gate, log_complement = _log_sigmoid(scaled), _log_sigmoid(-scaled)
        return cls(log_gate, log_complement, log_gate.exp(), log_complement.exp())


def _log_sigmoid(z: Tensor) -> Tensor:
    """``log(sigmoid(z))`` to rounding for every z (``F.logsigmoid`` is ~1000x slower on tiny CPU tensors)."""
    return torch.clamp(z, max=0.0) - torch.log1p(torch.exp(-z.abs()))


def _event_gates(log_gate: Tensor, size: int) -> Tensor:
    """Broadcast a per-site (``[]``) or per-element (``[..., size]``) gate to a trailing event dim."""
    return log_gate.expand(size) if log_gate.dim() == 0 else log_gate


def _gated_to_noise(leaf: Any, u: Tensor, gates: _Gates) -> tuple[Tensor, Tensor, int]:
    """Unconstrained value ``u`` -> noise of the gated leaf map; returns ``(noise, ladj, summed dims)``."""
    log_gate, log_one_minus_gate, gate, one_minus_gate = gates
    kind = leaf.kind
    if kind == "affine_diag":
        # a sum of two positive terms: no cancellation, so the linear scale is as accurate as logaddexp
        slope = gate * leaf.scale + one_minus_gate
        return (u - gate * leaf.loc) / slope, -slope.log(), 0
    if kind == "affine_tril":
        scale_tril = leaf.scale_tril
        size = scale_tril.shape[-1]
        log_gate_d = _event_gates(log_gate, size)
        gate_d, one_minus_gate_d = log_gate_d.exp(), _event_gates(log_one_minus_gate, size).exp()
        matrix = gate_d.unsqueeze(-1) * scale_tril + torch.diag_embed(one_minus_gate_d)
        rhs = (u - gate_d * leaf.loc).unsqueeze(-1)
        noise = torch.linalg.solve_triangular(matrix, rhs, upper=False).squeeze(-1)
        log_diagonal = torch.logaddexp(
            log_gate_d + torch.diagonal(scale_tril, dim1=-2, dim2=-1).log(),
            _event_gates(log_one_minus_gate, size),
        )
        return noise, -log_diagonal.sum(-1), 1
    if kind != "elementwise":
        raise TypeError(f"no gated map for site maps of kind {kind!r}")
    gate_d, one_minus_gate_d, u_d = gate.detach(), one_minus_gate.detach(), u.detach()
    if getattr(leaf, "numerical", None) is None:
        # Explicit f~: solve lambda (f~(eps) - u) + (1 - lambda)(eps - u) = 0; the root lies between
        # f~^{-1}(u) (where the first term vanishes) and u (where the second does).
        with torch.no_grad():
            anchor, _ = leaf.to_noise(u_d)
            lower, upper = torch.minimum(anchor, u_d), torch.maximum(anchor, u_d)

            def residual_fn(eps: Tensor) -> Tensor:
                return gate_d * (leaf.to_value(eps)[0] - u_d) + one_minus_gate_d * (eps - u_d)

            root = monotone_root(residual_fn, lower, upper)
        value, log_derivative = leaf.to_value(root)
        residual = gate * (value - u) + one_minus_gate * (root - u)
        slope = torch.exp(torch.logaddexp(log_gate + log_derivative, log_one_minus_gate))
        noise = implicit_step(root, residual, slope)
        # log f~' at the implicitly differentiated noise, so the log-det's gradient includes d eps/d theta.
        _, log_derivative = leaf.to_value(noise)
        return noise, -torch.logaddexp(log_gate + log_derivative, log_one_minus_gate), 0
    # Explicit f~^{-1}: solve lambda y + (1 - lambda) f~^{-1}(y) = u in y = f~(eps). eps* lies between
    # a = f~^{-1}(u) and u, so y* lies between f~(min) and f~(max), bracketed by the leaf's value_bracket.
    with torch.no_grad():
        anchor, _ = leaf.to_noise(u_d)
        lower_noise, upper_noise = torch.minimum(anchor, u_d), torch.maximum(anchor, u_d)
        lower, _ = leaf.value_bracket(lower_noise)
        _, upper = leaf.value_bracket(upper_noise)

        def residual_fn(y: Tensor) -> Tensor:
            return gate_d * y + one_minus_gate_d * leaf.to_noise(y)[0] - u_d

        root = monotone_root(residual_fn, lower, upper)
    noise_at_root, log_inverse_derivative = leaf.to_noise(root)
    residual = gate * root + one_minus_gate * noise_at_root - u
    slope = gate + one_minus_gate * log_inverse_derivative.exp()
    y = implicit_step(root, residual, slope)
    noise, log_inverse_derivative = leaf.to_noise(y)
    # du/deps = lambda f~'(eps) + 1 - lambda with f~'(eps) = 1 / (f~^{-1})'(y).
    return noise, -torch.logaddexp(log_gate - log_inverse_derivative, log_one_minus_gate), 0


def _gated_to_value(leaf: Any, noise: Tensor, gates: _Gates) -> tuple[Tensor, Tensor, int]:
    """Noise -> unconstrained value of the gated leaf map; returns ``(u, ladj, summed dims)``."""
    log_gate, log_one_minus_gate, gate, one_minus_gate = gates
    kind = leaf.kind
    if kind == "affine_diag":
        slope = gate * leaf.scale + one_minus_gate
        return slope * noise + gate * leaf.loc, slope.log(), 0
    if kind == "affine_tril":
        scale_tril = leaf.scale_tril
        size = scale_tril.shape[-1]
        log_gate_d = _event_gates(log_gate, size)
        gate_d, one_minus_gate_d = log_gate_d.exp(), _event_gates(log_one_minus_gate, size).exp()
        matrix = gate_d.unsqueeze(-1) * scale_tril + torch.diag_embed(one_minus_gate_d)
        u = (matrix @ noise.unsqueeze(-1)).squeeze(-1) + gate_d * leaf.loc
        log_diagonal = torch.logaddexp(
            log_gate_d + torch.diagonal(scale_tril, dim1=-2, dim2=-1).log(),
            _event_gates(log_one_minus_gate, size),
        )
        return u, log_diagonal.sum(-1), 1
    if kind != "elementwise":
        raise TypeError(f"no gated map for site maps of kind {kind!r}")
    value, log_derivative = leaf.to_value(noise)
    u = gate * value + one_minus_gate * noise
    return u, torch.logaddexp(log_gate + log_derivative, log_one_minus_gate), 0


# ----------------------------------------------------------------------------------------- torch adapter


class _NflowsAsTorchTransform(torch.distributions.Transform):
    """An nflows transform seen as a ``torch.distributions.Transform`` in its generative direction."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(self, transform: Transform, context: Tensor | None = None, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)
        self.transform = transform
        self.context = context
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NflowsAsTorchTransform) and other.transform is self.transform

    def _flat(self, tensor: Tensor) -> tuple[Tensor, torch.Size]:
        return tensor.reshape(-1, tensor.shape[-1]), tensor.shape[:-1]

    def _context(self, rows: int) -> Tensor | None:
        if self.context is None:
            return None
        if self.context.shape[0] == rows:
            return self.context
        return (
            self.context.expand(rows, *self.context.shape[1:]) if self.context.shape[0] == 1 else self.context
        )

    def _call(self, noise: Tensor) -> Tensor:
        flat, batch = self._flat(noise)
        value, ladj = self.transform.inverse(flat, context=self._context(flat.shape[0]))
        value = value.reshape(*batch, -1)
        self._last = (noise, value, ladj.reshape(batch))
        return value

    def _inverse(self, value: Tensor) -> Tensor:
        flat, batch = self._flat(value)
        noise, ladj = self.transform(flat, context=self._context(flat.shape[0]))
        noise = noise.reshape(*batch, -1)
        self._last = (noise, value, -ladj.reshape(batch))
        return noise

    def log_abs_det_jacobian(self, noise: Tensor, value: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is noise and self._last[1] is value:
            return self._last[2]
        flat, batch = self._flat(value)
        _, ladj = self.transform(flat, context=self._context(flat.shape[0]))
        return -ladj.reshape(batch)


def to_torch_transform(
    transform: Transform, context: Tensor | None = None, cache_size: int = 1
) -> torch.distributions.Transform:
    """Wrap an nflows transform (e.g. a :class:`StructuredTransform` or a stack containing one) as a
    ``torch.distributions.Transform`` that maps noise to data (nflows' ``inverse``), for use in
    ``TransformedDistribution`` or a Pyro guide.

    ``log_abs_det_jacobian(noise, data)`` of a pair the transform just produced reuses that pass's
    log-det (no second pass); for any other pair it runs nflows' ``forward`` on the data.

    :param transform: an nflows ``Transform`` on ``[B, D]`` tensors.
    :param context: an optional context passed to every call (one row, or one per flattened row).
    :param int cache_size: torch's transform cache (1 keeps the last ``(noise, data)`` pair).

    Example::

        base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
        prior = dist.TransformedDistribution(base, [to_torch_transform(layer)])
        x = prior.rsample([10]); prior.log_prob(x)   # = the model's log joint

    References: arXiv:2110.06021.
    """
    if not isinstance(transform, nn.Module) or not hasattr(transform, "inverse"):
        raise TypeError("transform must be an nflows Transform with forward and inverse")
    return _NflowsAsTorchTransform(transform, context=context, cache_size=cache_size)

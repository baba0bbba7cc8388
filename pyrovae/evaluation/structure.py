"""One structural check of a Pyro model and guide, shared by every entry point.

Every estimator here -- training objectives, per-datapoint ELBOs, importance sampling, AIS,
gaps, paired comparisons -- reduces each site's log density to one number per (draw, data
point). That is exact only for a model and guide whose sites fit the reduction; a pair
outside it would give a number that is not the bound it claims to be. :func:`check_structure`
traces the pair once on the first data points and refuses, before anything is trained or
evaluated, with the site and what to change:

* the data plate must exist (at any ``dim``) and hold every observed site and every latent
  site (a latent site outside it is *global*: it couples the data points, so there is no
  per-datapoint weight, and minibatch training would count its KL once per minibatch);
* latent sites must be continuous (a discrete site has no reparameterized guide);
* model and guide must agree at each latent site: the same shape (batch and event; Pyro's
  ``Trace_ELBO`` rule: equal after left-padding with ones) and the same mask, so that log q
  and log p cover the same entries (a padded latent in log q but not in log p lifts the
  "bound" above log p(x));
* scales: a tensor ``poutine.scale`` (a weight per data point) is recorded, and
  :meth:`ModelStructure.require_common_scale` refuses it where a bound takes a log-sum-exp
  over draws.

It also finds whether the program *broadcasts over a leading particle dimension* (the
vectorized fast path: K draws in one pass under an extra plate left of the model's plates):
it runs K = 2 vectorized draws and each draw alone, and compares the log weights. Code
written for one draw (``torch.cat([z, y], dim=1)``, ``softmax(dim=1)``, ``BatchNorm1d``,
``.expand([K])``) either fails vectorized or gives different numbers; it is then run one
draw per pass (:attr:`ModelStructure.vectorized` is ``False``), with the same numbers and K
passes' cost.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine

from pyrovae.evaluation.traces import (
    PARTICLE_PLATE,
    _batched_length,
    _sample_sites,
    _slice_arguments,
    guess_max_plate_nesting,
    reduce_terms,
    run_traces,
    trace_pair,
)

PROBE_ROWS = 2
"""Data points in the structural probe (two, so that a size-1 axis cannot hide a plate)."""


@dataclass(frozen=True)
class SiteStructure:
    """What the estimators need to know about one model site (no particle dimension).

    ``plates`` maps each plate's name to ``(dim, size)``; ``inner_plates`` are those other
    than the data plate; ``shape`` is the batch shape followed by the event shape."""

    name: str
    observed: bool
    batch_shape: torch.Size
    event_shape: torch.Size
    plates: dict
    support: object
    mask: object
    scale_shape: tuple | None
    data_dim: int | None
    subsampled: dict = field(default_factory=dict)
    scale: object = 1.0
    family: str = ""
    enumerable: bool = False
    enumerate: str | None = None

    @property
    def discrete(self) -> bool:
        return not self.observed and self.support is not None and self.support.is_discrete

    @property
    def scaled(self) -> bool:
        """Whether the site's log density is weighted (``poutine.scale``, plate subsampling)."""
        scale = self.scale
        return not (isinstance(scale, (int, float)) and scale == 1.0)

    @property
    def local(self) -> bool:
        return self.data_dim is not None

    @property
    def inner_plates(self) -> dict:
        return {n: p for n, p in self.plates.items() if p[0] != self.data_dim}


@dataclass
class ModelStructure:
    """The checked structure of a model and guide; see the module docstring.

    Attributes
    ----------
    data_plate : str
        Name of the plate over data points; ``data_dim`` its (negative) dim.
    max_plate_nesting : int
        Plate depth of model and guide, without the particle plate.
    vectorized : bool
        Whether the pair broadcasts over a leading particle dimension (else one draw per pass).
    sites : dict
        :class:`SiteStructure` of every model sample site.
    why_sequential : str or None
        Why the draws run one per pass, when they do.
    """

    data_plate: str
    data_dim: int
    max_plate_nesting: int
    vectorized: bool
    sites: dict = field(default_factory=dict)
    why_sequential: str | None = None

    @property
    def latent_sites(self) -> list[SiteStructure]:
        return [s for s in self.sites.values() if not s.observed]

    guided_discrete: list = field(default_factory=list)
    """Discrete latent sites the guide samples (score-function territory: evaluation and
    Pyro's Trace_ELBO take them; reparameterized objectives and AIS refuse them)."""

    @property
    def discrete_sites(self) -> list[str]:
        """Discrete latent sites summed out by enumeration (those the guide does not sample)."""
        return [
            s.name for s in self.latent_sites if s.discrete and s.name not in self.guided_discrete
        ]

    @property
    def per_point_scales(self) -> dict[str, tuple]:
        """Sites whose scale is a tensor (e.g. a weight per data point), with its shape."""
        return {s.name: s.scale_shape for s in self.sites.values() if s.scale_shape is not None}

    def warn_if_sequential(self, num_particles: int, stacklevel: int = 3) -> None:
        """Say once per call that the ``num_particles`` draws run one per pass, when they do."""
        if self.vectorized or num_particles < 2:
            return
        warnings.warn(
            "the model and guide do not broadcast over a leading particle dimension "
            f"({self.why_sequential}): drawing the {num_particles} particles one per pass "
            f"({num_particles} passes instead of one; write the program to broadcast over "
            "leading dimensions for the vectorized path)",
            UserWarning,
            stacklevel=stacklevel,
        )

    def require_common_scale(self, what: str) -> None:
        """Refuse tensor scales for ``what`` (a bound with a log-sum-exp over draws)."""
        scales = self.per_point_scales
        if scales:
            described = ", ".join(f"{n!r}: tensor of shape {s}" for n, s in scales.items())
            raise ValueError(
                f"site scales {described} (poutine.scale with a weight per data point), but "
                f"{what} takes a log-sum-exp over draws within each data point, which needs "
                "one common scale per data point. Use an ELBO objective (trace_elbo, "
                "trace_meanfield_elbo, stl), which weights each site's terms, or give every "
                "data point the same weight"
            )


def check_structure(
    model: Callable,
    guide: Callable,
    *args,
    data_plate: str = "data",
    max_plate_nesting: int | None = None,
    data_kwargs: Sequence[str] = (),
    probe_rows: int | None = PROBE_ROWS,
    **kwargs,
) -> ModelStructure:
    """Check that ``model`` and ``guide`` fit the per-datapoint estimators (module docstring).

    Runs both on the first ``probe_rows`` data points (the positional tensors and the
    keywords named in ``data_kwargs``, sliced along their first axis; all arguments when
    none is a tensor, or with ``probe_rows=None``) a few times, on private copies of every
    random stream; the draws that follow are unchanged.

    Raises
    ------
    ValueError
        Naming the site, what is wrong and what to change.
    """
    from pyrovae.models.modes import evaluation_mode

    _refuse_whole_model_autoguide(guide)
    if probe_rows is not None:
        args, kwargs = _probe_rows(args, kwargs, data_kwargs, probe_rows)
    # In eval mode: dropout draws differ between the vectorized and one-draw runs, and
    # BatchNorm must not update its running statistics on a probe.
    quiet = evaluation_mode(model, guide, warn=False)
    with (
        quiet,
        private_randomness(args, kwargs),
        torch.no_grad(),
        poutine.block(),
        self_subsampling_explained(data_plate),
    ):
        if max_plate_nesting is None:
            max_plate_nesting = guess_max_plate_nesting(model, guide, *args, **kwargs)
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
        sites = {s.name: s for s in check_model_sites(model_trace, data_plate)}
        data_dim = _data_plate_dim(model_trace, data_plate)
        _check_guide(sites, guide_trace, data_plate, data_dim)
        structure = ModelStructure(data_plate, data_dim, max_plate_nesting, True, sites)
        guided = _sample_sites(guide_trace)
        structure.guided_discrete = [
            s.name for s in structure.latent_sites if s.discrete and s.name in guided
        ]
        _check_enumeration(model, guide, args, kwargs, structure)
        structure.why_sequential = _particle_problem(model, guide, args, kwargs, structure)
    structure.vectorized = structure.why_sequential is None
    return structure


@contextmanager
def self_subsampling_explained(data_plate: str):
    """Turn Pyro's error for a plate that draws more rows than it is given (``pyro.plate(
    "data", len(x), subsample_size=B)`` run on fewer than B rows) into one that says why:
    pyrovae runs models on a few rows (this check), on its own minibatches and on single
    points, so a model that subsamples the rows it receives cannot give per-datapoint
    bounds."""
    try:
        yield
    except ValueError as error:
        found = re.search(
            r"subsample_size does not match len\(subsample\), (\d+) vs (\d+)", str(error)
        )
        if found is None:
            raise
        wanted, given = found.groups()
        raise ValueError(
            f"a plate of the model draws a random subsample of {wanted} rows "
            f"(pyro.plate(..., subsample_size={wanted})) but was given {given}: pyrovae runs "
            "the model on a few rows to check it, on the minibatches it draws itself and on "
            "single points to evaluate them, so the model must use every row it is given. "
            f"Write the data plate {data_plate!r} without subsample_size (pyro.plate("
            f"{data_plate!r}, len(x))) and pass batch_size={wanted} to fit; to scale global "
            f"sites by N / B, write pyro.plate({data_plate!r}, N, subsample=torch.arange("
            "len(x))), or fit with a HybridGuide, which weights them itself. Pyro's own SVI "
            "runs such a model unchanged"
        ) from error


def _refuse_whole_model_autoguide(guide) -> None:
    """Pyro's autoguides are not amortized: their parameters are sized on the first call (one
    set per data point seen then), which per-datapoint estimators on other batches would
    break or, worse, misalign."""
    from pyro.infer.autoguide import AutoGuide

    program = getattr(guide, "function", guide)  # a PyroFunction's program
    program = getattr(program, "__self__", program)
    if isinstance(program, AutoGuide):
        raise ValueError(
            f"the guide is Pyro's {type(program).__name__}, which keeps one set of parameters "
            "per data point of the data it first saw (it is not amortized), so it cannot give "
            "per-datapoint bounds on other data or minibatches. Use AmortizedGuide for the "
            "local latent sites, and pyrovae.models.hybrid.HybridGuide to put an autoguide "
            "for the global sites beside it"
        )


def _probe_rows(args: tuple, kwargs: dict, data_kwargs, count: int) -> tuple[tuple, dict]:
    try:
        length = _batched_length(args, kwargs, data_kwargs)
    except ValueError:  # no per-datapoint tensor (e.g. data captured by the program)
        return args, kwargs
    rows = slice(0, min(count, length))
    return _slice_arguments(args, kwargs, length, rows, data_kwargs)


class private_randomness:
    """Run a block on private copies of torch's and Pyro's random streams."""

    def __init__(self, args: tuple, kwargs: dict):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        self.state = pyro.util.get_rng_state()

    def __exit__(self, *exc):
        pyro.util.set_rng_state(self.state)
        return self.fork.__exit__(*exc)


def check_model_sites(model_trace, data_plate: str) -> list[SiteStructure]:
    """The :class:`SiteStructure` of every sample site of a model trace, in order, after
    checking the model's own structure (data plate, global, discrete and observed sites)."""
    data_dim = _data_plate_dim(model_trace, data_plate)
    sites = _site_structures(model_trace, data_plate, data_dim)
    _check_sites(sites, data_plate)
    return list(sites.values())


def _data_plate_dim(trace, data_plate: str) -> int:
    dims = {}
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            dims.setdefault(frame.name, frame.dim)
    if data_plate not in dims:
        found = ", ".join(sorted(p for p in dims if p != PARTICLE_PLATE)) or "none"
        raise ValueError(
            f"the model has no plate named {data_plate!r} (plates found: {found}); wrap the "
            "data points in `with pyro.plate(data_plate, N):` or pass data_plate="
        )
    if dims[data_plate] is None:
        raise ValueError(
            f"the data plate {data_plate!r} must be vectorized (pyro.plate, not range)"
        )
    return dims[data_plate]


def _site_structures(trace, data_plate: str, data_dim: int) -> dict[str, SiteStructure]:
    structures = {}
    for name, site in _sample_sites(trace).items():
        fn = site["fn"]
        plates = {f.name: (f.dim, f.size) for f in site["cond_indep_stack"] if f.vectorized}
        scale = site["scale"]
        structures[name] = SiteStructure(
            name=name,
            observed=site["is_observed"],
            batch_shape=fn.batch_shape,
            event_shape=fn.event_shape,
            plates=plates,
            support=getattr(fn, "support", None),
            mask=site["mask"],
            scale_shape=(
                tuple(scale.shape)
                if isinstance(scale, torch.Tensor) and scale.numel() > 1
                else None
            ),
            data_dim=data_dim if data_plate in plates else None,
            subsampled={
                f.name: f.full_size is not None and f.full_size != f.size
                for f in site["cond_indep_stack"]
            },
            scale=site["scale"],
            family=_family(fn),
            enumerable=bool(getattr(fn, "has_enumerate_support", False)),
            enumerate=site["infer"].get("enumerate"),
        )
    return structures


def _family(fn) -> str:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return type(fn).__name__


def _check_sites(sites: dict[str, SiteStructure], data_plate: str) -> None:
    for site in sites.values():
        if site.observed and not site.local:
            raise ValueError(
                f"observed site {site.name!r} is outside the data plate {data_plate!r}: its "
                "log density would not belong to any one data point. Observe the data inside "
                f"`with pyro.plate({data_plate!r}, N):`"
            )
        if site.observed:
            continue
        if not site.local:
            raise ValueError(
                f"latent site {site.name!r} is global (outside the data plate {data_plate!r}): "
                "it couples the data points, so it has no per-datapoint weight, and minibatch "
                "training would count its KL once per minibatch. Guide it with "
                "pyrovae.models.hybrid.HybridGuide (a global guide such as AutoNormal beside "
                "an amortized local guide), make it a parameter (pyro.param), or move it "
                "inside the plate as one variable per data point"
            )
        # A discrete site is enumerated unless the guide samples it (see _check_guide).


def check_enumerable(site: SiteStructure) -> None:
    """A discrete latent site is summed out exactly when it can be enumerated in parallel,
    one variable per data point (directly in the data plate)."""
    problem = None
    if not site.enumerable:
        problem = f"its {site.family} distribution has no finite support to enumerate"
    elif site.enumerate == "sequential":
        problem = "it is marked for sequential enumeration"
    elif site.inner_plates:
        plates = ", ".join(map(repr, site.inner_plates))
        problem = (
            f"it lies in plate(s) {plates} inside the data plate (a discrete variable per "
            "plate element, e.g. a Markov chain, needs sequential/Markov enumeration)"
        )
    if problem is not None:
        raise ValueError(
            f"latent site {site.name!r} is discrete ({site.family}, support {site.support}) "
            f"and cannot be summed out here: {problem}. The estimators here sum out discrete "
            "sites by parallel enumeration, one variable per data point; otherwise sum it "
            "out in the model (e.g. MixtureSameFamily or a forward algorithm), relax it "
            "(RelaxedOneHotCategorical), or fit it with Pyro's TraceEnum_ELBO / TraceGraph_ELBO"
        )


def _check_guide(sites: dict, guide_trace, data_plate: str, data_dim: int) -> None:
    guide_sites = _sample_sites(guide_trace)
    for site in sites.values():
        if site.discrete and site.name not in guide_sites:
            check_enumerable(site)  # summed out by enumeration
        if site.observed or site.name not in guide_sites:
            continue  # a missing guide site is named by the traces' own check
        guide_site = guide_sites[site.name]
        _check_shapes(site, guide_site)
        _check_masks(site, guide_site)
        _check_scales(site, guide_site)
        frames = {f.name: f.dim for f in guide_site["cond_indep_stack"] if f.vectorized}
        if frames.get(data_plate) != data_dim:
            where = "outside it" if data_plate not in frames else f"at dim {frames[data_plate]}"
            raise ValueError(
                f"guide site {site.name!r} is {where}, but the model's data plate "
                f"{data_plate!r} is at dim {data_dim}: sample it inside "
                f"`pyro.plate({data_plate!r}, N, dim={data_dim})` in the guide too"
            )


def _check_shapes(site: SiteStructure, guide_site: dict) -> None:
    model_shape = tuple(site.batch_shape + site.event_shape)
    fn = guide_site["fn"]
    guide_shape = tuple(fn.batch_shape + fn.event_shape)
    pairs = itertools.zip_longest(reversed(model_shape), reversed(guide_shape), fillvalue=1)
    if len(fn.event_shape) != len(site.event_shape) or any(m != g for m, g in pairs):
        inner = ", ".join(f"{n!r} (size {s}, dim {d})" for n, (d, s) in site.inner_plates.items())
        hint = f"; the model's site is inside plate(s) {inner}" if inner else ""
        raise ValueError(
            f"model and guide shapes disagree at site {site.name!r}: model batch shape "
            f"{tuple(site.batch_shape)} and event shape {tuple(site.event_shape)}, guide "
            f"{tuple(fn.batch_shape)} and {tuple(fn.event_shape)}{hint}. The guide must draw "
            "one value per element of every plate around the model's site, with the same "
            "event shape"
        )


def _effective_mask(mask, shape: torch.Size) -> torch.Tensor | None:
    if mask is None or mask is True:
        return None
    if mask is False:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.broadcast_to(mask.bool().cpu(), shape)


def _check_masks(site: SiteStructure, guide_site: dict) -> None:
    model_mask = _effective_mask(site.mask, site.batch_shape)
    guide_mask = _effective_mask(guide_site["mask"], site.batch_shape)
    if model_mask is None and guide_mask is None:
        return
    if model_mask is not None and guide_mask is not None and torch.equal(model_mask, guide_mask):
        return
    raise ValueError(
        f"site {site.name!r} is masked differently in the model and the guide (model: "
        f"{_mask_words(model_mask)}, guide: {_mask_words(guide_mask)}): log q and log p must "
        "cover the same entries, else padded latents enter one and not the other and the "
        "ELBO is not a bound. Apply the same mask to the guide's site (poutine.mask or "
        ".mask()); AmortizedGuide does this for you"
    )


def _check_scales(site: SiteStructure, guide_site: dict) -> None:
    model_scale, guide_scale = site.scale, guide_site["scale"]
    if _same_weights(model_scale, guide_scale):
        return
    raise ValueError(
        f"site {site.name!r} is scaled differently in the model ({_scale_words(model_scale)}) "
        f"and the guide ({_scale_words(guide_scale)}): the objective would weight log p and "
        "log q of the same draw differently, which is no bound. Apply the same poutine.scale "
        "around the site in the guide (AmortizedGuide does this for you), or scale the "
        "whole model and guide alike"
    )


def _same_weights(first, second) -> bool:
    first, second = torch.as_tensor(first).double(), torch.as_tensor(second).double()
    try:
        first, second = torch.broadcast_tensors(first.cpu(), second.cpu())
    except RuntimeError:
        return False
    return bool(torch.allclose(first, second, rtol=1e-12, atol=0.0))


def _scale_words(scale) -> str:
    if isinstance(scale, torch.Tensor) and scale.numel() > 1:
        return f"a tensor of shape {tuple(scale.shape)}"
    return f"{float(scale):g}"


def _mask_words(mask: torch.Tensor | None) -> str:
    if mask is None:
        return "unmasked"
    return f"{int(mask.sum())} of {mask.numel()} entries kept"


def _check_enumeration(model, guide, args, kwargs, structure: ModelStructure) -> None:
    """Refuse, naming the sites, a model whose code does not run with its discrete sites
    enumerated (each gets a dimension of its own, left of the plates)."""
    discrete = structure.discrete_sites
    if not discrete:
        return
    try:
        _one_pass_log_weights(model, guide, args, kwargs, structure)
    except Exception as error:  # noqa: BLE001 - reported with its first line
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"the model fails with its discrete site(s) {', '.join(map(repr, discrete))} "
            f"enumerated ({type(error).__name__}: {first}). The estimators here sum them out "
            "by parallel enumeration, which gives each a dimension of its own left of the "
            "plates: write the code after them to broadcast over leading dimensions (index "
            "and expand from the right, e.g. .expand(y.shape + (D,)) rather than "
            ".expand([N, D]))"
        ) from error


# --------------------------------------------------------------------------- particles


def _particle_problem(model, guide, args, kwargs, structure: ModelStructure) -> str | None:
    """Why the pair cannot run K draws in one vectorized pass, or ``None`` when it can: the
    log weights of K = 2 vectorized draws must equal those of each draw run alone."""
    nesting, plate = structure.max_plate_nesting, structure.data_plate
    try:
        together = run_traces(model, guide, args, kwargs, 2, plate, nesting, site_scales=True)
        vectorized = reduce_terms(together, with_kl=False).log_weights
    except Exception as error:  # noqa: BLE001 - any failure means: not particle-safe
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    for k in range(2):
        alone = _one_draw_terms(model, guide, args, kwargs, together, k, structure)
        if alone.shape != vectorized[k : k + 1].shape or not _close(alone, vectorized[k : k + 1]):
            return "the log weights of two draws taken together differ from each draw's own"
    return None


def _one_draw_terms(model, guide, args, kwargs, together, k: int, structure) -> torch.Tensor:
    replay = together.guide_trace.copy()
    particle_dim = -(structure.max_plate_nesting + 1)
    for name, site in together.guide_trace.nodes.items():
        if site["type"] != "sample" or not hasattr(site["fn"], "event_shape"):
            continue  # e.g. a plate's own subsample site
        value = site["value"]
        axis = value.dim() - len(site["fn"].event_shape) + particle_dim
        if 0 <= axis < value.dim() and value.shape[axis] == 2:
            value = value.select(axis, k)
        replay.nodes[name] = {**site, "value": value}
    replayed = poutine.replay(guide, trace=replay)
    indices = _subsample_indices(together.model_trace)  # the same subsample in both runs
    model = poutine.condition(model, data=indices) if indices else model
    return _one_pass_log_weights(model, replayed, args, kwargs, structure)


def _one_pass_log_weights(model, guide, args, kwargs, structure) -> torch.Tensor:
    """Log weights of one draw per data point, without a particle plate: shape (1, N)."""
    alone = run_traces(
        model,
        guide,
        args,
        kwargs,
        1,
        structure.data_plate,
        structure.max_plate_nesting,
        site_scales=True,
        vectorized=False,
    )
    return reduce_terms(alone, with_kl=False).log_weights


def _subsample_indices(trace) -> dict[str, torch.Tensor]:
    """The indices drawn by the trace's subsampled plates, by plate name."""
    from pyro.poutine.subsample_messenger import _Subsample

    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if isinstance(site.get("fn"), _Subsample) and len(site["value"]) < site["fn"].size
    }


def _close(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Equal up to rounding (non-finite entries must sit at the same places)."""
    tolerance = 1e-9 if first.dtype == torch.float64 else 1e-4
    finite = second[torch.isfinite(second)]
    scale = 1.0 + float(finite.abs().max()) if finite.numel() else 1.0
    return bool(
        torch.allclose(first, second, rtol=tolerance, atol=tolerance * scale, equal_nan=True)
    )


__all__ = [
    "PROBE_ROWS",
    "ModelStructure",
    "SiteStructure",
    "check_model_sites",
    "check_structure",
    "private_randomness",
]

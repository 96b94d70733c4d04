"""Newton-Schulz orthogonalization: :math:`M = U\\Sigma V^T \\mapsto \\approx UV^T`.

Muon replaces a momentum matrix by the nearest semi-orthogonal matrix (the
polar factor) using only matmuls. After scaling ``X = M / ||M||_F`` so every
singular value lies in (0, 1], each step applies an odd quintic to the
singular values without touching the singular vectors::

    A = X X^T;   X <- a X + (b A + c A^2) X      i.e.  s <- a s + b s^3 + c s^5

Coefficient sets:

* ``"jordan"`` (3.4445, -4.7750, 2.0315), the same five times: Keller Jordan,
  "Muon: An optimizer for hidden layers in neural networks" (2024). The
  coefficients maximise the slope at zero (a = 3.4445) so that small singular
  values grow fast; the price is that the iteration does not converge to 1 but
  oscillates in a band around it (about 0.7-1.2), which the post reports does
  not hurt training.
* ``"polar_express"``: a different, minimax-optimal quintic per step, Amsel,
  Persson, Musco & Gower 2025, "The Polar Express" (arXiv:2505.16932),
  Algorithm 1, with its safety factor 1.01 (every polynomial but the last is
  rescaled, and the normalisation divides by 1.01 ||M||_F); it converges to a
  much tighter band around 1 in the same five steps.

Tall matrices are transposed so the Gram matrix ``X X^T`` is the small side.
:func:`singular_value_band` runs the same polynomials on scalars, which is the
exact map the matrix iteration applies to singular values; tests use it to
check the promise of each coefficient set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Quintic = tuple[float, float, float]


@dataclass(frozen=True)
class CoefficientSet:
    """Per-step quintic coefficients; steps past the list repeat the last one."""

    name: str
    quintics: tuple[Quintic, ...]
    norm_scale: float = 1.0

    def for_steps(self, ns_steps: int) -> list[Quintic]:
        last = self.quintics[-1]
        return [self.quintics[i] if i < len(self.quintics) else last for i in range(ns_steps)]


def _polar_express() -> CoefficientSet:
    # Amsel et al. 2025, Algorithm 1: the degree-5 minimax sequence for
    # singular values in [1e-3, 1], then the safety rescaling a/s, b/s^3, c/s^5
    # (s = 1.01) of every polynomial but the last.
    raw = (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
        (1.875, -1.25, 0.375),
    )
    safety = 1.01
    scaled = tuple((a / safety, b / safety**3, c / safety**5) for a, b, c in raw[:-1])
    return CoefficientSet("polar_express", (*scaled, raw[-1]), norm_scale=safety)


JORDAN = CoefficientSet("jordan", ((3.4445, -4.7750, 2.0315),))
COEFFICIENT_SETS: dict[str, CoefficientSet] = {"jordan": JORDAN, "polar_express": _polar_express()}


def resolve_coefficients(spec: object) -> CoefficientSet:
    """Turn ``ns_coefficients`` (a name, one (a, b, c), or a per-step list) into a set.

    Raises ValueError naming ``ns_coefficients`` and the valid choices.
    """
    if isinstance(spec, CoefficientSet):
        return spec
    if isinstance(spec, str):
        if spec not in COEFFICIENT_SETS:
            raise ValueError(
                f"Invalid ns_coefficients: unknown coefficient set {spec!r} "
                f"(expected one of {sorted(COEFFICIENT_SETS)} or a tuple (a, b, c))"
            )
        return COEFFICIENT_SETS[spec]
    if isinstance(spec, (tuple, list)) and len(spec) == 3 and all(_is_real(x) for x in spec):
        quintic = tuple(float(x) for x in spec)
        if quintic == JORDAN.quintics[0]:
            return JORDAN
        return CoefficientSet("custom", (quintic,))  # type: ignore[arg-type]
    if (
        isinstance(spec, (tuple, list))
        and spec
        and all(
            isinstance(q, (tuple, list)) and len(q) == 3 and all(_is_real(x) for x in q)
            for q in spec
        )
    ):
        return CoefficientSet("custom", tuple(tuple(float(x) for x in q) for q in spec))  # type: ignore[misc]
    raise ValueError(
        f"Invalid ns_coefficients: {spec!r} (expected one of {sorted(COEFFICIENT_SETS)}, "
        "a tuple (a, b, c) of finite floats, or a list of such tuples, one per step)"
    )


def _is_real(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def orthogonalize(
    matrices: Tensor,
    coefficients: CoefficientSet,
    ns_steps: int,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximate polar factor of a matrix (2-D) or of each matrix in a stack (3-D).

    Returns a new tensor of ``dtype`` and the input's shape. A 2-D input runs the
    same ``addmm`` sequence as ``torch.optim.Muon``, so with the Jordan set and
    bfloat16 the two agree bitwise.
    """
    if matrices.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects a matrix or a stack of matrices, got {matrices.ndim}-D")
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        x = x / (x.norm() * coefficients.norm_scale).clamp(min=eps)
        for a, b, c in coefficients.for_steps(ns_steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        norms = torch.linalg.matrix_norm(x, keepdim=True)
        x = x / (norms * coefficients.norm_scale).clamp(min=eps)
        for a, b, c in coefficients.for_steps(ns_steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def singular_value_band(
    coefficients: CoefficientSet, ns_steps: int, lower: float, *, num_points: int = 4097
) -> tuple[float, float]:
    """Range of the scalar iteration over normalised singular values in [lower, 1].

    The matrix iteration maps each singular value s of ``X = M/(scale ||M||_F)`` by
    the same composition of quintics, so its output singular values lie in this band
    (up to rounding in the iteration dtype).
    """
    s = torch.linspace(lower, 1.0, num_points, dtype=torch.float64)
    for a, b, c in coefficients.for_steps(ns_steps):
        s = a * s + b * s**3 + c * s**5
    return float(s.min()), float(s.max())


def newton_schulz_flops(rows: int, cols: int, ns_steps: int) -> int:
    """Multiply-adds of :func:`orthogonalize` for one ``rows x cols`` matrix.

    Per step with ``m = min, n = max``: ``X X^T`` (m*m*n), ``A A`` (m^3) and
    ``B X`` (m*m*n); the plan balances owners by this cost.
    """
    small, large = min(rows, cols), max(rows, cols)
    return ns_steps * (2 * small * small * large + small**3)


# How a parameter of more than two dimensions becomes matrices (a param group's
# ``matrix_view``): "flatten" keeps dim 0 as rows and folds the rest into columns,
# as Jordan's reference does for conv kernels (``g.view(len(g), -1)``, Jordan 2024);
# "stack" reads a 3-D (experts, rows, cols) parameter as one matrix per slice. A
# group without the key (a raw parameter list; torch.optim.Muon's checkpoints) keeps
# the shape rule: 3-D stacks, 4-D and more flattened.
MATRIX_VIEWS = ("flatten", "stack")


def resolve_matrix_view(view: object, shape: Sequence[int]) -> str:
    """``"flatten"`` or ``"stack"``: how a parameter of ``shape`` in a group with
    ``matrix_view=view`` (None: the shape rule) is orthogonalized.

    Raises ValueError naming ``matrix_view`` for an unknown view, or a stack of a
    parameter that is neither 3-D nor 2-D.
    """
    if view is None:
        return "stack" if len(shape) == 3 else "flatten"
    if view not in MATRIX_VIEWS:
        raise ValueError(f"Invalid matrix_view: {view!r} (expected one of {MATRIX_VIEWS} or None)")
    if view == "stack" and len(shape) not in (2, 3):
        raise ValueError(f"Invalid matrix_view: 'stack' reads 3-D (stack, rows, cols) parameters "
                         f"(or 2-D matrices), got shape {tuple(shape)}")
    return str(view)


def as_matrices(tensor: Tensor, view: str | None = None) -> Tensor:
    """The matrix (or stack of matrices) Muon orthogonalizes for a parameter.

    2-D weights as they are; with ``view="stack"`` a 3-D (experts, rows, cols)
    parameter per expert; otherwise (``"flatten"``, conv kernels (out, in, *k) of
    any dimensionality) as ``(shape[0], rest)``. ``view=None``: the shape rule of
    :func:`resolve_matrix_view`.
    """
    if tensor.ndim < 2:
        raise ValueError(f"Muon needs parameters with at least 2 dimensions, got shape {tuple(tensor.shape)}")
    if tensor.ndim == 2 or resolve_matrix_view(view, tensor.shape) == "stack":
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


def matrix_shape(shape: Sequence[int], view: str | None = None) -> tuple[int, int]:
    """(rows, cols) of each matrix :func:`as_matrices` makes of a parameter of ``shape``."""
    if len(shape) == 2 or (len(shape) == 3 and resolve_matrix_view(view, shape) == "stack"):
        return int(shape[-2]), int(shape[-1])
    return int(shape[0]), int(math.prod(shape[1:]))


def matrix_count(shape: Sequence[int], view: str | None = None) -> int:
    """How many matrices :func:`as_matrices` makes of a parameter of ``shape``."""
    return int(shape[0]) if len(shape) == 3 and resolve_matrix_view(view, shape) == "stack" else 1

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

``method="gram"`` runs the same polynomials through the Gram matrix (Zhang,
Amsel, Chen & Dao 2026, "Gram Newton-Schulz", github.com/Dao-AILab/gram-newton-schulz,
README algorithm and ``gram_newton_schulz.py``). A step is
``X <- h(R) X`` with ``R = X X^T`` and ``h(R) = aI + bR + cR^2``; every ``h`` is a
polynomial in the first ``R``, so they commute, and for X of m x n (m <= n)::

    Q <- Q h(R)                 (m x m; Q = h(R) on the first step)
    R <- h(R) R h(R)            (the Gram matrix of h(R) X, without forming it)
    X_final = Q X               (one m x m by m x n product at the end)

Per step that is about 4 m^3 multiply-adds against the standard 2 m^2 n + m^3,
plus 2 m^2 n to form R at the start and apply Q at the end: fewer for wide
matrices (n > 1.5 m), more for square ones. Rounding errors in R are amplified
by the later polynomials, so the iteration restarts (``X <- Q X``, ``R <- X X^T``,
``Q <- I``) before the steps of :func:`gram_restarts` (before the third of five,
as the reference recommends for five steps); each restart costs 2 m^2 n.

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


NS_METHODS = ("standard", "gram", "auto")


def gram_restarts(ns_steps: int, dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """Steps (0-based) before which the Gram iteration re-forms X and R.

    float32: before the third step, then every third (five steps: one restart, the
    reference's ``gram_newton_schulz_reset_iterations=[2]``, chosen there for fp16).
    bfloat16 keeps 8 bits of mantissa against fp16's 11: with one restart the
    polar_express set drifted out of its band on a square matrix (largest singular
    value 2.3), so it restarts every second step (measured: within 2-4% of the fp32
    result where the standard bf16 iteration is within 1-3%).
    """
    return tuple(range(2, ns_steps, 3 if dtype == torch.float32 else 2))


def check_ns_method(method: object) -> None:
    """Raise ValueError naming ``ns_method`` unless it is one of :data:`NS_METHODS`."""
    if not isinstance(method, str) or method not in NS_METHODS:
        raise ValueError(f"Invalid ns_method: {method!r} (expected one of {NS_METHODS})")


def resolve_ns_method(method: object, rows: int, cols: int, ns_steps: int,
                      dtype: torch.dtype = torch.float32) -> str:
    """``"standard"`` or ``"gram"`` for a ``rows x cols`` matrix under ``ns_method=method``:
    ``"auto"`` takes the Gram iteration where it needs fewer multiply-adds
    (:func:`newton_schulz_flops`; wide or tall matrices, about n > 1.5 m at five steps)."""
    check_ns_method(method)
    if method != "auto":
        return str(method)
    gram = newton_schulz_flops(rows, cols, ns_steps, "gram", dtype)
    return "gram" if gram < newton_schulz_flops(rows, cols, ns_steps) else "standard"


def _normalized(matrices: Tensor, coefficients: CoefficientSet, eps: float,
                dtype: torch.dtype) -> tuple[Tensor, bool]:
    """Both iterations' start: in ``dtype``, wide (transposed when tall; returned as
    ``tall``), each matrix divided by its Frobenius norm times the set's ``norm_scale``."""
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    if x.ndim == 2:
        return x / (x.norm() * coefficients.norm_scale).clamp(min=eps), tall
    norms = torch.linalg.matrix_norm(x, keepdim=True)
    return x / (norms * coefficients.norm_scale).clamp(min=eps), tall


def orthogonalize(
    matrices: Tensor,
    coefficients: CoefficientSet,
    ns_steps: int,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    method: str = "standard",
) -> Tensor:
    """Approximate polar factor of a matrix (2-D) or of each matrix in a stack (3-D).

    Returns a new tensor of ``dtype`` and the input's shape. A 2-D input runs the
    same ``addmm`` sequence as ``torch.optim.Muon``, so with the Jordan set and
    bfloat16 the two agree bitwise. ``method="gram"``: the Gram iteration
    (:func:`gram_orthogonalize`), equal in exact arithmetic.
    """
    if matrices.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects a matrix or a stack of matrices, got {matrices.ndim}-D")
    if resolve_ns_method(method, matrices.size(-2), matrices.size(-1), ns_steps, dtype) == "gram":
        return gram_orthogonalize(matrices, coefficients, ns_steps, eps=eps, dtype=dtype)
    x, tall = _normalized(matrices, coefficients, eps, dtype)
    if x.ndim == 2:
        for a, b, c in coefficients.for_steps(ns_steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        for a, b, c in coefficients.for_steps(ns_steps):
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def _addmm(bias: Tensor, left: Tensor, right: Tensor, *, beta: float, alpha: float = 1.0) -> Tensor:
    """``beta * bias + alpha * left @ right`` for matrices or stacks of them."""
    if bias.ndim == 2:
        return torch.addmm(bias, left, right, beta=beta, alpha=alpha)
    return torch.baddbmm(bias, left, right, beta=beta, alpha=alpha)


def gram_orthogonalize(
    matrices: Tensor,
    coefficients: CoefficientSet,
    ns_steps: int,
    *,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """:func:`orthogonalize` through the Gram matrix (module docstring), for a matrix
    or a stack; the same normalisation, polynomials and result dtype.

    Tensors are released as soon as they are dead (``del``), so the peak is
    :func:`gram_workspace_numel`, which ``MuonRule.workspace_bytes`` counts.
    """
    x, tall = _normalized(matrices, coefficients, eps, dtype)
    quintics = coefficients.for_steps(ns_steps)
    restarts = gram_restarts(ns_steps, dtype)
    gram = x @ x.mT
    q: Tensor | None = None
    for step, (a, b, c) in enumerate(quintics):
        if step in restarts:
            del gram  # re-formed below from the new X
            x = q @ x  # type: ignore[operator]
            q = None
            gram = x @ x.mT
        z = _addmm(gram, gram, gram, beta=b, alpha=c)  # bR + cR^2 = h(R) - aI
        if q is None:
            q = z.clone()
            q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            q = _addmm(q, q, z, beta=a)
        if step + 1 < len(quintics) and step + 1 not in restarts:
            rz = _addmm(gram, gram, z, beta=a)  # R h(R)
            gram = _addmm(rz, z, rz, beta=a)  # h(R) R h(R)
            del rz
        del z
    del gram
    x = q @ x  # type: ignore[operator]
    return x.mT if tall else x


def gram_workspace_numel(rows: int, cols: int, ns_steps: int, dtype: torch.dtype) -> int:
    """Peak elements :func:`gram_orthogonalize` holds for one matrix beyond its input,
    from the normalised X on: its loop replayed on sizes (X: rows x cols; R, Z, Q, RZ:
    m x m). The larger of X with up to five m x m matrices (while R is updated) and
    two X with Q (a restart and the end)."""
    x, g = rows * cols, min(rows, cols) ** 2
    restarts = gram_restarts(ns_steps, dtype)
    peak = live = x + g  # X, R
    have_q = False
    for step in range(ns_steps):
        if step in restarts:
            peak = max(peak, 2 * x + g)  # old X, new X = Q X, Q (R released first)
            live, have_q = x + g, False  # X, new R
        live += g  # Z
        peak = max(peak, live + g)  # new Q (a clone of Z, or Q h(R) beside the old Q)
        live += g if not have_q else 0
        have_q = True
        if step + 1 < ns_steps and step + 1 not in restarts:
            peak = max(peak, live + 2 * g)  # RZ, then the new R beside the old one
        live -= g  # Z
    return max(peak, 2 * x + g)  # the final Q X beside X and Q (R released)


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


def newton_schulz_flops(rows: int, cols: int, ns_steps: int, method: str = "standard",
                        dtype: torch.dtype = torch.float32) -> int:
    """Multiply-adds of :func:`orthogonalize` for one ``rows x cols`` matrix.

    Standard, per step with ``m = min, n = max``: ``X X^T`` (m*m*n), ``A A`` (m^3)
    and ``B X`` (m*m*n). Gram (:func:`gram_orthogonalize`): ``X X^T`` and ``Q X``
    once and at each restart (2 m^2 n each time), and per step ``Z`` and ``Q``
    (m^3 each; ``Q`` is free on a first step) and, unless a restart or the end
    follows, ``R h(R)`` and ``h(R) R h(R)`` (m^3 each). The plan balances owners
    by this cost.
    """
    small, large = min(rows, cols), max(rows, cols)
    if method != "gram":
        return ns_steps * (2 * small * small * large + small**3)
    restarts = gram_restarts(ns_steps, dtype)
    firsts = {0, *restarts}
    cubes = sum(1 + (step not in firsts) + 2 * (step + 1 < ns_steps and step + 1 not in restarts)
                for step in range(ns_steps))
    return (1 + len(restarts)) * 2 * small * small * large + cubes * small**3


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
        raise ValueError(f"Muon needs parameters with at least 2 dimensions, got shape {tuple(tensor.shape)} "
                         "(under DeepSpeed ZeRO the optimizer is handed flat 1-D partitions: use "
                         "shardopt.integrations.deepspeed with a 'shardopt' section for distributed Muon)")
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

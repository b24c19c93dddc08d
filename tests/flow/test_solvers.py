import math

import pytest
import torch

from avlink.flow.solvers import EVALS_PER_STEP, SOLVERS, solve, steps_for_evals


def test_euler_is_exact_on_the_rectified_path():
    """For v = x1 - x0 (a straight path) one Euler step lands on the data exactly."""
    x0, x1 = torch.randn(3, 5), torch.randn(3, 5)
    out = solve(lambda x, t: (x1 - x0).expand_as(x), x0, steps=1)
    torch.testing.assert_close(out, x1)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_linear_ode_reaches_the_analytic_answer(method):
    """dx/dt = a x from t = 0 to 1 has x(1) = x(0) exp(a)."""
    a = -1.5
    x0 = torch.randn(4, 3, dtype=torch.float64)
    out = solve(lambda x, t: a * x, x0, steps=256, method=method)
    torch.testing.assert_close(out, x0 * math.exp(a), rtol=1e-2 if method == "euler" else 1e-5, atol=0)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_convergence_order(method, order):
    """Halving the step divides the error by 2^order; the field depends on t, so time handling is checked too."""
    x0 = torch.ones(1, dtype=torch.float64)

    def velocity(x, t):
        return (1 + 2 * t.to(x.dtype)) * x  # x(t) = exp(t + t^2)

    exact = math.exp(2.0)
    errors = [abs(solve(velocity, x0, steps=n, method=method).item() - exact) for n in (32, 64, 128)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert coarse / fine == pytest.approx(2**order, rel=0.1)


def test_evaluation_counts():
    calls = []

    def velocity(x, t):
        calls.append(1)
        return x

    for method in SOLVERS:
        calls.clear()
        solve(velocity, torch.zeros(1), steps=8, method=method)
        assert len(calls) == 8 * EVALS_PER_STEP[method]


def test_time_is_passed_per_sample():
    seen = []
    solve(lambda x, t: seen.append(t.clone()) or torch.zeros_like(x), torch.zeros(3, 2), steps=4)
    assert [s.shape for s in seen] == [(3,)] * 4
    assert [round(s[0].item(), 6) for s in seen] == [0.0, 0.25, 0.5, 0.75]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown solver"):
        solve(lambda x, t: x, torch.zeros(1), method="rk45")
    with pytest.raises(ValueError, match="steps"):
        solve(lambda x, t: x, torch.zeros(1), steps=0)


@pytest.mark.parametrize(("method", "evals", "steps"),
                         [("euler", 16, 16), ("midpoint", 16, 8), ("heun", 32, 16), ("heun", 33, None),
                          ("midpoint", 1, None), ("euler", 0, None)])
def test_steps_for_evals(method, evals, steps):
    assert steps_for_evals(method, evals) == steps
    if steps is not None:  # the count the solver really makes
        calls = []
        solve(lambda x, t: calls.append(1) or x, torch.zeros(1), steps=steps, method=method)
        assert len(calls) == evals


def test_steps_for_evals_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        steps_for_evals("rk4", 8)

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models import Layer, LayerTable, get_cost_model
from hwsearch.rounding import (
    BitSpace,
    InfeasibleBudget,
    budget_bits,
    budget_shift,
    minimum_cost,
    project_to_budgets,
)

MODELS = ["bitops", "memory", "loom", "stripes", "bitfusion"]


@st.composite
def problems(draw):
    n = draw(st.integers(2, 12))
    layers = tuple(Layer(f"l{i}", "Conv2d", draw(st.integers(1, 10**6)), draw(st.integers(1, 10**5)), True)
                   for i in range(n))
    table = LayerTable(layers, (1, 3, 8, 8))
    free = [draw(st.booleans()) or i == 1 for i in range(n)]
    w = [draw(st.floats(2, 8)) if f else 8.0 for f in free]
    a = [draw(st.floats(2, 8)) if f else 8.0 for f in free]
    names = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=3, unique=True))
    fractions = [draw(st.floats(0.0, 1.2)) for _ in names]
    return table, free, w, a, names, fractions


def _budgets(table, w, a, space, names, fractions):
    """One budget per cost model, a fraction of the way from its all-minimum to its all-8-bit cost
    (above the minimum when those coincide): never below what the bit space can reach."""
    budgets = []
    for name, frac in zip(names, fractions):
        model = get_cost_model(name)
        lo = minimum_cost(table, w, a, space, model)
        hi = model(table, [8] * len(w), [8] * len(a))
        budgets.append((model, lo + frac * (hi - lo) if hi > lo else lo * (1 + frac)))
    return budgets


def _setup(problem):
    """A problem's table, free mask, bits, its bit space (free weights and activations alike, 2..8) and budgets."""
    table, free, w, a, names, fractions = problem
    space = BitSpace(free, free, 2, 8)
    return table, free, w, a, space, _budgets(table, w, a, space, names, fractions)


@settings(max_examples=150, deadline=None)
@given(problems())
def test_plan_never_exceeds_any_budget(problem):
    table, free, w, a, space, budgets = _setup(problem)
    try:
        wi, ai = project_to_budgets(table, w, a, space, budgets)
    except InfeasibleBudget:
        # Several budgets at once can be jointly infeasible only if one alone is: each is >= its minimum.
        pytest.fail("a budget at or above its all-minimum cost was refused")
    for model, budget in budgets:
        assert model(table, wi, ai) <= budget * (1 + 1e-9)
    for i, f in enumerate(free):
        if f:
            assert 2 <= wi[i] <= 8 and 2 <= ai[i] <= 8
        else:
            assert wi[i] == 8 and ai[i] == 8


def test_budget_below_minimum_is_refused_naming_the_minimum():
    table = LayerTable((Layer("a", "Conv2d", 100, 10), Layer("b", "Conv2d", 100, 10)), (1, 1, 4, 4))
    space = BitSpace([False, True], [False, True], 2, 8)
    minimum = 100 * 8 * 8 + 100 * 2 * 2
    with pytest.raises(InfeasibleBudget, match=f"{minimum:.4g}"):
        project_to_budgets(table, [8, 8], [8, 8], space, [(get_cost_model("bitops"), minimum - 1)])
    assert project_to_budgets(table, [8, 8], [8, 8], space, [(get_cost_model("bitops"), minimum)]) == ([8, 2], [8, 2])


def test_rounding_keeps_learned_bits_and_gives_back_only_what_rounding_took():
    table = LayerTable((Layer("a", "Conv2d", 100, 10), Layer("b", "Conv2d", 10, 10)), (1, 1, 4, 4))
    space = BitSpace([True, True], [True, True], 2, 8)
    bitops = get_cost_model("bitops")
    assert project_to_budgets(table, [5.45, 3.4], [4, 4], space, []) == ([5, 3], [4, 4])
    # Continuous cost 2316; rounded 2120. Raising b's weights (+40) fits under the continuous
    # cost, raising a's (+400) does not: the plan lands where training left it, not at the cap.
    w, a = project_to_budgets(table, [5.45, 3.4], [4, 4], space, [(bitops, 1e9)])
    assert (w, a) == ([5, 4], [4, 4])
    assert bitops(table, w, a) <= bitops(table, [5.45, 3.4], [4, 4])
    # A budget below the continuous cost caps the give-back instead.
    assert project_to_budgets(table, [5.45, 3.4], [4, 4], space, [(bitops, 2130)]) == ([5, 3], [4, 4])


@settings(max_examples=60, deadline=None)
@given(problems())
def test_budget_bits_is_the_largest_uniform_bitwidth_within_every_budget(problem):
    table, free, w, a, space, budgets = _setup(problem)
    b = budget_bits(table, w, a, space, budgets)
    assert 2 <= b <= 8

    def at(bits):
        ws = [bits if f else x for x, f in zip(w, free)]
        as_ = [bits if f else x for x, f in zip(a, free)]
        return [float(m.torch(table, torch.tensor(ws, dtype=torch.float64), torch.tensor(as_, dtype=torch.float64)))
                for m, _ in budgets]

    assert all(c <= budget * (1 + 1e-9) for c, (_, budget) in zip(at(b), budgets))
    if b < 8:  # a little more would break a budget
        assert any(c > budget for c, (_, budget) in zip(at(min(8.0, b + 1e-6)), budgets))


def test_budget_bits_of_a_uniform_budget_is_its_bitwidth():
    table = LayerTable((Layer("a", "Conv2d", 100, 10), Layer("b", "Conv2d", 300, 30), Layer("c", "Linear", 7, 7)),
                       (1, 1, 4, 4))
    space = BitSpace([False, True, False], [False, True, False], 2, 8)
    bitops = get_cost_model("bitops")
    w4 = bitops(table, [8, 4, 8], [8, 4, 8])
    assert budget_bits(table, [8, 8, 8], [8, 8, 8], space, [(bitops, w4)]) == pytest.approx(4.0, abs=1e-9)
    assert budget_bits(table, [8, 8, 8], [8, 8, 8], space, []) == 8.0


def _shifted(w, a, free, t, rounded):
    def one(bits):
        out = [min(max(x - t, 2.0), 8.0) if f else x for x, f in zip(bits, free)]
        return [float(round(x)) if (f and rounded) else x for x, f in zip(out, free)]
    return one(w), one(a)


@settings(max_examples=60, deadline=None)
@given(problems(), st.booleans())
def test_budget_shift_is_the_smallest_shift_onto_every_budget(problem, rounded):
    table, free, w, a, space, budgets = _setup(problem)
    mask = torch.tensor(free, dtype=torch.float32)
    t = float(budget_shift(table, torch.tensor(w), torch.tensor(a), mask, mask, budgets, 2, 8, rounded=rounded))
    assert 0.0 <= t <= 6.0

    def costs(shift):
        ws, as_ = _shifted(w, a, free, shift, rounded)
        return [m(table, ws, as_) for m, _ in budgets]

    assert all(c <= b * (1 + 1e-9) for c, (_, b) in zip(costs(t), budgets))
    if t > 0 and rounded:  # exact: a shift smaller by 2e-6 bits (twice the step past a crossing) breaks a budget
        assert any(c > b for c, (_, b) in zip(costs(max(0.0, t - 2e-6)), budgets))
    elif t > 0:  # a shift smaller by more than the bisection's resolution breaks a budget
        assert any(c > b for c, (_, b) in zip(costs(max(0.0, t - 6.0 / 2**16 * 2)), budgets))


def test_budget_shift_is_zero_inside_the_budget_and_lowers_only_free_bits():
    table = LayerTable((Layer("a", "Conv2d", 100, 10), Layer("b", "Conv2d", 300, 30)), (1, 1, 4, 4))
    bitops = get_cost_model("bitops")
    w = torch.tensor([8.0, 6.0])
    free = torch.tensor([0.0, 1.0])
    inside = [(bitops, bitops(table, [8, 6], [8, 6]))]
    assert float(budget_shift(table, w, w, free, free, inside, 2, 8)) == 0.0
    at_w4 = [(bitops, bitops(table, [8, 4], [8, 4]))]
    t = float(budget_shift(table, w, w, free, free, at_w4, 2, 8, rounded=False))
    assert t == pytest.approx(2.0, abs=1e-3)
    # Rounded: 6 - t must round to 4, so t just above 1.5.
    assert float(budget_shift(table, w, w, free, free, at_w4, 2, 8)) == pytest.approx(1.5, abs=1e-3)

"""Subspace (constraints/subspace.py, constraints/projections.py): W = θ₀ + E·θ per tensor and
across a whole model (intrinsic dimension); the projections; checkpoints (after a dtype change
too), bake, summary, errors (a basis that would need gigabytes, seeds, mixed-dtype groups)."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    mlp,
    outcome_is_exact_or_refused,
    refusal_of,
    square_sum_steps,
    state_of,
)
from torch import nn

import maskparam as mp
from maskparam.constraints.projections import (
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    fwht,
)

PROJECTIONS = ["gaussian", "sparse", "fastfood"]


def _explicit_basis(model: nn.Module, coordinates: nn.Module, dim: int) -> torch.Tensor:
    """Read E column by column: set θ = e_j and take the effective minus θ₀ of every tensor."""
    columns = []
    originals = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("original")
    }
    for j in range(dim):
        with torch.no_grad():
            coordinates.theta.zero_()
            coordinates.theta[j] = 1.0
            effective = [
                getattr(model.get_submodule(n.split(".parametrizations.")[0]), n.split(".")[-2])
                for n in originals
            ]
            columns.append(
                torch.cat(
                    [
                        (e - o).reshape(-1)
                        for e, o in zip(effective, originals.values(), strict=True)
                    ]
                )
            )
    with torch.no_grad():
        coordinates.theta.zero_()
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_apply_is_bit_identical_and_only_theta_trains(projection, train):
    model = mlp(12, 20, 3)
    x = torch.randn(8, 12)
    before = model(x)
    originals = [p.detach().clone() for p in model.parameters()]
    mp.apply_mask(model, {"*": mp.Subspace(16, projection=projection, group="all")})
    assert torch.equal(model(x), before)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["0.parametrizations.weight.0.coordinates.theta"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model.requires_grad_(True)  # a script that re-enables everything must not train θ₀
    train(model, x, steps=5, optimizer=optimizer)
    stored = [
        m.parametrizations[n].original for m in (model[0], model[2]) for n in ("weight", "bias")
    ]
    for before_value, original in zip(originals, stored, strict=True):
        assert torch.equal(original, before_value)  # θ₀ never trains
        assert original.grad is None
    assert not torch.equal(model(x), before)
    theta = trainable[0][1]
    assert theta.shape == (16,)
    assert sum(p.numel() for p in model.parameters() if p.grad is not None) == 16


def test_group_theta_appears_once_in_parameters_and_state_dict():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*": mp.Subspace(10, projection="fastfood", group="all")})
    thetas = [n for n, _ in model.named_parameters() if n.endswith("theta")]
    assert thetas == ["0.parametrizations.weight.0.coordinates.theta"]
    assert [k for k in model.state_dict() if k.endswith("theta")] == thetas
    shared = {
        id(model[i].parametrizations[n][0].coordinates) for i in (0, 2) for n in ("weight", "bias")
    }
    assert len(shared) == 1


def test_without_a_group_each_tensor_has_its_own_theta():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*.weight": mp.Subspace(4, projection="sparse")})
    thetas = [n for n, _ in model.named_parameters() if n.endswith("theta")]
    assert thetas == [
        "0.parametrizations.weight.0.coordinates.theta",
        "2.parametrizations.weight.0.coordinates.theta",
    ]


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_random_bases_have_unit_norm_columns_over_the_group(projection):
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*": mp.Subspace(9, projection=projection, group="g", seed=4)})
    basis = _explicit_basis(model, model[0].parametrizations.weight[0].coordinates, 9)
    assert basis.shape == (12 * 20 + 20 + 20 * 3 + 3, 9)
    torch.testing.assert_close(basis.norm(dim=0), torch.ones(9))


def test_sparse_basis_has_density_one_over_root_d():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*": mp.Subspace(9, projection="sparse", group="g", seed=4)})
    basis = _explicit_basis(model, model[0].parametrizations.weight[0].coordinates, 9)
    density = float((basis != 0).float().mean())
    assert density == pytest.approx(1 / basis.shape[0] ** 0.5, rel=0.3)  # s = √D


@pytest.mark.parametrize(
    ("make", "dim"),
    [
        (lambda: DenseProjection.gaussian(30, 6, 0, torch.float64), 6),
        (lambda: SparseProjection(30, 6, 0.5, 0, torch.float64), 6),
        (lambda: FastfoodProjection(30, 6, 0, torch.float64), 6),  # L = 8, last block truncated
        (lambda: FastfoodProjection(64, 8, 1, torch.float64), 8),  # an exact multiple of L
    ],
)
def test_projections_pass_gradcheck(make, dim):
    theta = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(make(), (theta,))
    assert torch.autograd.gradgradcheck(make(), (theta,))


def test_fwht_is_the_sylvester_hadamard_transform():
    for length in (1, 2, 8, 32, 128):
        hadamard = torch.ones(1, 1, dtype=torch.float64)
        while hadamard.shape[0] < length:
            hadamard = torch.cat(
                (torch.cat((hadamard, hadamard), 1), torch.cat((hadamard, -hadamard), 1))
            )
        x = torch.randn(3, length, dtype=torch.float64)
        torch.testing.assert_close(fwht(x), x @ hadamard.T)
        torch.testing.assert_close(fwht(fwht(x)), length * x)


@pytest.mark.parametrize(
    ("rows", "dim"), [(5, 3), (30, 6), (100, 64), (1000, 100), (768, 1000), (2304, 1000)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fastfood_column_norms_are_the_transformed_identitys_bit_for_bit(rows, dim, dtype):
    # inv_norm is saved and compared exactly on load: building the first transform of the
    # truncated block's identity instead of computing it must not move a bit.
    projection = FastfoodProjection(rows, dim, 3, dtype)
    length, full = projection.length, rows // projection.length
    expected = torch.full(
        (dim,),
        length * float(projection.gaussian[:full].double().square().sum()),
        dtype=torch.float64,
    )
    if rows % length:
        last = projection.signs.shape[0] - 1
        eye = torch.eye(dim, length, dtype=torch.float64)
        x = fwht(projection.signs[last].double() * eye)
        permutation = projection.index[last].long() - last * length
        x = x[:, permutation] * projection.gaussian[last].double()
        expected = expected + fwht(x)[:, : rows % length].square().sum(dim=1)
    assert torch.equal(projection.column_sq_norms(), expected)


class SumTargets(nn.Module):
    """Li et al.'s toy problem: D = 1000 parameters in 10 groups of 100 with fixed sums."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(10, 100, generator=generator, dtype=torch.float64))
        self.targets = torch.randn(10, generator=generator, dtype=torch.float64) * 10

    def forward(self, _: object) -> torch.Tensor:
        return self.weight.sum(dim=1)

    def loss(self) -> torch.Tensor:
        return (self(None) - self.targets).square().sum()


def _min_loss(dim: int, projection: str) -> float:
    problem = SumTargets()
    mp.apply_mask(problem, {"weight": mp.Subspace(dim, projection=projection, seed=1)})
    optimizer = torch.optim.LBFGS(
        problem.parameters(),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.loss()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(problem.loss().detach())


@pytest.mark.parametrize("projection", ["gaussian", "fastfood"])
def test_toy_problem_has_intrinsic_dimension_exactly_ten(projection):
    start = float(SumTargets().loss().detach())
    assert _min_loss(10, projection) < 1e-9 * start
    assert _min_loss(30, projection) < 1e-9 * start
    assert _min_loss(9, projection) > 1e-3 * start  # one direction short: unreachable
    assert _min_loss(5, projection) > 1e-3 * start


def test_dense_and_fastfood_give_the_same_loss_curve_shape(train):
    curves = {}
    for projection in ("gaussian", "fastfood"):
        problem = SumTargets()
        mp.apply_mask(problem, {"weight": mp.Subspace(40, projection=projection, seed=2)})
        curve = train(
            problem,
            None,
            steps=150,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.5),
            target=problem.targets,
        )
        curves[projection] = torch.tensor(curve) / curve[0]
    for curve in curves.values():
        assert curve[-1] < 1e-2  # both converge
    # Same shape: at every tenth of training the relative losses are within a factor of 10.
    ratio = (curves["gaussian"][::15] + 1e-12) / (curves["fastfood"][::15] + 1e-12)
    assert bool(((ratio > 0.1) & (ratio < 10)).all())


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_state_dict_restores_the_subspace_in_a_fresh_model(projection):
    torch.manual_seed(1)
    model = mlp(12, 20, 3)
    rules = {"*": mp.Subspace(7, projection=projection, group="all", seed=5)}
    mp.apply_mask(model, rules)
    with torch.no_grad():
        model[0].parametrizations.weight[0].coordinates.theta.normal_()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    fresh = mp.apply_mask(mlp(12, 20, 3), rules)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), model(x))


def test_loading_a_checkpoint_of_another_seed_is_refused():
    model = mp.apply_mask(
        mlp(12, 20, 3), {"*": mp.Subspace(7, projection="fastfood", group="all", seed=5)}
    )
    other = mp.apply_mask(
        mlp(12, 20, 3), {"*": mp.Subspace(7, projection="fastfood", group="all", seed=6)}
    )
    with pytest.raises(
        mp.MaskparamError, match=r"(?s)seed=5, this model with seed=6.*Subspace\(\.\.\., seed=5\)"
    ):
        other.load_state_dict(model.state_dict())


def test_bake_is_exact_and_gives_back_trainable_parameters():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*": mp.Subspace(6, projection="fastfood", group="all")})
    with torch.no_grad():
        model[0].parametrizations.weight[0].coordinates.theta.normal_()
        effective = [model[0].weight.clone(), model[2].bias.clone()]
    mp.remove_parametrizations(model)
    assert torch.equal(model[0].weight, effective[0])
    assert torch.equal(model[2].bias, effective[1])
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_summary_reports_dim_against_d():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"*": mp.Subspace(10, projection="fastfood", group="all")})
    result = mp.summary(model)
    total = 12 * 20 + 20 + 20 * 3 + 3
    assert result.tensors[0].constraint == f"Subspace(fastfood, dim=10 of D={total}, group 'all')"
    assert all(row.free == 0 for row in result.tensors)
    assert result.trainable == 10
    assert result.total == total + 10


BAD = [
    (
        {"*": mp.Subspace(5, basis=torch.randn(7, 5), group="g")},
        r"basis has shape \(7, 5\).*shape \(323, 5\)",
    ),
    (
        {"*": mp.Subspace(5, basis=torch.randn(323, 5, dtype=torch.float64), group="g")},
        r"basis has dtype torch.float64",
    ),
    ({"0.bias": mp.Subspace(21)}, r"dim=21 exceeds the 20 entries"),
    (
        {"*": mp.Subspace(100, max_dense_bytes=1000, group="g")},
        r"(?s)takes about 387,600 bytes.*projection='fastfood'",
    ),
    (
        {"0.*": mp.Subspace(5, group="g"), "2.*": mp.Subspace(6, group="g")},
        r"(?s)group 'g'.*different settings",
    ),
    (
        {
            "0.*": mp.Subspace(5, group="g"),
            "2.*": [mp.Mask(torch.ones(1)), mp.Subspace(5, group="g")],
        },
        r"different places",
    ),
]


@pytest.mark.parametrize(("rules", "message"), BAD)
def test_bad_subspace_input_leaves_the_model_untouched(snapshot, rules, message):
    model = mlp(12, 20, 3)
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match=message):
        mp.apply_mask(model, rules)
    before.assert_same(model)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mp.Subspace(0), "dim must be a positive int"),
        (lambda: mp.Subspace(3, projection="hadamard"), "unknown projection 'hadamard'"),
    ],
)
def test_bad_subspace_specs(make, message):
    with pytest.raises(mp.MaskparamError, match=re.escape(message)):
        make()


def test_a_group_cannot_be_extended_by_a_later_call():
    model = mlp(12, 20, 3)
    mp.apply_mask(model, {"0.*": mp.Subspace(5, group="g")})
    with pytest.raises(mp.MaskparamError, match="already has a group of this name"):
        mp.apply_mask(model, {"2.*": mp.Subspace(5, group="g")})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_applying_in_half_precision_changes_no_output(dtype):
    model = mlp(12, 20, 3).to(dtype)
    x = torch.randn(4, 12, dtype=dtype)
    before = model(x)
    mp.apply_mask(model, {"*.weight": mp.Subspace(6, projection="fastfood", group="all")})
    assert model[0].weight.dtype == dtype
    assert torch.equal(model(x), before)


# ---------------------------------------------------------------------------------------------
# Fastfood storage (generation 2): 7 bytes per entry, regenerated bit for bit, checkpoints of
# generation 1 refused
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _fixed_bytes(projection: nn.Module) -> int:
    return sum(
        getattr(projection, name).numel() * getattr(projection, name).element_size()
        for name in projection._fixed
    )


def _generation_1(rows: int, dim: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What 0.1 to 0.2.dev drew (generation 1): float signs, int64 Π per block, G in ``dtype``."""
    length = 1 << max(dim - 1, 0).bit_length()
    generator = torch.Generator().manual_seed(seed)
    shape = (-(-rows // length), length)
    signs = torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1
    permutation = torch.argsort(torch.rand(shape, generator=generator), dim=1)
    gaussian = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return {"signs": signs, "permutation": permutation, "gaussian": gaussian}


def _materialised(projection: FastfoodProjection) -> torch.Tensor:
    """E column by column: the forward of each unit vector."""
    eye = torch.eye(projection.dim, dtype=projection.dtype)
    return torch.stack([projection(eye[j]) for j in range(projection.dim)], dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fastfood_stores_7_bytes_per_entry_whatever_the_dtype(dtype):
    # L = 128 (a = 8, b = 16): 512 full blocks and a truncated one.
    projection = FastfoodProjection(512 * 128 + 50, 100, 0, dtype)
    entries = 513 * 128
    assert projection.signs.dtype == torch.int8
    assert projection.index.dtype == torch.int32
    assert projection.gaussian.dtype == (
        torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    )
    hadamard = (8 * 8 + 16 * 16) * torch.finfo(dtype).bits // 8
    assert _fixed_bytes(projection) == 7 * entries + hadamard
    assert _fixed_bytes(projection) / projection.rows <= 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_fastfood_subspace_stores_at_most_8_bytes_per_parameter(dtype):
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).to(dtype)
    mp.apply_mask(model, {"*": mp.Subspace(100, projection="fastfood", group="all")})
    projections = [m for m in model.modules() if isinstance(m, FastfoodProjection)]
    parameters = 2 * (128 * 128 + 128)
    assert len(projections) == 4
    assert (
        sum(_fixed_bytes(p) for p in projections) / parameters <= 8
    )  # 0.1: 16 per entry in float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), [(30, 6), (64, 8), (1000, 100)])
def test_fastfood_regenerates_bit_for_bit_after_to_empty(dtype, rows, dim):
    projection = FastfoodProjection(rows, dim, 7, dtype)
    drawn = {name: getattr(projection, name) for name in projection._fixed}
    again = projection.generate()
    projection.to("meta")
    assert all(getattr(projection, name).is_meta for name in drawn)
    projection.to_empty(device="cpu")
    for name, value in drawn.items():
        for other in (again[name], getattr(projection, name)):
            assert other.dtype == value.dtype, name
            assert torch.equal(other, value), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), [(30, 6), (64, 8), (1000, 100)])
def test_fastfood_keeps_generation_1s_signs_and_permutation_and_rounds_g_to_16_bits(
    dtype, rows, dim
):
    projection = FastfoodProjection(rows, dim, 3, dtype)
    old = _generation_1(rows, dim, 3, dtype)
    length = projection.length
    offsets = torch.arange(old["signs"].shape[0]).unsqueeze(1) * length
    assert torch.equal(projection.signs.to(dtype), old["signs"])
    assert torch.equal(projection.index.long() - offsets, old["permutation"])
    drawn = _generation_1(rows, dim, 3, torch.float64)["gaussian"]
    assert torch.equal(projection.gaussian, drawn.to(projection.gaussian.dtype))
    # The same tensors, hence one E, for float16, float32 and float64 bases.
    if dtype != torch.bfloat16:
        reference = FastfoodProjection(rows, dim, 3, torch.float64)
        for name in ("signs", "index", "gaussian"):
            assert torch.equal(getattr(projection, name), getattr(reference, name)), name


@pytest.mark.parametrize(("rows", "dim"), [(30, 6), (64, 8), (1000, 100), (1000, 64)])
def test_fastfood_column_norms_are_those_of_the_materialised_basis(rows, dim):
    projection = FastfoodProjection(rows, dim, 2, torch.float64)
    basis = _materialised(projection)
    assert basis.shape == (rows, dim)
    # In float64 every entry of E is exact (sums of at most L float16 values), so the only
    # difference is the order of the sums of squares.
    torch.testing.assert_close(
        projection.column_sq_norms(), basis.square().sum(dim=0), rtol=1e-13, atol=0
    )
    # A float32 basis is the same E (same tensors), computed in float32.
    single = FastfoodProjection(rows, dim, 2, torch.float32)
    assert torch.equal(single.column_sq_norms(), projection.column_sq_norms())
    torch.testing.assert_close(_materialised(single).double(), basis, rtol=1e-5, atol=1e-4)


class _Generation1(FastfoodProjection):
    """Fastfood as generation 1 drew it: G in the basis' dtype (B and Π are the same)."""

    generation = 1

    def generate(self) -> dict[str, torch.Tensor]:
        tensors = super().generate()
        tensors["gaussian"] = _generation_1(self.rows, self.dim, self.seed, self.dtype)["gaussian"]
        return tensors


class _SameNorms(FastfoodProjection):
    """A hypothetical generation 3 whose E differs (G negated) but whose column norms do not."""

    generation = 3

    def generate(self) -> dict[str, torch.Tensor]:
        tensors = super().generate()
        tensors["gaussian"] = -tensors["gaussian"]
        return tensors


def _fastfood_model(monkeypatch, projection_class: type[FastfoodProjection]) -> nn.Sequential:
    with monkeypatch.context() as patch:
        patch.setattr("maskparam.constraints.subspace.FastfoodProjection", projection_class)
        model = mp.apply_mask(
            mlp(12, 20, 3), {"*": mp.Subspace(7, projection="fastfood", group="all", seed=5)}
        )
    with torch.no_grad():
        model[0].parametrizations.weight[0].coordinates.theta.normal_()
    return model


def test_a_generation_1_fastfood_checkpoint_is_refused(monkeypatch, snapshot):
    old = _fastfood_model(monkeypatch, _Generation1)
    checkpoint = old.state_dict()
    key = "0.parametrizations.weight.0.coordinates.generation"
    assert key not in checkpoint  # generation 1 saved none: its checkpoints look like this
    model = mp.apply_mask(
        mlp(12, 20, 3), {"*": mp.Subspace(7, projection="fastfood", group="all", seed=5)}
    )
    assert int(model.state_dict()[key]) == 2
    new_e = _explicit_basis(model, model[0].parametrizations.weight[0].coordinates, 7)
    old_e = _explicit_basis(old, old[0].parametrizations.weight[0].coordinates, 7)
    assert not torch.equal(new_e, old_e)  # the same seed, another E: θ cannot carry over
    before = snapshot(model)
    refusal = r"(?s)generation 1 of its random basis.*draws generation 2"
    with pytest.raises(mp.MaskparamError, match=refusal):
        model.load_state_dict(checkpoint)
    with pytest.raises(mp.MaskparamError, match=refusal):
        mp.load_state_dict(model, checkpoint, strict=False)
    with pytest.raises(mp.MaskparamError, match=re.escape(key)):  # strict: a missing key
        mp.load_state_dict(model, checkpoint)
    checkpoint[key] = torch.tensor(1)
    with pytest.raises(mp.MaskparamError, match=r"generation 1 of its random basis, this"):
        model.load_state_dict(checkpoint)
    before.assert_same(model)


def test_a_generation_with_the_same_column_norms_is_refused_by_its_generation(
    monkeypatch, snapshot
):
    other = _fastfood_model(monkeypatch, _SameNorms)
    model = mp.apply_mask(
        mlp(12, 20, 3), {"*": mp.Subspace(7, projection="fastfood", group="all", seed=5)}
    )
    checkpoint = other.state_dict()
    norms = "0.parametrizations.weight.0.coordinates.inv_norm"
    # The seed and column norms agree: without the generation this would load onto another E.
    assert torch.equal(checkpoint[norms], model.state_dict()[norms])
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match=r"generation 3 of its random basis"):
        model.load_state_dict(checkpoint)
    before.assert_same(model)


def test_gaussian_and_sparse_checkpoints_carry_no_generation():
    for projection in ("gaussian", "sparse"):
        model = mp.apply_mask(
            mlp(12, 20, 3), {"*": mp.Subspace(7, projection=projection, group="g")}
        )
        assert not [k for k in model.state_dict() if k.endswith("generation")]


def _subspace_in(projection: str, dtype: torch.dtype) -> nn.Linear:
    layer = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(4, projection=projection)})
    return layer.to(dtype)


# from the no-silent-failure attack on 0.1 (item 10: dtype changed after apply)
def test_gaussian_subspace_after_double_reloads_its_checkpoint_exactly():
    trained = _subspace_in("gaussian", torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    square_sum_steps(trained, torch.optim.SGD(trained.parameters(), lr=0.1), x, steps=1)
    fresh = _subspace_in("gaussian", torch.float64)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(x), trained(x))


# from the no-silent-failure attack on 0.1 (item 10: dtype changed after apply)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["half", "double"])
@pytest.mark.parametrize("projection", ["gaussian", "sparse", "fastfood"])
def test_subspace_after_dtype_change_reloads_or_refuses(projection, dtype):
    trained = _subspace_in(projection, dtype)
    x = torch.randn(5, 4, dtype=dtype)
    square_sum_steps(trained, torch.optim.SGD(trained.parameters(), lr=0.1), x, steps=1)
    checkpoint = trained.state_dict()
    model = _subspace_in(projection, dtype)
    output = model(x).detach()

    def check() -> None:
        assert torch.equal(model(x), trained(x))

    if outcome_is_exact_or_refused(lambda: model.load_state_dict(checkpoint), check, model) == (
        "refused"
    ):
        assert torch.equal(model(x), output)  # still usable


def _virtual_memory_size() -> int:
    with open("/proc/self/status") as status:  # noqa: PTH123
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@contextlib.contextmanager
def address_space_headroom(extra: int) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra`` bytes, so that a call
    that would allocate gigabytes fails at once (torch raises) instead of allocating them."""
    resource = pytest.importorskip("resource")
    try:
        cap = _virtual_memory_size() + extra
    except OSError:
        pytest.skip("needs /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and cap > hard:
        pytest.skip("the hard address-space limit is below the cap")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# from the no-silent-failure attack on 0.1 (crashes: memory)
@pytest.mark.parametrize(
    ("projection", "dim"), [("fastfood", 20_000), ("sparse", 100_000)], ids=["fastfood", "sparse"]
)
def test_subspace_that_needs_gigabytes_is_refused_before_allocating(projection, dim):
    """On 0.1 Fastfood (d=20000 over 1M entries) allocates a 5.2 GB identity for the column norms
    and sparse (d=1e5) peaks at ~5.9 GB; under a 512 MB cap both die in torch's allocator."""
    layer = nn.Linear(1000, 1000)
    before = state_of(layer)
    with address_space_headroom(512 * 2**20):
        refusal = refusal_of(
            lambda: mp.apply_mask(layer, {"weight": mp.Subspace(dim, projection=projection)})
        )
    if refusal is not None:
        assert "bytes" in str(refusal)
        assert_state_unchanged(layer, before)


# from the no-silent-failure attack on 0.1 (crashes: a Python error instead of MaskparamError)
def test_subspace_seed_beyond_int64_works_or_refuses():
    layer = nn.Linear(4, 3)

    def check() -> None:
        checkpoint = layer.state_dict()
        fresh = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2, seed=2**44)})
        fresh.load_state_dict(checkpoint)
        x = torch.randn(2, 4)
        assert torch.equal(fresh(x), layer(x))

    outcome_is_exact_or_refused(
        lambda: mp.apply_mask(layer, {"weight": mp.Subspace(2, seed=2**44)}), check, layer
    )


# from the no-silent-failure attack on 0.1 (crashes: a Python error instead of MaskparamError)
@pytest.mark.parametrize("order", ["fp32_first", "fp64_first"])
def test_mixed_dtype_subspace_group_raises_maskparam_error(order):
    first, second = nn.Linear(3, 3), nn.Linear(3, 3).double()
    model = nn.Sequential(first, second) if order == "fp32_first" else nn.Sequential(second, first)
    before = state_of(model)
    with pytest.raises(mp.MaskparamError, match=r"'[01]\.weight'|'g'"):
        mp.apply_mask(model, {"*.weight": mp.Subspace(2, group="g")})
    assert_state_unchanged(model, before)

"""Preparing a run and the SINAREQ bit-learning phase.

``prepare`` loads the data, builds and profiles the model, fixes which bits may move and checks
the budgets, all before any training. ``learn_bits`` is SINAREQ as an allocator: it trains the
quantized model with the regularizer, the bit pressure and the budget term while the learned
bitwidths move, projects them onto the budgets after every step, and returns the integer plan.
The plan is then trained at fixed bits by ``hwsearch.run.train_plan``, as any other plan is.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from cost_models import LayerTable, get_cost_model, profile

from . import dist
from .config import RunConfig
from .costs import FLOAT_BITS, float_layers, quantizable_layers
from .data import TensorData, load_dataset, load_imagefolder
from .fused import stack_scalars
from .models import create_model
from .quant import quant_layers, quantize_model, take_penalties
from .rounding import (
    BitSpace,
    InfeasibleBudget,
    budget_bits,
    budget_shift,
    check_feasible,
    project_to_budgets,
)
from .sinareq import accuracy_cost, bit_pressure, budget_penalty, strength
from .train import StepHook, fit, resolve_device

log = logging.getLogger("hwsearch")

__all__ = ["Prepared", "build_model", "calibrate", "learn_bits", "load_data", "measure_omega", "prepare",
           "quantize_prepared"]


@dataclass
class Prepared:
    """Everything a run needs before training: data on the device, the model, its table, the bit space."""

    config: RunConfig
    data: TensorData
    model: nn.Module
    table: LayerTable
    quantizable: list[str]
    space: BitSpace
    w_init: list[float]
    a_init: list[float]
    device: torch.device
    float_bits: torch.Tensor | None = None  # 32, the bits of a layer left in float: made once, on the device
    float_layers: list | None = None  # MAC-bearing rows left in float, with the reason (costs.float_layers)
    pretrained: dict | None = None  # the FP32 start as given ({"source", and for a file "path", "sha256"}); None:
                                    # hwsearch trains (and caches) the FP32 checkpoint

    def __post_init__(self) -> None:
        if self.float_bits is None:
            self.float_bits = torch.tensor(float(FLOAT_BITS), device=self.device)


def load_data(config: RunConfig, device: torch.device):
    """The configured dataset (and fixed subset) on ``device``, normalized with ``config.input_mean``/
    ``input_std`` when given (the statistics the user's weights were trained with).

    An ``imagefolder:`` set is held in memory or streamed from disk (``config.data_mode``; ``auto``
    chooses by its decoded size, and says which it chose); other sets are held in memory.

    Raises:
        ValueError: ``stream`` for a set that cannot stream; normalization that does not fit the images.
    """
    if config.dataset.startswith("imagefolder:"):
        from .data import imagefolder_root, list_imagefolder
        from .stream import StreamData, choose_mode

        path = config.dataset.split(":", 1)[1]
        listing = list_imagefolder(*imagefolder_root(path))  # once: every step below reads this one
        mode, why = choose_mode(path, config.data_mode, config.image_size, listing)
        if config.data_mode == "auto" and dist.is_main():
            log.info("data: %s mode (%s)", mode, why)
        if mode == "stream":
            if config.input_mean is not None:
                raise ValueError("input_mean/input_std: not yet for a streamed dataset; use --data-mode memory")
            return StreamData(path, device=device, image_size=config.image_size, flip=config.flip,
                              workers=config.loader_workers, max_train=config.max_train, max_test=config.max_test,
                              batch_size=config.batch_size, listing=listing)
        data = load_imagefolder(path, image_size=config.image_size, listing=listing)
    else:
        if config.data_mode == "stream":
            raise ValueError(f"--data-mode stream: {config.dataset!r} cannot stream (it is held in memory as "
                             f"tensors); only imagefolder:PATH sets are read from disk per batch")
        if config.image_size:
            raise ValueError(f"--image-size: applies to imagefolder:PATH sets, not {config.dataset!r}")
        data = load_dataset(config.dataset)
    if config.max_train or config.max_test:
        data = data.subset(config.max_train, config.max_test, seed=0)
    if not config.flip:
        data = replace(data, flip=False)
    if config.input_mean is not None:
        channels = data.input_shape[1]
        for name in ("input_mean", "input_std"):
            if len(getattr(config, name)) not in (1, channels):
                raise ValueError(f"{name}: {len(getattr(config, name))} values for {channels}-channel images "
                                 f"(give one, or one per channel)")
        data = replace(data, mean=config.input_mean, std=config.input_std)
    return data.to(device)


def build_model(config: RunConfig, data, model: nn.Module | None = None) -> tuple[nn.Module, dict | None]:
    """The run's FP32 model on the data's device: a copy of ``model`` when given (the user's object is never
    changed), else built by ``config.model``; then ``config.weights`` loaded into it when given.

    Returns:
        The model, and what the FP32 start is when it is used as given (``{"source": "object"}``, or the
        weights file's path and sha256), None when hwsearch is to train it.
    """
    # The initial weights belong to the FP32 checkpoint's recipe: drawn with its seed, so that runs of
    # several seeds from one --fp32-seed build the same model and share that checkpoint (its cache key
    # includes the initial weights).
    torch.manual_seed(config.checkpoint_seed)
    pretrained = None
    if model is not None:
        model = copy.deepcopy(model).float()
        pretrained = {"source": "object"}
    else:
        model = create_model(config.model, num_classes=data.num_classes or 10, in_channels=data.input_shape[1])
    if config.weights:
        from .weights import load_weights

        pretrained = {"source": "file", **load_weights(model, config.weights)}
    return model.to(data.device), pretrained


def prepare(config: RunConfig, *, model: nn.Module | None = None, data=None) -> Prepared:
    """Load data, build and profile the model, fix the bit space, and check that the budgets are
    attainable, all before any training.

    Args:
        model: the user's FP32 model, used as given (a copy; not retrained). Default: built by name.
        data: a source of batches (``TensorData`` or ``hwsearch.loaders.LoaderData``). Default: loaded
            by ``config.dataset``.

    Raises:
        InfeasibleBudget: a budget below the all-minimum cost (the message names the minimum).
        ValueError: weights that do not fit the model, data that cannot be read.
    """
    device = resolve_device(dist.setup(config.device))
    dist.local_batch(config.batch_size)  # a world size that does not divide the batch fails here, before any file
    if data is None:
        data = load_data(config, device)
    else:
        if config.input_mean is not None and not isinstance(data, TensorData):
            raise ValueError("input_mean/input_std: apply to datasets hwsearch loads by name; a Dataset or "
                             "DataLoader of your own prepares its inputs itself")
        data = data.to(device)
    model, pretrained = build_model(config, data, model)
    table = profile(model, data.input_shape)
    if config.sync_bn and dist.world_size() > 1:
        if device.type != "cuda":
            raise ValueError("--sync-bn: needs GPUs (torch's SyncBatchNorm runs on CUDA only)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    quantizable = quantizable_layers(table, model)
    left = float_layers(table, model)
    weighted = [i for i, layer in enumerate(table.layers) if layer.name in quantizable]
    ends = {weighted[0], weighted[-1]} if weighted and config.first_last_bits else set()
    n = len(table)
    free_w, free_a = [False] * n, [False] * n
    w_init, a_init = [float(FLOAT_BITS)] * n, [float(FLOAT_BITS)] * n
    start = float(config.fixed_bits or config.init_bits or config.b_max)
    for i, layer in enumerate(table.layers):
        if layer.name not in quantizable:
            continue
        if i in ends:
            w_init[i] = a_init[i] = float(config.first_last_bits)
        else:
            w_init[i] = start
            a_init[i] = float(config.act_bits) if config.act_bits else start
            free_w[i] = config.fixed_bits is None
            free_a[i] = config.fixed_bits is None and config.act_bits is None
    if weighted:
        a_init[weighted[0]] = float(config.input_bits)  # the image input
        free_a[weighted[0]] = False
    space = BitSpace(free_w, free_a, config.b_min, config.b_max)
    budgets = [(get_cost_model(k), v) for k, v in config.budgets.items()]
    for m, _ in budgets:
        m.check(table)
    if config.fixed_bits is None:
        if not any(free_w) and not any(free_a):
            log.info("no layer's bits are free to choose (quantized: %s; first/last fixed at %s bits): the plan is "
                     "those fixed bits", ", ".join(quantizable) or "none", config.first_last_bits)
        try:
            check_feasible(table, w_init, a_init, space, budgets)
        except InfeasibleBudget as exc:
            if not left:
                raise
            raise InfeasibleBudget(f"{exc}; {len(left)} layer(s) stay in float at 32 bits and count so: "
                                   f"{', '.join(r['name'] for r in left)} (`hwsearch cost` lists why)") from None
        if config.init_bits is None and budgets:
            # Start at the budget expressed as uniform bits: training begins at the budget's cost and
            # learning redistributes bits between layers instead of bringing them all down from b_max.
            b = budget_bits(table, w_init, a_init, space, budgets)
            w_init, a_init = space.fill(w_init, a_init, b)
    else:
        for m, b in budgets:
            c = m(table, w_init, a_init)
            if c > b:
                raise ValueError(f"budget {m.name}={b:.4g}: fixed {config.fixed_bits}-bit plan costs {c:.4g} {m.unit}")
    return Prepared(config, data, model, table, quantizable, space, w_init, a_init, device, pretrained=pretrained,
                    float_layers=left)


def _bit_vectors(prep: Prepared, layers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (continuous) bits as two tensors aligned with the table; layers that are not
    quantized count 32 bits (``prep.float_bits``, made once with ``prep``: not per step, and not on a
    compiled step's first call, which would compile it twice)."""
    w, a = [], []
    for layer in prep.table.layers:
        mod = layers.get(layer.name)
        if mod is None:
            w.append(prep.float_bits)
            a.append(prep.float_bits)
        else:
            w.append(mod.w_beta)
            a.append(mod.a_beta if mod.quantize_input else mod.a_beta.detach())
    return stack_scalars(w), stack_scalars(a)


def set_bits(layers: dict, table: LayerTable, w: list[float], a: list[float], *, freeze: bool,
             space: BitSpace | None = None) -> None:
    """Write bits into the quantized modules; learned ones keep a gradient unless ``freeze``."""
    with torch.no_grad():
        for i, layer in enumerate(table.layers):
            mod = layers.get(layer.name)
            if mod is None:
                continue
            mod.w_beta.fill_(w[i])
            mod.a_beta.fill_(a[i])
            mod.w_beta.requires_grad_(not freeze and space is not None and space.free_w[i])
            mod.a_beta.requires_grad_(not freeze and space is not None and space.free_a[i])


def quantize_prepared(prep: Prepared, w: list[float], a: list[float], *, freeze: bool) -> dict:
    """Swap the prepared model's quantizable layers for quantized ones at bits ``w``/``a`` (per table row)."""
    names = prep.table.names
    weighted = [n for n in names if n in prep.quantizable]
    quantize_model(prep.model, prep.quantizable, quantizer=prep.config.quantizer,
                   w_bits={n: w[names.index(n)] for n in prep.quantizable},
                   a_bits={n: a[names.index(n)] for n in prep.quantizable},
                   first_layer=weighted[0] if weighted else None)
    layers = quant_layers(prep.model)
    set_bits(layers, prep.table, w, a, freeze=freeze, space=prep.space)
    return layers


def calibrate(model: nn.Module, data, batch_size: int) -> None:
    """One forward pass on the first training batch fixes every PACT clip's start and sign."""
    x = data.calibration_batch(batch_size)
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)


def measure_omega(prep: Prepared, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Measure every quantizable layer's loss increase at every bitwidth on the float model
    (``hwsearch.hessian.measured_sensitivity``) and lay it out for ``learn_bits``: (weights, inputs)
    tensors of [table rows, b_max − b_min + 1], zero where a bit does not learn. Returns the tensors
    and the ``Sensitivity``."""
    from .hessian import measured_sensitivity

    cfg, space = prep.config, prep.space
    bits = tuple(range(cfg.b_min, cfg.b_max + 1))
    sens = measured_sensitivity(prep.model, prep.quantizable, batches, quantizer=cfg.quantizer, bits=bits,
                                loss_fn=prep.data.loss_fn)
    rows_w, rows_a = [], []
    for i, name in enumerate(prep.table.names):
        for rows, table, free in ((rows_w, sens.weight, space.free_w[i]), (rows_a, sens.act, space.free_a[i])):
            rows.append([table[name][b] if free and name in table else 0.0 for b in bits])
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float32, device=prep.device)  # noqa: E731
    return (as_tensor(rows_w), as_tensor(rows_a)), sens


def learn_bits(prep: Prepared, layers: dict, *, epochs: int, progress: bool = False,
               history: list[dict] | None = None,
               omega: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list[int], list[int]]:
    """The SINAREQ phase: train ``prep.model`` (already quantized, ``layers``) for ``epochs`` with
    task loss + λ_w·Σ R_l + λ_b·bit pressure + λ_c·budget term (+ λ_s·Σ Ω_l(β_l) with ``omega``)
    while the bitwidths learn; after every step clamp them to [b_min, b_max] and project them onto
    the budgets; at ``freeze_at`` round them with the hard guarantee and freeze them (the rest
    fine-tunes at fixed bits).

    ``omega``: (weights, inputs), each [table rows, b_max − b_min + 1], the measured loss increase of
    each layer at each integer bitwidth (zero rows for bits that do not learn); see ``measure_omega``.

    Returns:
        The integer weight and activation bits per table row: the plan.
    """
    cfg, table, space = prep.config, prep.table, prep.space
    history = [] if history is None else history
    budgets = [(get_cost_model(k), v) for k, v in cfg.budgets.items()]
    pressure_model = get_cost_model(cfg.cost_model)
    learn_w = torch.tensor(space.free_w, device=prep.device, dtype=torch.float32)
    learn_a = torch.tensor(space.free_a, device=prep.device, dtype=torch.float32)
    free_masks = (learn_w.bool(), learn_a.bool())  # made once: the projection runs every step
    # Curves show the average over quantized layers (first/last included).
    shown = torch.tensor([n in layers for n in table.names], device=prep.device, dtype=torch.float32)
    shown = shown / shown.sum().clamp_min(1.0)  # weights of the average
    if cfg.tie_bits:
        # One learned bitwidth per layer for its weights and its input: the input quantizer uses the
        # weights' β (the same parameter, so its gradient is the sum of both uses). The plan is trained
        # on a fresh model (run.train_plan), so the tie ends with this phase.
        for i, n in enumerate(table.names):
            if space.free_w[i] and space.free_a[i] and (m := layers.get(n)) is not None:
                m.a_beta = m.w_beta
    # Each parameter once (tied layers share one β).
    quant_params = list({id(p): p for m in layers.values()
                         for p in (m.w_beta, m.w_scale, m.a_beta, m.a_alpha)}.values())
    # The learned bitwidths (one 0-d parameter per layer and kind), for in-place clamps and shifts.
    free_betas = [m.w_beta for i, n in enumerate(table.names) if space.free_w[i] and (m := layers.get(n))] + \
                 [m.a_beta for i, n in enumerate(table.names) if space.free_a[i] and (m := layers.get(n))]
    free_betas = list({id(p): p for p in free_betas}.values())
    for m in layers.values():
        m.reg_enabled = cfg.lambda_w > 0
    state: dict = {"frozen": False, "bits": None}
    primary = budgets[0] if budgets else None

    def bit_terms(frozen: bool):
        """The logged bit values and, until the freeze, the learned bits' loss terms (bit pressure, and
        the budget term when there are budgets; None otherwise): one graph per value of ``frozen``."""
        w, a = _bit_vectors(prep, layers)
        w64, a64 = w.double(), a.double()
        logs = {"avg_w_bits": w.detach() @ shown, "avg_a_bits": a.detach() @ shown}
        if primary:
            # The cost of the grid being trained: round(β) (the plan a freeze now would give, before projection).
            logs["cost_ratio"] = (primary[0].torch(table, w64.detach().round(), a64.detach().round()) / primary[1]).float()
        if frozen:  # the last steps train at fixed bits: no bit terms to compute
            return None, None, None, logs
        pressure = bit_pressure(table, w64, a64, pressure_model, learn_w.double(), learn_a.double()).float()
        over = budget_penalty(table, w64, a64, budgets).float() if budgets else None
        acc = None
        if omega is not None:
            acc = accuracy_cost(w, omega[0], cfg.b_min) + accuracy_cost(a, omega[1], cfg.b_min)
            logs["accuracy_cost"] = acc.detach()
        return pressure, over, acc, logs

    def project():
        """Clamp the learned bits to [b_min, b_max] and lower them onto the budgets (in place), until the freeze."""
        if state["frozen"]:
            return
        with torch.no_grad():
            torch._foreach_clamp_min_(free_betas, float(cfg.b_min))
            torch._foreach_clamp_max_(free_betas, float(cfg.b_max))
            if budgets:
                # Projection onto the budgets: lower every learned bit by the smallest common shift that
                # brings the grid being trained (round(β)) within every budget. Without it the task
                # loss lifts β above the budget, the network trains on more bits than it may keep, and
                # the freeze takes them away from every layer at once.
                w, a = _bit_vectors(prep, layers)
                t = budget_shift(table, w, a, *free_masks, budgets, cfg.b_min, cfg.b_max)
                torch._foreach_add_(free_betas, t.float(), alpha=-1.0)
                torch._foreach_clamp_min_(free_betas, float(cfg.b_min))

    def loss(step: int, total: int):
        s = strength(step, total, start=cfg.reg_start, width=cfg.reg_width)
        regs = take_penalties(layers)
        reg = stack_scalars(regs).sum() if regs else torch.zeros((), device=prep.device)
        extra = cfg.lambda_w * s * reg
        pressure, over, acc, bit_logs = bit_terms(state["frozen"])
        logs = {"regularizer": reg.detach(), **bit_logs}
        if pressure is not None:
            extra = extra + cfg.lambda_b * s * pressure
        if over is not None:
            extra = extra + cfg.lambda_c * s * over
        if acc is not None:
            extra = extra + cfg.lambda_s * s * acc
        return extra, logs

    def freeze() -> None:
        w, a = _bit_vectors(prep, layers)
        wi, ai = project_to_budgets(table, w.tolist(), a.tolist(), space, budgets)
        set_bits(layers, table, [float(b) for b in wi], [float(b) for b in ai], freeze=True)
        state["frozen"], state["bits"] = True, (wi, ai)

    def after_step(step: int, total: int):
        if not state["frozen"] and free_betas and step + 1 >= int(cfg.freeze_at * total):
            freeze()

    fit(prep.model, prep.data, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        quant_params=quant_params, lr_quant=cfg.lr_quant, progress=progress,
        hook=StepHook(loss, after_step, project if free_betas else None),
        desc="sinareq", history=history, compile=cfg.compile,
        shared_norm=free_betas if cfg.beta_update == "shared" else ())
    if state["bits"] is None:  # training ended before the freeze point
        freeze()
    return state["bits"]

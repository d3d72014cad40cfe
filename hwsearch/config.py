"""Frozen, validated configuration of a SINAREQ run (one dataclass, a comment per field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cost_models import get_cost_model

__all__ = ["ALLOCATORS", "RunConfig", "default_epochs"]

ALLOCATORS = ("sinareq", "hessian", "measured")


def default_epochs(dataset: str) -> int:
    """Epochs of training a plan when none are given: 30 on the digits (1,437 small images: an epoch
    takes about a second), 10 otherwise."""
    return 30 if dataset == "digits" else 10


@dataclass(frozen=True)
class RunConfig:
    model: str = "resnet20"            # registered, torchvision, or package.module:factory (with a model
                                       # object: the name plans record)
    dataset: str = "digits"            # digits | cifar10 | svhn | imagefolder:PATH (with data objects: the name recorded)
    data_mode: str = "auto"            # imagefolder: memory (decoded once, held on the device) | stream (decoded per
                                       # batch by loader workers) | auto (memory while it fits under the limit)
    image_size: int | None = None      # imagefolder: side of the square input (None: the images' own size)
    flip: bool = True                  # random horizontal flips in training (off for digits and text)
    loader_workers: int | None = None  # stream mode: DataLoader worker processes (None: cores - 1, at least 1)
    sync_bn: bool = False              # under torchrun on GPUs: batch-norm statistics over the global batch
    weights: str | None = None         # FP32 weights file (a state_dict) used as given: no FP32 training
    input_mean: tuple[float, ...] | None = None  # input normalization (x/255 - mean)/std per channel; None: the
    input_std: tuple[float, ...] | None = None   # dataset's own statistics; (0,) and (1,): pixels in [0, 1]
    budgets: dict[str, float] = field(default_factory=dict)  # cost model name -> hard cap (e.g. {"bitops": 5e8})
    cost_model: str = "bitops"         # the cost behind bit pressure (and the search's cost objective)
    quantizer: str = "dorefa"          # weight quantizer: dorefa | wrpn
    fixed_bits: int | None = None      # fixed-bit mode: every free layer at these bits, no bit learning
    act_bits: int | None = None        # fixed activation bits; None: learned (or fixed_bits in fixed mode)
    b_min: int = 2                     # lowest learnable bits
    b_max: int = 8                     # highest learnable bits
    init_bits: float | None = None     # starting continuous bitwidth; None: the budget as uniform bits (b_max without one)
    first_last_bits: int = 8           # first and last weight layers fixed here (0: learn them too)
    input_bits: int = 8                # bits of the image input to the first layer
    fp32_epochs: int = 30              # epochs of the cached FP32 checkpoint
    allocator: str = "sinareq"         # who chooses the plan: sinareq (learned bits) | hessian (HAWQ-style ILP)
                                       # | measured (the same ILP on each layer's measured loss increase)
    search_epochs: int | None = None   # epochs of the bit-learning phase (None: same as epochs)
    hessian_batches: int = 2           # hessian allocator: training batches the Hessian traces average over
    hessian_samples: int = 8           # hessian allocator: Hutchinson samples (Hessian-vector products) per batch
    measured_batches: int = 8          # measured allocator: training batches each layer's loss increase is taken on
    measured_qat_epochs: int = 0       # measured allocator: 0 measures on the FP32 checkpoint; N > 0 first trains
                                       # N epochs at the uniform bits the budget affords and measures there
    epochs: int | None = None          # epochs of training the plan at fixed bits (as a uniform baseline gets);
                                       # None: 30 on digits (small, quick epochs), 10 otherwise (the CLI's default too)
    plan_lambda_w: float = 0.0         # regularizer strength while training a chosen plan (0: plain QAT, as uniform)
    freeze_at: float = 0.8             # fraction of steps after which bits are rounded and frozen
    reg_start: float = 0.2             # schedule: strengths switch on around this fraction of steps
    reg_width: float = 0.05            # schedule: width of the tanh switch, as a fraction of steps
    lambda_w: float = 1.0              # SINAREQ regularizer strength while bits learn (and in fixed-bit mode)
    lambda_b: float = 0.05             # bit-pressure strength
    lambda_c: float = 2.0              # budget-term strength
    lambda_s: float = 0.0              # SINAREQ: strength of the measured accuracy cost of the learned bits
                                       # (Σ_l Ω_l(β_l), each layer's measured loss increase; 0: off)
    lr: float = 0.02                   # SGD max learning rate for weights when fine-tuning quantized
    lr_fp32: float = 0.1               # SGD max learning rate of FP32 pre-training
    lr_quant: float = 0.02             # Adam learning rate for bitwidths, scales and clips
    beta_update: str = "adam"          # learned bits: adam (each β its own scale) | shared (one scale for all β)
    tie_bits: bool = False             # one bitwidth per layer for its weights and its input (every allocator)
    batch_size: int = 128
    seed: int = 0                      # seed of the quantized training (data order, initial state)
    fp32_seed: int | None = None       # seed of the FP32 checkpoint (None: seed); fixing it compares seeds from one start
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    max_train: int | None = None       # use a fixed random subset of the training set
    max_test: int | None = None        # use a fixed random subset of the test set
    compile: bool = False              # torch.compile the training forward (fuses fake-quant kernels on GPU)

    def __post_init__(self) -> None:
        for name, hint in (("model", "to quantize a model object, call hwsearch.quantize(model, train, test, ...)"),
                           ("dataset", "to use a Dataset or DataLoader, call hwsearch.quantize(model, train, test, ...)")):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: RunConfig takes a name, got a {type(getattr(self, name)).__name__}; {hint}")
        if self.epochs is None:
            object.__setattr__(self, "epochs", default_epochs(self.dataset))
        for name in ("input_mean", "input_std"):  # lists from config.json become tuples
            v = getattr(self, name)
            if v is not None:
                try:
                    object.__setattr__(self, name, tuple(float(x) for x in v))
                except (TypeError, ValueError):
                    raise ValueError(f"{name}: expected numbers, one per channel, got {v!r}") from None
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("input_mean/input_std: give both, or neither (the dataset's own statistics)")
        if self.input_mean is not None:
            if not self.input_mean or len(self.input_mean) != len(self.input_std):
                raise ValueError(f"input_mean/input_std: need one value per channel in each, got "
                                 f"{len(self.input_mean)} and {len(self.input_std)}")
            if not all(s > 0 for s in self.input_std):
                raise ValueError(f"input_std: every value must be > 0, got {self.input_std}")
        if self.data_mode not in ("auto", "memory", "stream"):
            raise ValueError(f"data_mode: expected auto, memory or stream, got {self.data_mode!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size: must be at least 8 pixels, got {self.image_size}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"loader_workers: must be >= 0, got {self.loader_workers}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator: expected one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")
        if self.beta_update not in ("adam", "shared"):
            raise ValueError(f"beta_update: expected 'adam' or 'shared', got {self.beta_update!r}")
        if self.quantizer not in ("dorefa", "wrpn"):
            raise ValueError(f"quantizer: expected 'dorefa' or 'wrpn', got {self.quantizer!r}")
        lowest = 2 if self.quantizer == "wrpn" else 1
        if not lowest <= self.b_min <= self.b_max <= 16:
            raise ValueError(f"b_min/b_max: need {lowest} <= b_min <= b_max <= 16, got {self.b_min}, {self.b_max}")
        for name in ("fixed_bits", "act_bits"):
            v = getattr(self, name)
            if v is not None and not lowest <= v <= 16:
                raise ValueError(f"{name}: must be within {lowest}..16, got {v}")
        if not (self.first_last_bits == 0 or lowest <= self.first_last_bits <= 32):
            raise ValueError(f"first_last_bits: must be 0 or within {lowest}..32, got {self.first_last_bits}")
        for name in ("fp32_epochs", "epochs", "batch_size", "search_epochs", "hessian_batches",
                     "hessian_samples", "measured_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.measured_qat_epochs < 0:
            raise ValueError(f"measured_qat_epochs: must be >= 0, got {self.measured_qat_epochs}")
        for name in ("freeze_at", "reg_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be within [0, 1], got {getattr(self, name)}")
        for name in ("lambda_w", "lambda_b", "lambda_c", "lambda_s", "plan_lambda_w"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "lr_fp32", "lr_quant"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.init_bits is not None and not self.b_min <= self.init_bits <= self.b_max:
            raise ValueError(f"init_bits: must be within b_min..b_max ({self.b_min}..{self.b_max}), got {self.init_bits}")
        for name, value in self.budgets.items():
            get_cost_model(name)  # raises for unknown names
            if not value > 0:
                raise ValueError(f"budgets[{name}]: must be > 0, got {value}")
        get_cost_model(self.cost_model)

    @property
    def checkpoint_seed(self) -> int:
        """The seed the FP32 checkpoint is trained (and cached) with."""
        return self.seed if self.fp32_seed is None else self.fp32_seed

    @property
    def learning_epochs(self) -> int:
        """Epochs of the allocation phase of a learned run."""
        return self.search_epochs or self.epochs

    @property
    def training_lambda_w(self) -> float:
        """Regularizer strength while the plan trains at fixed bits: ``lambda_w`` in fixed-bit mode
        (the regularizer enhancing uniform QAT), ``plan_lambda_w`` for a plan an allocator chose."""
        return self.lambda_w if self.fixed_bits is not None else self.plan_lambda_w

    def to_dict(self) -> dict:
        return asdict(self)

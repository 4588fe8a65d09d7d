"""``SlicingConfig``: every option of the algorithm once, validated, stored in the checkpoint.

Modelled on PEFT's ``LoraConfig``: a dataclass whose fields carry ``help`` metadata, checked in
``__post_init__``, with ``to_dict`` / ``from_dict`` so the sliced ``config.json`` and the report record exactly
what produced the weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import SliceGPTError

ROTATIONS = ("layer", "global")
SCHEDULES = ("const", "variance")
MID_BASES = ("auto", "own", "shared")
TIED_MODES = ("auto", "project", "slice", "untie")
COVARIANCE_PRECISIONS = ("mixed", "float64")
CORRECTIONS = ("none", "ridge")
CORRECTION_BASES = ("sliced", "dense")
# With correction_fraction=None the correction fits on about this many calibration tokens, and a cost that stops
# growing with the calibration set beyond (fitting costs ~2 block forwards per fitted token). The fit wants many
# tokens per feature (an MLP update of SmolLM2 has 1,968 after slicing): SmolLM2 at 25%, 128 x 512, went from
# 1.333x to 1.235x dense in domain (licences 7.8x -> 5.8x) when 65,536 tokens were fitted instead of 16,384.
CORRECTION_TOKENS = 65536


class SlicingError(SliceGPTError):
    """Bad input to :func:`hf_slicegpt.slice_model`."""


def validate_sparsity(sparsity: Any) -> float:
    """Return ``sparsity`` as a float in ``[0, 1)``, or raise naming the value and the fix."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise SlicingError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if sparsity == 1:
        raise SlicingError(
            f"sparsity={sparsity!r} would remove the whole hidden dimension; it must be in [0, 1) "
            "(the fraction of the hidden size removed), e.g. 0.25"
        )
    if 1 < sparsity <= 100:
        raise SlicingError(
            f"sparsity={sparsity!r} looks like a percentage; pass the fraction of the hidden size to remove, "
            f"e.g. {sparsity / 100:g} for {sparsity:g}%"
        )
    if not 0 <= sparsity < 1:
        raise SlicingError(
            f"sparsity must be in [0, 1) (the fraction of the hidden size removed), got {sparsity!r}"
        )
    return float(sparsity) + 0.0  # + 0.0: -0.0 becomes 0.0


def sliced_width(hidden_size: int, sparsity: float, round_to: int) -> int:
    """``hidden_size * (1 - sparsity)`` rounded down to a multiple of ``round_to`` (never below it)."""
    if sparsity == 0:
        return hidden_size
    # Rounded to 9 decimals first: 1 - 0.8 is 0.19999999999999996 in floating point, and without it a hidden
    # size of 2560 at 80% would keep 504 instead of 512 (found by tests/test_properties.py).
    width = int(math.floor(round(hidden_size * (1 - sparsity) / round_to, 9))) * round_to
    return max(min(width, hidden_size), min(round_to, hidden_size))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SlicingError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


@dataclass
class SlicingConfig:
    """How to slice a model. The run-time options (device, offload, resume) are arguments of ``slice_model``.

    Example:

    ```python
    >>> from hf_slicegpt import SlicingConfig
    >>> config = SlicingConfig(sparsity=0.25, rotation="global")
    >>> SlicingConfig.from_dict(config.to_dict()) == config
    True
    ```
    """

    sparsity: float = field(metadata={"help": "fraction of the hidden size removed, in [0, 1)"})
    round_to: int = field(default=8, metadata={"help": "every sliced width is a multiple of this"})
    rotation: str = field(
        default="layer",
        metadata={
            "help": "'layer': a basis per signal through the already-sliced layers (the paper); 'global': one "
            "basis for the whole stream, no shortcut matrices, exportable to the family's architecture"
        },
    )
    schedule: str = field(
        default="const",
        metadata={
            "help": "'const': one width everywhere; 'variance': per-signal widths explaining a common "
            "variance fraction, within the const schedule's parameter budget"
        },
    )
    mid_basis: str = field(
        default="auto",
        metadata={
            "help": "MLP-input basis of sequential blocks: 'own' (the paper), 'shared' with the block input "
            "(one shortcut fewer), 'auto' (shared only where a second shortcut would grow the block and the "
            "shared basis holds the attention output)"
        },
    )
    tied_embeddings: str = field(
        default="auto",
        metadata={
            "help": "tied vocabulary matrix: 'project' (full width + small projections, exact), 'slice' "
            "(sliced once; RMSNorm families), 'untie' (the reference's layout); 'auto' is 'slice' for global "
            "rotation and 'project' otherwise"
        },
    )
    vocab_prior: float = field(
        default=0.0,
        metadata={"help": "weight of the vocabulary's own statistics in the first basis (0: none)"},
    )
    slice_head: bool = field(default=True, metadata={"help": "also slice the head's input width"})
    covariance_precision: str = field(
        default="mixed",
        metadata={
            "help": "'mixed': float32 products of row chunks summed in float64 (same model, ~2x faster on "
            "CPU); 'float64': the paper's recipe"
        },
    )
    shared_mid_tolerance: float = field(
        default=2.0,
        metadata={
            "help": "mid_basis='auto' keeps a planned shared basis only if it loses at most this many times "
            "the attention-output energy that the block's own basis of the same width would"
        },
    )
    correction: str = field(
        default="ridge",
        metadata={
            "help": "'ridge': after each residual update is sliced, refit its writers (and with "
            "correction_shortcuts its shortcut) to the dense model's output (closed-form ridge least squares, "
            "strength chosen on held-out calibration sequences); 'none': the paper's weights"
        },
    )
    correction_fraction: float | None = field(
        default=None,
        metadata={
            "help": "share of the calibration batches the correction fits on (every 1/f-th batch); the dense "
            "stream and the normal equations cost that share of a dense forward. None: every batch up to "
            "CORRECTION_TOKENS calibration tokens, then every k-th batch so that about that many are fitted"
        },
    )
    correction_shortcuts: bool = field(
        default=False,
        metadata={
            "help": "with a correction, also refit the per-layer shortcut matrices (False: only the writers; the "
            "shortcuts stay the plain rotations). On SmolLM2 at 25% refitting them extrapolated badly to text "
            "unlike the calibration (aligned tables: +0.6 nats on some windows), while writers alone were never "
            "worse than plain"
        },
    )
    correction_basis: str = field(
        default="sliced",
        metadata={
            "help": "with a correction, what each basis is the PCA of: 'sliced', the sliced model's output "
            "(the paper); 'dense', the dense model's output that the correction fits (on the fitted batches; "
            "measured worse on SmolLM2 at 25%, kept for experiments)"
        },
    )

    def __post_init__(self) -> None:
        self.sparsity = validate_sparsity(self.sparsity)
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise SlicingError(f"round_to must be a positive integer, got {self.round_to!r}")
        _choice("rotation", self.rotation, ROTATIONS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("mid_basis", self.mid_basis, MID_BASES)
        _choice("tied_embeddings", self.tied_embeddings, TIED_MODES)
        _choice("covariance_precision", self.covariance_precision, COVARIANCE_PRECISIONS)
        prior = self.vocab_prior
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0 <= prior < math.inf:
            raise SlicingError(f"vocab_prior must be a non-negative number, got {prior!r}")
        self.vocab_prior = float(prior)
        if not isinstance(self.slice_head, bool):
            raise SlicingError(f"slice_head must be True or False, got {self.slice_head!r}")
        if self.rotation == "global" and self.schedule != "const":
            raise SlicingError("rotation='global' uses one width everywhere; use schedule='const' with it")
        if self.rotation == "global" and not self.slice_head:
            raise SlicingError("rotation='global' slices the head with the same basis; drop slice_head=False")
        _choice("correction", self.correction, CORRECTIONS)
        _choice("correction_basis", self.correction_basis, CORRECTION_BASES)
        if not isinstance(self.correction_shortcuts, bool):
            raise SlicingError(
                f"correction_shortcuts must be True or False, got {self.correction_shortcuts!r}"
            )
        fraction = self.correction_fraction
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise SlicingError(
                    f"correction_fraction must be in (0, 1] or None (automatic), got {fraction!r}; e.g. 0.25"
                )
            self.correction_fraction = float(fraction)
        # Settings of a correction that does not run would be recorded as if they had been used.
        if self.correction == "none":
            settings = {
                "correction_shortcuts": self.correction_shortcuts,
                "correction_fraction": fraction is not None,
                "correction_basis": self.correction_basis != "sliced",
            }
            unused = [name for name, is_set in settings.items() if is_set]
            if unused:
                raise SlicingError(
                    f"{', '.join(unused)} set with correction='none', which runs no correction; drop "
                    f"{'them' if len(unused) > 1 else 'it'}, or use correction='ridge' (--correction ridge)"
                )
        tolerance = self.shared_mid_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise SlicingError(f"shared_mid_tolerance must be a non-negative number, got {tolerance!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlicingConfig:
        """The config recorded in a checkpoint (``config.slicing``, whose ``"config"`` entry is the config as
        requested), or a plain ``to_dict``. Unknown keys, such as the family or calibration size, are ignored;
        a ``tied_embeddings`` of ``None`` (an untied model, in checkpoints older than the entry) reads as
        ``"auto"``."""
        if isinstance(data.get("config"), dict):
            data = data["config"]
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**values)


__all__ = [
    "SlicingConfig",
    "SlicingError",
    "sliced_width",
    "validate_sparsity",
]

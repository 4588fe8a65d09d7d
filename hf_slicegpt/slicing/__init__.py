"""The SliceGPT algorithm: no disk formats, no text sources.

- :mod:`.config`: :class:`SlicingConfig`, every option once;
- :mod:`.calibration`: the calibration batches;
- :mod:`.plan`: widths per signal and the parameter budget;
- :mod:`.pca`, :mod:`.statistics`: covariance sums and eigenbases;
- :mod:`.rotate`: norm folding, centring, rotating and slicing weights, shortcuts;
- :mod:`.signals`: the calibration signals through a block;
- :mod:`.source`: where dense blocks come from (in memory, or streamed);
- :mod:`.loop`: the layer loop; :mod:`.state`: its resumable state;
- :mod:`.assemble`: the :class:`~hf_slicegpt.SlicedModelForCausalLM` from the rotated parts;
- :mod:`.api`: :func:`slice_model`.
"""

from .api import slice_model
from .calibration import CalibrationBatch, calibration_batches
from .config import SlicingConfig, SlicingError, sliced_width, validate_sparsity
from .context import SignalStats, SlicingHooks
from .pca import Covariance, eigenbasis
from .plan import WidthPlan
from .source import InMemoryLayers, LayerSource, SlicedBlock

__all__ = [
    "CalibrationBatch",
    "Covariance",
    "InMemoryLayers",
    "LayerSource",
    "SignalStats",
    "SlicedBlock",
    "SlicingConfig",
    "SlicingError",
    "SlicingHooks",
    "WidthPlan",
    "calibration_batches",
    "eigenbasis",
    "slice_model",
    "sliced_width",
    "validate_sparsity",
]

"""The names hf-slicegpt writes into checkpoints, in one place (stdlib only: ``io`` imports it in tests that
load it without the package)."""

from __future__ import annotations

REPORT_NAME = "slicing_report.json"
# Written by recovery fine-tuning beside its adapter or merged model (hf_slicegpt.workflows.rft).
RFT_REPORT_NAME = "rft_report.json"
# model_type of a sliced checkpoint (hf_slicegpt.modeling.configuration_sliced.SlicedConfig.model_type).
SLICED_MODEL_TYPE = "slicegpt"
# Written into config.json by the native export, so that hf-slicegpt recognises its own output.
NATIVE_EXPORT_KEY = "hf_slicegpt_export"

__all__ = ["NATIVE_EXPORT_KEY", "REPORT_NAME", "RFT_REPORT_NAME", "SLICED_MODEL_TYPE"]

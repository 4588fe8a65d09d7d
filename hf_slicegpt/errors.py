"""The one base class of every error hf-slicegpt raises for bad input.

``SliceGPTError`` subclasses ``ValueError``, so ``except ValueError`` keeps working, and ``except SliceGPTError``
catches every refusal of this package (the CLI turns it into a one-line message). The remote-code files in
``modeling/`` import only torch and transformers, so their ``SlicedCheckpointError`` is a plain ``ValueError``.
"""

from __future__ import annotations


class SliceGPTError(ValueError):
    """Bad input to hf-slicegpt: the message names the bad value and the fix."""


__all__ = ["SliceGPTError"]

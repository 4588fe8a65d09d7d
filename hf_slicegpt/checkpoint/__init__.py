"""The sliced checkpoint on disk: atomic writes (io), validation, the slicing report, native export, and the
Hub (model card and push)."""

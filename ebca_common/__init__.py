"""ebca_common."""

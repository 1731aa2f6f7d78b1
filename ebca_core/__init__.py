"""ebca_core."""

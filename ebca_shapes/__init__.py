"""ebca_shapes."""

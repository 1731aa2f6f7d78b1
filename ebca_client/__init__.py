"""ebca_client."""

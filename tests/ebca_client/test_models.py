"""Client models accept what the server stores."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ebca_client.models import ImageRef


def test_image_ref_to_an_uploaded_input_round_trips() -> None:
    ref = ImageRef.model_validate({"job_id": "abc", "index": 0, "input": "mask"})
    assert ref.input == "mask"
    assert ref.to_json() == {"job_id": "abc", "index": 0, "input": "mask"}
    assert ImageRef(job_id="abc", index=2).to_json() == {"job_id": "abc", "index": 2}
    with pytest.raises(ValidationError):
        ImageRef.model_validate({"job_id": "abc", "input": "thumbnail"})

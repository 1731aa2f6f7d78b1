"""The API keys every test uses (tests/ is on sys.path: ``from testkeys import TestKeys``)."""

from __future__ import annotations

import json

from ebca_common.keys import hash_key, key_id


class TestKeys:
    """The API keys of the tests: two user keys with the service's default limits and an admin key.
    Their digests are what ``store_settings`` configures (EBCA_API_KEYS); the integration stacks use
    the same keys."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    alice = "ebca_test-alice-" + "a" * 32
    bob = "ebca_test-bob-" + "b" * 34
    root = "ebca_test-root-" + "r" * 33

    @staticmethod
    def header(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @staticmethod
    def id_of(key: str) -> str:
        return key_id(hash_key(key))

    @classmethod
    def entries_json(cls) -> str:
        return json.dumps(
            [
                {"name": "alice", "role": "user", "hash": hash_key(cls.alice)},
                {"name": "bob", "role": "user", "hash": hash_key(cls.bob)},
                {"name": "root", "role": "admin", "hash": hash_key(cls.root)},
            ]
        )

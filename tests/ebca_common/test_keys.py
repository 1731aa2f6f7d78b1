"""API key entries: the JSON of EBCA_API_KEYS and the keys file, digests, ids and limits."""

from __future__ import annotations

import json

import pytest

from ebca_common.keys import (
    UNLIMITED,
    ApiKeyEntry,
    Caller,
    KeyConfigError,
    KeyLimits,
    Limits,
    dump_entries,
    hash_key,
    key_id,
    new_key,
    parse_entries,
)

DEFAULTS = Limits(rate_per_minute=60.0, burst=30, max_active_jobs=32, max_images_per_day=5000)


def test_new_keys_are_random_and_only_their_digest_is_kept() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    key = keys.pop()
    assert key.startswith("ebca_") and len(key) == 5 + 43  # 32 random bytes, URL-safe base64
    digest = hash_key(key)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64 and key not in digest
    assert key_id(digest) == "key_" + digest[7:23]


def test_entries_round_trip_through_their_json() -> None:
    entries = [
        ApiKeyEntry(name="alice", hash=hash_key("a"), limits=KeyLimits(rate_per_minute=5, burst=None)),
        ApiKeyEntry(name="root", role="admin", hash=hash_key("r")),
    ]
    for text in (dump_entries(entries), dump_entries(entries, compact=True)):
        again = parse_entries(text, "X")
        assert again == entries
        # Only the limits an entry sets are written: the rest keep following the service defaults.
        assert again[0].limits.model_fields_set == {"rate_per_minute", "burst"}
    assert "\n" not in dump_entries(entries, compact=True)


def test_limits_left_out_follow_the_defaults_and_null_means_none() -> None:
    overrides = KeyLimits.model_validate({"burst": 5, "max_images_per_day": None})
    limits = Limits.resolve(overrides, DEFAULTS)
    assert limits == Limits(rate_per_minute=60.0, burst=5, max_active_jobs=32, max_images_per_day=None)
    assert Limits.resolve(KeyLimits(), DEFAULTS) == DEFAULTS


H = hash_key("k")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "X: Input should be a valid array"),
        ([{"name": "a", "hash": "sha256:00"}], "X: 0.hash: Value error, must be 'sha256:'"),
        ([{"name": "a", "hash": H, "role": "root"}], "X: 0.role"),
        ([{"name": " ", "hash": H}], "X: 0.name: Value error, must be printable"),
        ([{"name": "a", "hash": H, "key": "k"}], "X: 0.key: Extra inputs"),
        ([{"name": "a", "hash": H, "limits": {"burst": 0}}], "X: 0.limits.burst"),
        ("[{", "X: Invalid JSON"),
    ],
)
def test_a_bad_key_list_says_where_and_why(entry: object, message: str) -> None:
    text = entry if isinstance(entry, str) else json.dumps(entry)
    with pytest.raises(KeyConfigError) as info:
        parse_entries(text, "X")
    assert str(info.value).startswith(message), str(info.value)


def test_a_key_listed_twice_is_refused() -> None:
    entry = {"name": "a", "hash": hash_key("k")}
    with pytest.raises(KeyConfigError, match="listed twice"):
        parse_entries(json.dumps([entry, {**entry, "name": "b"}]), "X")


def test_who_sees_which_job() -> None:
    alice = Caller(id="key_a", name="alice", role="user", limits=DEFAULTS)
    root = Caller(id="key_r", name="root", role="admin", limits=UNLIMITED)
    assert alice.may_see("key_a") and not alice.may_see("key_b") and not alice.may_see(None)
    assert root.may_see("key_a") and root.may_see(None)
    # With auth off the one caller owns "anonymous"; records from before owners existed count as its.
    open_caller = Caller(id=None, name="anonymous", role="user", limits=UNLIMITED)
    assert open_caller.owner == "anonymous" and open_caller.may_see(None) and not open_caller.may_see("key_a")

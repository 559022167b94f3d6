"""Follow-ups from a new user's trial of opening: file_mode on an existing store, the modes allowed,
renew_epoch's arguments and hints, and the max_map_size message."""

from __future__ import annotations

import os
import stat

import pytest

import syncstore
from syncstore import InvalidArgument, Message, StoreLocked


def _modes(path: str) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(root, name)
            out[os.path.relpath(entry, path)] = stat.S_IMODE(os.stat(entry).st_mode)
    return out


def test_file_mode_on_an_existing_store_applies_to_every_file(store_path):
    with syncstore.open(store_path) as store:
        store.deliver(Message(1, 1, 1, b"x"), to=[2])
    assert set(_modes(store_path).values()) == {0o700, 0o600}
    with syncstore.open(store_path, file_mode=0o640) as store:  # share with the operators' group
        store.deliver(Message(1, 1, 2, b"y"), to=[2])
    modes = _modes(store_path)
    assert set(modes.values()) == {0o750, 0o640}, modes
    with syncstore.open(store_path, file_mode=0o600):  # and private again
        pass
    assert set(_modes(store_path).values()) == {0o700, 0o600}


@pytest.mark.parametrize("mode", [0o620, 0o644, 0o700, 0o400, "0o640"])
def test_only_the_documented_file_modes_are_accepted(store_path, mode):
    with pytest.raises(InvalidArgument) as refused:
        syncstore.open(store_path, file_mode=mode)
    shown = f"{mode:#o}" if isinstance(mode, int) else repr(mode)
    assert shown in str(refused.value)
    assert not os.path.exists(store_path)


def test_renew_epoch_arguments_and_hints(store_path):
    with pytest.raises(InvalidArgument):
        syncstore.renew_epoch("")
    with syncstore.open(store_path) as store:
        with pytest.raises(StoreLocked) as locked:
            syncstore.renew_epoch(store_path)
        assert "close the store first" in str(locked.value)
        epoch = store.epoch
    assert syncstore.renew_epoch(store_path) != epoch


def test_max_map_size_below_map_size_names_both(store_path):
    with pytest.raises(InvalidArgument) as refused:
        syncstore.open(store_path, max_map_size=1 << 20)
    assert "map_size" in refused.value.message and "64 GiB" in refused.value.message
    assert "smaller map_size" in refused.value.hint

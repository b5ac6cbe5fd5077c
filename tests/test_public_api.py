"""The public surface is what ``eventbus/__init__.py`` re-exports and lists in ``__all__``; the two must not drift
(as anyio's ``test_all_attributes`` checks)."""

from __future__ import annotations

import types

import eventbus


def test_all_names_are_importable() -> None:
    assert len(eventbus.__all__) == len(set(eventbus.__all__)), "duplicate names in __all__"
    for name in eventbus.__all__:
        assert hasattr(eventbus, name), f"eventbus.__all__ lists {name!r}, which eventbus does not define"
    namespace: dict[str, object] = {}
    exec("from eventbus import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(eventbus.__all__)


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(eventbus).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    missing = public - set(eventbus.__all__)
    assert not missing, f"public names missing from eventbus.__all__: {sorted(missing)}"


def test_exported_objects_come_from_eventbus() -> None:
    assert isinstance(eventbus.__version__, str)
    for name in eventbus.__all__:
        value = getattr(eventbus, name)
        if isinstance(value, type | types.FunctionType):
            assert value.__module__.startswith("eventbus"), f"{name} is re-exported from {value.__module__}"

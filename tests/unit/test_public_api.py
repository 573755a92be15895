"""The public import name for library users (`converge_ledger`): every name it promises exists,
is the protocol's own object, and the package says it is typed."""

from __future__ import annotations

import importlib.resources

import pytest

import converge_ledger
from protocol import client, errors

pytestmark = pytest.mark.timeout(30)


def test_every_public_name_is_there_and_is_the_protocols_own():
    for name in converge_ledger.__all__:
        assert hasattr(converge_ledger, name), name
    assert converge_ledger.Client is client.Client
    assert converge_ledger.NotFound is errors.NotFound
    # every stable error class of the protocol can be caught through the public name
    public = {getattr(converge_ledger, n) for n in converge_ledger.__all__}
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, errors.LedgerError):
            assert obj in public, obj.__name__


def test_the_packages_are_marked_typed():
    for pkg in ("converge_ledger", "protocol"):
        assert importlib.resources.files(pkg).joinpath("py.typed").is_file(), pkg

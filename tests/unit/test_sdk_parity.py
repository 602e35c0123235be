"""The blocking and the asyncio SDK clients offer the same operations with the same parameters."""

from __future__ import annotations

import inspect

from broker.sdk import AsyncClient, Client

# Named differently on purpose: the async flavour's context manager and iterator protocols.
_FLAVOUR_ONLY = {"__enter__", "__exit__", "__aenter__", "__aexit__", "close", "aclose"}


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") and name not in _FLAVOUR_ONLY
    }


def test_every_operation_exists_in_both_flavours() -> None:
    """A method added to one client and forgotten in the other fails here."""
    assert sorted(_public(Client)) == sorted(_public(AsyncClient))


def test_every_operation_takes_the_same_parameters_in_both_flavours() -> None:
    """Same names, kinds, defaults and annotations: an application can switch flavours by adding
    ``await`` and nothing else."""
    sync, asynchronous = _public(Client), _public(AsyncClient)
    differing = {
        name: (str(sync[name]), str(asynchronous[name]))
        for name in sync.keys() & asynchronous.keys()
        if list(sync[name].parameters.values()) != list(asynchronous[name].parameters.values())
    }
    assert differing == {}


def test_the_async_flavour_is_awaitable_where_the_blocking_one_returns() -> None:
    """Every async operation is a coroutine function (or an async iterator for the paged walks)."""
    not_async = [
        name
        for name in _public(AsyncClient)
        if not (
            inspect.iscoroutinefunction(getattr(AsyncClient, name))
            or inspect.isasyncgenfunction(getattr(AsyncClient, name))
        )
        and not isinstance(inspect.getattr_static(AsyncClient, name), property)
    ]
    assert not_async == []

"""Listing keys page by page: each key exactly once, a page bounded, a hostile cursor refused."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import unique

pytestmark = pytest.mark.integration

COUNT = 200


@pytest.fixture(scope="module")
def many_keys(stack: DevStack) -> tuple[str, set[str]]:
    """COUNT keys carrying one tag no other test uses (created 4 at a time)."""
    tag = f"page{uuid.uuid4().hex[:8]}"

    def create(_: int) -> str:
        name = unique("pg")
        body = {"name": name, "backend": "vault", "environment": "dev", "tags": {tag: "yes"}}
        for _attempt in range(3):
            try:
                reply = https(stack, "/v1/keys", body=body)
            except TimeoutError:
                continue  # a loaded machine; a retry finds the key made (409) or makes it
            assert reply.status in (201, 409), reply.body
            return name
        raise AssertionError(f"could not create {name}")

    with ThreadPoolExecutor(4) as pool:
        names = set(pool.map(create, range(COUNT)))
    return tag, names


def test_paging_returns_each_key_exactly_once(stack: DevStack, many_keys: tuple[str, set[str]]) -> None:
    """With limit, every page holds at most limit keys, in name order, and following `next` to the
    end yields every matching key exactly once."""
    tag, names = many_keys
    seen: list[str] = []
    query = {"tag": tag, "limit": "37"}
    pages = 0
    while pages < 10 * COUNT:  # bounded: a cursor that never advanced would loop forever
        reply = https(stack, "/v1/keys?" + urlencode(query))
        assert reply.status == 200, reply.body
        page = reply.json()
        got = [k["name"] for k in page["keys"]]
        assert len(got) <= 37
        assert got == sorted(got)
        seen += got
        pages += 1
        if page["next"] is None:
            break
        # The cursor is sealed (it names no key) and moves: names only grow from page to page.
        assert page["next"].startswith("~c1.")
        assert page["next"] != query.get("after")
        query["after"] = page["next"]
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == COUNT
    assert set(seen) == names
    assert pages >= COUNT // 37


def test_a_page_reads_a_bounded_part_of_the_registry(
    stack: DevStack, many_keys: tuple[str, set[str]]
) -> None:
    """A filter that matches one key far down the name order does not make one request read the
    whole registry: the first page ends empty with a cursor after at most 4 x limit entries, and
    following the cursors finds the key exactly once."""
    _, names = many_keys
    tag = f"far{uuid.uuid4().hex[:8]}"
    far = f"zzz-{uuid.uuid4().hex[:12]}"  # after every key of the fixture (named pg-...)
    reply = https(
        stack, "/v1/keys", body={"name": far, "backend": "vault", "environment": "dev", "tags": {tag: "1"}}
    )
    assert reply.status == 201, reply.body
    first = https(stack, "/v1/keys?" + urlencode({"tag": tag, "limit": "1"})).json()
    assert first["keys"] == []
    assert first["next"] is not None
    seen: list[str] = []
    query = {"tag": tag, "limit": "1", "after": first["next"]}
    for _ in range(10 * COUNT):
        page = https(stack, "/v1/keys?" + urlencode(query)).json()
        seen += [k["name"] for k in page["keys"]]
        if page["next"] is None:
            break
        assert page["next"] != query["after"]
        query["after"] = page["next"]
    assert seen == [far]
    assert min(names) < far


def test_unfiltered_pages_do_not_repeat(stack: DevStack, many_keys: tuple[str, set[str]]) -> None:
    """Over the whole registry (other tests' keys too), pages never repeat a key and hold ours all."""
    _, names = many_keys
    seen: list[str] = []
    query = {"limit": "100"}
    for _ in range(1000):
        page = https(stack, "/v1/keys?" + urlencode(query)).json()
        seen += [k["name"] for k in page["keys"]]
        if page["next"] is None:
            break
        query["after"] = page["next"]
    assert len(seen) == len(set(seen))
    assert names <= set(seen)


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"limit": " 10"},
        {"limit": "\u0661\u0660"},
        {"limit": "x" * 100},
        {"limit": "10", "after": "../../sys"},
        {"limit": "10", "after": "a" * 5000},
        {"after": "bad name"},
    ],
)
def test_hostile_paging_parameters_are_refused(stack: DevStack, query: dict[str, str]) -> None:
    """A limit out of range or not plain digits, and an `after` that is no key name, get a 400."""
    reply = https(stack, "/v1/keys?" + urlencode(query))
    assert reply.status == 400, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert json.loads(reply.body)["code"] in ("bad_request", "invalid_key_name")


@pytest.mark.parametrize(
    "query",
    ["limit=1&limit=1000", "after=a&after=b", "limit=5&after=a&limit=5", "state=active&state=destroyed"],
)
def test_a_repeated_query_parameter_is_refused(stack: DevStack, query: str) -> None:
    """A parameter given twice is ambiguous (a proxy may read the last, the broker the first): 400."""
    reply = https(stack, "/v1/keys?" + query)
    assert reply.status == 400, reply.body
    assert json.loads(reply.body)["code"] == "bad_request"
    events = https(stack, "/v1/audit/events?" + query.replace("limit", "key").replace("after", "key"))
    assert events.status == 400, events.body


def test_cli_lists_every_page(stack: DevStack, many_keys: tuple[str, set[str]]) -> None:
    """`keys list` follows the cursor: a page size far below the count still lists every key once."""
    tag, names = many_keys
    listed = keybroker(stack, "keys", "list", "--tag", tag, "--page-size", "50", "--json")
    assert listed.returncode == 0, listed.stderr
    got = [k["name"] for k in json.loads(listed.stdout)]
    assert sorted(got) == sorted(names)

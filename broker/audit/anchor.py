"""Each node's audit anchor in Vault KV: the last checkpoint's position, moved only forward.

The document ``<kv>/audit/anchor-<node>`` holds ``seq`` and ``hash`` of the last
anchored checkpoint, the current ``epoch`` and the ``epochs`` history (who started
each, why, and which anchor it superseded). Every write is check-and-set on a fresh
read, so within an epoch the anchor only grows; only
:meth:`VaultAnchors.begin_epoch` may change the epoch, and only from the document
the administrator saw.
"""

from __future__ import annotations

from typing import Any

from broker.audit.chain import Anchor
from broker.audit.sink import INITIAL_EPOCH, AnchorConflict
from broker.state.kv import KvDocuments


class VaultAnchors:
    def __init__(self, documents: KvDocuments, node: str) -> None:
        self._docs = documents
        self._name = f"anchor-{node}"

    async def read(self) -> dict[str, Any] | None:
        found = await self._docs.read(self._name)
        return None if found is None else found[0]

    async def advance(self, epoch: str, mark: Anchor) -> None:
        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                return {"seq": mark.seq, "hash": mark.hash, "epoch": epoch, "epochs": []}
            theirs = str(current.get("epoch") or INITIAL_EPOCH)
            if theirs != epoch:
                raise AnchorConflict(f"the anchor is in epoch {theirs}, this log in epoch {epoch}")
            seq = int(current.get("seq", 0))
            if seq > mark.seq or (seq == mark.seq and current.get("hash") != mark.hash):
                raise AnchorConflict(f"the anchor is at record {seq}, ahead of or different from {mark.seq}")
            return {**current, "seq": mark.seq, "hash": mark.hash, "epoch": epoch}

        await self._docs.update(self._name, change)

    async def begin_epoch(
        self, expected: dict[str, Any] | None, entry: dict[str, Any], mark: Anchor
    ) -> dict[str, Any]:
        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            if current != expected:
                raise AnchorConflict("the anchor is not the one this broker found at start")
            history = list((current or {}).get("epochs") or [])
            return {"seq": mark.seq, "hash": mark.hash, "epoch": entry["epoch"], "epochs": [*history, entry]}

        written, _ = await self._docs.update(self._name, change)
        return written

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
from broker.audit.checkpoints import AnchorConflict
from broker.audit.sink import INITIAL_EPOCH
from broker.backends.vault import VaultClient
from broker.state.kv import KvDocuments


def anchored(document: dict[str, Any] | None) -> Anchor | None:
    """The checkpoint position an anchor document holds, if there is one."""
    return None if document is None else Anchor(int(document["seq"]), str(document["hash"]))


def epoch_notes(document: dict[str, Any] | None) -> list[str]:
    """One sentence per recorded epoch: when it began, who started it and why, what it superseded."""
    notes = []
    for epoch in epochs(document):
        old = epoch.get("supersedes") or {}
        notes.append(
            f"epoch {epoch.get('epoch')} began at record {epoch.get('first_seq')} on {epoch.get('started')}, "
            f"started by {epoch.get('by')} ({epoch.get('reason')}); it superseded epoch {old.get('epoch')}, "
            f"whose anchored history ended at record {old.get('seq')}"
        )
    return notes


def epochs(document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The epoch history an anchor document records, oldest first."""
    return list((document or {}).get("epochs") or [])


class VaultAnchors:
    """This node's anchor document: the one place that reads and writes it."""

    def __init__(self, vault: VaultClient, kv_mount: str, node: str) -> None:
        self._docs = KvDocuments(vault, kv_mount, "audit")
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
            history = epochs(current)
            return {"seq": mark.seq, "hash": mark.hash, "epoch": entry["epoch"], "epochs": [*history, entry]}

        written, _ = await self._docs.update(self._name, change)
        return written

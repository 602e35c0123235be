"""What can go wrong opening or making a ``kbe1`` message.

::

    BrokerError
    └── EnvelopeError              envelope_error      the message cannot be used
        ├── MalformedMessage       envelope_malformed  not a kbe1 message, or a field out of its bounds
        ├── TamperedMessage        envelope_tampered   a tag did not verify (header, frame, commitment)
        │   └── CommitmentMismatch                     a wrapped data key is not the one the header commits to
        ├── TruncatedMessage       envelope_truncated  the stream ended before the final frame
        ├── ContextMismatch        envelope_context    sealed under another encryption context
        └── NoUsableKey            envelope_no_key     no wrapped data key could be unwrapped by the caller

Each is a ``BrokerError`` so the CLI reports it as one line with exit status 1. None of them
carries plaintext, key material or context values.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import BrokerError


class EnvelopeError(BrokerError):
    status = 400
    code = "envelope_error"
    title = "The envelope message cannot be used"


class MalformedMessage(EnvelopeError):
    code = "envelope_malformed"
    title = "Not a well-formed kbe1 message"


class TamperedMessage(EnvelopeError):
    code = "envelope_tampered"
    title = "The message failed authentication (changed, reordered or from another message)"


class CommitmentMismatch(TamperedMessage):
    """A data key the header does not commit to: a wrapping of another message's key."""


class TruncatedMessage(EnvelopeError):
    code = "envelope_truncated"
    title = "The message ends before its final frame (truncated)"


class ContextMismatch(EnvelopeError):
    code = "envelope_context"
    title = "The message was sealed under a different encryption context"


class NoUsableKey(EnvelopeError):
    """None of the message's wrapped data keys could be unwrapped; ``reasons`` says why, per key."""

    code = "envelope_no_key"
    title = "No wrapped data key of the message could be unwrapped"

    def __init__(self, reasons: Sequence[tuple[str, str]]) -> None:
        listed = "; ".join(f"{key}: {why}" for key, why in reasons)
        super().__init__(f"{self.title} ({listed})" if listed else self.title)
        self.reasons = list(reasons)

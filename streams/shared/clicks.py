"""What a click on `interactions` must be to count: one rule for the scorer and the trainer.

The scorer sends a click that fails it to the dead-letter topic; the trainer skips it. With
one rule, the trainer never learns from a click the scorer refused (a 1 MB item id, a click
keyed by a session id), and the two agree on what a user's history is.
"""

from __future__ import annotations

from schemas.codec import DecodeError, decode_interaction

MAX_ID_BYTES = 1024     # longer ids are refused: a table key / history entry per event
_MAX_ID_CHARS_UNCHECKED = MAX_ID_BYTES // 4  # this many characters always fit


def checked_click(value: bytes, key: bytes | None) -> dict:
    """The decoded Interaction, or DecodeError with the reason (short, for a header)."""
    record = decode_interaction(value)
    for name in ("user_id", "item_id", "event_id"):
        text = record.get(name)
        if not text:
            raise DecodeError(f"empty {name}")
        # UTF-8 takes at most 4 bytes a character: only a long id needs encoding to be measured.
        if len(text) > _MAX_ID_CHARS_UNCHECKED and len(text.encode()) > MAX_ID_BYTES:
            raise DecodeError(f"{name} longer than {MAX_ID_BYTES} bytes ({len(text.encode())})")
    # All of a user's events must share one partition (one state, in order): the key decides it.
    if key != record["user_id"].encode():
        raise DecodeError(f"message key {key!r:.80} is not the user_id: a user's "
                          "events must be keyed by user_id to share one partition")
    return record

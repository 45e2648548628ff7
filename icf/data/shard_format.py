"""The shard format (Decisions D5): what a clip is called inside the WebDataset tars."""

from __future__ import annotations

AUDIO_KEYS = ("mel", "clap", "clap_clip")  # batch keys that carry audio: a robustness setting changes all of them
FRAME_KEYS = ("frames", "masks", "gt", "clip")  # per-frame batch keys that frame mixing swaps between clips


def sample_key(uid: str) -> str:
    """WebDataset key of a clip in the tar shards: the uid with dots replaced (the key ends at the first dot)."""
    return uid.replace(".", "_")

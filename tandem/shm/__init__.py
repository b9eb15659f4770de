"""Shared-memory ring carrying each step's batch from the scheduler to the GPU worker.

Memory only: which side may touch a slot is decided by ZMQ messages (doorbell / credit).
"""

from tandem.shm.layout import (
    FIELD_ALIGN,
    HDR_FLAGS,
    HDR_NUM_SEQS,
    HDR_NUM_TOKENS,
    HDR_STEP_ID,
    PER_SEQ,
    PER_TOKEN,
    RING_HEADER_SIZE,
    SLOT_ALIGN,
    FieldSpec,
    LayoutMismatchError,
    RingLayout,
    batch_layout,
)
from tandem.shm.ring import RingSegment, unlink_owned_segments
from tandem.shm.segment import (
    SHM_DIR,
    ShmSpaceError,
    check_shm_space,
    cleanup_stale_segments,
    list_segments,
)
from tandem.shm.slot import SlotView

__all__ = [
    "FIELD_ALIGN",
    "HDR_FLAGS",
    "HDR_NUM_SEQS",
    "HDR_NUM_TOKENS",
    "HDR_STEP_ID",
    "PER_SEQ",
    "PER_TOKEN",
    "RING_HEADER_SIZE",
    "SHM_DIR",
    "SLOT_ALIGN",
    "FieldSpec",
    "LayoutMismatchError",
    "RingLayout",
    "RingSegment",
    "ShmSpaceError",
    "SlotView",
    "batch_layout",
    "check_shm_space",
    "cleanup_stale_segments",
    "list_segments",
    "unlink_owned_segments",
]

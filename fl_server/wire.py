"""How tensors travel in a Flower message, both directions: the record ``arrays`` holds one uint8
array named ``mllm_dr.protocol.PACKED`` whose bytes are a safetensors blob of every tensor
(``mllm_dr.protocol.pack_tensors``). The center packs what it sends and unpacks what it receives
(``fl_server/strategy.py``); a site does the same in its outermost mod (``fl_client/wire_mod.py``),
so its handlers, privacy mods and egress guard see the tensors by name. Why one array: Flower
moves every array of a record as separate objects, each a request and SuperLink bookkeeping.
safetensors is a data-only format (a JSON header and raw buffers, no code on load), so a packed
reply from a site is no more dangerous to open than the arrays it replaces.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from mllm_dr.errors import InputError
from mllm_dr.protocol import PACKED, pack_tensors, unpack_tensors

ARRAYS = "arrays"   # the record key of a message's tensors


def packed_record(tensors: dict) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(np.frombuffer(pack_tensors(tensors), dtype=np.uint8))})


def unpacked(record: ArrayRecord, what: str) -> dict:
    """The tensors of a packed record; InputError naming ``what`` when it is not one."""
    if list(record.keys()) != [PACKED]:
        raise InputError(f"{what}: expected one packed array {PACKED!r}, got {sorted(record.keys())[:3]}")
    return unpack_tensors(record[PACKED].numpy().tobytes(), what)

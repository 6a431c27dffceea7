"""Tensors travel packed: one Flower array per message, whatever the number of tensors (fl_server/wire.py).

Flower moves each array of a record as its own objects (a request each way and SuperLink bookkeeping
for each); with one array per tensor the sites waited ~10 s per message in Flower's pull back-off.
"""

from __future__ import annotations

import pytest
import torch

from mllm_dr.errors import InputError


def _many_tensors(n=120):
    return {f"lora.layers.{i}.q_proj.lora_{ab}.weight": torch.randn(4, 6) for i in range(n // 2) for ab in "AB"}


def test_pack_and_unpack_keep_names_dtypes_shapes_and_values_and_refuse_a_bad_blob():
    from mllm_dr.protocol import pack_tensors, unpack_tensors

    tensors = {"a": torch.randn(3, 5), "b16": torch.randn(7).half(), "q8": torch.randint(-127, 127, (9,),
               dtype=torch.int8), "mask": torch.randint(0, 2**62, (4,), dtype=torch.int64), "empty": torch.zeros(0)}
    back = unpack_tensors(pack_tensors(tensors), "test")
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    blob = pack_tensors(tensors)
    with pytest.raises(InputError, match="site2's reply: the tensors are not a valid safetensors blob"):
        unpack_tensors(blob[: len(blob) // 2], "site2's reply")


def test_the_centers_messages_carry_one_array_however_many_tensors(tmp_path, flower_task):
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fl_server.wire import unpacked
    from mllm_dr.protocol import PACKED
    from tests.test_federation_units import _Grid, _strategy

    strat = _strategy(tmp_path)
    strat.sites = {11: "site-a", 12: "site-b"}
    counts = {}
    for n in (4, 120):
        strat.state = _many_tensors(n)
        msgs = strat.configure_train(1, None, ConfigRecord(), _Grid())
        assert list(msgs[0].content["arrays"].keys()) == [PACKED]
        got = unpacked(msgs[0].content["arrays"], "test")
        assert sorted(got) == sorted(strat.state) and all(torch.equal(got[k], strat.state[k]) for k in got)
        counts[n] = len(get_all_nested_objects(msgs[0]))
    # message, record dict, array record, the array and its chunk, the config record: not 2 per tensor
    assert counts[4] == counts[120] <= 8, counts


def test_the_site_answers_packed_and_refuses_a_message_whose_tensors_are_not(tmp_path, flower_task):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fl_client.wire_mod import wire_mod
    from fl_server.wire import packed_record, unpacked
    from mllm_dr.protocol import PACKED, REFUSED

    seen = {}
    update = _many_tensors(40)
    app = ClientApp()

    @app.train(mods=[wire_mod])
    def train(msg, context):
        seen["names"] = sorted(msg.content["arrays"].keys())      # the handler sees the tensors by name
        return Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(update),
                                   "metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=7, node_config={"workspace": str(tmp_path)}, state=RecordDict(), run_config={})
    sent = {"maa.v": torch.randn(3), "lq.audio.w": torch.randn(2, 2)}
    reply = app(Message(RecordDict({"arrays": packed_record(sent), "config": ConfigRecord({"x": 1})}),
                        dst_node_id=7, message_type="train"), ctx)
    assert seen["names"] == sorted(sent)
    assert list(reply.content["arrays"].keys()) == [PACKED]
    back = unpacked(reply.content["arrays"], "reply")
    assert sorted(back) == sorted(update) and all(torch.equal(back[k], update[k]) for k in update)

    seen.clear()
    plain = app(Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(sent),
                                    "config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train"), ctx)
    assert plain.has_error() and plain.error.code == REFUSED and "expected one packed array" in plain.error.reason
    assert not seen                                               # nothing ran on an unpacked message

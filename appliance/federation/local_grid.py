"""Run a Flower ServerApp against many ClientApps in one process, without Ray.

Flower's simulation engine needs Ray (`flwr[simulation]` brings Ray 2.55.1, hundreds of MB, and its
actors want cores this fleet simulation does not have). Nothing in the federated algorithm needs Ray:
`LocalGrid` is a `flwr.serverapp.grid.Grid` that delivers each message to the destination box's
`ClientApp` (real mods: secaggplus_mod, fixedclipping_mod) with that box's own persistent `Context`,
one box after another. Every message is serialised to Flower's protobuf and parsed back on both legs,
exactly as the SuperLink would carry it, so the byte counts are those of the wire and no object is
shared between the server and a box. A box can be told to drop out from a given SecAgg+ stage on.

The real transport (a SuperLink and SuperNodes on loopback) is exercised by the deployment tests; this
grid is for tests of the protocol logic and for the fleet-size simulation.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Context
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def message_stage(msg: Message) -> str:
    """The SecAgg+ stage a server message asks for ('' when it is not a SecAgg+ message)."""
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return ""
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


def _wire(msg: Message) -> tuple[Message, bytes]:
    raw = message_to_proto(msg).SerializeToString()
    proto = ProtoMessage()
    proto.ParseFromString(raw)
    return message_from_proto(proto), raw


@dataclass
class WireLog:
    """Bytes each box sent, per (round, stage); optionally the raw bytes themselves (wire tests)."""

    keep_raw: bool = False
    upload: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    download: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    raw_uploads: list[tuple[int, str, str, bytes]] = field(default_factory=list)

    def upload_per_box(self, group: str, stage: str | None = None) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for (node, g, st), n in self.upload.items():
            if g == group and (stage is None or st == stage):
                out[node] += n
        return dict(out)


class LocalGrid(Grid):
    """An in-process Grid over `ClientApp`s; `drop_from[node_id] = stage` silences a box from that stage."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 run_id: int = 1, drop_from: dict[int, str] | None = None, keep_raw: bool = False,
                 on_error: Callable[[int, BaseException], None] | None = None) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(len(node_configs))]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                         run_config=dict(run_config))
            for nid, cfg in zip(self.node_ids, node_configs)
        }
        self._run = Run.create_empty(run_id)
        self.drop_from = dict(drop_from or {})
        self.wire = WireLog(keep_raw=keep_raw)
        self.errors: list[tuple[int, str]] = []
        self.on_error = on_error
        self._replies: dict[str, Message] = {}
        self.busy_seconds = 0.0

    # -- Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _dropped(self, nid: int, stage: str) -> bool:
        start = self.drop_from.get(nid)
        if start is None:
            return False
        return stage in STAGES and STAGES.index(stage) >= STAGES.index(start)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            ids.append(msg_id)
            nid = msg.metadata.dst_node_id
            stage = message_stage(msg)
            group = msg.metadata.group_id
            delivered, raw = _wire(msg)
            self.wire.download[(nid, group, stage)] += len(raw)
            if nid not in self.contexts or self._dropped(nid, stage):
                continue  # an offline box: no reply, the server's timeout decides
            t0 = time.perf_counter()
            try:
                reply = self.client_app(delivered, self.contexts[nid])
            except Exception as exc:  # a box's failure must reach the server as an error reply
                self.errors.append((nid, traceback.format_exc()))
                if self.on_error:
                    self.on_error(nid, exc)
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            self.busy_seconds += time.perf_counter() - t0
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            back, raw = _wire(reply)
            self.wire.upload[(nid, group, stage)] += len(raw)
            if self.wire.keep_raw:
                self.wire.raw_uploads.append((nid, group, stage, raw))
            self._replies[msg_id] = back
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def server_context(self, run_config: dict[str, Any] | None = None) -> Context:
        """The ServerApp's Context; also sets this process's task identity (the ServerApp's messages
        take their run and source node from it, as in a ServerApp process)."""
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0
        cfg = run_config if run_config is not None else next(iter(self.contexts.values())).run_config
        return Context(run_id=self._run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                       run_config=dict(cfg))

"""The leader and its followers in a multi-process engine (docs/DESIGN.md, "Multi-host").

The leader (process 0) runs everything one process runs: scheduler, executor, server. Its executor touches the
devices in a few operations only: a step, a copy of device pages into the host tier (write-through, swap-out), a
load of host pages onto the devices (swap-in), warm-up and shutdown. It broadcasts each one before issuing it,
as one int32 message of a fixed size (`multihost_utils.broadcast_one_to_all`: a psum over every process's
devices): a header (the operation and the numbers that fix its payload's shapes), then the payload (the step's
padded batch arrays, or the pages a copy moves), room for the largest the engine makes. Each follower issues the
same jitted call on its own runner, so the collectives inside the step meet across processes. A process's host
tier holds what its own devices copied (their kv heads' slices), and a load reads it back onto the same devices:
page data never crosses processes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import jax
import numpy as np

from tokenflow_jax.engine.runner import ModelRunner
from tokenflow_jax.kv.host_tier import HostKVTier

_HEADER_LEN = 6  # op, payload length, then up to four fields


class DeviceOp(enum.IntEnum):
    SHUTDOWN = 0
    STEP = 1  # fields: decode, tokens or sequences bucket, block-table width, feeds from the previous step
    TO_HOST = 2  # fields: pages; payload: device pages, then host pages
    TO_DEVICE = 3  # fields: pages; payload: device pages, then host pages
    WARMUP = 4


def _pack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One int32 vector; float32 travels as its bits (a psum with the followers' zeros keeps them exact)."""
    return np.concatenate([np.ascontiguousarray(a).view(np.int32).ravel() for a in arrays])


def message_size(runner: ModelRunner) -> int:
    """Header and the largest payload: a step's batch at its widest bucket, or a copy's pages (the same on every
    process, since they run the same engine)."""
    widest = max(sum(a.size for a in runner.step_batch_template(key).values()) for key in runner.step_keys())
    return _HEADER_LEN + max(widest, 2 * runner.buckets.transfer_pages[-1])


def _unpack(flat: np.ndarray, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, like in template.items():
        out[name] = flat[at : at + like.size].view(like.dtype).reshape(like.shape)
        at += like.size
    return out


class OpBroadcast:
    """Device operations from the leader to every follower: one collective each, which every process joins."""

    def __init__(self, size: int) -> None:
        from jax.experimental import multihost_utils

        self._broadcast = multihost_utils.broadcast_one_to_all
        self.size = size

    def send(self, op: DeviceOp, fields: Sequence[int] = (), payload: np.ndarray | None = None) -> None:
        message = np.zeros(self.size, np.int32)
        n = 0 if payload is None else payload.size
        message[0], message[1] = op, n
        message[2 : 2 + len(fields)] = fields
        if n:
            message[_HEADER_LEN : _HEADER_LEN + n] = payload
        self._broadcast(message)

    def send_step(self, key: tuple, batch: dict[str, np.ndarray], feeds: bool) -> None:
        _, decode, n, width = key
        self.send(DeviceOp.STEP, (decode, n, width, feeds), _pack(list(batch.values())))

    def send_copy(self, op: DeviceOp, device_pages: Sequence[int], host_pages: Sequence[int]) -> None:
        pages = np.asarray([*device_pages, *host_pages], np.int32)
        self.send(op, (len(device_pages),), _pack([pages]))

    def receive(self) -> tuple[DeviceOp, list[int], np.ndarray]:
        message = np.asarray(self._broadcast(np.zeros(self.size, np.int32)))
        n = int(message[1])
        return DeviceOp(int(message[0])), message[2:_HEADER_LEN].tolist(), message[_HEADER_LEN : _HEADER_LEN + n]


def follow(runner: ModelRunner, host: HostKVTier | None) -> None:
    """A follower's life after start-up: carry out the leader's device operations until it shuts down."""
    ops = OpBroadcast(message_size(runner))
    templates: dict[tuple, dict[str, np.ndarray]] = {}
    host_ticket: dict[int, int] = {}  # host page -> the latest copy into it (the leader's executor keeps the same)
    last: jax.Array | None = None  # the latest step's sampled tokens: what the next step's feed rows read
    while True:
        op, fields, payload = ops.receive()
        if op is DeviceOp.STEP:
            decode, n, width, feeds = fields
            key = ("step", bool(decode), n, width)
            if key not in templates:
                templates[key] = runner.step_batch_template(key)
            last = runner.run_batch(key, _unpack(payload, templates[key]), last if feeds else None)
        elif op in (DeviceOp.TO_HOST, DeviceOp.TO_DEVICE):
            assert host is not None, "a page copy without a host tier"
            count = fields[0]
            device_pages, host_pages = payload[:count].tolist(), payload[count : 2 * count].tolist()
            if op is DeviceOp.TO_HOST:
                ticket = host.write_async(runner.gather_pages(device_pages), host_pages)
                host_ticket.update(dict.fromkeys(host_pages, ticket))
            else:
                tickets = [t for p in host_pages if (t := host_ticket.get(p)) is not None]
                if tickets:
                    host.wait(max(tickets))  # this process's own copies into those pages have landed
                runner.scatter_staged(device_pages, host.load(host_pages))
        elif op is DeviceOp.WARMUP:
            runner.warmup(progress=False)
        else:
            return

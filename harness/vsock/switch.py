"""Routing between VMs by CID inside explicit groups, and to the host (CID 2) through each VM's host side.

CIDs are scoped per group: every parent can be CID 3 to its own enclaves. A VM reaches only the VMs of its
group and the host. Packets between siblings are forwarded as they are, but the switch keeps a flow table:
it checks that data never exceeds the credit the receiver has granted (its advertised window, capped at
``SIBLING_BUF_CAP``, which is also what the sender is told; a window the receiver shrinks later does not take
back credit already granted, so an honest sender is never blamed for it), so a hostile VM cannot make the
switch buffer without bound; a violation resets only that flow. Flows count against the quota of the VM
that opened them only. A VM that breaks or goes away takes its flows and host connections with it.

A group is a mesh (every VM reaches every other) or an enclave group: CID 3 is the parent and every other VM
is one of its enclaves, which talks to its parent only (Nitro's and QingTian's rule). There every packet must
have the parent at one end: one between two enclaves, from an enclave to the host or to a CID it does not
know is refused with a reset and counted as ``enclave_isolation``; the host cannot connect to an enclave.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.vsock.device import VsockDevice
from harness.vsock.errors import VsockConfigError
from harness.vsock.hybrid import ConnectionBudget, HostSide
from harness.vsock.packet import (
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
    Header,
)

log = logging.getLogger(__name__)

MESH_GROUP = "mesh"  # a routing group whose VMs all reach each other and the host
ENCLAVE_GROUP = "enclave"  # a routing group of one parent (CID 3) and enclaves that reach the parent only
GROUP_KINDS = (MESH_GROUP, ENCLAVE_GROUP)
PARENT_CID = 3  # the parent's CID in an enclave group, as in every enclave's own vsock world
SIBLING_BUF_CAP = 1024 * 1024  # receive window a sibling may advertise through the switch
MAX_FLOWS_PER_VM = 4096
U32 = 0xFFFFFFFF


@dataclass
class FlowEnd:
    """One end of a sibling flow: what it advertised as receiver and what it sent as sender."""

    cid: int
    port: int
    buf_alloc: int = 0
    fwd_cnt: int = 0
    tx_cnt: int = 0
    credit_end: int = 0  # the sender's tx_cnt may reach this (mod 2**32): the highest credit granted

    def grant(self, sender: FlowEnd) -> None:
        """Move the credit end forward to what this end's latest fwd_cnt and (capped) buf_alloc grant; it
        never moves back, and never runs more than a capped window past what ``sender`` has sent."""
        end = (self.fwd_cnt + min(self.buf_alloc, SIBLING_BUF_CAP)) & U32
        if 0 < (end - self.credit_end) & U32 < 1 << 31 and (end - sender.tx_cnt) & U32 <= SIBLING_BUF_CAP:
            self.credit_end = end

    def credit(self, sender: FlowEnd) -> int:
        """Bytes ``sender`` may still send to this end."""
        left = (self.credit_end - sender.tx_cnt) & U32
        return left if left <= SIBLING_BUF_CAP else 0


@dataclass
class Flow:
    initiator: FlowEnd
    responder: FlowEnd
    established: bool = False

    def ends(self, src_cid: int, src_port: int) -> tuple[FlowEnd, FlowEnd]:
        """(sender, receiver) for a packet from ``src``."""
        a, b = self.initiator, self.responder
        return (a, b) if (a.cid, a.port) == (src_cid, src_port) else (b, a)


FlowKey = tuple[int, int, int, int]  # src_cid, src_port, dst_cid, dst_port


def _reverse(key: FlowKey) -> FlowKey:
    return (key[2], key[3], key[0], key[1])


@dataclass
class Group:
    """The VMs of one routing group and their sibling flows, each listed under both directions."""

    name: str
    kind: str = MESH_GROUP
    vms: dict[int, VsockDevice] = field(default_factory=dict)
    flows: dict[FlowKey, Flow] = field(default_factory=dict)
    flow_counts: Counter[int] = field(default_factory=Counter)  # flows by the CID that opened them

    def allows(self, src_cid: int, dst_cid: int) -> bool:
        """False for a packet this group's kind forbids: in an enclave group, one without the parent at
        either end (enclave to enclave, enclave to the host or to any other CID)."""
        return self.kind == MESH_GROUP or PARENT_CID in (src_cid, dst_cid)

    def role(self, cid: int) -> str:
        """'guest' in a mesh; 'parent' (CID 3) or 'enclave' in an enclave group."""
        if self.kind == MESH_GROUP:
            return "guest"
        return "parent" if cid == PARENT_CID else "enclave"

    def add_flow(self, key: FlowKey, flow: Flow) -> None:
        self.flows[key] = self.flows[_reverse(key)] = flow
        self.flow_counts[flow.initiator.cid] += 1

    def drop_flow(self, key: FlowKey) -> None:
        flow = self.flows.pop(key, None)
        self.flows.pop(_reverse(key), None)
        if flow is not None:
            self.flow_counts[flow.initiator.cid] -= 1


class Switch:
    """Routes packets of the VMs attached to it; each VM is one ``VsockDevice`` with a ``HostSide``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.groups: dict[str, Group] = {}
        self._group_of: dict[VsockDevice, Group] = {}
        self.host_sides: dict[VsockDevice, HostSide] = {}
        self.connection_budget = ConnectionBudget()
        self.drops: Counter[str] = Counter()  # all VMs together, by reason

    # -- membership -----------------------------------------------------------------------------
    def attach(self, name: str, cid: int, group: str, uds: Path, kind: str = MESH_GROUP) -> VsockDevice:
        """A new device for VM ``name`` with ``cid`` in ``group`` (made ``kind`` by its first VM; later VMs
        must name the same kind); its host endpoints live at ``uds``."""
        grp = self.groups.get(group) or Group(group, kind)
        if grp.kind != kind:
            raise VsockConfigError(
                f"VM {name}: routing group {group!r} is of kind {grp.kind!r}, not {kind!r}",
                hint="attach every VM of a group with the same group kind, or use another group",
                group=group,
            )
        if cid in grp.vms:
            raise ValueError(f"CID {cid} is already used in group {group!r} by {grp.vms[cid].name}")
        self.groups[group] = grp
        vm = VsockDevice(name, cid, self, self.loop, drops=Counter())
        grp.vms[cid] = vm
        self._group_of[vm] = grp
        self.host_sides[vm] = HostSide(
            vm, uds, self.loop, self.connection_budget, host_connects=grp.allows(HOST_CID, cid)
        )
        vm.on_reset.append(self._vm_reset)
        return vm

    def detach(self, vm: VsockDevice) -> None:
        """The VM is gone: its connections end and its CID is free again."""
        self._vm_reset(vm)
        grp = self._group_of.pop(vm, None)
        if grp is not None and grp.vms.get(vm.cid) is vm:
            del grp.vms[vm.cid]
            if not grp.vms:
                del self.groups[grp.name]
        side = self.host_sides.pop(vm, None)
        if side is not None:
            side.detach()
        self.drops.update(vm.drops)

    def _vm_reset(self, vm: VsockDevice) -> None:
        side = self.host_sides.get(vm)
        if side is not None:
            side.reset()
        grp = self._group_of.get(vm)
        if grp is None:
            return
        for key in list(grp.flows):
            if key[0] != vm.cid or key not in grp.flows:
                continue  # each flow is listed under both directions; act once, from vm's side
            grp.drop_flow(key)
            peer = grp.vms.get(key[2])
            if peer is not None and peer is not vm:
                peer.enqueue(Header(key[0], key[2], key[1], key[3], 0, TYPE_STREAM, OP_RST, 0, 0, 0))

    def device_broken(self, vm: VsockDevice, reason: str) -> None:
        log.warning("%s (cid %d): device stopped after a ring fault (%s)", vm.name, vm.cid, reason)
        vm.reset(reason)

    # -- routing --------------------------------------------------------------------------------
    def route(self, vm: VsockDevice, hdr: Header, payload: list[memoryview]) -> None:
        grp = self._group_of[vm]
        if not grp.allows(hdr.src_cid, hdr.dst_cid):
            vm.fault("enclave_isolation", f"{hdr.describe()}: an enclave reaches only its parent (CID 3)")
            if hdr.op != OP_RST:
                vm.enqueue(hdr.reply(OP_RST))
            return
        if hdr.dst_cid == HOST_CID:
            self.host_sides[vm].from_guest(hdr, payload)
            return
        peer = grp.vms.get(hdr.dst_cid)
        if peer is None or not peer.running:
            vm.stats["unreachable"] += 1
            if hdr.op != OP_RST:
                vm.enqueue(hdr.reply(OP_RST))
            return
        self._forward(grp, vm, peer, hdr, payload)

    def _forward(
        self, grp: Group, vm: VsockDevice, peer: VsockDevice, hdr: Header, payload: list[memoryview]
    ) -> None:
        key = (hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port)
        flow = self._flow_for(grp, key, vm, peer, hdr)
        if flow is None:
            return
        sender, receiver = flow.ends(hdr.src_cid, hdr.src_port)
        sender.buf_alloc = hdr.buf_alloc
        sender.fwd_cnt = hdr.fwd_cnt
        sender.grant(receiver)  # as a receiver, the sender of this packet may grant its peer more credit
        problem = self._account(grp, key, flow, sender, receiver, vm, hdr)
        if problem is not None:
            vm.fault(*problem)
            self._reset_flow(grp, key, vm, peer)
            return
        if hdr.buf_alloc > SIBLING_BUF_CAP:
            hdr = hdr._replace(buf_alloc=SIBLING_BUF_CAP)
        if not peer.deliver(hdr, payload) and hdr.op == OP_RW:
            self._reset_flow(grp, key, vm, peer)  # data the peer cannot take ends the flow: never a gap

    def _flow_for(
        self, grp: Group, key: FlowKey, vm: VsockDevice, peer: VsockDevice, hdr: Header
    ) -> Flow | None:
        """The packet's flow (a REQUEST opens one, within the sender's quota), or None: it ends here."""
        flow = grp.flows.get(key)
        if hdr.op == OP_REQUEST:
            if flow is not None:
                vm.fault("duplicate_request", hdr.describe())
                self._reset_flow(grp, key, vm, peer)
                return None
            if grp.flow_counts[vm.cid] >= MAX_FLOWS_PER_VM:
                vm.fault("too_many_flows", hdr.describe())
                vm.enqueue(hdr.reply(OP_RST))
                return None
            flow = Flow(FlowEnd(hdr.src_cid, hdr.src_port), FlowEnd(hdr.dst_cid, hdr.dst_port))
            grp.add_flow(key, flow)
        elif flow is None:
            if hdr.op != OP_RST:
                vm.stats["no_flow"] += 1
                vm.enqueue(hdr.reply(OP_RST))
            return None
        return flow

    def _account(
        self,
        grp: Group,
        key: FlowKey,
        flow: Flow,
        sender: FlowEnd,
        receiver: FlowEnd,
        vm: VsockDevice,
        hdr: Header,
    ) -> tuple[str, str] | None:
        """Account one packet of a flow by its op; (reason, detail) when it breaks the protocol."""
        op = hdr.op
        if op == OP_RW:
            credit = receiver.credit(sender)
            if not flow.established or hdr.len > credit:
                reason = "credit_violation" if flow.established else "rw_not_established"
                return reason, f"{hdr.describe()} with {credit} bytes of credit"
            sender.tx_cnt = (sender.tx_cnt + hdr.len) & U32
            vm.stats["sibling_bytes"] += hdr.len
        elif op == OP_RESPONSE:
            if flow.established or sender is not flow.responder:
                return "unexpected_response", hdr.describe()
            flow.established = True
        elif op == OP_RST:
            grp.drop_flow(key)
        elif op not in (OP_REQUEST, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST):
            return "unknown_op", hdr.describe()
        return None

    def _reset_flow(self, grp: Group, key: FlowKey, vm: VsockDevice, peer: VsockDevice) -> None:
        """End one flow on both sides with RST."""
        grp.drop_flow(key)
        src_cid, src_port, dst_cid, dst_port = key
        vm.enqueue(Header(dst_cid, src_cid, dst_port, src_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0))
        peer.enqueue(Header(src_cid, dst_cid, src_port, dst_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0))

    # -- introspection --------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        vms = {}
        for grp in self.groups.values():
            for vm in grp.vms.values():
                side = self.host_sides.get(vm)
                vms[vm.name] = {
                    "cid": vm.cid,
                    "group": grp.name,
                    "role": grp.role(vm.cid),
                    "running": vm.running,
                    "broken": vm.broken,
                    "host_connections": len(side.connections) if side else 0,
                    "host_buffered": side.buffered if side else 0,
                    "sibling_flows": grp.flow_counts[vm.cid],
                    "backlog_packets": len(vm.backlog),
                    "drops": dict(vm.drops),
                    "stats": dict(vm.stats),
                }
        total = Counter(self.drops)
        for grp in self.groups.values():
            for vm in grp.vms.values():
                total.update(vm.drops)
        return {"vms": vms, "drops": dict(total)}

"""``build_argv``: a validated ``VMSpec`` as a QEMU command line, always in this order.

binary; ``-name N,debug-threads=on``; ``-machine TYPE[,confidential-guest-support=ID][,memory-backend=ID]
[,kernel-irqchip=split,hpet=off (TDX)][,sgx-epc.N.memdev=ID,sgx-epc.N.node=NODE (SGX EPC)]``;
``-accel tcg,thread=multi`` or ``-accel kvm``; ``-cpu`` (``,+sgx,+sgxlc,+sgx-provisionkey`` with EPC);
``-smp N[,maxcpus=M]``; ``-m NM[,maxmem=XM (virtio-mem)]``; ``-object`` for the boot memory backend, then the
devices' backends in device order, then the EPC sections, then the confidential guest; ``-kernel``,
``-initrd``, ``-append`` (when non-empty), ``-bios``; ``-nodefaults -no-user-config -nographic -no-reboot``;
the QMP chardev and ``-mon chardev=ID,mode=control``; the console chardev and ``-serial chardev:ID``; then
per device, in device order: its shared controller (first time only), its chardevs, its ``-device``. A
``ChardevChannel`` is rendered as ``fd=N`` when ``channels`` maps its id to an inherited descriptor, else as a
listening socket (for run.sh).
"""

from __future__ import annotations

from collections.abc import Mapping

from harness.host.model import HostInfo
from harness.qemu.chardevs import Chardev, ChardevChannel, ChardevSocket
from harness.qemu.spec import VMSpec, refuse_duplicate_ids

DEFAULT_BINARY = "qemu-system-x86_64"
FIXED_FLAGS = ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]


def build_argv(
    spec: VMSpec,
    host: HostInfo,
    *,
    qmp: Chardev,
    console: Chardev,
    qemu_binary: str | None = None,
    channels: Mapping[str, int] | None = None,
    serial: bool = True,
) -> list[str]:
    """The command line for ``spec`` on ``host``; raises a SpecError (E3xx) before anything runs. Without
    ``serial`` the console chardev has no serial port behind it: the guest has no console at all."""
    spec.validate(host)
    for chardev in (qmp, console):
        chardev.validate(host)
    refuse_duplicate_ids("chardev", [qmp.id, console.id, *(c.id for c in spec.chardevs())])

    argv = [qemu_binary or host.qemu.binary or DEFAULT_BINARY]
    argv += ["-name", f"{spec.name},debug-threads=on"]
    argv += ["-machine", ",".join(_machine_options(spec))]
    argv += ["-accel", "kvm" if spec.resolved_accel(host) == "kvm" else "tcg,thread=multi"]
    argv += ["-cpu", spec.resolved_cpu_model(host)]
    smp = str(spec.vcpus) + (f",maxcpus={spec.max_vcpus}" if spec.max_vcpus is not None else "")
    argv += ["-smp", smp]
    hotplug = spec.hotplug_mib()
    argv += ["-m", f"{spec.memory_mib}M" + (f",maxmem={spec.memory_mib + hotplug}M" if hotplug else "")]
    for backend in spec.memory_backends():
        argv += backend.args()
    for section in spec.epc:
        argv += section.args()
    if spec.confidential is not None:
        argv += spec.confidential.args()
    argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.cmdline:
        argv += ["-append", spec.cmdline]
    if spec.firmware is not None:
        argv += ["-bios", str(spec.firmware)]
    argv += FIXED_FLAGS
    argv += [*qmp.args(), "-mon", f"chardev={qmp.id},mode=control"]
    argv += [*console.args(), *(["-serial", f"chardev:{console.id}"] if serial else [])]
    argv += _device_args(spec, channels or {})
    return argv


def _machine_options(spec: VMSpec) -> list[str]:
    options = [spec.machine]
    if spec.confidential is not None:
        options.append(f"confidential-guest-support={spec.confidential.id}")
    if spec.memory is not None:
        options.append(f"memory-backend={spec.memory.id}")
    if spec.confidential is not None:
        options += spec.confidential.machine_options()
    for index, section in enumerate(spec.epc):
        options += section.machine_options(index)
    return options


def _device_args(spec: VMSpec, channels: Mapping[str, int]) -> list[str]:
    args: list[str] = []
    controllers: set[str] = set()
    for device in spec.devices:
        controller = device.controller()
        if controller is not None and controller[0] not in controllers:
            controllers.add(controller[0])
            args += ["-device", f"{controller[1]},id={controller[0]}"]
        for chardev in device.chardevs():
            if isinstance(chardev, ChardevChannel) and chardev.id in channels:
                chardev = ChardevSocket(chardev.id, fd=channels[chardev.id])
            args += chardev.args()
        args += device.args()
    return args

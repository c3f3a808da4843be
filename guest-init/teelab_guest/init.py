"""PID 1 of every teelab guest: mount, load modules, read the role, start the agent, say ready, power off.

The initramfs's ``/init`` calls ``main()``. Nothing here may end PID 1 by accident: every step that can fail
reports on the console and the guest powers off, so the host sees a clear line and an exit, never a
panic loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
import threading
import time

from teelab_guest import protocol
from teelab_guest.ports import link_ports, wait_for_port

MODULES_LIST = "/etc/teelab/modules"
MODULES_DIR = "/lib/modules/teelab"
INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on x86_64: timeval, type, code, value
EV_KEY, KEY_POWER = 1, 116
RB_POWER_OFF = 0x4321FEDC
SYS_FINIT_MODULE = 313  # x86_64
# Guest drivers of a confidential-computing platform, and what says the guest runs on it: the kernel registers
# the sev-guest platform device only in an SEV-SNP guest, and sets the tdx_guest CPU flag only in a TD.
# Elsewhere each fails with ENODEV after its load (~60 ms under TCG), so guest-init does not try it.
PLATFORM_MODULES = {
    "sev_guest": ("device", "/sys/bus/platform/devices/sev-guest"),
    "tdx_guest": ("cpu flag", "tdx_guest"),
}

_libc = ctypes.CDLL(None, use_errno=True)
_console_lock = threading.Lock()


def say(line: str) -> None:
    """One line on the serial console (the host watches it)."""
    with _console_lock:
        try:
            with open("/dev/console", "w") as console:
                console.write(line + "\n")
        except OSError:  # no console (a production enclave has no serial port): nowhere to say it
            if sys.stderr is not None:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(line + "\n")


def mount(source: str, target: str, fstype: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode() or None) != 0:
        errno = ctypes.get_errno()
        if errno != 16:  # EBUSY: already mounted
            raise OSError(errno, f"mount {fstype} on {target}: {os.strerror(errno)}")


def mount_basics() -> None:
    mount("proc", "/proc", "proc")
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    mount("tmpfs", "/run", "tmpfs", "mode=0755")
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777")
    os.makedirs("/dev/pts", exist_ok=True)
    mount("devpts", "/dev/pts", "devpts")


def mount_configfs() -> str | None:
    """Mount configfs on /sys/kernel/config (configfs-tsm lives there); why not, or None when mounted."""
    try:
        mount("configfs", "/sys/kernel/config", "configfs")
    except OSError as exc:  # ENODEV: this kernel has no configfs (the 6.1 images)
        return exc.strerror
    return None


def report_evidence_source() -> None:
    """Say which evidence source get_evidence uses here and why (off the boot path: it imports cbor2)."""
    from teelab_guest import evidence

    try:
        say(f"teelab: evidence source: {evidence.describe_sources()}")
    except evidence.EvidenceError as exc:
        say(f"teelab: evidence source: {exc}")


def platform_present(module: str) -> bool:
    """Whether the platform ``module`` drives is there (True for modules not in ``PLATFORM_MODULES``)."""
    kind, what = PLATFORM_MODULES.get(module, ("", ""))
    if kind == "device":
        return os.path.exists(what)
    if kind == "cpu flag":
        return what in cpu_flags()
    return True


def cpu_flags() -> set[str]:
    """The boot CPU's flags from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_modules(listing: str = MODULES_LIST, directory: str = MODULES_DIR) -> list[str]:
    """finit_module() each module named in ``listing``, in order, but platform drivers for a platform this
    guest is not on; returns the ones loaded."""
    loaded = []
    try:
        with open(listing) as names:
            wanted = [n.strip() for n in names if n.strip() and not n.startswith("#")]
    except OSError:
        return loaded
    for name in wanted:
        if not platform_present(name):
            continue
        fd = os.open(os.path.join(directory, name + ".ko"), os.O_RDONLY)
        try:
            if _libc.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
                errno = ctypes.get_errno()
                if errno != 17:  # EEXIST: built in or loaded already
                    say(f"teelab: module {name}: {os.strerror(errno)}")
                    continue
        finally:
            os.close(fd)
        loaded.append(name)
    return loaded


def kernel_cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as cmdline:
        return protocol.parse_cmdline(cmdline.read())


def uptime() -> float:
    with open("/proc/uptime") as up:
        return float(up.read().split()[0])


def poweroff() -> None:
    """Sync, say so on the console, and power the machine off (ACPI)."""
    os.sync()
    say(protocol.POWEROFF_LINE)
    _libc.reboot(RB_POWER_OFF)
    time.sleep(5)
    os._exit(1)


def watch_power_button() -> None:
    """Power off when the ACPI power button is pressed (QMP system_powerdown)."""
    for _ in range(100):
        devices = [d for d in _listdir("/dev/input") if d.startswith("event")]
        if devices:
            break
        time.sleep(0.05)
    for device in devices:
        threading.Thread(target=_read_power_events, args=("/dev/input/" + device,), daemon=True).start()


def _read_power_events(path: str) -> None:
    with open(path, "rb") as events:
        while True:
            data = events.read(INPUT_EVENT.size)
            if len(data) < INPUT_EVENT.size:
                return
            _sec, _usec, kind, code, value = INPUT_EVENT.unpack(data)
            if kind == EV_KEY and code == KEY_POWER and value == 1:
                poweroff()


def start_agent(started: float) -> None:
    """Serve the guest agent in a thread; requests sent before it is up wait in the port's buffer."""

    def serve() -> None:
        from teelab_guest.agent import (
            Agent,
        )  # imported off the boot path: subprocess and json are slow to load

        try:
            path = wait_for_port(protocol.AGENT_PORT, timeout=10.0)
        except FileNotFoundError:
            return  # a guest without the agent port (an enclave outside a lab, say)
        fd = os.open(path, os.O_RDWR)
        Agent(fd, poweroff, started).serve_forever()

    threading.Thread(target=serve, name="agent", daemon=True).start()


def main(exec_at: float | None = None) -> None:
    """PID 1 forks guest-init and only reaps: orphans come to PID 1, while guest-init's own children stay
    guest-init's, so ``subprocess`` there sees their real exit status. ``exec_at`` is the monotonic time at
    which /init started (for the debug timings)."""
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        run_guest(started, [("exec", exec_at or started), ("imported", started)])
        os._exit(1)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid == child:
            say(f"{protocol.FAILED_PREFIX} guest-init exited with status {status}")
            poweroff()


def run_guest(started: float, steps: list[tuple[str, float]]) -> None:
    """Bring the guest up and say ready; ``steps`` collects (name, seconds since boot) for teelab.debug."""
    try:
        mount_basics()
        steps.append(("mounted", uptime()))
        if os.path.exists("/dev/tpmrm0"):  # a vTPM: measure the command line and code before loading any
            from teelab_guest import tpm_boot

            tpm_boot.measure_if_present()
            steps.append(("measured", uptime()))
        os.environ.update(protocol.GUEST_ENV)
        load_modules()
        configfs_missing = mount_configfs()
        steps.append(("modules", uptime()))
        args = kernel_cmdline()
        role = args.get(protocol.ROLE_KEY, "cvm")
        if role not in protocol.ROLES:
            raise ValueError(f"unknown {protocol.ROLE_KEY}={role}; known: {', '.join(protocol.ROLES)}")
        link_ports()
        if role == "cvm":
            if configfs_missing:
                say(f"teelab: no configfs ({configfs_missing}): no configfs-tsm")
            threading.Thread(target=report_evidence_source, name="evidence", daemon=True).start()
        watch_power_button()
        start_agent(started)
        steps.append(("agent", uptime()))
        if args.get(protocol.DEBUG_KEY):
            say("teelab: " + " ".join(f"{name}={at:.3f}" for name, at in steps))
        if role == "parent":
            from teelab_guest import parent_pool  # the host's orders for the pool and the heartbeats

            parent_pool.start()
        elif role == "enclave":
            from teelab_guest import parent_pool

            threading.Thread(target=parent_pool.send_heartbeat, name="heartbeat", daemon=True).start()
        say(protocol.ready_line(role, uptime()))
        if role == "enclave":
            from teelab_guest import enclave_app  # an enclave image's /app/run, in a thread

            enclave_app.start(say)
    except Exception:
        import traceback

        say(f"{protocol.FAILED_PREFIX} {traceback.format_exc()!r}")
        poweroff()
    threading.Event().wait()  # the agent and the power button end the guest


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


if __name__ == "__main__":
    main()

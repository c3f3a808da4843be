"""TEE layer: expected launch measurements, what each TEE kind adds to a ``VMSpec`` (real SEV-SNP/TDX or the
emulated security processor), and the host-side service behind emulated devices."""

from harness.tee.errors import TeeError
from harness.tee.measure import LaunchInputs, SnpMeasurement, TdxMeasurement, measure
from harness.tee.platforms import (
    EmulatedNsmBackend,
    EmulatedSnpBackend,
    EmulatedTdxBackend,
    SnpBackend,
    TdxBackend,
    TeeAttachment,
    TeeBackend,
    backend_for_spec,
    choose_backend,
)
from harness.tee.processor import DeviceService, SecurityProcessor

__all__ = [
    "DeviceService",
    "EmulatedNsmBackend",
    "EmulatedSnpBackend",
    "EmulatedTdxBackend",
    "LaunchInputs",
    "SecurityProcessor",
    "SnpBackend",
    "SnpMeasurement",
    "TdxBackend",
    "TdxMeasurement",
    "TeeAttachment",
    "TeeBackend",
    "TeeError",
    "backend_for_spec",
    "choose_backend",
    "measure",
]

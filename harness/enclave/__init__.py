"""Enclaves: EIF images and their PCRs, and the enclave security module (NSM API) as a state machine."""

from harness.enclave.describe import describe_eif, describe_image
from harness.enclave.eif import EifImage, SectionType, read_eif
from harness.enclave.eif_build import build_eif
from harness.enclave.errors import EnclaveError
from harness.enclave.nsm import SecurityModule
from harness.enclave.pcrs import (
    ImageMeasurements,
    pcr3_of_parent_role,
    pcr4_of_parent_instance,
    pcr8_of_certificate,
)

__all__ = [
    "EifImage",
    "EnclaveError",
    "ImageMeasurements",
    "SectionType",
    "SecurityModule",
    "build_eif",
    "describe_eif",
    "describe_image",
    "pcr3_of_parent_role",
    "pcr4_of_parent_instance",
    "pcr8_of_certificate",
    "read_eif",
]

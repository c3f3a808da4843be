"""The lab KMS: AWS-KMS-shaped JSON API with attestation-bound release (Recipient), SQLite store, audit log.

Start one with ``KmsServer.start(kms_dir, Listen(...))`` (in this process) or ``KmsProcess(kms_dir).start()``.
"""

from harness.kms.runner import KmsProcess, KmsServer, Listen
from harness.kms.store import Credentials, KeyRecord, Store

__all__ = ["Credentials", "KeyRecord", "KmsProcess", "KmsServer", "Listen", "Store"]

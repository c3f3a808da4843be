"""Coded errors of enclave images and the enclave security module (E900-E949)."""

from __future__ import annotations

from harness.errors import LabError


class EnclaveError(LabError):
    code = "E900"
    title = "enclave error"
    explanation = "An enclave image or an enclave security module could not be used."
    exit_status = 2


class EifTruncated(EnclaveError):
    code = "E901"
    title = "enclave image truncated"
    explanation = (
        "The file ends before its 548-byte EIF header, or before the end of a section that its header or a "
        "section header announces. The file was cut short while copying or writing."
    )


class EifBadMagic(EnclaveError):
    code = "E902"
    title = "not an enclave image"
    explanation = "An EIF starts with the magic bytes '.eif' (2e 65 69 66); this file does not."


class EifUnsupportedVersion(EnclaveError):
    code = "E903"
    title = "unsupported EIF version"
    explanation = "teelab reads EIF versions 2 to 4 and writes version 4; the header names another version."


class EifSectionCount(EnclaveError):
    code = "E904"
    title = "bad EIF section count"
    explanation = "The header's num_sections must be between 2 and 32."


class EifSectionTable(EnclaveError):
    code = "E905"
    title = "EIF section table inconsistent"
    explanation = (
        "The header's section_offsets and section_sizes must describe sections that follow the header "
        "back to back, in order, without overlap or gap, each ending inside the file and the last one at its "
        "end; each section header must repeat the size in the table; cmdline, metadata and signature "
        "sections have size limits."
    )


class EifCrcMismatch(EnclaveError):
    code = "E906"
    title = "EIF checksum mismatch"
    explanation = (
        "The CRC-32 over the whole file (except the checksum field) differs from the one in the header: "
        "the image was changed or damaged after it was built."
    )


class EifUnknownSection(EnclaveError):
    code = "E907"
    title = "unknown EIF section type"
    explanation = (
        "Section types are 1 kernel, 2 cmdline, 3 ramdisk, 4 signature and 5 metadata; type 0 (invalid) "
        "or a higher type is refused."
    )


class EifMissingSection(EnclaveError):
    code = "E908"
    title = "EIF lacks a required section"
    explanation = (
        "Every EIF has one kernel, one cmdline and at least one ramdisk section; version 4 adds one "
        "metadata section."
    )


class EifSectionOrder(EnclaveError):
    code = "E909"
    title = "EIF section repeated or out of order"
    explanation = (
        "Kernel, cmdline, metadata and signature sections appear at most once, and every ramdisk comes "
        "after the kernel."
    )


class EifMetadataInvalid(EnclaveError):
    code = "E910"
    title = "EIF metadata invalid"
    explanation = (
        "The metadata section must be a UTF-8 JSON object with ImageName and ImageVersion strings and a "
        "BuildMetadata object."
    )


class EifSignatureMalformed(EnclaveError):
    code = "E911"
    title = "EIF signature section malformed"
    explanation = (
        "The signature section must be a CBOR array of {signing_certificate, signature} maps whose first "
        "entry holds a PEM X.509 certificate and a COSE_Sign1 (ES256/ES384/ES512) over "
        "{register_index: 0, register_value: PCR0}."
    )


class EifSignatureMismatch(EnclaveError):
    code = "E912"
    title = "EIF signature does not verify"
    explanation = (
        "The COSE_Sign1 in the signature section does not verify with the signing certificate's key, signs "
        "another PCR0 than the image's, or the certificate is outside its validity period."
    )


class EifInputInvalid(EnclaveError):
    code = "E913"
    title = "bad input for an enclave image"
    explanation = (
        "Building an EIF needs a readable, non-empty kernel file, a kernel command line without NUL bytes, "
        "readable, non-empty ramdisk files (1 to 29, or 28 when signed: 32 sections in all), custom metadata "
        "that serialises to JSON, a name and version, and arch x86_64 or aarch64. Reading needs an existing "
        "image path."
    )


class SigningKeyInvalid(EnclaveError):
    code = "E914"
    title = "bad EIF signing key or certificate"
    explanation = (
        "Signing an EIF needs a PEM EC P-384 private key and the PEM or DER X.509 certificate of its public "
        "key; both are needed together."
    )


class EifWriteFailed(EnclaveError):
    code = "E915"
    title = "enclave image could not be written"
    explanation = "The output path's directory is missing or not writable; nothing was left behind."


class PcrInputInvalid(EnclaveError):
    code = "E916"
    title = "bad PCR input"
    explanation = "PCR3 and PCR4 measure a non-empty text; a PCR value is 48 bytes (SHA-384)."


class SecurityModuleConfigInvalid(EnclaveError):
    code = "E920"
    title = "bad security module configuration"
    explanation = (
        "A security module is created with boot PCRs for indexes 0-15 only, each 48 bytes, and a "
        "non-empty module id."
    )
    exit_status = 1


# ------------------------------------------------------------------------------ enclave recipes and launches


class EnclaveRecipeUnknown(EnclaveError):
    code = "E930"
    title = "unknown enclave recipe"
    explanation = "No images/enclaves/<name>/enclave.toml exists; the hint names the recipes there are."


class EnclaveRecipeInvalid(EnclaveError):
    code = "E931"
    title = "bad enclave recipe"
    explanation = (
        "An enclave recipe needs name (its folder's name), version, base (an image recipe), an even vcpus "
        "count of 2 or more, memory_mib of 128 or more, cmdline as a list of words, and an app/ folder of "
        "regular files and folders (no links, devices or sockets) with at least one file."
    )


class EnclaveMemoryTooSmall(EnclaveError):
    code = "E932"
    title = "enclave memory too small"
    explanation = (
        "An enclave needs at least 128 MiB and at least 4 times the size of its image (EIF): the kernel "
        "unpacks the ramdisks into memory next to the image itself."
    )


class EnclaveVcpuCount(EnclaveError):
    code = "E933"
    title = "bad enclave vCPU count"
    explanation = (
        "Enclaves take whole cores: an even number of vCPUs, from 2 to 62 (the QingTian and Nitro rule)."
    )


class EnclaveAppFailed(EnclaveError):
    code = "E934"
    title = "enclave application failed"
    explanation = (
        "The enclave booted but its application (/app/run) exited with a non-zero status or did not report "
        "an attestation document line (TEELAB-APP-DOCUMENT); the console log has its output."
    )
    exit_status = 1


class EnclaveAppPackFailed(EnclaveError):
    code = "E935"
    title = "could not pack the enclave application"
    explanation = "Writing the application ramdisk (a newc cpio of the recipe's app/ folder) failed."
    exit_status = 1


class EnclaveImageChanged(EnclaveError):
    code = "E936"
    title = "enclave image changed during launch"
    explanation = (
        "The kernel, command line or ramdisks handed to the VM do not give the PCRs the image had when it "
        "was read: the file was rewritten while the enclave was being launched. Launch it again."
    )
    exit_status = 1


# ----------------------------------------------------------------------------- carving enclaves from a parent


class CarveRefused(EnclaveError):
    """A carve that breaks a sizing rule (REFERENCE section 1); raised before anything is touched."""

    code = "E937"
    title = "parent would keep too few vCPUs"
    explanation = (
        "A parent keeps at least 2 vCPUs: an enclave takes at most the parent's vCPUs on that NUMA node "
        "minus 2 (the QingTian rule)."
    )


class ParentMemoryReserve(CarveRefused):
    code = "E938"
    title = "parent would keep too little memory"
    explanation = "A parent keeps at least 512 MiB of memory after every enclave has taken its share."


class PoolExhausted(CarveRefused):
    code = "E939"
    title = "enclave pool exhausted"
    explanation = (
        "The parent's enclave pool has fewer free vCPUs or less free memory than asked, or a CPU id asked "
        "for is not in the pool (or already taken by another enclave). Terminate an enclave or boot the "
        "parent with a larger pool."
    )


class SharedCore(CarveRefused):
    code = "E940"
    title = "enclave would share a core with the parent"
    explanation = (
        "An enclave takes whole cores: every SMT sibling of its host CPUs must be in the enclave too, none "
        "with the parent. Relaxed only in the ledger's overcommit mode (a host with too few cores)."
    )


class EnclaveMemoryTooLarge(CarveRefused):
    code = "E941"
    title = "enclave memory over the page-size limit"
    explanation = "On 2 MiB pages an enclave has at most 512 MiB; on 1 GiB pages at most 256 GiB (QingTian)."


class NumaSplit(CarveRefused):
    code = "E942"
    title = "enclave would span NUMA nodes"
    explanation = "An enclave's memory and vCPUs come from one NUMA node."


class CpuZeroTaken(CarveRefused):
    code = "E943"
    title = "enclave would take host CPU 0"
    explanation = (
        "Host CPU 0 and its SMT siblings never go to an enclave (they serve the host and the parent)."
    )


class EnclaveCountLimit(CarveRefused):
    code = "E944"
    title = "too many enclaves for this parent"
    explanation = "A parent runs at most 2 enclaves by default (the pool's max_enclaves sets another limit)."


class EnclaveMemoryAlignment(CarveRefused):
    code = "E945"
    title = "enclave memory not a whole number of pages"
    explanation = "Enclave memory is cut in hugepages: a multiple of 2 MiB (or 1 GiB on 1 GiB pages)."


class EnclaveCidInvalid(CarveRefused):
    code = "E946"
    title = "bad enclave CID or name"
    explanation = (
        "An enclave's CID is 4 or more (3 is its parent in the routing group; 0-2 are reserved), below "
        "2**32 - 1, and not used by another enclave of the same parent; its name is a plain name (up to 64 "
        "letters, digits, '.', '_' and '-') that no other enclave of the parent has."
    )


class EnclaveBootFailed(EnclaveError):
    code = "E947"
    title = "enclave did not send its heartbeat"
    explanation = (
        "The enclave VM started but its init did not send the 0xB7 heartbeat to its parent (CID 3, port "
        "9000) in time, or the carve could not take the parent's vCPUs or memory; everything it took was "
        "given back to the parent."
    )
    exit_status = 1


class ConsoleRefused(EnclaveError):
    code = "E948"
    title = "console of a production enclave refused"
    explanation = "Only an enclave started in debug mode has a console; a production enclave has none."


class EnclaveUnknown(EnclaveError):
    code = "E949"
    title = "no such enclave"
    explanation = (
        "No running enclave of this parent has that id or name, or a request from the parent was not "
        "understood (bad JSON, unknown verb, missing field)."
    )

"""Coded errors of the image builder (E5xx)."""

from __future__ import annotations

from harness.errors import LabError


class ImageError(LabError):
    code = "E500"
    title = "image build failed"
    explanation = "A guest image could not be built; the message names the step and the tool's output."


class RecipeUnknown(ImageError):
    code = "E501"
    title = "unknown image recipe"
    explanation = "No images/<name>.toml recipe exists; `teelab image ls` lists the recipes."
    exit_status = 2


class RecipeInvalid(ImageError):
    code = "E502"
    title = "bad image recipe"
    explanation = (
        "An image recipe has a missing or mistyped field, or names a module the kernel does not have."
    )
    exit_status = 2


class KernelFetchFailed(ImageError):
    code = "E503"
    title = "could not fetch the pinned kernel"
    explanation = (
        "`apt-get download` of the kernel package pinned in images/kernel.toml failed, or the file's sha256 "
        "differs from the pin. Debian drops old kernel ABIs from the archive after a point release: pin the "
        "current one (package, version, sha256)."
    )


class RootfsFailed(ImageError):
    code = "E504"
    title = "could not build the root filesystem"
    explanation = "mmdebstrap failed; its output is in the error. Check that the Debian mirror is reachable."


class PackFailed(ImageError):
    code = "E505"
    title = "could not pack the initramfs"
    explanation = "Compiling the Python files or writing the cpio archive failed."

"""TEE layer: expected launch measurements, what each TEE kind adds to a ``VMSpec`` (real SEV-SNP/TDX or the
emulated security processor), and the host-side service behind emulated devices."""

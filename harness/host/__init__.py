"""The host layer: capability probe, hugepages, the cross-process ledger, remote hosts."""

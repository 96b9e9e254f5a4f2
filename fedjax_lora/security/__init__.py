"""Who sent what: per-site signing keys, upload verification and the audit ledger."""

"""Trust for what a device runs: Ed25519 keys, signed folder manifests, the device's trust policy and the
versions it accepted, and A/B deployment of adapters with rollback.

  keys       key pairs, key ids, rotation statements (a new key vouched for by the old one)
  signature  the signed manifest of every file of a folder (adapter, bundle, model): sign and verify
  policy     which keys a device trusts, the highest version it accepted per name, and the check commands run
  rollout    `edge-ft deploy` / `edge-ft rollback`: verify, merge into the inactive slot, score, switch atomically

Device-side: cryptography, numpy and onnxruntime only (never torch).
"""

"""`edge-ft keys new|trust|rotate`: signing keys for adapters and bundles, and the keys a device trusts."""

from __future__ import annotations


def _action(sub, name: str, text: str):
    """An action whose one-line help is also its description (capitalised, with a full stop)."""
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "keys", help="make a signing key pair, install a trusted public key on a device, or rotate keys",
        description="Ed25519 keys (cryptography). The private key signs on a workstation (`edge-ft adapter sign`, "
        "`edge-ft export --sign-key`); a device needs only public keys.")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    n = _action(sub, "new", "write NAME.key (private, mode 0600) and NAME.pub")
    n.add_argument("--out", required=True, metavar="NAME", help="path without suffix: NAME.key and NAME.pub")
    n.set_defaults(func=_new)
    t = _action(sub, "trust", "trust a public key on this device ($EDGE_FT_HOME/trusted-keys, default ~/.edge-ft): "
                "from then on train, adapter apply|merge, predict and deploy refuse what it did not sign")
    t.add_argument("public", metavar="PUBKEY", help="a .pub file of `edge-ft keys new`")
    t.set_defaults(func=_trust)
    r = _action(sub, "rotate", "a statement, signed by the old key, that a new key takes over; pass it to "
                "`edge-ft adapter sign --rotation` so devices that trust the old key accept the new one")
    r.add_argument("--old", required=True, metavar="OLD.key", help="the retiring private key")
    r.add_argument("--new", required=True, metavar="NEW.pub", help="the new public key")
    r.add_argument("--out", required=True, metavar="ROTATION.json", help="statement to write")
    r.set_defaults(func=_rotate)


def _new(args) -> int:
    from edge_ft.trust.keys import new_key_pair

    private, public, keyid = new_key_pair(args.out)
    print(f"{private} (private: keep it off devices) and {public}: key {keyid[:16]}")
    return 0


def _trust(args) -> int:
    from edge_ft.trust.policy import trust_key

    target, keyid = trust_key(args.public)
    print(f"{target}: key {keyid[:16]} trusted on this device")
    return 0


def _rotate(args) -> int:
    from edge_ft.trust.keys import rotation_statement

    body = rotation_statement(args.old, args.new, args.out)["signed"]
    print(f"{args.out}: key {body['new_keyid'][:16]} takes over from key {body['old_keyid'][:16]}")
    return 0

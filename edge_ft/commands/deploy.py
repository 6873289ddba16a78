"""`edge-ft deploy` and `edge-ft rollback`: A/B slots for merged adapters on the device, switched atomically."""

from __future__ import annotations

from edge_ft.trust.policy import add_trust_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy", help="verify an adapter, merge it into the inactive slot, and activate it if holdout accuracy holds",
        description="Slots live in --root (default $EDGE_FT_HOME/deploy, ~/.edge-ft/deploy); `edge-ft predict ROOT` "
        "reads the active one. Every decision is appended to ROOT/deploy.log. A kill at any point leaves one valid "
        "active model.")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="signed adapter folder to verify, merge and score")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="the bundle the adapter was trained with")
    p.add_argument("--holdout", required=True, metavar="TEST.npz", help="labelled data scored before switching")
    p.add_argument("--tolerance", type=float, default=0.01, metavar="T",
                   help="accuracy the new model may lose against the active one")
    p.add_argument("--root", metavar="DIR", help="deployment folder (default $EDGE_FT_HOME/deploy)")
    add_trust_option(p)
    p.set_defaults(func=_deploy)
    r = subparsers.add_parser("rollback", help="make the previously active model active again")
    r.add_argument("--root", metavar="DIR", help="deployment folder (default $EDGE_FT_HOME/deploy)")
    r.set_defaults(func=_rollback)


def _deploy(args) -> int:
    from edge_ft.errors import UserError
    from edge_ft.trust.rollout import deploy

    if not 0 <= args.tolerance < 1:
        raise UserError(f"--tolerance {args.tolerance}: give a fraction of accuracy from 0 up to 1")
    e = deploy(args.adapter, args.bundle, args.holdout, args.root, args.tolerance, args.trust)
    was = "" if e["active_accuracy"] is None else f" (was {e['active_accuracy']:.4f})"
    print(f"slot {e['slot']} active: holdout accuracy {e['accuracy']:.4f}{was}")
    return 0


def _rollback(args) -> int:
    from edge_ft.trust.rollout import rollback

    e = rollback(args.root)
    print(f"slot {e['slot']} active again (slot {e['from']} kept for the next deploy)")
    return 0

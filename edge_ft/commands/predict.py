"""`edge-ft predict`: classify images or a .npz with a trained model.onnx (no torch, no onnx)."""

from __future__ import annotations

import json

from edge_ft.commands.argtypes import int_at_least
from edge_ft.trust.policy import add_trust_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images or a .npz with a trained model (a run folder or model.onnx); no torch needed",
        description="Reads the model's own card (input name, shape, pixel scaling, polarity, class names, stored "
        "in model.onnx by `edge-ft train` and `edge-ft adapter merge`) and prepares the inputs the way the model "
        "was trained: grey, 28x28, white ink on black (light pages are inverted), pixels / 255. Images need "
        "pillow; a model of another input shape takes one .npz (uint8 pixels / 255, or float32 inputs as given). Inputs with a known class (a .npz's labels, or images inside a folder named like a class) are "
        "also scored.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="model.onnx, or a run folder from `edge-ft train`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|DATA.npz",
                   help="image files (png, jpg, bmp, gif, pgm), folders of them, or one .npz")
    p.add_argument("--top-k", type=int_at_least(1), default=1, metavar="K", help="classes to list per input (default 1)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--threads", type=int_at_least(0), default=0, metavar="N",
                   help="onnxruntime intra-op threads (default 0: onnxruntime decides)")
    add_trust_option(p)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.device.classify import gather_inputs, open_model, top_k
    from edge_ft.trust.policy import trusted_model

    model = open_model(trusted_model(args.model, args.trust), args.threads)
    batch = gather_inputs(args.inputs, model.card.classes, model.card.input_shape)
    predictions = top_k(model.probabilities(batch.pixels), args.top_k, model.card.classes, batch.names,
                        batch.labels)
    scored = [p for p in predictions if p.label is not None]
    accuracy = sum(bool(p.correct) for p in scored) / len(scored) if scored else None
    if args.json:
        print(json.dumps({"model": str(model.path), "classes": model.card.classes,
                          "predictions": [p.to_dict() for p in predictions], "accuracy": accuracy,
                          "scored": len(scored)}, indent=2))
        return 0
    width = min(max(len(p.input) for p in predictions), 60)
    for p in predictions:
        guesses = "  ".join(f"{name} {prob:.3f}" for name, _, prob in p.top)
        truth = "" if p.label is None else ("  ok" if p.correct else f"  (is {p.label})")
        print(f"{p.input:<{width}}  {guesses}{truth}")
    if accuracy is not None:
        print(f"accuracy {accuracy:.4f} on {len(scored)} labelled inputs")
    return 0

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
        "pillow; a model of another input shape takes one .npz (uint8 pixels / 255, or float32 inputs as given). "
        "Inputs with a known class (a .npz's labels, or images inside a folder named like a class) are "
        "also scored.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN", help="model.onnx, or a run folder from `edge-ft train`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|DATA.npz",
                   help="image files (png, jpg, bmp, gif, pgm), folders of them, or one .npz")
    p.add_argument("--top-k", type=int_at_least(1), default=1, metavar="K",
                   help="classes to list per input (default 1)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--threads", type=int_at_least(0), default=0, metavar="N",
                   help="onnxruntime intra-op threads (default 0: onnxruntime decides)")
    add_trust_option(p)
    p.set_defaults(func=handler)


def handler(args) -> int:
    import numpy as np

    from edge_ft.device.classify import gather_inputs, open_model
    from edge_ft.trust.policy import trusted_model

    model = open_model(trusted_model(args.model, args.trust), args.threads)
    batch = gather_inputs(args.inputs, model.card.classes, model.card.input_shape)
    probs = model.probabilities(batch.pixels)  # (N, C)
    k = min(args.top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k), most probable first
    rows = [{"input": name, "label": label,
             "top": [{"class": model.card.class_name(int(c)), "index": int(c), "probability": round(float(p[c]), 6)}
                     for c in order]}
            for name, label, p, order in zip(batch.names, batch.labels, probs, top)]
    scored = [r for r in rows if r["label"] is not None]
    accuracy = sum(r["top"][0]["class"] == r["label"] for r in scored) / len(scored) if scored else None
    if args.json:
        print(json.dumps({"model": str(model.path), "classes": model.card.classes, "predictions": rows,
                          "accuracy": accuracy, "scored": len(scored)}, indent=2))
        return 0
    width = min(max(len(r["input"]) for r in rows), 60)
    for r in rows:
        guesses = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
        truth = "" if r["label"] is None else ("  ok" if r["top"][0]["class"] == r["label"] else f"  (is {r['label']})")
        print(f"{r['input']:<{width}}  {guesses}{truth}")
    if accuracy is not None:
        print(f"accuracy {accuracy:.4f} on {len(scored)} labelled inputs")
    return 0

"""Run in the device venv with torch and onnx blocked: exercise edge_ft.device's API and print what it saw as JSON.

    python tests/device_api_probe.py BUNDLE DATA_DIR IMAGES_DIR WORK_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np

from edge_ft.data.npz import load_labelled_npz
from edge_ft.device import Predictor, Trainer, UserError, merge

bundle, data, images, work = (Path(a) for a in sys.argv[1:5])
x, y, classes = load_labelled_npz(data / "train.npz")
xt, yt, _ = load_labelled_npz(data / "test.npz")
seen: dict = {"classes": classes}

# fit with the run's settings: the same epochs, batch order and schedule as `edge-ft train --no-cache`
trainer = Trainer(bundle, threads=1, batch=9)
seen["before"] = trainer.evaluate(xt, yt).accuracy
fit = trainer.fit(x, y, epochs=2, eval_data=(xt, yt), callback=lambda p: seen.setdefault("progress", []).append(
    [p.epoch, p.epochs, p.step, p.loss, p.eval_accuracy]))
seen["fit"] = {"losses": [e.mean_loss for e in fit.epochs], "steps": fit.steps, "lr": [e.lr for e in fit.epochs],
               "eval_accuracy": fit.eval_accuracy, "stopped_early": fit.stopped_early}
seen["evaluate"] = trainer.evaluate(xt, yt).__dict__
trainer.export_model(work / "api-model.onnx")
seen["model_probs"] = Predictor(work / "api-model.onnx").probabilities(xt).tolist()
seen["trainer_probs"] = [[t[2] for t in sorted(p.top, key=lambda t: t[1])] for p in trainer.predict(xt, top_k=3)]

# checkpoint after one epoch, resume in a new trainer: the second epoch matches an uninterrupted run
straight = Trainer(bundle, threads=1, batch=9)
two = [straight.epoch(x, y, lr=0.01).mean_loss for _ in range(2)]
first = Trainer(bundle, threads=1, batch=9)
first.epoch(x, y, lr=0.01)
first.save_checkpoint(work / "ckpt")
resumed = Trainer.resume(bundle, work / "ckpt", threads=1, batch=9)
seen["resume"] = {"straight": two, "resumed": resumed.epoch(x, y, lr=0.01).mean_loss, "steps": resumed.steps,
                  "same_weights": all(np.array_equal(a, b) for a, b in zip(
                      straight.trained_tensors().values(), resumed.trained_tensors().values()))}

# early stop from the callback
stopper = Trainer(bundle, threads=1, batch=9)
early = stopper.fit(x, y, epochs=5, callback=lambda p: p.stop() if p.epoch == 2 else None)
seen["early"] = {"epochs": len(early.epochs), "stopped_early": early.stopped_early, "steps": stopper.steps}

# adapter -> merge -> predict on image files, against the trainer's own predictions
trainer.export_adapter(work / "adapter")
merge(bundle, work / "adapter", work / "merged.onnx")
named = Predictor(work / "merged.onnx").predict([images], top_k=2)
own = trainer.predict([images], top_k=2)
seen["images"] = {"n": len(named), "agree": [a.top[0][:2] == b.top[0][:2] for a, b in zip(named, own)],
                  "correct": sum(bool(p.correct) for p in named), "labels": sorted({str(p.label) for p in named})}


def refusal(call) -> str | None:
    try:
        call()
    except UserError as e:
        return str(e)
    except Exception as e:  # anything else leaked: report its type, the test fails on it
        return f"LEAKED {type(e).__name__}: {e}"
    return None


bad_labels = y.copy()
bad_labels[0] = 7
nan = x.astype(np.float32)[:, None] / 255
nan[0, 0, 0, 0] = np.nan
(work / "broken").mkdir()
(work / "broken" / "checkpoint.json").write_text("{not json")
seen["refusals"] = {
    "labels": refusal(lambda: trainer.step(x[:4], bad_labels[:4])),
    "shape": refusal(lambda: trainer.step(np.zeros((4, 32, 32), np.uint8), y[:4])),
    "nan": refusal(lambda: trainer.fit(nan, y, epochs=1)),
    "ragged": refusal(lambda: trainer.evaluate([[1, 2], [3]], [0, 1])),
    "checkpoint": refusal(lambda: Trainer.resume(bundle, work / "broken")),
    "adapter exists": refusal(lambda: trainer.export_adapter(work / "adapter")),
    "no bundle": refusal(lambda: Trainer(work / "nope")),
    "lr": refusal(lambda: trainer.step(x[:4], y[:4], lr=-1.0)),
}
json.dump(seen, sys.stdout)

"""ClientApp: reply to train with the received vector plus (partition id + 1), to evaluate with its mean.

numpy and onnxruntime are imported (onnxruntime unless the run config says not to) so a node's memory is what
a real device client costs: flwr + numpy + onnxruntime in every ClientApp process.
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _partition(context: Context) -> int:
    if context.run_config.get("import-onnxruntime", True):
        import onnxruntime  # noqa: F401  (its weight is part of what a device client costs)
    return int(context.node_config.get("partition-id", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = _partition(context)
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = [a + (pid + 1) for a in arrays]
    content = RecordDict({"arrays": ArrayRecord(updated),
                          "metrics": MetricRecord({"num-examples": 1, "partition-id": pid})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _partition(context)
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1, "mean": float(np.mean(arrays[0]))})})
    return Message(content=content, reply_to=msg)

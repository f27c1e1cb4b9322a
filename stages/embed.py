"""Stage embed@<run>: run the trained model over the validation set and keep both
representations — `features` (intermediate: the flattened convolutional features that enter
the classifier) and `logits` (final: the network's output) — with labels and predictions.

Reads the weights and `embed.batch_size`; writes data/embeddings/<run>.npz and, through
DVCLive (plots/<run>/eval): the validation accuracy and errors (summary), the confusion
matrix as every (true, predicted) pair with its count, and its figure.
"""
import shutil
import sys

import numpy as np
import torch
from sklearn.metrics import confusion_matrix

from imgcls import checkpoint as checkpoints, params, paths, plotting
from imgcls.errors import stage_main
from imgcls.files import load_npz, save_npz
from imgcls.training import infer, input_stats, select_runtime


def confusion_rows(matrix, classes: list[str]) -> list[dict]:
    """All len(classes)**2 cells, zeros included, so that a class never predicted keeps its
    column (DVCLive's sklearn confusion plot logs one row per image and would lose it)."""
    return [{"actual": actual, "predicted": predicted, "count": int(matrix[i, j]), "actual_index": i,
             "predicted_index": j} for i, actual in enumerate(classes) for j, predicted in enumerate(classes)]


@stage_main
def main(run: str) -> None:
    all_params = params.load()
    cfg = params.run(all_params, run)
    arrays = load_npz(paths.prepared(cfg.data), f"prepared data of {cfg.data}")
    model, checkpoint = checkpoints.load(run)
    rt = select_runtime(cfg.device, cfg.precision, cfg.channels_last)
    rt.place(model)
    mean, std = input_stats(model, *(torch.from_numpy(arrays[key]).to(rt.device) for key in ("mean", "std")))
    images = torch.from_numpy(arrays["x_val"])
    logits, features = [], []
    for batch_logits, batch_features in infer(model, images, mean, std, rt, all_params.embed.batch_size, f"embed@{run}",
                                              checkpoint["input_size"]):
        logits.append(batch_logits.cpu())
        features.append(batch_features.cpu())
    logits, features = torch.cat(logits).numpy(), torch.cat(features).numpy()
    labels, predictions = arrays["y_val"], logits.argmax(1)
    classes = [str(c) for c in arrays["classes"]]
    save_npz(paths.embeddings(run), features=features, logits=logits, labels=labels,
             predictions=predictions, classes=arrays["classes"])
    matrix = confusion_matrix(labels, predictions, labels=np.arange(len(classes)))
    accuracy = float((predictions == labels).mean())
    try:
        live = plotting.live(paths.eval_live(run), paths.eval_metrics(run))
        live.summary.update({"accuracy": accuracy, "errors": int((predictions != labels).sum()),
                             "images": int(len(labels))})
        live.log_plot("confusion", confusion_rows(matrix, classes), x="predicted", y="actual",
                      template="confusion_square")
        live.log_image(paths.confusion_png(run).name,
                       plotting.confusion(matrix, classes, f"{run} (epoch {checkpoint['epoch']})"))
        live.end()
    except BaseException:
        shutil.rmtree(paths.eval_live(run), ignore_errors=True)
        paths.eval_metrics(run).unlink(missing_ok=True)
        raise
    print(f"embed@{run}: features {features.shape[1]}-d, logits {logits.shape[1]}-d, accuracy {accuracy:.4f}, "
          f"{int((predictions != labels).sum())} errors")


if __name__ == "__main__":
    main(sys.argv[1])

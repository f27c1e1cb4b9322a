"""Stage embed@<run>: run the trained model over the validation set and keep both
representations — `features` (intermediate: the flattened convolutional features that enter
the classifier) and `logits` (final: the network's output) — with labels and predictions.

Reads the weights and `embed.batch_size`; writes data/embeddings/<run>.npz, the
predictions CSV (for DVC's confusion template) and the confusion-matrix figure.
"""
import csv
import sys

import numpy as np
import torch
from pydantic import TypeAdapter
from sklearn.metrics import confusion_matrix

from stages import models, params, paths, plotting
from stages.errors import PipelineError, stage_main
from stages.files import atomic_path, load_npz, save_npz
from stages.training import infer, input_stats, select_runtime


def load_model(run: str):
    """Rebuild the network from its checkpoint (weights_only: no pickle from disk)."""
    try:
        checkpoint = torch.load(paths.model(run), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"embed@{run}: {paths.model(run)} not found; run train@{run} first") from None
    except Exception as err:  # truncated file, or a pickle that is more than tensors and plain data
        detail = str(err).split("\n")[0][:200]
        raise PipelineError(f"embed@{run}: {paths.model(run)} is not a checkpoint train@{run} wrote "
                            f"({type(err).__name__}: {detail}); rerun train@{run}") from None
    model_params = TypeAdapter(params.ModelParams).validate_python(checkpoint["model"])
    channels, size = checkpoint["input_shape"][0], checkpoint["input_shape"][1]
    model = models.build(model_params, in_channels=channels, num_classes=len(checkpoint["classes"]), image_size=size,
                         load_weights=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint


def write_predictions(labels, predictions, classes, target) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["actual", "predicted"])
            writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predictions))


@stage_main
def main(run: str) -> None:
    all_params = params.load()
    cfg = params.run(all_params, run)
    arrays = load_npz(paths.prepared(cfg.data), f"prepared data of {cfg.data}")
    model, checkpoint = load_model(run)
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
    write_predictions(labels, predictions, classes, paths.predictions(run))
    matrix = confusion_matrix(labels, predictions, labels=np.arange(len(classes)))
    plotting.confusion(matrix, classes, f"{run} (epoch {checkpoint['epoch']})", paths.confusion_png(run))
    accuracy = float((predictions == labels).mean())
    print(f"embed@{run}: features {features.shape[1]}-d, logits {logits.shape[1]}-d, accuracy {accuracy:.4f}, "
          f"{int((predictions != labels).sum())} errors")


if __name__ == "__main__":
    main(sys.argv[1])

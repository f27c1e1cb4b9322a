"""The checkpoint a trained run leaves (data/models/<run>.pt): weights plus what rebuilds the
network around them, written by train and read by embed and anything else that applies a run."""
import torch
from pydantic import TypeAdapter

from imgcls import models, params, paths
from imgcls.errors import PipelineError
from imgcls.files import atomic_path


def save(run: str, state_dict: dict, model_params, input_shape, input_size, classes, epoch: int) -> None:
    # Saved through a file object: given a path, torch names the archive inside after the
    # (temporary) file name, and the same weights would hash differently on every run.
    with atomic_path(paths.model(run)) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": {k: v.contiguous() for k, v in state_dict.items()},
                    "model": model_params.model_dump(), "input_shape": list(input_shape), "input_size": input_size,
                    "classes": list(classes), "epoch": epoch}, fh)


def load(run: str):
    """Rebuild the network from its checkpoint (weights_only: no pickle from disk); (model, checkpoint)."""
    try:
        checkpoint = torch.load(paths.model(run), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{run}: {paths.model(run)} not found; run train@{run} first") from None
    except Exception as err:  # truncated file, or a pickle that is more than tensors and plain data
        detail = str(err).split("\n")[0][:200]
        raise PipelineError(f"{run}: {paths.model(run)} is not a checkpoint train@{run} wrote "
                            f"({type(err).__name__}: {detail}); rerun train@{run}") from None
    model_params = TypeAdapter(params.ModelParams).validate_python(checkpoint["model"])
    channels, size = checkpoint["input_shape"][0], checkpoint["input_shape"][1]
    model = models.build(model_params, in_channels=channels, num_classes=len(checkpoint["classes"]), image_size=size,
                         load_weights=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint

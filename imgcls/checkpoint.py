"""The checkpoint a trained run leaves (data/models/<run>.pt): weights plus what rebuilds the
network around them, written by train and read by embed and anything else that applies a run."""
import torch
from pydantic import TypeAdapter

from imgcls import models, params, paths
from imgcls.errors import PipelineError
from imgcls.files import atomic_path


def save(run: str, state_dict: dict, model_params, input_shape, input_size, classes, epoch: int,
         mean: torch.Tensor, std: torch.Tensor) -> None:
    """mean/std: the training split's statistics, so the checkpoint alone classifies new images."""
    # Saved through a file object: given a path, torch names the archive inside after the
    # (temporary) file name, and the same weights would hash differently on every run.
    with atomic_path(paths.model(run)) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": {k: v.contiguous() for k, v in state_dict.items()},
                    "model": model_params.model_dump(), "input_shape": list(input_shape), "input_size": input_size,
                    "classes": list(classes), "epoch": epoch,
                    "mean": mean.detach().float().cpu().contiguous(), "std": std.detach().float().cpu().contiguous()}, fh)


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
    try:
        model_params = _checked(checkpoint)
        channels, size = checkpoint["input_shape"][0], checkpoint["input_shape"][1]
        build = dict(in_channels=channels, num_classes=len(checkpoint["classes"]), image_size=size, load_weights=False)
        with torch.device("meta"):  # shapes only, nothing allocated: compared before any real weights exist
            expected = {key: tuple(value.shape) for key, value in models.build(model_params, **build).state_dict().items()}
        _check_state(checkpoint["state_dict"], expected)
    except (ValueError, PipelineError) as err:  # pydantic's ValidationError is a ValueError
        detail = str(err).split("\n")[0][:200] if not hasattr(err, "errors") else _first_error(err)
        raise PipelineError(f"{run}: {paths.model(run)} is not a checkpoint train@{run} wrote ({detail}); "
                            f"rerun train@{run}") from None
    model = models.build(model_params, **build)
    model.load_state_dict(checkpoint["state_dict"])
    return model, checkpoint


MAX_SIDE = 8192  # no study trains on larger inputs: a bigger number in a checkpoint is not one of ours
MAX_CLASSES = 100_000


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _first_error(err) -> str:
    first = err.errors()[0]
    return ".".join(["model", *(str(part) for part in first["loc"])]) + f": {first['msg']}"


def _checked(checkpoint):
    """The model params, after checking every field load and its callers read (types and plausible sizes)."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in ("state_dict", "model", "input_shape", "input_size", "classes", "epoch")
               if key not in checkpoint]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    shape = checkpoint["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and _is_int(shape[0], 1, 3) and shape[0] != 2
            and all(_is_int(side, 1, MAX_SIDE) for side in shape[1:])):
        raise ValueError(f"input_shape {str(shape)[:60]} is not [1 or 3, height, width] with sides up to {MAX_SIDE}")
    if not (checkpoint["input_size"] is None or _is_int(checkpoint["input_size"], 1, MAX_SIDE)):
        raise ValueError(f"input_size {str(checkpoint['input_size'])[:60]} is not null or 1..{MAX_SIDE}")
    classes = checkpoint["classes"]
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"classes is not a list of 2 to {MAX_CLASSES:,} names")
    if not _is_int(checkpoint["epoch"], 0, 10**9):
        raise ValueError(f"epoch {str(checkpoint['epoch'])[:60]} is not a whole number")
    for key in ("mean", "std"):  # written by newer trains: per-channel statistics
        value = checkpoint.get(key)
        if value is not None and not (isinstance(value, torch.Tensor) and tuple(value.shape) == (shape[0],)):
            raise ValueError(f"{key} is not {shape[0]} per-channel values")
    return TypeAdapter(params.ModelParams).validate_python(checkpoint["model"])


def _check_state(state_dict, expected: dict) -> None:
    """The weights are exactly the tensors the rebuilt network has, each of the same shape."""
    if not (isinstance(state_dict, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state_dict.items())):
        raise ValueError("state_dict is not a dict of tensors")
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit the network ({len(missing)} missing tensors, e.g. "
                         f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {[str(k)[:60] for k in unexpected[:1]]})")
    wrong = [key for key in expected if tuple(state_dict[key].shape) != expected[key]]
    if wrong:
        raise ValueError(f"state_dict tensor {wrong[0]} has shape {list(state_dict[wrong[0]].shape)}, "
                         f"the network expects {list(expected[wrong[0]])}")

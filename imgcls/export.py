"""Export a trained run for serving, and check the export against the checkpoint.

    python -m imgcls.export <run>          # writes data/models/<run>.pt2

The exported program (torch.export) takes uint8 images [N, C, H, W] as preprocess makes them
and returns class probabilities: normalisation and resizing are inside, so a server needs
nothing from this project. Before writing, it is run on the run's prepared validation images
and compared with the checkpoint in eager fp32: the largest probability difference must stay
under TOLERANCE and every predicted class must agree.
"""
import sys

import torch
from torch import nn

from imgcls import checkpoint as checkpoints, params, paths
from imgcls.errors import PipelineError, stage_main
from imgcls.files import atomic_path, load_npz
from imgcls.training import input_stats, normalize, resize, select_runtime

TOLERANCE = 1e-4  # max |probability difference|, exported vs checkpoint, both fp32 on the CPU


class Serving(nn.Module):
    """uint8 images in, probabilities out: the pipeline's resize + normalisation, then the model."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, rt, size: int | None):
        super().__init__()
        self.model, self.rt, self.size = model.eval(), rt, size
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(normalize(resize(images, self.size), self.mean, self.std, self.rt))
        return logits.float().softmax(1)


def serving_module(run: str) -> tuple[Serving, dict]:
    model, checkpoint = checkpoints.load(run)
    rt = select_runtime("cpu", "fp32", "off")
    mean, std = input_stats(model, checkpoint["mean"], checkpoint["std"])
    return Serving(model, mean.float(), std.float(), rt, checkpoint["input_size"]), checkpoint


def export(run: str) -> float:
    """Write data/models/<run>.pt2; the largest probability difference against the checkpoint."""
    module, checkpoint = serving_module(run)
    study = params.run(params.load(), run).data
    images = torch.from_numpy(load_npz(paths.prepared(study), f"prepared data of {study}")["x_val"])
    example = images[:2]
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export names the unsupported construct
        raise PipelineError(f"export {run}: torch.export failed ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    with torch.no_grad():
        expected = torch.cat([module(images[i:i + 256]) for i in range(0, len(images), 256)])
        exported = torch.cat([program.module()(images[i:i + 256]) for i in range(0, len(images), 256)])
    difference = float((expected - exported).abs().max())
    disagree = int((expected.argmax(1) != exported.argmax(1)).sum())
    if difference > TOLERANCE or disagree:
        raise PipelineError(f"export {run}: the export differs from the checkpoint (max |dp| {difference:.2e}, "
                            f"{disagree} predictions) on the validation set; not written")
    with atomic_path(paths.exported(run)) as tmp:
        torch.export.save(program, tmp)
    return difference


@stage_main
def main(run: str) -> None:
    difference = export(run)
    print(f"export {run}: {paths.exported(run)}; on the validation set max |probability difference| "
          f"{difference:.1e} (tolerance {TOLERANCE:g}), every predicted class equal")


if __name__ == "__main__":
    main(sys.argv[1])

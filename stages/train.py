"""Stage train@<run>: train the run's model on its study's prepared data.

Reads params `train.<run>` and `seed`; writes the best epoch's weights
(data/models/<run>.pt), the architecture table, the wall-clock timing and, through DVCLive
(plots/<run>/live): the per-epoch history, the summary metrics, the learning-curve charts'
data and figure.  A run that stops (PipelineError, any exception) leaves none of these behind.
With nproc or nnodes above 1 it re-launches itself under torchrun; rank 0 alone writes
(docs/distributed.md).
"""
import csv
import shutil
import sys

import numpy as np
import torch

from imgcls import checkpoint, distributed, models, params, paths, plotting
from imgcls.errors import PipelineError, stage_main
from imgcls.files import atomic_path, load_npz, save_json
from imgcls.training import fit, fit_linear_svm, select_runtime


def load_prepared(study: str, device) -> tuple[dict, list[str]]:
    """Prepared arrays as tensors on `device` (uint8 images, int64 labels, float stats)."""
    arrays = load_npz(paths.prepared(study), f"prepared data of {study}")
    tensors = {key: torch.from_numpy(np.ascontiguousarray(arrays[key])).to(device)
               for key in ("x_train", "y_train", "x_val", "y_val", "mean", "std")}
    return tensors, [str(c) for c in arrays["classes"]]


def write_architecture(rows: list[dict], target) -> None:
    # By hand: a table of layers, neither a metric nor a plot DVCLive could log.
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["layer", "output_shape", "params"])
            writer.writeheader()
            writer.writerows(rows)


def discard_outputs(run: str) -> None:
    """What a stopped run had written so far: DVC would not commit it, but people would read it."""
    shutil.rmtree(paths.live(run), ignore_errors=True)
    for path in (paths.train_metrics(run), paths.architecture(run), paths.timing(run), paths.model(run)):
        path.unlink(missing_ok=True)


def log_results(live, run: str, model_name: str, history: list[dict], n_params: int, epochs: int) -> dict:
    """Summary metrics (outcomes only), the learning-curve charts' rows and figure, via DVCLive.

    The summary is replaced, not updated: DVCLive's copy of the last epoch's history would
    repeat final_val_acc and final_val_loss under other names."""
    best = max(history, key=lambda row: row["val_acc"])
    live.summary = {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                    "final_val_acc": history[-1]["val_acc"], "final_val_loss": history[-1]["val_loss"],
                    "n_params": n_params, "epochs": epochs}
    for metric, key in zip(paths.LEARNING_CURVES, ("loss", "acc")):
        rows = [{"epoch": row["epoch"], "split": split, metric: row[f"{prefix}_{key}"]}
                for row in history for split, prefix in (("train", "train"), ("validation", "val"))]
        live.log_plot(metric, rows, x="epoch", y=metric, template="learning_curve")
    live.log_image(paths.learning_curves_png(run).name, plotting.learning_curves(history, f"{run} ({model_name})"))
    return best


@stage_main
def main(run: str) -> None:
    all_params = params.load()
    cfg = params.run(all_params, run)
    if cfg.nproc * cfg.nnodes > 1 and not distributed.launched():
        distributed.launch("stages.train", [run], cfg, name=f"train@{run}")
        return
    rt = select_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.deterministic)
    if distributed.world() > 1:
        rt = distributed.init(rt)
    main_rank = distributed.is_main()
    seed = params.run_seed(all_params, run)
    torch.manual_seed(seed)
    data, classes = load_prepared(cfg.data, rt.device)
    input_shape = tuple(data["x_train"].shape[1:])
    if cfg.input_size is not None:
        input_shape = (input_shape[0], cfg.input_size, cfg.input_size)
    model = models.build(cfg.model, in_channels=input_shape[0], num_classes=len(classes), image_size=input_shape[1])
    n_params = models.count_parameters(model)
    if main_rank:
        architecture = models.summarize(model, input_shape)  # before training: as built, written after
        print(f"train@{run}: {cfg.model.name} with {n_params:,} parameters on {rt.device} ({rt.precision}, "
              f"channels_last={rt.channels_last}), {len(data['x_train'])} training images, "
              f"{distributed.world()} process(es)")
        live = plotting.live(paths.live(run), paths.train_metrics(run))

    def log_epoch(row: dict) -> None:
        live.step = row["epoch"]
        for split in ("train", "val"):
            live.log_metric(f"{split}/loss", row[f"{split}_loss"])
            live.log_metric(f"{split}/acc", row[f"{split}_acc"])

    try:
        try:
            method = fit if cfg.method == "gradient" else fit_linear_svm
            history, best_state, seconds = method(model, data, cfg, rt, seed, log_epoch, name=f"train@{run}")
        except torch.cuda.OutOfMemoryError:
            raise PipelineError(f"train@{run}: CUDA out of memory; lower train.{run}.batch_size "
                                f"(now {cfg.batch_size})") from None
        except RuntimeError as err:
            if "does not have a deterministic implementation" not in str(err):
                raise
            raise PipelineError(f"train@{run}: {str(err).split(',')[0]}; "
                                f"set train.{run}.deterministic: false") from None
        distributed.teardown()
        if not main_rank:
            return
        best = log_results(live, run, cfg.model.name, history, n_params, cfg.epochs)
        live.end()
        checkpoint.save(run, best_state, cfg.model, input_shape, cfg.input_size, classes, best["epoch"],
                        data["mean"], data["std"])
        write_architecture(architecture, paths.architecture(run))
        epoch_seconds = sum(row["epoch_seconds"] for row in history)
        # By hand, not in DVCLive's summary: wall-clock figures differ between identical runs.
        save_json(paths.timing(run), {
            "train_seconds": round(seconds, 1),
            "seconds_per_epoch": round(epoch_seconds / len(history), 2),
            "train_images_per_second": round(len(data["x_train"]) * cfg.epochs / epoch_seconds, 1),
            "device": str(rt.device),
            "precision": rt.precision,
        })
    except BaseException:
        if main_rank:
            discard_outputs(run)
        raise
    print(f"train@{run}: best validation accuracy {best['val_acc']:.4f} at epoch {best['epoch']} "
          f"({seconds:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1])

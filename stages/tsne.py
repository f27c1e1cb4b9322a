"""Stage tsne@<run>: 2-D t-SNE of the validation embeddings (intermediate and final),
coloured by class, with a linear SVM fitted on the 2-D points as a measure of how linearly
separable the projection is (the line is drawn for two-class studies, as in the reference's Fig. 8).

Reads params `tsne.*`; writes through DVCLive (plots/<run>/tsne): the 2-D points (a custom
plot), the figure and the SVM accuracies (summary).
"""
import shutil
import sys

from imgcls import params, paths, plotting
from imgcls.errors import PipelineError, stage_main
from imgcls.files import load_npz
from imgcls.projection import REPRESENTATIONS, linear_separability, project
from imgcls.sources import stratified_subset


@stage_main
def main(run: str) -> None:
    all_params = params.load()
    cfg = all_params.tsne
    embedded = load_npz(paths.embeddings(run), f"embeddings of {run}")
    classes = [str(c) for c in embedded["classes"]]
    keep = stratified_subset(embedded["labels"], cfg.max_points, cfg.seed)
    if cfg.perplexity * 3 >= len(keep):
        raise PipelineError(f"tsne.perplexity {cfg.perplexity} is too large for {len(keep)} points "
                            f"(needs perplexity < points / 3)")
    labels = embedded["labels"][keep]
    panels, summary, rows = [], {"points": int(len(keep))}, []
    for key, title in REPRESENTATIONS:
        points = project(embedded[key][keep], cfg, cfg.seed)
        accuracy, boundary = linear_separability(points, labels, cfg.seed)
        summary[f"svm_2d_acc_{key}"] = round(accuracy, 4)
        panels.append({"name": f"{title}, {embedded[key].shape[1]}-d", "points": points, "labels": labels,
                       "boundary": boundary, "note": f"2-D linear SVM {accuracy:.1%}"})
        rows += [{"representation": key, "x": round(float(x), 4), "y": round(float(y), 4), "class": classes[label],
                  "label": int(label)} for (x, y), label in zip(points, labels)]
        print(f"tsne@{run}: {key} ({embedded[key].shape[1]}-d) -> 2-D, linear SVM on the projection {accuracy:.4f}")
    try:
        live = plotting.live(paths.tsne_live(run), paths.tsne_metrics(run))
        live.summary.update(summary)
        live.log_plot("tsne", rows, x="x", y="y", template="tsne")
        live.log_image(paths.tsne_png(run).name, plotting.tsne(
            panels, classes, f"t-SNE of {run} validation representations (perplexity {cfg.perplexity:g}, "
                             f"{len(keep)} points)"))
        live.end()
    except BaseException:
        shutil.rmtree(paths.tsne_live(run), ignore_errors=True)
        paths.tsne_metrics(run).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    main(sys.argv[1])

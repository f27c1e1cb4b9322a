"""Stage tsne@<run>: 2-D t-SNE of the validation embeddings (intermediate and final),
coloured by class, with a linear SVM fitted on the 2-D points as a measure of how linearly
separable the projection is (the line is drawn for two-class studies, as in the reference's Fig. 8).

Reads params `tsne.*`; writes plots/<run>/tsne.csv, tsne.png and metrics/tsne_<run>.json.
"""
import csv
import sys

from imgcls import params, paths, plotting
from imgcls.errors import PipelineError, stage_main
from imgcls.files import atomic_path, load_npz, save_json
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
        rows += [(key, f"{x:.4f}", f"{y:.4f}", classes[label]) for (x, y), label in zip(points, labels)]
        print(f"tsne@{run}: {key} ({embedded[key].shape[1]}-d) -> 2-D, linear SVM on the projection {accuracy:.4f}")
    with atomic_path(paths.tsne_csv(run)) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["representation", "x", "y", "class"])
            writer.writerows(rows)
    plotting.tsne(panels, classes, f"t-SNE of {run} validation representations "
                  f"(perplexity {cfg.perplexity:g}, {len(keep)} points)", paths.tsne_png(run))
    save_json(paths.tsne_metrics(run), summary)


if __name__ == "__main__":
    main(sys.argv[1])
